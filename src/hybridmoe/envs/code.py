"""Code: the model writes a small Python function (the `python` domain); the task's five hidden tests run in the
sandbox, a separate resource-limited process (`run_python`), never in this one. Reward 1 only if every test passes.
Components: `has_code` (the reply holds code) and `passed` (the same as the reward)."""

from __future__ import annotations

from ..tasks.python_code import extract_code
from .base import Episode, Reward
from .domain import DomainEnv
from .sandbox import run_python


class CodeEnv(DomainEnv):
    name = "code"
    domain_names = ("python",)
    max_tool_calls = 0

    def verify(self, episode: Episode, answer: str) -> Reward:
        code = extract_code(answer)
        if not code.strip():
            return Reward(0.0, {"has_code": 0.0, "passed": 0.0})
        timeout_s = getattr(self.domain(episode), "timeout_s", 5.0)
        passed = float(run_python(code, episode.task.answer["tests"], timeout_s=timeout_s).passed)
        return Reward(passed, {"has_code": 1.0, "passed": passed})
