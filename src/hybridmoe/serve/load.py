"""Loading a checkpoint directory (model + tokenizer) into an Engine, for `hybridmoe serve`, `chat` and `generate`."""

from __future__ import annotations

import os


def load_engine(
    checkpoint: str,
    tokenizer: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_num_seqs: int = 8,
    max_model_len: int | None = None,
    prefill_chunk: int = 512,
    seed: int = 0,
):
    """(Engine, tokenizer) for a Hugging Face model directory with its tokenizer (or `tokenizer`, a directory).

    device: default cuda when available, else cpu; dtype: default bfloat16 on GPU, float32 on CPU. max_model_len:
    default the config's max_position_embeddings. The requests stop at the tokenizer's eos and at `<|im_end|>`."""
    import torch

    from ..data.tokenizer import load_tokenizer
    from ..modeling import HybridMoEForCausalLM
    from .engine import Engine

    if not os.path.isdir(checkpoint):
        raise ValueError(f"checkpoint {checkpoint}: no such directory; pass a Hugging Face model directory")
    tok = load_tokenizer(tokenizer or checkpoint)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model = HybridMoEForCausalLM.from_pretrained(checkpoint, dtype=dtype, device=device).eval()
    eos = {tok.eos_token_id}
    im_end = tok.get_vocab().get("<|im_end|>")
    if im_end is not None:
        eos.add(im_end)
    engine = Engine(
        model, max_num_seqs=max_num_seqs, max_model_len=max_model_len or model.config.max_position_embeddings,
        prefill_chunk=prefill_chunk, eos_token_id=sorted(eos), detokenize=tok, seed=seed,
    )  # fmt: skip
    return engine, tok
