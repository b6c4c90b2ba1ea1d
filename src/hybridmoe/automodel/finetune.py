"""`hybridmoe finetune`: supervised fine-tuning of a Hugging Face MoE model through `hybridmoe.automodel`.

Read `finetune` top to bottom: load the tokenizer and pack the conversations (`data.sft`: chat template,
assistant-only loss, first-fit packing with conversation boundaries), load the model with this package's kernels
(optionally with LoRA on linears and experts), then per step: learning rate, gradient accumulation over
micro-batches with the loss normalized by the step's assistant tokens (a token mean over the global batch, Super's
first-stage SFT normalization), clipping, AdamW, logging; now and then an atomic checkpoint. A run stopped (SIGINT
/ SIGTERM finish the step and checkpoint) and resumed with `--resume` continues from the same data position with the
same optimizer and RNG state. The result, `OUT/final`, is a Hugging Face model directory plain transformers loads
(for LoRA: the merged model, and the PEFT adapter in `OUT/final/adapter`).

The optimizer, schedules, metrics log, checkpoint layout and signal handling are the pretraining trainer's
(`hybridmoe.train`). Under torchrun every rank trains on its rows of each global batch with FSDP2 and, with `ep`,
expert parallelism (`automodel.parallel`); checkpoints are then distributed (DCP) and `final/` is gathered on rank
0. The loss and the gradients are those of one process on the whole batch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import yaml

from .. import distributed
from ..data.sft import load_sft_samples
from ..dtypes import resolve_dtype
from ..train.config import OptimSection
from ..train.loop import stop_on_signals
from ..train.metrics import MetricsLog
from ..train.optim import lr_at, set_lr
from ..train.state import (
    is_distributed_checkpoint,
    latest_checkpoint,
    load_distributed_checkpoint,
    load_trainer_state,
    save_checkpoint,
    save_distributed_checkpoint,
)
from .patch import PATCHED_ATTR

_TRAIN_DTYPES = (torch.float32, torch.bfloat16)  # fp16 would need loss scaling


@dataclass
class FinetuneConfig:
    model: str  # a Hugging Face model directory (config, weights, tokenizer with a chat template)
    data: str  # messages JSONL
    out_dir: str = "runs/finetune"
    seq_len: int = 2048  # tokens per packed sample
    batch_size: int = 8  # packed samples per optimizer step
    micro_batch_size: int = 1  # samples per forward/backward
    epochs: float = 1.0
    steps: int | None = None  # overrides epochs
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    dtype: str = "bf16"  # fp32 | bf16 (weights and compute; AdamW state in the same dtype)
    lora: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_targets: list[str] | None = None  # module names (PEFT's target_modules); None: every linear layer
    lora_experts: bool = True  # grouped LoRA on the 3D expert weights too
    drop_long: bool = False  # leave out conversations longer than seq_len (reported) instead of failing
    ep: int = 1  # expert-parallel degree under torchrun (divides the world size and the experts)
    save_every: int = 100
    keep_last: int = 2
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if resolve_dtype(self.dtype) not in _TRAIN_DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: use fp32 or bf16")
        for name in ("seq_len", "batch_size", "micro_batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}"
            )
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"--model {self.model}: not a Hugging Face model directory (no config.json)")
        if not os.path.isfile(self.data):
            raise ValueError(f"--data {self.data}: no such file")


def finetune(cfg: FinetuneConfig, resume: bool = False) -> dict:
    """Run (or resume, from the newest checkpoint in cfg.out_dir). Returns a summary dict."""
    cfg.validate()
    owns_group = not torch.distributed.is_initialized()
    par = distributed.setup(ep=cfg.ep)  # None without torchrun
    try:
        return _finetune(cfg, resume, par)
    finally:
        if par is not None and owns_group:
            distributed.teardown()


def _finetune(cfg: FinetuneConfig, resume: bool, par) -> dict:
    from transformers import AutoTokenizer

    world = par.world_size if par is not None else 1
    if cfg.batch_size % (world * cfg.micro_batch_size):
        raise ValueError(
            f"batch_size={cfg.batch_size} must split into {world} ranks x micro-batches of {cfg.micro_batch_size}"
        )
    main = par is None or par.is_main
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    samples, report = load_sft_samples(cfg.data, tokenizer, cfg.seq_len, drop_long=cfg.drop_long, seed=cfg.seed)
    if main:
        print(f"finetune data: {report.summary()}", flush=True)
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(samples) / cfg.batch_size))
    ckpt = latest_checkpoint(cfg.out_dir) if resume else None
    if resume and ckpt is None and main:
        print(f"finetune: nothing to resume in {cfg.out_dir}; starting from step 0", flush=True)
    sharded_ckpt = ckpt is not None and is_distributed_checkpoint(ckpt)
    if ckpt is not None and par is not None and not sharded_ckpt:
        raise ValueError(f"{ckpt} is a one-process checkpoint; resume it without torchrun")

    torch.manual_seed(cfg.seed)  # the same initial adapters on every rank
    model = _build_model(cfg, None if sharded_ckpt else ckpt)
    if par is not None:
        from .parallel import parallelize

        parallelize(model, par)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
        fused=par is None and _fused_ok(params),
    )  # fmt: skip
    schedule = OptimSection(
        lr=cfg.lr, min_lr=cfg.min_lr, schedule="cosine", warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay
    )
    start, position = 0, 0  # optimizer steps done; samples consumed
    if sharded_ckpt:
        state = load_distributed_checkpoint(ckpt, model, optimizer, par)
        start, position = state["step"], state["samples_seen"]
    elif ckpt is not None:
        state, payload = load_trainer_state(ckpt)
        optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["torch_rng"])
        start, position = state["step"], state["samples_seen"]
    seq_idx = any(getattr(m, PATCHED_ATTR, ("", ""))[1] == "mamba2" for m in model.modules())

    log = MetricsLog(cfg.out_dir, tensorboard=False, resume_step=start if ckpt else None) if main else None
    bar = _progress(cfg, steps, start) if main else None
    rows = cfg.batch_size // world  # this rank's samples of each global batch
    summary = {"steps": start, "samples": len(samples), "data": report.summary(), "out_dir": cfg.out_dir}
    model.train()
    with stop_on_signals() as stop:
        for step in range(start, steps):
            lr = lr_at(step, steps, schedule)
            set_lr(optimizer, lr)
            t0 = time.perf_counter()
            batch = [samples[i] for i in _order(len(samples), position, cfg.batch_size, cfg.seed)]
            position += cfg.batch_size
            loss_tokens = sum(int((s["labels"][1:] != -100).sum()) for s in batch)
            if par is not None:
                batch = batch[par.rank * rows : (par.rank + 1) * rows]
            total = 0.0
            for i in range(0, rows, cfg.micro_batch_size):
                micro = {k: torch.stack([s[k] for s in batch[i : i + cfg.micro_batch_size]]) for k in batch[0]}
                # conversations apart: attention reads the restarting position_ids (without a cache), the Mamba
                # layers seq_idx
                extra = {"seq_idx": micro["document_ids"]} if seq_idx else {}
                out = model(
                    input_ids=micro["input_ids"], labels=micro["labels"], position_ids=micro["position_ids"],
                    # FSDP averages the ranks' gradients: each rank's sum over the global token count, times world
                    num_items_in_batch=max(1, loss_tokens) / world, use_cache=False, **extra,
                )  # fmt: skip
                out.loss.backward()
                total += float(out.loss.detach())
            if par is not None:
                total = par.sum([total])[0] / world
            grad_norm = distributed.clip_grad_norm_(
                [p for p in params if p.grad is not None], cfg.grad_clip or math.inf, par
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            record = {"step": step + 1, "loss": total, "lr": lr, "grad_norm": float(grad_norm),
                      "loss_tokens": loss_tokens, "tokens_per_s": cfg.batch_size * cfg.seq_len / seconds}  # fmt: skip
            if log is not None:
                log.log(record)
            if bar is not None:
                bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
            summary.update(steps=step + 1, loss=total)
            last = step + 1 == steps
            if par is not None:  # every rank stops at the same step
                stop.requested = par.sum([float(stop.requested)])[0] > 0
            if (step + 1) % cfg.save_every == 0 or last or stop.requested:
                _save(cfg, step + 1, position, model, optimizer, par)
            if stop.requested and not last:
                summary["stopped"] = True
                break
    if bar is not None:
        bar.close()
    if log is not None:
        log.close()
    if summary["steps"] == steps:
        summary["final"] = _save_final(cfg, model, tokenizer, par)
    return summary


def _build_model(cfg: FinetuneConfig, ckpt: str | None):
    from . import AutoModelForCausalLM

    dtype = resolve_dtype(cfg.dtype)
    if cfg.lora:
        from .lora import apply_lora, load_lora

        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
        if ckpt is not None:  # the adapters of the checkpoint (base weights frozen, adapters trainable)
            return load_lora(model, ckpt)
        targets = cfg.lora_targets if cfg.lora_targets is not None else "all-linear"
        return apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=targets, experts=cfg.lora_experts)
    return AutoModelForCausalLM.from_pretrained(ckpt or cfg.model, dtype=dtype)


def _order(n: int, position: int, count: int, seed: int) -> list[int]:
    """Sample indices position .. position + count - 1 of an endless sequence of epochs, each a seeded shuffle."""
    out = []
    for k in range(position, position + count):
        epoch, i = divmod(k, n)
        out.append(_epoch_order(n, seed + epoch)[i])
    return out


def _epoch_order(n: int, seed: int, _cache={}) -> list[int]:  # noqa: B006 (a per-process memo)
    if (n, seed) not in _cache:
        order = list(range(n))
        random.Random(seed).shuffle(order)
        _cache.clear()
        _cache[(n, seed)] = order
    return _cache[(n, seed)]


def _save(cfg: FinetuneConfig, step: int, position: int, model, optimizer, par=None) -> str:
    state = {"samples_seen": position}
    config_yaml = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
    if par is not None:  # every rank writes its shards (model, adapters included, and optimizer)
        return save_distributed_checkpoint(
            cfg.out_dir, step, model, optimizer, state, config_yaml, cfg.model, par, keep_last=cfg.keep_last,
            consolidate=False,
        )  # fmt: skip
    save_model = None
    if cfg.lora:
        from .lora import save_lora

        def save_model(directory):
            save_lora(model, directory)

    return save_checkpoint(
        cfg.out_dir, step, model, optimizer, state, config_yaml, cfg.model, keep_last=cfg.keep_last,
        save_model=save_model,
    )  # fmt: skip


def _save_final(cfg: FinetuneConfig, model, tokenizer, par=None) -> str:
    """OUT/final: the fine-tuned model as a plain Hugging Face directory (LoRA: merged; adapter in final/adapter).
    Under torchrun the full state dict is gathered and rank 0 writes it from an unsharded copy of the model."""
    import shutil
    import tempfile

    final = os.path.join(cfg.out_dir, "final")
    if par is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if par.is_main:
            whole = _build_model(cfg, None)
            whole.load_state_dict(full)
            _save_final(cfg, whole, tokenizer)
        par.barrier()
        return final
    tmp = tempfile.mkdtemp(prefix=".final.", dir=cfg.out_dir)
    try:
        if cfg.lora:
            from .lora import merge_lora, save_lora

            save_lora(model, os.path.join(tmp, "adapter"))
            model = merge_lora(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _fused_ok(params) -> bool:
    return all(p.device.type in ("cpu", "cuda") for p in params) and len({p.dtype for p in params}) == 1


def _progress(cfg: FinetuneConfig, steps: int, start: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=start, desc="finetune", unit="step")
