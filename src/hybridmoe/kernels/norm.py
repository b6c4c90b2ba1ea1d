"""Mamba-2's gated RMSNorm: RMSNorm(y * silu(z)) over groups of `group_size` channels, in fp32.

The gate comes before the norm (state-spaces/mamba, `mamba_ssm/ops/triton/layernorm_gated.py`, with
`norm_before_gate=False`; transformers' `MambaRMSNormGated`), and each of the `size / group_size` groups is normalized
on its own (the `group_size` argument there), so a tensor-parallel rank holding whole groups needs no reduction.

Twins: `gated_rms_norm_reference` (PyTorch, the definition and the CPU path) and the Triton kernel of
`norm_triton.py`, which `gated_rms_norm` runs on CUDA tensors when triton imports. Triton is imported only then:
on CPU, importing hybridmoe never imports it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def gated_rms_norm_reference(y, z, weight, group_size: int, eps: float):
    """y, z (..., size) in any float dtype, weight (size,). Returns weight * RMSNorm(y * silu(z)) per group, fp32."""
    h = y.float() * F.silu(z.float())
    g = h.view(*h.shape[:-1], -1, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return weight.float() * g.view(h.shape)


def gated_rms_norm(y, z, weight, group_size: int, eps: float, out_dtype: torch.dtype | None = None):
    """`gated_rms_norm_reference`, as one fused Triton kernel (forward and backward) on CUDA tensors when triton
    imports. The result is fp32, or `out_dtype` when given (the kernel then writes that dtype directly; the PyTorch
    path casts its fp32 result)."""
    if y.is_cuda and _triton_norm() is not None:
        return _triton_norm()(y, z, weight, group_size, eps, out_dtype=out_dtype or torch.float32)
    out = gated_rms_norm_reference(y, z, weight, group_size, eps)
    return out if out_dtype is None else out.to(out_dtype)


@functools.cache
def _triton_norm():
    """`norm_triton.gated_rms_norm_triton`, or None where triton is not installed (or, with a warning, broken)."""
    try:
        from .norm_triton import gated_rms_norm_triton
    except Exception as e:
        from .ssd_cuda import optional_library_missing

        return optional_library_missing("triton", "the gated RMSNorm", e)
    return gated_rms_norm_triton
