"""The training loop: one function every training stage runs (pretraining, its second phase, long context).

Read `train` top to bottom: build (or resume) the model, optimizer and data streams, then per step: set the
learning rate, accumulate gradients over micro-batches, clip, step AdamW, update the MoE expert biases, log; now
and then validate and checkpoint. Everything a resumed run needs (weights, optimizer, data position, RNG) is in
the checkpoint, so a run stopped at step N and resumed logs the same losses as one that never stopped. SIGINT or
SIGTERM finishes the current step, writes a checkpoint and returns; so does `train.time_limit_s` when the next step
would end past it (the summary's `stopped` says which).

Under torchrun the same loop runs on every rank (`hybridmoe.distributed`): the model is sharded with FSDP2 and
expert parallelism after it is built, every rank trains on its rows of the same global batch, losses and the
stop signal are agreed across ranks, and checkpoints are distributed (DCP). Rank 0 alone logs.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time

import torch

from .. import distributed
from ..accounting import flops_per_token, measure_matmul_peak
from ..config import HybridMoEConfig
from ..modeling import HybridMoEForCausalLM
from .balance import balance_experts
from .config import Recipe
from .data import Streams
from .metrics import MetricsLog
from .optim import build_optimizer, lr_at, set_lr
from .state import (
    is_distributed_checkpoint,
    latest_checkpoint,
    load_distributed_checkpoint,
    load_trainer_state,
    remove_unfinished_saves,
    save_checkpoint,
    save_distributed_checkpoint,
)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "autocast-bf16": torch.float32}


def train(recipe: Recipe, resume: bool = False, stop_after: int | None = None, peak_gflops: float | None = None):
    """Run (or resume, from the newest checkpoint in train.out_dir) the recipe. `stop_after`: return after this
    many steps of this call, with a checkpoint. Returns a summary dict; when the run stopped before its last step
    it holds `interrupted` and `stopped`: "signal", "deadline" (train.time_limit_s) or "stop_after"."""
    recipe.validate()
    owns_group = not torch.distributed.is_initialized()
    par = distributed.setup(recipe.parallel.ep)
    try:
        return _train(recipe, par, resume, stop_after, peak_gflops)
    finally:
        if par is not None and owns_group:
            distributed.teardown()


def _train(recipe: Recipe, par, resume: bool, stop_after: int | None, peak_gflops: float | None):
    t = recipe.train
    main = par is None or par.is_main
    # The time limit counts from here on every rank (under torchrun the ranks agree on the step to stop at).
    deadline = time.monotonic() + t.time_limit_s if t.time_limit_s is not None else None
    torch.manual_seed(t.seed)
    if resume and main:
        remove_unfinished_saves(t.out_dir)
    ckpt = latest_checkpoint(t.out_dir) if resume else None
    model = build_model(recipe, ckpt)
    if par is not None:
        model.to(par.device)  # a GPU per rank under torchrun with NCCL; a no-op on CPU
        distributed.parallelize(model, par, recipe.parallel.reshard_after_forward)
    optimizer = build_optimizer(model, recipe.optim, fused=par is None)
    streams = Streams(recipe, model.config)
    step = 0
    if ckpt is not None and is_distributed_checkpoint(ckpt):
        state = load_distributed_checkpoint(ckpt, model, optimizer, par)
        streams.load_state_dict(state["data"])
        step = state["step"]
    elif ckpt is not None:
        if par is not None:
            raise ValueError(
                f"{ckpt} was written by a single-process run: resume it without torchrun, or start the "
                f"distributed run from its weights with model.init_from={ckpt}"
            )
        state, payload = load_trainer_state(ckpt)
        optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["torch_rng"])
        streams.load_state_dict(state["data"])
        step = state["step"]
    log = MetricsLog(t.out_dir, t.tensorboard, resume_step=step if ckpt is not None else None) if main else _NoLog()
    peak = peak_gflops or t.peak_gflops or measure_matmul_peak(dtypes=(torch.float32,), rounds=1)["float32"]
    world = par.world_size if par is not None else 1
    bar = _progress(t, step) if main else None
    summary = {"start_step": step, "resumed_from": ckpt, "peak_gflops": peak}
    if step == 0:
        summary["initial_val_loss"] = _validate(model, streams, recipe, log, step, par)

    slowest = 0.0  # seconds of the slowest step of this call: what the next one may take
    with stop_on_signals() as stop:
        while step < t.steps:
            stream = streams.for_step(step)
            lr = lr_at(step, t.steps, recipe.optim)
            set_lr(optimizer, lr)
            t0 = time.monotonic()
            losses = train_step(model, optimizer, stream, recipe, par)
            imbalance = balance_experts(model, recipe.balance.bias_update_rate)
            seconds = time.monotonic() - t0
            slowest = max(slowest, seconds)
            step += 1
            tokens_per_s = stream.tokens_per_step / seconds
            record = {
                "step": step,
                **losses,
                "lr": lr,
                "tokens": streams.tokens_seen(),
                "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * flops_per_token(model.config, stream.seq_len) / (peak * 1e9 * world),
                "expert_imbalance": imbalance,
                "seq_len": stream.seq_len,
                "phase": stream.phase,
                "step_s": seconds,
            }
            if step % t.log_every == 0 or step == t.steps:
                log.log(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_s:.0f}")
            if t.val_every and step % t.val_every == 0 and step < t.steps:
                _validate(model, streams, recipe, log, step, par)
            if stop_after is not None and step - summary["start_step"] >= stop_after:
                stop.request("stop_after")
            if deadline is not None and time.monotonic() + slowest > deadline:
                stop.request("deadline")
            if par is not None:  # every rank stops at the same step
                stop.agree(par)
            if (t.save_every and step % t.save_every == 0) or stop.requested or step == t.steps:
                summary["checkpoint"] = _save(t, step, model, optimizer, streams, recipe, par)
            if stop.requested and step < t.steps:
                summary.update(interrupted=True, stopped=stop.reason)
                break
    if not summary.get("interrupted"):  # when the last step ended at the deadline, no time is left to validate
        late = stop.reason == "deadline"
        summary["final_val_loss"] = None if late else _validate(model, streams, recipe, log, step, par)
    if bar is not None:
        bar.close()
    log.close()
    summary.update(steps=step, model=model, log=log.path)
    return summary


def train_step(model, optimizer, stream, recipe: Recipe, par=None) -> dict[str, float]:
    """One optimizer step over `grad_accum` micro-batches; returns the mean losses and the gradient norm.
    Under torchrun each rank trains on its rows of the global batch and the losses are averaged over ranks."""
    accum = recipe.data.grad_accum
    autocast = (
        torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)
        if recipe.train.precision == "autocast-bf16"
        else contextlib.nullcontext()
    )
    sums: dict[str, float] = {}
    for _ in range(accum):
        batch = stream.next_batch()
        if par is not None:
            batch = _to(par.local_rows(batch), par.device)
        with autocast:
            out = model(
                batch["input_ids"],
                labels=batch["labels"],
                document_ids=batch["document_ids"] if recipe.data.document_masking else None,
                return_logits=False,
            )
        (out.loss / accum).backward()
        for name in ("loss", "lm_loss", "mtp_loss", "aux_loss"):
            value = getattr(out, name)
            if value is not None:
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / accum
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = distributed.clip_grad_norm_(params, recipe.optim.grad_clip or math.inf, par)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if par is not None:
        names = sorted(sums)
        sums = dict(zip(names, (v / par.world_size for v in par.sum([sums[n] for n in names]))))
    return {**sums, "grad_norm": float(grad_norm)}


def build_model(recipe: Recipe, ckpt: str | None) -> HybridMoEForCausalLM:
    """From a checkpoint being resumed, else from `model.init_from`, else a fresh init of the preset."""
    m = recipe.model
    dtype = _DTYPES[recipe.train.precision]
    source = ckpt or _resolve_init(m.init_from)
    if source is not None and not os.path.exists(os.path.join(source, "config.json")):
        raise ValueError(f"{source} has no config.json: not a model directory")
    if ckpt is not None and is_distributed_checkpoint(ckpt):
        # the weights come from the DCP shards after sharding (the directory may hold no full copy)
        model = HybridMoEForCausalLM(HybridMoEConfig.from_pretrained(ckpt), dtype=dtype)
    elif source is not None:
        model = HybridMoEForCausalLM.from_pretrained(source, dtype=dtype)
        if m.overrides:  # e.g. a loss weight changed for this stage; shapes must not change
            model.config = model.config.replace(**m.overrides)
    else:
        config = HybridMoEConfig.from_preset(m.preset, **m.overrides)
        if "router_aux_loss_coef" not in m.overrides:
            config = config.replace(router_aux_loss_coef=recipe.balance.aux_loss_coef)
        model = HybridMoEForCausalLM(config, dtype=dtype)
    model.backbone.gradient_checkpointing = recipe.train.activation_checkpointing
    model.train()
    return model


def _resolve_init(path: str | None) -> str | None:
    """`model.init_from` may name a model directory or a run directory (its newest checkpoint is used)."""
    if path is None or os.path.exists(os.path.join(path, "config.json")):
        return path
    newest = latest_checkpoint(path)
    if newest is None:
        raise ValueError(f"model.init_from={path!r} is neither a model directory nor a run with checkpoints")
    return newest


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


def _validate(model, streams, recipe, log, step, par=None) -> float | None:
    batches = streams.validation_batches(recipe.train.val_batches)
    if not batches:
        return None
    loss = evaluate(model, batches, par)
    log.log({"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50))})
    return loss


def _save(t, step, model, optimizer, streams, recipe, par) -> str:
    state = {"data": streams.state_dict(), "tokens": streams.tokens_seen()}
    if par is not None:
        return save_distributed_checkpoint(
            t.out_dir, step, model, optimizer, state, recipe.to_yaml(), recipe.data.tokenizer, par,
            keep_last=t.keep_last, consolidate=recipe.parallel.consolidate,
        )  # fmt: skip
    return save_checkpoint(
        t.out_dir, step, model, optimizer, state, recipe.to_yaml(), recipe.data.tokenizer, keep_last=t.keep_last
    )


def _progress(t, start):
    if not t.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=t.steps, initial=start, desc=os.path.basename(os.path.normpath(t.out_dir)), unit="step")


class _NoLog:
    """Ranks other than 0 log nothing."""

    path = None

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _StopFlag:
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
    flag = _StopFlag()
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
