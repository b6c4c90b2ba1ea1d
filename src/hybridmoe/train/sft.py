"""Supervised fine-tuning (`hybridmoe sft RECIPE`; `hybridmoe finetune` is its alias for transformers models).

The SFT recipe of the Nemotron 3 Super technical report (NVIDIA, 2025): conversations rendered with the chat
template, the loss on assistant tokens only, packed first-fit into fixed-length samples with per-conversation ids
(`hybridmoe.data.sft`), and the two-stage loss normalization as `sft.loss_normalization`:
  - token (stage 1): the sum of the token losses over the GLOBAL batch (every micro-batch and rank) divided by its
    number of loss tokens;
  - conversation (stage 2): the mean over the global batch's conversations of each conversation's own token mean,
    so long answers stop dominating.
Both are per-token weights on the loss (`loss_weights` below), computed from the whole global batch before the
first micro-batch. The model is `model.source` native (`HybridMoEForCausalLM`, MTP layers trained with
`sft.mtp_loss_weight`, 0.3 as in the reference; packed conversations apart through `document_ids`) or
transformers (a Hugging Face MoE model through `hybridmoe.automodel`, optionally LoRA; conversations apart through
the restarting `position_ids` and, for Mamba layers, `seq_idx`), see `train.model`.

Per step: the next `data.batch_size * data.grad_accum` samples of an endless sequence of seeded epoch shuffles,
their loss weights, then forward and backward of each micro-batch (each rank its rows). Everything else (torchrun,
resume, stop, clip and step, logging, checkpoints) is the session's (`train.session`).
"""

from __future__ import annotations

import math
import os
import random

import torch

from ..accounting import flops_per_token
from ..data.sft import IGNORE_INDEX, load_sft_samples
from ..kernels.loss import weighted_cross_entropy
from .balance import balance_experts
from .config import SFTRecipe
from .model import (
    is_transformers,
    load_model,
    native_forward_backward,
    resolve_init,
    save_final,
    transformers_flops_per_token,
)
from .session import Stage, StepOutput, run


def sft(recipe: SFTRecipe, resume: bool = False, stop_after: int | None = None, peak_gflops: float | None = None):
    """Run (or resume) an SFT recipe; the summary of `session.run` (plus `samples`, `data` and, for a
    transformers model, `final`: the plain Hugging Face directory written at the end)."""
    return run(recipe, SFTStage, resume=resume, stop_after=stop_after, peak_gflops=peak_gflops)


