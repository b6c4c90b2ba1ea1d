"""The Nemotron 3 NVFP4 training recipe, emulated: each quantized linear runs its three GEMMs on quantized operands.

Faithful to TransformerEngine's `NVFP4BlockScaling` recipe (`transformer_engine/common/recipe/__init__.py`) and to
"Pretraining Large Language Models with NVFP4" (NVIDIA, 2025, arXiv 2509.25149, section 4). For y = x W^T:
    fprop  y  = x W^T   x 1x16 blocks along its reduction dim (in), round to nearest; W 16x16 blocks (2D), nearest
    dgrad  dx = g W     g 1x16 along out, STOCHASTIC rounding; W the same 16x16 quantization (W and W^T alike)
    wgrad  dW = g^T x   reduction over tokens: the column-wise copies g^T (out, T) and x^T (in, T), T zero-padded to
                        a multiple of 16, get the random Hadamard transform (RHT) along T, then 1x16 blocks along T
                        (g stochastic, x nearest)
Each GEMM multiplies `quantize_dequantize` values (an E2M1 value times its block's E4M3 scale: exact in bf16) in the
matmul dtype of the activations (`kernels.linear.matmul_dtype`: bf16, or bf16 widened to fp32 on CPUs without
native bf16 GEMMs) and scales the output by the two operands' global (per-tensor fp32) decode scales, as the GPU
GEMM applies them to its fp32 accumulator. Biases and everything outside the GEMMs stay in high precision.

Ablation switches (`NVFP4Recipe`): `rht` (off: wgrad operands quantized as they are), `stochastic_rounding` (off:
gradients rounded to nearest), `weight_2d` (off: W quantized 1x16 along each GEMM's reduction dim: along `in` for
fprop, along `out` for dgrad, so W and W^T differ).

MXFP8 (`MXFP8Recipe`, the recipe's format for Mamba's out_proj): E4M3 elements with an E8M0 scale per 32 elements
along each GEMM's reduction dim, round to nearest, no RHT, no global scale.

`apply_precision(model, policy)` assigns a format to every linear of a `HybridMoEForCausalLM` by the reference's
precision policy: NVFP4 for Mamba in_proj, dense MLPs, shared and routed experts; the last `bf16_tail_fraction` of
the layers, attention q/k/v/o, the latent projections, MTP layers, embeddings and lm_head at the base precision
("BF16" in the reference: train.precision bf16 or autocast-bf16); the router in fp32 as always; Mamba out_proj in
`mamba_out_proj` (MXFP8 by default). A module's `quant` attribute (None: its plain GEMM) holds its format.

Reference twins: `reference_linear` (plain float64 matmuls on the same quantize_dequantize calls) and, with quantization
replaced by the identity, `torch.nn.functional.linear`. The emulation runs on GPUs too (tests/quant/
test_nvfp4_device.py checks its bits there against the CPU's). Real NVFP4 GEMMs (TransformerEngine's
`NVFP4BlockScaling`, with its fused kernels) need a Blackwell GPU (compute capability 10.0); not wired in here.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.linear import matmul_dtype

log = logging.getLogger(__name__)

RECIPES = ("none", "nvfp4")
MAMBA_OUT_PROJ_FORMATS = ("mxfp8", "nvfp4", "bf16")
NVFP4_BLOCK = 16

# (x, block, rounding) -> (values fp32, global decode scale fp32 0-dim): `hybridmoe.quant.nvfp4.quantize_dequantize`
QDQ = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class NVFP4Recipe:
    """The NVFP4 GEMM recipe with its ablation switches; calling it computes a linear: recipe(x, weight, bias)."""

    rht: bool = True  # random Hadamard transform on the wgrad operands
    stochastic_rounding: bool = True  # gradients (dgrad and wgrad operands) rounded stochastically
    weight_2d: bool = True  # weights in 16x16 blocks (W and W^T quantize identically); off: 1x16 per GEMM

    name = "nvfp4"  # (a class attribute, not a field)

    def __call__(self, x, weight, bias=None):
        return nvfp4_linear(x, weight, bias, self)

    def segments(self, x, weight, bias, counts):
        """The routed experts' GEMM in one call (`segment_quantized_linear`): the rows of x in segments of `counts`,
        segment e times weight[e]^T (+ bias[e]), each segment and weight quantized as a tensor of its own."""
        return segment_quantized_linear(x, weight, bias, _NVFP4SegmentOperands(self, counts))


@dataclass(frozen=True)
class MXFP8Recipe:
    """MXFP8 GEMMs (E4M3, an E8M0 scale per 32 along each GEMM's reduction dim, nearest); recipe(x, weight, bias)."""

    name = "mxfp8"

    def __call__(self, x, weight, bias=None):
        return mxfp8_linear(x, weight, bias)


# ---------------------------------------------------------------------------------------------- the GEMM operands


class _NVFP4Operands:
    """The quantized operands of the three GEMMs of y = x W^T, as pairs (a, b) with the product a @ b^T (values
    exact in bf16) times `scale` (fp32 0-dim). x2 (T, in), w (out, in), g2 (T, out)."""

    def __init__(self, recipe: NVFP4Recipe, qdq: QDQ | None = None, hadamard: Callable | None = None):
        if qdq is None or hadamard is None:
            from . import nvfp4

            qdq, hadamard = qdq or nvfp4.fast_quantize_dequantize, hadamard or nvfp4.hadamard16
        self.recipe, self.qdq, self.hadamard = recipe, qdq, hadamard
        self.grad_rounding = "stochastic" if recipe.stochastic_rounding else "nearest"

    def weight(self, w):  # fprop's W (out, in)
        return self.qdq(w, block="16x16" if self.recipe.weight_2d else "1x16", rounding="nearest")

    def fprop(self, x2, w):
        xv, xs = self.qdq(x2, block="1x16", rounding="nearest")
        wv, ws = self.weight(w)
        return xv, wv, xs * ws, (wv, ws)

    def dgrad(self, g2, w, saved):
        """dx = g W = g (W^T)^T: b is W^T (in, out), quantized along out."""
        gv, gs = self.qdq(g2, block="1x16", rounding=self.grad_rounding)
        if self.recipe.weight_2d:  # the forward's 16x16 quantization serves W^T too
            wv, ws = saved
            return gv, wv.T, gs * ws
        wtv, ws = self.qdq(w.T, block="1x16", rounding="nearest")
        return gv, wtv, gs * ws

    def wgrad(self, g2, x2):
        """dW = g^T x: a = g^T (out, T), b = x^T (in, T), zero-padded along T to a multiple of 16."""
        pad = -g2.shape[0] % NVFP4_BLOCK
        gt, xt = F.pad(g2.T, (0, pad)), F.pad(x2.T, (0, pad))
        if self.recipe.rht:
            gt, xt = self.hadamard(gt.float()), self.hadamard(xt.float())
        gv, gs = self.qdq(gt, block="1x16", rounding=self.grad_rounding)
        xv, xs = self.qdq(xt, block="1x16", rounding="nearest")
        return gv, xv, gs * xs


class _NVFP4SegmentOperands:
    """As `_NVFP4Operands` for a bank of experts: x2 (M, in) holds the rows of every expert, sorted, in segments of
    `counts` rows; w (E, out, in); g2 (M, out). Each segment and each expert's weight is quantized as a tensor of its
    own (its own amax and global scale), exactly as one `_NVFP4Operands` call per segment quantizes it, but in one
    call per operand (`nvfp4.quantize_dequantize_segments` and friends) rather than one per segment. The scales are
    (E,), one per segment; wgrad's operands hold the segments side by side along the tokens, each zero-padded to a
    multiple of 16 as a segment of its own would be (so no 1x16 block or RHT group straddles two segments)."""

    def __init__(self, recipe: NVFP4Recipe, counts: list[int]):
        from . import nvfp4

        self.recipe, self.nvfp4, self.counts = recipe, nvfp4, list(counts)
        self.grad_rounding = "stochastic" if recipe.stochastic_rounding else "nearest"
        self.padded = [n + (-n % NVFP4_BLOCK) for n in self.counts]
        starts = [0, *torch.tensor(self.counts).cumsum(0).tolist()]
        pstarts = [0, *torch.tensor(self.padded).cumsum(0).tolist()]
        # (expert, its rows in x2, its columns in wgrad's operands) for every expert with rows
        self.live = [(e, slice(starts[e], starts[e + 1]), slice(pstarts[e], pstarts[e + 1]))
                     for e, n in enumerate(self.counts) if n]  # fmt: skip
        self.dest = torch.cat([torch.arange(pstarts[e], pstarts[e] + n) for e, n in enumerate(self.counts)])

    def weight(self, w):  # fprop's W (E, out, in)
        return self.nvfp4.quantize_dequantize_batched(w, "16x16" if self.recipe.weight_2d else "1x16")

    def fprop(self, x2, w):
        xv, xs = self.nvfp4.quantize_dequantize_segments(x2, self.counts)
        wv, ws = self.weight(w)
        return xv, wv, xs * ws, (wv, ws)

    def dgrad(self, g2, w, saved):
        """dx = g W per segment: b is W^T (E, in, out), quantized along out."""
        gv, gs = self.nvfp4.quantize_dequantize_segments(g2, self.counts, self.grad_rounding)
        if self.recipe.weight_2d:
            wv, ws = saved
            return gv, wv.transpose(1, 2), gs * ws
        wtv, ws = self.nvfp4.quantize_dequantize_batched(w.transpose(1, 2), "1x16")
        return gv, wtv, gs * ws

    def wgrad(self, g2, x2):
        """dW[e] = g_e^T x_e: a = g^T (out, P), b = x^T (in, P), P the padded segments side by side."""
        width, dest = sum(self.padded), self.dest.to(g2.device)
        gt = g2.new_zeros((g2.shape[1], width)).index_copy_(1, dest, g2.T)
        xt = x2.new_zeros((x2.shape[1], width)).index_copy_(1, dest, x2.T)
        if self.recipe.rht:
            gt, xt = self.nvfp4.hadamard16(gt.float()), self.nvfp4.hadamard16(xt.float())
        gv, gs = self.nvfp4.quantize_dequantize_column_segments(gt, self.padded, self.grad_rounding)
        xv, xs = self.nvfp4.quantize_dequantize_column_segments(xt, self.padded)
        return gv, xv, gs * xs


class _MXFP8Operands:
    """As `_NVFP4Operands` for MXFP8: every operand quantized along its GEMM's reduction dim, nearest, no RHT."""

    def __init__(self, qdq: Callable | None = None):
        if qdq is None:
            from . import mxfp8

            qdq = mxfp8.fast_quantize_dequantize
        self.qdq = qdq
        self.one = torch.ones((), dtype=torch.float32)

    def fprop(self, x2, w):
        return self.qdq(x2), self.qdq(w), self.one, None

    def dgrad(self, g2, w, saved):
        return self.qdq(g2), self.qdq(w.T), self.one

    def wgrad(self, g2, x2):
        return self.qdq(g2.T), self.qdq(x2.T), self.one


# ---------------------------------------------------------------------------------------------- the linear


class _QuantizedLinear(torch.autograd.Function):
    """y = x W^T + b with each of the three GEMMs on the operands `ops` gives (see the module docstring). Saves x, the
    weight and the forward's quantized weight (reused by dgrad with 2D blocks); gradients in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, x, weight, bias, ops):
        cdt = matmul_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])
        xv, wv, scale, saved = ops.fprop(x2, weight)
        if saved is not None:
            saved = (saved[0].to(cdt), saved[1])
        y = (xv.to(cdt) @ wv.to(cdt).T).mul_(scale)
        if bias is not None:
            y += bias
        ctx.ops, ctx.saved, ctx.bias_dtype = ops, saved, None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight)
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        ops, cdt = ctx.ops, matmul_dtype(x)
        g2 = g.reshape(-1, g.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            a, b, scale = ops.dgrad(g2, weight, ctx.saved)
            gx = (a.to(cdt) @ b.to(cdt).T).mul_(scale).to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[1]:
            a, b, scale = ops.wgrad(g2, x.reshape(-1, x.shape[-1]))
            gw = (a.to(cdt) @ b.to(cdt).T).mul_(scale).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            gb = g2.float().sum(0).to(ctx.bias_dtype)
        ctx.saved = None
        return gx, gw, gb, None


class _SegmentQuantizedLinear(torch.autograd.Function):
    """`_QuantizedLinear` for a bank of experts (`_NVFP4SegmentOperands`): y[rows of e] = x[rows of e] W[e]^T + b[e],
    every operand quantized in one call, then one GEMM per expert with rows, each the very GEMM `_QuantizedLinear`
    runs on that segment (same operands, shapes and layouts), so the results are bitwise those of one call per
    segment. An expert without rows gets zero gradients, as it gets from the per-segment path."""

    @staticmethod
    def forward(ctx, x, weight, bias, ops):
        cdt = matmul_dtype(x)
        xv, wv, scale, saved = ops.fprop(x, weight)
        xv, wv = xv.to(cdt), wv.to(cdt)
        y = x.new_empty((x.shape[0], weight.shape[1]))
        for e, rows, _ in ops.live:
            y_e = (xv[rows] @ wv[e].T).mul_(scale[e])
            if bias is not None:
                y_e += bias[e]
            y[rows] = y_e
        ctx.ops, ctx.saved, ctx.bias_dtype = ops, (wv, saved[1]), None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        ops, cdt = ctx.ops, matmul_dtype(x)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            a, b, scale = ops.dgrad(g, weight, ctx.saved)
            a = a.to(cdt)
            gx = x.new_zeros(x.shape)
            for e, rows, _ in ops.live:
                gx[rows] = (a[rows] @ b[e].to(cdt).T).mul_(scale[e])
        if ctx.needs_input_grad[1]:
            a, b, scale = ops.wgrad(g, x)
            gw = weight.new_zeros(weight.shape)
            for e, _, cols in ops.live:
                a_e = a[:, cols].to(cdt, memory_format=torch.contiguous_format)
                b_e = b[:, cols].to(cdt, memory_format=torch.contiguous_format)
                gw[e] = (a_e @ b_e.T).mul_(scale[e])
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            gb = torch.zeros((weight.shape[0], g.shape[1]), dtype=ctx.bias_dtype, device=g.device)
            for e, rows, _ in ops.live:
                gb[e] = g[rows].float().sum(0)
        ctx.saved = None
        return gx, gw, gb, None


def quantized_linear(x, weight, bias, ops, function=_QuantizedLinear) -> torch.Tensor:
    """`_QuantizedLinear` (or `function`) under autocast as a GEMM runs there: x in the autocast dtype (the weight is
    quantized from its own, e.g. fp32 master, values), the output in x's dtype."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        x = x.to(torch.get_autocast_dtype(device))
        with torch.autocast(device, enabled=False):
            return function.apply(x, weight, bias, ops)
    return function.apply(x, weight, bias, ops)


def segment_quantized_linear(x, weight, bias, ops: _NVFP4SegmentOperands) -> torch.Tensor:
    """The routed experts' GEMM, x (M, in) sorted by expert in segments, weight (E, out, in), bias (E, out) or None,
    through `_SegmentQuantizedLinear`: the bits of one `nvfp4_linear` call per segment (the per-segment path in
    `hybridmoe.kernels.moe._quantized_experts`, its twin), with a handful of quantization calls instead of ~10 per
    expert."""
    return quantized_linear(x, weight, bias, ops, _SegmentQuantizedLinear)


def nvfp4_linear(x, weight, bias=None, recipe: NVFP4Recipe = NVFP4Recipe(), qdq: QDQ | None = None,
                 hadamard: Callable | None = None) -> torch.Tensor:  # fmt: skip
    """x W^T + b with NVFP4 GEMMs (fprop, dgrad, wgrad) per `recipe`. `qdq` / `hadamard` replace
    `nvfp4.quantize_dequantize` / `nvfp4.hadamard16` (tests: the identity)."""
    return quantized_linear(x, weight, bias, _NVFP4Operands(recipe, qdq, hadamard))


def mxfp8_linear(x, weight, bias=None, qdq: Callable | None = None) -> torch.Tensor:
    """x W^T + b with MXFP8 GEMMs; `qdq` replaces `mxfp8.quantize_dequantize` (tests: the identity)."""
    return quantized_linear(x, weight, bias, _MXFP8Operands(qdq))


def reference_linear(x, weight, bias=None, recipe: NVFP4Recipe = NVFP4Recipe(), qdq: QDQ | None = None,
                     hadamard: Callable | None = None):  # fmt: skip
    """The twin of `nvfp4_linear`, the definition in plain float64 matmuls: returns (y, grad_fn) where grad_fn(g)
    gives (dx, dW) from the same quantize_dequantize calls in the same order (so the same random draws under the same
    seed). Tests compare the Function against it."""
    ops = _NVFP4Operands(recipe, qdq, hadamard)
    x2 = x.reshape(-1, x.shape[-1])
    xv, wv, scale, saved = ops.fprop(x2, weight)
    y = F.linear(xv.double() * scale.double(), wv.double(), None if bias is None else bias.double())

    def grad_fn(g):
        g2 = g.reshape(-1, g.shape[-1])
        a, b, s = ops.dgrad(g2, weight, saved)
        dx = (a.double() * s.double()) @ b.double().T
        a, b, s = ops.wgrad(g2, x2)
        return dx.view(x.shape), (a.double() * s.double()) @ b.double().T

    return y.view(*x.shape[:-1], -1), grad_fn


# ---------------------------------------------------------------------------------------------- the policy


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which format each GEMM of a model trains in (the `precision` section of a training recipe)."""

    recipe: str = "none"  # none: every GEMM at the base precision (train.precision) | nvfp4: the NVFP4 recipe
    rht: bool = True
    stochastic_rounding: bool = True
    weight_2d: bool = True
    bf16_tail_fraction: float = 0.15  # the last round(fraction * num_hidden_layers) layers stay high precision
    mamba_out_proj: str = "mxfp8"  # mxfp8 | nvfp4 | bf16

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"precision.recipe={self.recipe!r}: use none or nvfp4")
        for key in ("rht", "stochastic_rounding", "weight_2d"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"precision.{key}={getattr(self, key)!r}: use true or false")
        tail = self.bf16_tail_fraction
        if isinstance(tail, bool) or not isinstance(tail, (int, float)) or not 0 <= tail <= 1:
            raise ValueError(f"precision.bf16_tail_fraction={tail!r}: give a fraction of the layers in [0, 1]")
        if self.mamba_out_proj not in MAMBA_OUT_PROJ_FORMATS:
            raise ValueError(f"precision.mamba_out_proj={self.mamba_out_proj!r}: use mxfp8, nvfp4 or bf16")

    @property
    def nvfp4(self) -> NVFP4Recipe:
        return NVFP4Recipe(self.rht, self.stochastic_rounding, self.weight_2d)

    def tail_layers(self, num_hidden_layers: int) -> int:
        return round(self.bf16_tail_fraction * num_hidden_layers)


def apply_precision(model, policy: PrecisionPolicy) -> str:
    """Set the `quant` of every linear and routed-expert bank of a `HybridMoEForCausalLM` by `policy` (recipe none
    clears them all). Returns (and logs) a one-line summary: weight matrices per format."""
    from ..kernels.linear import Linear
    from ..modeling import Experts

    formats = precision_plan(model, policy)
    counts: Counter = Counter()
    for name, module in model.named_modules():
        if isinstance(module, (Linear, Experts)):
            fmt = formats.get(name, "bf16")
            module.quant = {"nvfp4": policy.nvfp4, "mxfp8": MXFP8Recipe(), "bf16": None}[fmt]
            counts[fmt] += module.up_proj.shape[0] * 2 if isinstance(module, Experts) else 1
    routers = sum(1 for name, _ in model.named_modules() if name.endswith(".gate"))
    tail = policy.tail_layers(model.config.num_hidden_layers) if policy.recipe != "none" else 0
    summary = (
        f"precision.recipe={policy.recipe}: weight matrices NVFP4 {counts['nvfp4']}, MXFP8 {counts['mxfp8']}, "
        f"base precision {counts['bf16']} (last {tail} of {model.config.num_hidden_layers} layers, attention, "
        f"latent projections, MTP, embeddings, lm_head), routers fp32 {routers}"
    )
    if policy.recipe == "nvfp4":
        r = policy.nvfp4
        summary += f"; rht={r.rht} stochastic_rounding={r.stochastic_rounding} weight_2d={r.weight_2d}"
    log.info(summary)
    return summary


def precision_plan(model, policy: PrecisionPolicy) -> dict[str, str]:
    """Module name -> format (nvfp4 | mxfp8) of the GEMMs the policy quantizes; every other linear (and the embedding,
    whose lookup is no GEMM) stays at the base precision, the routers in fp32."""
    if policy.recipe == "none":
        return {}
    layers = model.backbone.layers
    first_tail = len(layers) - policy.tail_layers(len(layers))
    plan = {}
    for i, block in enumerate(layers[:first_tail]):
        prefix = f"backbone.layers.{i}.mixer"
        if block.symbol == "M":
            plan[f"{prefix}.in_proj"] = "nvfp4"
            if policy.mamba_out_proj != "bf16":
                plan[f"{prefix}.out_proj"] = policy.mamba_out_proj
        elif block.symbol == "-":
            plan[f"{prefix}.up_proj"] = plan[f"{prefix}.down_proj"] = "nvfp4"
        elif block.symbol == "E":
            plan[f"{prefix}.experts"] = "nvfp4"
            plan[f"{prefix}.shared_experts.up_proj"] = plan[f"{prefix}.shared_experts.down_proj"] = "nvfp4"
        # "*": attention q/k/v/o stay high precision
    return plan


def module_formats(model) -> dict[str, str]:
    """Module name -> the format its GEMMs run in now: nvfp4 | mxfp8 | bf16 (the base precision) | fp32 (routers)."""
    from ..kernels.linear import Linear
    from ..modeling import Experts, TopkRouter

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, TopkRouter):
            out[name] = "fp32"
        elif isinstance(module, (Linear, Experts)):
            out[name] = "bf16" if module.quant is None else module.quant.name
    return out
