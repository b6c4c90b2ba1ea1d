"""One dtype vocabulary for every command, recipe and API: torch's names and the short forms people type.

`float32` / `fp32`, `bfloat16` / `bf16`, `float16` / `fp16` (torch.dtype objects pass through). Inference defaults
follow the hardware: bfloat16 on a GPU, float32 on a CPU (where bf16 matmuls are slow without AVX512-BF16 / AMX).
Importing this module does not import torch, so the CLI can offer the names without paying for it.
"""

from __future__ import annotations

_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_NAMES = ("float32", "bfloat16", "float16", *_ALIASES)


def resolve_dtype(dtype):
    """A torch.dtype for a name of DTYPE_NAMES (or a torch.dtype, or None: None); ValueError for anything else."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = _ALIASES.get(dtype, dtype)
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def check_device(device: str) -> str:
    """`device` if it names a torch device this machine has (cpu, cuda, cuda:N), else a ValueError saying why."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{device}: this machine has no CUDA device (torch {torch.__version__}); use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def inference_device_dtype(device: str | None = None, dtype=None):
    """(device, torch.dtype) for inference: cuda when available, else cpu; bfloat16 on a GPU, float32 otherwise."""
    import torch

    device = check_device(str(device)) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(dtype) or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    return device, dtype
