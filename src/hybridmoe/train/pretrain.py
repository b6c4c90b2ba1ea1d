"""Pretraining and long-context extension (`hybridmoe pretrain RECIPE`): the stage loop over packed token streams.

Per step: take the step's stream (its sequence length; curriculum phases inside each loader), accumulate the
gradients of `data.grad_accum` micro-batches, and after the optimizer step move the MoE expert biases
(aux-loss-free balancing, `train.balance`). Validation is the token-weighted loss on the loaders' held-out
documents. Everything else (torchrun, resume, stop, clip and step, logging, checkpoints) is the session's
(`train.session`). Under torchrun every rank trains on its rows of the same global batch; with parallel.pp > 1 the
step runs through the pipeline stages (`distributed.pp`).
"""

from __future__ import annotations

import torch

from ..accounting import flops_per_token
from ..distributed import pp
from .balance import balance_experts
from .config import Recipe
from .data import Streams
from .model import build_model, load_model, native_forward_backward
from .session import Stage, StepOutput, run

__all__ = ["PretrainStage", "build_model", "evaluate", "pretrain"]


def pretrain(recipe: Recipe, resume: bool = False, stop_after: int | None = None, peak_gflops: float | None = None):
    """Run (or resume) a pretraining or long-context recipe; the summary of `session.run`."""
    return run(recipe, PretrainStage, resume=resume, stop_after=stop_after, peak_gflops=peak_gflops)


class PretrainStage(Stage):
    def __init__(self, recipe: Recipe, ckpt: str | None, par):
        self.recipe, self.par = recipe, par
        self.model = load_model(recipe, ckpt, par, pipeline=True)
        self.streams = Streams(recipe, self.model.config)
        self.steps, self.tokenizer = recipe.train.steps, recipe.data.tokenizer
        self.consolidate = recipe.parallel.consolidate
        self._flops: dict[int, float] = {}  # per sequence length

    def train_step(self, step: int) -> StepOutput:
        stream = self.streams.for_step(step)
        masking = self.recipe.data.document_masking
        batches = []
        for _ in range(self.recipe.data.grad_accum):
            batch = stream.next_batch()
            if self.par is not None:
                batch = _to(self.par.local_rows(batch), self.par.device)
            batches.append({**batch, "document_ids": batch["document_ids"] if masking else None})
        precision = self.recipe.train.precision
        if self.par is not None and self.par.pp > 1:
            microbatches = self.recipe.parallel.microbatches or self.par.pp
            losses = pp.forward_backward(self.model, batches, precision, self.par, microbatches)
        else:
            losses = native_forward_backward(self.model, batches, precision)
        if stream.seq_len not in self._flops:
            self._flops[stream.seq_len] = flops_per_token(self.model.config, stream.seq_len)
        extra = {"seq_len": stream.seq_len, "phase": stream.phase}
        return StepOutput(losses, stream.tokens_per_step, self._flops[stream.seq_len], extra)

    def after_step(self) -> dict:
        return {"expert_imbalance": balance_experts(self.model, self.recipe.balance.bias_update_rate)}

    def validate(self) -> float | None:
        batches = self.streams.validation_batches(self.recipe.train.val_batches)
        return evaluate(self.model, batches, self.par) if batches else None

    def state_dict(self) -> dict:
        return self.streams.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.streams.load_state_dict(state)


@torch.no_grad()
def evaluate(model, batches, par=None) -> float:
    """Mean next-token loss over the validation batches (token-weighted; under torchrun each rank takes its rows
    of every batch and the sums are combined)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            if par is not None:
                batch = _to(par.local_rows(_pad_rows(batch, par.world_size)), par.device)
            if par is not None and par.pp > 1:
                part, n = pp.evaluate_batch(model, batch, par)
                total, count = total + part, count + n
                continue
            out = model(batch["input_ids"], labels=batch["labels"], return_logits=False)
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n:
                total += float(out.lm_loss) * n
                count += n
    finally:
        model.train(was_training)
    if par is not None:
        total, count = par.sum([total, count])
    return total / max(count, 1)


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if v is not None else None) for k, v in batch.items()}


def _pad_rows(batch: dict, multiple: int) -> dict:
    """Add rows without targets (labels -100) so that the ranks can split the batch evenly (the last validation
    batch may be short); they change neither the loss nor the token count."""
    rows = batch["input_ids"].shape[0]
    extra = -rows % multiple
    if not extra:
        return batch
    fill = {"labels": -100}
    return {
        k: (torch.cat([v, torch.full_like(v[:1], fill.get(k, 0)).expand(extra, -1)]) if v is not None else None)
        for k, v in batch.items()
    }
