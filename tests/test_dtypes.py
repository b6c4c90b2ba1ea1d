"""The one dtype vocabulary (`hybridmoe.dtypes`) and the one inference loader (`hybridmoe.serve.load.load_model`)."""

import pytest
import torch
from test_server import make_checkpoint

from hybridmoe.dtypes import DTYPE_NAMES, inference_device_dtype, resolve_dtype
from hybridmoe.serve.load import load_engine, load_model, stop_token_ids


def test_names_and_aliases():
    for long, short, dtype in (("float32", "fp32", torch.float32), ("bfloat16", "bf16", torch.bfloat16),
                               ("float16", "fp16", torch.float16)):  # fmt: skip
        assert resolve_dtype(long) is resolve_dtype(short) is resolve_dtype(dtype) is dtype
        assert long in DTYPE_NAMES and short in DTYPE_NAMES
    assert resolve_dtype(None) is None
    with pytest.raises(ValueError, match="use one of float32, bfloat16"):
        resolve_dtype("float8")
    assert inference_device_dtype("cpu") == ("cpu", torch.float32)
    assert inference_device_dtype("cpu", "bf16") == ("cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="'tpu' is not a torch device"):
        inference_device_dtype("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            inference_device_dtype("cuda")


def test_one_loader_for_serve_and_eval(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    model, tok = load_model(checkpoint, device="cpu", dtype="bf16")
    assert not model.training and model.lm_head.weight.dtype == torch.bfloat16
    assert stop_token_ids(tok) == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    engine, _ = load_engine(checkpoint, device="cpu", max_num_seqs=1, max_model_len=64)
    assert engine.eos_token_ids == set(stop_token_ids(tok)) and engine.model.lm_head.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="no such directory"):
        load_model(str(tmp_path / "missing"))
