"""Tensor parallelism with sequence parallelism for `HybridMoEForCausalLM`, on the "tp" mesh dimension.

Megatron-LM's layout (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", 2022) with
DTensor's `parallelize_module`, as torchtitan applies it (pytorch/torchtitan, `torchtitan/models/llama3/infra/
parallelize.py`, `apply_tp`). Between the mixers the residual stream is split along the sequence (each of the tp
ranks holds t / tp tokens of every sequence of its data-parallel rows); a mixer all-gathers its input, runs
split over its heads (or hidden units), and reduce-scatters its output back to sequence shards:
  - norms (block norms, final norm, MTP's enorm / hnorm / final_layernorm): `SequenceParallel`, on the local tokens;
  - attention: q/k/v `ColwiseParallel` (whole heads per rank: num_attention_heads and num_key_value_heads divisible
    by tp), o_proj `RowwiseParallel`. With fewer KV heads than ranks (every Nemotron 3 model has 2) k/v stay whole
    and each rank computes the one KV head its query heads read, as Megatron-LM replicates the KV heads then; their
    gradients are partial sums over tp (below);
  - Mamba-2: in_proj column-split so that each rank holds whole heads and whole groups. The fused in_proj's rows
    (z, x, B, C, dt) are permuted rank-major, [z_0 x_0 B_0 C_0 dt_0 | z_1 x_1 ...], so that a plain dim-0 shard
    gives rank r its heads' z, x, dt and its groups' B, C (as Megatron-LM's Mamba mixer lays out its column-parallel
    in_proj); the conv channels (x, B, C) are permuted the same way. The conv, the SSD scan, D, dt_bias, A_log and
    the gated norm (its statistics are per group, and groups do not straddle ranks) then run on the rank's heads
    alone; out_proj `RowwiseParallel`. Needs mamba_num_heads and n_groups divisible by tp;
  - dense MLPs and the MoE shared expert: up `ColwiseParallel`, down `RowwiseParallel`;
  - routed MoE path (router, LatentMoE latent projections, routed experts): run on the rank's own tokens (no
    all-gather); the sequence-level balancing loss sums its per-sequence statistics over the tp ranks. The router
    and the latent projections are replicated over tp: their gradients (and the embedding's, and MTP's eh_proj's:
    also run on local tokens) are partial sums over tp, reduced by `reduce_partial_grads` after backward
    (Megatron-LM's all-reduce of sequence-parallel gradients). The routed experts are sharded over every rank of the
    stage instead, tp included (the experts' mesh, `distributed.mesh`; split by expert when parallel.ep > 1);
  - LM head: vocabulary-split (dim-0 shard); the loss is vocab-parallel (`VocabParallelLoss`): each rank forms the
    logits of its vocabulary slice chunk by chunk, the log-sum-exp and the target logit are all-reduced, and the
    full [tokens x vocab] logits exist nowhere (Megatron-LM's vocab-parallel cross-entropy, fused with the head).

Every rank of a tp group computes the same loss; FSDP2 (`distributed.fsdp`) then shards every parameter over the
data-parallel ranks (2-D dp x tp for the split ones). Checkpoints: the Mamba in_proj / conv rows are stored in the
rank-major order of the run's tp degree; consolidated and exported checkpoints are converted back to the Hugging
Face order (`reference_order`), and a distributed checkpoint written with one tp degree resumes with any other
(`train.checkpoint.load_distributed_checkpoint` converts those rows with `convert_rows`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..kernels.linear import matmul_dtype
from ..kernels.loss import IGNORE_INDEX


def check_divisible(config, tp: int) -> None:
    """Clear errors for a model that cannot be split over tp ranks."""
    c = config
    if c.num_key_value_heads % tp and tp % c.num_key_value_heads:
        raise ValueError(
            f"parallel.tp={tp} and the model's num_key_value_heads ({c.num_key_value_heads}): one must divide the "
            "other (with fewer KV heads than ranks each rank computes the KV head its query heads share)"
        )
    needs = [
        ("num_attention_heads", c.num_attention_heads),
        ("mamba_num_heads", c.mamba_num_heads),
        ("n_groups", c.n_groups),
        ("intermediate_size", c.intermediate_size),
        ("moe_shared_expert_intermediate_size", c.moe_shared_expert_intermediate_size),
        ("vocab_size", c.vocab_size),
    ]
    for name, n in needs:
        if n % tp:
            raise ValueError(f"parallel.tp={tp} must divide the model's {name} ({n}); use a divisor of it")
    if c.use_bias or c.mlp_bias:
        raise ValueError("parallel.tp > 1 is for models without linear biases (use_bias and mlp_bias false)")


def mamba_orders(config, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(in_proj row order, conv channel order) that make a dim-0 shard over tp ranks give each rank whole heads
    and groups: row i of the permuted in_proj is row order[i] of the Hugging Face one."""
    c = config
    inner, gn, h = c.mamba_intermediate_size, c.n_groups * c.ssm_state_size, c.mamba_num_heads
    segments = [(0, inner), (inner, inner), (2 * inner, gn), (2 * inner + gn, gn), (2 * inner + 2 * gn, h)]
    rows, conv = [], []
    for r in range(tp):
        for start, size in segments:
            rows.append(torch.arange(start + r * size // tp, start + (r + 1) * size // tp))
        for start, size in segments[1:4]:  # the conv runs over x, B, C (in_proj rows inner .. 2 inner + 2 gn)
            conv.append(torch.arange(start - inner + r * size // tp, start - inner + (r + 1) * size // tp))
    return torch.cat(rows), torch.cat(conv)


def row_order(name: str, config, tp: int) -> torch.Tensor | None:
    """The row order tensor parallelism over tp ranks gives parameter `name` (row i is row order[i] of the Hugging
    Face one), or None where it keeps the Hugging Face order: the Mamba in_proj rows and conv1d channels (weight and
    bias) are permuted; everything else is split in order or left whole."""
    if tp == 1 or not (".mixer.in_proj." in name or ".mixer.conv1d." in name):
        return None
    rows, conv = mamba_orders(config, tp)
    return rows if ".mixer.in_proj." in name else conv


def convert_rows(name: str, t: torch.Tensor, config, from_tp: int, to_tp: int) -> torch.Tensor:
    """A full tensor stored per row of parameter `name` (the parameter itself, or an optimizer moment of it), from
    the row order of tp degree from_tp to that of to_tp (1: the Hugging Face order)."""
    src, dst = row_order(name, config, from_tp), row_order(name, config, to_tp)
    if src is not None:
        t = torch.empty_like(t).index_copy_(0, src.to(t.device), t)
    if dst is not None:
        t = t.index_select(0, dst.to(t.device))
    return t


def reference_order(state_dict: dict, config, tp: int) -> dict:
    """A full state dict of a model trained with tensor parallelism, its Mamba rows back in the Hugging Face order."""
    return {name: convert_rows(name, t, config, tp, 1) for name, t in state_dict.items()}


# ---------------------------------------------------------------------------------------------- parallelize


def parallelize_native(model, par) -> None:
    """Split `model` over par.tp_mesh in place (before FSDP). The model must hold the full weights."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    from ..modeling import Attention, LatentMoE, Mamba2Mixer

    c, tp, mesh = model.config, par.tp, par.tp_mesh
    check_divisible(c, tp)
    rank = mesh.get_local_rank()
    gather_input = PrepareModuleInput(
        input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None), use_local_output=False
    )
    sp = SequenceParallel(use_local_output=True)
    out_rows = RowwiseParallel(output_layouts=Shard(1))
    partial: list[str] = []  # parameters run on local tokens, replicated over tp: gradients summed over tp

    def split_rows(module: nn.Module, name: str, order: torch.Tensor | None = None) -> None:
        from torch.distributed.tensor import distribute_tensor

        p = getattr(module, name)
        data = p.data if order is None else p.data.index_select(0, order.to(p.device))
        setattr(module, name, nn.Parameter(distribute_tensor(data, mesh, [Shard(0)], src_data_rank=None)))

    blocks = list(model.backbone.layers) + (list(model.mtp.layers) if model.mtp is not None else [])
    in_rows, conv_channels = mamba_orders(c, tp)
    for block in blocks:
        prefix = _name_of(model, block)
        mixer = block.mixer
        parallelize_module(block, mesh, {"norm": sp})
        for extra in ("enorm", "hnorm", "final_layernorm"):
            if hasattr(block, extra):
                parallelize_module(block, mesh, {extra: sp})
        if hasattr(block, "eh_proj"):
            partial.append(f"{prefix}.eh_proj.weight")
        if isinstance(mixer, Attention):
            if mixer.num_kv_heads % tp == 0:
                plan = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel()}
                mixer.num_kv_heads //= tp
            else:  # fewer KV heads than ranks: each rank computes the one its query heads read
                plan = {"q_proj": ColwiseParallel()}
                for name in ("k_proj", "v_proj"):
                    proj = getattr(mixer, name)
                    proj.register_forward_pre_hook(_partial_input)
                    proj.register_forward_hook(_KVHead(rank * mixer.num_kv_heads // tp, mixer.head_dim))
                    partial.append(f"{prefix}.mixer.{name}.weight")
                mixer.num_kv_heads = 1
            parallelize_module(mixer, mesh, {**plan, "o_proj": out_rows})
            parallelize_module(block, mesh, {"mixer": gather_input})
            mixer.num_heads //= tp
        elif isinstance(mixer, Mamba2Mixer):
            mixer.in_proj.weight.data = mixer.in_proj.weight.data.index_select(0, in_rows)
            split_rows(mixer.conv1d, "weight", conv_channels)
            if mixer.conv1d.bias is not None:
                split_rows(mixer.conv1d, "bias", conv_channels)
            for name in ("dt_bias", "A_log", "D"):
                split_rows(mixer, name)
            split_rows(mixer.norm, "weight")
            parallelize_module(mixer, mesh, {"in_proj": ColwiseParallel(), "out_proj": out_rows})
            parallelize_module(block, mesh, {"mixer": gather_input})
            mixer.num_heads //= tp
            mixer.n_groups //= tp
            mixer.intermediate_size //= tp
            mixer.conv_dim //= tp
        elif isinstance(mixer, LatentMoE):
            plan = {"up_proj": ColwiseParallel(), "down_proj": out_rows}
            parallelize_module(mixer.shared_experts, mesh, plan)
            parallelize_module(
                mixer, mesh,
                {"shared_experts": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                                      use_local_output=False)},
            )  # fmt: skip
            mixer.sequence_group = par.tp_group
            for name, _ in mixer.named_parameters():
                # the routed experts live on the experts' mesh, sharded over the whole stage (`distributed.mesh`)
                if not name.startswith(("shared_experts.", "experts.")):
                    partial.append(f"{prefix}.mixer.{name}")
        else:  # MLP
            parallelize_module(mixer, mesh, {"up_proj": ColwiseParallel(), "down_proj": out_rows})
            parallelize_module(block, mesh, {"mixer": gather_input})
    # (a pipeline stage, `distributed.pp`, holds the embedding on the first stage, norm and head on the last)
    if model.backbone.norm_f is not None:
        parallelize_module(model.backbone, mesh, {"norm_f": sp})
    if model.backbone.embeddings is not None:
        model.backbone.embeddings.register_forward_hook(_SequenceShard(rank, tp))
        partial.append("backbone.embeddings.weight")
    if model.lm_head is not None:
        split_rows(model.lm_head, "weight")  # the vocabulary in tp slices, read by VocabParallelLoss
    model.tensor_parallel = VocabParallelLoss(par.tp_group, rank, tp)
    model.tp_partial_grads = frozenset(partial)
    model.tp_degree = tp


def _partial_input(module, args):
    """Forward pre-hook of a projection replicated over tp: its gathered (replicated) input as a local tensor whose
    gradient is a partial sum over tp (each rank back-propagates its own heads only)."""
    from torch.distributed.tensor import Partial

    return (args[0].to_local(grad_placements=[Partial()]),)


class _KVHead:
    """Forward hook of k_proj / v_proj when num_key_value_heads < tp (Megatron-LM replicates the key-value heads
    then): keep the columns of KV head `index`, the one this rank's query heads read (the weights stay whole and
    replicated over tp, their gradients partial sums)."""

    def __init__(self, index: int, head_dim: int):
        self.start, self.head_dim = index * head_dim, head_dim

    def __call__(self, module, args, out):
        return out[..., self.start : self.start + self.head_dim]


def _name_of(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)


class _SequenceShard:
    """Forward hook of the embedding: keep this rank's tokens of every sequence (the sequence-parallel layout)."""

    def __init__(self, rank: int, tp: int):
        self.rank, self.tp = rank, tp

    def __call__(self, module, args, out):
        t = out.shape[1]
        if t % self.tp:
            raise ValueError(f"parallel.tp={self.tp} must divide the sequence length ({t}): change data.seq_len")
        per = t // self.tp
        return out[:, self.rank * per : (self.rank + 1) * per]


def reduce_partial_grads(model, par) -> None:
    """Sum over the tp ranks the gradients of the parameters run on local tokens (see the module docstring). Call
    after backward, before clipping; a no-op without tensor parallelism."""
    names = getattr(model, "tp_partial_grads", None)
    if not names or par is None or par.tp == 1:
        return
    from torch.distributed.tensor import DTensor

    group = par.tp_group
    for name, p in model.named_parameters():
        if name in names and p.grad is not None:
            dist.all_reduce(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad, group=group)


# ---------------------------------------------------------------------------------------------- the loss


class VocabParallelLoss:
    """What `HybridMoEForCausalLM`'s loss needs under tensor parallelism: the hidden states gathered along the
    sequence (only the hidden states: [tokens x hidden]) and the fused head + cross-entropy over a vocabulary split
    in tp contiguous slices."""

    def __init__(self, group, rank: int, tp: int):
        self.group, self.rank, self.tp = group, rank, tp

    def gather_sequence(self, h_btd: torch.Tensor) -> torch.Tensor:
        return _GatherSequence.apply(h_btd, self.group, self.tp)

    def linear_cross_entropy(self, hidden, weight, labels, chunk_size: int | None = None, weights=None):
        """Equals `kernels.loss.linear_cross_entropy(hidden, full weight, labels, weights=weights)` (the summed loss,
        fp32, the same on every rank); `weight` is this rank's vocabulary slice (a DTensor sharded on dim 0, or its
        local part)."""
        w = weight.to_local() if hasattr(weight, "to_local") else weight
        if chunk_size is None:
            chunk_size = max(256, min(2048, 2**26 // w.shape[0]))
        start = self.rank * w.shape[0]
        return _VocabParallelCrossEntropy.apply(hidden, w, labels, chunk_size, self.group, start, weights)


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 1 over the tp group; backward: reduce-scatter (each rank's gradient is a partial sum)."""

    @staticmethod
    def forward(ctx, x, group, tp):
        ctx.group, ctx.tp = group, tp
        parts = [torch.empty_like(x) for _ in range(tp)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, g):
        parts = [p.contiguous() for p in g.chunk(ctx.tp, dim=1)]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, group=ctx.group)
        return out, None, None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """The chunked fused loss of `kernels.loss` with the vocabulary split over ranks: per chunk the max and the sum
    of exponentials of the local logits, and the target's logit (on the rank whose slice holds it), are reduced
    over the group; the gradients are formed in forward as in the one-rank kernel (the hidden states' is a partial
    sum over the vocabulary slices, summed by `_GatherSequence`'s backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, group, vocab_start, weights=None):
        cdt = torch.float32 if matmul_dtype(hidden) == torch.float32 else hidden.dtype
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(cdt)
        v_local = w.shape[0]
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h, y = hidden[rows].to(cdt), labels[rows]
            logits = (h @ w.T).float()  # (c, v_local)
            valid = y != IGNORE_INDEX
            local = valid & (y >= vocab_start) & (y < vocab_start + v_local)
            safe = torch.where(local, y - vocab_start, 0)
            m = logits.max(dim=-1).values
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            picked = logits.gather(1, safe[:, None]).squeeze(1) * local
            sums = torch.stack([(logits - m[:, None]).exp().sum(-1), picked])
            dist.all_reduce(sums, group=group)
            lse = m + sums[0].log()
            scale = valid if weights is None else torch.where(valid, weights[rows].float(), 0.0)
            total += ((lse - sums[1]) * scale).sum()
            if want_h or want_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax over the whole vocabulary, this rank's columns
                g.scatter_add_(1, safe[:, None], -local.to(g.dtype)[:, None])
                g.mul_(scale[:, None])
                g = g.to(cdt)
                if want_h:
                    grad_h[rows] = (g @ w).float()
                if want_w:
                    grad_w += (g.T @ h).float()
                del g
            del logits
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_out).to(ctx.dtypes[0]) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.dtypes[1]) if grad_w is not None else None
        return gh, gw, None, None, None, None, None
