"""The terminal environment: the reference commands earn 1, anything else 0, abuses change nothing but the reward."""

import json
import os

import pytest

from hybridmoe.envs.base import Environment
from hybridmoe.envs.terminal import TerminalEnv


def solution_calls(episode) -> list[tuple[str, dict]]:
    return [
        (call["function"]["name"], json.loads(call["function"]["arguments"]))
        for m in episode.task.solution
        for call in m.get("tool_calls") or []
    ]


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_reference_commands_earn_the_reward(difficulty):
    env = TerminalEnv(timeout_s=2)
    assert isinstance(env, Environment) and env.name == "terminal"
    episode = env.reset(seed=11, difficulty=difficulty)
    assert episode.tools[0]["function"]["name"] == "shell" and episode.messages == episode.task.messages
    path = episode.state["session"].path
    assert env.verify(episode, "Done.").total == 0.0  # nothing done yet
    for name, arguments in solution_calls(episode):
        assert env.call_tool(episode, name, arguments) == "[exit code 0]"
    assert env.verify(episode, "").total == 1.0  # the directory is checked, not the text
    env.close(episode)
    assert not os.path.exists(path)


def test_wrong_or_extra_work_earns_nothing():
    env = TerminalEnv(timeout_s=2)
    episode = env.reset(seed=3, difficulty=1)
    for name, arguments in solution_calls(episode):
        env.call_tool(episode, name, arguments)
    assert env.verify(episode, "Done.").total == 1.0
    assert env.call_tool(episode, "shell", {"command": "echo oops > extra.txt"}) == "[exit code 0]"
    assert env.verify(episode, "Done.").total == 0.0
    env.close(episode)


def test_bad_calls_get_an_error_text():
    env = TerminalEnv(timeout_s=2)
    episode = env.reset(seed=0)
    assert env.call_tool(episode, "python", {"command": "ls"}).startswith("error: unknown tool")
    assert env.call_tool(episode, "shell", {"cmd": "ls"}).startswith("error: call shell with")
    out = env.call_tool(episode, "shell", {"command": "cat missing.txt"})
    assert "No such file" in out and out.endswith("[exit code 1]")
    env.close(episode)


def test_abusive_commands_earn_nothing_and_leave_the_host_alone(tmp_path):
    env = TerminalEnv(timeout_s=1, max_processes=8)
    episode = env.reset(seed=5, difficulty=1)
    outside = tmp_path / "pwned"
    for command in ("f() { f | f & }; f", "sleep 30", f"echo x > {outside}", "kill -9 -1", "yes | head -c 100000000"):
        out = env.call_tool(episode, "shell", {"command": command})
        assert out.endswith("]")
    assert "timed out" in env.call_tool(episode, "shell", {"command": "while :; do :; done"})
    assert not outside.exists()
    assert env.verify(episode, "Done.").total == 0.0
    env.close(episode)
