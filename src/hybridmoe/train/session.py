"""One training session for every stage: what pretraining, long context and SFT share, written once.

    summary = session.run(recipe, PretrainStage)   # the stage class is built as Stage(recipe, ckpt, par)

The session owns torchrun (`hybridmoe.distributed`: the process group; the stage's model comes sharded with FSDP2
and expert parallelism from `train.model`), seeding, resuming from the newest checkpoint (weights, optimizer, RNG
and the stage's data position, so a run stopped at step N and resumed logs the same losses as one that never
stopped), the stop (SIGINT / SIGTERM, `train.time_limit_s` when the next step would end past it, `stop_after`;
under torchrun every rank stops at the same step, for the same reason), `train.replan_at` (the step count, and so the
schedule's length, fitted once to the measured pace and the time limit), the learning-rate schedule, gradient
clipping and the optimizer step, validation, the log record, the progress bar, checkpoints (`train.checkpoint`:
one format for every stage) and the summary. A stage (`Stage`) owns only what differs: its data and the forward
and backward of one step.

Every step logs the same record: step, loss (and the stage's loss parts), grad_norm, lr, tokens (so far),
tokens_per_s, mfu, step_s, plus the stage's own keys. Rank 0 alone logs. Read `_run` top to bottom.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import time
from dataclasses import dataclass, field

import torch

from .. import distributed
from ..accounting import measure_matmul_peak
from .checkpoint import (
    is_distributed_checkpoint,
    latest_checkpoint,
    load_distributed_checkpoint,
    load_trainer_state,
    remove_unfinished_saves,
    save_checkpoint,
    save_distributed_checkpoint,
)
from .metrics import MetricsLog
from .optim import build_optimizer, lr_at, set_lr


@dataclass
class StepOutput:
    losses: dict[str, float]  # this rank's values for the step (the session averages them over ranks)
    tokens: int  # tokens of the global batch (padding included)
    flops_per_token: float  # model training FLOPs per token at this step's shape (for MFU)
    extra: dict = field(default_factory=dict)  # the stage's own keys, logged as they are


class Stage:
    """What a training stage gives the session. `__init__(recipe, ckpt, par)` builds the model (`train.model`)
    and the data, and sets `model` and `steps`; `train_step` is the stage's loop body; the rest has defaults."""

    model: torch.nn.Module
    steps: int  # optimizer steps of the whole run (the learning-rate schedule's length)
    tokenizer: str | None = None  # a tokenizer directory, copied into every checkpoint
    consolidate: bool = False  # torchrun: also gather the full model in the HF layout (native models) at each save

    def train_step(self, step: int) -> StepOutput:
        """Forward and backward of optimizer step `step` (0-based), all its micro-batches."""
        raise NotImplementedError

    def after_step(self) -> dict:
        """After the optimizer step (e.g. the MoE bias update); returns keys to log."""
        return {}

    def validate(self) -> float | None:
        """Mean loss on held-out data (collective under torchrun), or None without any."""
        return None

    def save_model(self, directory: str) -> None:
        """The model part of a one-process checkpoint."""
        self.model.save_pretrained(directory)

    def finish(self, completed: bool) -> dict:
        """At the end of the call (completed: the last step was run; else stopped early). Summary keys."""
        return {}

    def state_dict(self) -> dict:
        """The data position, saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def run(recipe, make_stage, resume: bool = False, stop_after: int | None = None, peak_gflops: float | None = None):
    """Run (or resume, from the newest checkpoint in train.out_dir) a recipe with a stage. `stop_after`: return
    after this many steps of this call, with a checkpoint. Returns a summary dict; when the run stopped before its
    last step it holds `interrupted` and `stopped`: "signal", "deadline" (train.time_limit_s) or "stop_after"."""
    recipe.validate()
    owns_group = not torch.distributed.is_initialized()
    p = recipe.parallel
    par = distributed.setup(p.ep, tp=p.tp, mixed_precision=p.mixed_precision, cp=p.cp, pp=p.pp)
    try:
        summary = _run(recipe, make_stage, par, resume, stop_after, peak_gflops)
    except BaseException:
        if par is not None and owns_group:
            distributed.teardown(failed=True)  # a rank that raised must not wait for the others at a barrier
        raise
    if par is not None and owns_group:
        distributed.teardown()
    return summary


def _run(recipe, make_stage, par, resume: bool, stop_after: int | None, peak_gflops: float | None) -> dict:
    t = recipe.train
    main = par is None or par.is_main
    # The time limit counts from here on every rank (under torchrun the ranks agree on the step to stop at).
    deadline = time.monotonic() + t.time_limit_s if t.time_limit_s is not None else None
    torch.manual_seed(t.seed)
    ckpt = _checkpoint_to_resume(t.out_dir, par) if resume else None
    stage = make_stage(recipe, ckpt, par)
    optimizer = build_optimizer(stage.model, recipe.optim, fused=par is None)
    step, tokens, replanned = _restore(ckpt, stage, optimizer, par)
    if not t.replan_at:
        replanned = None
    elif replanned is not None:
        stage.steps = replanned  # the step count this run was re-planned to before it stopped
    log = MetricsLog(t.out_dir, t.tensorboard, resume_step=step if ckpt is not None else None) if main else _NoLog()
    peak = peak_gflops or t.peak_gflops or _matmul_peak()
    world = par.world_size if par is not None else 1
    bar = _progress(t, stage.steps, step) if main else None
    summary = {"start_step": step, "resumed_from": ckpt, "peak_gflops": peak}
    if step == 0:
        summary["initial_val_loss"] = _validate(stage, log, step)

    slowest = 0.0  # seconds of the slowest step of this call: what the next one may take
    replan_at = t.replan_at if deadline is not None and step < t.replan_at else 0
    paced_from = None  # (time, step) after this call's first step: the pace excludes its warm-up
    with stop_on_signals() as stop:
        while step < stage.steps:
            lr = lr_at(step, stage.steps, recipe.optim)
            set_lr(optimizer, lr)
            t0 = time.monotonic()
            out, grad_norm, after = train_step(stage, optimizer, step, recipe.optim.grad_clip, par)
            seconds = time.monotonic() - t0
            slowest = max(slowest, seconds)
            step += 1
            tokens += out.tokens
            if paced_from is None:
                paced_from = (time.monotonic(), step)
            elif step == replan_at:
                stage.steps = _replan(step, paced_from, deadline, slowest, par)
                summary["replanned_steps"] = replanned = stage.steps
                if bar is not None:
                    bar.total = stage.steps
            tokens_per_s = out.tokens / seconds
            record = {
                "step": step,
                **out.losses,
                "grad_norm": grad_norm,
                "lr": lr,
                "tokens": tokens,
                "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * out.flops_per_token / (peak * 1e9 * world),
                **after,
                **out.extra,
                "step_s": seconds,
            }
            if step % t.log_every == 0 or step == stage.steps:
                log.log(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out.losses['loss']:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_s:.0f}")
            summary["loss"] = out.losses["loss"]
            if t.val_every and step % t.val_every == 0 and step < stage.steps:
                _validate(stage, log, step)
            if stop_after is not None and step - summary["start_step"] >= stop_after:
                stop.request("stop_after")
            if deadline is not None and time.monotonic() + slowest > deadline:
                stop.request("deadline")
            if par is not None:  # every rank stops at the same step
                stop.agree(par)
            if (t.save_every and step % t.save_every == 0) or stop.requested or step == stage.steps:
                summary["checkpoint"] = _save(recipe, stage, optimizer, step, tokens, par, replanned)
            if stop.requested and step < stage.steps:
                summary.update(interrupted=True, stopped=stop.reason)
                break
    if not summary.get("interrupted"):  # when the last step ended at the deadline, no time is left to validate
        late = stop.reason == "deadline"
        summary["final_val_loss"] = None if late else _validate(stage, log, step)
    summary.update(stage.finish(completed=not summary.get("interrupted")))
    if bar is not None:
        bar.close()
    log.close()
    summary.update(steps=step, model=stage.model, log=log.path)
    return summary


def train_step(stage: Stage, optimizer, step: int, grad_clip: float, par=None):
    """One optimizer step: the stage's forward and backward, clipping, AdamW, then the stage's after-step work.
    Returns (the stage's output with its losses averaged over ranks, the gradient norm, the after-step keys)."""
    out = stage.train_step(step)
    distributed.reduce_partial_grads(stage.model, par)  # tensor parallelism: what ran on each rank's own tokens
    params = [p for p in stage.model.parameters() if p.grad is not None]
    grad_norm = distributed.clip_grad_norm_(params, grad_clip or math.inf, par)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if par is not None:
        names = sorted(out.losses)
        out.losses = dict(zip(names, (v / par.world_size for v in par.sum([out.losses[n] for n in names]))))
    return out, float(grad_norm), stage.after_step()


def _checkpoint_to_resume(out_dir: str, par) -> str | None:
    """The newest checkpoint of the run (after removing what a killed save left), or None."""
    if par is None or par.is_main:
        remove_unfinished_saves(out_dir)
    if par is not None:
        par.barrier()
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None and (par is None or par.is_main):
        print(f"nothing to resume in {out_dir}; starting from step 0", flush=True)
    if ckpt is not None and par is not None and not is_distributed_checkpoint(ckpt):
        raise ValueError(
            f"{ckpt} was written by a single-process run: resume it without torchrun, or start the "
            f"distributed run from its weights with model.init_from={ckpt}"
        )
    return ckpt


def _replan(step: int, paced_from: tuple[float, int], deadline: float, slowest: float, par) -> int:
    """`train.replan_at`: the step count that the pace since `paced_from` (time, step) fits before `deadline`, at least
    one step more than `step`. The deadline stops a run once the time left is less than its `slowest` step, so the
    last step must start with that much left; 2% more for steps slower than the pace. Under torchrun the ranks take
    the mean of their counts, so they agree."""
    now, (t0, s0) = time.monotonic(), paced_from
    pace = (now - t0) / max(1, step - s0)
    steps = step + 1 + max(0, int((0.98 * (deadline - now) - slowest) / pace))
    if par is not None:
        steps = int(par.sum([float(steps)])[0] / par.world_size)
    return steps


def _restore(ckpt: str | None, stage: Stage, optimizer, par) -> tuple[int, int, int | None]:
    """Load the optimizer, RNG and data position of `ckpt` (the stage built the model from it); (step, tokens, the
    step count a `train.replan_at` run was re-planned to, or None)."""
    if ckpt is None:
        return 0, 0, None
    if is_distributed_checkpoint(ckpt):
        state = load_distributed_checkpoint(ckpt, stage.model, optimizer, par)
    else:
        state, payload = load_trainer_state(ckpt)
        optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["torch_rng"])
    stage.load_state_dict(state["data"])
    return state["step"], state.get("tokens", 0), state.get("replanned_steps")


