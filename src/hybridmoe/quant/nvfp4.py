"""NVFP4: 4-bit E2M1 elements, one E4M3 scale per block of 16, one FP32 scale per tensor.

The arithmetic follows NVIDIA TransformerEngine's `NVFP4BlockScaling` recipe (`transformer_engine/common/recipe/
__init__.py`; the scale chain of its `core_nvfp4.cuh`, transcribed in pytorch/ao's `nvfp4_reference.py`)
and the NVFP4 paper (NVIDIA, "Pretraining Large Language Models with NVFP4", arXiv 2509.25149):

    amax   = max |x| over the tensor
    S_enc  = min(448 * 6 / amax, FLT_MAX), 1 when amax is 0            (fp32: the global encode scale)
    S_dec  = e4m3(min(block_amax * (S_enc * (1/6)), 448))              (one per block, rounded once to E4M3)
    q      = e2m1(x * (1 / (float(S_dec) * (1 / S_enc))))              (round to nearest, ties to even; |q| <= 6)
    x     ~= q * float(S_dec) * global_scale,  global_scale = amax / 2688 (the decode scale a checkpoint stores)

E2M1 holds +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}. Rounding to nearest with ties to even gives 0.25 -> 0, 0.75 -> 1,
1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4; values beyond 6 saturate. With stochastic rounding, a value between
two neighbours lo < |v| < hi rounds up with probability (|v| - lo) / (hi - lo), so the rounding is unbiased.

Blocks are 1x16 (16 neighbours along the last dimension: activations and gradients) or 16x16 tiles of the last two
dimensions (weights: W and W^T then quantize identically). A block whose scale rounds to zero in E4M3 (its amax below
2^-10 of the tensor's amax / 448) keeps zero codes: TransformerEngine applies no lower clamp there, so that block
decodes to zero either way (torchao and ModelOpt clamp such scales instead; they differ only on these tiny blocks).

Checkpoints pack two codes per byte as TensorRT Model Optimizer and vLLM store them: element 2k in the low nibble,
element 2k+1 in the high nibble; bit 3 of a nibble is the sign, bits 0-2 index the magnitudes above.

The random Hadamard transform (`hadamard16`) multiplies each group of 16 along the last dimension by
diag(s) H16 / 4, with H16 the Sylvester Hadamard matrix and s TransformerEngine's fixed sign vector
(`transformer_engine/pytorch/tensor/nvfp4_tensor.py::get_wgrad_sign_vector`). The matrix is orthonormal, so applying
it to both operands of a GEMM along their shared reduction dimension leaves the product unchanged while spreading
outliers over 16 elements before they are quantized (the recipe does this for the weight-gradient GEMM only).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .kernels import compiled

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_MAX = 6.0
E4M3_MAX = 448.0
BLOCK = 16
BLOCKS = ("1x16", "16x16")
ROUNDINGS = ("nearest", "stochastic")
WGRAD_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
_FLT_MAX = torch.finfo(torch.float32).max


@dataclass
class NVFP4Tensor:
    """A quantized tensor. `codes` packs two 4-bit codes per byte along the last dimension (zero-padded to a multiple
    of 16 elements); `scales` holds one E4M3 decode scale per block ([..., n/16] for 1x16, [..., m/16, n/16] for
    16x16); `global_scale` is the fp32 decode scale amax / 2688; `shape` is the unpadded shape."""

    codes: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor
    shape: torch.Size
    block: str = "1x16"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


def _check(x: torch.Tensor, block: str, rounding: str) -> None:
    if block not in BLOCKS:
        raise ValueError(f"block={block!r}: use one of {BLOCKS}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}: use one of {ROUNDINGS}")
    if not x.is_floating_point():
        raise TypeError(f"NVFP4 quantizes floating-point tensors, got {x.dtype}")
    if x.dim() < (2 if block == "16x16" else 1):
        raise ValueError(f"block {block} needs a tensor of at least {2 if block == '16x16' else 1} dimensions")


def _pad_to_blocks(x: torch.Tensor, block: str) -> torch.Tensor:
    pad_cols = -x.shape[-1] % BLOCK
    pad_rows = -x.shape[-2] % BLOCK if block == "16x16" else 0
    if pad_cols or pad_rows:
        x = torch.nn.functional.pad(x, (0, pad_cols, 0, pad_rows))
    return x


def _blocks(x: torch.Tensor, block: str) -> torch.Tensor:
    """The padded tensor viewed as blocks: [..., n/16, 16] (1x16) or [..., m/16, 16, n/16, 16] (16x16), in its own
    dtype (the quantizers widen it to fp32 themselves, inside the compiled kernel: one pass over memory less)."""
    x = _pad_to_blocks(x, block).unflatten(-1, (-1, BLOCK))
    return x.unflatten(-3, (-1, BLOCK)) if block == "16x16" else x


def _per_block(s: torch.Tensor, block: str) -> torch.Tensor:
    """One value per block ([..., n/16] or [..., m/16, n/16]) broadcastable against `_blocks`."""
    return s[..., None] if block == "1x16" else s[..., :, None, :, None]


def _unblock(v: torch.Tensor, shape: torch.Size | None, block: str) -> torch.Tensor:
    """`_blocks`' inverse, cropped to `shape` (None: left padded)."""
    v = v.flatten(-2)
    if block == "16x16":
        v = v.flatten(-3, -2)
    if shape is None:
        return v
    return v[..., : shape[-2], : shape[-1]] if block == "16x16" else v[..., : shape[-1]]


