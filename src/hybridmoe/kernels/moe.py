"""Routed experts: relu^2 expert MLPs applied to the tokens a router chose, combined with the routing weights.

Faithful to transformers' `NemotronHExperts` (non-gated experts: `down(relu(up(x))**2)`, the routing weight applied
after `down`, an fp32 combine) and to the dispatch of torchtitan / NeMo AutoModel (stable sort of the token copies
by expert, counts by bincount, grouped matmuls over contiguous segments, weighted combine by scatter-add).

Twins: `experts_reference` (a loop over experts with boolean masks, the definition) and `experts_grouped` (the fast
path). Backends of the grouped matmul, chosen once per process and logged:
  - `grouped_mm`: `torch._grouped_mm` (CUDA, compute capability >= 9.0, bf16);
  - `segments`: one matmul per contiguous expert segment, with a hand-written backward that saves only the sorted
    inputs and the pre-activations; on a CPU without native bf16 matmuls (no AVX512-BF16 / AMX) bf16 operands are
    multiplied in fp32, which is exact for the products and, like a bf16 GEMM, accumulates in fp32.

Legend: t tokens, k experts per token, d model width (the latent width for LatentMoE), i expert hidden width,
e experts, m = t*k token copies.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from .linear import matmul_dtype

log = logging.getLogger(__name__)


def experts_reference(x_TD, w_up_EID, w_down_EDI, topk_idx_TK, topk_w_TK):
    """Loop over experts; returns (t,d) in x's dtype, accumulated in fp32."""
    out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for e in range(w_up_EID.shape[0]):
        tok, slot = torch.where(topk_idx_TK == e)
        if tok.numel() == 0:
            continue
        h = torch.relu(x_TD[tok] @ w_up_EID[e].T) ** 2
        y = (h @ w_down_EDI[e].T).float() * topk_w_TK[tok, slot, None].float()
        out_TD.index_add_(0, tok, y)
    return out_TD.to(x_TD.dtype)


_BACKEND: str | None = None


def experts_backend(x: torch.Tensor) -> str:
    """`grouped_mm` where torch._grouped_mm runs well, else `segments`; decided once and logged."""
    global _BACKEND
    if _BACKEND is None:
        ok = (
            x.is_cuda
            and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device)[0] >= 9
            and x.dtype == torch.bfloat16
        )
        _BACKEND = "grouped_mm" if ok else "segments"
        log.info("hybridmoe MoE experts backend: %s", _BACKEND)
    return _BACKEND


def experts_grouped(x_TD, w_up_EID, w_down_EDI, topk_idx_TK, topk_w_TK, ep_group=None):
    """Sort token copies by expert, run the experts on contiguous segments, scatter-add the weighted results.

    With `ep_group` (expert parallelism), the weights are this rank's slice of the experts (rank r of the group
    holds experts [r*e_local, (r+1)*e_local)) while topk_idx_TK holds global expert ids: the sorted token copies
    travel to the ranks that own their experts and back with two all-to-alls (`expert_parallel_segments`)."""
    t, k = topk_idx_TK.shape
    ep = 1 if ep_group is None else dist.get_world_size(ep_group)
    e = w_up_EID.shape[0] * ep
    flat_M = topk_idx_TK.reshape(-1)
    order_M = torch.argsort(flat_M, stable=True)
    counts_E = torch.bincount(flat_M, minlength=e)
    token_M = order_M // k
    x_MD = x_TD.index_select(0, token_M)
    if ep_group is None:
        y_MD = _run_experts(x_MD, w_up_EID, w_down_EDI, counts_E)
    else:
        y_MD = expert_parallel_segments(x_MD, w_up_EID, w_down_EDI, counts_E, ep_group)
    y_MD = y_MD.float() * topk_w_TK.reshape(-1).index_select(0, order_M).float()[:, None]
    out_TD = torch.zeros((t, x_TD.shape[1]), dtype=torch.float32, device=x_TD.device)
    out_TD.index_add_(0, token_M, y_MD)
    return out_TD.to(x_TD.dtype)


def _run_experts(x_MD, w_up_EID, w_down_EDI, counts_E):
    """The experts on rows already sorted by expert (counts_E rows each)."""
    if experts_backend(x_MD) == "grouped_mm" and x_MD.is_cuda:
        offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
        h_MI = torch.relu(torch._grouped_mm(x_MD, w_up_EID.transpose(-2, -1), offs=offs)) ** 2
        return torch._grouped_mm(h_MI, w_down_EDI.transpose(-2, -1), offs=offs)
    return _SegmentExperts.apply(x_MD, w_up_EID, w_down_EDI, counts_E.tolist())


