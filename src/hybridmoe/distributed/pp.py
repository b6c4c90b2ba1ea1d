"""Pipeline parallelism for `HybridMoEForCausalLM` on the "pp" mesh dimension, with `torch.distributed.pipelining`.

The layer stack is cut into `parallel.pp` stages by layer count (as even as possible, the earlier stages taking the
remainder, or at `parallel.pp_split_points`); the embedding lives on the first stage, the final norm, the LM head
with its fused chunked loss and the MTP layers on the last (the layout of Megatron-LM and torchtitan, pytorch/
torchtitan `torchtitan/distributed/pipeline_parallel.py`). Each rank keeps its stage's modules under their own names
(`backbone.layers.7...` stays `backbone.layers.7...`), so distributed checkpoints hold the names of the whole model
whatever the layout, and FSDP2 / expert parallelism then shard the stage over the ranks of the stage.

One optimizer step is one run of the 1F1B schedule (`Schedule1F1B`: each stage alternates one forward and one
backward micro-batch once the pipeline is full, so at most pp micro-batches' activations are alive per stage) over
the step's `data.grad_accum` batches cut into `parallel.microbatches` micro-batches each. What crosses the stages:
  - forward: the hidden states; with MTP, also the embeddings of the tokens and of `mtp_num_depths` padding tokens
    (b, t + depths, d), from which the last stage takes each depth's shifted input (`forward_mtp`), so the
    embedding table exists on the first stage only and its gradient is exact; backward: their gradients. Under
    tensor and context parallelism (within each stage, as without pipelining: `distributed.tp`, `distributed.cp`)
    each rank holds t / (cp tp) tokens of every sequence, in one or two runs of positions (`shard_runs`: the
    context-parallel ranks hold two chunks each), and what it sends is those tokens' hidden states,
    (b, t / (cp tp), d), and the embeddings of each run and the `mtp_num_depths` tokens after it; the "pp" mesh
    dimension links the ranks of the same (dp, cp, tp) coordinates, so shard r of a stage goes to shard r of the
    next;
  - labels, document ids (every Mamba and attention layer needs them) and the loss scales go to every stage as
    keyword arguments that the schedule cuts into micro-batches with the inputs;
  - the loss: the last stage returns each micro-batch's share of the step loss, so that the gradients are those of
    the whole batch exactly (the schedule does not rescale them): the token sums of the LM loss and of each MTP
    depth are divided by the target counts of the micro-batch's whole batch (not of the micro-batch: MTP targets
    differ per row with packed documents), the per-sequence MoE balancing loss by the number of micro-batches;
    the counts are of the whole sequences, so under tensor parallelism every rank of a group computes the same
    loss and under context parallelism each rank's is cp x its share (as `HybridMoEForCausalLM.forward`'s);
  - MoE aux losses: each stage adds its layers' sequence-level balancing losses to the backward through its output
    (an identity whose backward seeds the loss with gradient 1, as Megatron-LM's `MoEAuxLossAutoScaler`); the
    token counts for the bias update stay on their stage and are summed over all ranks by global layer
    (`train.balance`, `all_moe_layer_names`).
The logged loss parts are summed over the stages after the step. Validation runs the same stages forward only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kernels.loss import IGNORE_INDEX
from ..modeling import ForwardContext, HybridMoEForCausalLM, LatentMoE, _shift_left


def split_points(n_layers: int, pp: int, points: list[int] | None = None) -> list[int]:
    """The first layer of each stage and n_layers at the end: [0, s_1, ..., s_{pp-1}, n_layers]. `points`
    (parallel.pp_split_points): s_1 .. s_{pp-1} given; else stages as even as possible, the earlier ones one layer
    more (the last stage also carries the LM head, its loss and the MTP layers)."""
    if pp > n_layers:
        raise ValueError(f"parallel.pp={pp} is more than the model's {n_layers} layers: use at most {n_layers}")
    if points is None:
        sizes = [n_layers // pp + (i < n_layers % pp) for i in range(pp)]
        return [sum(sizes[:i]) for i in range(pp + 1)]
    bounds = [0, *points, n_layers]
    if len(points) != pp - 1 or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"parallel.pp_split_points={points}: give pp - 1 = {pp - 1} increasing layer indices in (0, {n_layers}), "
            f"the first layer of each stage after the first"
        )
    return bounds


class _Layers(nn.ModuleDict):
    """A stage's blocks under their indices in the whole model; iterates over the blocks, as the ModuleList did."""

    def __iter__(self):
        return iter(self.values())


