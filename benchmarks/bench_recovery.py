"""MOPD's recovery of each teacher's gain (issue 15) against the number of held-out tasks it is measured on.

Takes finished `hybridmoe posttrain` runs (typically one per MOPD seed, sharing the SFT model and the teachers),
evaluates the SFT model, every teacher (on its own domains), the RL student and every run's MOPD student once on the
largest --samples (the settings posttrain uses: greedy, reasoning on, difficulty 1, 128 new tokens per turn), and
reads the smaller counts as the first tasks of the same list (held-out seeds are taken in order, so 40 tasks are the
first 40 of 400 and get the same answers). A run's own evaluation (its eval/ folder, from `posttrain --samples N`)
is read instead of evaluating again when it has at least the largest count at those settings. The teachers and the
RL student are the first run's. Per count and domain: the teacher's gain with its paired standard error, and each
seed's recovery with its mean, both from the SFT model, (MOPD - SFT) / (teacher - SFT), and from the RL student
(MOPD's starting point), (MOPD - RL student) / (teacher - RL student); each mean with a 95% bootstrap interval over
the tasks (resampled together for every model, so what the interval shows is how far the same models could land on
another draw of held-out tasks; the seeds' spread is shown beside it).

    python benchmarks/bench_recovery.py runs/pt60 runs/pt60-seed1 runs/pt60-seed2 --samples 40,200,400 \
        --out benchmarks/results/recovery-by-samples

--offset N measures on a fresh slice of the held-out split (seeds from N on; the runs' own evaluations, at offset 0,
are then not read) and --domains a subset of the runs' domains: a check of a figure on tasks that played no part in
choosing the recipe behind it.

Evaluations are cached under OUT/eval (one per checkpoint); writes OUT/recovery.json, OUT/recovery.md and
OUT/recovery.png (each seed's recovery against the task count, from the SFT model and from the RL student, for the
domains whose teacher gains by more than two standard errors on the largest count; the means with their intervals;
the 80% target as a line).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from hybridmoe.eval.tasks import TaskEvalSettings  # noqa: E402
from hybridmoe.posttrain import PostPlan, paired_se, recovery  # noqa: E402
from hybridmoe.utils import atomic_write_text  # noqa: E402


class Prefix:
    """The first `n` tasks per domain of an evaluation's records (what `paired_se` and accuracy need)."""

    def __init__(self, records: list[dict], n: int):
        seen: dict[str, int] = {}
        self.records = []
        for r in records:
            if r["reasoning"] == "on" and seen.get(r["domain"], 0) < n:
                seen[r["domain"]] = seen.get(r["domain"], 0) + 1
                self.records.append(r)

    def accuracy(self, domain: str) -> float | None:
        rewards = [r["reward"] for r in self.records if r["domain"] == domain]
        return statistics.fmean(rewards) if rewards else None

    def rewards(self, domain: str) -> dict[tuple, float]:
        return {(r["seed"], r.get("sample", 0)): r["reward"] for r in self.records if r["domain"] == domain}


def recovery_interval(before: dict, teacher: dict, students: list[dict], resamples: int = 2000,
                      seed: int = 0) -> dict | None:  # fmt: skip
    """A 95% percentile bootstrap interval of the seeds' mean recovery, (student - before) / (teacher - before)
    averaged over `students`, resampling the tasks (every model's reward on the same drawn tasks, so the pairing that
    makes the gains precise is kept). Each argument maps a task (seed, sample) to its reward; None when the models were
    not evaluated on the same tasks. `undefined`: the share of resamples in which the teacher is not above `before`
    (left out of the interval: where it is above 0.025, the interval's upper end is not bounded)."""
    tasks = sorted(before)
    if not tasks or any(set(m) != set(tasks) for m in (teacher, *students)):
        return None
    idx = np.random.default_rng(seed).integers(0, len(tasks), size=(resamples, len(tasks)))

    def means(m: dict) -> np.ndarray:
        return np.asarray([m[t] for t in tasks], dtype=np.float64)[idx].mean(1)

    b, lead = means(before), means(teacher) - means(before)
    ok = lead > 0
    if not ok.any():
        return None
    rec = np.mean([(means(s) - b)[ok] / lead[ok] for s in students], axis=0)
    low, high = np.percentile(rec, [2.5, 97.5])
    return {"low": float(low), "high": float(high), "undefined": float(1 - ok.mean()), "resamples": resamples}


