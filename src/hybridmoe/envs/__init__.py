"""Environments with verifiable rewards for RL and evaluation, the agent loop, and the sandbox.

`base.py` holds the interfaces (Environment, Episode, Reward, Generator, Completion, Trajectory); each environment
lives in its own module over the task domains of `hybridmoe.tasks` (math_problems, code, calculator, retrieval,
structured, instructions); `agent.py` runs episodes through a generator (`run_episodes`, `EngineGenerator`) and
holds the registry (`ENVIRONMENTS`, `make_envs`).
"""

from .agent import ENVIRONMENTS, EngineGenerator, make_envs, run_episodes
from .base import Completion, Environment, Episode, Generator, Reward, Trajectory

__all__ = [
    "ENVIRONMENTS", "Completion", "EngineGenerator", "Environment", "Episode", "Generator", "Reward", "Trajectory",
    "make_envs", "run_episodes",
]  # fmt: skip
