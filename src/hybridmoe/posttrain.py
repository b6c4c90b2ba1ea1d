"""`hybridmoe posttrain`: the Nemotron 3 post-training pipeline in one command, from an SFT model to an MOPD student.

The order is Nemotron 3 Ultra's (the Nemotron 3 Ultra technical report, NVIDIA, 2025: SFT, an RLVR student, domain
teachers, multi-teacher on-policy distillation), on the recipes in recipes/ (`size`, default tiny):
1. base          only without `init_from`: the speedrun's pretraining, long context and SFT (`hybridmoe.speedrun`,
                 stages pretrain,long-context,sft) in `base_share` of the budget; its SFT model is the start
2. teachers      GRPO from the SFT model on one group of environments each (recipes/SIZE-rl-teacher-GROUP.yaml)
3. rl-student    GRPO from the SFT model on every environment (recipes/SIZE-rl.yaml)
4. mopd          MOPD (recipes/SIZE-distill.yaml, `hybridmoe.train.distill`) from the RL student, as the reference
                 starts it, each environment's samples scored by the teacher of its group (the RL student for an
                 environment no group holds)
5. rl-continued  (`compare`) the RL student's run continued from its last checkpoint (optimizer state included)
                 for as many student-sampled tokens as MOPD sampled: the issue's "MOPD against more RL at equal
                 student-sampled tokens"
6. evaluate      the same held-out tasks (`hybridmoe.eval.tasks`, greedy, reasoning on) of every domain the
                 environments cover, for the SFT model, each teacher (on its own domains), the RL student, the MOPD
                 student and the continued RL student
7. budget        the MOPD student, the final model, against the reasoning budget (`hybridmoe.eval.budget`): the
                 held-out tasks of two domains (`budget_domains`) once per budget, `</think>` forced at the budget as
                 `hybridmoe serve` forces it for a request's `reasoning_budget`, and once with reasoning off
8. report        report.md, posttrain.json, posttrain.png (accuracy per domain, one bar per model), mopd-vs-rl.png
                 (training reward against student-sampled tokens) and reasoning-budget.png (accuracy against budget)
                 in the run directory

Recovery per domain is the reference's measure (the Ultra report's "recovery": the student's gain over the teacher's
gain), taken from the common starting point, the SFT model: (MOPD - SFT) / (teacher - SFT), defined only where the
teacher gained; the report also gives it from the RL student, MOPD's own start.

Time: `minutes` is the whole command's budget. `eval_share` of what is left after the base goes to evaluation; the
rest is split over the training stages by their shares (recipe-like: the student gets more than a teacher), each
stage's deadline set when it starts from the time left, so what one stage leaves over goes to the ones after it.
A stage stops cleanly at its deadline with a checkpoint (`train.time_limit_s`) and always runs at least one step;
it plans its recipe's `train.steps` (an override raises them), fewer when its share does not fit them at the step
times measured so far, and a budget larger than the recipes need leaves the time unused. Every evaluation gets a
deadline too (its share of the evaluation time by domains, the budget sweep's passes counted as domains evaluated;
answers not finished by then are left out and counted).

Resuming: every stage writes `<stage>/stage.json` when it ends (all its steps, or its deadline); a stage with one is
never run again, and an evaluation whose `tasks.json` holds every answer is read back (one cut at its deadline runs
again; the budget sweep keeps each complete pass in eval/reasoning-budget/budget.json). Run the same command (same
`--out`) again after a crash or Ctrl-C: a stage that was interrupted resumes from its newest checkpoint with the
step count it first planned (`planned.json`), and the stages and evaluations left share the new invocation's budget.
A resumed run must start from the same SFT model (`run.json` records it). Records name the run's own checkpoints
relative to its folder, so a run folder moved or copied elsewhere resumes there as it was.
"""

from __future__ import annotations

import glob
import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

from .speedrun import _ema, _mean, _median, _ran, _read_log_if_any, _steps, _train_until
from .train.checkpoint import latest_checkpoint
from .train.config import DistillRecipe, RLRecipe
from .train.model import resolve_init
from .utils import atomic_write_text

RECIPES = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "recipes"))
FORMAT = "hybridmoe-posttrain-1"
# recipe keys posttrain fills in per stage, and what to use instead
OWNED_KEYS = {
    "model.init_from": "give the SFT model with --init-from",
    "train.out_dir": "give the run directory with --out (each stage gets a folder in it)",
    "train.seed": "use --seed",
    "train.tensorboard": "it is off in posttrain; use the stages' log.jsonl",
}


@dataclass
class PostPlan:
    """What `posttrain` runs; every value but `minutes` and `init_from` has a default fit for this CPU."""

    minutes: float = 60.0  # the whole command, the base included when there is one
    init_from: str | None = None  # the SFT model (a model or run directory); None: the speedrun's base first
    size: str = "tiny"  # recipes/SIZE-rl.yaml, SIZE-rl-teacher-*.yaml, SIZE-distill.yaml
    recipes: str = RECIPES
    overrides: tuple[str, ...] = ()  # recipe keys for every stage's recipe (distill.* for MOPD's only)
    compare: bool = True  # also continue RL on the student for MOPD's student-sampled tokens
    base_share: float = 0.5  # of the budget, for pretraining + long context + SFT when init_from is None
    eval_share: float = 0.16  # of the time after the base, for the task evaluations and the budget sweep
    report_reserve_s: float = 15.0  # kept at the end for the report and charts
    # shares of the training time; a teacher trains one group, the student all of them
    teacher_share: float = 0.15  # each
    student_share: float = 0.25
    mopd_share: float = 0.15
    compare_share: float = 0.15
    min_steps: int = 2
    rl_step_s: float = 6.0  # a guess for planning the first RL stage (issue 14 measured 4.4-6 s here)
    mopd_step_s: float = 8.0  # a guess for MOPD (32 samples of 192 tokens, scored by a teacher)
    task_samples: int = 200  # held-out tasks per domain (40 misstated recovery: benchmarks/README.md, issue 15)
    task_max_new_tokens: int = 128
    task_difficulty: int = 1
    eval_max_num_seqs: int = 48
    # the MOPD student against the reasoning budget; budgets empty: no sweep
    budget_domains: tuple[str, ...] | None = None  # None: calculator and retrieval where covered, else the first two
    budgets: tuple[int | None, ...] = (0, 4, 8, 16, 32, 64, None)  # thinking tokens per turn; None: no budget
    budget_samples: int = 100  # held-out tasks per domain and budget
    overlap_seeds: int = 2000  # training seeds compared with the held-out prompts (the speedrun's SFT data)
    seed: int = 0


