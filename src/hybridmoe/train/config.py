"""Training recipes: typed sections read from YAML, overridden on the command line with the same key paths.

`Recipe` (pretraining and long context, `hybridmoe pretrain`):
    model:    preset + overrides (any HybridMoEConfig field), or init_from: a checkpoint to continue from
    data:     tokenizer, curriculum phases (a blend of prepared datasets each), sequence length(s), batch size
    optim:    AdamW and the learning-rate schedule (warmup-stable-decay with minus-sqrt decay by default)
    balance:  MoE load balancing (aux-loss-free bias update rate, sequence-level aux loss coefficient)
    train:    steps, a time limit, precision, checkpointing, logging, validation, where to write
    parallel: under torchrun: tensor- and expert-parallel degrees, mixed precision, FSDP2 resharding, consolidation
    precision: low-precision GEMMs on top of train.precision: recipe none | nvfp4 (the Nemotron 3 NVFP4 recipe,
              emulated, `hybridmoe.quant.training`) with its ablation switches and precision policy

`SFTRecipe` (supervised fine-tuning, `hybridmoe sft`) shares optim, balance, train, parallel and precision, and has
    model:    source native (a preset, or init_from a checkpoint / run directory) or transformers (init_from a
              Hugging Face MoE model directory, loaded through `hybridmoe.automodel`, optionally with `lora`)
    data:     conversation files with blend weights, tokenizer, packed sequence length, batch size
    sft:      loss normalization (token | conversation), MTP loss weight, reasoning-control augmentation

Pretraining defaults follow the Nemotron 3 recipe (the Nemotron 3 Nano and Super technical reports, NVIDIA, 2025):
AdamW (0.9, 0.95), eps 1e-8, weight decay 0.1, grad clip 1.0, WSD with minus-sqrt decay, bias update rate 1e-3,
aux loss 1e-4. SFT defaults follow Super's SFT: LR 1e-5, AdamW (0.9, 0.95), weight decay 0.1, MTP loss weight 0.3,
and the two-stage loss normalization (a token mean over the global batch, then a per-conversation mean).

`RLRecipe` (GRPO, `hybridmoe rl`) shares optim, balance, train, parallel and precision, and has
    model:    init_from (the SFT checkpoint or run directory) and the tokenizer
    envs:     environments with their share of every batch, difficulty, reasoning, the training-seed pools
    rl:       groups, batch, sampling, advantages, clipping, importance correction, KL, router freezing, the
              pass-rate filter, staleness and the rollout source (sync | async), packing
`DistillRecipe` (multi-teacher on-policy distillation, `hybridmoe distill`) is RLRecipe plus
    distill:  teachers per environment and a default, the advantage's weights (reverse KL and outcome reward), the
              log-ratio clip, the optional warm-up SFT on teacher samples
RL defaults follow the Nemotron 3 RLVR recipe (the Nemotron 3 Super technical report, NVIDIA, 2025, with NeMo-RL's
GRPO): 16 samples per prompt, clip 0.2 / 0.28, TIS [0.2, 5], KL 0, router frozen, constant LR 3e-6.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class ModelSection:
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # a checkpoint directory (HF layout) to start from instead of a fresh init


@dataclass
class PhaseSection:
    datasets: dict[str, float] = field(default_factory=dict)  # prepared directory -> weight
    until: float | None = None  # fraction of the stage's tokens after which the next phase starts


@dataclass
class SeqMixSection:
    """One sequence length of a long-context stage and the fraction of steps that use it."""

    seq_len: int = 4096
    batch_size: int = 1
    fraction: float = 1.0
    phases: list[PhaseSection] | None = None  # its own data; None: the stage's phases


@dataclass
class DataSection:
    tokenizer: str | None = None  # HF tokenizer directory, copied into every checkpoint
    phases: list[PhaseSection] = field(default_factory=list)
    seq_len: int = 1024
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1
    val_fraction: float = 0.01
    document_masking: bool = False  # pass document ids: no Mamba state or attention across documents
    seq_mix: list[SeqMixSection] = field(default_factory=list)  # long context: several lengths, by fraction of steps
    verify: bool = True  # check each shard's sha256 against its manifest when a dataset is opened (reads every byte)


@dataclass
class OptimSection:
    lr: float = 1e-3
    min_lr: float = 1e-5
    schedule: str = "wsd-sqrt"  # wsd-sqrt | wsd-cosine | cosine | constant
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass
class BalanceSection:
    bias_update_rate: float = 1e-3  # aux-loss-free expert-bias update per optimizer step (0 disables)
    aux_loss_coef: float = 1e-4  # sequence-level balancing loss (0 disables)


@dataclass
class TrainSection:
    steps: int = 100
    precision: str = "fp32"  # fp32 | bf16 (bf16 weights) | autocast-bf16 (fp32 weights, bf16 autocast)
    activation_checkpointing: bool = False
    # torch.compile each layer block of a native model (pretrain, sft; `train.model.compile_blocks`): on GPUs Inductor
    # fuses the elementwise work of the Mamba scan, norms and routing into a few kernels; on this CPU it only adds
    # compile time. Off by default.
    compile: bool = False
    seed: int = 0
    out_dir: str = "runs/run"
    log_every: int = 1
    val_every: int = 0  # 0: only at the end
    val_batches: int = 8
    save_every: int = 0  # 0: only at the end (and on interruption)
    keep_last: int = 2
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none beyond keep_last)
    tensorboard: bool = True  # when the tensorboard package is installed
    progress: bool = True
    peak_gflops: float | None = None  # matmul peak per process for MFU; None: measured at the start
    # Stop (with a checkpoint, like Ctrl-C) before a step would end more than this many seconds after the start of
    # this run or resume; None: no limit. At least one step runs.
    time_limit_s: float | None = None
    # With time_limit_s: at this step of a run that starts before it, set the run's step count (and so the
    # learning-rate schedule's length) to the steps the pace since the first step fits before the time limit, so that
    # a schedule planned from a guess of the step time still ends decayed instead of cut. 0: off. Not in
    # pretraining, whose data blend is laid out over train.steps.
    replan_at: int = 0


@dataclass
class ParallelSection:
    """Used only under torchrun (`hybridmoe.distributed`): tensor parallel over `tp` processes, data parallel with
    FSDP2 over the processes / tp, routed experts split over `ep` of those."""

    ep: int = 1  # expert-parallel degree; must divide the processes / tp and the number of routed experts
    tp: int = 1  # tensor (+ sequence) parallel degree, native models; must divide the processes and the heads
    cp: int = 1  # context parallel degree (each rank one shard of every sequence), native pretraining; divides seq_len
    pp: int = 1  # pipeline stages (pretraining): the layers split by count, a 1F1B schedule over micro-batches
    microbatches: int | None = None  # pipeline micro-batches per batch (>= pp; None: pp); must divide rows / dp
    pp_split_points: list[int] | None = None  # the first layer of each stage after the first; None: even split
    mixed_precision: str | None = None  # bf16: fp32 master weights, bf16 compute (FSDP2); needs train.precision fp32
    reshard_after_forward: bool = True  # FSDP2: free gathered weights after forward (ZeRO-3) or keep them (ZeRO-2)
    consolidate: bool = True  # also write the full model in the HF layout (gathered on rank 0) in each checkpoint


@dataclass
class PrecisionSection:
    """Emulated low-precision GEMMs (`hybridmoe.quant.training`), on top of train.precision (the reference trains
    NVFP4 with fp32 master weights and bf16 elsewhere: autocast-bf16). recipe none changes nothing; nvfp4 runs the
    Nemotron 3 NVFP4 recipe with its precision policy. Native models only."""

    recipe: str = "none"  # none | nvfp4
    rht: bool = True  # random Hadamard transform on the weight-gradient GEMM's operands
    stochastic_rounding: bool = True  # gradients rounded stochastically
    weight_2d: bool = True  # weights in 16x16 blocks (off: 1x16 along each GEMM's reduction dim)
    bf16_tail_fraction: float = 0.15  # the last round(fraction * layers) layers stay at the base precision
    mamba_out_proj: str = "mxfp8"  # mxfp8 | nvfp4 | bf16

    def policy(self):
        """The `hybridmoe.quant.training.PrecisionPolicy` of this section (ValueError on a bad value)."""
        from ..quant.training import PrecisionPolicy

        return PrecisionPolicy(**dataclasses.asdict(self))


class _RecipeFile:
    """Reading and writing a recipe class (a dataclass of sections)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        return _build(cls, d or {}, "recipe")

    @classmethod
    def from_yaml(cls, path: str, overrides: list[str] | None = None):
        try:
            with open(path) as fh:
                d = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ValueError(f"recipe {path}: no such file (the recipes/ folder holds one per stage)") from None
        except yaml.YAMLError as e:
            raise ValueError(f"recipe {path} is not valid YAML: {e}") from None
        if not isinstance(d, dict):
            sections = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ValueError(f"{path}: a recipe is a YAML mapping of sections ({sections})")
        for item in overrides or []:
            apply_override(d, item)
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@dataclass
class Recipe(_RecipeFile):
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    balance: BalanceSection = field(default_factory=BalanceSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)

    def validate(self) -> None:
        d = self.data
        _validate_common(self.optim, self.train, d)
        _validate_parallel(self.parallel, self.train)
        self.precision.policy()
        if self.train.replan_at:
            raise ValueError("train.replan_at is for SFT, RL and MOPD: pretraining's data blend is laid out over "
                             "train.steps, so its step count cannot change mid-run; set train.replan_at=0")  # fmt: skip
        if not d.phases and not any(m.phases for m in d.seq_mix):
            raise ValueError("data.phases is empty: give at least one phase with a blend of prepared datasets")
        if d.seq_mix and abs(sum(m.fraction for m in d.seq_mix) - 1) > 1e-6:
            raise ValueError("data.seq_mix fractions must sum to 1")


