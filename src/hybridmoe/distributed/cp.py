"""Context parallelism for `HybridMoEForCausalLM`, on the "cp" mesh dimension: the sequences are cut into 2 cp equal
chunks and rank r of a group holds chunks r and 2 cp - 1 - r of every sequence for every layer (the zig-zag layout
of Megatron-LM's context parallelism and torchtitan's load-balanced one): under the causal mask every rank's queries
attend to the same number of query-key pairs, where with contiguous shards rank r would attend to 2r + 1 times as
many as rank 0.

Every rank of a cp group receives the same rows, whole (ids, labels, document ids: a few bytes per token); the model
embeds only its two chunks (`Shard.local`, concatenated as the rank's local tokens) and keeps the full labels and
document ids for the shifted targets of the loss and MTP. What crosses the chunks:
  - attention: the keys and values of the group are all-gathered (autograd-correct: the backward reduce-scatters their
    gradients) and put in sequence order; each local chunk's queries attend to the keys up to the end of that chunk,
    the causal mask offset by the chunk start, packed-document boundaries from the full document ids. Without packed
    documents the prefix (keys before the chunk, all visible) and the chunk's own keys (causal) are two
    flash-attention calls merged by their log-sum-exps, and the backward calls the flash backward of each with the
    merged output and log-sum-exp (the ring-attention decomposition, Liu et al., "Ring Attention with Blockwise
    Transformers", 2023; as torchtitan's context parallelism uses
    `torch.distributed.tensor.experimental.context_parallel`), so no mask is ever formed;
  - Mamba-2: the causal conv of each chunk sees the previous chunk's last k-1 inputs (all-gathered), and the SSD scan
    runs on each chunk from a zero state; the state entering chunk v is combined from the gathered final states and
    total decays of the earlier chunks, h_in(v) = [doc continues] (h_final(v-1) + decay(v-1) h_in(v-1)), and the
    correction y_t += exp(sum_{s<=t} A dt_s) C_t h_in(v) is added for the tokens of the chunk's first document
    (the SSD algorithm's chunk-state passing, Dao & Gu, "Transformers are SSMs", 2024, section 7, across ranks
    instead of chunks; state-spaces/mamba `mamba_ssm/ops/triton/ssd_state_passing.py` passes states between chunks
    the same way). All chunks scan at once; only the (b, h, p, n) states travel;
  - MoE / MLP: per token, nothing crosses; the sequence-level balancing loss sums its per-sequence statistics over the
    group (an all-reduce whose backward all-reduces).

The loss of a rank is cp x (its targets' summed loss) / (the group's target count), so the mean over the group's
ranks is the loss of the whole sequences; FSDP2 (`distributed.fsdp`) shards every parameter over dp x cp and averages
the gradients over those ranks, and the factor cp turns the average over the cp ranks into the sum that the whole
sequences' gradient is. The session's mean of the logged losses over all ranks is then the global loss.

Every rank of a group runs the same collectives in the same order, forward and backward: each layer's exchange is
one collective whose output every rank uses (what a rank does not need is multiplied by zero), so the autograd
graphs of the ranks have the same shape.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..kernels.attention import attention
from ..kernels.ssd import causal_conv1d, ssd_chunked, ssd_dt


class ContextParallel:
    """The cp group of this rank; `begin` makes the per-forward `Shard` the layers read from the ForwardContext."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size

    def begin(self, ctx, t: int, conv_kernel: int) -> Shard:
        if t % (2 * self.size):
            raise ValueError(
                f"parallel.cp={self.size}: the sequence length ({t}) must be a multiple of 2 x cp = {2 * self.size} "
                "(each rank holds two chunks): change data.seq_len"
            )
        if t // (2 * self.size) < conv_kernel - 1:
            raise ValueError(
                f"parallel.cp={self.size}: chunks of {t // (2 * self.size)} tokens are shorter than the conv"
            )
        if ctx.cache is not None or ctx.pad_mask is not None or ctx.key_valid is not None:
            raise ValueError("a context-parallel model trains on packed sequences: no cache and no attention_mask")
        return Shard(self, t, ctx.document_ids)


