"""Synchronous against asynchronous GRPO rollouts at the same settings: trajectories per second and reward curves.

Runs the RL stage (`hybridmoe.train.rl`) twice from the same SFT checkpoint, once with `rl.rollout=sync`
(generation on the trainer's in-process engine, then the optimizer step: staleness 0) and once with
`rl.rollout=async` and `rl.max_staleness=1` (a `hybridmoe serve` worker process generates the next batch while the
trainer steps). Same environments, prompts, group size, learning rate and seed. Trajectories per second = the
trajectories trained on / the wall time of the steps (the log's step_s, the first step, which starts the engine or
the worker, left out). Writes benchmarks/results/rl-async.json and benchmarks/rl-async.png (both reward curves).

`--repeats N` runs N such pairs, in alternating order (sync first, then async first, ...): the same synchronous run
(deterministic: the same samples every time) took from 1.41 to 1.72 s a step on one 2-core VM, so one pair can be off
by the machine's drift. The speedup printed and saved is the pooled one (all pairs' trajectories over their seconds,
per mode), with each pair's beside it.

`--bound` runs the synchronous stage once more on one thread and splits every step into generation (the log's
rollout_s) and the rest (step_s - rollout_s: forward, backward, optimizer, weights to the engine). With G1, T1 the
one-thread seconds of a step's generation and training and G2, T2 the two-thread ones, no schedule of the same work
on 2 cores takes less than (G1 + T1) / 2 per step, if one thread is the most core-efficient way to run each
(nothing scales superlinearly): asynchronous rollouts then gain at most 2 (G2 + T2) / (G1 + T1) over synchronous
ones, and at most (G2 + T2) / max(G1, T1) with one core each.

    python benchmarks/bench_rl_async.py --init runs/speedrun/sft --steps 12
    python benchmarks/bench_rl_async.py --init runs/speedrun/sft --steps 12 --bound \
        --out benchmarks/results/rl-async-bound.json
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time

import torch

from hybridmoe.train.config import RLRecipe
from hybridmoe.train.metrics import read_log
from hybridmoe.train.rl import rl

HERE = os.path.dirname(os.path.abspath(__file__))


def recipe(init: str, out_dir: str, a, rollout: str) -> RLRecipe:
    return RLRecipe.from_dict(
        {
            "model": {"init_from": init},
            "envs": {"ratios": {name: 1.0 for name in a.envs.split(",")}, "difficulty": 1},
            "rl": {
                "group_size": a.group_size,
                "prompts_per_step": a.prompts_per_step,
                "max_new_tokens": a.max_new_tokens,
                "temperature": 1.0,
                "pass_rate_filter": {"samples": 0},
                "max_model_len": 1024,
                "rollout": rollout,
                "max_staleness": 1 if rollout == "async" else 0,
                "workers": 1,
                "stream_groups": not a.no_stream_groups,
            },  # fmt: skip
            "optim": {"lr": a.lr, "min_lr": a.lr, "schedule": "constant", "weight_decay": 0.0},
            "train": {
                "steps": a.steps,
                "out_dir": out_dir,
                "seed": 0,
                "keep_last": 1,
                "tensorboard": False,
                "progress": False,
            },  # fmt: skip
        }
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", required=True, help="the SFT model (a run directory or a model directory)")
    p.add_argument("--envs", default="math,structured,instructions")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--async-trainer-threads", type=int, default=None,
                   help="torch threads of the trainer in the async run (default: as in the sync run); the worker "
                        "has 1, so 1 here splits 2 cores between them")  # fmt: skip
    p.add_argument(
        "--bound",
        action="store_true",
        help="also run the synchronous stage on 1 thread: the most asynchronous rollouts can gain here",
    )
    p.add_argument(
        "--no-stream-groups",
        action="store_true",
        help="async: take each batch whole (rl.stream_groups=false), not its groups as they come",
    )
    p.add_argument("--repeats", type=int, default=1,
                   help="sync/async pairs, run in alternating order (the machine's speed drifts between runs); the "
                        "speedup is the pooled one, trajectories over seconds of all pairs")  # fmt: skip
    p.add_argument("--out", default=os.path.join(HERE, "results", "rl-async.json"))
    a = p.parse_args()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "avx512_bf16": "avx512_bf16" in lscpu,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "settings": vars(a),
        "runs": {},
    }
    tmp = tempfile.mkdtemp(prefix="bench-rl-async-")
    try:
        result["repeats"] = []
        for i in range(a.repeats):
            # alternate the order, so that a drift in the machine's speed does not favour one mode
            order = ("sync", "async") if i % 2 == 0 else ("async", "sync")
            pair = {mode: run_mode(a, mode, os.path.join(tmp, f"{mode}-{i}")) for mode in order}
            result["repeats"].append(pair)
            if i == 0:
                result["runs"] = {mode: pair[mode] for mode in ("sync", "async")}
            ratio = pair["async"]["trajectories_per_s"] / pair["sync"]["trajectories_per_s"]
            print(f"repeat {i + 1}: async / sync {ratio:.2f}x", flush=True)
        if a.bound:
            result["runs"]["sync-1thread"] = run_mode(a, "sync-1thread", os.path.join(tmp, "sync-1thread"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = [p["async"]["trajectories_per_s"] / p["sync"]["trajectories_per_s"] for p in result["repeats"]]
    pooled = {mode: sum(p[mode]["trajectories"] for p in result["repeats"])
              / sum(p[mode]["seconds"] for p in result["repeats"]) for mode in ("sync", "async")}  # fmt: skip
    result["speedup"] = pooled["async"] / pooled["sync"]
    result["speedups"] = ratios
    result["speedup_median"] = statistics.median(ratios)
    print(
        f"async / sync: {result['speedup']:.2f}x trajectories per second ({pooled['async']:.2f} / "
        f"{pooled['sync']:.2f}, over {a.repeats} pair(s); per pair {', '.join(f'{r:.2f}x' for r in ratios)})"
    )
    if a.bound:
        result["bound"] = bound(result["runs"]["sync"], result["runs"]["sync-1thread"])
        b = result["bound"]
        print(f"per step, generation / rest: {b['G2']:.2f} / {b['T2']:.2f} s on 2 threads, {b['G1']:.2f} / "
              f"{b['T1']:.2f} s on 1 thread; async can gain at most {b['any_schedule']:.2f}x on these 2 cores, "
              f"{b['one_core_each']:.2f}x with one core each")  # fmt: skip
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(result, fh, indent=1)
    plot(result, os.path.join(HERE, os.path.basename(a.out).replace(".json", ".png")))


def run_mode(a, mode: str, out_dir: str) -> dict:
    """One RL run from a.init in `mode` (sync, async or sync-1thread) and its figures over the steps after the first."""
    threads = torch.get_num_threads()
    if mode == "async" and a.async_trainer_threads:
        torch.set_num_threads(a.async_trainer_threads)
    if mode == "sync-1thread":
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        rl(recipe(a.init, out_dir, a, mode.split("-")[0]))
    finally:
        wall = time.perf_counter() - t0
        trainer_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    steps = [r for r in read_log(os.path.join(out_dir, "log.jsonl")) if "loss" in r]
    timed = steps[1:]
    trajectories = sum(r["trajectories"] for r in timed)
    seconds = sum(r["step_s"] for r in timed)
    run = {
        "trajectories_per_s": trajectories / seconds, "trajectories": trajectories, "seconds": seconds,
        "steps": len(steps), "wall_s": wall, "mean_step_s": seconds / len(timed), "trainer_threads": trainer_threads,
        "mean_rollout_s": sum(r["rollout_s"] for r in timed) / len(timed),
        "staleness_max": max(r["staleness_max"] for r in steps),
        "staleness_mean": sum(r["staleness_mean"] for r in steps) / len(steps),
        "reward": [r["reward"] for r in steps],
    }  # fmt: skip
    print(f"{mode:5s}: {trajectories / seconds:.2f} trajectories/s ({seconds / len(timed):.2f}s per step after the "
          f"first, {run['mean_rollout_s']:.2f}s of it generating or waiting), staleness max {run['staleness_max']}",
          flush=True)  # fmt: skip
    return run


def bound(two: dict, one: dict) -> dict:
    """The most asynchronous rollouts can gain over synchronous ones on 2 cores (see the module docstring), from a
    synchronous run on 2 threads and one on 1 thread (their mean seconds per step after the first)."""
    g2, g1 = two["mean_rollout_s"], one["mean_rollout_s"]
    t2, t1 = two["mean_step_s"] - g2, one["mean_step_s"] - g1
    return {"G2": g2, "T2": t2, "G1": g1, "T1": t1, "any_schedule": 2 * (g2 + t2) / (g1 + t1),
            "one_core_each": (g2 + t2) / max(g1, t1)}  # fmt: skip


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, run in result["runs"].items():
        if mode == "sync-1thread":
            continue
        label = f"{mode} ({run['trajectories_per_s']:.2f} trajectories/s, staleness <= {run['staleness_max']})"
        ax.plot(range(1, len(run["reward"]) + 1), run["reward"], marker=".", label=label)
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean reward of the step's samples")
    ax.set_title("GRPO rollouts: synchronous vs asynchronous (staleness 1)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
