"""Does the model call a tool again after a call fails? Tool calls per episode at temperature 1, and what follows a
failed first call, for one or more checkpoints side by side (issue 14: GRPO can only reinforce what the model
samples).

    python benchmarks/bench_tool_retries.py runs/speedrun/sft runs/rl --env terminal --tasks 24

Each checkpoint samples `--group` episodes (temperature 1, seed 0) of the same `--tasks` training-split tasks
(seeds 1,000,010,000 on). A call failed when its tool output is an error (`error: ...`) or reports a nonzero exit
status (`[exit code N]`). Results: benchmarks/results/tool-retries.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from hybridmoe.envs import EngineGenerator, make_envs, run_episodes  # noqa: E402
from hybridmoe.serve.load import load_engine  # noqa: E402
from hybridmoe.serve.sampling import SamplingParams  # noqa: E402
from hybridmoe.train.model import resolve_init  # noqa: E402
from hybridmoe.utils import atomic_write_text  # noqa: E402

FIRST_SEED = 1_000_010_000
_EXIT = re.compile(r"\[exit code (\d+)\]")


def failed(output: str) -> bool:
    """A tool output that reports a failure: an error text, or a nonzero exit status."""
    m = _EXIT.search(output)
    return output.startswith("error") or (m is not None and m.group(1) != "0")


def tally(trajectories) -> dict:
    """Calls per episode, and of the episodes whose first call failed: how many called again, how many then
    solved the task (full reward)."""
    calls, first_failed, again, solved = Counter(), 0, 0, 0
    for t in trajectories:
        outputs = [m["content"] for m in t.messages if m["role"] == "tool"]
        calls[len(outputs)] += 1
        if outputs and failed(outputs[0]):
            first_failed += 1
            again += len(outputs) > 1
            solved += len(outputs) > 1 and t.reward == 1
    n = len(trajectories)
    return {
        "episodes": n,
        "mean_reward": sum(t.reward for t in trajectories) / max(1, n),
        "calls_per_episode": {str(k): v for k, v in sorted(calls.items())},
        "first_call_failed": first_failed,
        "called_again_after_failure": again,
        "solved_after_failure": solved,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="model or run directories")
    p.add_argument("--env", default="terminal")
    p.add_argument("--tasks", type=int, default=24)
    p.add_argument("--group", type=int, default=8, help="samples per task")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "tool-retries.json"))
    a = p.parse_args()
    envs = make_envs([a.env])
    requests = [(a.env, FIRST_SEED + i) for i in range(a.tasks)]
    params = SamplingParams(temperature=1.0, max_tokens=a.max_new_tokens, logprobs=0)
    rows = []
    for ckpt in a.checkpoints:
        engine, tok = load_engine(resolve_init(ckpt), max_num_seqs=64, seed=0)  # a run directory: its newest
        trajectories = run_episodes(envs, requests, EngineGenerator(engine), tok, group_size=a.group, params=params,
                                    max_new_tokens=a.max_new_tokens)  # fmt: skip
        row = {"checkpoint": ckpt, **tally(trajectories)}
        rows.append(row)
        print(f"{ckpt}: {row['episodes']} episodes, mean reward {row['mean_reward']:.3f}, calls per episode "
              f"{row['calls_per_episode']}, first call failed in {row['first_call_failed']}: called again in "
              f"{row['called_again_after_failure']}, then solved {row['solved_after_failure']}")  # fmt: skip
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if sys.platform == "linux" else ""
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "avx512_bf16": "avx512_bf16" in lscpu},
        "env": a.env, "tasks": a.tasks, "group": a.group, "temperature": 1.0, "rows": rows,
    }  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    atomic_write_text(a.out, json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
