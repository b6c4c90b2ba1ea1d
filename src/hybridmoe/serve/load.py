"""Loading a checkpoint directory for inference: the one loader of `hybridmoe serve`, `chat`, `generate`,
`eval ruler` and `eval ppl`."""

from __future__ import annotations

import os


def load_model(checkpoint: str, tokenizer: str | None = None, device: str | None = None, dtype=None):
    """(model in eval mode, tokenizer) of a Hugging Face model directory (the tokenizer from `tokenizer`, a
    directory, when given). device: default cuda when available, else cpu; dtype (`hybridmoe.dtypes` names): default
    bfloat16 on GPU, float32 on CPU."""
    from ..data.tokenizer import load_tokenizer
    from ..dtypes import inference_device_dtype
    from ..modeling import HybridMoEForCausalLM

    if not os.path.isdir(checkpoint):
        raise ValueError(f"checkpoint {checkpoint}: no such directory; pass a Hugging Face model directory")
    tok = load_tokenizer(tokenizer or checkpoint)
    device, dtype = inference_device_dtype(device, dtype)
    model = HybridMoEForCausalLM.from_pretrained(checkpoint, dtype=dtype, device=device).eval()
    return model, tok


def stop_token_ids(tokenizer) -> list[int]:
    """The tokens that end a generation: the tokenizer's eos and, when it has one, the chat turn end `<|im_end|>`."""
    eos = {tokenizer.eos_token_id}
    im_end = tokenizer.get_vocab().get("<|im_end|>")
    if im_end is not None:
        eos.add(im_end)
    return sorted(t for t in eos if t is not None)


def load_engine(
    checkpoint: str,
    tokenizer: str | None = None,
    device: str | None = None,
    dtype=None,
    max_num_seqs: int = 8,
    max_model_len: int | None = None,
    prefill_chunk: int = 512,
    seed: int = 0,
):
    """(Engine, tokenizer) over `load_model(checkpoint, tokenizer, device, dtype)`. max_model_len: default the
    config's max_position_embeddings. The requests stop at `stop_token_ids(tokenizer)`."""
    from .engine import Engine

    model, tok = load_model(checkpoint, tokenizer, device, dtype)
    engine = Engine(
        model, max_num_seqs=max_num_seqs, max_model_len=max_model_len or model.config.max_position_embeddings,
        prefill_chunk=prefill_chunk, eos_token_id=stop_token_ids(tok), detokenize=tok, seed=seed,
    )  # fmt: skip
    return engine, tok