def _validate_parallel(p: ParallelSection, t: TrainSection) -> None:
    if p.pp < 1 or (p.microbatches is not None and p.microbatches < p.pp):
        raise ValueError(
            f"parallel.pp={p.pp}, parallel.microbatches={p.microbatches}: pp must be >= 1 and the 1F1B schedule needs "
            f"at least pp micro-batches"
        )
    if p.mixed_precision not in (None, "bf16"):
        raise ValueError(f"parallel.mixed_precision={p.mixed_precision!r}: use bf16, or null for none")
    if p.mixed_precision is not None and t.precision != "fp32":
        raise ValueError(
            f"parallel.mixed_precision={p.mixed_precision} keeps fp32 master weights and computes in bf16: set "
            f"train.precision=fp32 (got {t.precision!r})"
        )


def _validate_common(o: OptimSection, t: TrainSection, d=None) -> None:
    """The checks every stage's recipe shares (optim, train, and the data section's batch keys when it has one)."""
    if o.schedule not in ("wsd-sqrt", "wsd-cosine", "cosine", "constant"):
        raise ValueError(f"optim.schedule={o.schedule!r}: use wsd-sqrt, wsd-cosine, cosine or constant")
    if t.precision not in ("fp32", "bf16", "autocast-bf16"):
        raise ValueError(f"train.precision={t.precision!r}: use fp32, bf16 or autocast-bf16")
    if t.steps < 1:
        raise ValueError(f"train.steps={t.steps} must be >= 1")
    if t.keep_last < 0 or t.keep_every < 0:
        raise ValueError(f"train.keep_last={t.keep_last}, train.keep_every={t.keep_every}: must be >= 0 (keep_last 0: "
                         "keep every checkpoint; keep_every 0: none beyond the last keep_last)")  # fmt: skip
    if d is not None and (d.batch_size < 1 or d.grad_accum < 1 or d.seq_len < 2):
        raise ValueError("data.batch_size, data.grad_accum must be >= 1 and data.seq_len >= 2")
    if not 0 <= o.decay_fraction <= 1 or o.warmup_steps < 0:
        raise ValueError("optim.decay_fraction must be in [0, 1] and optim.warmup_steps >= 0")
    if t.time_limit_s is not None and not t.time_limit_s > 0:
        raise ValueError(f"train.time_limit_s={t.time_limit_s}: give a positive number of seconds, or null")
    if t.replan_at < 0 or t.replan_at == 1:
        raise ValueError(f"train.replan_at={t.replan_at}: give the step to re-plan at (>= 2: the pace is measured from "
                         "the end of the first step), or 0 for none")  # fmt: skip
    if not o.lr > 0 or o.min_lr < 0:
        raise ValueError(f"optim.lr={o.lr} must be > 0 and optim.min_lr={o.min_lr} >= 0")
    if o.min_lr > o.lr:
        raise ValueError(f"optim.min_lr={o.min_lr} is above optim.lr={o.lr}")