def round_e2m1(a: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """Magnitudes a >= 0 (fp32) rounded to E2M1 {0, .5, 1, 1.5, 2, 3, 4, 6}, saturating at 6: to nearest with ties
    to even, or, given uniform draws `u` shaped like a, stochastically (up with probability (a - lo) / (hi - lo)).
    The E2M1 grid has spacing 0.5 below 2, 1 in [2, 4) and 2 in [4, 6], so nearest rounding is torch.round (half to
    even) at that spacing: exact, since every spacing is a power of two."""
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    if u is None:
        q = torch.round(a / step) * step
    else:
        lo = torch.floor(a / step) * step
        q = lo + step * (u < (a - lo) / step)
    return q.clamp(max=E2M1_MAX)


def _magnitude_codes(q: torch.Tensor) -> torch.Tensor:
    """E2M1 magnitude (fp32, on the grid) -> its 3-bit index 0..7."""
    return torch.where(q < 2, q * 2, torch.where(q < 4, q + 2, q / 2 + 4)).to(torch.uint8)


def _round_blocks(xb: torch.Tensor, block: str, u: torch.Tensor | None, group=None, groups=None):
    """Blocked x (`_blocks`) -> (E2M1 magnitudes, E4M3 block scales, fp32 global decode scale amax / 2688),
    with the module docstring's scale chain in fp32; `u` holds stochastic rounding's draws (`_draws`) or None. The amax
    is the whole tensor's, or with `group` (int64, each block's group index, broadcastable to the per-block amax) and
    `groups` (fp32 zeros, one per group) each group's: then the global decode scales are one per group, and every
    block goes through the same chain with its group's amax (the same arithmetic, so a group's bits are those of
    quantizing it as a tensor of its own)."""
    a = xb.float().abs()
    block_amax = a.amax(-1) if block == "1x16" else a.amax(dim=(-3, -1))
    if group is None:
        amax = block_amax.max() if block_amax.numel() else torch.zeros((), device=xb.device)
        amax_b = amax
    else:
        amax = groups.scatter_reduce(0, group.expand_as(block_amax).flatten(), block_amax.flatten(), "amax")
        amax_b = amax[group]
    s_enc = torch.where(amax_b > 0, (E4M3_MAX * E2M1_MAX) / amax_b, torch.ones_like(amax_b)).clamp(max=_FLT_MAX)
    s_dec = (block_amax * (s_enc * (1.0 / E2M1_MAX))).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    denom = s_dec.float() * (1.0 / s_enc)
    factor = torch.where(denom > 0, 1.0 / denom, torch.zeros_like(denom))
    return round_e2m1(a * _per_block(factor, block), u), s_dec, amax / (E4M3_MAX * E2M1_MAX)


def _qdq_blocks(xb: torch.Tensor, block: str, u: torch.Tensor | None, group=None, groups=None):
    q, s_dec, global_scale = _round_blocks(xb, block, u, group, groups)
    return torch.copysign(q * _per_block(s_dec.float(), block), xb), global_scale


def _draws(xb: torch.Tensor, rounding: str, generator: torch.Generator | None) -> torch.Tensor | None:
    """Stochastic rounding's uniform draws shaped like xb (None for nearest). torch.rand draws serially, so the draws
    of consecutive calls with one generator concatenate (the grouped quantizers below rely on it)."""
    return None if rounding == "nearest" else torch.rand(xb.shape, generator=generator, device=xb.device)


def quantize(
    x: torch.Tensor, block: str = "1x16", rounding: str = "nearest", generator: torch.Generator | None = None
) -> NVFP4Tensor:
    """Quantize `x` to NVFP4 (module docstring): 1x16 blocks along the last dimension or 16x16 tiles of the last
    two, rounding to nearest (ties to even) or stochastically (with `generator` for reproducible draws)."""
    _check(x, block, rounding)
    xb = _blocks(x, block)
    q, s_dec, global_scale = _round_blocks(xb, block, _draws(xb, rounding, generator))
    codes = _magnitude_codes(q) | (torch.signbit(xb).to(torch.uint8) << 3)
    return NVFP4Tensor(pack(_unblock(codes, None, block)), s_dec, global_scale, x.shape, block)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8 0..15) -> their E2M1 values in fp32 (code 8 is -0.0)."""
    mag = E2M1_VALUES.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) > 0, -mag, mag)


def dequantize(t: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e2m1(code) * float(block scale) * global_scale, cropped to the original shape."""
    values = _blocks(e2m1_decode(unpack(t.codes)), t.block)  # (the codes are already padded)
    v = values * _per_block(t.scales.float(), t.block) * t.global_scale.float()
    return _unblock(v, t.shape, t.block).to(dtype)


