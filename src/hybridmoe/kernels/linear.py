"""Linear layers for CPUs without native bf16 matmuls.

A bf16 GEMM multiplies bf16 operands and accumulates in fp32. On x86 CPUs without AVX512-BF16 or AMX, PyTorch's bf16
GEMM runs 7-100x slower than its fp32 GEMM (measured on this project's 2-core AVX2 machine: about 15 GFLOP/s
against 120). Widening bf16 to fp32 is exact, so multiplying the widened operands in fp32 and rounding the result
to bf16 gives the same kind of result as a bf16 GEMM at fp32 speed. `linear` does that in an autograd Function
that saves the bf16 tensors (not fp32 copies), so activation memory stays that of bf16. Products of a few rows
(decoding) stay native: they are bound by reading the weights, and bf16 weights are half the bytes.

The choice is made once per process and logged; HYBRIDMOE_BF16_MATMUL=native|fp32 overrides it.
Reference twin: `torch.nn.functional.linear`.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_WIDEN: bool | None = None


def _cpu_has_native_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def widen_bf16_on_cpu() -> bool:
    global _WIDEN
    if _WIDEN is None:
        choice = os.environ.get("HYBRIDMOE_BF16_MATMUL", "auto")
        if choice not in ("auto", "native", "fp32"):
            raise ValueError(f"HYBRIDMOE_BF16_MATMUL={choice!r}: use auto, native or fp32")
        _WIDEN = choice == "fp32" or (choice == "auto" and not _cpu_has_native_bf16())
        log.info("hybridmoe CPU bf16 matmuls: %s", "widened to fp32" if _WIDEN else "native")
    return _WIDEN


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x's dtype and device should run in."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and widen_bf16_on_cpu():
        return torch.float32
    return x.dtype


# Below this many rows a matmul is a matrix-vector product, bound by reading the weight: native bf16 reads half
# the bytes of a widened copy (decoding one token: 1.8 ms against 4.6 ms for a 16384 x 512 head, measured here).
WIDEN_MIN_ROWS = 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if matmul_dtype(x) == x.dtype or weight.dtype != x.dtype or x.numel() < WIDEN_MIN_ROWS * x.shape[-1]:
        return F.linear(x, weight, bias)
    return _WidenedLinear.apply(x, weight, bias)


class _WidenedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g32 = g.float()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g32 @ weight.float()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = (g32.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g32.reshape(-1, g.shape[-1]).sum(0).to(x.dtype)
        return gx, gw, gb


class Linear(torch.nn.Linear):
    """nn.Linear whose matmul goes through `linear` (same parameters, same state_dict). `quant`, when set (by
    `hybridmoe.quant.training.apply_precision`), computes the layer instead: quant(x, weight, bias), e.g. with
    emulated NVFP4 GEMMs."""

    quant = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return self.quant(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)