# ---------------------------------------------------------------------------------------------- SFT


@dataclass
class LoraSection:
    """LoRA adapters on a transformers model (`hybridmoe.automodel.lora`); the base weights stay frozen."""

    r: int = 16
    alpha: float = 32.0
    targets: list[str] | None = None  # module names (PEFT's target_modules); None: every linear layer
    experts: bool = True  # grouped LoRA on the 3D expert weights too


@dataclass
class SFTModelSection(ModelSection):
    source: str = "native"  # native: HybridMoEForCausalLM | transformers: a HF MoE model directory in init_from
    lora: LoraSection | None = None  # transformers source only; None: full fine-tuning


@dataclass
class SFTDataSection:
    datasets: dict[str, float] = field(default_factory=dict)  # messages JSONL / Parquet -> blend weight
    tokenizer: str | None = None  # with a chat template; None: the one in model.init_from
    seq_len: int = 4096  # tokens per packed sample
    batch_size: int = 8  # packed samples per micro-batch, all ranks together (each rank takes its rows)
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: float | None = None  # when set, train.steps = ceil(epochs * samples / (batch_size * grad_accum))
    drop_long: bool = False  # leave out (and count) conversations longer than seq_len instead of failing
    max_bad_fraction: float | None = None  # bad conversations tolerated (None: the loader's default)