def quantize_dequantize(
    x: torch.Tensor, block: str = "1x16", rounding: str = "nearest", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, global_scale) with v = e2m1 value * its block's E4M3 scale in fp32, shaped like x; the fake-quantized x is
    v * global_scale. Each v has at most 6 significant bits, so v is exact in bf16 and a GEMM on v's in bf16 with
    fp32 accumulation, scaled afterwards by the operands' global scales, computes what an NVFP4 GEMM computes.
    Same codes and scales as `quantize`, without packing."""
    _check(x, block, rounding)
    xb = _blocks(x, block)
    v, global_scale = _qdq_blocks(xb, block, _draws(xb, rounding, generator))
    return _unblock(v, x.shape, block), global_scale


def _qdq_rows_nearest(xb):
    return _qdq_blocks(xb, "1x16", None)


def _qdq_rows_stochastic(xb, u):
    return _qdq_blocks(xb, "1x16", u)


def _qdq_tiles_nearest(xb):
    return _qdq_blocks(xb, "16x16", None)


def _qdq_tiles_stochastic(xb, u):
    return _qdq_blocks(xb, "16x16", u)


def _qdq_grouped_rows_nearest(xb, group, groups):
    return _qdq_blocks(xb, "1x16", None, group, groups)


def _qdq_grouped_rows_stochastic(xb, group, groups, u):
    return _qdq_blocks(xb, "1x16", u, group, groups)


def _qdq_grouped_tiles_nearest(xb, group, groups):
    return _qdq_blocks(xb, "16x16", None, group, groups)


def _qdq_grouped_tiles_stochastic(xb, group, groups, u):
    return _qdq_blocks(xb, "16x16", u, group, groups)


# One function per variant, so that each is compiled once with dynamic shapes (a single function taking the variant
# as an argument would be recompiled per variant and reach torch.compile's recompilation limit).
_VARIANTS = {
    ("1x16", "nearest"): _qdq_rows_nearest,
    ("1x16", "stochastic"): _qdq_rows_stochastic,
    ("16x16", "nearest"): _qdq_tiles_nearest,
    ("16x16", "stochastic"): _qdq_tiles_stochastic,
}
_GROUPED_VARIANTS = {
    ("1x16", "nearest"): _qdq_grouped_rows_nearest,
    ("1x16", "stochastic"): _qdq_grouped_rows_stochastic,
    ("16x16", "nearest"): _qdq_grouped_tiles_nearest,
    ("16x16", "stochastic"): _qdq_grouped_tiles_stochastic,
}


def fast_quantize_dequantize(
    x: torch.Tensor, block: str = "1x16", rounding: str = "nearest", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_dequantize` through `torch.compile` where it works (`hybridmoe.quant.kernels`), the same bits: the
    eager version makes a dozen passes over memory where the compiled one makes two (about 15x faster on a CPU)."""
    _check(x, block, rounding)
    if x.numel() == 0:
        return quantize_dequantize(x, block, rounding, generator)
    xb = _blocks(x, block)
    u = _draws(xb, rounding, generator)
    v, global_scale = compiled(_VARIANTS[block, rounding])(xb, *(() if u is None else (u,)))
    return _unblock(v, x.shape, block), global_scale