def recovery(before: float | None, after: float | None, teacher: float | None) -> float | None:
    """How much of the teacher's gain over `before` the student got back: (after - before) / (teacher - before).
    None where the teacher did not gain (teacher <= before) or a value is missing; it can be negative (the student
    lost) or above 1 (the student passed the teacher)."""
    if before is None or after is None or teacher is None or teacher <= before:
        return None
    return (after - before) / (teacher - before)


def env_domains(env: str) -> list[str]:
    """The task domains an environment's episodes come from (`hybridmoe.envs`: a DomainEnv's domain_names, else the
    domain of the environment's own name)."""
    from .envs import ENVIRONMENTS
    from .tasks import DOMAINS

    if env not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {env!r}; known: {', '.join(ENVIRONMENTS)}")
    names = getattr(ENVIRONMENTS[env], "domain_names", None) or ((env,) if env in DOMAINS else ())
    if not names:
        raise ValueError(f"environment {env!r} names no task domain to evaluate it on")
    return list(names)


@dataclass
class Recipes:
    """The stage recipes of a size, read and checked before anything runs."""

    teachers: dict[str, RLRecipe]  # group -> its teacher's recipe
    student: RLRecipe
    mopd: DistillRecipe
    paths: dict[str, str] = field(default_factory=dict)  # stage -> recipe file

    def teacher_of(self) -> dict[str, str]:
        """environment -> the group whose teacher trains on it."""
        return {env: group for group, r in self.teachers.items() for env in r.envs.ratios}

    def domains(self) -> dict[str, str | None]:
        """Every task domain of the student's and MOPD's environments -> its teacher's group (None: no teacher)."""
        owner = self.teacher_of()
        envs = list(dict.fromkeys([*self.student.envs.ratios, *self.mopd.envs.ratios]))
        return {d: owner.get(env) for env in envs for d in env_domains(env)}


def load_recipes(plan: PostPlan) -> Recipes:
    """recipes/SIZE-rl-teacher-*.yaml, SIZE-rl.yaml and SIZE-distill.yaml with the plan's overrides, validated (the
    starting model is filled in later); errors name the file and what is wrong."""
    root = plan.recipes
    paths = {"rl-student": os.path.join(root, f"{plan.size}-rl.yaml"),
             "mopd": os.path.join(root, f"{plan.size}-distill.yaml")}  # fmt: skip
    teacher_files = sorted(glob.glob(os.path.join(root, f"{plan.size}-rl-teacher-*.yaml")))
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing or not teacher_files:
        raise ValueError(f"posttrain needs {plan.size}-rl.yaml, {plan.size}-distill.yaml and at least one "
                         f"{plan.size}-rl-teacher-GROUP.yaml in {root}; missing: "
                         f"{', '.join(missing) or 'the teacher recipes'} (pass --recipes DIR or another "
                         "--size)")  # fmt: skip
    for o in plan.overrides:  # keys posttrain sets for every stage: an override of one would be lost, so refuse it
        key = o.split("=", 1)[0].strip()
        if key in OWNED_KEYS:
            raise ValueError(f"posttrain sets {key} for every stage; {OWNED_KEYS[key]} instead of the override {o!r}")
    rl_overrides = [o for o in plan.overrides if not o.startswith("distill.")]
    teachers = {}
    for path in teacher_files:
        group = os.path.basename(path)[len(f"{plan.size}-rl-teacher-") : -len(".yaml")]
        teachers[group] = RLRecipe.from_yaml(path, rl_overrides)
        paths[f"teacher-{group}"] = path
    recipes = Recipes(teachers, RLRecipe.from_yaml(paths["rl-student"], rl_overrides),
                      DistillRecipe.from_yaml(paths["mopd"], list(plan.overrides)), paths)  # fmt: skip
    shared = {}
    for group, r in teachers.items():
        for env in r.envs.ratios:
            if env in shared:
                raise ValueError(f"environment {env!r} is in two teacher groups ({shared[env]}, {group}): each "
                                 "sample must be routed to exactly one teacher")  # fmt: skip
            shared[env] = group
            if env not in recipes.student.envs.ratios:
                raise ValueError(f"{paths[f'teacher-{group}']}: environment {env!r} is not the student's "
                                 f"({sorted(recipes.student.envs.ratios)}); a teacher trains on part of the "
                                 "student's environments")  # fmt: skip
    for name, r in [*((f"teacher-{g}", r) for g, r in teachers.items()), ("rl-student", recipes.student),
                    ("mopd", recipes.mopd)]:  # fmt: skip
        r.model.init_from = r.model.init_from or "."  # the real start is set per stage
        if isinstance(r, DistillRecipe):
            r.distill.teachers, r.distill.default_teacher = {}, "."
        try:
            r.validate()
        except ValueError as e:
            raise ValueError(f"{paths[name]}: {e}") from None
    recipes.domains()  # every environment names the task domains it is evaluated on
    return recipes


