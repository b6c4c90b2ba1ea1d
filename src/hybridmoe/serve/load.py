"""Loading a checkpoint directory for inference: the one loader of `hybridmoe serve`, `chat`, `generate`,
`eval ruler` and `eval ppl`, and the reader of the weight updates a trainer publishes to a running server."""

from __future__ import annotations

import json
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
    from ..data.tokenizer import token_id

    eos = {tokenizer.eos_token_id}
    im_end = token_id(tokenizer, "<|im_end|>")
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
    decode_mode: str | None = None,
):
    """(Engine, tokenizer) over `load_model(checkpoint, tokenizer, device, dtype)`. max_model_len: default the
    config's max_position_embeddings. The requests stop at `stop_token_ids(tokenizer)`. decode_mode: the Engine's
    (default: CUDA graphs on a GPU, eager on the CPU)."""
    from .engine import Engine

    model, tok = load_model(checkpoint, tokenizer, device, dtype)
    engine = Engine(
        model, max_num_seqs=max_num_seqs, max_model_len=max_model_len or model.config.max_position_embeddings,
        prefill_chunk=prefill_chunk, eos_token_id=stop_token_ids(tok), detokenize=tok, seed=seed,
        decode_mode=decode_mode,
    )  # fmt: skip
    return engine, tok


def read_weights(path: str) -> dict:
    """The tensors of a model directory's safetensors files (`model.safetensors`, or the shards its
    `model.safetensors.index.json` lists), on the CPU, by their names in the file: what `Engine.load_weights` takes.
    Only safetensors are read (no pickle). Raises ValueError naming what is wrong with the directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..checkpoint import INDEX_NAME, WEIGHTS_NAME

    if not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise ValueError(f"weights path {path!r} {what}; pass the directory the trainer wrote model.safetensors to")
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index) as fh:
                files = sorted(set(json.load(fh)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index ({e!r})") from None
        bad = [f for f in files if not isinstance(f, str) or os.path.basename(f) != f]
        if bad:
            raise ValueError(f"{index} names shard(s) outside its directory: {bad[:3]}")
    elif os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        files = [WEIGHTS_NAME]
    else:
        raise ValueError(f"{path} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}; write the weights with "
                         "save_pretrained (safetensors) first")  # fmt: skip
    tensors = {}
    for name in files:
        file = os.path.join(path, name)
        try:
            shard = load_file(file, device="cpu")
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{file} is not a readable safetensors file ({e})") from None
        repeated = sorted(set(shard) & set(tensors))
        if repeated:
            raise ValueError(f"{file} repeats tensor(s) of another shard: {repeated[:3]}")
        tensors.update(shard)
    return tensors
