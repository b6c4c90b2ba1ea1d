"""`hybridmoe speedrun`: the whole CPU pipeline on an embedded default, from raw text to a chat model, in 30 minutes.

1. tokenizer  byte-level BPE trained on the Python standard library's own source files (every Python has them),
              with the chat format's special tokens and its Jinja chat template
2. data       two datasets from the same files, library modules and their tests, plus synthetic long-range
              retrieval documents; tokenized into shards
3. pretrain   `micro` (`--preset`), a two-phase curriculum as in Nemotron 3: phase 1 a diverse blend (modules and tests
              alike), phase 2 (the last 20% of tokens, as in Super's 20T + 5T) a higher-quality blend (mostly
              modules), warmup-stable-decay with minus-sqrt decay over the last 20% of steps
4. long ctx   continue at 8x the sequence length, 92% of steps long and 8% short (Ultra's mix), with some
              synthetic retrieval data (Nano's long-context blend), constant learning rate
5. sft        supervised fine-tuning on conversations of the verifiable task domains (`hybridmoe.tasks`, training
              seeds): worked reasoning in `<think>` blocks, a share with reasoning off, assistant-only loss, packed
6. rl         GRPO in verifiable environments (`hybridmoe.envs`: math, structured output, instruction following)
              on the in-process engine, groups of 8, constant learning rate (`hybridmoe.train.rl`)
7. evaluate   held-out tasks of every domain before and after SFT and after RL (reasoning on and off, through the
              batched engine); validation loss and perplexity before and after each stage, at the pretraining
              length and at the long length; the final model's answers to a few held-out tasks
8. report     report.md, loss.png, tasks.png and rl-rewards.png in the run directory; the last checkpoint (RL's,
              else SFT's) is the chat model that `hybridmoe serve` and `hybridmoe chat` answer with (reasoning in
              `reasoning_content`)

`stages` (`--stages`) leaves out stages after pretraining: each stage then starts from the last one that ran, and the
time of the ones left out goes to the others in proportion to their shares.

Step counts come from a timing calibration so that the run fits `minutes`; everything else is fixed, so two
runs on the same machine differ only in how many steps fit. A machine slower than at calibration (a loaded one)
still ends within the budget: each training stage has a deadline (`train.time_limit_s`) and stops cleanly at it
with a checkpoint (a phase 1 cut short moves phase 2, the decay, to where it stopped), a stage with no time left
is skipped, evaluation leaves out what it has no time for, and the report says which stages were cut and where.
The tokenizer and data stages always run whole: everything after needs them (they take a few percent of the
budget). Ctrl-C or SIGTERM ends the running stage at a checkpoint and the run with it (a speedrun does not resume).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import sysconfig
import time
from dataclasses import dataclass

import torch

from .accounting import measure_matmul_peak
from .data.loader import TokenDataset, validation_batches
from .data.prepare import prepare
from .data.sources import expand_inputs
from .data.synthetic import write_retrieval_jsonl
from .data.tokenizer import train_tokenizer
from .kernels.loss import IGNORE_INDEX
from .train.config import DistillRecipe, Recipe, RLRecipe, SFTRecipe
from .train.distill import distill as train_distill
from .train.metrics import read_log
from .train.pretrain import build_model, evaluate
from .train.pretrain import pretrain as train
from .train.rl import rl as train_rl
from .train.sft import sft as train_sft

STAGES = ("pretrain", "long-context", "sft", "rl")
# The SFT step time is calibrated on rows like the task conversations' (2026-12-05, the 30-minute run): packed
# samples of 147 tokens on average, 26% of the tokens in the loss.
SFT_DOC_LEN, SFT_LOSS_SHARE = 147, 0.26


@dataclass
class Plan:
    """The fixed part of the speedrun; step counts are derived from `minutes` at run time."""

    minutes: float = 30.0
    # `micro`, not `tiny`: 420 s of SFT from scratch (8 x 512 packed task conversations) gave `micro` 3.85M tokens,
    # loss 0.44 and 70% / 62% / 46% on json_schema / python / calculator; `tiny` 1.1M tokens, loss 0.95 and under
    # 15% on each (benchmarks/README.md, "The model size the budget affords")
    preset: str = "micro"
    vocab_size: int = 8192
    seq_len: int = 512
    batch_size: int = 8
    long_seq_len: int = 4096
    long_batch_size: int = 1
    short_batch_size: int = 8
    lr: float = 3e-3
    min_lr: float = 3e-5
    long_lr: float = 1e-4
    stages: tuple[str, ...] = STAGES  # pretraining always runs; the others can be left out
    # shares of the training time (what is left after data, calibration and the evaluation reserve); SFT's tokens,
    # not the base's, decide the task accuracy (benchmarks/README.md, "Where the 30 minutes go")
    pretrain_share: float = 0.40
    long_share: float = 0.06
    sft_share: float = 0.42
    rl_share: float = 0.12
    # task evaluations before/after SFT and after RL, validation of six checkpoints; None: 1.5 x (45 s + 70 x the
    # calibrated pretraining step), from what it took here: 176 s at tiny's 1.92 s a step, 89 s at micro's 0.66 s
    eval_reserve_s: float | None = None
    validation_reserve_s: float = 45.0  # of which kept for the final model's validation and the report
    # SFT: conversations of every task domain (training seeds), packed at the pretraining shape by default
    sft_per_domain: int = 2000
    sft_recovery_share: float = 0.5  # of terminal's one-step SFT tasks, written as a failed call and its fix
    sft_replan_at: int = 100  # SFT's step at which its step count is fitted to its own pace (train.replan_at; 0: not)
    sft_seq_len: int | None = None  # None: seq_len
    sft_lr: float = 3e-3  # the pretraining peak; 1e-3 ended at a higher loss (1.36 vs 1.06 after 200 steps)
    sft_min_lr: float = 3e-4
    sft_reasoning_off: float = 0.1  # share of samples trained with reasoning off (the empty think block)
    sft_reasoning_truncated: float = 0.03  # share with reasoning cut to sft_truncate_tokens (a budget)
    sft_truncate_tokens: int = 16
    task_samples: int = 20  # held-out tasks per domain, evaluated before and after SFT, reasoning on and off
    task_max_new_tokens: int = 96
    task_difficulty: int = 1
    # RL: GRPO where the SFT model already earns some reward (an environment it never solves gives groups of zero
    # variance, which teach nothing); the prompt pass-rate filter is off here (measuring it costs a share of the
    # stage's few minutes); the learning rate is this model size's (the reference's 3e-6 is for 30B-550B models)
    rl_envs: tuple[str, ...] = ("math", "structured", "instructions")
    rl_lr: float = 2e-4
    rl_group_size: int = 8
    rl_prompts_per_step: int = 6
    rl_max_new_tokens: int = 128
    # for planning; None: 3.5 x pretraining's measured step (RL took 3.4-3.5x here: 5.5 s against 1.6 s with tiny,
    # 2.1 s against 0.59 s with micro); the deadline is what holds
    rl_step_s: float | None = None
    max_files: int | None = None  # use only this many source files (quick runs, tests)
    seed: int = 0


def eval_reserve_s(step_s: float) -> float:
    """Seconds kept for the task evaluations, validation and the report, from the calibrated pretraining step: what
    they took here (176 s with `tiny` at 1.92 s a step, 89 s with `micro` at 0.66 s) is about 45 s + 70 x the step;
    1.5x that. The evaluation has its own deadline, so a slower one leaves answers out rather than overrun."""
    return round(1.5 * (45.0 + 70.0 * step_s))


def rl_step_estimate(pretrain_step_s: float) -> float:
    """An RL step (6 prompts x 8 samples generated, then trained on) took 3.4-3.5 pretraining steps of 8 x 512 here:
    5.5 s against 1.6 s with `tiny`, 2.1 s against 0.59 s with `micro`."""
    return 3.5 * pretrain_step_s


def stdlib_sources(max_files: int | None = None) -> tuple[list[str], list[str]]:
    """The standard library's .py files (no site-packages), split into library modules and tests; with
    `max_files`, an evenly spaced subset."""
    root = sysconfig.get_paths()["stdlib"]
    files = [f for f in expand_inputs([root]) if f.endswith(".py") and "-packages" not in f]
    if not files:
        raise ValueError(f"no Python source files under {root}: this Python has no standard library sources")
    if max_files is not None and len(files) > max_files:
        files = files[:: math.ceil(len(files) / max_files)]
    tests = [f for f in files if _is_test(os.path.relpath(f, root))]
    test_set = set(tests)
    return [f for f in files if f not in test_set], tests


def _is_test(rel: str) -> bool:
    parts = rel.split(os.sep)
    return any(p in ("test", "tests", "idle_test") for p in parts[:-1]) or parts[-1].startswith("test_")


def speedrun(
    minutes: float = 30.0,
    out_dir: str | None = None,
    plan: Plan | None = None,
    stages: tuple[str, ...] | None = None,
    preset: str | None = None,
) -> str:
    plan = plan or Plan(minutes=minutes)
    if preset is not None:
        from .presets import PRESETS

        if preset not in PRESETS:
            raise ValueError(f"speedrun: unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
        plan.preset = preset
    if not plan.minutes > 0:
        raise ValueError(f"speedrun: minutes must be > 0, got {plan.minutes}")
    if stages is not None:
        plan.stages = tuple(stages)
    _check_stages(plan.stages)
    shares = {
        "pretrain": plan.pretrain_share, "long-context": plan.long_share, "sft": plan.sft_share, "rl": plan.rl_share
    }  # fmt: skip
    total_share = sum(shares[name] for name in plan.stages)
    share = {name: (shares[name] / total_share if name in plan.stages else 0.0) for name in STAGES}
    t_start = time.monotonic()
    end = t_start + plan.minutes * 60  # everything, the report included, is done by then
    out = os.path.abspath(out_dir or time.strftime("speedrun-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(plan.seed)
    timings = {}

    def stage(name: str):
        print(f"\n== {name} ({time.monotonic() - t_start:.0f}s elapsed) ==", flush=True)
        timings[name] = time.monotonic()

    stage("tokenizer")
    modules, tests = stdlib_sources(plan.max_files)
    tok_dir = os.path.join(out, "tokenizer")
    # The standard library holds empty __init__.py files and a few test files that are not UTF-8 on purpose: bad
    # records expected here (listed in each bad_records.jsonl), so no max_bad_fraction limit.
    report = train_tokenizer(modules + tests, tok_dir, vocab_size=plan.vocab_size, max_bad_fraction=1.0)
    print(report.summary())

    stage("data")
    data = {}
    for name, files in (("modules", modules), ("tests", tests)):
        data[name] = os.path.join(out, "data", name)
        prepared = prepare(files, tok_dir, data[name], workers=2, shard_size_bytes=8 * 2**20, max_bad_fraction=1.0)
        print(prepared.summary())
    filler = [_read(f) for f in modules[:400]]
    retrieval_src = os.path.join(out, "data", "retrieval.jsonl")
    write_retrieval_jsonl(retrieval_src, filler, documents=64, target_chars=4 * plan.long_seq_len, seed=plan.seed)
    data["retrieval"] = os.path.join(out, "data", "retrieval")
    print(prepare([retrieval_src], tok_dir, data["retrieval"], workers=1).summary())

    stage("calibration")
    base = _recipe(plan, tok_dir, data, os.path.join(out, "pretrain"), steps=1)
    step_s = _calibrate(base, plan.batch_size, plan.seq_len)
    long_step_s = _calibrate(base, plan.long_batch_size, plan.long_seq_len, checkpointing=True)
    peak = measure_matmul_peak(dtypes=(torch.float32,), rounds=1)["float32"]  # once, for every stage's MFU
    print(f"matmul peak (fp32): {peak:.1f} GFLOP/s")
    if plan.eval_reserve_s is None:
        plan.eval_reserve_s = eval_reserve_s(step_s)
    train_end = end - plan.eval_reserve_s  # the training stages' last deadline
    budget = max(0.0, train_end - time.monotonic())
    pre_steps = max(10, int(budget * share["pretrain"] / step_s))
    long_steps = max(4, int(budget * share["long-context"] / long_step_s))
    sft_seq_len = plan.sft_seq_len or plan.seq_len
    # An SFT step computes the LM head and the loss on the assistant tokens only, so it is faster than a
    # pretraining step of the same shape (1.33 s against 1.58 s here); planned at pretraining's pace, SFT ended
    # minutes early and the time was lost.
    sft_step_s = step_s  # only planned with when SFT runs
    if "sft" in plan.stages:
        sft_step_s = _calibrate(base, plan.batch_size, sft_seq_len, doc_len=SFT_DOC_LEN, loss_share=SFT_LOSS_SHARE)
    sft_steps = max(4, int(budget * share["sft"] / sft_step_s))
    rl_step_s = plan.rl_step_s or rl_step_estimate(step_s / 1.15)  # replaced by the measured one below
    rl_steps = max(2, int(budget * share["rl"] / rl_step_s))
    pre_end = time.monotonic() + budget * share["pretrain"]  # the pretraining deadline
    long_end = pre_end + budget * share["long-context"]  # long context's
    sft_end = train_end - budget * share["rl"]  # SFT's; RL's is train_end
    print(f"{budget:.0f}s left: {step_s:.2f}s per pretraining step -> {pre_steps} steps; "
          f"{long_step_s:.2f}s per long step -> {long_steps} steps; {sft_steps} SFT steps")  # fmt: skip

    stage("pretrain")
    runs = []  # what each training stage planned and did, for the report
    pre = _recipe(plan, tok_dir, data, os.path.join(out, "pretrain"), steps=pre_steps)
    pre.train.peak_gflops = peak
    phase1_steps = math.ceil(0.8 * pre_steps)
    t0 = time.monotonic()
    first = _run_stage(pre, t0 + 0.8 * (pre_end - t0), stop_after=phase1_steps)  # phase 1: 80% of the time
    phase1_ckpt = first["checkpoint"]
    runs.append(_ran("pretrain phase 1", 0, phase1_steps, first))
    slowdown = max(1.0, (time.monotonic() - t0) / first["steps"] / step_s)  # against the calibration
    if first["steps"] < phase1_steps:
        # Cut short: phase 2 (the other blend, and the schedule's decay over the last 20% of steps) starts here.
        pre.train.steps = max(first["steps"] + 1, math.ceil(first["steps"] / 0.8))
    pre_summary = first
    if time.monotonic() + step_s * slowdown > pre_end:
        runs.append(_skipped("pretrain phase 2", pre.train.steps - first["steps"]))
    else:
        pre_summary = _run_stage(pre, pre_end, resume=True)
        runs.append(_ran("pretrain phase 2", first["steps"], pre.train.steps, pre_summary))
        if pre.train.steps != pre_steps:
            runs[-1]["note"] = f"moved to steps {first['steps'] + 1}-{pre.train.steps} as phase 1 was cut short"

    stage("long context")
    lc = _long_recipe(plan, tok_dir, data, os.path.join(out, "long-context"), pre_summary["checkpoint"], long_steps)
    lc.train.peak_gflops = peak
    lc_summary = None
    if "long-context" not in plan.stages:
        pass
    elif time.monotonic() + long_step_s * slowdown > long_end:
        runs.append(_skipped("long context", long_steps))
    else:
        lc_summary = _run_stage(lc, long_end)
        runs.append(_ran("long context", 0, long_steps, lc_summary))
    base_ckpt = (lc_summary or pre_summary)["checkpoint"]  # the base model SFT starts from

    stage("sft")
    from .tasks import DOMAINS, write_sft_jsonl

    sft_data = os.path.join(out, "data", "sft.jsonl")
    write_sft_jsonl(sft_data, {name: plan.sft_per_domain for name in DOMAINS}, difficulty=plan.task_difficulty,
                    recovery_share=plan.sft_recovery_share)  # fmt: skip
    # The calibration is a guess; pretraining measured the step time at this shape. SFT plans its steps (and so its
    # learning-rate schedule) from that and the time left, so it also uses what the earlier stages left over.
    # Allowance: reading and packing the conversations (about 3 ms each here); 8% per step for what the calibration
    # leaves out (batching the samples, logging, saving: SFT steps took 0.84 of a pretraining step here, the
    # calibration says 0.78-0.80).
    measured = _median(r["step_s"] for r in read_log(os.path.join(pre.train.out_dir, "log.jsonl")) if "step_s" in r)
    if measured is not None:
        rl_step_s = plan.rl_step_s or rl_step_estimate(measured)
        sft_step_s = 1.08 * measured * sft_step_s / step_s
        left = sft_end - time.monotonic() - 0.003 * plan.sft_per_domain * len(DOMAINS)
        sft_steps = max(4, int(left / sft_step_s))
    sft_recipe = _sft_recipe(plan, tok_dir, sft_data, os.path.join(out, "sft"), base_ckpt, sft_steps)
    sft_recipe.train.peak_gflops = peak
    sft_summary = None
    if "sft" not in plan.stages:
        pass
    elif time.monotonic() + sft_step_s * slowdown > sft_end:
        runs.append(_skipped("sft", sft_steps))
    else:
        sft_summary = _run_stage(sft_recipe, sft_end)
        replanned = sft_summary.get("replanned_steps")
        runs.append(_ran("sft", 0, replanned or sft_steps, sft_summary))
        if replanned is not None:
            at = sft_recipe.train.replan_at
            runs[-1]["note"] = f"planned {sft_steps} steps, re-planned to {replanned} at step {at} from SFT's pace"

    stage("rl")
    rl_recipe = rl_summary = None
    if "rl" not in plan.stages:
        pass
    elif sft_summary is None:
        runs.append({"stage": "rl", "planned": rl_steps, "ran": 0, "ended": "skipped: no SFT model to start from"})
    elif time.monotonic() + rl_step_s > train_end:
        runs.append(_skipped("rl", rl_steps))
    else:
        # RL's learning rate is constant: its steps are planned from the time SFT actually left it.
        rl_steps = max(2, int((train_end - time.monotonic()) / rl_step_s))
        rl_recipe = _rl_recipe(plan, sft_summary["checkpoint"], os.path.join(out, "rl"), rl_steps)
        rl_recipe.train.peak_gflops = peak
        rl_summary = _run_stage(rl_recipe, train_end)
        runs.append(_ran("rl", 0, rl_steps, rl_summary))

    stage("evaluate")
    # Tasks first (what the SFT stage is for): the chat model, then the base model it started from.
    task_evals, not_evaluated = {}, []
    task_models = [("before SFT", base_ckpt)] + ([("after SFT", sft_summary["checkpoint"])] if sft_summary else [])
    task_models += [("after RL", rl_summary["checkpoint"])] if rl_summary else []
    # The task evaluations stop at their own deadline (answers left unfinished are left out), which keeps time for
    # the final model's validation and the report on a machine slower than at calibration.
    task_deadline, task_s = end - plan.validation_reserve_s, 0.0
    for label, ckpt in reversed(task_models):
        if time.monotonic() + task_s > task_deadline:
            not_evaluated.append(f"tasks {label}")
            continue
        t0 = time.monotonic()
        task_evals[label] = _evaluate_tasks(plan, ckpt, os.path.join(out, "tasks", label.replace(" ", "-")),
                                            deadline=task_deadline)  # fmt: skip
        task_s = max(task_s, time.monotonic() - t0)
    task_evals = {label: task_evals[label] for label, _ in task_models if label in task_evals}
    val_ds = [TokenDataset(data["modules"], val_fraction=pre.data.val_fraction)]
    checkpoints = [("initial (random init)", None), ("after phase 1", phase1_ckpt)]
    if pre_summary is not first:
        checkpoints.append(("after phase 2", pre_summary["checkpoint"]))
    if lc_summary is not None:
        checkpoints.append(("after long context", lc_summary["checkpoint"]))
    if sft_summary is not None:
        checkpoints.append(("after SFT", sft_summary["checkpoint"]))
    if rl_summary is not None:
        checkpoints.append(("after RL", rl_summary["checkpoint"]))
    evals, row_s = {}, 0.0
    for i in [len(checkpoints) - 1, *range(len(checkpoints) - 1)]:  # the final model first, then in order
        name, ckpt = checkpoints[i]
        if evals and time.monotonic() + row_s > end:
            not_evaluated.append(name)
            continue
        t0 = time.monotonic()
        model = build_model(pre, ckpt) if ckpt else _fresh_model(pre)
        row = {"stage": name, "checkpoint": ckpt}
        for label, seq, batch in (("short", plan.seq_len, 8), ("long", plan.long_seq_len, 1)):
            loss = evaluate(model, list(validation_batches(val_ds, seq, batch, max_batches=4)))
            row[f"val_loss_{label}"], row[f"val_ppl_{label}"] = loss, math.exp(loss)
        evals[i] = row
        row_s = max(row_s, time.monotonic() - t0)
        print(f"{name:24s} val loss @{plan.seq_len}: {row['val_loss_short']:.3f} (ppl {row['val_ppl_short']:.1f})"
              f"   @{plan.long_seq_len}: {row['val_loss_long']:.3f}")  # fmt: skip
    evals = [evals[i] for i in sorted(evals)]
    final = task_evals.get("after RL") or task_evals.get("after SFT")
    samples = _chat_samples(final) if final is not None else None

    stage("report")
    timings["end"] = time.monotonic()
    path = _write_report(out, plan, t_start, timings, evals, samples, pre, lc, sft_recipe, rl_recipe, runs,
                         not_evaluated, task_evals, rl_summary or sft_summary)  # fmt: skip
    print(f"\nreport: {path}")
    return path


def _train_until(recipe: Recipe | SFTRecipe | RLRecipe | DistillRecipe, deadline: float, **kwargs) -> dict:
    """The recipe's stage (pretraining, SFT, RL or MOPD) with the time left until `deadline` (time.monotonic) as its
    limit; it runs at least one step."""
    recipe.train.time_limit_s = max(deadline - time.monotonic(), 1e-3)
    if isinstance(recipe, DistillRecipe):
        return train_distill(recipe, **kwargs)
    if isinstance(recipe, RLRecipe):
        return train_rl(recipe, **kwargs)
    return (train_sft if isinstance(recipe, SFTRecipe) else train)(recipe, **kwargs)


def _run_stage(recipe, deadline: float, **kwargs) -> dict:
    """`_train_until`, where a Ctrl-C or SIGTERM, which ends the stage at a checkpoint, ends the whole speedrun: the
    next stage must not start on the user's interrupt."""
    summary = _train_until(recipe, deadline, **kwargs)
    if summary.get("stopped") == "signal":
        raise KeyboardInterrupt(
            f"speedrun interrupted at step {summary['steps']} of {recipe.train.out_dir} (its checkpoint is kept); "
            "a speedrun does not resume: start it again"
        )
    return summary