def expert_parallel_segments(x_MD, w_up_LID, w_down_LDI, counts_E, ep_group):
    """Expert-parallel dispatch and combine (torchtitan's all-to-all token dispatcher, written out).

    x_MD: this rank's token copies sorted by global expert, counts_E (e,) of them per expert. Since experts are
    owned in contiguous blocks, the sorted rows are already grouped by destination rank. Steps: exchange the
    per-expert counts; send the rows to their owners (all-to-all); regroup the received rows (source-major) by
    local expert; run the local experts; undo the regrouping; send the results back (all-to-all). Gradients take
    the same way back: the all-to-all's backward is the reverse all-to-all."""
    ep = dist.get_world_size(ep_group)
    e_local = w_up_LID.shape[0]
    send_counts = counts_E.view(ep, e_local)  # [destination rank, its local expert]
    recv_counts = torch.empty_like(send_counts)  # [source rank, my local expert]
    dist.all_to_all_single(recv_counts, send_counts, group=ep_group)
    send_splits = send_counts.sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    x_RD = _AllToAll.apply(x_MD, recv_splits, send_splits, ep_group)
    # received rows: source-major, then local-expert-major within each source -> local-expert-major
    local_expert_R = torch.repeat_interleave(
        torch.arange(e_local, device=x_MD.device).repeat(ep), recv_counts.flatten()
    )
    order_R = torch.argsort(local_expert_R, stable=True)
    y_sorted = _run_experts(x_RD.index_select(0, order_R), w_up_LID, w_down_LDI, recv_counts.sum(0))
    y_RD = _unpermute(y_sorted, order_R)
    return _AllToAll.apply(y_RD, send_splits, recv_splits, ep_group)


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


class _SegmentExperts(torch.autograd.Function):
    """y = relu(x W_up[e]^T)^2 W_down[e]^T on each contiguous segment of rows routed to expert e."""

    @staticmethod
    def forward(ctx, x_MD, w_up_EID, w_down_EDI, counts):
        cdt = matmul_dtype(x_MD)
        m, i = x_MD.shape[0], w_up_EID.shape[1]
        u_MI = torch.empty((m, i), dtype=cdt, device=x_MD.device)
        y_MD = torch.empty((m, w_down_EDI.shape[1]), dtype=cdt, device=x_MD.device)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                torch.mm(x_MD[rows].to(cdt), w_up_EID[e].to(cdt).T, out=u_MI[rows])
                torch.mm(torch.relu(u_MI[rows]).square(), w_down_EDI[e].to(cdt).T, out=y_MD[rows])
                start += n
        ctx.counts = counts
        ctx.save_for_backward(x_MD, u_MI.to(x_MD.dtype), w_up_EID, w_down_EDI)
        return y_MD.to(x_MD.dtype)

    @staticmethod
    def backward(ctx, g_MD):
        x_MD, u_MI, w_up_EID, w_down_EDI = ctx.saved_tensors
        cdt = matmul_dtype(x_MD)
        g_MD = g_MD.to(cdt)
        gx_MD = torch.zeros(x_MD.shape, dtype=cdt, device=x_MD.device)
        gw_up = torch.zeros(w_up_EID.shape, dtype=cdt, device=x_MD.device)
        gw_down = torch.zeros(w_down_EDI.shape, dtype=cdt, device=x_MD.device)
        start = 0
        for e, n in enumerate(ctx.counts):
            if not n:
                continue
            rows = slice(start, start + n)
            start += n
            u = u_MI[rows].to(cdt)
            r = torch.relu(u)
            g = g_MD[rows]
            torch.mm(g.T, r.square(), out=gw_down[e])
            gu = (g @ w_down_EDI[e].to(cdt)).mul_(r).mul_(2.0)  # d/du relu(u)^2 = 2 relu(u)
            torch.mm(gu.T, x_MD[rows].to(cdt), out=gw_up[e])
            torch.mm(gu, w_up_EID[e].to(cdt), out=gx_MD[rows])
        return gx_MD.to(x_MD.dtype), gw_up.to(w_up_EID.dtype), gw_down.to(w_down_EDI.dtype), None