def _grouped_qdq(x, block, rounding, generator, group, num_groups):
    """quantize_dequantize with one amax per group of blocks: `group` (int64) gives each block's group index,
    broadcastable to the per-block shape of `_blocks(x)` without its last (element) dimension(s). Returns (v shaped
    like x, global decode scales (num_groups,))."""
    _check(x, block, rounding)
    xb = _blocks(x, block)
    u = _draws(xb, rounding, generator)
    groups = torch.zeros(num_groups, device=x.device)
    fn = _GROUPED_VARIANTS[block, rounding]
    run = compiled(fn) if xb.numel() else fn
    v, global_scales = run(xb, group, groups, *(() if u is None else (u,)))
    return _unblock(v, x.shape, block), global_scales


def quantize_dequantize_segments(
    x: torch.Tensor, counts: list[int], rounding: str = "nearest", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x [m, n] in contiguous segments of `counts` rows, each segment quantized 1x16 as a tensor of its own
    (its own amax), in one call: (v, global scales (len(counts),)), the same bits as one `quantize_dequantize` per
    segment (and, with stochastic rounding, the same draws as those calls made in order with one generator). An
    empty segment gets global scale 0."""
    if x.dim() != 2 or sum(counts) != x.shape[0]:
        raise ValueError(f"segments: x must be [rows, n] with rows = sum(counts) = {sum(counts)}, got {tuple(x.shape)}")
    seg = torch.repeat_interleave(torch.arange(len(counts), device=x.device), torch.tensor(counts, device=x.device))
    return _grouped_qdq(x, "1x16", rounding, generator, seg[:, None], len(counts))


def quantize_dequantize_column_segments(
    x: torch.Tensor, counts: list[int], rounding: str = "nearest", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of x [m, n] in contiguous segments of `counts` columns (each a multiple of 16), each segment [m, c]
    quantized 1x16 along its columns as a tensor of its own, in one call: (v, global scales (len(counts),)), the same
    bits as one `quantize_dequantize` per segment (rounding to nearest; stochastic draws come in another order)."""
    if x.dim() != 2 or sum(counts) != x.shape[1] or any(c % BLOCK for c in counts):
        raise ValueError(f"column segments: x must be [m, sum(counts)] with counts multiples of 16, got "
                         f"{tuple(x.shape)} and {counts}")  # fmt: skip
    blocks = torch.tensor([c // BLOCK for c in counts], device=x.device)
    seg = torch.repeat_interleave(torch.arange(len(counts), device=x.device), blocks)
    return _grouped_qdq(x, "1x16", rounding, generator, seg[None, :], len(counts))


def quantize_dequantize_batched(
    x: torch.Tensor, block: str = "1x16", rounding: str = "nearest", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each x[i] of a stack x [k, ..., n] (e.g. the experts' weights) quantized as a tensor of its own (its own
    amax), in one call: (v, global scales (k,)), the same bits as one `quantize_dequantize` per x[i] (with
    stochastic rounding, the same draws as those calls made in order with one generator)."""
    if x.dim() < (3 if block == "16x16" else 2):
        raise ValueError(f"batched: x must be a stack of tensors with block {block}, got shape {tuple(x.shape)}")
    group = torch.arange(x.shape[0], device=x.device).view(-1, *[1] * (x.dim() - 1))  # per-block amax: x.dim() dims
    return _grouped_qdq(x, block, rounding, generator, group, x.shape[0])


def pack(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [..., n] (n even) -> bytes [..., n/2], element 2k in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack needs an even number of codes along the last dimension, got {codes.shape[-1]}")
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] & 15) | ((codes[..., 1::2] & 15) << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [..., k] -> 4-bit codes [..., 2k] (uint8 0..15), the inverse of `pack`."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed NVFP4 codes are uint8, got {packed.dtype}")
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


@functools.cache
def _rht_matrix(device: torch.device) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < BLOCK:  # Sylvester's construction
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (torch.diag(torch.tensor(WGRAD_SIGNS, dtype=torch.float32)) @ h / 4).to(device)


def hadamard16(x: torch.Tensor) -> torch.Tensor:
    """Each group of 16 along the last dimension times diag(s) H16 / 4 (module docstring), computed in fp32."""
    if x.shape[-1] % BLOCK:
        raise ValueError(f"hadamard16 needs a last dimension divisible by 16, got {x.shape[-1]}: pad it with zeros")
    y = x.float().unflatten(-1, (-1, BLOCK)) @ _rht_matrix(x.device)
    return y.flatten(-2)
