"""The SSD chunked scan and the causal conv on CUDA through their reference libraries, when installed
(`pip install hybridmoe[gpu]`): state-spaces/mamba's Triton scan (`mamba_ssm/ops/triton/ssd_combined.py`,
`mamba_chunk_scan_combined`) and Dao-AILab/causal-conv1d's CUDA conv (`causal_conv1d/causal_conv1d_interface.py`,
`causal_conv1d_fn`). Twins: `ssd.ssd_chunked` / `ssd.ssd_reference` and `ssd.causal_conv1d` /
`ssd.causal_conv1d_reference`; `ssd.py` calls these functions on CUDA tensors when the library imports and the
call fits what the kernel supports (`ssd_fits`, `conv_fits`), and runs its PyTorch path otherwise.

Semantics matched to the twins:
- Packed documents: both libraries take `seq_idx` as int32 and compare ids for equality only. The scan's initial state
  belongs to document 0 (its state passing starts from id 0; state-spaces/mamba `ssd_state_passing.py`), ours to the
  first token's document, so the scan gets ids relative to the first token's id. The conv zeroes the output of
  tokens with a negative id (its padding, `csrc/causal_conv1d_fwd.cu`), ours takes any integers, so it gets ids
  relative to the row's smallest.
- The time step: the scan applies dt_bias, softplus and dt_limit in fp32 exactly as the twin's `ssd_dt` (which was
  written after it).
- Precision: both kernels accumulate in fp32 and return their input's dtype (y of the scan, the conv output); the
  final state is fp32. The scan's Triton matmuls would run fp32 inputs in TF32, so fp32 scans keep the exact PyTorch
  path; the conv kernel is exact fp32 arithmetic for fp32 inputs.

Each library is imported on the first CUDA call only; on CPU neither is ever imported.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch

_SCAN_DTYPES = (torch.bfloat16, torch.float16)
_CONV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def mamba_chunk_scan():
    """state-spaces/mamba's `mamba_chunk_scan_combined`, or None where mamba_ssm is not installed (or, with a
    warning, installed but broken)."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:
        return optional_library_missing("mamba_ssm", "the SSD scan", e)
    return mamba_chunk_scan_combined


@functools.cache
def causal_conv1d_cuda():
    """Dao-AILab's `causal_conv1d_fn`, or None where causal_conv1d is not installed (or, with a warning, installed
    but broken)."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception as e:
        return optional_library_missing("causal_conv1d", "the causal conv", e)
    return causal_conv1d_fn


def optional_library_missing(package: str, what: str, error: Exception) -> None:
    """None, after a warning where `package` is installed but failed to import (a build against another torch or
    CUDA, say): then `what` silently running its PyTorch path would hide a broken install."""
    if not isinstance(error, ImportError) or importlib.util.find_spec(package) is not None:
        warnings.warn(
            f"{package} is installed but does not import ({type(error).__name__}: {error}); {what} runs its PyTorch "
            f"path on CUDA. Reinstall it against this torch (pip install --no-build-isolation {package}).",
            stacklevel=3,
        )
    return None


def ssd_fits(x, B, C) -> bool:
    """Whether `ssd_chunked(x, ..., B, C)` runs on mamba_ssm's kernel: CUDA, half precision, one dtype for x, B, C,
    and the library installed. Checks no tensor value (no host synchronization)."""
    return x.is_cuda and x.dtype in _SCAN_DTYPES and B.dtype == C.dtype == x.dtype and mamba_chunk_scan() is not None


def ssd_scan_cuda(x, dt, A, B, C, D, chunk_size, initial_state, seq_idx, dt_bias, dt_softplus, dt_limit):
    """`ssd.ssd_chunked` (shapes already checked) on mamba_ssm's kernel. Returns y (b,t,h,p) in x's dtype and the
    final state (b,h,p,n) fp32."""
    if seq_idx is not None:
        seq_idx = (seq_idx - seq_idx[:, :1]).to(torch.int32).contiguous()
    if initial_state is not None:
        initial_state = initial_state.float()
    y, final_state = mamba_chunk_scan()(
        x, dt, A.float(), B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_state, seq_idx=seq_idx,
        dt_softplus=dt_softplus, dt_limit=(float(dt_limit[0]), float(dt_limit[1])), return_final_states=True,
    )  # fmt: skip
    return y, final_state.float()


def conv_fits(x, weight, bias, seq_idx, initial_state) -> bool:
    """Whether `causal_conv1d(x, weight, bias, seq_idx, initial_state)` runs on causal_conv1d's kernel: CUDA, 2 to 4
    taps, fp32/bf16/fp16, channels a multiple of 8 (its channels-last layout, needed for `seq_idx` and initial
    states), not both `seq_idx` and an initial state (the library takes one or the other), and the library
    installed."""
    b, t, d = x.shape
    k = weight.shape[1]
    return (
        x.is_cuda
        and 2 <= k <= 4
        and d % 8 == 0
        and t > 0
        and x.dtype in _CONV_DTYPES
        and weight.dtype in _CONV_DTYPES
        and (seq_idx is None or initial_state is None)
        and causal_conv1d_cuda() is not None
    )


def causal_conv1d_cuda_fn(x, weight, bias, seq_idx, initial_state, activation):
    """`ssd.causal_conv1d` on causal_conv1d's kernel. x (b,t,d), weight (d,k), initial_state (b,k-1,d). Returns
    (b,t,d) in x's dtype (fp32 accumulation inside)."""
    # channels-last: (b, d, t) views of (b, t, d) rows whose strides are multiples of 8
    if x.stride(2) != 1 or x.stride(1) % 8 or x.stride(0) % 8:
        x = x.contiguous()
    if bias is not None:
        bias = bias.to(weight.dtype)
    if seq_idx is not None:  # ids >= 0: the kernel zeroes the output of tokens with a negative id (its padding)
        seq_idx = (seq_idx - seq_idx.amin(dim=1, keepdim=True)).to(torch.int32).contiguous()
    if initial_state is not None:
        initial_state = initial_state.to(x.dtype).contiguous().transpose(1, 2)  # (b, d, k-1), channels-last
    out = causal_conv1d_cuda()(
        x.transpose(1, 2), weight.contiguous(), bias, seq_idx=seq_idx, initial_states=initial_state,
        activation=activation,
    )  # fmt: skip
    return out.transpose(1, 2)
