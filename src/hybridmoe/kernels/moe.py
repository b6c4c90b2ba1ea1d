"""Routed experts: expert MLPs applied to the tokens a router chose, combined with the routing weights.

Faithful to transformers' `NemotronHExperts` (non-gated experts: `down(relu(up(x))**2)`, the routing weight applied
after `down`, an fp32 combine) and to the dispatch of torchtitan / NeMo AutoModel (stable sort of the token copies
by expert, counts by bincount, grouped matmuls over contiguous segments, weighted combine by scatter-add).

The expert activation is an argument (`activation`, default "relu2", the behaviour above):
  - "relu2": h = relu(u)^2 (nemotron_h; `kernels.activations`);
  - "silu_gated": u = [gate | up] (the fused `gate_up_proj` of transformers v5's Qwen3-MoE, Qwen2-MoE, Mixtral,
    OLMoE, DeepSeek-V3 experts, gate rows first), h = silu(gate) * up;
  - `clamped_swiglu(alpha, limit)`: GPT-OSS's `GptOssExperts._apply_gate`: gate and up interleaved (even / odd
    columns), gate clamped from above and up to [-limit, limit], h = (up + 1) * gate * sigmoid(alpha * gate);
and the up / down projections may carry per-expert biases (`b_up_EU`, `b_down_ED`, GPT-OSS's `*_proj_bias`) and
per-expert low-rank updates (`lora`, an `ExpertLoRA`: LoRA, Hu et al. 2021, eq. 3, on each expert's up / down weight,
W[e] + scaling * B[e] A[e], computed on the sorted token copies of each expert's segment as x A[e]^T B[e]^T, so the
full-size update is never formed).

Twins: `experts_reference` (a loop over experts with boolean masks, the definition) and `experts_grouped` (the fast
path). Backends of the grouped matmul, chosen once per process and logged:
  - `grouped_mm`: `torch._grouped_mm` (CUDA, compute capability >= 9.0, bf16);
  - `segments`: one matmul per contiguous expert segment, with a hand-written backward that saves only the sorted
    inputs and the pre-activations; on a CPU without native bf16 matmuls (no AVX512-BF16 / AMX) bf16 operands are
    multiplied in fp32, which is exact for the products and, like a bf16 GEMM, accumulates in fp32.
The `grouped_mm` path has no Python loop over experts or rows and never waits for the device (counts by scatter-add,
not bincount, whose CUDA kernel reads the largest id back; repeat_interleave with its output size): on a GPU every
host-side step is a kernel launch. The `segments` path keeps its per-expert loop and cache-sized row blocks in the
combine's backward, which is what runs fastest on a CPU. `experts_grouped(..., backend=...)` forces either path (on a
CPU, torch's own `_grouped_mm` runs the grouped path, which is how it is tested against `experts_reference`).

Legend: t tokens, k experts per token, d model width (the latent width for LatentMoE), i expert hidden width,
u the up projection's width (i, or 2i for gated activations), e experts, m = t*k token copies, r LoRA rank.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..utils import eager_under_compile
from .activations import relu_squared, relu_squared_backward, relu_squared_reference
from .linear import matmul_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertActivation:
    """h = forward(u) on the up projection's output u (m, up_factor * i) -> (m, i), and its hand-written gradient
    backward(u, dh) -> du (it may overwrite dh). `reference` is the plain differentiable twin (autograd)."""

    name: str
    up_factor: int
    forward: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    reference: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExpertLoRA:
    """Low-rank updates of the expert weights: the up projection of expert e becomes W_up[e] + scaling * B[e] A[e]
    with `up` = (A (e, r, d), B (e, u, r)), the down projection likewise with `down` = (A (e, r, i), B (e, d, r)),
    both in the kernel's (out, in) orientation; either may be None (that weight is not adapted). A and B may be in a
    wider dtype than x (fp32 adapters on bf16 weights); the products run in x's matmul dtype."""

    up: tuple[torch.Tensor, torch.Tensor] | None = None
    down: tuple[torch.Tensor, torch.Tensor] | None = None
    scaling: float = 1.0


def _silu_gated(u):
    gate, up = u.chunk(2, dim=-1)
    return F.silu(gate) * up


def _silu_gated_backward(u, dh):
    gate, up = u.chunk(2, dim=-1)
    return torch.cat([torch.ops.aten.silu_backward(dh * up, gate), dh * F.silu(gate)], dim=-1)


