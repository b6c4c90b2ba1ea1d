"""Environments with verifiable rewards for RL and evaluation, the agent loop, and the sandbox.

`base.py` holds the interfaces (Environment, Episode, Reward, Generator, Completion, Trajectory); each environment
lives in its own module over the task domains of `hybridmoe.tasks` (math_problems, code, calculator, retrieval,
structured, instructions, terminal); `agent.py` runs episodes through a generator (`run_episodes`, `EngineGenerator`)
and holds the registry (`ENVIRONMENTS`, `make_envs`); `sandbox.py` runs model-written code and shell commands.

The names below are imported on first use: `hybridmoe.tasks` imports `hybridmoe.envs.sandbox`, and the environments
import `hybridmoe.tasks`, so importing the agent loop here eagerly would be circular.
"""

from .base import Completion, Environment, Episode, Generator, Reward, Trajectory

_LAZY = {"ENVIRONMENTS", "EngineGenerator", "make_envs", "run_episodes"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import agent

        return getattr(agent, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ENVIRONMENTS", "Completion", "EngineGenerator", "Environment", "Episode", "Generator", "Reward", "Trajectory",
    "make_envs", "run_episodes",
]  # fmt: skip