def evaluate(ckpt: str, domains: list[str], samples: int, cache: str, offset: int = 0) -> list[dict]:
    """The records of `ckpt` on `domains` (`samples` tasks each, held-out seeds from `offset`), evaluated once and
    cached."""
    from hybridmoe.eval.tasks import evaluate_tasks, write_task_report
    from hybridmoe.serve.load import load_model

    what = [os.path.realpath(ckpt), sorted(domains), samples] + ([offset] if offset else [])
    key = hashlib.sha1(json.dumps(what).encode()).hexdigest()[:12]
    path = os.path.join(cache, key)
    if os.path.exists(os.path.join(path, "tasks.json")):
        with open(os.path.join(path, "tasks.json")) as fh:
            return json.load(fh)["records"]
    plan = PostPlan()
    model, tok = load_model(ckpt)
    result = evaluate_tasks(
        model, tok, domains, samples, max_num_seqs=plan.eval_max_num_seqs, checkpoint=ckpt,
        max_model_len=min(2048, model.config.max_position_embeddings), difficulty=plan.task_difficulty,
        reasoning="on", max_new_tokens=plan.task_max_new_tokens, overlap_seeds=0, progress=False, offset=offset,
    )  # fmt: skip
    if result.run.get("not_evaluated"):
        raise RuntimeError(f"{ckpt}: {result.run['not_evaluated']} tasks not evaluated")
    write_task_report(result, path)
    print(f"evaluated {ckpt} on {', '.join(domains)} ({samples} tasks each from seed {offset}): {path}", flush=True)
    return result.records


def run_records(run_dir: str, evaluation: dict, domains: list[str], samples: int, offset: int = 0) -> list[dict] | None:
    """A posttrain run's own evaluation (`evaluation`: an entry of its posttrain.json) when it is of the entry's
    checkpoint, covers `domains` with at least `samples` tasks each at the settings `evaluate` uses and left no task
    out; else None."""
    path = os.path.join(run_dir, evaluation.get("path") or "", "tasks.json")
    if not evaluation.get("path") or not os.path.exists(path):
        return None
    with open(path) as fh:
        data = json.load(fh)
    run, settings = data["run"], data["run"].get("settings", {})
    plan = PostPlan()
    want = {k: v for k, v in vars(TaskEvalSettings()).items() if k not in ("samples", "overlap_seeds")}
    want.update(difficulty=plan.task_difficulty, reasoning="on", max_new_tokens=plan.task_max_new_tokens, offset=offset)
    recorded = os.path.join(run_dir, run.get("checkpoint") or "")  # relative to the run, or absolute
    if os.path.realpath(recorded) != os.path.realpath(evaluation.get("checkpoint") or ""):
        return None  # an evaluation of another checkpoint
    if (run.get("not_evaluated") or any(settings.get(k) != v for k, v in want.items())
            or settings.get("samples", 0) < samples or not set(domains) <= set(run.get("domains", []))):  # fmt: skip
        return None
    return data["records"]


