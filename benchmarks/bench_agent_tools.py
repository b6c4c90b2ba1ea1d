"""How long the agent loop's tool side takes: one sandboxed shell command, and rounds of terminal and code episodes
with their turns (tool calls, verification) taken one after another (`workers=1`) and on the loop's thread pool
(`workers=8`, the default), side by side in one run.

    python benchmarks/bench_agent_tools.py --init runs/speedrun/sft

Two sources of turns. A scripted generator answers every terminal turn with a shell call (`ls`, then `wc -l` of the
text files, then a final answer) and every code turn with a fixed function, so the time is the sandbox's and the
loop's, not a model's (it uses the model's tokenizer and chat template). Then the same episodes are sampled from the
model (temperature 1, a fixed seed, so both settings get the same tokens).
Results: benchmarks/results/agent-tools.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from hybridmoe.envs import Completion, EngineGenerator, make_envs, run_episodes, sandbox  # noqa: E402
from hybridmoe.envs.sandbox import ShellSession, isolation  # noqa: E402
from hybridmoe.serve.sampling import SamplingParams  # noqa: E402
from hybridmoe.utils import atomic_write_text  # noqa: E402

TERMINAL_TURNS = [
    "</think>\n<tool_call>\n<function=shell>\n<parameter=command>\nls\n</parameter>\n</function>\n</tool_call>\n",
    "</think>\n<tool_call>\n<function=shell>\n<parameter=command>\nwc -l *.txt\n</parameter>\n</function>\n"
    "</tool_call>\n",
    "</think>\nDone.",
]
CODE_TURN = "</think>\n```python\ndef f(x):\n    return x\n```"


class Scripted:
    """A Generator that writes the next scripted turn of each episode (by how many tool turns its prompt holds)."""

    def __init__(self, tok):
        self.tok, self.end = tok, tok.convert_tokens_to_ids("<|im_end|>")

    def generate(self, prompts, params):
        out = []
        for p in prompts:
            text = self.tok.decode(p, skip_special_tokens=False)
            if "shell" in text.split("<|im_start|>user", 2)[0]:  # the terminal's tool is in the system turn
                turn = TERMINAL_TURNS[min(text.count("<tool_response>"), len(TERMINAL_TURNS) - 1)]
            else:
                turn = CODE_TURN
            ids = self.tok(turn, add_special_tokens=False)["input_ids"] + [self.end]
            out.append(Completion(ids, [-1.0] * len(ids), "stop"))
        return out


def shell_latency(n: int, launchers: dict[str, str]) -> dict[str, dict]:
    """Milliseconds per sandboxed `ls`, each launcher file in turn, interleaved (n commands each)."""
    times = {name: [] for name in launchers}
    with ShellSession({"a.txt": "one\n", "b.log": "two\n"}) as s:
        s.run("true")  # the first run pays for imports
        for _ in range(n):
            for name, path in launchers.items():
                sandbox.LAUNCHER = path
                t0 = time.perf_counter()
                s.run("ls")
                times[name].append(time.perf_counter() - t0)
    sandbox.LAUNCHER = launchers["current"]
    return {name: {"launcher": launchers[name], "commands": n, "median_ms": 1000 * statistics.median(t),
                   "mean_ms": 1000 * statistics.fmean(t)} for name, t in times.items()}  # fmt: skip


def episodes(envs, env: str, generator, tok, prompts: int, group: int, workers: int, params) -> dict:
    requests = [(env, 1_000_000_000 + i) for i in range(prompts)]
    t0 = time.perf_counter()
    trajs = run_episodes(envs, requests, generator, tok, group_size=group, params=params, max_new_tokens=128,
                         workers=workers)  # fmt: skip
    seconds = time.perf_counter() - t0
    calls, reward = sum(t.num_tool_calls for t in trajs), statistics.fmean(t.reward for t in trajs)
    return {"env": env, "workers": workers, "episodes": len(trajs), "seconds": round(seconds, 3), "tool_calls": calls,
            "mean_reward": reward, "tokens": [t.token_ids for t in trajs]}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="the model (a model or run directory with its tokenizer)")
    p.add_argument("--prompts", type=int, default=14, help="prompts per environment (RL's share of a 28-prompt step)")
    p.add_argument("--group", type=int, default=8, help="episodes per prompt")
    p.add_argument("--commands", type=int, default=40, help="shell commands timed one by one")
    p.add_argument(
        "--launcher-before",
        help="another sandbox launcher file to time beside the current one (e.g. an earlier version's sandbox.py: "
        "git show REV:src/hybridmoe/envs/sandbox.py > /tmp/sandbox_before.py)",
    )
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "agent-tools.json"))
    a = p.parse_args()
    from hybridmoe.serve.load import load_engine
    from hybridmoe.train.model import resolve_init

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if sys.platform == "linux" else ""
    model_name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "")
    result = {
        "machine": {"cpu": model_name or platform.processor(), "cpus": os.cpu_count(),
                    "avx512_bf16": "avx512_bf16" in lscpu, "python": platform.python_version()},
        "isolation": isolation().summary(),
        "rows": [],
    }  # fmt: skip
    launchers = {"current": sandbox.LAUNCHER} | ({"before": os.path.abspath(a.launcher_before)}
                                                 if a.launcher_before else {})  # fmt: skip
    shells = shell_latency(a.commands, launchers)
    result["shell"] = shells["current"]
    if "before" in shells:
        result["shell_before"] = shells["before"]
    for name, r in shells.items():
        print(f"one sandboxed shell command ({name} launcher): median {r['median_ms']:.1f} ms", flush=True)
    envs = make_envs(["terminal", "code"])
    engine, tok = load_engine(resolve_init(a.init), max_num_seqs=64, seed=0)  # a run directory: its newest
    sources = [("scripted", lambda: Scripted(tok), SamplingParams(temperature=0.0)),
               ("model", lambda: EngineGenerator(engine), SamplingParams(temperature=1.0, seed=1))]  # fmt: skip
    for source, make, params in sources:
        for env in ("terminal", "code"):
            runs = {w: episodes(envs, env, make(), tok, a.prompts, a.group, w, params) for w in (1, 8)}
            same = runs[1].pop("tokens") == runs[8].pop("tokens")
            for r in runs.values():
                result["rows"].append({"source": source, **r, "same_tokens_as_workers_1": same})
            print(f"{source:8s} {env:8s} {runs[1]['episodes']} episodes, {runs[1]['tool_calls']} tool calls: "
                  f"workers=1 {runs[1]['seconds']:.2f} s, workers=8 {runs[8]['seconds']:.2f} s "
                  f"({runs[1]['seconds'] / runs[8]['seconds']:.2f}x), same tokens: {same}", flush=True)  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    atomic_write_text(a.out, json.dumps(result, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
