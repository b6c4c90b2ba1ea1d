"""Does GRPO raise held-out greedy accuracy? The environments before and after an RL run, side by side.

Runs, in this order, each step skipped when its output already exists under --out (so a run can be continued, and
the summary redone from finished runs):
  1. `hybridmoe eval envs INIT` (greedy, held-out seeds)                        -> OUT/before/envs.json
  2. `hybridmoe rl RECIPE model.init_from=INIT train.steps=S ...` per S in --steps, each resuming the one before
     (`--resume`, so 40 then 80 steps is one run with an evaluation in between)    -> --run-dir (default OUT/rl)
  3. `hybridmoe eval envs RUN_DIR` after each S                                    -> OUT/after-S/envs.json
then writes OUT/rl-gain.json, OUT/rl-gain.md (held-out accuracy per environment before and after each S, the
change, and issue 14's target: +10 points on at least 2 environments, none lower by more than 2) and
OUT/rl-gain.png (training reward per environment along the run; held-out accuracy before and after).

    python benchmarks/bench_rl_gain.py --init runs/speedrun/sft --out benchmarks/results/rl-gain \
        --run-dir runs/rl-gain --steps 40,80 -- \
        rl.prompts_per_step=28 optim.lr=2e-4 rl.pass_rate_filter.samples=4 rl.pass_rate_filter.drop_unsolved=true

Everything after `--` is a recipe override for the RL run. `--train-envs` trains on some of the `--envs` only (the
others are still evaluated, so that a loss there shows).
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = os.path.join(HERE, "..", "recipes", "tiny-rl.yaml")
ENVS = "math,code,calculator,retrieval,structured,instructions,terminal"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", required=True, help="the SFT model (a run directory or a model directory)")
    p.add_argument("--out", required=True, help="results folder (the evaluations and the summary)")
    p.add_argument("--run-dir", help="the RL run's folder (default: OUT/rl)")
    p.add_argument("--recipe", default=RECIPE)
    p.add_argument("--envs", default=ENVS, help="comma-separated environments to evaluate (and train on)")
    p.add_argument(
        "--train-envs",
        help="comma-separated environments trained on in equal shares (default: --envs); a subset of "
        "--envs, so that those left out are still checked for losses",
    )
    p.add_argument("--steps", default="40,80", help="comma-separated step counts to evaluate after")
    p.add_argument("--samples", type=int, default=200, help="held-out episodes per environment")
    p.add_argument("overrides", nargs="*", help="recipe overrides for the RL run (after --)")
    a = p.parse_args()
    steps = [int(s) for s in a.steps.split(",")]
    if not steps or steps != sorted(set(steps)) or steps[0] < 1:
        p.error(f"--steps {a.steps}: give increasing positive step counts, e.g. 40,80")
    envs = (a.train_envs or a.envs).split(",")
    if not set(envs) <= set(a.envs.split(",")):
        p.error(f"--train-envs {a.train_envs}: every environment trained on must be evaluated too (in --envs {a.envs})")
    os.makedirs(a.out, exist_ok=True)
    run_dir = a.run_dir = a.run_dir or os.path.join(a.out, "rl")
    evaluate(a.init, os.path.join(a.out, "before"), a)
    ratios = "{" + ", ".join(f"{e}: {1 / len(envs):.4f}" for e in envs) + "}"
    for i, s in enumerate(steps):
        after = os.path.join(a.out, f"after-{s}")
        if not os.path.exists(os.path.join(after, "envs.json")):
            # train.keep_every: the checkpoints evaluated stay (keep_last would rotate them away)
            cmd = ["hybridmoe", "rl", a.recipe, f"model.init_from={a.init}", f"train.steps={s}",
                   f"envs.ratios={ratios}", f"train.out_dir={run_dir}", "train.tensorboard=false",
                   f"train.keep_every={math.gcd(*steps)}"]  # fmt: skip
            cmd += a.overrides
            if i > 0:
                cmd.append("--resume")
            sh(cmd)
        evaluate(run_dir, after, a)
    result = summarize(a, steps)
    with open(os.path.join(a.out, "rl-gain.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    table = markdown(result)
    with open(os.path.join(a.out, "rl-gain.md"), "w") as fh:
        fh.write(table)
    print(table)
    plot(result, os.path.join(a.out, "rl-gain.png"))


def sh(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def evaluate(checkpoint: str, out: str, a) -> None:
    if os.path.exists(os.path.join(out, "envs.json")):
        return
    sh(["hybridmoe", "eval", "envs", checkpoint, "--envs", a.envs, "--samples", str(a.samples), "--max-new-tokens",
        "128", "--max-num-seqs", "50", "--max-model-len", "1024", "--reasoning", "on", "--out", out])  # fmt: skip


def accuracy(path: str) -> dict[str, dict[str, float]]:
    with open(os.path.join(path, "envs.json")) as fh:
        return {r["env"]: {"accuracy": r["accuracy"], "solved": r["solved"]} for r in json.load(fh)["summary"]}


def summarize(a, steps: list[int]) -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if sys.platform == "linux" else ""
    log = os.path.join(a.run_dir, "log.jsonl")
    with open(log) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    train = [r for r in records if "reward" in r and "step" in r]
    before = accuracy(os.path.join(a.out, "before"))
    after = {s: accuracy(os.path.join(a.out, f"after-{s}")) for s in steps}
    last = after[steps[-1]]
    # in points, rounded so that 0.30 - 0.20 counts as the 10 points it is
    change = {e: round(100 * (last[e]["accuracy"] - before[e]["accuracy"]), 6) for e in before}
    gained = sorted(e for e, d in change.items() if d >= 10)
    lowered = sorted(e for e, d in change.items() if d < -2)
    return {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "avx512_bf16": "avx512_bf16" in lscpu,
        },  # fmt: skip
        "settings": {
            "init": a.init,
            "recipe": a.recipe,
            "envs": a.envs,
            "train_envs": a.train_envs or a.envs,
            "steps": steps,
            "samples": a.samples,
            "overrides": a.overrides,
        },  # fmt: skip
        "before": before,
        "after": {str(s): v for s, v in after.items()},
        "change_points": change,
        "target": {"gained_10": gained, "lowered_more_than_2": lowered, "met": len(gained) >= 2 and not lowered},
        "train": [{k: v for k, v in r.items() if k == "step" or k.startswith("reward")} for r in train],
    }


def markdown(result: dict) -> str:
    steps = result["settings"]["steps"]
    head = "| environment | before | " + " | ".join(f"after {s} steps" for s in steps) + " | change |"
    lines = [head, "|---|" + "---:|" * (len(steps) + 2)]
    for env, b in result["before"].items():
        cells = [f"{100 * b['accuracy']:.1f}%"] + [
            f"{100 * result['after'][str(s)][env]['accuracy']:.1f}%" for s in steps
        ]
        lines.append(f"| {env} | " + " | ".join(cells) + f" | {result['change_points'][env]:+.1f} |")
    t = result["target"]
    lines.append("")
    lines.append(f"Held-out greedy accuracy (mean reward), {result['settings']['samples']} episodes per environment. "
                 f"+10 points or more: {t['gained_10'] or 'none'}; lower by more than 2: "
                 f"{t['lowered_more_than_2'] or 'none'}; target {'met' if t['met'] else 'not met'}.")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    envs = list(result["before"])
    for env in envs:
        points = [(r["step"], r[f"reward_{env}"]) for r in result["train"] if f"reward_{env}" in r]
        if not points:
            continue
        xs, ys = zip(*points)
        k = 5  # a 5-step running mean: one step holds only a few groups of an environment
        smooth = [sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))]
        left.plot(xs, smooth, label=env)
    left.set_xlabel("RL step")
    left.set_ylabel("training reward (5-step mean)")
    left.set_title("GRPO: reward of the sampled trajectories")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    columns = [("before", result["before"])] + [
        (f"after {s}", result["after"][str(s)]) for s in result["settings"]["steps"]
    ]
    width = 0.8 / len(columns)
    for i, (label, acc) in enumerate(columns):
        right.bar(
            [j + i * width for j in range(len(envs))], [100 * acc[e]["accuracy"] for e in envs], width, label=label
        )
    right.set_xticks([j + width * (len(columns) - 1) / 2 for j in range(len(envs))], envs, rotation=30, fontsize=8)
    right.set_ylabel("held-out accuracy, greedy (%)")
    right.set_title("held-out environments, greedy pass@1")
    right.legend(fontsize=8)
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
