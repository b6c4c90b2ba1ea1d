"""benchmarks/bench_tool_retries.py: which tool outputs count as failures, and the tally of calls after a failed
first call, on hand-made trajectories (no model)."""

import importlib.util
import os
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load():
    path = os.path.join(ROOT, "benchmarks", "bench_tool_retries.py")
    spec = importlib.util.spec_from_file_location("bench_tool_retries", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def episode(outputs: list[str], reward: float):
    messages = [{"role": "user", "content": "task"}]
    for out in outputs:
        messages += [{"role": "assistant", "content": ""}, {"role": "tool", "content": out}]
    return SimpleNamespace(messages=messages + [{"role": "assistant", "content": "Done."}], reward=reward)


def test_failures_are_errors_and_nonzero_exit_codes():
    bench = load()
    assert bench.failed("mv: cannot stat 'a.txt': No such file or directory\n[exit code 1]")
    assert bench.failed('error: call shell with {"command": "<one shell command>"}')
    assert not bench.failed("[exit code 0]")
    assert not bench.failed("3 a.txt\n[exit code 0]")
    assert not bench.failed("the word error in the output\n[exit code 0]")


def test_tally_counts_calls_after_a_failed_first_call():
    bench = load()
    trajectories = [
        episode(["[exit code 0]"], 1.0),
        episode(["cat: x: No such file\n[exit code 1]"], 0.0),  # stopped after the failure
        episode(["cat: x: No such file\n[exit code 1]", "[exit code 0]"], 1.0),  # retried and solved
        episode(["error: unknown tool 'calc'", "[exit code 0]"], 0.0),  # retried, not solved
        episode([], 0.0),
    ]
    assert bench.tally(trajectories) == {
        "episodes": 5, "mean_reward": 0.4, "calls_per_episode": {"0": 1, "1": 2, "2": 2}, "first_call_failed": 3,
        "called_again_after_failure": 2, "solved_after_failure": 1,
    }  # fmt: skip
