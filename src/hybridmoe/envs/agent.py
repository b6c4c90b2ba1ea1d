"""The agent loop: environments' episodes driven through a `Generator`, turn by turn, into `Trajectory`s; the
in-process engine as a Generator (`EngineGenerator`); the registry of environments (`ENVIRONMENTS`, `make_envs`).

Token in, token out (as prime-rl and NeMo-RL do it). An episode's prompt is rendered once with the tokenizer's chat
template (`hybridmoe.serve.chat.render_chat`, reasoning on or off through the template's switch); the generated ids
are appended exactly as sampled, stop token included, with their log-probabilities. When the turn calls tools
(parsed by the chat layer's `parse_chat_output`), each call goes to `env.call_tool` and what follows the turn is
appended as the template writes it: the rest of the turn's end, the `tool` turn, and the next assistant header
(found by rendering the conversation with and without the new turns; the template must extend the past unchanged,
which ours does inside a tool loop). Those tokens have loss_mask 0 and log-prob 0.0; the generated ones loss_mask 1.
So `loss_mask` is 1 exactly on the tokens the model sampled, and the trainer never sees a re-tokenized text.

An episode ends when
- the model answers without tool calls ("stop"), then `env.verify(episode, content)` scores the answer;
- it calls tools after `env.max_tool_calls` tool rounds (a turn with tool calls is one round) already ran, or its
  generated tokens reach `max_new_tokens` (all turns together), or the generator cut the turn ("length"); the
  last turn's content is still verified (a truncated answer usually scores 0);
- something fails in that episode alone ("error", reward 0): the generator reports an error for its request, a tool
  raises (a bad call, like arguments that are not a JSON object, gets an error text for the model to read instead,
  as `Environment.call_tool` promises), the template cannot render the conversation, or `verify` raises. The other
  episodes go on; the error is logged and kept in `Rollout.error`.

All running episodes advance together: one `generator.generate` call per round, with one SamplingParams (the
caller's, with `max_tokens` = the largest budget left, `logprobs=0` and the chat template's stop tokens); a turn
longer than its own episode's budget is cut there (its sampled prefix is unchanged by the cut). The round's turns
(parsing, tool calls, verification) then run side by side on a pool of `workers` threads: a terminal command or a
code test is a sandboxed process of tens of milliseconds, and each turn touches only its own episode. A trajectory's
weight_version is the oldest of its completions'.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..serve.sampling import SamplingParams
from .base import Completion, Environment, Episode, Generator, Reward, Trajectory
from .calculator import CalculatorEnv
from .code import CodeEnv
from .instructions import InstructionsEnv
from .math_problems import MathEnv
from .retrieval import RetrievalEnv
from .structured import StructuredEnv
from .terminal import TerminalEnv

logger = logging.getLogger("hybridmoe.envs")

ENVIRONMENTS: dict[str, type[Environment]] = {
    env.name: env
    for env in (MathEnv, CodeEnv, CalculatorEnv, RetrievalEnv, StructuredEnv, InstructionsEnv, TerminalEnv)
}  # fmt: skip


def make_envs(names: str | Sequence[str] | None = None) -> dict[str, Environment]:
    """Fresh environments by name (a comma-separated string or a list; None: every registered one)."""
    if names is None:
        names = list(ENVIRONMENTS)
    elif isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no environments named; pass some of: {', '.join(ENVIRONMENTS)}")
    unknown = [n for n in names if n not in ENVIRONMENTS]
    if unknown:
        raise ValueError(f"unknown environment {unknown[0]!r}; known: {', '.join(ENVIRONMENTS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"an environment is named twice: {', '.join(names)}")
    return {n: ENVIRONMENTS[n]() for n in names}


# ---------------------------------------------------------------------------------------------- the generator


class EngineGenerator:
    """A Generator over the in-process engine (`hybridmoe.serve.engine.Engine`, with no requests of its own in
    flight). Each prompt becomes a request of its own SamplingParams: `max_tokens` lowered to the room left in the
    engine's `max_model_len` (a prompt that fills it comes back empty with finish_reason "length"), `logprobs=0`,
    a seed derived from (params.seed, position) when params.seed is set (so the samples of a group differ), and a
    shallow copy of each logits processor (per-request state, like a reasoning budget's, is not shared).

    `weight_version` is stamped on every completion; whoever loads new weights into the engine's model sets it.
    Log-probabilities are the engine's: log_softmax of the raw logits, before temperature and top-p/top-k, so they
    are the sampling distribution's only at temperature 1 without filters."""

    def __init__(self, engine, weight_version: int = 0):
        self.engine, self.weight_version = engine, weight_version

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        if self.engine.has_unfinished():
            raise ValueError("the engine has requests in flight; EngineGenerator steps the engine itself, so pass an "
                             "idle one")  # fmt: skip
        version = self.weight_version
        results: list[Completion | None] = [None] * len(prompts)
        run, run_params = [], []
        for i, prompt in enumerate(prompts):
            room = self.engine.max_model_len - len(prompt)
            if room < 1:
                results[i] = Completion([], [], "length", version)
                continue
            seed = None if params.seed is None else random.Random(f"{params.seed}:{i}").getrandbits(63)
            run.append(i)
            run_params.append(dataclasses.replace(
                params, max_tokens=min(params.max_tokens, room), logprobs=0, seed=seed,
                logits_processors=[copy.copy(p) for p in params.logits_processors],
            ))  # fmt: skip
        outs = self.engine.generate([prompts[i] for i in run], run_params) if run else []
        for i, out in zip(run, outs):
            reason = out.finish_reason if out.finish_reason in ("stop", "length") else "error"
            logprobs = [lp.logprob for lp in out.logprobs or []]
            results[i] = Completion(list(out.token_ids), logprobs, reason, version)
        return results


# ---------------------------------------------------------------------------------------------- the loop


class EpisodeError(Exception):
    """Something that ends one episode with finish_reason "error" (and reward 0)."""


@dataclass
class Rollout:
    """One episode as it runs; `trajectory()` is what the trainer gets. `error` says why an episode failed."""

    env: Environment
    seed: int
    group: int
    episode: Episode | None = None
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    prompt_text: str = ""  # the first rendered prompt
    reasoning: bool = True  # the turn being generated starts inside a thinking block
    generated: int = 0  # tokens generated, all turns
    tool_rounds: int = 0
    num_tool_calls: int = 0
    versions: list[int] = field(default_factory=list)
    content: str = ""  # the last turn's answer (reasoning and tool calls removed)
    completion: str = ""  # the last turn's generated text
    reward: Reward | None = None
    finish_reason: str | None = None  # set when the episode ended
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def append(self, ids: list[int], generated: bool, logprobs: list[float] | None = None) -> None:
        self.token_ids += ids
        self.loss_mask += [int(generated)] * len(ids)
        self.logprobs += logprobs if generated else [0.0] * len(ids)

    def trajectory(self) -> Trajectory:
        reward = self.reward or Reward(0.0)
        return Trajectory(
            env=self.env.name, seed=self.seed, group=self.group, token_ids=list(self.token_ids),
            loss_mask=list(self.loss_mask), logprobs=list(self.logprobs), reward=reward.total,
            components=dict(reward.components), weight_version=min(self.versions, default=0),
            messages=list(self.episode.messages) if self.episode else [], finish_reason=self.finish_reason or "error",
            num_tool_calls=self.num_tool_calls,
        )  # fmt: skip


def run_episodes(
    envs: dict[str, Environment],
    requests: list[tuple[str, int]],
    generator: Generator,
    tokenizer,
    *,
    group_size: int = 1,
    params: SamplingParams,
    difficulty: int = 1,
    reasoning: bool = True,
    max_new_tokens: int = 256,
    group_offset: int = 0,
    workers: int = 8,
) -> list[Trajectory]:
    """Run `group_size` episodes of each request (env name, seed), all batched turn by turn through `generator`;
    returns their trajectories in request order (a request's group together; trajectory.group = group_offset +
    request index). max_new_tokens: the tokens the model may generate in one episode, all turns together.
    workers: threads that take a round's turns (tool calls and verification, sandboxed processes for code and
    terminal) side by side."""
    rollouts = play(envs, requests, generator, tokenizer, group_size=group_size, params=params,
                    difficulty=difficulty, reasoning=reasoning, max_new_tokens=max_new_tokens,
                    group_offset=group_offset, workers=workers)  # fmt: skip
    return [r.trajectory() for r in rollouts]


def play(
    envs: dict[str, Environment],
    requests: list[tuple[str, int]],
    generator: Generator,
    tokenizer,
    *,
    group_size: int = 1,
    params: SamplingParams,
    difficulty: int = 1,
    reasoning: bool = True,
    max_new_tokens: int = 256,
    group_offset: int = 0,
    workers: int = 8,
) -> list[Rollout]:
    """`run_episodes`, returning the finished `Rollout`s (with their error messages and texts, for reports)."""
    from ..serve.load import stop_token_ids

    if group_size < 1 or max_new_tokens < 1 or workers < 1:
        raise ValueError(f"need group_size, max_new_tokens and workers >= 1, got {group_size}, {max_new_tokens} "
                         f"and {workers}")  # fmt: skip
    for name, _ in requests:
        if name not in envs:
            raise ValueError(f"request for environment {name!r}, which is not among the given ones: "
                             f"{', '.join(envs) or 'none'}")  # fmt: skip
    for name in dict.fromkeys(name for name, _ in requests):
        top = getattr(envs[name], "max_difficulty", None)
        if difficulty < 1 or (top is not None and difficulty > top):
            raise ValueError(f"difficulty {difficulty} is outside 1..{top} for environment {name!r}")
    stops = list(dict.fromkeys([*params.stop_token_ids, *stop_token_ids(tokenizer)]))
    loop = _Loop(tokenizer, reasoning, max_new_tokens, stops)
    rollouts = [Rollout(envs[name], seed, group_offset + i)
                for i, (name, seed) in enumerate(requests) for _ in range(group_size)]  # fmt: skip
    # A round's turns are independent (each touches its own episode), and a tool call or verification may wait
    # tens of milliseconds on a sandboxed process: they run on a pool of threads. Starts stay in this thread, so the
    # tokenizer's first call (which may reset its padding state) happens before any concurrent one.
    pool = ThreadPoolExecutor(workers, thread_name_prefix="agent-turn") if workers > 1 else None
    try:
        for r in rollouts:
            loop.guard(r, lambda r=r: loop.start(r, difficulty))
        while running := [r for r in rollouts if not r.done]:
            budget = max(max_new_tokens - r.generated for r in running)
            round_params = dataclasses.replace(params, max_tokens=budget, logprobs=0, stop_token_ids=stops)
            completions = generator.generate([r.token_ids for r in running], round_params)
            if len(completions) != len(running):
                raise RuntimeError(f"the generator returned {len(completions)} completions for {len(running)} prompts")
            list((pool.map if pool else map)(loop.take, running, completions))
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        for r in rollouts:
            if r.episode is not None:
                try:
                    r.env.close(r.episode)
                except Exception:  # a failed cleanup is worth a log line, not the batch
                    logger.exception("closing an episode of %s (seed %d) failed", r.env.name, r.seed)
    return rollouts


class _Loop:
    """The steps of one episode: start (reset and render), turn (take a completion: tools or verify)."""

    def __init__(self, tokenizer, reasoning: bool, max_new_tokens: int, stop_ids: list[int]):
        self.tok, self.reasoning, self.max_new_tokens = tokenizer, reasoning, max_new_tokens
        self.stop_ids = set(stop_ids)

    def take(self, r: Rollout, c: Completion) -> None:
        """Take one completion into its episode (the guarded `turn`)."""
        self.guard(r, lambda: self.turn(r, c))

    def guard(self, r: Rollout, step) -> None:
        """Run one step; anything it raises ends this episode alone (finish_reason "error", reward 0)."""
        try:
            step()
        except Exception as e:
            r.error = str(e) if isinstance(e, EpisodeError) else f"{type(e).__name__}: {e}"
            r.finish_reason, r.reward = "error", Reward(0.0)
            logger.warning("episode %s seed %d failed: %s", r.env.name, r.seed, r.error)

    def start(self, r: Rollout, difficulty: int) -> None:
        from ..serve.chat import render_chat

        r.episode = r.env.reset(r.seed, difficulty)
        prompt = render_chat(self.tok, r.episode.messages, tools=r.episode.tools, reasoning=self.reasoning)
        r.prompt_text, r.reasoning = prompt.text, prompt.reasoning
        r.append(prompt.token_ids, generated=False)

    def turn(self, r: Rollout, c: Completion) -> None:
        from ..serve.chat import parse_chat_output

        ids, logprobs, finish = list(c.token_ids), list(c.logprobs), c.finish_reason
        if len(logprobs) != len(ids):
            raise EpisodeError(f"the generator returned {len(logprobs)} log-probs for {len(ids)} tokens")
        room = self.max_new_tokens - r.generated
        if len(ids) > room:
            ids, logprobs, finish = ids[:room], logprobs[:room], "length"
        r.append(ids, generated=True, logprobs=logprobs)
        r.generated += len(ids)
        r.versions.append(c.weight_version)
        if finish == "error":
            raise EpisodeError("the generator failed on this episode's request")
        text_ids = ids[:-1] if finish == "stop" and ids and ids[-1] in self.stop_ids else ids
        r.completion = self.tok.decode(text_ids, skip_special_tokens=False)
        tools = r.episode.tools
        message = parse_chat_output(r.completion, reasoning=r.reasoning, parse_tools=bool(tools), tools=tools)
        r.content = message.content
        assistant = {"role": "assistant", "content": message.content}
        if message.reasoning_content:
            assistant["reasoning_content"] = message.reasoning_content
        calls = message.tool_calls
        if calls:
            assistant["tool_calls"] = [renderable_call(call.to_openai()) for call in calls]
            r.num_tool_calls += len(calls)
        out_of_room = finish != "stop" or r.generated >= self.max_new_tokens
        if calls and not out_of_room and r.tool_rounds < r.env.max_tool_calls:
            return self._tool_round(r, assistant, calls, ids[-1] if ids else None)
        r.episode.messages.append(assistant)
        r.finish_reason = "length" if calls or finish != "stop" else "stop"
        reward = r.env.verify(r.episode, message.content)
        if not 0.0 <= reward.total <= 1.0:
            raise ValueError(f"environment {r.env.name!r}: verify returned {reward.total}, outside [0, 1]")
        r.reward = reward

    def _tool_round(self, r: Rollout, assistant: dict, calls, last_id: int | None) -> None:
        from ..serve.chat import render_chat

        before_messages = r.episode.messages + [assistant]
        results = [
            {"role": "tool", "tool_call_id": call.id, "name": call.name,
             "content": _tool_output(r.env, r.episode, call.name, call.arguments)}
            for call in calls
        ]  # fmt: skip
        tools = r.episode.tools
        before = render_chat(self.tok, before_messages, tools=tools, reasoning=self.reasoning,
                             add_generation_prompt=False).text  # fmt: skip
        after = render_chat(self.tok, before_messages + results, tools=tools, reasoning=self.reasoning)
        if not after.text.startswith(before):
            raise EpisodeError("the chat template renders the conversation differently once the tool results are "
                               "added, so the tool turn cannot be appended to the generated tokens")  # fmt: skip
        end = self.tok.decode([last_id], skip_special_tokens=False) if last_id in self.stop_ids else ""
        cut = before.rfind(end) if end else -1
        if cut < 0:
            raise EpisodeError(f"the turn ended with token {last_id}, which the chat template does not write at the "
                               "end of an assistant turn")  # fmt: skip
        bridge = before[cut + len(end) :] + after.text[len(before) :]
        r.append(self.tok(bridge, add_special_tokens=False)["input_ids"], generated=False)
        r.episode.messages += [assistant, *results]
        r.reasoning = after.reasoning
        r.tool_rounds += 1


def renderable_call(call: dict) -> dict:
    """The chat template writes a call's arguments as parameters, so they must be a JSON object; a call whose
    arguments are not one goes into the conversation with none (its tool output is the error message)."""
    try:
        ok = isinstance(json.loads(call["function"]["arguments"] or "{}"), dict)
    except json.JSONDecodeError:
        ok = False
    return call if ok else {**call, "function": {**call["function"], "arguments": "{}"}}


def tool_arguments(name: str, arguments: str) -> dict | str:
    """A tool call's arguments as a dict, or the error text the model reads when they are not a JSON object."""
    try:
        args = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as e:
        return f"error: the arguments of {name} are not valid JSON ({e.msg}); pass a JSON object"
    if not isinstance(args, dict):
        return f"error: the arguments of {name} must be a JSON object, got {type(args).__name__}"
    return args


def _tool_output(env: Environment, episode: Episode, name: str, arguments: str) -> str:
    """The tool's output; arguments that are not a JSON object get an error text for the model instead."""
    args = tool_arguments(name, arguments)
    return args if isinstance(args, str) else str(env.call_tool(episode, name, args))