class Shard:
    """This rank's two chunks of sequences of length t: chunks `rank` and `2 cp - 1 - rank` of 2 cp equal chunks (the
    zig-zag layout: each rank's queries attend to as many keys in total), concatenated in that order as the rank's
    local tokens; and the group's exchanges."""

    def __init__(self, cp: ContextParallel, t: int, document_ids: torch.Tensor | None):
        self.group, self.rank, self.size = cp.group, cp.rank, cp.size
        self.chunk = t // (2 * cp.size)
        self.chunks = (self.rank, 2 * self.size - 1 - self.rank)  # their indices in the sequence
        self.starts = tuple(v * self.chunk for v in self.chunks)
        self.document_ids = document_ids  # (b, t), all tokens, contiguous runs (`HybridMoEForCausalLM._context`)
        # where chunk v lies among the group's local tokens gathered in rank order (rank r's two chunks at 2r, 2r+1)
        self.slots = [2 * v if v < self.size else 2 * (2 * self.size - 1 - v) + 1 for v in range(2 * self.size)]

    def local(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's tokens of x (b, t, ...): its two chunks, concatenated."""
        if x is None:
            return None
        return torch.cat([x[:, s : s + self.chunk] for s in self.starts], dim=1)

    def runs(self, first: int, count: int) -> list[tuple[int, int]]:
        """The positions in the sequence of local tokens [first, first + count), as (start, length) runs."""
        out = []
        for j, s in enumerate(self.starts):
            lo, hi = max(first, j * self.chunk), min(first + count, (j + 1) * self.chunk)
            if lo < hi:
                out.append((s + lo - j * self.chunk, hi - lo))
        return out

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 2 chunk, ...) -> (2 b, chunk, ...): each local chunk as rows of their own (the first chunk's first)."""
        return torch.cat(x.split(self.chunk, dim=1), dim=0)

    def _unrows(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(x.chunk(2, dim=0), dim=1)

    # ------------------------------------------------------------------ loss
    def normalize(self, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """cp x this rank's summed loss / the group's target count (see the module docstring)."""
        count = count.detach().to(torch.float64)
        dist.all_reduce(count, group=self.group)
        return total * (self.size / count.clamp(min=1)).to(total.dtype)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group; the backward sums the gradients over the group too."""
        return _AllReduce.apply(x, self.group)

    # ------------------------------------------------------------------ attention
    def attention(self, q, k, v):
        """q (b,h,t_local,d) of this rank's chunks, k/v (b,kv,t_local,d): the keys and values of the group gathered
        and put in sequence order; each chunk's queries see the keys before them (and of their own document)."""
        c = self.chunk
        kv = _gather(torch.stack([k, v]), self.group, self.size, dim=3)  # (2, b, kv, 2 cp chunks in rank order, d)
        order = torch.cat([torch.arange(slot * c, (slot + 1) * c) for slot in self.slots]).to(kv.device)
        kv = kv.index_select(3, order[: self.starts[1] + c])  # the keys up to the end of the later chunk
        outs = []
        for j, start in enumerate(self.starts):
            qj, end = q[:, :, j * c : (j + 1) * c], start + c
            kj, vj = kv[0][:, :, :end], kv[1][:, :, :end]
            if self.document_ids is None and q.device.type == "cpu":
                outs.append(_PrefixCausalAttention.apply(qj, kj, vj, start))
            else:
                docs = self.document_ids[:, :end] if self.document_ids is not None else None
                outs.append(attention(qj, kj, vj, q_offset=start, document_ids=docs))
        return torch.cat(outs, dim=2)

    # ------------------------------------------------------------------ Mamba-2
    def causal_conv(self, x, weight, bias, seq_idx):
        """`causal_conv1d(x, weight, bias, seq_idx, activation="silu")` of this rank's chunks, each chunk's first
        outputs seeing the previous chunk's last k-1 inputs (of their own documents). x (b, t_local, d), seq_idx
        this rank's ids."""
        k1, c = weight.shape[1] - 1, self.chunk
        rows = self._rows(x)  # (2 b, c, d)
        tails = _gather(rows[:, c - k1 :].contiguous(), self.group, self.size, dim=0)  # (cp, 2 b, k-1, d)
        tails = tails.unflatten(1, (2, -1)).flatten(0, 1)  # (2 cp, b, k-1, d): rank r's chunks at 2r, 2r + 1
        prev = torch.cat([tails[self.slots[v - 1]] * float(v > 0) for v in self.chunks])  # chunk 0: zeros
        ids = None
        if seq_idx is not None:
            id_rows = self._rows(seq_idx)
            before = [
                self.document_ids[:, s - k1 : s] if s else id_rows[j * len(x) : (j + 1) * len(x), :1].expand(-1, k1)
                for j, s in enumerate(self.starts)
            ]  # fmt: skip
            ids = torch.cat([torch.cat(before), id_rows], dim=1)
        y = causal_conv1d(torch.cat([prev.to(x.dtype), rows], dim=1), weight, bias, ids, activation="silu")
        return self._unrows(y[:, k1:])

    def ssd(self, x, dt, A, B, C, D=None, chunk_size=128, seq_idx=None, dt_bias=None, dt_softplus=False,
            dt_limit=None):  # fmt: skip
        """`ssd_chunked` of this rank's chunks with the state of the earlier chunks passed in (see the module
        docstring). Returns y (b,t,h,p) fp32 and the later chunk's final state (scanned from zero)."""
        kw = {"dt_limit": dt_limit} if dt_limit is not None else {}
        b = x.shape[0]
        x, dt, B, C = (self._rows(z) for z in (x, dt, B, C))
        seq_idx = self._rows(seq_idx) if seq_idx is not None else None
        y, final = ssd_chunked(x, dt, A, B, C, D, chunk_size=chunk_size, seq_idx=seq_idx, dt_bias=dt_bias,
                               dt_softplus=dt_softplus, **kw)  # fmt: skip
        rows, t, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        with torch.autocast(x.device.type, enabled=False):
            a_cs = torch.cumsum(ssd_dt(dt, dt_bias, dt_softplus, **kw) * A.float(), dim=1)  # (2b,c,h)
            passes = a_cs[:, -1].exp()  # decay of a state across the whole chunk
            first_doc = None
            if seq_idx is not None:
                first_doc = seq_idx == seq_idx[:, :1]  # (2b,c): tokens of the chunk's first document
                passes = passes * first_doc[:, -1:]  # a document starts inside: nothing passes through
            packed = torch.cat([final.reshape(rows, -1), passes], dim=1)
            gathered = _gather(packed, self.group, self.size, dim=0).unflatten(1, (2, b)).flatten(0, 1)
            finals = gathered[..., : h * p * n].reshape(2 * self.size, b, h, p, n)  # rank r's chunks at 2r, 2r+1
            decays = gathered[..., h * p * n :]
            # h_in(v + 1) = [chunk v+1 continues chunk v's last document] (final(v) + decay(v) h_in(v)) in sequence
            # order, the same operations on every rank; this rank keeps the states entering its two chunks
            h_in = [torch.zeros_like(finals[0]) for _ in self.chunks]
            state = torch.zeros_like(finals[0])
            for v in range(2 * self.size - 1):
                slot = self.slots[v]
                state = finals[slot] + decays[slot][..., None, None] * state
                if self.document_ids is not None:
                    s = (v + 1) * self.chunk
                    cont = self.document_ids[:, s] == self.document_ids[:, s - 1]
                    state = state * cont[:, None, None, None]
                h_in = [hj + state * float(v + 1 == cj) for hj, cj in zip(h_in, self.chunks)]
            h_in = torch.cat(h_in)  # (2b, h, p, n), rows as x's
            readout = torch.einsum("btgn,bgrpn->btgrp", C.float(), h_in.view(rows, g, h // g, p, n))
            weight = a_cs.exp() if first_doc is None else a_cs.exp() * first_doc[..., None]
            y = torch.addcmul(y, readout.reshape(rows, t, h, p), weight[..., None])
        return self._unrows(y), final[b:]


def _gather(x: torch.Tensor, group, size: int, dim: int) -> torch.Tensor:
    """All-gather over the group, stacked on a new dimension 0 (dim=0) or concatenated along `dim` (>0)."""
    return _AllGather.apply(x, group, size, dim)


class _AllGather(torch.autograd.Function):
    """Forward: all-gather; backward: reduce-scatter (each rank's slice of the gradient summed over the group)."""

    @staticmethod
    def forward(ctx, x, group, size, dim):
        ctx.group, ctx.size, ctx.dim = group, size, dim
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts) if dim == 0 else torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, g):
        parts = g.unbind(0) if ctx.dim == 0 else g.chunk(ctx.size, dim=ctx.dim)
        parts = [p.contiguous() for p in parts]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, group=ctx.group)
        return out, None, None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _PrefixCausalAttention(torch.autograd.Function):
    """Queries at positions start .. start + t - 1 over keys 0 .. start + t - 1 (GQA), no other mask: the prefix
    (keys before `start`, every query sees all of them) and the queries' own keys (causal) are two CPU flash calls
    merged by their log-sum-exps; the backward runs each call's flash backward with the merged output and
    log-sum-exp, which is exactly each key block's share of the gradient. q (b,h,t,d), k/v (b,kv,start+t,d)."""

    @staticmethod
    def forward(ctx, q, k, v, start):
        b, h, t, d = q.shape
        kv = k.shape[1]
        rep = h // kv
        scale = d**-0.5
        k2, v2 = _repeat(k[:, :, start:], rep), _repeat(v[:, :, start:], rep)
        out, lse = _FLASH(q, k2, v2, is_causal=True, scale=scale)
        if start:
            # every query sees the whole prefix: one KV group's query heads stacked as rows of one call
            o1, l1 = _FLASH(q.reshape(b, kv, rep * t, d), k[:, :, :start], v[:, :, :start], scale=scale)
            o1, l1 = o1.reshape(b, h, t, d), l1.reshape(b, h, t)
            total = torch.logaddexp(l1, lse)
            w1, w2 = (l1 - total).exp()[..., None], (lse - total).exp()[..., None]
            out = (o1.float() * w1 + out.float() * w2).to(q.dtype)
            lse = total
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.start = start
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse = ctx.saved_tensors
        start = ctx.start
        b, h, t, d = q.shape
        kv = k.shape[1]
        rep = h // kv
        scale = d**-0.5
        g = g.contiguous()
        k2, v2 = _repeat(k[:, :, start:], rep), _repeat(v[:, :, start:], rep)
        dq, dk2, dv2 = _FLASH_BACKWARD(g, q, k2, v2, out, lse, 0.0, True, scale=scale)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dk[:, :, start:] = dk2.view(b, kv, rep, t, d).sum(2)
        dv[:, :, start:] = dv2.view(b, kv, rep, t, d).sum(2)
        if start:
            rows = (b, kv, rep * t, d)
            dq1, dk1, dv1 = _FLASH_BACKWARD(
                g.reshape(rows), q.reshape(rows), k[:, :, :start], v[:, :, :start], out.reshape(rows),
                lse.reshape(b, kv, rep * t), 0.0, False, scale=scale,
            )  # fmt: skip
            dq = dq + dq1.reshape(b, h, t, d)
            dk[:, :, :start], dv[:, :, :start] = dk1, dv1
        return dq, dk, dv, None


def _repeat(x, rep):
    return x.repeat_interleave(rep, dim=1) if rep > 1 else x


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
