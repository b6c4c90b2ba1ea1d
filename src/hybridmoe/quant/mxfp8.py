"""MXFP8: E4M3 elements with one power-of-two (E8M0) scale per 32 consecutive elements along the last dimension.

The Open Compute Project's Microscaling (MX) format, as TransformerEngine's `MXFP8BlockScaling` recipe computes it:
the block scale is 2^e with e the smallest integer such that block_amax / 2^e <= 448 (TransformerEngine converts
`block_amax * (1/448)` to E8M0 rounding up, so no element saturates), stored as the biased exponent e + 127 in a
byte; elements are x / 2^e rounded to nearest-even E4M3. A block of zeros gets the smallest scale, 2^-127.
The Nemotron 3 NVFP4 recipe keeps the Mamba output projections in MXFP8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import compiled

BLOCK = 32
E4M3_MAX = 448.0
_RCP_E4M3_MAX = torch.tensor(1.0 / E4M3_MAX, dtype=torch.float32).item()  # 1/448 rounded to fp32


@dataclass
class MXFP8Tensor:
    """`data` E4M3 elements [..., n padded to a multiple of 32]; `scales` uint8 biased exponents [..., n/32]; `shape`
    the unpadded shape."""

    data: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


def _biased_exponents(block_amax: torch.Tensor) -> torch.Tensor:
    """E8M0 of block_amax / 448, rounded up: ceil(log2(v)) + 127, clamped to [0, 254]; exact via frexp."""
    v = block_amax * _RCP_E4M3_MAX
    mantissa, exponent = torch.frexp(v)  # v = mantissa * 2^exponent, mantissa in [0.5, 1)
    e = torch.where(mantissa == 0.5, exponent - 1, exponent)
    e = torch.where(v > 0, e, torch.full_like(e, -127))
    return (e + 127).clamp(0, 254).to(torch.uint8)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    pad = -x.shape[-1] % BLOCK
    x = torch.nn.functional.pad(x.float(), (0, pad)) if pad else x.float()
    return x.unflatten(-1, (-1, BLOCK))


def quantize(x: torch.Tensor) -> MXFP8Tensor:
    if not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"MXFP8 quantizes floating-point tensors of at least one dimension, got {x.dtype} {x.shape}")
    b = _blocks(x)
    scales = _biased_exponents(b.abs().amax(-1))
    scaled = torch.ldexp(b, 127 - scales.to(torch.int32)[..., None])
    data = scaled.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return MXFP8Tensor(data.flatten(-2), scales, x.shape)


def dequantize(t: MXFP8Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    v = torch.ldexp(t.data.float().unflatten(-1, (-1, BLOCK)), t.scales.to(torch.int32)[..., None] - 127)
    return v.flatten(-2)[..., : t.shape[-1]].to(dtype)


def quantize_dequantize(x: torch.Tensor) -> torch.Tensor:
    """x through MXFP8 and back, in fp32 (E4M3 times a power of two: exact in bf16 too)."""
    return dequantize(quantize(x))


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2^k in fp32 for int32 k in [-127, 127], exactly (2^-127 is subnormal), from its bits."""
    return torch.where(k > -127, (k + 127) << 23, 1 << 22).view(torch.float32)


def round_e4m3(y: torch.Tensor) -> torch.Tensor:
    """fp32 y with |y| <= 448 rounded to nearest-even E4M3, in fp32: what `y.to(torch.float8_e4m3fn).float()` gives,
    in arithmetic a compiler vectorizes (the float8 conversion is scalar code). E4M3 keeps 3 mantissa bits down to
    2^-6 and spacing 2^-9 below (subnormals), so the step at y is 2^(floor(log2 |y|) - 3), at least 2^-9: a power of
    two, and torch.round (half to even) at that step is exact."""
    binade = (y.view(torch.int32) & 0x7F800000).view(torch.float32)  # 2^floor(log2 |y|); 0 for 0 and fp32 subnormals
    step = binade.clamp(min=2.0**-6) * 0.125
    return torch.round(y / step) * step


def _qdq_blocks(b: torch.Tensor) -> torch.Tensor:
    """`quantize_dequantize` on `_blocks`: b * 2^(127 - s) is `ldexp` (one multiplication by an exact power of two),
    `round_e4m3` the float8 conversion, so the bits are those of `quantize` then `dequantize`."""
    b = b.float()
    scales = _biased_exponents(b.abs().amax(-1)).to(torch.int32)[..., None]
    data = (b * _pow2(127 - scales)).clamp(-E4M3_MAX, E4M3_MAX)
    return round_e4m3(data) * _pow2(scales - 127)


def fast_quantize_dequantize(x: torch.Tensor) -> torch.Tensor:
    """`quantize_dequantize` through `torch.compile` where it works (`hybridmoe.quant.kernels`), the same bits."""
    if x.numel() == 0:
        return quantize_dequantize(x)
    pad = -x.shape[-1] % BLOCK
    b = (torch.nn.functional.pad(x, (0, pad)) if pad else x).unflatten(-1, (-1, BLOCK))  # widened in the kernel
    return compiled(_qdq_blocks)(b).flatten(-2)[..., : x.shape[-1]]