def _check_stages(stages) -> None:
    unknown = [s for s in stages if s not in STAGES]
    if unknown or "pretrain" not in stages:
        raise ValueError(f"speedrun stages {list(stages)}: use some of {', '.join(STAGES)}, pretrain included "
                         "(every later stage starts from its model)")  # fmt: skip


def _ran(name: str, start: int, planned_end: int, summary: dict) -> dict:
    """A training stage's line in the report: steps planned and run (of this stage), and how it ended."""
    done = summary["steps"]
    if done >= planned_end:
        ended = "as planned"
    elif summary.get("stopped") == "deadline":
        ended = f"cut short by the deadline at step {done} of {planned_end}"
    else:
        ended = f"stopped ({summary.get('stopped')}) at step {done} of {planned_end}"
    return {"stage": name, "planned": planned_end - start, "ran": done - start, "ended": ended, "step": done}


def _skipped(name: str, planned: int) -> dict:
    return {"stage": name, "planned": planned, "ran": 0, "ended": "skipped: no time left before the deadline"}


def _recipe(plan: Plan, tok_dir, data, out_dir, steps) -> Recipe:
    return Recipe.from_dict(
        {
            "model": {"preset": plan.preset, "overrides": {"vocab_size": plan.vocab_size}},
            "data": {
                "tokenizer": tok_dir,
                "phases": [
                    {"datasets": {data["modules"]: 0.5, data["tests"]: 0.5}, "until": 0.8},
                    {"datasets": {data["modules"]: 0.9, data["tests"]: 0.1}},
                ],
                "seq_len": plan.seq_len,
                "batch_size": plan.batch_size,
                "val_fraction": 0.02,
            },
            "optim": {
                "lr": plan.lr,
                "min_lr": plan.min_lr,
                "warmup_steps": max(1, steps // 20),
                "decay_fraction": 0.2,
            },
            "train": {
                "steps": steps,
                "out_dir": out_dir,
                "seed": plan.seed,
                "val_batches": 4,
                "keep_last": 2,  # the end of phase 1 and the end
                "tensorboard": False,
            },
        }
    )


def _long_recipe(plan: Plan, tok_dir, data, out_dir, init_from, steps) -> Recipe:
    long_blend = {data["modules"]: 0.7, data["tests"]: 0.1, data["retrieval"]: 0.2}
    return Recipe.from_dict(
        {
            "model": {"preset": plan.preset, "init_from": init_from},
            "data": {
                "tokenizer": tok_dir,
                "phases": [{"datasets": {data["modules"]: 0.9, data["tests"]: 0.1}}],
                "seq_mix": [
                    {
                        "seq_len": plan.long_seq_len,
                        "batch_size": plan.long_batch_size,
                        "fraction": 0.92,
                        "phases": [{"datasets": long_blend}],
                    },
                    {"seq_len": plan.seq_len, "batch_size": plan.short_batch_size, "fraction": 0.08},
                ],
                "val_fraction": 0.02,
            },
            "optim": {"lr": plan.long_lr, "min_lr": plan.long_lr, "schedule": "constant"},
            "train": {
                "steps": steps,
                "out_dir": out_dir,
                "seed": plan.seed,
                "activation_checkpointing": True,
                "val_batches": 2,
                "keep_last": 1,
                "tensorboard": False,
            },
        }
    )


def _sft_recipe(plan: Plan, tok_dir, sft_data, out_dir, init_from, steps) -> SFTRecipe:
    return SFTRecipe.from_dict(
        {
            "model": {"source": "native", "init_from": init_from},
            "data": {
                "datasets": {sft_data: 1.0},
                "tokenizer": tok_dir,
                "seq_len": plan.sft_seq_len or plan.seq_len,
                "batch_size": plan.batch_size,
                "drop_long": True,  # counted in the SFT log's data summary
            },
            "sft": {
                "loss_normalization": "token",
                "reasoning_off_fraction": plan.sft_reasoning_off,
                "reasoning_truncate_fraction": plan.sft_reasoning_truncated,
                "reasoning_truncate_tokens": plan.sft_truncate_tokens,
            },
            "optim": {
                "lr": plan.sft_lr,
                "min_lr": plan.sft_min_lr,
                "schedule": "cosine",
                "warmup_steps": max(1, steps // 20),
            },
            "train": {
                "steps": steps,
                "out_dir": out_dir,
                "seed": plan.seed,
                "keep_last": 1,
                "tensorboard": False,
                # the steps are planned from the calibration's guess of an SFT step (20-35% off here:
                # benchmarks/bench_calibration.py); re-planned from SFT's own pace once warm-up ends, so that the
                # cosine decay ends at the deadline instead of being cut by it
                "replan_at": min(plan.sft_replan_at, steps - 1) if plan.sft_replan_at and steps > 2 else 0,
            },
        }
    )


def _rl_recipe(plan: Plan, init_from: str, out_dir: str, steps: int) -> RLRecipe:
    n = len(plan.rl_envs)
    return RLRecipe.from_dict(
        {
            "model": {"init_from": init_from},
            "envs": {"ratios": {name: 1.0 / n for name in plan.rl_envs}, "difficulty": plan.task_difficulty},
            "rl": {
                "group_size": plan.rl_group_size,
                "prompts_per_step": plan.rl_prompts_per_step,
                "max_new_tokens": plan.rl_max_new_tokens,
                "temperature": 1.0,
                "pass_rate_filter": {"samples": 0},
                "max_model_len": 1024,
            },
            "optim": {"lr": plan.rl_lr, "min_lr": plan.rl_lr, "schedule": "constant", "weight_decay": 0.0},
            "train": {"steps": steps, "out_dir": out_dir, "seed": plan.seed, "keep_last": 1, "tensorboard": False},
        }
    )


def _evaluate_tasks(plan: Plan, ckpt: str, out_dir: str, deadline: float | None = None):
    """Held-out tasks of every domain, reasoning on and off, greedy, through the batched engine; tasks.md/json/png
    in out_dir. The answers not finished by `deadline` (time.monotonic) are left out."""
    from .eval.tasks import evaluate_tasks, write_task_report
    from .serve.load import load_model

    model, tok = load_model(ckpt, device="cpu", dtype="float32")
    result = evaluate_tasks(
        model, tok, None, plan.task_samples, max_num_seqs=32, checkpoint=ckpt,
        max_model_len=min(2048, model.config.max_position_embeddings),
        difficulty=plan.task_difficulty, max_new_tokens=plan.task_max_new_tokens, overlap_seeds=plan.sft_per_domain,
        progress=False, deadline=deadline,
    )  # fmt: skip
    write_task_report(result, out_dir)
    overall = result.overall()
    print(f"tasks ({ckpt}): " + ", ".join(f"reasoning {m} {100 * o['accuracy']:.1f}%" for m, o in overall.items()))
    return result


def _chat_samples(result, domains: int = 6) -> list[dict]:
    """The chat model's answers to the first held-out task of a few domains (reasoning on), from the evaluation."""
    seen, out = set(), []
    for r in result.records:
        if r["reasoning"] == "on" and r["domain"] not in seen and len(seen) < domains:
            seen.add(r["domain"])
            out.append(r)
    return out


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def _fresh_model(recipe: Recipe):
    torch.manual_seed(recipe.train.seed)
    return build_model(recipe, None)


def _calibrate(
    recipe: Recipe,
    batch: int,
    seq_len: int,
    checkpointing: bool = False,
    doc_len: int | None = None,
    loss_share: float = 1.0,
    timed: int = 1,
) -> float:
    """Seconds per training step of this shape: the median of `timed` steps on random tokens after one untimed
    step (3 timed steps were no closer than 1 to a 20-step reference here: benchmarks/bench_calibration.py). With
    `doc_len`, an SFT step: rows packed with documents of that length and the loss on a random `loss_share` of the
    tokens (the assistant tokens; the LM head skips the others)."""
    model = _fresh_model(recipe)
    model.backbone.gradient_checkpointing = checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    kwargs = {"labels": ids}
    if doc_len is not None:  # packed conversations: no attention or state across them, the loss on a share
        labels = ids.masked_fill(torch.rand(ids.shape) >= loss_share, IGNORE_INDEX)
        weights = (labels != IGNORE_INDEX).float() / (labels != IGNORE_INDEX).sum().clamp(min=1)
        kwargs = {"labels": labels, "document_ids": torch.arange(seq_len).expand(batch, -1) // doc_len,
                  "loss_weights": weights}  # fmt: skip
    times = []
    for _ in range(1 + timed):
        t0 = time.perf_counter()
        model(ids, return_logits=False, **kwargs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return _median(times[1:]) * 1.15  # logging, validation and checkpoints take their share too


def _write_report(
    out,
    plan,
    t_start,
    timings,
    evals,
    samples,
    pre,
    lc,
    sft_recipe,
    rl_recipe,
    runs,
    not_evaluated,
    task_evals,
    chat_summary,
) -> str:
    from .utils import atomic_write_text

    pre_log = read_log(os.path.join(pre.train.out_dir, "log.jsonl"))
    lc_log, sft_log = (_read_log_if_any(r.train.out_dir) for r in (lc, sft_recipe))
    png = _plot(out, pre_log, lc_log, sft_log)
    steps_pre = [r for r in pre_log if "loss" in r]
    steps_lc = [r for r in lc_log if "loss" in r]
    steps_sft = [r for r in sft_log if "loss" in r]
    by_stage = {r["stage"]: r for r in runs}
    total, budget = timings["end"] - t_start, plan.minutes * 60

    def stage_time(a, b):
        return f"{timings[b] - timings[a]:.0f}s"

    within = "within it" if total <= budget else f"**{total - budget:.0f}s over it**"
    phase1, phase2 = by_stage["pretrain phase 1"], by_stage["pretrain phase 2"]
    phase2 = f"after step {phase1['ran']}" if phase2["ran"] else "skipped"
    lines = [
        "# hybridmoe speedrun",
        "",
        f"- command: `{' '.join(['hybridmoe', 'speedrun'] + sys.argv[2:])}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        f"- total time: {total:.0f}s of a {plan.minutes:g}-minute budget ({within}); tokenizer "
        f"{stage_time('tokenizer', 'data')}, data {stage_time('data', 'calibration')}, calibration "
        f"{stage_time('calibration', 'pretrain')}, pretrain {stage_time('pretrain', 'long context')}, long context "
        f"{stage_time('long context', 'sft')}, SFT {stage_time('sft', 'rl')}, RL {stage_time('rl', 'evaluate')}, "
        f"evaluation and report "
        f"{stage_time('evaluate', 'end')}",
        f"- model: `{plan.preset}` ({_param_line(lc)}), vocab {plan.vocab_size}",
        f"- pretraining: {_steps(steps_pre[-1]['step'])} x {plan.batch_size} x {plan.seq_len} tokens "
        f"({steps_pre[-1]['tokens']:,} tokens), phase 2 {phase2}, "
        f"mean {_mean(steps_pre, 'tokens_per_s'):.0f} tokens/s, MFU {100 * _mean(steps_pre, 'mfu'):.1f}% "
        f"(of a measured fp32 matmul peak of {pre.train.peak_gflops:.0f} GFLOP/s)",
    ]
    if steps_lc:
        lines.append(
            f"- long context: {_steps(steps_lc[-1]['step'])} at {plan.long_seq_len} (92%) and {plan.seq_len} (8%) "
            f"tokens, {steps_lc[-1]['tokens']:,} tokens, mean {_mean(steps_lc, 'tokens_per_s'):.0f} tokens/s"
        )
    if steps_sft:
        pre_rate, sft_rate = _mean(steps_pre, "tokens_per_s"), _mean(steps_sft, "tokens_per_s")
        lines.append(
            f"- SFT: {_steps(steps_sft[-1]['step'])} x {plan.batch_size} x {sft_recipe.data.seq_len} tokens of packed "
            f"conversations ({steps_sft[-1]['tokens']:,} tokens, {sum(r['loss_tokens'] for r in steps_sft):,} of them "
            f"assistant tokens in the loss, padding {100 * _mean(steps_sft, 'padding'):.2f}%), mean "
            f"{sft_rate:.0f} tokens/s ({100 * sft_rate / pre_rate:.0f}% of pretraining's at the same shape), MFU "
            f"{100 * _mean(steps_sft, 'mfu'):.1f}%; loss {steps_sft[0]['loss']:.3f} -> {steps_sft[-1]['loss']:.3f}"
        )
    rl_log = _read_log_if_any(rl_recipe.train.out_dir) if rl_recipe else []
    steps_rl = [r for r in rl_log if "loss" in r]
    rl_png = None
    if steps_rl:
        rl_png = _plot_rewards(out, steps_rl, rl_recipe)
        r1 = steps_rl[-1]
        lines.append(
            f"- RL: {_steps(r1['step'])} of GRPO ({rl_recipe.rl.prompts_per_step} prompts x {rl_recipe.rl.group_size} "
            f"samples, environments {', '.join(sorted(rl_recipe.envs.ratios))}, lr {rl_recipe.optim.lr:g}), "
            f"{sum(r['trajectories'] for r in steps_rl):,} trajectories, mean {_mean(steps_rl, 'step_s'):.1f}s per "
            f"step; mean reward {_mean(steps_rl[:5], 'reward'):.3f} over the first 5 steps, "
            f"{_mean(steps_rl[-5:], 'reward'):.3f} over the last 5"
        )
    if chat_summary is not None:
        chat = chat_summary["checkpoint"]
        lines.append(f"- the chat model: `{chat}` (`hybridmoe serve {chat}`, `hybridmoe chat {chat}`)")
    cut = [r for r in runs if r["ended"] != "as planned"]
    lines += [
        "",
        "## Stages against the budget",
        "",
        "Step counts come from a timing calibration; each training stage also has a deadline (the pretraining share "
        f"of the budget, then the budget less {plan.eval_reserve_s:g}s for evaluation and the report) and stops "
        "cleanly at it, with a checkpoint.",
        "",
        "| stage | steps planned | steps run | how it ended |",
        "|---|---:|---:|---|",
    ]
    for r in runs:
        note = f"; {r['note']}" if r.get("note") else ""
        lines.append(f"| {r['stage']} | {r['planned']} | {r['ran']} | {r['ended']}{note} |")
    lines += [
        "",
        "Every stage ran as planned."
        if not cut
        else f"Cut short or skipped by the deadline: {', '.join(r['stage'] for r in cut)} (this machine ran slower "
        "than at calibration).",
    ]
    if not_evaluated:
        lines.append(f"Not evaluated (no time left): {', '.join(not_evaluated)}.")
    lines += [
        "",
        "## Validation (library modules, held-out files)",
        "",
        f"| stage | loss @{plan.seq_len} | ppl @{plan.seq_len} | loss @{plan.long_seq_len} "
        f"| ppl @{plan.long_seq_len} |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in evals:
        lines.append(
            f"| {r['stage']} | {r['val_loss_short']:.3f} | {r['val_ppl_short']:.1f} | {r['val_loss_long']:.3f} | "
            f"{r['val_ppl_long']:.1f} |"
        )
    lines += _task_section(out, plan, task_evals)
    lines += ["", "## Loss", "", f"![loss curves]({os.path.basename(png)})"]
    if rl_png:
        lines += ["", "## RL rewards (training prompts, sampled at temperature 1)", "",
                  f"![RL reward curves]({os.path.basename(rl_png)})"]  # fmt: skip
    lines += ["", "## The chat model's answers", ""]
    if samples is None:
        lines += ["None: the SFT model was not evaluated (no time left before the deadline).", ""]
    for r in samples or []:
        prompt = r["prompt"].rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>")[0]
        lines += [
            f"**{r['domain']}** (reward {r['reward']:g})",
            "",
            "```text",
            f"user: {prompt.strip()}",
            f"reasoning_content: {(r['reasoning_content'] or '').strip()}",
            f"content: {(r['content'] or '').strip()}",
            "```",
            "",
        ]
    lines += [
        "## Files",
        "",
        "- `tokenizer/`, `data/` (token shards and manifests, `sft.jsonl`), `pretrain/`, `long-context/`, `sft/`,"
        " `rl/`",
        "  (logs, checkpoints: each a Hugging Face model directory with its tokenizer and chat template);",
        "  `tasks/` (per-sample task evaluations); `evals.json` and `stages.json` (the tables above)",
        "",
    ]
    path = os.path.join(out, "report.md")
    atomic_write_text(path, "\n".join(lines))
    atomic_write_text(os.path.join(out, "evals.json"), json.dumps(evals, indent=1))
    atomic_write_text(os.path.join(out, "stages.json"), json.dumps(runs, indent=1))
    return path


def _task_section(out: str, plan: Plan, task_evals: dict) -> list[str]:
    """The table (per domain: accuracy before and after SFT, reasoning on and off; answer length after) and the
    chart of the held-out task evaluation."""
    lines = ["", "## Tasks (held-out seeds, before and after SFT, after RL)", ""]
    if not task_evals:
        return lines + ["Not evaluated: no time left before the deadline.", ""]
    from .eval.tasks import plot_comparison

    png = os.path.join(out, "tasks.png")
    plot_comparison(task_evals, png, title="hybridmoe speedrun: held-out task accuracy")
    labels = list(task_evals)
    first = next(iter(task_evals.values()))
    lines += [
        f"{plan.task_samples} held-out tasks per domain (difficulty {plan.task_difficulty}), greedy, at most "
        f"{plan.task_max_new_tokens} new tokens per turn; accuracy is the mean reward of each domain's verifier. "
        "Tokens: mean generated tokens per answer. Train overlap: held-out prompts identical to one of the SFT "
        "data's (different seeds can repeat a prompt in a small task space).",
        "",
        "| domain | "
        + " | ".join(f"{label}, reasoning {m}" for label in labels for m in ("on", "off"))
        + " | tokens on / off (last) | train overlap |",
        "|---|" + "---:|" * (2 * len(labels) + 2),
    ]
    last = task_evals[labels[-1]]

    def pct(value, digits=0):
        return "n/a" if value is None else f"{100 * value:.{digits}f}%"

    def tokens(result, d, m):
        return f"{result.row(d, m)['mean_tokens']:.0f}" if result.accuracy(d, m) is not None else "n/a"

    for d in first.domains:
        cells = [pct(task_evals[label].accuracy(d, m)) for label in labels for m in ("on", "off")]
        overlap = first.domains[d]["train_overlap"]
        lines.append(f"| {d} | " + " | ".join(cells) + f" | {tokens(last, d, 'on')} / {tokens(last, d, 'off')} "
                     f"| {overlap} of {plan.task_samples} |")  # fmt: skip
    overall = {label: task_evals[label].overall() for label in labels}
    means = [f"**{pct(overall[label].get(m, {}).get('accuracy'), 1)}**" for label in labels for m in ("on", "off")]
    o = overall[labels[-1]]
    mean_tokens = " / ".join(f"{o[m]['mean_tokens']:.0f}" if m in o else "n/a" for m in ("on", "off"))
    lines += ["| **mean** | " + " | ".join(means) + f" | {mean_tokens} | |", ""]
    cut = {label: r.run.get("not_evaluated", 0) for label, r in task_evals.items() if r.run.get("not_evaluated")}
    if cut:
        total = 2 * len(first.domains) * plan.task_samples
        left_out = ", ".join(f"{label} {n} of {total} answers" for label, n in cut.items())
        lines += [f"Cut at the evaluation deadline (left out, not counted as wrong): {left_out}.", ""]
    lines.append(f"![task accuracy]({os.path.basename(png)})")
    return lines


def _plot_rewards(out: str, steps: list[dict], recipe: RLRecipe) -> str:
    """RL's mean reward per environment and step (the training batches' samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in sorted(recipe.envs.ratios):
        xs = [r["step"] for r in steps if f"reward_{name}" in r]
        ax.plot(xs, [r[f"reward_{name}"] for r in steps if f"reward_{name}" in r], label=name, marker=".")
    ax.plot([r["step"] for r in steps], [r["reward"] for r in steps], label="all", color="black", linewidth=2)
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean reward of the step's samples")
    ax.set_title("hybridmoe speedrun: GRPO rewards per environment")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(out, "rl-rewards.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _median(values) -> float | None:
    values = sorted(values)
    return values[len(values) // 2] if values else None


def _read_log_if_any(out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, "log.jsonl")
    return read_log(path) if os.path.exists(path) else []


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def _param_line(recipe) -> str:
    from .config import HybridMoEConfig
    from .modeling import HybridMoEForCausalLM

    config = HybridMoEConfig.from_preset(recipe.model.preset)
    counts = HybridMoEForCausalLM(config, device="meta").parameter_counts()
    return f"{counts['total'] / 1e6:.1f}M parameters, {counts['active'] / 1e6:.1f}M active"


def _mean(records, key) -> float:
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / max(len(values), 1)


def _plot(out, pre_log, lc_log, sft_log) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    offset = 0
    stages = (
        (pre_log, "pretrain", "tab:blue"),
        (lc_log, "long context", "tab:orange"),
        (sft_log, "SFT (assistant tokens)", "tab:green"),
    )
    for log, label, color in stages:
        steps = [r for r in log if "loss" in r]
        xs = [offset + r["tokens"] for r in steps]
        ys = [r["lm_loss"] for r in steps]
        ax.plot(xs, ys, color=color, lw=0.8, alpha=0.35)
        ax.plot(xs, _ema(ys, 0.9), color=color, lw=1.6, label=f"{label}: train (EMA)")
        tokens_at = {0: offset, **{r["step"]: offset + r["tokens"] for r in steps}}
        vals = [r for r in log if "val_loss" in r]
        ax.scatter([tokens_at.get(r["step"], offset) for r in vals], [r["val_loss"] for r in vals], color=color,
                   edgecolor="black", zorder=3, label=f"{label}: validation")  # fmt: skip
        offset = xs[-1] if xs else offset
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("hybridmoe speedrun")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(out, "loss.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _ema(values, decay):
    out, avg = [], None
    for v in values:
        avg = v if avg is None else decay * avg + (1 - decay) * v
        out.append(avg)
    return out
