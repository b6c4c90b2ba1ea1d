"""Context parallelism for `HybridMoEForCausalLM`, on the "cp" mesh dimension: each of the cp ranks of a group holds
one contiguous shard of every sequence (rank r: tokens [r t / cp, (r + 1) t / cp)) for every layer.

Every rank of a cp group receives the same rows, whole (ids, labels, document ids: a few bytes per token); the model
embeds only its shard (`Shard.local`) and keeps the full labels and document ids for the shifted targets of the loss
and MTP. What crosses the shards:
  - attention: the keys and values of the group are all-gathered (autograd-correct: the backward reduce-scatters their
    gradients) and rank r's queries attend to the keys up to the end of its shard, the causal mask offset by the
    shard start, packed-document boundaries from the full document ids. Without packed documents the prefix (keys
    before the shard, all visible) and the shard's own keys (causal) are two flash-attention calls merged by their
    log-sum-exps, and the backward calls the flash backward of each with the merged output and log-sum-exp (the
    ring-attention decomposition, Liu et al., "Ring Attention with Blockwise Transformers", 2023; as torchtitan's
    context parallelism uses `torch.distributed.tensor.experimental.context_parallel`), so no mask is ever formed.
    The causal work is not balanced: rank r attends to (r + 1/2) shards of keys (no zig-zag reordering);
  - Mamba-2: the causal conv of rank r sees the previous shard's last k-1 inputs (all-gathered), and the SSD scan
    runs on each shard from a zero state; the state entering shard r is combined from the gathered final states and
    total decays of the earlier shards, h_in(r) = [doc continues] (h_final(r-1) + decay(r-1) h_in(r-1)), and the
    correction y_t += exp(sum_{s<=t} A dt_s) C_t h_in(r) is added for the tokens of the shard's first document
    (the SSD algorithm's chunk-state passing, Dao & Gu, "Transformers are SSMs", 2024, section 7, across ranks
    instead of chunks; state-spaces/mamba `mamba_ssm/ops/triton/ssd_state_passing.py` passes states between chunks
    the same way). All shards scan at once; only the (b, h, p, n) states travel;
  - MoE / MLP: per token, nothing crosses; the sequence-level balancing loss sums its per-sequence statistics over the
    group (an all-reduce whose backward all-reduces).

The loss of a rank is cp x (its targets' summed loss) / (the group's target count), so the mean over the group's
ranks is the loss of the whole sequences; FSDP2 (`distributed.fsdp`) shards every parameter over dp x cp and averages
the gradients over those ranks, and the factor cp turns the average over the cp ranks into the sum that the whole
sequences' gradient is. The session's mean of the logged losses over all ranks is then the global loss.

Every rank of a group runs the same collectives in the same order, forward and backward: each layer's exchange is
one collective whose output every rank uses (rank 0 multiplies what it does not need by zero), so the autograd
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
        if t % self.size:
            raise ValueError(f"parallel.cp={self.size} must divide the sequence length ({t}): change data.seq_len")
        if t // self.size < conv_kernel - 1:
            raise ValueError(f"parallel.cp={self.size}: shards of {t // self.size} tokens are shorter than the conv")
        if ctx.cache is not None or ctx.pad_mask is not None or ctx.key_valid is not None:
            raise ValueError("a context-parallel model trains on packed sequences: no cache and no attention_mask")
        return Shard(self, t, ctx.document_ids)


class Shard:
    """This rank's tokens [start, end) of sequences of length t, and the group's exchanges."""

    def __init__(self, cp: ContextParallel, t: int, document_ids: torch.Tensor | None):
        self.group, self.rank, self.size = cp.group, cp.rank, cp.size
        self.per = t // cp.size
        self.start, self.end = self.rank * self.per, (self.rank + 1) * self.per
        self.document_ids = document_ids  # (b, t), all tokens, contiguous runs (`HybridMoEForCausalLM._context`)

    def local(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return x[:, self.start : self.end] if x is not None else None

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
        """q (b,h,t_local,d) of this shard, k/v (b,kv,t_local,d): the keys and values of the group gathered, each
        query sees the keys before it (and of its own document)."""
        kv = _gather(torch.stack([k, v]), self.group, self.size, dim=3)[:, :, :, : self.end]
        k_all, v_all = kv[0], kv[1]
        if self.document_ids is None and q.device.type == "cpu":
            return _PrefixCausalAttention.apply(q, k_all, v_all, self.start)
        docs = self.document_ids[:, : self.end] if self.document_ids is not None else None
        return attention(q, k_all, v_all, q_offset=self.start, document_ids=docs)

    # ------------------------------------------------------------------ Mamba-2
    def causal_conv(self, x, weight, bias, seq_idx):
        """`causal_conv1d(x, weight, bias, seq_idx, activation="silu")` of this shard, its first outputs seeing the
        previous shard's last k-1 inputs (of their own documents). x (b, t_local, d), seq_idx this shard's ids."""
        k1 = weight.shape[1] - 1
        tails = _gather(x[:, x.shape[1] - k1 :].contiguous(), self.group, self.size, dim=0)  # (cp, b, k-1, d)
        prev = tails[(self.rank - 1) % self.size] * float(self.rank > 0)  # rank 0: zeros (the sequence start)
        ids = None
        if seq_idx is not None:
            prev_ids = seq_idx[:, :1].expand(-1, k1)  # rank 0: zeros before the sequence, any id
            if self.rank:
                prev_ids = self.document_ids[:, self.start - k1 : self.start]
            ids = torch.cat([prev_ids, seq_idx], dim=1)
        y = causal_conv1d(torch.cat([prev.to(x.dtype), x], dim=1), weight, bias, ids, activation="silu")
        return y[:, k1:]

    def ssd(self, x, dt, A, B, C, D=None, chunk_size=128, seq_idx=None, dt_bias=None, dt_softplus=False,
            dt_limit=None):  # fmt: skip
        """`ssd_chunked` of this shard with the state of the earlier shards passed in (see the module docstring).
        Returns y (b,t,h,p) fp32 and this shard's local final state (scanned from zero)."""
        kw = {"dt_limit": dt_limit} if dt_limit is not None else {}
        y, final = ssd_chunked(x, dt, A, B, C, D, chunk_size=chunk_size, seq_idx=seq_idx, dt_bias=dt_bias,
                               dt_softplus=dt_softplus, **kw)  # fmt: skip
        b, t, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        with torch.autocast(x.device.type, enabled=False):
            a_cs = torch.cumsum(ssd_dt(dt, dt_bias, dt_softplus, **kw) * A.float(), dim=1)  # (b,t,h)
            passes = a_cs[:, -1].exp()  # decay of a state across the whole shard
            first_doc = None
            if seq_idx is not None:
                first_doc = seq_idx == seq_idx[:, :1]  # (b,t): tokens of the shard's first document
                passes = passes * first_doc[:, -1:]  # a document starts inside: nothing passes through
            packed = torch.cat([final.reshape(b, -1), passes], dim=1)
            gathered = _gather(packed, self.group, self.size, dim=0)  # (cp, b, h p n + h)
            finals = gathered[..., : h * p * n].reshape(self.size, b, h, p, n)
            decays = gathered[..., h * p * n :]
            # h_in(m + 1) = [shard m+1 continues shard m's last document] (final(m) + decay(m) h_in(m)), the same
            # operations on every rank; this rank keeps h_in(rank)
            h_in = torch.zeros_like(finals[0])
            state = torch.zeros_like(finals[0])
            for m in range(self.size - 1):
                state = finals[m] + decays[m][..., None, None] * state
                if self.document_ids is not None:
                    s = (m + 1) * self.per
                    cont = self.document_ids[:, s] == self.document_ids[:, s - 1]
                    state = state * cont[:, None, None, None]
                h_in = h_in + state * float(m == self.rank - 1)
            readout = torch.einsum("btgn,bgrpn->btgrp", C.float(), h_in.view(b, g, h // g, p, n)).reshape(b, t, h, p)
            weight = a_cs.exp() if first_doc is None else a_cs.exp() * first_doc[..., None]
            y = torch.addcmul(y, readout, weight[..., None])
        return y, final


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