@dataclass
class SFTSection:
    # token: sum of token losses / loss tokens of the global batch (Super's SFT stage 1); conversation: the mean
    # over the global batch's conversations of each one's token mean (stage 2: long answers stop dominating)
    loss_normalization: str = "token"
    mtp_loss_weight: float = 0.3  # native models (the reference's SFT value; the checkpoint's config is overridden)
    reasoning_off_fraction: float = 0.0  # share of reasoning conversations trained with reasoning stripped
    reasoning_truncate_fraction: float = 0.0  # share whose reasoning is cut to reasoning_truncate_tokens
    reasoning_truncate_tokens: int = 64


def _sft_optim() -> OptimSection:
    return OptimSection(lr=1e-5, min_lr=0.0, schedule="cosine")


@dataclass
class SFTRecipe(_RecipeFile):
    model: SFTModelSection = field(default_factory=SFTModelSection)
    data: SFTDataSection = field(default_factory=SFTDataSection)
    sft: SFTSection = field(default_factory=SFTSection)
    optim: OptimSection = field(default_factory=_sft_optim)
    balance: BalanceSection = field(default_factory=BalanceSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)

    def validate(self) -> None:
        m, d, s, t = self.model, self.data, self.sft, self.train
        _validate_common(self.optim, t, d)
        _validate_parallel(self.parallel, t)
        if self.precision.policy().recipe != "none" and m.source != "native":
            raise ValueError(f"precision.recipe={self.precision.recipe} is for native models (model.source=native); "
                             "a transformers model trains at train.precision")  # fmt: skip
        if m.source not in ("native", "transformers"):
            raise ValueError(f"model.source={m.source!r}: use native or transformers")
        if t.compile and m.source != "native":
            raise ValueError("train.compile=true compiles the blocks of a native model (model.source=native); "
                             "set train.compile=false for a transformers model")  # fmt: skip
        if m.source == "transformers":
            if not m.init_from or not os.path.isfile(os.path.join(m.init_from, "config.json")):
                raise ValueError(
                    f"model.init_from={m.init_from!r}: not a Hugging Face model directory (no config.json); "
                    "model.source=transformers fine-tunes the model in that directory"
                )
            if t.precision not in ("fp32", "bf16"):
                raise ValueError(f"train.precision={t.precision!r}: a transformers model trains in fp32 or bf16")
        elif m.lora is not None:
            raise ValueError("model.lora is for model.source=transformers (native models train all weights)")
        if "mtp_loss_weight" in m.overrides:
            raise ValueError("set the MTP loss weight with sft.mtp_loss_weight, not model.overrides")
        if not d.datasets:
            raise ValueError("data.datasets is empty: give at least one conversation file (JSONL or Parquet)")
        if any(not w > 0 for w in d.datasets.values()):
            raise ValueError(f"data.datasets weights must be positive, got {d.datasets}")
        if d.epochs is not None and not d.epochs > 0:
            raise ValueError(f"data.epochs={d.epochs}: give a positive number, or null to train train.steps steps")
        if s.loss_normalization not in ("token", "conversation"):
            raise ValueError(f"sft.loss_normalization={s.loss_normalization!r}: use token or conversation")
        for name in ("reasoning_off_fraction", "reasoning_truncate_fraction"):
            if not 0 <= getattr(s, name) <= 1:
                raise ValueError(f"sft.{name}={getattr(s, name)} must be in [0, 1]")