class _SeedLoss(torch.autograd.Function):
    """Identity on h; backward also gives `loss` the gradient 1: a loss formed on a stage before the last one (its
    MoE balancing losses) is back-propagated with the gradients that arrive from the next stage."""

    @staticmethod
    def forward(ctx, h, loss):
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        return g, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=g.device)


class PipelineStageModel(HybridMoEForCausalLM):
    """One pipeline stage of a `HybridMoEForCausalLM`: its modules, under the names they have in the whole model
    (parts on other stages are None), and the stage's forward. Built by `pipeline_stage` from a whole model."""

    def __init__(self, model: HybridMoEForCausalLM, stage: int, num_stages: int, layers: range):
        nn.Module.__init__(self)
        c = self.config = model.config
        # set by `distributed.parallelize` on the stage after it is built (tensor and context parallelism)
        self.tensor_parallel, self.context_parallel = model.tensor_parallel, model.context_parallel
        self.stage, self.num_stages = stage, num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        # every MoE layer of the whole model, in order; MTP layers count once per depth they serve
        named = [(n, m) for n, m in model.named_modules() if isinstance(m, LatentMoE)]
        self.all_moe_layer_names = [n for n, _ in named]
        uses = {}
        if model.mtp is not None:
            per = len(c.mtp_hybrid_override_pattern)
            for depth in range(c.mtp_num_depths):
                for j in range(per):
                    name = f"mtp.layers.{(depth % c.num_nextn_predict_layers) * per + j}"
                    uses[name] = uses.get(name, 0) + 1
        self.aux_count = sum(uses.get(n.rsplit(".mixer", 1)[0], 1) for n, m in named if m.aux_loss_coef > 0)
        self.mtp_depths = c.mtp_num_depths if model.mtp is not None and c.mtp_loss_weight > 0 else 0

        backbone = model.backbone
        backbone.layers = _Layers({str(i): backbone.layers[i] for i in layers})
        if not self.is_first:
            backbone.embeddings = None
        if not self.is_last:
            backbone.norm_f = None
        self.backbone = backbone
        self.lm_head = model.lm_head if self.is_last else None
        self.mtp = model.mtp if self.is_last else None
        self.loss_parts = torch.zeros(3, dtype=torch.float64)  # lm, mtp, aux of the step so far (this stage's)
        self.schedules = {}  # (training, micro-batches, rows, length) -> the schedule built for that shape

    def carries_embeddings(self) -> bool:
        """Whether the embeddings travel with the hidden states (training with MTP)."""
        return self.training and self.mtp_depths > 0

    def shard_runs(self, t: int, shard=None) -> list[tuple[int, int]]:
        """This rank's tokens of sequences of t tokens as (start, length) runs of positions: the context-parallel
        chunks (`cp.Shard`, two per rank), and within them the tensor-parallel rank's share of the local tokens (the
        sequence-parallel layout that `tp._SequenceShard` cuts from the embedding output); [(0, t)] without either."""
        cp, tp = self.context_parallel, self.tensor_parallel
        cp_size, tp_size = (cp.size if cp else 1), (tp.tp if tp else 1)
        if t % (2 * cp_size * tp_size if cp else tp_size):
            raise ValueError(
                f"parallel.cp={cp_size} x parallel.tp={tp_size} must divide the sequence length ({t}), twice over cp "
                "(each context-parallel rank holds two chunks): change data.seq_len"
            )
        per = t // (cp_size * tp_size)
        first = (tp.rank if tp else 0) * per
        if cp is None:
            return [(first, per)]
        from .cp import Shard

        return (shard or Shard(cp, t, None)).runs(first, per)

    def forward(self, x, emb=None, *, labels, loss_scales, document_ids=None):
        """x: the token ids (first stage) or the previous stage's hidden states; emb: the padded embeddings (with
        MTP). labels (b, t); loss_scales (b, 2 + depths): per row, what turns the LM loss's token sum, the summed
        balancing losses and each MTP depth's token sum into their share of the step loss; document_ids (b, t),
        already made contiguous runs. Returns what the next stage takes, or on the last stage the micro-batch's
        share of the loss (training) or its scaled LM loss sum (evaluation)."""
        c, carry = self.config, self.carries_embeddings()
        ctx = ForwardContext(document_ids=document_ids)
        if self.context_parallel is not None:  # this rank's shard (`distributed.cp`); the loss shifts the full labels
            ctx.cp = self.context_parallel.begin(ctx, labels.shape[1], c.conv_kernel)
            ctx.document_ids = ctx.cp.local(document_ids)
        runs = self.shard_runs(labels.shape[1], ctx.cp)
        extra = self.mtp_depths if carry else 0
        if self.is_first:
            # this rank's runs of tokens, each with, under MTP, the depths' tokens after it (padding past the end)
            padded = F.pad(x, (0, extra), value=0)
            windows = torch.cat([padded[:, s : s + n + extra] for s, n in runs], dim=1)
            # the module's forward, not its call: the windows are already this rank's (under tensor parallelism the
            # call's hook, `tp._SequenceShard`, would cut them again)
            emb = self.backbone.embeddings.forward(windows)
            h = _shifted(emb, runs, extra, 0)
        else:
            h = x
        for layer in self.backbone.layers:
            if self.backbone.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, ctx, use_reentrant=False)
            else:
                h = layer(h, ctx)
        loss = None
        if self.is_last:
            h = self.backbone.norm_f(h)
            loss = self._loss_from_hidden(h, labels, shift=1, weights=loss_scales[:, :1].expand_as(labels), cp=ctx.cp)
            if self.training:
                self.loss_parts[0] += float(loss.detach())
            if carry:
                depths = self.forward_mtp(h, None, ctx, shifted_embeddings=lambda s: _shifted(emb, runs, extra, s))
                mtp = sum(
                    self._loss_from_hidden(hk, labels, shift=k + 2, document_ids=document_ids,
                                           weights=loss_scales[:, 2 + k : 3 + k].expand_as(labels), cp=ctx.cp)
                    for k, hk in enumerate(depths)
                )  # fmt: skip
                self.loss_parts[1] += float(mtp.detach())
                loss = loss + c.mtp_loss_weight * mtp
        if ctx.aux_losses:  # training with router_aux_loss_coef > 0: this stage's MoE layers
            aux = torch.stack(ctx.aux_losses).sum() * (loss_scales[0, 1] / self.aux_count)
            self.loss_parts[2] += float(aux.detach())
            aux = c.router_aux_loss_coef * aux
            if self.is_last:
                loss = loss + aux
            else:
                h = _SeedLoss.apply(h, aux)
        if self.is_last:
            return loss
        return (h, emb) if carry else h

    # ------------------------------------------------------------------ schedules

    def schedule(self, par, microbatches: int, rows: int, t: int, dtype: torch.dtype):
        """The 1F1B schedule of this stage for micro-batches of `rows` sequences of t tokens (built once per shape
        and mode; the tensor shapes are given, so no metadata forward runs). Between the stages travel this rank's
        shard of the hidden states (rows, t / (cp tp), d) and, with MTP, of the embeddings (+ depths tokens)."""
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        key = (self.training, microbatches, rows, t, dtype)
        if key not in self.schedules:
            grad, d = self.training, self.config.hidden_size

            def hidden(length):
                return torch.empty(rows, length, d, dtype=dtype, device="meta", requires_grad=grad)

            runs = self.shard_runs(t)
            per = sum(n for _, n in runs)
            carry = (hidden(per + len(runs) * self.mtp_depths),) if self.carries_embeddings() else ()
            ids = torch.empty(rows, t, dtype=torch.long, device="meta")
            inputs = (ids,) if self.is_first else (hidden(per), *carry)
            scalar = torch.empty((), dtype=torch.float32, device="meta", requires_grad=grad)
            outputs = scalar if self.is_last else (hidden(per), *carry)
            stage = PipelineStage(self, self.stage, self.num_stages, par.device, input_args=inputs,
                                  output_args=outputs, group=par.pp_group)  # fmt: skip
            self.schedules[key] = Schedule1F1B(stage, microbatches, loss_fn=_own_loss, scale_grads=False)
        return self.schedules[key]