def records(run_dir: str, run: dict, label: str, domains: list[str], samples: int, cache: str,
            offset: int = 0) -> list[dict]:  # fmt: skip
    """The records of the evaluation `label` of a run: its own when it has enough tasks, else evaluated once."""
    evaluation = run["evaluations"][label]
    own = run_records(run_dir, evaluation, domains, samples, offset)
    if own is not None:
        print(f"{label}: {run_dir}/{evaluation['path']} ({samples} tasks each from the run's own evaluation)")
        return own
    return evaluate(evaluation["checkpoint"], domains, samples, cache, offset)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="finished posttrain run directories (one per MOPD seed)")
    p.add_argument("--samples", default="40,200,400", help="comma-separated task counts per domain")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--offset", type=int, default=0, help="first held-out seed (a fresh slice of the split)")
    p.add_argument("--domains", help="comma-separated domains of the runs (default: all of them)")
    a = p.parse_args()
    if a.offset < 0:
        p.error(f"--offset {a.offset}: give a seed offset of 0 or more")
    counts = sorted({int(n) for n in a.samples.split(",")})
    if not counts or counts[0] < 2:
        p.error(f"--samples {a.samples}: give task counts of at least 2")
    cache = os.path.join(a.out, "eval")
    runs = []
    for run in a.runs:
        with open(os.path.join(run, "posttrain.json")) as fh:
            runs.append(json.load(fh))
    first = runs[0]["evaluations"]
    if any(r["evaluations"]["SFT"]["checkpoint"] != first["SFT"]["checkpoint"] for r in runs):
        p.error("the runs start from different SFT models: give seeds of one run")
    groups = {d: row["group"] for d, row in runs[0]["domains"].items()}
    if a.domains:
        asked = [d.strip() for d in a.domains.split(",") if d.strip()]
        unknown = [d for d in asked if d not in groups]
        if unknown or not asked:
            p.error(f"--domains {a.domains}: the runs' domains are {', '.join(groups)}")
        groups = {d: groups[d] for d in asked}
    most, offset = counts[-1], a.offset
    sft = records(a.runs[0], runs[0], "SFT", list(groups), most, cache, offset)
    teachers = {}
    for label, e in first.items():
        own = [d for d in e["domains"] if d in groups]
        if label.startswith("teacher ") and own:
            teachers[label.removeprefix("teacher ")] = records(a.runs[0], runs[0], label, own, most, cache, offset)
    student = (records(a.runs[0], runs[0], "RL student", list(groups), most, cache, offset)
               if "RL student" in first else None)  # fmt: skip
    mopd = [records(d, r, "MOPD student", list(groups), most, cache, offset) for d, r in zip(a.runs, runs)]

    rows = []
    for n in counts:
        base = Prefix(sft, n)
        rl = Prefix(student, n).accuracy if student is not None else lambda domain: None
        for domain, group in groups.items():
            if group not in teachers:
                continue
            teacher = Prefix(teachers[group], n)
            before, after_t = base.accuracy(domain), teacher.accuracy(domain)
            students = [Prefix(m, n).accuracy(domain) for m in mopd]
            rec = [recovery(before, s, after_t) for s in students]
            rec_rl = [recovery(rl(domain), s, after_t) for s in students]
            each = [Prefix(m, n).rewards(domain) for m in mopd]
            ci = recovery_interval(base.rewards(domain), teacher.rewards(domain), each) if None not in rec else None
            ci_rl = (recovery_interval(Prefix(student, n).rewards(domain), teacher.rewards(domain), each)
                     if None not in rec_rl else None)  # fmt: skip
            rows.append({
                "samples": n, "domain": domain, "group": group, "sft": before, "teacher": after_t,
                "teacher_gain": after_t - before, "teacher_gain_se": paired_se(base, teacher, domain),
                "rl_student": rl(domain), "mopd": students, "recovery": rec,
                "recovery_mean": statistics.fmean(rec) if None not in rec else None, "recovery_mean_ci": ci,
                "recovery_from_rl": rec_rl,
                "recovery_from_rl_mean": statistics.fmean(rec_rl) if None not in rec_rl else None,
                "recovery_from_rl_mean_ci": ci_rl,
            })  # fmt: skip
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if sys.platform == "linux" else ""
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "")
    result = {
        "machine": {"cpu": cpu or platform.processor(), "cpus": os.cpu_count(), "avx512_bf16": "avx512_bf16" in lscpu},
        "runs": [os.path.abspath(r) for r in a.runs], "seeds": [r["plan"].get("seed") for r in runs],
        "counts": counts, "offset": offset, "rows": rows,
    }  # fmt: skip
    os.makedirs(a.out, exist_ok=True)
    atomic_write_text(os.path.join(a.out, "recovery.json"), json.dumps(result, indent=1))
    table = markdown(result)
    atomic_write_text(os.path.join(a.out, "recovery.md"), table)
    print(table)
    plot(result, os.path.join(a.out, "recovery.png"))
    return 0


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def markdown(result: dict) -> str:
    seeds = " / ".join(str(s) for s in result["seeds"])

    def seeds_and_mean(values: list, mean: float | None, ci: dict | None) -> str:
        each = " / ".join("n/a" if v is None else f"{100 * v:.0f}%" for v in values)
        if mean is None:
            return f"{each} | n/a (teacher did not gain)"
        if ci is None:
            return f"{each} | {100 * mean:.0f}%"
        lead = f"; teacher's lead gone in {100 * ci['undefined']:.2g}% of resamples" if ci["undefined"] else ""
        return f"{each} | {100 * mean:.0f}% ({100 * ci['low']:.0f} to {100 * ci['high']:.0f}{lead})"

    lines = [
        f"| tasks per domain | domain | SFT | teacher | teacher's gain ± SE | RL student | MOPD, seed {seeds} | "
        f"recovery from SFT, seed {seeds} | mean (95% interval over tasks) | recovery from the RL student, seed "
        f"{seeds} | mean (95% interval over tasks) |",
        "|---:|---|---:|---:|---:|---:|---|---|---:|---|---:|",
    ]
    for r in result["rows"]:
        se = f" ± {100 * r['teacher_gain_se']:.1f}" if r["teacher_gain_se"] is not None else ""
        from_sft = seeds_and_mean(r["recovery"], r["recovery_mean"], r.get("recovery_mean_ci"))
        from_rl = seeds_and_mean(r.get("recovery_from_rl", []), r.get("recovery_from_rl_mean"),
                                 r.get("recovery_from_rl_mean_ci"))  # fmt: skip
        lines.append(f"| {r['samples']} | {r['domain']} | {pct(r['sft'])} | {pct(r['teacher'])} | "
                     f"{100 * r['teacher_gain']:+.1f}{se} | {pct(r.get('rl_student'))} | "
                     f"{' / '.join(pct(v) for v in r['mopd'])} | {from_sft} | {from_rl} |")  # fmt: skip
    if result.get("offset"):
        lines.append(f"\nHeld-out tasks from seed {result['offset']} of the split on.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the domains whose teacher gains by more than two standard errors on the largest count
    largest = [r for r in result["rows"] if r["samples"] == result["counts"][-1]]
    gaining = [r["domain"] for r in largest if r["teacher_gain_se"] and r["teacher_gain"] > 2 * r["teacher_gain_se"]]
    if not gaining:
        return
    measures = [("recovery", "from the SFT model")]
    if any(v is not None for r in largest for v in r.get("recovery_from_rl", [])):
        measures.append(("recovery_from_rl", "from the RL student"))
    fig, axes = plt.subplots(len(measures), len(gaining), figsize=(4.2 * len(gaining), 3.6 * len(measures)),
                             squeeze=False)  # fmt: skip
    for row, (key, origin) in zip(axes, measures):
        for ax, domain in zip(row, gaining):
            rows = [r for r in result["rows"] if r["domain"] == domain]
            for i, seed in enumerate(result["seeds"]):
                xs = [result["counts"].index(r["samples"]) for r in rows if r[key][i] is not None]
                ys = [100 * r[key][i] for r in rows if r[key][i] is not None]
                ax.plot(xs, ys, "o-", alpha=0.7, label=f"seed {seed}")
            means = [(result["counts"].index(r["samples"]), 100 * r[f"{key}_mean"]) for r in rows
                     if r[f"{key}_mean"] is not None]  # fmt: skip
            if means:
                ax.plot(*zip(*means), "k_", ms=18, mew=2, label="mean of the seeds")
            cis = [(result["counts"].index(r["samples"]) + 0.04, 100 * r[f"{key}_mean"], r.get(f"{key}_mean_ci"))
                   for r in rows if r[f"{key}_mean"] is not None and r.get(f"{key}_mean_ci")]  # fmt: skip
            if cis:
                x, y, c = zip(*cis)
                err = [[v - 100 * ci["low"] for v, ci in zip(y, c)], [100 * ci["high"] - v for v, ci in zip(y, c)]]
                ax.errorbar(x, y, yerr=err, fmt="none", ecolor="k", capsize=3, lw=1,
                            label="mean's 95% interval over tasks")  # fmt: skip
            ax.axhline(80, color="gray", ls="--", lw=1, label="target 80%")
            ax.set_xticks(range(len(result["counts"])), [str(c) for c in result["counts"]])
            ax.set_xlabel("held-out tasks per domain")
            ax.set_ylabel(f"recovery {origin} (%)")
            start = "sft" if key == "recovery" else "rl_student"
            gains = " / ".join(f"{100 * (r['teacher'] - r[start]):+.1f}" for r in rows if r[start] is not None)
            counts = " / ".join(str(r["samples"]) for r in rows if r[start] is not None)
            ax.set_title(f"{domain}: teacher's gain {origin}\n{gains} points on {counts} tasks", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
