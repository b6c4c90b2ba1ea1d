"""MOPD's recovery of each teacher's gain (issue 15) against the number of held-out tasks it is measured on.

Takes finished `hybridmoe posttrain` runs (typically one per MOPD seed, sharing the SFT model and the teachers),
evaluates the SFT model, every teacher (on its own domains) and every run's MOPD student once on the largest
--samples (the settings posttrain uses: greedy, reasoning on, difficulty 1, 128 new tokens per turn), and reads
the smaller counts as the first tasks of the same list (held-out seeds are taken in order, so 40 tasks are the first
40 of 400 and get the same answers). Per count and domain: the teacher's gain with its paired standard error, each
seed's recovery (MOPD - SFT) / (teacher - SFT), their mean and range.

    python benchmarks/bench_recovery.py runs/pt60 runs/pt60-seed1 runs/pt60-seed2 --samples 40,200,400 \
        --out benchmarks/results/recovery-by-samples

Evaluations are cached under OUT/eval (one per checkpoint); writes OUT/recovery.json, OUT/recovery.md and
OUT/recovery.png (each seed's recovery against the task count, for the domains whose teacher gains by more than two
standard errors on the largest count; the 80% target as a line).
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

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


def evaluate(ckpt: str, domains: list[str], samples: int, cache: str) -> list[dict]:
    """The records of `ckpt` on `domains` (`samples` tasks each), evaluated once and cached."""
    from hybridmoe.eval.tasks import evaluate_tasks, write_task_report
    from hybridmoe.serve.load import load_model

    key = hashlib.sha1(json.dumps([os.path.realpath(ckpt), sorted(domains), samples]).encode()).hexdigest()[:12]
    path = os.path.join(cache, key)
    if os.path.exists(os.path.join(path, "tasks.json")):
        with open(os.path.join(path, "tasks.json")) as fh:
            return json.load(fh)["records"]
    plan = PostPlan()
    model, tok = load_model(ckpt)
    result = evaluate_tasks(
        model, tok, domains, samples, max_num_seqs=plan.eval_max_num_seqs, checkpoint=ckpt,
        max_model_len=min(2048, model.config.max_position_embeddings), difficulty=plan.task_difficulty,
        reasoning="on", max_new_tokens=plan.task_max_new_tokens, overlap_seeds=0, progress=False,
    )  # fmt: skip
    if result.run.get("not_evaluated"):
        raise RuntimeError(f"{ckpt}: {result.run['not_evaluated']} tasks not evaluated")
    write_task_report(result, path)
    print(f"evaluated {ckpt} on {', '.join(domains)} ({samples} tasks each): {path}", flush=True)
    return result.records


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="finished posttrain run directories (one per MOPD seed)")
    p.add_argument("--samples", default="40,200,400", help="comma-separated task counts per domain")
    p.add_argument("--out", required=True, help="results folder")
    a = p.parse_args()
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
    sft = evaluate(first["SFT"]["checkpoint"], list(groups), counts[-1], cache)
    teachers = {label.removeprefix("teacher "): evaluate(e["checkpoint"], e["domains"], counts[-1], cache)
                for label, e in first.items() if label.startswith("teacher ")}  # fmt: skip
    mopd = [evaluate(r["evaluations"]["MOPD student"]["checkpoint"], list(groups), counts[-1], cache) for r in runs]

    rows = []
    for n in counts:
        base = Prefix(sft, n)
        for domain, group in groups.items():
            if group not in teachers:
                continue
            teacher = Prefix(teachers[group], n)
            before, after_t = base.accuracy(domain), teacher.accuracy(domain)
            students = [Prefix(m, n).accuracy(domain) for m in mopd]
            rec = [recovery(before, s, after_t) for s in students]
            rows.append({
                "samples": n, "domain": domain, "group": group, "sft": before, "teacher": after_t,
                "teacher_gain": after_t - before, "teacher_gain_se": paired_se(base, teacher, domain),
                "mopd": students, "recovery": rec,
                "recovery_mean": statistics.fmean(rec) if None not in rec else None,
            })  # fmt: skip
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if sys.platform == "linux" else ""
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "")
    result = {
        "machine": {"cpu": cpu or platform.processor(), "cpus": os.cpu_count(), "avx512_bf16": "avx512_bf16" in lscpu},
        "runs": [os.path.abspath(r) for r in a.runs], "seeds": [r["plan"].get("seed") for r in runs],
        "counts": counts, "rows": rows,
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
    lines = [
        f"| tasks per domain | domain | SFT | teacher | teacher's gain ± SE | MOPD, seed {seeds} | recovery, seed "
        f"{seeds} | mean |",
        "|---:|---|---:|---:|---:|---|---|---:|",
    ]
    for r in result["rows"]:
        se = f" ± {100 * r['teacher_gain_se']:.1f}" if r["teacher_gain_se"] is not None else ""
        rec = " / ".join("n/a" if v is None else f"{100 * v:.0f}%" for v in r["recovery"])
        mean = "n/a (teacher did not gain)" if r["recovery_mean"] is None else f"{100 * r['recovery_mean']:.0f}%"
        lines.append(f"| {r['samples']} | {r['domain']} | {pct(r['sft'])} | {pct(r['teacher'])} | "
                     f"{100 * r['teacher_gain']:+.1f}{se} | {' / '.join(pct(v) for v in r['mopd'])} | {rec} | "
                     f"{mean} |")  # fmt: skip
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
    fig, axes = plt.subplots(1, len(gaining), figsize=(4.2 * len(gaining), 3.6), squeeze=False)
    for ax, domain in zip(axes[0], gaining):
        rows = [r for r in result["rows"] if r["domain"] == domain]
        for i, seed in enumerate(result["seeds"]):
            xs = [result["counts"].index(r["samples"]) for r in rows if r["recovery"][i] is not None]
            ys = [100 * r["recovery"][i] for r in rows if r["recovery"][i] is not None]
            ax.plot(xs, ys, "o-", alpha=0.7, label=f"seed {seed}")
        ax.axhline(80, color="gray", ls="--", lw=1, label="target 80%")
        ax.set_xticks(range(len(result["counts"])), [str(c) for c in result["counts"]])
        ax.set_xlabel("held-out tasks per domain")
        ax.set_ylabel("MOPD recovery of the teacher's gain (%)")
        gains = ", ".join(f"{100 * r['teacher_gain']:+.1f}" for r in rows)
        ax.set_title(f"{domain} (teacher's gain {gains})", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
