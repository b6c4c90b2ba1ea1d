"""Where GRPO's trajectories come from: the `RolloutSource` protocol and the synchronous source.

A rollout source hands the trainer one optimizer step's trajectories at a time (`next_batch(version)`: whole
groups, every trajectory sampled with weights at most `max_staleness` versions older than `version`, the number of
optimizer steps done so far) and takes the new weights after each step (`publish(model, version)`). Two sources:
  - `SyncRollouts` (here): the in-process inference engine (`hybridmoe.serve.engine.Engine`) over its own copy of
    the model, driven by the agent loop (`hybridmoe.envs.agent.run_episodes`) between optimizer steps; `publish`
    copies the trainer's weights in, so every trajectory is sampled with the newest weights (staleness 0): the
    synchronous GRPO that Nemotron 3 Nano was trained with;
  - `hybridmoe.train.async_rollout.AsyncRollouts`: `hybridmoe serve` worker processes generating while the trainer
    steps (staleness up to max_staleness), as for Super and Ultra.

Sampling is reproducible by step: before each batch the engine's generator is seeded from (seed, version), so a
run resumed at step N samples exactly what an unbroken run samples at step N.

`measure_pass_rates` samples prompts with the starting model for the pass-rate filter (`grpo.pass_rate_filter`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from ..envs.base import Environment, Trajectory
from ..serve.sampling import SamplingParams


class RolloutSource(Protocol):
    def next_batch(self, version: int) -> list[Trajectory]:
        """One optimizer step's trajectories: whole groups, each trajectory.weight_version >= version -
        max_staleness (version: the optimizer steps done so far, the version of the trainer's weights)."""
        ...

    def publish(self, model: torch.nn.Module, version: int) -> None:
        """The trainer's weights after optimizer step `version` (a module holding full, unsharded tensors)."""
        ...

    def close(self) -> None: ...


def copy_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """dst's parameters and persistent buffers (the routers' selection biases) := src's, in place."""
    with torch.no_grad():
        dst.load_state_dict(src.state_dict())


def engine_copy(model, tokenizer, *, max_num_seqs: int, max_model_len: int, seed: int = 0):
    """An inference engine over a copy of `model` (full weights), stopping at the chat format's stop tokens."""
    from ..modeling import HybridMoEForCausalLM
    from ..serve.engine import Engine
    from ..serve.load import stop_token_ids

    p = next(model.parameters())
    copy = HybridMoEForCausalLM(model.config, device="meta")
    copy.to_empty(device=p.device)
    copy.to(p.dtype)
    copy_weights(copy, model)
    with torch.no_grad():  # what the state dict does not hold (the routers' token counts) starts at zero
        held = set(copy.state_dict())
        for name, buffer in copy.named_buffers():
            if name not in held:
                buffer.zero_()
    copy.requires_grad_(False)
    return Engine(
        copy, max_num_seqs=max_num_seqs, max_model_len=max_model_len, eos_token_id=stop_token_ids(tokenizer),
        detokenize=tokenizer, seed=seed,
    )  # fmt: skip


class SyncRollouts:
    """Rollouts on the in-process engine between optimizer steps (staleness 0).

    envs: name -> Environment; prompts: the (env name, seed) sequence (e.g. `grpo.PromptIterator`), read
    prompts_per_step at a time, only when a batch is made; model: the trainer's starting weights (full tensors),
    copied; params: the sampling parameters of every model turn (logprobs are always asked for)."""

    max_staleness = 0

    def __init__(
        self,
        envs: dict[str, Environment],
        prompts: Iterator[tuple[str, int]],
        tokenizer,
        *,
        group_size: int,
        prompts_per_step: int,
        params: SamplingParams,
        difficulty: int = 1,
        reasoning: bool = True,
        max_new_tokens: int = 256,
        model: torch.nn.Module,
        max_num_seqs: int = 64,
        max_model_len: int = 4096,
        seed: int = 0,
    ):
        from ..envs.agent import EngineGenerator

        self.envs, self.prompts, self.tokenizer = envs, prompts, tokenizer
        self.group_size, self.prompts_per_step = group_size, prompts_per_step
        self.params = _with_logprobs(params)
        self.difficulty, self.reasoning, self.max_new_tokens = difficulty, reasoning, max_new_tokens
        self.seed = seed
        slots = min(max_num_seqs, group_size * prompts_per_step)
        self.engine = engine_copy(model, tokenizer, max_num_seqs=slots, max_model_len=max_model_len, seed=seed)
        self.generator = EngineGenerator(self.engine)
        self.version = 0  # the version of the engine's weights
        self.groups = 0  # group ids handed out

    def next_batch(self, version: int) -> list[Trajectory]:
        from ..envs.agent import run_episodes

        if version != self.version:
            raise ValueError(
                f"asked for trajectories of weight version {version} but the engine holds version {self.version}: "
                "publish the weights after every optimizer step"
            )
        requests = [next(self.prompts) for _ in range(self.prompts_per_step)]
        self.engine.generator.manual_seed(_batch_seed(self.seed, version))
        trajectories = run_episodes(
            self.envs, requests, self.generator, self.tokenizer, group_size=self.group_size, params=self.params,
            difficulty=self.difficulty, reasoning=self.reasoning, max_new_tokens=self.max_new_tokens,
            group_offset=self.groups,
        )  # fmt: skip
        self.groups += len(requests)
        for t in trajectories:
            t.weight_version = version
        return trajectories

    def publish(self, model: torch.nn.Module, version: int) -> None:
        copy_weights(self.engine.model, model)
        self.version = version

    def close(self) -> None:
        self.engine.reset()


def measure_pass_rates(
    envs: dict[str, Environment],
    prompts: list[tuple[str, int]],
    generator,
    tokenizer,
    *,
    samples: int,
    params: SamplingParams,
    difficulty: int = 1,
    reasoning: bool = True,
    max_new_tokens: int = 256,
    prompts_per_call: int = 64,
) -> dict[tuple[str, int], float]:
    """(env, seed) -> the fraction of `samples` samples of the prompt that earn the full reward (1)."""
    from ..envs.agent import run_episodes

    rates: dict[tuple[str, int], float] = {}
    for start in range(0, len(prompts), prompts_per_call):
        chunk = prompts[start : start + prompts_per_call]
        trajectories = run_episodes(
            envs, chunk, generator, tokenizer, group_size=samples, params=_with_logprobs(params),
            difficulty=difficulty, reasoning=reasoning, max_new_tokens=max_new_tokens, group_offset=0,
        )  # fmt: skip
        solved = [0] * len(chunk)
        for t in trajectories:
            solved[t.group] += t.reward >= 1.0
        for (env, seed), n in zip(chunk, solved):
            rates[(env, seed)] = n / samples
    return rates


def _with_logprobs(params: SamplingParams) -> SamplingParams:
    from dataclasses import replace

    return params if params.logprobs is not None else replace(params, logprobs=0)


def _batch_seed(seed: int, version: int) -> int:
    return (seed * 1_000_003 + version) % 2**63
