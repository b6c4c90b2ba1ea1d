"""The terminal environment: a `shell` tool over a temporary directory in the sandbox; the reward is what the
directory holds when the model stops (the `terminal` task domain, `hybridmoe.tasks.terminal`).

Each episode opens its own `ShellSession` over the task's prepared files (kept in `episode.state["session"]`); every
`shell` call runs one sandboxed command there and returns its output and exit status; `verify` reads the directory
back and compares it with the task's expected files (reward 1 or 0, the final text is not checked); `close` removes
the directory. A command that abuses the sandbox only fails (see `hybridmoe.envs.sandbox`).
"""

from __future__ import annotations

from ..tasks import get_domain
from ..tasks.terminal import TIMEOUT_S, check_files, run_shell
from .base import Environment, Episode, Reward
from .sandbox import ShellSession


class TerminalEnv(Environment):
    name = "terminal"
    max_tool_calls = 6  # the hardest tasks take three commands; room for a look around and a retry

    def __init__(self, timeout_s: float = TIMEOUT_S, memory_mb: int = 256, max_processes: int = 32):
        self.domain = get_domain("terminal")
        self.limits = {"timeout_s": timeout_s, "memory_mb": memory_mb, "max_processes": max_processes}

    def reset(self, seed: int, difficulty: int = 1) -> Episode:
        task = self.domain.generate(seed, difficulty)
        session = ShellSession(task.metadata["files"], **self.limits)
        messages = [dict(m) for m in task.messages]
        return Episode(env=self.name, task=task, messages=messages, tools=task.tools, state={"session": session})

    def call_tool(self, episode: Episode, name: str, arguments: dict) -> str:
        if name != "shell":
            return f"error: unknown tool {name!r}; the only tool is shell"
        return run_shell(episode.state["session"], arguments)

    def verify(self, episode: Episode, answer: str) -> Reward:
        files = episode.state["session"].files()
        return Reward(check_files(episode.task.answer, files))

    def close(self, episode: Episode) -> None:
        episode.state["session"].close()