def budget_domains(plan: PostPlan, domains: dict[str, str | None]) -> list[str]:
    """The domains the reasoning-budget sweep runs on: the plan's (each one the environments cover), else calculator
    and retrieval where the environments cover them (tool use and search, where the reasoning has work to do), topped
    up with the first domains to two. Empty when the plan has no budgets."""
    from .eval.budget import check_budgets

    if not plan.budgets:
        return []
    check_budgets(plan.budgets)
    if plan.budget_samples < 1:
        raise ValueError(f"budget_samples must be >= 1 task per domain, got {plan.budget_samples}")
    if plan.budget_domains is not None:
        unknown = [d for d in plan.budget_domains if d not in domains]
        if unknown or not plan.budget_domains or len(set(plan.budget_domains)) != len(plan.budget_domains):
            raise ValueError(f"reasoning-budget domains {list(plan.budget_domains)}: each must be a domain the "
                             f"environments cover ({', '.join(domains)}), listed once")  # fmt: skip
        return list(plan.budget_domains)
    chosen = [d for d in ("calculator", "retrieval") if d in domains]
    return chosen + [d for d in domains if d not in chosen][: max(0, 2 - len(chosen))]


# ---------------------------------------------------------------------------------------------- the pipeline


def posttrain(out_dir: str | None = None, plan: PostPlan | None = None, command: str | None = None) -> str:
    """Run (or resume, in an existing out_dir) the pipeline; the path of report.md."""
    plan = plan or PostPlan()
    if not plan.minutes > 0:
        raise ValueError(f"posttrain: minutes must be > 0, got {plan.minutes}")
    t_start = time.monotonic()
    end = t_start + plan.minutes * 60
    recipes = load_recipes(plan)  # bad recipes, and a bad init_from below, fail before anything is written
    sweep_domains = budget_domains(plan, recipes.domains())
    given = resolve_init(plan.init_from) if plan.init_from else None
    out = os.path.abspath(out_dir or time.strftime("posttrain-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    _check_run(out, plan)
    base_end = t_start + plan.base_share * plan.minutes * 60
    sft = given or _base(out, plan, base_end)
    groups = list(recipes.teachers)
    training = [f"teacher-{g}" for g in groups] + ["rl-student", "mopd"] + (["rl-continued"] if plan.compare else [])
    shares = {**{f"teacher-{g}": plan.teacher_share for g in groups}, "rl-student": plan.student_share,
              "mopd": plan.mopd_share, "rl-continued": plan.compare_share}  # fmt: skip
    eval_end = end - plan.report_reserve_s
    left = [s for s in training if _record(out, s) is None]
    train_end = time.monotonic() + max(0.0, eval_end - time.monotonic()) * (1 - plan.eval_share if left else 0.0)

    def deadline(name: str) -> float:
        pending = sum(shares[s] for s in training if s in left and _record(out, s) is None)
        return time.monotonic() + max(0.0, train_end - time.monotonic()) * shares[name] / pending

    stages = {}
    for g in groups:
        name = f"teacher-{g}"
        stages[name] = _stage(out, name, recipes.teachers[g], sft, deadline, plan)
    stages["rl-student"] = _stage(out, "rl-student", recipes.student, sft, deadline, plan)
    student = stages["rl-student"]["checkpoint"]
    owner = recipes.teacher_of()
    mopd = recipes.mopd
    mopd.distill.teachers = {env: stages[f"teacher-{owner[env]}"]["checkpoint"] for env in mopd.envs.ratios
                             if env in owner}  # fmt: skip
    mopd.distill.default_teacher = student if set(mopd.envs.ratios) - set(owner) else None
    stages["mopd"] = _stage(out, "mopd", mopd, student, deadline, plan)
    if plan.compare:
        stages["rl-continued"] = _continue_rl(out, recipes.student, stages, deadline, plan)

    # evaluation: the same held-out tasks for every model; a teacher on its own domains only
    domains = recipes.domains()
    models = [("SFT", "sft", sft, list(domains))]
    models += [(f"teacher {g}", f"teacher-{g}", stages[f"teacher-{g}"]["checkpoint"],
                [d for d, owner_group in domains.items() if owner_group == g]) for g in groups]  # fmt: skip
    models += [("RL student", "rl-student", student, list(domains)),
               ("MOPD student", "mopd", stages["mopd"]["checkpoint"], list(domains))]  # fmt: skip
    if plan.compare:
        models.append(("RL student, continued", "rl-continued", stages["rl-continued"]["checkpoint"], list(domains)))
    results = {}
    finished = {slug: _read_eval(out, slug, plan, ckpt, doms) for _, slug, ckpt, doms in models}
    mopd_ckpt = stages["mopd"]["checkpoint"]
    sweep = _read_sweep(out, plan, mopd_ckpt, sweep_domains) if sweep_domains else None
    # the sweep's weight in the evaluation time: its passes as domains evaluated on task_samples tasks
    sweep_weight = 0.0 if not sweep_domains or _sweep_done(sweep) else \
        len(sweep_domains) * (len(plan.budgets) + 1) * plan.budget_samples / plan.task_samples  # fmt: skip
    for i, (label, slug, ckpt, doms) in enumerate(models):
        path = os.path.join(out, "eval", slug)
        if not doms:
            continue
        if finished[slug] is not None:
            results[label] = finished[slug]
            continue
        weight = sum(len(m[3]) for m in models[i:] if finished[m[1]] is None) + sweep_weight
        until = time.monotonic() + max(0.0, eval_end - time.monotonic()) * len(doms) / max(1, weight)
        print(f"\n== evaluate {label} ({time.monotonic() - t_start:.0f}s elapsed) ==", flush=True)
        results[label] = _evaluate(plan, ckpt, doms, path, until, label=_in_run(out, ckpt))
    if sweep_domains and not _sweep_done(sweep):
        print(f"\n== reasoning budget: the MOPD student on {', '.join(sweep_domains)} "
              f"({time.monotonic() - t_start:.0f}s elapsed) ==", flush=True)  # fmt: skip
        sweep = _sweep(out, plan, mopd_ckpt, sweep_domains, sweep, eval_end)

    return _write_report(out, plan, recipes, sft, stages, models, results, time.monotonic() - t_start, command,
                         sweep)  # fmt: skip


def _check_run(out: str, plan: PostPlan) -> None:
    """run.json: the starting model and size of the run; a resumed run must have the same."""
    path = os.path.join(out, "run.json")
    settings = {"init_from": os.path.abspath(plan.init_from) if plan.init_from else None, "size": plan.size}
    if os.path.exists(path):
        with open(path) as fh:
            first = json.load(fh)
        if {k: first.get(k) for k in settings} != settings:
            raise ValueError(f"{out} is a posttrain run of {first}, not of {settings}: resume it with the same "
                             "--init-from and --size, or give another --out")  # fmt: skip
    else:
        atomic_write_text(path, json.dumps(settings, indent=1))


def _in_run(out: str, path: str) -> str:
    """`path` as a record keeps it: relative to the run folder `out` when inside it (so that a run folder moved or
    copied elsewhere resumes and reports as before), else absolute."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(out))
    return os.path.abspath(path) if rel == ".." or rel.startswith(".." + os.sep) else rel


def _record(out: str, name: str) -> dict | None:
    """A finished stage's record (its stage.json), else None; its paths made absolute again against `out`."""
    path = os.path.join(out, name, "stage.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        record = json.load(fh)
    for key in ("checkpoint", "init_from"):
        if record.get(key):
            record[key] = os.path.join(os.path.abspath(out), record[key])
    return record


def _base(out: str, plan: PostPlan, until: float) -> str:
    """The speedrun's pretraining, long context and SFT in out/base (run whole again if it did not finish: the
    speedrun does not resume); its SFT checkpoint."""
    from .speedrun import speedrun

    done = _record(out, "base")
    if done is None:
        base = os.path.join(out, "base")
        minutes = max(1.0, (until - time.monotonic()) / 60)
        print(f"\n== base: the speedrun's pretrain, long-context and SFT in {minutes:.1f} minutes ==", flush=True)
        speedrun(out_dir=base, plan=None, minutes=minutes, stages=("pretrain", "long-context", "sft"))
        ckpt = latest_checkpoint(os.path.join(base, "sft"))
        if ckpt is None:
            raise RuntimeError(f"the base run left no SFT model (see {base}/report.md): give more --minutes, or an "
                               "SFT model with --init-from")  # fmt: skip
        done = {"stage": "base", "checkpoint": _in_run(out, ckpt), "minutes": minutes}
        atomic_write_text(os.path.join(out, "base", "stage.json"), json.dumps(done, indent=1))
        done = _record(out, "base")
    return done["checkpoint"]


def _planned(stage_dir: str, steps: int) -> int:
    """The step count a stage planned when it first started (kept in planned.json), so a resumed stage keeps it."""
    path = os.path.join(stage_dir, "planned.json")
    if os.path.exists(path):
        with open(path) as fh:
            return int(json.load(fh)["steps"])
    os.makedirs(stage_dir, exist_ok=True)
    atomic_write_text(path, json.dumps({"steps": steps}))
    return steps


def _step_s(out: str, names: list[str], guess: float) -> float:
    """Seconds per step for planning: the median measured in the finished stages `names`, else the guess."""
    measured = [r["step_s"] for n in names if _record(out, n) for r in _read_log_if_any(os.path.join(out, n))
                if "step_s" in r]  # fmt: skip
    return _median(measured) or guess


def _stage(out, name, recipe, init_from, deadline, plan, steps: int | None = None, start: int = 0) -> dict:
    """Run (or resume) one training stage unless it finished; its record (stage.json). deadline(name): when it must
    stop (time.monotonic). steps: the step count to reach (default: the recipe's train.steps, fewer when its time
    share does not fit them at the step times measured so far); start: the step it starts at (a continued run)."""
    done = _record(out, name)
    if done is not None:
        print(f"{name}: finished before ({_steps(done['step'])}), not run again", flush=True)
        return done
    stage_dir = os.path.join(out, name)
    until = deadline(name)
    if steps is None:
        if isinstance(recipe, DistillRecipe):
            step_s = _step_s(out, ["mopd"], plan.mopd_step_s)
        else:
            rl_stages = [n for n in sorted(os.listdir(out)) if n.startswith("teacher-") or n == "rl-student"]
            step_s = _step_s(out, rl_stages, plan.rl_step_s)
        steps = min(recipe.train.steps, max(plan.min_steps, int((until - time.monotonic()) / step_s)))
    steps = _planned(stage_dir, steps)
    recipe.model.init_from = init_from
    recipe.train.out_dir = stage_dir
    recipe.train.steps = steps
    recipe.train.seed = plan.seed
    recipe.train.tensorboard = False
    recipe.validate()
    resumed = latest_checkpoint(stage_dir)
    print(f"\n== {name}: to step {steps}, {until - time.monotonic():.0f}s"
          + (f", resuming from {os.path.basename(resumed)}" if resumed else "") + " ==", flush=True)  # fmt: skip
    t0 = time.monotonic()
    summary = _train_until(recipe, until, resume=True)
    if summary.get("stopped") == "signal":
        raise KeyboardInterrupt(f"{name} interrupted at step {summary['steps']}; run the same command to resume")
    record = _ran(name, start, steps, summary)
    logged = [r for r in _read_log_if_any(stage_dir) if "loss" in r]
    record.update(
        checkpoint=summary.get("checkpoint") or latest_checkpoint(stage_dir),
        init_from=init_from, seconds=round(time.monotonic() - t0, 1), start_step=summary.get("start_step"),
        resumed_from=summary.get("resumed_from"), sampled_tokens=sum(r.get("loss_tokens", 0) for r in logged),
        mean_reward_first=_mean(logged[:5], "reward") if logged else None,
        mean_reward_last=_mean(logged[-5:], "reward") if logged else None, recipe=recipe.to_dict(),
    )  # fmt: skip
    on_disk = record | {k: _in_run(out, record[k]) for k in ("checkpoint", "init_from") if record[k]}
    atomic_write_text(os.path.join(stage_dir, "stage.json"), json.dumps(on_disk, indent=1))
    return record


def _continue_rl(out, student_recipe, stages, deadline, plan) -> dict:
    """The RL student's run continued from its last checkpoint (weights, optimizer, prompt position: a copy of it
    in out/rl-continued) for about as many student-sampled tokens as MOPD sampled, at the student's tokens per
    step."""
    student = stages["rl-student"]
    stage_dir = os.path.join(out, "rl-continued")
    if _record(out, "rl-continued") is None and latest_checkpoint(stage_dir) is None:
        root = os.path.join(stage_dir, "checkpoints")
        os.makedirs(root, exist_ok=True)
        src = student["checkpoint"]
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(src)}.", dir=root)  # a name a resume cleans up
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        os.replace(tmp, os.path.join(root, os.path.basename(src)))
        atomic_write_text(os.path.join(root, "latest"), os.path.basename(src) + "\n")
    student_log = _read_log_if_any(os.path.join(out, "rl-student"))
    per_step = _median(r["loss_tokens"] for r in student_log if "loss_tokens" in r)
    extra = max(plan.min_steps, math.ceil(stages["mopd"]["sampled_tokens"] / max(1.0, per_step or 1.0)))
    recipe = RLRecipe.from_dict(student_recipe.to_dict())
    return _stage(out, "rl-continued", recipe, student["checkpoint"], deadline, plan, steps=student["step"] + extra,
                  start=student["step"])  # fmt: skip


def _evaluate(plan: PostPlan, ckpt: str, domains: list[str], out_dir: str, deadline: float, label: str | None = None):
    """Held-out tasks of `domains`, greedy, reasoning on, through the batched engine; tasks.md/json/png in out_dir.
    label: the checkpoint as the result records it (default: ckpt)."""
    from .eval.tasks import evaluate_tasks, write_task_report
    from .serve.load import load_model

    model, tok = load_model(ckpt)
    result = evaluate_tasks(
        model, tok, domains, plan.task_samples, max_num_seqs=plan.eval_max_num_seqs, checkpoint=label or ckpt,
        max_model_len=min(2048, model.config.max_position_embeddings), difficulty=plan.task_difficulty,
        reasoning="on", max_new_tokens=plan.task_max_new_tokens, overlap_seeds=plan.overlap_seeds, progress=False,
        deadline=deadline,
    )  # fmt: skip
    write_task_report(result, out_dir)
    print(f"tasks ({ckpt}): {100 * result.overall().get('on', {}).get('accuracy', 0.0):.1f}% over "
          f"{', '.join(domains)}", flush=True)  # fmt: skip
    return result


def _read_eval(out: str, slug: str, plan: PostPlan, ckpt: str, domains: list[str]):
    """A finished evaluation (out/eval/slug) of `ckpt` on `domains` with this plan's settings (tasks.json with every
    answer), else None: none yet, one cut at its deadline, or one of another checkpoint (a stage run again) or other
    settings (another --samples): evaluate again. Checkpoints inside the run compare relative to it."""
    from .eval.tasks import TaskEvalResult

    path = os.path.join(out, "eval", slug)
    if not os.path.exists(os.path.join(path, "tasks.json")):
        return None
    with open(os.path.join(path, "tasks.json")) as fh:
        result = TaskEvalResult.from_dict(json.load(fh))
    run, settings = result.run, result.run.get("settings", {})
    want = {"checkpoint": _in_run(out, ckpt), "domains": list(domains), "samples": plan.task_samples,
            "difficulty": plan.task_difficulty, "max_new_tokens": plan.task_max_new_tokens}  # fmt: skip
    recorded = run.get("checkpoint")
    if recorded and os.path.isabs(recorded):  # evaluations written before paths were kept relative
        recorded = _in_run(out, recorded)
    have = {"checkpoint": recorded, "domains": run.get("domains"),
            **{k: settings.get(k) for k in ("samples", "difficulty", "max_new_tokens")}}  # fmt: skip
    if have != want:
        changed = ", ".join(f"{k} {have[k]!r} -> {want[k]!r}" for k in want if have[k] != want[k])
        print(f"{path}: evaluated with other settings ({changed}); evaluating again", flush=True)
        return None
    return None if run.get("not_evaluated") else result


def _sweep_settings(out: str, plan: PostPlan, ckpt: str) -> dict:
    """What a budget sweep records beyond its tasks' settings, to tell whether a saved one is this plan's."""
    return {"checkpoint": _in_run(out, ckpt), "budgets": list(plan.budgets)}


def _sweep_tasks(plan: PostPlan) -> dict:
    """The task settings of the sweep's passes (the main evaluations' but for the number of tasks)."""
    return {"difficulty": plan.task_difficulty, "max_new_tokens": plan.task_max_new_tokens, "overlap_seeds": 0}


def _read_sweep(out: str, plan: PostPlan, ckpt: str, domains: list[str]) -> dict | None:
    """The saved sweep (eval/reasoning-budget/budget.json) when it is of this checkpoint and these budgets (its
    complete passes are then kept; `sweep_reasoning_budget` also checks the tasks' settings), else None."""
    path = os.path.join(out, "eval", "reasoning-budget", "budget.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        saved = json.load(fh)
    want = {"domains": list(domains), "samples": plan.budget_samples, **_sweep_tasks(plan)}
    if saved.get("run") != _sweep_settings(out, plan, ckpt) or saved.get("settings") != want:
        print(f"{path}: a sweep of another model or with other settings; sweeping again", flush=True)
        return None
    return saved


def _sweep_done(sweep: dict | None) -> bool:
    """Every pass of the plan ran and none was cut (budgets of another plan make _read_sweep return None)."""
    return bool(sweep) and not sweep["not_evaluated"] and len(sweep["passes"]) == len(sweep["run"]["budgets"]) + 1


def _sweep(out: str, plan: PostPlan, ckpt: str, domains: list[str], previous: dict | None, deadline: float) -> dict:
    """The MOPD student against the reasoning budget on `domains`, greedy, each complete pass saved as it ends."""
    from .eval.budget import budget_label, plot_budget, sweep_reasoning_budget
    from .serve.load import load_model

    path = os.path.join(out, "eval", "reasoning-budget")
    os.makedirs(path, exist_ok=True)
    run = _sweep_settings(out, plan, ckpt)

    def save(result):
        atomic_write_text(os.path.join(path, "budget.json"), json.dumps(result | {"run": run}, indent=1))

    model, tok = load_model(ckpt)
    result = sweep_reasoning_budget(
        model, tok, domains, plan.budget_samples, list(plan.budgets), deadline=deadline, previous=previous,
        on_pass=save, max_num_seqs=plan.eval_max_num_seqs,
        max_model_len=min(2048, model.config.max_position_embeddings), **_sweep_tasks(plan),
    )  # fmt: skip
    result |= {"run": run}
    save(result)
    plot_budget(result, os.path.join(out, "reasoning-budget.png"),
                f"posttrain: the MOPD student against the reasoning budget ({plan.budget_samples} tasks "
                "per domain)")  # fmt: skip
    for d in domains:
        points = ", ".join(f"{budget_label(c['budget'])}: "
                           + ("n/a" if c["accuracy"] is None else f"{100 * c['accuracy']:.1f}%")
                           for c in result["curves"][d])  # fmt: skip
        print(f"{d}: {points}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------- the report


def accuracy_table(domains: dict[str, str | None], results: dict) -> dict[str, dict]:
    """Per domain: its teacher group, the accuracy (reasoning on) of the SFT model, its teacher, the RL student, the
    MOPD student and the continued RL student (None: not evaluated), and recovery from the SFT model and from the RL
    student."""

    def acc(label, d):
        return results[label].accuracy(d, "on") if label in results else None

    rows = {}
    for d, group in domains.items():
        row = {"group": group, "sft": acc("SFT", d), "teacher": acc(f"teacher {group}", d) if group else None,
               "rl_student": acc("RL student", d), "mopd": acc("MOPD student", d),
               "rl_continued": acc("RL student, continued", d)}  # fmt: skip
        teacher = results.get(f"teacher {group}")
        row["teacher_gain_se"] = paired_se(results["SFT"], teacher, d) if teacher and "SFT" in results else None
        row["recovery"] = recovery(row["sft"], row["mopd"], row["teacher"])
        row["recovery_from_rl"] = recovery(row["rl_student"], row["mopd"], row["teacher"])
        rows[d] = row
    return rows


def clear_gain(row: dict) -> bool:
    """The teacher gained by more than two paired standard errors over the SFT model."""
    se = row.get("teacher_gain_se")
    return row["teacher"] is not None and row["sft"] is not None and se is not None and \
        row["teacher"] - row["sft"] > 2 * se  # fmt: skip


def paired_se(before, after, domain: str) -> float | None:
    """The standard error of after's accuracy minus before's on `domain`, paired over the tasks both answered
    (reasoning on): std of the per-task differences / sqrt(n). None with fewer than 2 shared tasks."""

    def rewards(result):
        return {(r["seed"], r.get("sample", 0)): r["reward"] for r in result.records
                if r["domain"] == domain and r.get("reasoning", "on") == "on" and not r.get("failed")}  # fmt: skip

    a, b = rewards(before), rewards(after)
    diffs = [b[k] - a[k] for k in a.keys() & b.keys()]
    if len(diffs) < 2:
        return None
    mean = sum(diffs) / len(diffs)
    return math.sqrt(sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1) / len(diffs))


def recovery_summary(rows: dict[str, dict]) -> str:
    """One sentence: on how many domains the teacher gained (clearly: `clear_gain`), and on how many of those MOPD got
    back at least 80% of the gain, counted from the SFT model and from the RL student."""
    defined = {d: r for d, r in rows.items() if r["recovery"] is not None}
    clear = {d: r for d, r in defined.items() if clear_gain(r)}

    def met(rs, key):
        return sum(r[key] is not None and r[key] >= 0.8 for r in rs)

    over_rl = [r for r in clear.values() if r["recovery_from_rl"] is not None]
    from_sft, from_sft_clear = met(defined.values(), "recovery"), met(clear.values(), "recovery")
    from_rl = met(over_rl, "recovery_from_rl")
    named = f" ({', '.join(clear)})" if clear else ""
    return (
        f"Teachers gained on {len(defined)} of {len(rows)} domains, clearly on {len(clear)}{named}. MOPD "
        f"recovered at least 80% of the teacher's gain over the SFT model on {from_sft} of the {len(defined)} "
        f"({from_sft_clear} of the {len(clear)} clear gains), and of its gain over the RL student on {from_rl} of "
        f"the {len(over_rl)} clear gains where the teacher is also above the RL student."
    )


def _write_report(out, plan, recipes, sft, stages, models, results, total_s, command, sweep=None) -> str:
    import torch

    from .eval.tasks import _bar_chart

    domains = recipes.domains()
    rows = accuracy_table(domains, results)
    columns = [("SFT", "sft"), ("teacher", "teacher"), ("RL student", "rl_student"), ("MOPD", "mopd")]
    if plan.compare:
        columns.append(("RL continued", "rl_continued"))
    series = {label: {d: r[key] for d, r in rows.items() if r[key] is not None} for label, key in columns}
    png = os.path.join(out, "posttrain.png")
    _bar_chart(series, png, "hybridmoe posttrain: held-out accuracy per domain (reasoning on)")
    curves = _plot_comparison(out) if plan.compare else None

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    def rec(row, key):
        if row[key] is not None:
            return f"{100 * row[key]:.0f}%"
        if row["teacher"] is None:
            return "n/a: no teacher" if row["group"] is None else "n/a: not evaluated"
        return "n/a: teacher did not gain"

    def gain(row):
        if row["teacher"] is None or row["sft"] is None:
            return "n/a"
        se = row["teacher_gain_se"]
        return f"{100 * (row['teacher'] - row['sft']):+.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")

    budget = plan.minutes * 60
    within = "within it" if total_s <= budget else f"**{total_s - budget:.0f}s over it**"
    lines = [
        "# hybridmoe posttrain",
        "",
        f"- command: `{command or 'hybridmoe posttrain'}`",
        f"- machine: {_machine()}, Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)",
        f"- this invocation: {total_s:.0f}s of a {plan.minutes:g}-minute budget ({within})",
        f"- SFT model: `{sft}`" + (" (the base run in `base/`)" if not plan.init_from else ""),
        f"- recipes: {', '.join(f'`{os.path.relpath(p)}`' for p in recipes.paths.values())}"
        + (f"; overrides: `{' '.join(plan.overrides)}`" if plan.overrides else ""),
        "",
        "## Stages",
        "",
        "Each stage trains from the model in its `init_from` column; its step count is planned from the step times "
        "measured so far and its deadline (its share of the time left) stops it cleanly with a checkpoint. Student-"
        "sampled tokens: the tokens the trained model generated and was trained on (the loss tokens).",
        "",
        "| stage | from | steps planned | steps run | how it ended | seconds | student-sampled tokens | reward first 5 "
        "/ last 5 steps |",
        "|---|---|---:|---:|---|---:|---:|---|",
    ]
    for name, r in stages.items():
        start = os.path.relpath(r["init_from"], out) if r["init_from"].startswith(out) else r["init_from"]
        resumed = f"; resumed at step {r['start_step']}" if r.get("resumed_from") and name != "rl-continued" else ""
        reward = f"{r['mean_reward_first']:.3f} / {r['mean_reward_last']:.3f}" if r["mean_reward_first"] is not None \
            else "n/a"  # fmt: skip
        lines.append(f"| {name} | `{start}` | {r['planned']} | {r['ran']} | {r['ended']}{resumed} | {r['seconds']:.0f} "
                     f"| {r['sampled_tokens']:,} | {reward} |")  # fmt: skip
    s = plan
    lines += [
        "",
        "## Held-out accuracy per domain",
        "",
        f"{s.task_samples} held-out tasks per domain (the same seeds for every model, difficulty {s.task_difficulty}), "
        f"greedy, reasoning on, at most {s.task_max_new_tokens} new tokens per turn; accuracy is the mean reward of "
        "the domain's verifier. A teacher is evaluated on its own group's domains. Recovery = (MOPD - SFT) / (teacher "
        "- SFT), where the teacher gained over the SFT model; from the RL student: (MOPD - RL student) / (teacher - "
        "RL student).",
        "",
        "| domain | teacher | "
        + " | ".join(label for label, _ in columns)
        + " | teacher's gain ± SE | recovery | recovery from RL student |",
        "|---|---|" + "---:|" * (len(columns) + 3),
    ]
    for d, r in rows.items():
        lines.append(f"| {d} | {r['group'] or 'none'} | " + " | ".join(pct(r[k]) for _, k in columns)
                     + f" | {gain(r)} | {rec(r, 'recovery')} | {rec(r, 'recovery_from_rl')} |")  # fmt: skip
    means = [_mean_of(rows, k) for _, k in columns]
    lines.append("| **mean** | | " + " | ".join(f"**{pct(m)}**" for m in means) + " | | | |")
    lines += [
        "",
        "The teacher's gain is its accuracy minus the SFT model's, with the standard error of that difference over the "
        "same tasks (paired); a gain is clear when it is more than two standard errors.",
        "",
        recovery_summary(rows),
    ]
    cut = {label: r.run.get("not_evaluated", 0) for label, r in results.items() if r.run.get("not_evaluated")}
    if cut:
        lines.append("Cut at the evaluation deadline (left out, not counted as wrong): "
                     + ", ".join(f"{label} {n} answers" for label, n in cut.items()) + ".")  # fmt: skip
    lines += ["", "![accuracy per domain](posttrain.png)", ""]
    comparison = None
    if plan.compare:
        m, c = stages["mopd"], stages["rl-continued"]
        comparison = {
            "mopd_sampled_tokens": m["sampled_tokens"], "rl_continued_sampled_tokens": c["sampled_tokens"],
            "mopd_mean": _mean_of(rows, "mopd"), "rl_continued_mean": _mean_of(rows, "rl_continued"),
        }  # fmt: skip
        lines += [
            "## MOPD against more RL at equal student-sampled tokens",
            "",
            f"From the same RL student, MOPD sampled {m['sampled_tokens']:,} tokens; the RL student's own run, "
            f"continued from its last checkpoint, sampled {c['sampled_tokens']:,} (planned for MOPD's count from "
            "the student's tokens per step). Mean held-out accuracy over the domains: MOPD "
            f"{pct(comparison['mopd_mean'])}, RL continued {pct(comparison['rl_continued_mean'])}. The curves are "
            "the training samples' mean reward (temperature 1) against the tokens each run sampled.",
            "",
            f"![MOPD vs RL]({os.path.basename(curves)})" if curves else "No steps logged.",
            "",
        ]
    if sweep is not None:
        lines += _budget_section(plan, sweep)
    lines += [
        "## Files",
        "",
        "- `teacher-GROUP/`, `rl-student/`, `mopd/`, `rl-continued/`: each stage's log.jsonl, checkpoints, "
        "stage.json (its record) and planned.json",
        "- `eval/NAME/`: tasks.md, tasks.json (every answer), tasks.png per model; `eval/reasoning-budget/budget.json`"
        ": the budget sweep; `posttrain.json`: the tables above",
        "",
    ]
    path = os.path.join(out, "report.md")
    atomic_write_text(path, "\n".join(lines))
    record = {
        "format": FORMAT, "command": command, "machine": _machine(), "plan": asdict(plan), "sft": sft,
        "seconds": round(total_s, 1), "stages": stages, "domains": rows,
        "evaluations": {label: {"checkpoint": ckpt, "domains": doms, "path": os.path.join("eval", slug),
                                "not_evaluated": results[label].run.get("not_evaluated", 0)}
                        for label, slug, ckpt, doms in models if label in results},
        "comparison": comparison,
        "reasoning_budget": None if sweep is None else {
            "checkpoint": sweep["run"]["checkpoint"], "settings": sweep["settings"], "curves": sweep["curves"],
            "reasoning_off": sweep["reasoning_off"], "not_evaluated": sweep["not_evaluated"]},
    }  # fmt: skip
    atomic_write_text(os.path.join(out, "posttrain.json"), json.dumps(record, indent=1))
    print(f"\nreport: {path}", flush=True)
    return path


def _budget_section(plan: PostPlan, sweep: dict) -> list[str]:
    """report.md's reasoning-budget section: the table, what was cut, the chart."""
    from .eval.budget import budget_table

    domains = list(sweep["curves"])
    lines = [
        "## The MOPD student against the reasoning budget",
        "",
        f"The final model on {plan.budget_samples} held-out tasks of {' and '.join(domains)} (greedy), once per "
        "budget with reasoning on: `</think>` is forced once the turn has that many thinking tokens, as `hybridmoe "
        "serve` does for a request's `reasoning_budget` (each turn of a tool-using answer is its own request, so the "
        'budget caps a turn); "none" is no budget, and one pass has reasoning off (an empty thinking block). The '
        "largest thinking of any one turn shows the budget held.",
        "",
        *budget_table(sweep),
        "",
    ]
    cut = [p for p in sweep["passes"] if p["not_evaluated"]]
    if cut:
        lines += ["Cut at the evaluation deadline (left out, not counted as wrong): " + ", ".join(
            f"budget {p['budget']} {p['not_evaluated']} answers" for p in cut) + ".", ""]  # fmt: skip
    return lines + ["![accuracy against reasoning budget](reasoning-budget.png)", ""]


def _mean_of(rows: dict, key: str) -> float | None:
    values = [r[key] for r in rows.values() if r[key] is not None]
    return sum(values) / len(values) if values else None


def _plot_comparison(out: str) -> str | None:
    """mopd-vs-rl.png: each run's training reward per step against its cumulative student-sampled tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .utils import atomic_write

    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for name, label, color in (("mopd", "MOPD", "tab:red"), ("rl-continued", "RL continued", "tab:blue")):
        steps = [r for r in _read_log_if_any(os.path.join(out, name)) if "loss_tokens" in r]
        if not steps:
            continue
        xs, total = [], 0
        for r in steps:
            total += r["loss_tokens"]
            xs.append(total)
        ys = [r["reward"] for r in steps]
        ax.plot(xs, ys, color=color, lw=0.8, alpha=0.35)
        ax.plot(xs, _ema(ys, 0.8), color=color, lw=1.8, label=f"{label} (EMA)", marker=".")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("student-sampled tokens since the RL student")
    ax.set_ylabel("mean reward of the step's samples")
    ax.set_title("hybridmoe posttrain: MOPD vs continued RL from the RL student")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "mopd-vs-rl.png")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def _machine() -> str:
    """The CPU's model name (Linux), architecture and core count."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({platform.machine()}, {os.cpu_count()} cores)"