# ---------------------------------------------------------------------------------------------- RL


@dataclass
class RLModelSection(ModelSection):
    tokenizer: str | None = None  # with the chat template; None: the one in model.init_from


@dataclass
class EnvsSection:
    ratios: dict[str, float] = field(default_factory=dict)  # environment -> its share of every batch's prompts
    difficulty: int = 1
    reasoning: bool = True  # prompts with reasoning on (the chat template's <think>)
    pool: int = 512  # training prompts per environment: seeds offset .. offset + pool - 1 of the train split
    offset: int = 1_000_000  # first training seed of the pools (SFT data takes the split's first seeds)


@dataclass
class PassRateSection:
    """Prompts the starting model always solves are dropped before training (NeMo-RL / Nemotron 3's offline
    filter): each prompt of the pools is sampled `samples` times with the starting model at rl.temperature. With
    drop_unsolved the prompts it never solves go too, so that every kept group starts with a spread of rewards (the
    two-sided difficulty filter of DAPO, Yu et al., 2025, applied once up front instead of per batch)."""

    samples: int = 0  # 0: no filter
    drop_at: float = 1.0  # drop a prompt whose fraction of fully rewarded samples is >= this
    drop_unsolved: bool = False  # also drop a prompt no sample fully solved (pass rate 0): keep 0 < rate < drop_at


@dataclass
class RLSection:
    group_size: int = 16  # samples per prompt (GRPO's group)
    prompts_per_step: int = 128  # prompts per optimizer step (all ranks together)
    max_new_tokens: int = 1024  # per model turn
    temperature: float = 1.0  # sampling; the trainer's and the engine's logprobs are of softmax(logits / T)
    advantage_std_norm: bool = True  # divide by the leave-one-out std (+ 1e-6)
    advantage_clip: float | None = None  # clip advantages to [-c, c]; None: no clip
    eps_low: float = 0.2  # ratio clip 1 - eps_low ...
    eps_high: float = 0.28  # ... 1 + eps_high (clip-higher)
    importance: str = "tis"  # rollout-vs-trainer correction: tis (truncated weights) | mask (sequences) | none
    tis_min: float = 0.2
    tis_max: float = 5.0
    mask_threshold: float = 2.0  # importance=mask: a sequence's exp(mean |logp_trainer - logp_rollout|) above it
    kl_coef: float = 0.0  # k3 KL against the starting model (0: no reference model is kept)
    freeze_router: bool = True  # router weights and selection biases stay as they are
    pass_rate_filter: PassRateSection = field(default_factory=PassRateSection)
    max_staleness: int = 0  # how many optimizer steps old a trajectory may be (sync: 0)
    rollout: str = "sync"  # sync: the in-process engine between steps | async: `hybridmoe serve` workers
    workers: int = 1  # async: rollout worker processes
    # async, one process: train a step's groups as they arrive (the gradient is the same; the slowest groups of the
    # batch generate while the first ones train)
    stream_groups: bool = True
    max_model_len: int = 4096  # tokens of a whole episode (prompt, turns, tool output): the engine's room per slot
    max_num_seqs: int = 64  # sync: episodes the in-process engine decodes at once
    seq_len: int = 0  # tokens per packed training row; 0: one trajectory per row (padded to the longest)
    micro_batch_size: int = 8  # rows per forward and backward on each rank