def _shifted(windows: torch.Tensor, runs: list[tuple[int, int]], extra: int, shift: int) -> torch.Tensor:
    """From the embedding windows of this rank's runs (each run's tokens and `extra` after them, concatenated), the
    embeddings of the tokens `shift` positions after each of the rank's tokens."""
    out, at = [], 0
    for _, n in runs:
        out.append(windows[:, at + shift : at + shift + n])
        at += n + extra
    return torch.cat(out, dim=1) if len(out) > 1 else out[0]


def _own_loss(output, target):
    """The schedule's loss function: the last stage's output is already the micro-batch's loss."""
    return output


def pipeline_stage(model: HybridMoEForCausalLM, par, points: list[int] | None = None) -> PipelineStageModel:
    """This rank's stage of `model` (which holds the whole model; the other stages' modules are dropped). Tensor
    and context parallelism are applied to the stage afterwards (`distributed.parallelize`)."""
    bounds = split_points(model.config.num_hidden_layers, par.pp, points)
    s = par.pp_rank
    return PipelineStageModel(model, s, par.pp, range(bounds[s], bounds[s + 1]))


# ---------------------------------------------------------------------------------------------- a step


def forward_backward(model: PipelineStageModel, batches: list[dict], precision: str, par, microbatches: int):
    """The pipelined `train.model.native_forward_backward`: forward and backward of one optimizer step over the
    step's batches (this data-parallel rank's rows of each), each cut into `microbatches` micro-batches, through
    the stages. Every rank of a pipeline calls it with the same batches; the gradients are those of the mean of
    the batches' losses, and so are the returned loss parts (the same on every stage)."""
    from ..train.model import autocast

    ids, labels, docs, scales = _step_inputs(model, batches, microbatches)
    rows, t = ids.shape
    n = microbatches * len(batches)
    schedule = model.schedule(par, n, rows // n, t, _activation_dtype(model, par))
    model.loss_parts.zero_()
    kwargs = {"labels": labels, "loss_scales": scales, **({"document_ids": docs} if docs is not None else {})}
    with autocast(model, precision):
        schedule.step(*((ids,) if model.is_first else ()), target=labels, return_outputs=False, **kwargs)
    parts = model.loss_parts.to(par.device)
    dist.all_reduce(parts, group=par.pp_group)
    lm, mtp, aux = parts.tolist()
    c = model.config
    losses = {"lm_loss": lm, "loss": lm}
    if model.mtp_depths:
        losses["mtp_loss"] = mtp
        losses["loss"] += c.mtp_loss_weight * mtp
    if model.aux_count:
        losses["aux_loss"] = aux
        losses["loss"] += c.router_aux_loss_coef * aux
    return losses


def _step_inputs(model, batches: list[dict], microbatches: int):
    """The step's batches as one (rows of all batches), document ids as contiguous runs, and the loss scales."""
    for batch in batches:
        rows = batch["input_ids"].shape[0]
        if rows % microbatches or microbatches < model.num_stages:
            raise ValueError(
                f"parallel.microbatches={microbatches}: the 1F1B schedule needs at least parallel.pp={model.num_stages}"
                f" micro-batches, each data-parallel rank's {rows} sequences per batch must split into them evenly "
                f"(data.batch_size / data-parallel degree)"
            )
    ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    docs = [b.get("document_ids") for b in batches]
    docs = torch.cat(docs) if docs[0] is not None else None
    docs = model._context(ids, labels, docs, None, None).document_ids  # checks, and contiguous runs
    depths, accum = model.mtp_depths, len(batches)
    scales = []
    for i, batch in enumerate(batches):
        rows = slice(i * len(batch["input_ids"]), (i + 1) * len(batch["input_ids"]))
        y, d = labels[rows], docs[rows] if docs is not None else None
        counts = [_targets(y, 1, None)] + [_targets(y, k + 2, d) for k in range(depths)]
        row = [1 / (counts[0] * accum), 1 / (microbatches * accum)] + [1 / (n * depths * accum) for n in counts[1:]]
        scales.append(torch.tensor(row, dtype=torch.float32).expand(len(y), -1))
    return ids, labels, docs, torch.cat(scales).to(ids.device)


def _targets(labels, shift: int, document_ids) -> int:
    """The number of targets a loss at this shift averages over (as `HybridMoEForCausalLM._loss_from_hidden`)."""
    y = _shift_left(labels, shift, fill=IGNORE_INDEX)
    if document_ids is not None:
        y = torch.where(_shift_left(document_ids, shift, fill=-1) == document_ids, y, IGNORE_INDEX)
    return max(int((y != IGNORE_INDEX).sum()), 1)


def _activation_dtype(model, par) -> torch.dtype:
    """What the hidden states between stages are: bf16 under FSDP2 mixed precision, else the weights' dtype (fp32
    under autocast: the residual stream stays fp32)."""
    if par.mixed_precision == "bf16":
        return torch.bfloat16
    return next(model.parameters()).dtype


@torch.no_grad()
def evaluate_batch(model: PipelineStageModel, batch: dict, par) -> tuple[float, int]:
    """(LM loss summed over the targets, number of targets) of this data-parallel rank's rows of a validation
    batch, run through the stages forward only; (0, 0) on the stages before the last, so that summing over all
    ranks counts each data-parallel rank once per tensor- and context-parallel rank, as without pipelining (a cp
    rank's sum is cp x its share of the targets' losses, with the count of all of them)."""
    ids, labels = batch["input_ids"], batch["labels"]
    rows, t = ids.shape
    n = model.num_stages
    if rows % n:
        raise ValueError(f"{rows} validation sequences per data-parallel rank do not split into {n} micro-batches")
    schedule = model.schedule(par, n, rows // n, t, _activation_dtype(model, par))
    scales = torch.ones(rows, 2, dtype=torch.float32, device=ids.device)
    losses = []
    inputs = (ids,) if model.is_first else ()
    schedule.eval(*inputs, target=labels, losses=losses, return_outputs=False, labels=labels, loss_scales=scales)
    if not model.is_last:
        return 0.0, 0
    return float(sum(losses)), int((labels[:, 1:] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------- checkpoints


def full_state_dict(model: PipelineStageModel, par) -> dict:
    """Collective: the whole model's full state dict (CPU) on rank 0, {} elsewhere. Each stage gathers its own
    parameters over its ranks; the first rank of each stage (the ranks of rank 0's pipeline) sends them to rank 0.
    Every rank of a stage holds the stage's full weights for a moment: for models that fit, as consolidation is."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    lead = all(c == 0 for c in par.mesh.get_coordinate()[1:])  # (pp, 0, 0, 0, 0): in rank 0's pipeline
    if not lead:
        return {}
    sd = {name: t.detach().cpu() for name, t in sd.items()}
    parts = [None] * par.pp if par.is_main else None
    dist.gather_object(sd, parts, dst=0, group=par.pp_group)
    return {name: t for part in parts for name, t in part.items()} if par.is_main else {}
