"""What RL's pieces exchange: the environment interface, the generator interface, and the trajectory.

An environment (after NeMo-Gym's resource servers, https://github.com/NVIDIA-NeMo/Gym) gives a task as chat messages
and tools (`reset`), runs the tool calls the model makes (`call_tool`), and scores the finished episode (`verify`)
into a reward with optional named components. An agent loop (`hybridmoe.envs.agent`) drives a `Generator` through
tool calls until the model answers or a step limit is hit and returns one `Trajectory` per episode.

Generation is token in, token out (as prime-rl and NeMo-RL do it): the agent loop renders the conversation once,
appends the generated token ids as they came and the rendered tool turns after them, so the trainer sees exactly
the tokens that were sampled and their sampling log-probabilities, never a re-tokenized text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..serve.sampling import SamplingParams
from ..tasks.base import Task


@dataclass
class Completion:
    """One sampled continuation of a prompt."""

    token_ids: list[int]
    logprobs: list[float]  # log-probability of each sampled token under the weights that sampled it
    finish_reason: str  # "stop" | "length" | "error"
    weight_version: int = 0  # the OLDEST weight version that produced any of these tokens


class Generator(Protocol):
    """Samples continuations of token-id prompts. Implementations: the in-process engine (`EngineGenerator`) and a
    `hybridmoe serve` worker over HTTP (`hybridmoe.train.rollout`)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]: ...


@dataclass
class Reward:
    total: float  # in [0, 1]
    components: dict[str, float] = field(default_factory=dict)


@dataclass
class Episode:
    """One environment instance: the task, the conversation so far, and the environment's private state (a shell's
    working directory, a search index, ...)."""

    env: str
    task: Task
    messages: list[dict]  # OpenAI-format conversation; grows as the agent loop runs
    tools: list[dict] | None = None
    state: dict[str, Any] = field(default_factory=dict)


class Environment:
    """Subclasses set `name` and implement `reset`, `verify` and (tool environments) `call_tool` and `close`."""

    name: str = ""
    max_tool_calls: int = 4  # the agent loop's step limit for this environment

    def reset(self, seed: int, difficulty: int = 1) -> Episode:
        raise NotImplementedError

    def call_tool(self, episode: Episode, name: str, arguments: dict) -> str:
        """The tool's output as text for the model to read; a bad call gives an error text, it never raises."""
        raise ValueError(f"environment {self.name!r} has no tools")

    def verify(self, episode: Episode, answer: str) -> Reward:
        """Score the final assistant answer (its content, reasoning removed)."""
        raise NotImplementedError

    def close(self, episode: Episode) -> None:
        """Release what `reset` made (temporary directories, sandbox sessions)."""


@dataclass
class Trajectory:
    """One finished episode as the trainer needs it. The three lists are aligned with `token_ids`."""

    env: str
    seed: int
    group: int  # trajectories of the same prompt (GRPO's group) share this id
    token_ids: list[int]  # the whole conversation: prompt, generated turns, tool turns
    loss_mask: list[int]  # 1 on tokens the model generated (trained on); 0 on prompt, tool output and padding
    logprobs: list[float]  # the rollout engine's log-prob on generated tokens, 0.0 elsewhere
    reward: float
    components: dict[str, float] = field(default_factory=dict)
    weight_version: int = 0  # the oldest weight version that generated any of its tokens
    messages: list[dict] = field(default_factory=list)  # the parsed conversation, for reports
    finish_reason: str = "stop"  # "stop" | "length" (token or step limit) | "error"
    num_tool_calls: int = 0

    def __post_init__(self):
        n = len(self.token_ids)
        if len(self.loss_mask) != n or len(self.logprobs) != n:
            raise ValueError(
                f"trajectory lists differ in length: {n} token_ids, {len(self.loss_mask)} loss_mask, "
                f"{len(self.logprobs)} logprobs"
            )