class SFTStage(Stage):
    def __init__(self, recipe: SFTRecipe, ckpt: str | None, par):
        from ..data.tokenizer import load_tokenizer

        d = recipe.data
        self.recipe, self.par = recipe, par
        if par is not None and par.tp > 1:  # its batches split over all ranks; tensor parallelism is pretraining's
            raise ValueError(f"parallel.tp={par.tp}: the SFT stage runs with parallel.tp=1 so far")
        if par is not None and par.cp > 1:
            raise ValueError(f"parallel.cp={par.cp}: the SFT stage runs with parallel.cp=1 so far")
        self.world = par.world_size if par is not None else 1
        if d.batch_size % self.world:
            raise ValueError(
                f"data.batch_size={d.batch_size} packed samples per micro-batch cannot be split evenly over "
                f"{self.world} processes: make it a multiple of the number of processes"
            )
        self.transformers = is_transformers(recipe)
        self.tokenizer = d.tokenizer or resolve_init(recipe.model.init_from)
        if self.tokenizer is None:
            raise ValueError("data.tokenizer: give a tokenizer directory with a chat template (or model.init_from)")
        self.tok = load_tokenizer(self.tokenizer)
        self.samples, self.report = load_samples(recipe, self.tok, main=par is None or par.is_main)
        if par is None or par.is_main:
            print(f"sft data: {self.report.summary()}", flush=True)
        global_batch = d.batch_size * d.grad_accum
        self.steps = recipe.train.steps
        if d.epochs is not None:
            self.steps = max(1, math.ceil(d.epochs * len(self.samples) / global_batch))
        self.model = load_model(recipe, ckpt, par)
        if not self.transformers and len(self.tok) > self.model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(self.tok)} tokens but the model has vocab_size={self.model.config.vocab_size}"
            )
        self.consolidate = not self.transformers and recipe.parallel.consolidate
        self.seq_idx = self.transformers and _has_patched_mamba(self.model)
        self.position = 0  # samples consumed
        seq_len = d.seq_len
        if self.transformers:
            self.flops = transformers_flops_per_token(self.model, seq_len)
        else:
            self.flops = flops_per_token(self.model.config, seq_len)

    def train_step(self, step: int) -> StepOutput:
        d = self.recipe.data
        batch = [self.samples[i] for i in epoch_order(len(self.samples), self.position, d.batch_size * d.grad_accum,
                                                      self.recipe.train.seed)]  # fmt: skip
        self.position += len(batch)
        weights = loss_weights(batch, self.recipe.sft.loss_normalization)
        loss_tokens = sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in batch)
        micro = []
        for i in range(0, len(batch), d.batch_size):
            rows = {k: torch.stack([s[k] for s in batch[i : i + d.batch_size]]) for k in batch[0]}
            rows["loss_weights"] = torch.stack(weights[i : i + d.batch_size])
            if self.par is not None:
                rows = {k: v.to(self.par.device) for k, v in self.par.local_rows(rows).items()}
            micro.append(rows)
        if self.transformers:
            losses = self._transformers_forward_backward(micro, loss_tokens)
        else:
            scale = self.world * d.grad_accum  # FSDP averages the ranks' gradients; the session divides by accum
            for rows in micro:
                rows["loss_weights"] = rows["loss_weights"] * scale
            losses = native_forward_backward(self.model, micro, self.recipe.train.precision)
        padding = sum(_padding(s) for s in batch) / (len(batch) * d.seq_len)
        extra = {"loss_tokens": loss_tokens, "padding": padding}
        return StepOutput(losses, len(batch) * d.seq_len, self.flops, extra)

    def _transformers_forward_backward(self, micro: list[dict], loss_tokens: int) -> dict[str, float]:
        """A transformers model: with token normalization through its own loss (`num_items_in_batch`: the sum
        over this rank's tokens divided by the global count, times the number of ranks, since FSDP averages the
        ranks' gradients); per conversation, from the logits with the weights."""
        total = 0.0
        for rows in micro:
            extra = {"seq_idx": rows["document_ids"]} if self.seq_idx else {}
            if self.recipe.sft.loss_normalization == "token":
                out = self.model(
                    input_ids=rows["input_ids"], labels=rows["labels"], position_ids=rows["position_ids"],
                    num_items_in_batch=max(1, loss_tokens) / self.world, use_cache=False, **extra,
                )  # fmt: skip
                loss = out.loss
            elif getattr(self.model, "_hybridmoe_fused_loss", False):  # patch_model's forward takes the weights
                out = self.model(
                    input_ids=rows["input_ids"], labels=rows["labels"], loss_weights=rows["loss_weights"],
                    position_ids=rows["position_ids"], use_cache=False, **extra,
                )  # fmt: skip
                loss = out.loss * self.world
            else:  # the (b, t, v) logits are formed: transformers' loss takes no per-token weights
                out = self.model(input_ids=rows["input_ids"], position_ids=rows["position_ids"], use_cache=False,
                                 **extra)  # fmt: skip
                logits, y = out.logits[:, :-1], rows["labels"][:, 1:]
                loss = weighted_cross_entropy(logits.flatten(0, 1), y.flatten(), rows["loss_weights"][:, 1:].flatten())
                loss = loss * self.world
            loss.backward()
            total += float(loss.detach())
        return {"loss": total}

    def after_step(self) -> dict:
        if self.transformers:
            return {}
        return {"expert_imbalance": balance_experts(self.model, self.recipe.balance.bias_update_rate)}

    def save_model(self, directory: str) -> None:
        if self.recipe.model.lora is not None:
            from ..automodel import save_lora

            save_lora(self.model, directory)
        else:
            self.model.save_pretrained(directory)

    def finish(self, completed: bool) -> dict:
        out = {"samples": len(self.samples), "data": self.report.summary()}
        if completed and self.transformers:
            out["final"] = save_final(self.recipe, self.model, self.tok, self.recipe.train.out_dir, self.par)
        return out

    def state_dict(self) -> dict:
        return {"samples_seen": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["samples_seen"]


def loss_weights(batch: list[dict], normalization: str) -> list[torch.Tensor]:
    """Per-token loss weights of a global batch of packed samples, aligned with the labels (a label is a target
    when it is not -100 and not at position 0, which nothing predicts), such that the weighted sum of the token
    losses over the whole batch is its loss: token: 1 / N for every target (N targets in the batch);
    conversation: 1 / (C * n_c) for a target of conversation c (n_c targets; C conversations with a target)."""
    targets = []
    for s in batch:
        t = s["labels"] != IGNORE_INDEX
        t[0] = False
        targets.append(t)
    if normalization == "token":
        n = max(1, sum(int(t.sum()) for t in targets))
        return [t.float() / n for t in targets]
    per_token, conversations = [], 0
    for s, t in zip(batch, targets):
        docs = s["document_ids"]
        counts = torch.zeros(int(docs.max()) + 1).index_add_(0, docs, t.float())  # targets per conversation
        conversations += int((counts > 0).sum())
        per_token.append(counts[docs])
    return [torch.where(t, 1.0 / (n_c.clamp(min=1) * max(1, conversations)), 0.0) for t, n_c in
            zip(targets, per_token)]  # fmt: skip


def _padding(sample: dict) -> int:
    """Padding tokens of a packed sample: the packer puts them last, under their own document id, with no target
    (every conversation has one: an assistant message)."""
    last = sample["document_ids"] == sample["document_ids"][-1]
    return int(last.sum()) if bool((sample["labels"][last] == IGNORE_INDEX).all()) else 0


def _has_patched_mamba(model) -> bool:
    """nemotron_h's Mamba layers (through transformers) keep packed conversations apart by `seq_idx`."""
    from ..automodel.patch import PATCHED_ATTR

    return any(getattr(m, PATCHED_ATTR, ("", ""))[1] == "mamba2" for m in model.modules())


def epoch_order(n: int, position: int, count: int, seed: int) -> list[int]:
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


# ---------------------------------------------------------------------------------------------- data


def load_samples(recipe: SFTRecipe, tokenizer, main: bool = True):
    """`data.sft.load_sft_samples` with the recipe's data keys; bad records are listed in
    train.out_dir/bad_records.jsonl (written by rank 0)."""
    d, s = recipe.data, recipe.sft
    kwargs = {}
    if main:
        os.makedirs(recipe.train.out_dir, exist_ok=True)
        kwargs["bad_records_path"] = os.path.join(recipe.train.out_dir, "bad_records.jsonl")
    if d.max_bad_fraction is not None:
        kwargs["max_bad_fraction"] = d.max_bad_fraction
    data = next(iter(d.datasets)) if len(d.datasets) == 1 else dict(d.datasets)  # one file: a weight means nothing
    return load_sft_samples(
        data, tokenizer, d.seq_len, seed=recipe.train.seed, drop_long=d.drop_long,
        reasoning_off_fraction=s.reasoning_off_fraction, reasoning_truncate_fraction=s.reasoning_truncate_fraction,
        reasoning_truncate_tokens=s.reasoning_truncate_tokens, **kwargs,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- finetune alias


def finetune_recipe(
    model: str,
    data: str,
    out_dir: str = "runs/finetune",
    seq_len: int = 2048,
    batch_size: int = 8,
    micro_batch_size: int = 1,
    epochs: float = 1.0,
    steps: int | None = None,
    lr: float = 1e-5,
    warmup_steps: int = 0,
    dtype: str = "bf16",
    lora: bool = False,
    lora_r: int = 16,
    lora_alpha: float = 32.0,
    lora_targets: list[str] | None = None,
    lora_experts: bool = True,
    drop_long: bool = False,
    save_every: int = 100,
    seed: int = 0,
    ep: int = 1,
    progress: bool = True,
    world_size: int | None = None,
) -> SFTRecipe:
    """`hybridmoe finetune`'s flags as an SFT recipe with model.source=transformers: `batch_size` packed samples
    per optimizer step over all processes, `micro_batch_size` per forward on each; a cosine schedule to 0, no
    weight decay, AdamW (0.9, 0.95), token normalization (as `hybridmoe finetune` always had)."""
    from ..dtypes import resolve_dtype

    world = world_size or int(os.environ.get("WORLD_SIZE", 1))
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(resolve_dtype(dtype))
    if precision is None:
        raise ValueError(f"dtype={dtype!r}: use fp32 or bf16")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("micro_batch_size", micro_batch_size),
                        ("save_every", save_every)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{name}={value}: must be >= 1")
    if steps is not None and steps < 1:
        raise ValueError(f"steps={steps}: must be >= 1, or None to train `epochs` epochs")
    if batch_size % micro_batch_size:
        raise ValueError(f"batch_size={batch_size} is not a multiple of micro_batch_size={micro_batch_size}")
    if batch_size % (world * micro_batch_size):
        raise ValueError(f"batch_size={batch_size} must split into {world} ranks x micro-batches of {micro_batch_size}")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"--model {model}: not a Hugging Face model directory (no config.json)")
    if not os.path.isfile(data):
        raise ValueError(f"--data {data}: no such file")
    lora_section = {"r": lora_r, "alpha": lora_alpha, "targets": lora_targets, "experts": lora_experts}
    return SFTRecipe.from_dict(
        {
            "model": {"source": "transformers", "init_from": model, "lora": lora_section if lora else None},
            "data": {
                "datasets": {data: 1.0}, "tokenizer": model, "seq_len": seq_len, "batch_size": micro_batch_size * world,
                "grad_accum": batch_size // (micro_batch_size * world), "epochs": None if steps else epochs,
                "drop_long": drop_long,
            },
            "sft": {"loss_normalization": "token"},
            "optim": {"lr": lr, "min_lr": 0.0, "schedule": "cosine", "warmup_steps": warmup_steps, "weight_decay": 0.0},
            "train": {
                "steps": steps or 1, "precision": precision, "seed": seed, "out_dir": out_dir, "save_every": save_every,
                "tensorboard": False, "progress": progress,
            },
            "parallel": {"ep": ep, "consolidate": False},
        }
    )  # fmt: skip