def _save(recipe, stage: Stage, optimizer, step: int, tokens: int, par, replanned: int | None = None) -> str:
    t = recipe.train
    state = {"data": stage.state_dict(), "tokens": tokens}
    if replanned is not None:
        state["replanned_steps"] = replanned
    if par is not None:
        return save_distributed_checkpoint(
            t.out_dir, step, stage.model, optimizer, state, recipe.to_yaml(), stage.tokenizer, par,
            keep_last=t.keep_last, keep_every=t.keep_every, consolidate=stage.consolidate,
        )  # fmt: skip
    return save_checkpoint(
        t.out_dir, step, stage.model, optimizer, state, recipe.to_yaml(), stage.tokenizer, keep_last=t.keep_last,
        keep_every=t.keep_every, save_model=stage.save_model,
    )  # fmt: skip


def _validate(stage: Stage, log, step: int) -> float | None:
    loss = stage.validate()
    if loss is not None:
        log.log({"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50))})
    return loss


@functools.cache
def _matmul_peak() -> float:
    """This machine's fp32 matmul peak (GFLOP/s), measured once per process when the recipe gives none."""
    return measure_matmul_peak(dtypes=(torch.float32,), rounds=1)["float32"]


def _progress(t, steps: int, start: int):
    if not t.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=start, desc=os.path.basename(os.path.normpath(t.out_dir)), unit="step")


class _NoLog:
    """Ranks other than 0 log nothing."""

    path = None

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class StopFlag:
    """Whether the loop stops after the current step, and why: the first of REASONS that was requested."""

    REASONS = ("signal", "deadline", "stop_after")

    def __init__(self):
        self.requested, self.reason = False, None

    def request(self, reason: str) -> None:
        self.requested = True
        if self.reason is None or self.REASONS.index(reason) < self.REASONS.index(self.reason):
            self.reason = reason

    def agree(self, par) -> None:
        """Collective: every rank stops if any rank would, for the most urgent reason any rank has."""
        votes = par.sum([float(self.reason == r) for r in self.REASONS])
        agreed = [r for r, v in zip(self.REASONS, votes) if v > 0]
        self.requested, self.reason = bool(agreed), (agreed[0] if agreed else None)


@contextlib.contextmanager
def stop_on_signals():
    """First SIGINT/SIGTERM: finish the step, checkpoint, return. A second SIGINT interrupts at once."""
    flag = StopFlag()
    previous = {}

    def handler(signum, frame):
        if flag.reason == "signal" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.request("signal")

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
            previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