def clamped_swiglu(alpha: float, limit: float) -> ExpertActivation:
    """GPT-OSS's gated activation (transformers' `GptOssExperts._apply_gate`); gate/up interleaved in u."""

    def forward(u):
        gate = u[..., ::2].clamp(max=limit)
        up = u[..., 1::2].clamp(-limit, limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    def backward(u, dh):
        gate_raw, up_raw = u[..., ::2], u[..., 1::2]
        gate, up = gate_raw.clamp(max=limit), up_raw.clamp(-limit, limit)
        s = torch.sigmoid(gate * alpha)
        glu = gate * s
        dglu = s + alpha * gate * s * (1 - s)
        # clamp passes the gradient where the input lies inside [min, max], bounds included (as torch.clamp).
        d_gate = (dh * (up + 1) * dglu).mul_(gate_raw <= limit)
        d_up = (dh * glu).mul_((up_raw >= -limit) & (up_raw <= limit))
        return torch.stack([d_gate, d_up], dim=-1).view(u.shape)

    return ExpertActivation(f"clamped_swiglu(alpha={alpha}, limit={limit})", 2, forward, backward, forward)


ACTIVATIONS = {
    "relu2": ExpertActivation("relu2", 1, relu_squared, relu_squared_backward, relu_squared_reference),
    "silu_gated": ExpertActivation("silu_gated", 2, _silu_gated, _silu_gated_backward, _silu_gated),
}


def _activation(activation: str | ExpertActivation) -> ExpertActivation:
    if isinstance(activation, ExpertActivation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"experts: unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


def _check_experts(w_up_EUD, w_down_EDI, act, b_up_EU, b_down_ED):
    e, u, d = w_up_EUD.shape
    if w_down_EDI.shape[:2] != (e, d) or u != act.up_factor * w_down_EDI.shape[2]:
        raise ValueError(
            f"experts ({act.name}): w_up {tuple(w_up_EUD.shape)} (e, {act.up_factor}*i, d) does not fit "
            f"w_down {tuple(w_down_EDI.shape)} (e, d, i)"
        )
    if b_up_EU is not None and b_up_EU.shape != (e, u):
        raise ValueError(f"experts: b_up has shape {tuple(b_up_EU.shape)}, expected {(e, u)}")
    if b_down_ED is not None and b_down_ED.shape != (e, d):
        raise ValueError(f"experts: b_down has shape {tuple(b_down_ED.shape)}, expected {(e, d)}")


def _check_lora(lora: ExpertLoRA, w_up_EUD, w_down_EDI):
    for name, pair, w in (("up", lora.up, w_up_EUD), ("down", lora.down, w_down_EDI)):
        if pair is None:
            continue
        a_ERI, b_EOR = pair
        e, out, inp = w.shape
        r = a_ERI.shape[1] if a_ERI.dim() == 3 else -1
        if a_ERI.shape != (e, r, inp) or b_EOR.shape != (e, out, r):
            raise ValueError(
                f"experts LoRA ({name}): A {tuple(a_ERI.shape)} and B {tuple(b_EOR.shape)} do not fit the weight "
                f"{tuple(w.shape)} (e, out, in): expected A (e, r, in) and B (e, out, r)"
            )


def experts_reference(
    x_TD, w_up_EID, w_down_EDI, topk_idx_TK, topk_w_TK, activation="relu2", b_up_EU=None, b_down_ED=None, lora=None
):
    """Loop over experts; returns (t,d) in x's dtype, accumulated in fp32. w_up (e, u, d), w_down (e, d, i);
    `lora` an optional `ExpertLoRA`."""
    act = _activation(activation)
    _check_experts(w_up_EID, w_down_EDI, act, b_up_EU, b_down_ED)
    if lora is not None:
        _check_lora(lora, w_up_EID, w_down_EDI)

    def low_rank(v, pair, e):  # scaling * v A[e]^T B[e]^T
        return lora.scaling * ((v @ pair[0][e].to(v.dtype).T) @ pair[1][e].to(v.dtype).T)

    out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for e in range(w_up_EID.shape[0]):
        tok, slot = torch.where(topk_idx_TK == e)
        if tok.numel() == 0:
            continue
        u = x_TD[tok] @ w_up_EID[e].T
        if lora is not None and lora.up is not None:
            u = u + low_rank(x_TD[tok], lora.up, e)
        if b_up_EU is not None:
            u = u + b_up_EU[e]
        h = act.reference(u)
        y = h @ w_down_EDI[e].T
        if lora is not None and lora.down is not None:
            y = y + low_rank(h, lora.down, e)
        if b_down_ED is not None:
            y = y + b_down_ED[e]
        y = y.float() * topk_w_TK[tok, slot, None].float()
        out_TD.index_add_(0, tok, y)
    return out_TD.to(x_TD.dtype)


BACKENDS = ("grouped_mm", "segments")
_BACKEND: str | None = None


def experts_backend(x: torch.Tensor) -> str:
    """`grouped_mm` where torch._grouped_mm runs well, else `segments`; decided once and logged. Under torch.compile
    (where a logging call would break the graph) it is decided in the traced code and left to the first eager call
    to record and log."""
    global _BACKEND
    if _BACKEND is None:
        ok = (
            x.is_cuda
            and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_properties(x.device).major >= 9
            and x.dtype == torch.bfloat16
        )
        backend = "grouped_mm" if ok else "segments"
        if torch.compiler.is_compiling():
            return backend
        _BACKEND = backend
        log.info("hybridmoe MoE experts backend: %s", _BACKEND)
    return _BACKEND


def experts_grouped(
    x_TD,
    w_up_EID,
    w_down_EDI,
    topk_idx_TK,
    topk_w_TK,
    ep_group=None,
    activation="relu2",
    b_up_EU=None,
    b_down_ED=None,
    lora=None,
    quant=None,
    backend: str | None = None,
):
    """Sort token copies by expert, run the experts on contiguous segments, scatter-add the weighted results.
    w_up (e, u, d) and w_down (e, d, i) as (out, in) per expert (transposed views are fine); `activation`, the
    optional biases b_up (e, u), b_down (e, d) and the optional low-rank updates `lora` (an `ExpertLoRA`, A and B
    sliced like the weights under expert parallelism) as in the module docstring.

    With `ep_group` (expert parallelism), the weights are this rank's slice of the experts (rank r of the group
    holds experts [r*e_local, (r+1)*e_local)) while topk_idx_TK holds global expert ids: the sorted token copies
    travel to the ranks that own their experts and back with two all-to-alls (`expert_parallel_segments`).

    `quant` (e.g. a `hybridmoe.quant.training.NVFP4Recipe`): each expert's up and down GEMM is computed by
    quant(x, weight, bias) on its own segment (`_quantized_experts`), with or without expert parallelism.

    `backend`: "grouped_mm" or "segments" (module docstring); None chooses by device (`experts_backend`, and
    "segments" on a CPU)."""
    act = _activation(activation)
    _check_experts(w_up_EID, w_down_EDI, act, b_up_EU, b_down_ED)
    if lora is not None:
        _check_lora(lora, w_up_EID, w_down_EDI)
        if quant is not None:
            raise ValueError("experts: LoRA updates with emulated low-precision GEMMs (quant) are not supported")
    aligned = _grouped_mm_aligned(x_TD, w_up_EID, w_down_EDI)
    if backend is None:
        backend = experts_backend(x_TD) if x_TD.is_cuda and aligned else "segments"
    elif backend not in BACKENDS:
        raise ValueError(f"experts: unknown backend {backend!r}; use one of {BACKENDS}")
    elif backend == "grouped_mm" and not aligned:
        raise ValueError(
            f"experts: backend 'grouped_mm' needs widths whose rows are multiples of 16 bytes; x {tuple(x_TD.shape)}, "
            f"w_up {tuple(w_up_EID.shape)}, w_down {tuple(w_down_EDI.shape)} in {x_TD.dtype}: use backend='segments'"
        )
    loop_free = backend == "grouped_mm"
    t, k = topk_idx_TK.shape
    ep = 1 if ep_group is None else dist.get_world_size(ep_group)
    e = w_up_EID.shape[0] * ep
    flat_M = topk_idx_TK.reshape(-1)
    order_M = torch.argsort(flat_M, stable=True)
    counts_E = count_per_expert(flat_M, e, loop_free)
    token_M = order_M // k
    if ep_group is None:  # the experts gather their rows of x_TD themselves (`rows_of`)
        y_MD = _run_experts(
            x_TD, w_up_EID, w_down_EDI, counts_E, act, b_up_EU, b_down_ED, lora, rows_of=token_M, quant=quant,
            backend=backend,
        )  # fmt: skip
    else:
        y_MD = expert_parallel_segments(
            x_TD, token_M, w_up_EID, w_down_EDI, counts_E, ep_group, act, b_up_EU, b_down_ED, lora, quant=quant,
            backend=backend,
        )  # fmt: skip
    w_M = topk_w_TK.reshape(-1).index_select(0, order_M)
    block_rows = None if loop_free else COMBINE_BLOCK_ROWS
    return _WeightedCombine.apply(y_MD, w_M, token_M, t, block_rows).to(x_TD.dtype)


def _grouped_mm_aligned(x_TD, w_up_EUD, w_down_EDI) -> bool:
    """torch._grouped_mm wants every operand's rows 16-byte aligned: d, u and i multiples of 16 bytes."""
    return all(n * x_TD.element_size() % 16 == 0 for n in (x_TD.shape[1], w_up_EUD.shape[1], w_down_EDI.shape[2]))


def count_per_expert(idx: torch.Tensor, e: int, scatter: bool = False) -> torch.Tensor:
    """(e,) int64: how many entries of `idx` name each expert. torch.bincount's output length depends on the data, so
    torch.compile (Dynamo) breaks the graph there, and its CUDA kernel reads the largest id back to the host (a sync,
    which no CUDA graph can capture); under compilation, on CUDA, or when `scatter` asks, the same counts come from a
    scatter-add into e zeros, whose shape is known."""
    if scatter or idx.is_cuda or torch.compiler.is_compiling():
        return torch.zeros(e, dtype=torch.long, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))
    return torch.bincount(idx, minlength=e)


COMBINE_BLOCK_ROWS = 4096  # token copies per block in the combine's backward on the `segments` path


class _WeightedCombine(torch.autograd.Function):
    """out[t] = sum of w_M[m] * y_MD[m] over the copies m of token t, in fp32 (token_M[m] = t). The same arithmetic as
    `zeros(t).index_add_(0, token_M, y.float() * w.float()[:, None])` under autograd, but it saves y in its own dtype
    (bf16: half the bytes of the fp32 product autograd would keep) and widens it again in the backward.

    block_rows: token copies per block of the backward's fp32 temporaries (every row's gradients are its own, so the
    results are the same for any block size): a CPU walks cache-sized blocks (the whole [copies x hidden] at once was
    the largest transient of a training step); None, on a GPU, does all rows at once (one gather, two products)."""

    @staticmethod
    def forward(ctx, y_MD, w_M, token_M, t, block_rows=None):
        out_TD = torch.zeros((t, y_MD.shape[1]), dtype=torch.float32, device=y_MD.device)
        if torch.compiler.is_compiling():
            # Traced, out of place: torch 2.11's Dynamo lost the gradients of a forward that returns a tensor it
            # wrote in place (both came out zero; fixed by 2.13). Eager keeps the in-place sum (no second buffer).
            out_TD = out_TD.index_add(0, token_M, y_MD.float() * w_M.float()[:, None])
        else:
            out_TD.index_add_(0, token_M, y_MD.float() * w_M.float()[:, None])
        ctx.save_for_backward(y_MD, w_M, token_M)
        ctx.block_rows = block_rows
        return out_TD

    @staticmethod
    def backward(ctx, g_TD):
        y_MD, w_M, token_M = ctx.saved_tensors
        g_TD = g_TD.float()
        gy = torch.empty_like(y_MD) if ctx.needs_input_grad[0] else None
        gw = torch.empty_like(w_M) if ctx.needs_input_grad[1] else None
        m = y_MD.shape[0]
        block = ctx.block_rows or max(m, 1)
        for start in range(0, m, block):
            rows = slice(start, start + block)
            g_MD = g_TD.index_select(0, token_M[rows])
            if gy is not None:
                gy[rows] = g_MD * w_M[rows].float()[:, None]  # rounded to y's dtype on assignment
            if gw is not None:
                gw[rows] = g_MD.mul_(y_MD[rows]).sum(1)  # y widened inside the product: no fp32 copy of it
        return gy, gw, None, None, None


def _run_experts(
    x_MD, w_up_EID, w_down_EDI, counts_E, act=ACTIVATIONS["relu2"], b_up_EU=None, b_down_ED=None, lora=None,
    rows_of=None, quant=None, backend="segments",
):  # fmt: skip
    """The experts on rows sorted by expert (counts_E rows each): the rows of x_MD, or with `rows_of` (m,) the rows
    x_MD[rows_of] (on the `segments` backend gathered segment by segment, so that the sorted copy of the inputs is
    never saved)."""
    if quant is not None:
        return _quantized_experts(x_MD, w_up_EID, w_down_EDI, counts_E, act, b_up_EU, b_down_ED, rows_of, quant)
    if backend == "grouped_mm":
        if rows_of is not None:
            x_MD = x_MD.index_select(0, rows_of)
        m = x_MD.shape[0]
        offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
        u_MU = torch._grouped_mm(x_MD, w_up_EID.transpose(-2, -1), offs=offs)
        if lora is not None and lora.up is not None:
            u_MU = u_MU + _grouped_low_rank(x_MD, *lora.up, lora.scaling, offs)
        if b_up_EU is not None:
            u_MU = u_MU + b_up_EU.repeat_interleave(counts_E, dim=0, output_size=m)  # output_size: no sync
        h_MI = act.reference(u_MU)
        y_MD = torch._grouped_mm(h_MI, w_down_EDI.transpose(-2, -1), offs=offs)
        if lora is not None and lora.down is not None:
            y_MD = y_MD + _grouped_low_rank(h_MI, *lora.down, lora.scaling, offs)
        if b_down_ED is not None:
            y_MD = y_MD + b_down_ED.repeat_interleave(counts_E, dim=0, output_size=m)
        return y_MD
    return _segment_experts(x_MD, w_up_EID, w_down_EDI, counts_E, act, b_up_EU, b_down_ED, lora, rows_of)


@eager_under_compile
def _segment_experts(x_MD, w_up_EID, w_down_EDI, counts_E, act, b_up_EU, b_down_ED, lora, rows_of):
    """`_SegmentExperts` on the segments of counts_E. Its loop needs the counts on the host, so under torch.compile it
    runs eagerly between two compiled graphs (one graph break), rather than being traced for the counts of one step
    and recompiled for the next."""
    up, down = (lora.up or (None, None), lora.down or (None, None)) if lora is not None else ((None, None),) * 2
    scaling = lora.scaling if lora is not None else 1.0
    return _SegmentExperts.apply(
        x_MD, w_up_EID, w_down_EDI, b_up_EU, b_down_ED, counts_E.tolist(), act, *up, *down, scaling, rows_of
    )


@eager_under_compile  # per-segment host loop: eager under torch.compile, as `_segment_experts`
def _quantized_experts(x_MD, w_up_EUD, w_down_EDI, counts_E, act, b_up_EU, b_down_ED, rows_of, quant):
    """Each expert's segment through quant(x, weight, bias): up GEMM, activation, down GEMM, with plain autograd
    around them. Every segment is its own tensor with its own per-tensor scale, as TransformerEngine's grouped
    GEMMs quantize each group (`transformer_engine/pytorch/module/grouped_linear.py`). A `quant` with a
    `segments(x, weight, bias, counts)` method (`NVFP4Recipe`) runs all the segments of a GEMM in one call, with the
    same bits as this loop (its twin) and a few quantization calls per GEMM instead of a few per expert."""
    if rows_of is not None:
        x_MD = x_MD.index_select(0, rows_of)
    segments = getattr(quant, "segments", None)
    if segments is not None:
        counts = counts_E.tolist()
        return segments(act.reference(segments(x_MD, w_up_EUD, b_up_EU, counts)), w_down_EDI, b_down_ED, counts)
    ups, downs = w_up_EUD.unbind(0), w_down_EDI.unbind(0)  # unbind's backward stacks the per-expert gradients
    out = []
    for e, x in enumerate(x_MD.split(counts_E.tolist())):
        if x.shape[0]:
            u = quant(x, ups[e], None if b_up_EU is None else b_up_EU[e])
            out.append(quant(act.reference(u), downs[e], None if b_down_ED is None else b_down_ED[e]))
    if not out:
        return x_MD.new_zeros((0, w_down_EDI.shape[1]))
    return torch.cat(out)


def _grouped_low_rank(v_MI, a_ERI, b_EOR, scaling, offs):
    """scaling * v A[e]^T B[e]^T per expert segment with torch._grouped_mm (autograd); the rank is zero-padded to a
    multiple of 8 so that the rows of the (m, r) intermediate are 16-byte aligned, as _grouped_mm requires."""
    pad = -a_ERI.shape[1] % 8
    a_ERI = F.pad(a_ERI.to(v_MI.dtype), (0, 0, 0, pad))
    b_EOR = F.pad(b_EOR.to(v_MI.dtype), (0, pad))
    va_MR = torch._grouped_mm(v_MI, a_ERI.transpose(-2, -1), offs=offs)
    return torch._grouped_mm(va_MR, b_EOR.transpose(-2, -1), offs=offs) * scaling


@eager_under_compile  # all-to-alls with host-side splits: eager under torch.compile, as `_segment_experts`
def expert_parallel_segments(
    x_TD, rows_M, w_up_LID, w_down_LDI, counts_E, ep_group, act=ACTIVATIONS["relu2"], b_up_LU=None, b_down_LD=None,
    lora=None, quant=None, backend="segments",
):  # fmt: skip
    """Expert-parallel dispatch and combine (torchtitan's all-to-all token dispatcher, written out), overlapped.

    x_TD[rows_M] are this rank's token copies sorted by global expert, counts_E (e,) of them per expert. Since experts
    are owned in contiguous blocks, the sorted copies are already grouped by destination rank. Steps: exchange the
    per-expert counts; send the copies for other ranks' experts to their owners (all-to-all, started asynchronously);
    meanwhile run the local experts on this rank's own copies, which never travel (on the grouped_mm backend without
    `quant`; otherwise they travel with the others and the all-to-all is waited for at once); then regroup the
    received copies (source-major) by local expert, run the local experts on them, undo the regrouping
    and send the results back (all-to-all). Gradients take the same way back: the all-to-all's backward is the
    reverse all-to-all, and the gradients of the received copies travel back (asynchronously) while the own copies'
    backward runs: autograd runs the nodes made later in the forward first, so the own copies' nodes (made between
    the start and the wait of the dispatch) run between the backward's start and wait (`_AllToAllStart`,
    `_AllToAllWait`)."""
    ep, rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    e_local = w_up_LID.shape[0]
    send_counts = counts_E.view(ep, e_local)  # [destination rank, its local expert]
    recv_counts = torch.empty_like(send_counts)  # [source rank, my local expert]
    dist.all_to_all_single(recv_counts, send_counts, group=ep_group)
    send_splits = send_counts.sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    # The own copies stay on the grouped_mm path only: on the segments path (a CPU's, where the all-to-all and the
    # experts share the cores) the experts run best on all copies at once, and with `quant` all of an expert's copies
    # form one segment with one scale, as without expert parallelism.
    overlap = backend == "grouped_mm" and quant is None
    own = slice(0, 0)
    if overlap:  # the copies for this rank's own experts stay
        own = slice(sum(send_splits[:rank]), sum(send_splits[: rank + 1]))
        send_splits[rank] = recv_splits[rank] = 0
        recv_counts[rank] = 0
    kw = dict(act=act, b_up_EU=b_up_LU, b_down_ED=b_down_LD, lora=lora, quant=quant, backend=backend)
    pending = _Pending()
    remote_M = torch.cat([rows_M[: own.start], rows_M[own.stop :]])
    x_RD = _AllToAllStart.apply(x_TD.index_select(0, remote_M), recv_splits, send_splits, ep_group, pending)
    y_own = None
    if overlap:  # while the all-to-all runs
        y_own = _run_experts(x_TD, w_up_LID, w_down_LDI, send_counts[rank], rows_of=rows_M[own], **kw)
    x_RD = _AllToAllWait.apply(x_RD, pending, recv_splits, send_splits, ep_group)
    # received copies: source-major, then local-expert-major within each source -> local-expert-major
    local_expert_R = torch.repeat_interleave(
        torch.arange(e_local, device=x_TD.device).repeat(ep), recv_counts.flatten(), output_size=x_RD.shape[0]
    )
    order_R = torch.argsort(local_expert_R, stable=True)
    y_sorted = _run_experts(x_RD, w_up_LID, w_down_LDI, recv_counts.sum(0), rows_of=order_R, **kw)
    y_back = _AllToAll.apply(_unpermute(y_sorted, order_R), send_splits, recv_splits, ep_group)
    return y_back if y_own is None else torch.cat([y_back[: own.start], y_own, y_back[own.start :]])


def _unpermute(y_sorted, order):
    """Inverse of index_select(0, order), differentiable."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return y_sorted.index_select(0, inverse)


class _AllToAll(torch.autograd.Function):
    """dist.all_to_all_single with autograd: rows split by `in_splits` go out, `out_splits` rows come in per rank.
    The backward sends the gradients back the same way (splits swapped)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        gx = g.new_empty((sum(in_splits), *g.shape[1:]))
        dist.all_to_all_single(gx, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return gx, None, None, None


class _Pending:
    """The all-to-all in flight between an `_AllToAllStart` and its `_AllToAllWait` (forward) or the other way round
    (backward), with the buffers it reads and writes (kept alive until it is done)."""

    work = None
    grad: torch.Tensor | None = None
    buffers: tuple = ()


class _AllToAllStart(torch.autograd.Function):
    """Starts dist.all_to_all_single(async_op=True) and returns its output buffer before the rows have arrived: only
    `_AllToAllWait` (same `pending`) may read it. Its backward waits for the gradients that _AllToAllWait's backward
    sent and returns them."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, pending):
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        send = x.contiguous()
        pending.work = dist.all_to_all_single(out, send, out_splits, in_splits, group=group, async_op=True)
        pending.buffers = (send, out)
        ctx.pending = pending
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, _):
        pending = ctx.pending
        pending.work.wait()
        grad = pending.grad
        pending.work, pending.grad, pending.buffers = None, None, ()
        return grad, None, None, None, None


class _AllToAllWait(torch.autograd.Function):
    """Waits for the all-to-all of an `_AllToAllStart` and passes its output on. Its backward starts the reverse
    all-to-all of the gradients (async_op=True) and leaves the wait to _AllToAllStart's backward."""

    @staticmethod
    def forward(ctx, out, pending, out_splits, in_splits, group):
        pending.work.wait()
        pending.work, pending.buffers = None, ()
        ctx.pending, ctx.splits, ctx.group, ctx.shape = pending, (out_splits, in_splits), group, out.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        send = g.contiguous()
        gx = g.new_empty((sum(in_splits), *g.shape[1:]))
        pending = ctx.pending
        pending.work = dist.all_to_all_single(gx, send, in_splits, out_splits, group=ctx.group, async_op=True)
        pending.grad, pending.buffers = gx, (send, gx)
        # a gradient for the start's output that costs nothing; the start returns gx once it has arrived
        return g.new_zeros(()).expand(ctx.shape), None, None, None, None


def _rows(x: torch.Tensor, rows_of: torch.Tensor | None, rows: slice) -> torch.Tensor:
    """Rows `rows` of the sorted inputs: x[rows], or x[rows_of[rows]] when the experts gather their own rows."""
    return x[rows] if rows_of is None else x.index_select(0, rows_of[rows])


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, computed in a and b's dtype and rounded once into out's dtype."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


class _SegmentExperts(torch.autograd.Function):
    """y = act(x W_up[e]^T + b_up[e]) W_down[e]^T + b_down[e] on each contiguous segment of rows routed to expert e.
    Saves the inputs (x_MD, or x and the index `rows_of` that sorts its rows: then no sorted copy is kept) and the
    pre-activations u; the activation is recomputed in the backward.

    With LoRA factors (A (e, r, in), B (e, out, r) for the up and / or the down projection), each projection adds
    scaling * (v A[e]^T) B[e]^T; the backward recomputes the rank-r products v A[e]^T rather than saving them, and skips
    the full-size weight gradients when the weights are frozen."""

    @staticmethod
    def forward(
        ctx, x_MD, w_up_EUD, w_down_EDI, b_up_EU, b_down_ED, counts, act,
        a_up_ERD=None, b_up_EUR=None, a_down_ERI=None, b_down_EDR=None, scaling=1.0, rows_of=None,
    ):  # fmt: skip
        cdt = matmul_dtype(x_MD)
        m, u = (x_MD.shape[0] if rows_of is None else rows_of.shape[0]), w_up_EUD.shape[1]
        u_MU = torch.empty((m, u), dtype=cdt, device=x_MD.device)
        y_MD = torch.empty((m, w_down_EDI.shape[1]), dtype=cdt, device=x_MD.device)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                x = _rows(x_MD, rows_of, rows).to(cdt)
                torch.mm(x, w_up_EUD[e].to(cdt).T, out=u_MU[rows])
                if a_up_ERD is not None:
                    xa = x @ a_up_ERD[e].to(cdt).T
                    u_MU[rows].addmm_(xa, b_up_EUR[e].to(cdt).T, alpha=scaling)
                if b_up_EU is not None:
                    u_MU[rows] += b_up_EU[e].to(cdt)
                if a_down_ERI is None:
                    torch.mm(act.forward(u_MU[rows]), w_down_EDI[e].to(cdt).T, out=y_MD[rows])
                else:
                    h = act.forward(u_MU[rows])
                    torch.mm(h, w_down_EDI[e].to(cdt).T, out=y_MD[rows])
                    y_MD[rows].addmm_(h @ a_down_ERI[e].to(cdt).T, b_down_EDR[e].to(cdt).T, alpha=scaling)
                if b_down_ED is not None:
                    y_MD[rows] += b_down_ED[e].to(cdt)
                start += n
        ctx.counts, ctx.act, ctx.scaling = counts, act, scaling
        ctx.bias_dtypes = (None if b_up_EU is None else b_up_EU.dtype, None if b_down_ED is None else b_down_ED.dtype)
        lora = (a_up_ERD, b_up_EUR, a_down_ERI, b_down_EDR)
        ctx.save_for_backward(x_MD, u_MU.to(x_MD.dtype), w_up_EUD, w_down_EDI, *lora, rows_of)
        return y_MD.to(x_MD.dtype)

    @staticmethod
    def backward(ctx, g_MD):
        x_MD, u_MU, w_up_EUD, w_down_EDI, a_up_ERD, b_up_EUR, a_down_ERI, b_down_EDR, rows_of = ctx.saved_tensors
        act, s = ctx.act, ctx.scaling
        cdt = matmul_dtype(x_MD)
        zeros = lambda shape: torch.zeros(shape, dtype=cdt, device=x_MD.device)  # noqa: E731
        maybe_zeros = lambda t: None if t is None else zeros(t.shape)  # noqa: E731
        # g and dL/dx stay in their own dtype and are widened / rounded one segment at a time: no full-size copies.
        gx_MD = torch.zeros((u_MU.shape[0], x_MD.shape[1]), dtype=x_MD.dtype, device=x_MD.device)
        # Frozen base weights (LoRA training) need no full-size gradient. The weight gradients are written per
        # expert straight into the weights' dtype (a bf16 model keeps no full-size fp32 copy of them).
        gw_up = torch.zeros_like(w_up_EUD) if ctx.needs_input_grad[1] else None
        gw_down = torch.zeros_like(w_down_EDI) if ctx.needs_input_grad[2] else None
        b_up_dtype, b_down_dtype = ctx.bias_dtypes
        gb_up = zeros(w_up_EUD.shape[:2]) if b_up_dtype is not None else None
        gb_down = zeros(w_down_EDI.shape[:2]) if b_down_dtype is not None else None
        g_lora = [maybe_zeros(t) for t in (a_up_ERD, b_up_EUR, a_down_ERI, b_down_EDR)]
        ga_up, gbl_up, ga_down, gbl_down = g_lora
        start = 0
        for e, n in enumerate(ctx.counts):
            if not n:
                continue
            rows = slice(start, start + n)
            start += n
            u = u_MU[rows].to(cdt)
            g = g_MD[rows].to(cdt)
            if gw_down is not None or a_down_ERI is not None:
                h = act.forward(u)
            if gw_down is not None:
                _mm_into(gw_down[e], g.T, h)
            gh = g @ w_down_EDI[e].to(cdt)
            if a_down_ERI is not None:  # y += s (h A^T) B^T
                a, b = a_down_ERI[e].to(cdt), b_down_EDR[e].to(cdt)
                g_ha = (g @ b).mul_(s)
                torch.mm(g_ha.T, h, out=ga_down[e])
                torch.mm(g.T, h @ a.T, out=gbl_down[e]).mul_(s)
                gh.addmm_(g_ha, a)
            gu = act.backward(u, gh)
            if gw_up is not None or a_up_ERD is not None:
                x = _rows(x_MD, rows_of, rows).to(cdt)
            if gw_up is not None:
                _mm_into(gw_up[e], gu.T, x)
            gx = gu @ w_up_EUD[e].to(cdt)
            if a_up_ERD is not None:  # u += s (x A^T) B^T
                a, b = a_up_ERD[e].to(cdt), b_up_EUR[e].to(cdt)
                g_xa = (gu @ b).mul_(s)
                torch.mm(g_xa.T, x, out=ga_up[e])
                torch.mm(gu.T, x @ a.T, out=gbl_up[e]).mul_(s)
                gx.addmm_(g_xa, a)
            gx_MD[rows] = gx
            if gb_up is not None:
                torch.sum(gu, 0, out=gb_up[e])
            if gb_down is not None:
                torch.sum(g, 0, out=gb_down[e])
        cast = lambda grad, like: None if grad is None else grad.to(like.dtype)  # noqa: E731
        if rows_of is not None:  # the backward of the gather x_MD[rows_of], as autograd's index_select has it
            gx_MD = torch.zeros_like(x_MD).index_add_(0, rows_of, gx_MD)
        return (
            gx_MD,
            gw_up,
            gw_down,
            None if gb_up is None else gb_up.to(b_up_dtype),
            None if gb_down is None else gb_down.to(b_down_dtype),
            None,
            None,
            *(cast(grad, t) for grad, t in zip(g_lora, (a_up_ERD, b_up_EUR, a_down_ERI, b_down_EDR))),
            None,
            None,
        )