def _rl_optim() -> OptimSection:
    return OptimSection(lr=3e-6, min_lr=0.0, schedule="constant")


@dataclass
class RLRecipe(_RecipeFile):
    """GRPO (`hybridmoe rl`), with the Nemotron 3 RLVR defaults: groups of 16, clip 0.2 / 0.28, TIS [0.2, 5],
    KL 0, router frozen, constant LR 3e-6."""

    model: RLModelSection = field(default_factory=RLModelSection)
    envs: EnvsSection = field(default_factory=EnvsSection)
    rl: RLSection = field(default_factory=RLSection)
    optim: OptimSection = field(default_factory=_rl_optim)
    balance: BalanceSection = field(default_factory=BalanceSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)

    def validate(self) -> None:
        m, e, r = self.model, self.envs, self.rl
        _validate_common(self.optim, self.train)
        if self.train.compile:
            raise ValueError("train.compile=true is for hybridmoe pretrain and sft; RL generates its rollouts with "
                             "the model it trains: set train.compile=false")  # fmt: skip
        _validate_parallel(self.parallel, self.train)
        self.precision.policy()
        if not (m.tokenizer or m.init_from):
            raise ValueError("model.tokenizer: give a tokenizer directory with a chat template (or model.init_from)")
        if not e.ratios:
            raise ValueError("envs.ratios is empty: give at least one environment with its share, e.g. {math: 1.0}")
        if any(not (isinstance(v, (int, float)) and v > 0) for v in e.ratios.values()):
            raise ValueError(f"envs.ratios must be positive numbers, got {e.ratios}")
        if e.difficulty < 1 or e.pool < 1 or e.offset < 0:
            raise ValueError(f"envs.difficulty and envs.pool must be >= 1 and envs.offset >= 0, got {e.difficulty}, "
                             f"{e.pool}, {e.offset}")  # fmt: skip
        checks = [
            (r.group_size >= self._min_group_size(),
             f"rl.group_size={r.group_size}: GRPO's leave-one-out baseline needs >= 2 samples"),
            (r.prompts_per_step >= 1, f"rl.prompts_per_step={r.prompts_per_step} must be >= 1"),
            (r.max_new_tokens >= 1, f"rl.max_new_tokens={r.max_new_tokens} must be >= 1"),
            (r.temperature > 0, f"rl.temperature={r.temperature}: GRPO samples; use a temperature > 0"),
            (0 <= r.eps_low < 1 and r.eps_high >= 0, f"rl.eps_low={r.eps_low} must be in [0, 1), rl.eps_high >= 0"),
            (r.importance in ("tis", "mask", "none"), f"rl.importance={r.importance!r}: use tis, mask or none"),
            (0 < r.tis_min <= 1 <= r.tis_max, f"rl.tis_min={r.tis_min}, rl.tis_max={r.tis_max}: need 0 < min <= 1 <= "
             "max"),
            (r.mask_threshold >= 1, f"rl.mask_threshold={r.mask_threshold}: an error exp(mean |diff|) is >= 1"),
            (r.kl_coef >= 0, f"rl.kl_coef={r.kl_coef} must be >= 0"),
            (r.advantage_clip is None or r.advantage_clip > 0, f"rl.advantage_clip={r.advantage_clip}: > 0 or null"),
            (r.pass_rate_filter.samples >= 0, "rl.pass_rate_filter.samples must be >= 0 (0: no filter)"),
            (0 < r.pass_rate_filter.drop_at <= 1, "rl.pass_rate_filter.drop_at must be in (0, 1]"),
            (r.max_staleness >= 0, f"rl.max_staleness={r.max_staleness} must be >= 0"),
            (r.rollout in ("sync", "async"), f"rl.rollout={r.rollout!r}: use sync or async"),
            (r.rollout == "async" or r.max_staleness == 0,
             f"rl.max_staleness={r.max_staleness} with rl.rollout=sync: synchronous rollouts are never stale; use "
             "rl.rollout=async or rl.max_staleness=0"),
            (r.workers >= 1, f"rl.workers={r.workers} must be >= 1"),
            (r.seq_len == 0 or r.seq_len >= 2, f"rl.seq_len={r.seq_len}: 0 (one trajectory per row) or >= 2"),
            (r.micro_batch_size >= 1, f"rl.micro_batch_size={r.micro_batch_size} must be >= 1"),
            (r.max_model_len >= 2 and r.max_num_seqs >= 1, "rl.max_model_len must be >= 2 and rl.max_num_seqs >= 1"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _min_group_size(self) -> int:
        return 2


# ---------------------------------------------------------------------------------------------- MOPD


@dataclass
class WarmupSection:
    """MOPD's optional first phase: SFT of the student on samples its teachers generate (`train.distill`)."""

    samples: int = 0  # episodes per environment, each from the environment's teacher; 0: no warm-up
    keep: str = "full_reward"  # full_reward: only episodes with reward 1 | all
    steps: int = 20  # SFT optimizer steps
    lr: float = 1e-5
    seq_len: int = 1024  # tokens per packed SFT sample
    batch_size: int = 4  # packed samples per step


@dataclass
class DistillSection:
    teachers: dict[str, str] = field(default_factory=dict)  # environment -> teacher checkpoint (model or run dir)
    default_teacher: str | None = None  # for the environments without their own; None: each needs one
    opd_weight: float = 1.0  # A = opd_weight * clip(log p_teacher - log p_old) + orm_weight * A_grpo
    orm_weight: float = 0.0  # the environment reward's group advantage (needs rl.group_size >= 2 when > 0)
    logratio_clip: float = 10.0  # |log p_teacher - log p_old| per token is clipped to this
    warmup: WarmupSection = field(default_factory=WarmupSection)


def _distill_rl() -> RLSection:
    return RLSection(group_size=1)


@dataclass
class DistillRecipe(RLRecipe):
    """Multi-teacher on-policy distillation (`hybridmoe distill`): RLRecipe's sections (the student in model, the
    rollouts, batch and loss in rl; one sample per prompt by default) and `distill` (the teachers, the advantage's
    weights and clip, the optional warm-up)."""

    rl: RLSection = field(default_factory=_distill_rl)
    distill: DistillSection = field(default_factory=DistillSection)

    def _min_group_size(self) -> int:
        return 2 if self.distill.orm_weight > 0 else 1

    def validate(self) -> None:
        d, w = self.distill, self.distill.warmup
        if d.orm_weight > 0 and self.rl.group_size < 2:
            raise ValueError(f"rl.group_size={self.rl.group_size} with distill.orm_weight={d.orm_weight}: the "
                             "outcome-reward advantage needs a group of >= 2 samples per prompt; raise rl.group_size "
                             "or set distill.orm_weight=0")  # fmt: skip
        super().validate()
        if not isinstance(d.teachers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in d.teachers.items()
        ):
            raise ValueError(f"distill.teachers must map environment names to checkpoint directories, got {d.teachers}")
        unknown = sorted(set(d.teachers) - set(self.envs.ratios))
        if unknown:
            raise ValueError(f"distill.teachers names environment(s) {unknown} that are not in envs.ratios "
                             f"({sorted(self.envs.ratios)}): add them to envs.ratios or drop their "
                             "teachers")  # fmt: skip
        if d.default_teacher is None:
            orphans = sorted(set(self.envs.ratios) - set(d.teachers))
            if orphans:
                raise ValueError(f"environment(s) {orphans} have no teacher: give distill.teachers.<env> or "
                                 "distill.default_teacher")  # fmt: skip
        checks = [
            (d.opd_weight >= 0 and d.orm_weight >= 0, f"distill.opd_weight={d.opd_weight} and distill.orm_weight="
             f"{d.orm_weight} must be >= 0"),
            (d.opd_weight + d.orm_weight > 0, "distill.opd_weight and distill.orm_weight are both 0: nothing to learn"),
            (d.logratio_clip > 0, f"distill.logratio_clip={d.logratio_clip} must be > 0"),
            (w.samples >= 0, f"distill.warmup.samples={w.samples} must be >= 0 (0: no warm-up)"),
            (w.keep in ("full_reward", "all"), f"distill.warmup.keep={w.keep!r}: use full_reward or all"),
            (w.steps >= 1 and w.lr > 0 and w.seq_len >= 2 and w.batch_size >= 1,
             "distill.warmup.steps, batch_size must be >= 1, seq_len >= 2, lr > 0"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def apply_override(d: dict[str, Any], item: str) -> None:
    """Apply `section.key=value` (value parsed as YAML: numbers, booleans, lists, null) to a recipe mapping."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value (e.g. optim.lr=3e-4)")
    path, raw = item.split("=", 1)
    keys = path.split(".")
    node = d
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {key!r} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def _build(cls, d: dict[str, Any], where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in d.items():
        sub = _SECTIONS.get((cls, name))
        if sub is not None and value is not None:
            if isinstance(value, list):
                kwargs[name] = [_build(sub, v, f"{where}.{name}[{i}]") for i, v in enumerate(value)]
            else:
                kwargs[name] = _build(sub, value, f"{where}.{name}")
        elif name == "betas":
            kwargs[name] = tuple(_number(v, float, f"{where}.{name}") for v in value)
        else:
            kind = hints[name]
            if kind in (float, float | None) and value is not None:
                value = _number(value, float, f"{where}.{name}")
            elif kind in (int, int | None) and value is not None:
                value = _number(value, int, f"{where}.{name}")
            elif kind is bool and not isinstance(value, bool):  # "no" would otherwise count as true
                raise ValueError(f"{where}.{name}={value!r}: use true or false")
            kwargs[name] = value
    return cls(**kwargs)


def _number(value, kind, where: str):
    """YAML 1.1 reads `3e-4` as a string: accept numbers written that way, reject anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if kind is int:
        if number != int(number):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(number)
    return number


_SECTIONS = {
    (Recipe, "model"): ModelSection,
    (Recipe, "data"): DataSection,
    (Recipe, "optim"): OptimSection,
    (Recipe, "balance"): BalanceSection,
    (Recipe, "train"): TrainSection,
    (Recipe, "parallel"): ParallelSection,
    (Recipe, "precision"): PrecisionSection,
    (DataSection, "phases"): PhaseSection,
    (DataSection, "seq_mix"): SeqMixSection,
    (SeqMixSection, "phases"): PhaseSection,
    (SFTRecipe, "model"): SFTModelSection,
    (SFTRecipe, "data"): SFTDataSection,
    (SFTRecipe, "sft"): SFTSection,
    (SFTRecipe, "optim"): OptimSection,
    (SFTRecipe, "balance"): BalanceSection,
    (SFTRecipe, "train"): TrainSection,
    (SFTRecipe, "parallel"): ParallelSection,
    (SFTRecipe, "precision"): PrecisionSection,
    (SFTModelSection, "lora"): LoraSection,
    (RLRecipe, "model"): RLModelSection,
    (RLRecipe, "envs"): EnvsSection,
    (RLRecipe, "rl"): RLSection,
    (RLRecipe, "optim"): OptimSection,
    (RLRecipe, "balance"): BalanceSection,
    (RLRecipe, "train"): TrainSection,
    (RLRecipe, "parallel"): ParallelSection,
    (RLRecipe, "precision"): PrecisionSection,
    (RLSection, "pass_rate_filter"): PassRateSection,
    (DistillRecipe, "distill"): DistillSection,
    (DistillSection, "warmup"): WarmupSection,
}
_SECTIONS.update({(DistillRecipe, name): sub for (cls, name), sub in list(_SECTIONS.items()) if cls is RLRecipe})
