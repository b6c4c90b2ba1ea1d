"""Task evaluation: a model answers tasks of the verifiable domains (`hybridmoe.tasks`) and each domain's `verify`
scores the answers; `hybridmoe eval tasks CHECKPOINT --domains ... --samples N` calls `evaluate_tasks` and
`write_task_report`.

- Tasks: `samples` seeds per domain from the held-out split (`split_seeds("heldout", samples)`), at one difficulty.
  Held-out and training seeds never overlap, but a small task space can repeat a prompt: the run counts the
  held-out prompts that also come out of the first `overlap_seeds` training seeds (the ones SFT data starts with).
- Generation goes through the inference engine (`hybridmoe.serve.Engine`): every request is added at once and the
  engine batches them continuously. Prompts are rendered by the chat layer (`render_chat`) and answers parsed by it
  (`parse_chat_output`: reasoning_content, content, tool_calls), exactly as the server does.
- Reasoning on and off are separate passes over the same tasks (the prompt opens a thinking block, or gives an
  empty one), each reporting the mean generated tokens and reasoning tokens per answer. A reasoning budget is the
  server's `ReasoningBudget` logits processor: `</think>` is forced once the budget is spent (per assistant turn).
- Greedy by default. Sampled (temperature > 0) with `pass_k` = K samples per task: pass@1 is the mean reward and
  pass@k (k <= K) the unbiased estimator of Chen et al. 2021, "Evaluating Large Language Models Trained on Code"
  (arXiv:2107.03374, eq. 1): the mean over tasks of 1 - C(n - c, k) / C(n, k), with n samples of which c are
  correct (full reward). Each request has its own seed, drawn from (seed, domain, task, mode, sample, turn), so a
  sample does not depend on what it was batched with.
- Tool domains run an agent loop: an answer with tool calls gets the assistant message (with its tool_calls) and one
  `tool` message per call (`Domain.run_tool`'s output; unparseable arguments or a tool that raises give an error
  message instead) appended, and the conversation goes back to the engine, at most `max_tool_rounds` times; the
  final answer is the last turn's content. A conversation's next turn is queued as soon as its previous one ends.
- Failures stay with their sample: a request the engine ends with finish_reason "error" (or cannot admit, or a
  `verify` that raises) scores 0, is counted as failed and keeps its error message; the run goes on.

Outputs (`write_task_report`): tasks.md (the table), tasks.json (settings, summary and every sample: seed, prompt,
completion, reward, tokens) and tasks.png (accuracy per domain, reasoning on/off as grouped bars), written
atomically. `plot_comparison` draws several runs side by side (the speedrun's before/after SFT).
"""

from __future__ import annotations

import json
import math
import os
import random
import textwrap
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from ..envs.agent import renderable_call, tool_arguments
from ..tasks import DOMAINS, Domain, Task, get_domain, prompt_key, split_seeds
from ..utils import atomic_write, atomic_write_text

FORMAT = "hybridmoe-task-eval-1"
MODES = {"on": (True,), "off": (False,), "both": (True, False)}


@dataclass
class TaskEvalSettings:
    """What a task evaluation runs; checked on construction, so a bad value fails before any model is loaded."""

    samples: int = 20  # tasks per domain
    difficulty: int = 1
    split: str = "heldout"
    offset: int = 0  # first seed of the split to use (a fresh slice of the same split)
    reasoning: str = "both"  # on | off | both
    reasoning_budget: int | None = None  # thinking tokens per assistant turn before </think> is forced
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    pass_k: int = 1  # samples per task
    max_new_tokens: int = 512  # per assistant turn
    max_tool_rounds: int = 3
    overlap_seeds: int = 1000  # training seeds whose prompts are compared with the evaluated ones

    def __post_init__(self):
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1 task per domain, got {self.samples}")
        if self.reasoning not in MODES:
            raise ValueError(f"reasoning must be one of {', '.join(MODES)}, got {self.reasoning!r}")
        if self.reasoning_budget is not None and self.reasoning_budget < 0:
            raise ValueError(f"the reasoning budget must be >= 0 tokens, got {self.reasoning_budget}")
        if self.pass_k < 1:
            raise ValueError(f"pass_k must be >= 1 sample per task, got {self.pass_k}")
        if self.pass_k > 1 and self.temperature == 0:
            raise ValueError(f"pass@{self.pass_k} needs sampling: greedy samples of a task are all the same; pass a "
                             "temperature > 0 (e.g. --temperature 0.7)")  # fmt: skip
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature} and {self.top_p}")
        if self.max_new_tokens < 1 or self.max_tool_rounds < 0 or self.overlap_seeds < 0:
            raise ValueError(f"need max_new_tokens >= 1, max_tool_rounds >= 0 and overlap_seeds >= 0; got "
                             f"{self.max_new_tokens}, {self.max_tool_rounds}, {self.overlap_seeds}")  # fmt: skip
        split_seeds(self.split, self.samples, self.offset)  # an unknown split or a range beyond it is an error

    @property
    def modes(self) -> tuple[bool, ...]:
        return MODES[self.reasoning]


def resolve_domains(domains: str | Iterable[str | Domain] | None, difficulty: int | None = None) -> list[Domain]:
    """Domains from a comma-separated string or a list of names / Domain objects (None: every registered domain).
    An unknown name is an error listing the known ones; so is a difficulty beyond a domain's max_difficulty."""
    if domains is None:
        if not DOMAINS:
            raise ValueError("no task domains are registered (hybridmoe.tasks.DOMAINS is empty)")
        resolved = list(DOMAINS.values())
    else:
        items = [d.strip() for d in domains.split(",") if d.strip()] if isinstance(domains, str) else list(domains)
        if not items:
            raise ValueError(f"no domains given; pass a comma-separated list of: {', '.join(sorted(DOMAINS))}")
        resolved = [d if isinstance(d, Domain) else get_domain(d) for d in items]
    names = [d.name for d in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"a domain is listed twice: {', '.join(names)}")
    for d in resolved:
        if difficulty is not None and not 1 <= difficulty <= d.max_difficulty:
            raise ValueError(f"difficulty {difficulty} is outside 1..{d.max_difficulty} for domain {d.name!r}")
    return resolved


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021's unbiased estimate of pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k),
    the chance that k samples drawn without replacement from the n include a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class _Sample:
    """One answer being produced: a task in one reasoning mode, sample k of pass_k; it grows turn by turn."""

    domain: Domain
    task: Task
    reasoning: bool
    k: int
    messages: list[dict]  # the conversation so far (the task's prompt + the turns appended here)
    turns: list[dict] = field(default_factory=list)  # assistant and tool messages appended by the run
    prompt: str = ""  # the first rendered prompt
    prompt_reasoning: bool = False  # the first prompt opened a thinking block
    completion: str = ""  # the last turn's generated text (stop token removed)
    reasoning_content: str = ""
    content: str = ""
    tool_calls: int = 0
    tool_rounds: int = 0
    tokens: int = 0  # generated, every turn together (stop tokens not counted)
    reasoning_tokens: int = 0
    max_turn_reasoning_tokens: int = 0  # the most of any one turn (a reasoning budget holds per turn, per request)
    finish_reason: str | None = None
    error: str | None = None
    reward: float = 0.0
    output_ids: list[int] = field(default_factory=list)  # of the turn being generated
    cut: bool = False  # not finished by the deadline: left out of the results

    def record(self) -> dict:
        return {
            "domain": self.domain.name, "seed": self.task.seed, "difficulty": self.task.difficulty,
            "reasoning": "on" if self.reasoning else "off", "sample": self.k, "prompt": self.prompt,
            "prompt_reasoning": self.prompt_reasoning, "completion": self.completion,
            "reasoning_content": self.reasoning_content, "content": self.content, "answer": self.task.answer,
            "reward": self.reward, "generated_tokens": self.tokens, "reasoning_tokens": self.reasoning_tokens,
            "max_turn_reasoning_tokens": self.max_turn_reasoning_tokens,
            "tool_calls": self.tool_calls, "tool_rounds": self.tool_rounds, "turns": self.turns,
            "finish_reason": self.finish_reason, "failed": self.error is not None, "error": self.error,
        }  # fmt: skip


_now = time.monotonic  # the deadline's clock (tests replace it)


class _Runner:
    """Feeds samples' turns to the engine and takes each finished turn to its next step (tool round or verify)."""

    def __init__(self, engine, tokenizer, settings: TaskEvalSettings, progress: bool):
        from tqdm import tqdm

        from ..serve.chat import THINK_END, THINK_START
        from ..serve.load import stop_token_ids

        self.engine, self.tokenizer, self.s = engine, tokenizer, settings
        vocab = tokenizer.get_vocab()
        self.think_start, self.think_end = vocab.get(THINK_START), vocab.get(THINK_END)
        if settings.reasoning_budget is not None and self.think_end is None:
            raise ValueError(f"the tokenizer has no {THINK_END} token, which a reasoning budget forces; drop the "
                             "reasoning budget or use a tokenizer with thinking tokens")  # fmt: skip
        self.stop_ids = stop_token_ids(tokenizer)  # the turn end too, whatever the engine's own eos
        self.pending: dict[str, tuple[_Sample, object]] = {}  # request id -> (sample, its ChatPrompt)
        self._ids = 0
        self.bar = tqdm(total=0, desc="tasks", unit="request", disable=not progress or None)

    def run(self, samples: list[_Sample], deadline: float | None = None) -> None:
        """Every sample to its end; with a deadline (time.monotonic), the samples not finished by then are cut
        (`sample.cut`) and the engine left empty."""
        self.bar.total = len(samples)
        self.bar.refresh()
        try:
            for sample in samples:
                self.submit(sample)
            while self.pending:
                if deadline is not None and _now() > deadline:
                    for sample, _ in self.pending.values():
                        sample.cut = True
                    self.engine.reset()
                    self.pending.clear()
                    break
                if not self.engine.has_unfinished():  # only if something else reset the engine under us
                    raise RuntimeError(f"the engine dropped {len(self.pending)} task evaluation requests")
                for out in self.engine.step():
                    entry = self.pending.get(out.request_id)
                    if entry is None:
                        continue
                    entry[0].output_ids.extend(out.new_token_ids)
                    if out.finished:
                        del self.pending[out.request_id]
                        self.bar.update(1)
                        self.finish_turn(*entry, out)
        finally:
            if self.pending:  # interrupted: leave the engine empty, as it was given
                self.engine.reset()
            self.bar.close()

    def submit(self, sample: _Sample) -> None:
        from ..serve.chat import ReasoningBudget, render_chat
        from ..serve.sampling import SamplingParams

        try:
            prompt = render_chat(self.tokenizer, sample.messages, tools=sample.task.tools, reasoning=sample.reasoning)
        except Exception as e:  # a conversation the template cannot render (e.g. a model's odd tool call)
            return self.fail(sample, f"rendering the prompt failed: {type(e).__name__}: {e}")
        if not sample.turns:
            sample.prompt, sample.prompt_reasoning = prompt.text, prompt.reasoning
        room = self.engine.max_model_len - len(prompt.token_ids)
        if room < 1:
            return self.fail(sample, f"the prompt of {len(prompt.token_ids)} tokens leaves no room to answer in "
                                     f"max_model_len {self.engine.max_model_len}; raise --max-model-len")  # fmt: skip
        processors = []
        if prompt.reasoning and self.s.reasoning_budget is not None:
            processors.append(ReasoningBudget(self.s.reasoning_budget, self.think_end))
        seed = None
        if self.s.temperature > 0:
            turn = len(sample.turns)
            seed = random.Random(f"{self.s.seed}:{sample.domain.name}:{sample.task.seed}:{sample.reasoning}:"
                                 f"{sample.k}:{turn}").getrandbits(63)  # fmt: skip
        params = SamplingParams(
            temperature=self.s.temperature, top_p=self.s.top_p, max_tokens=min(self.s.max_new_tokens, room),
            stop_token_ids=self.stop_ids, seed=seed, logits_processors=processors,
        )  # fmt: skip
        request_id = f"tasks-{self._ids}"
        self._ids += 1
        sample.output_ids = []
        try:
            self.engine.add_request(prompt.token_ids, params, request_id)
        except ValueError as e:  # AdmissionError included
            return self.fail(sample, f"{type(e).__name__}: {e}")
        self.pending[request_id] = (sample, prompt)

    def finish_turn(self, sample: _Sample, prompt, out) -> None:
        from ..serve.chat import parse_chat_output

        sample.finish_reason = out.finish_reason
        if out.finish_reason == "error":
            return self.fail(sample, out.error or "generation failed")
        ids = sample.output_ids
        if out.finish_reason == "stop" and isinstance(out.stop_reason, int) and ids and ids[-1] == out.stop_reason:
            ids = ids[:-1]  # the stop token ends the turn; it is not part of the answer
        sample.tokens += len(ids)
        thought = _reasoning_tokens(ids, prompt.reasoning, self.think_start, self.think_end)
        sample.reasoning_tokens += thought
        sample.max_turn_reasoning_tokens = max(sample.max_turn_reasoning_tokens, thought)
        sample.completion = self.tokenizer.decode(ids, skip_special_tokens=False)
        tools = sample.task.tools
        message = parse_chat_output(sample.completion, reasoning=prompt.reasoning, parse_tools=bool(tools))
        sample.reasoning_content, sample.content = message.reasoning_content, message.content
        sample.tool_calls += len(message.tool_calls)
        assistant = {"role": "assistant", "content": message.content}
        if message.reasoning_content:
            assistant["reasoning_content"] = message.reasoning_content
        if message.tool_calls and tools and sample.tool_rounds < self.s.max_tool_rounds:
            assistant["tool_calls"] = [renderable_call(call.to_openai()) for call in message.tool_calls]
            new = [assistant] + [
                {"role": "tool", "tool_call_id": call.id, "name": call.name,
                 "content": _tool_output(sample.domain, sample.task, call.name, call.arguments)}
                for call in message.tool_calls
            ]  # fmt: skip
            sample.turns += new
            sample.messages = sample.messages + new
            sample.tool_rounds += 1
            self.bar.total += 1
            self.bar.refresh()
            return self.submit(sample)
        if message.tool_calls:  # calls beyond the rounds allowed (or with no tools offered) stay in the record
            assistant["tool_calls"] = [call.to_openai() for call in message.tool_calls]
        sample.turns.append(assistant)
        try:
            reward = float(sample.domain.verify(sample.task, sample.content))
        except Exception as e:  # a verifier tripped by odd model output: this sample fails, the run goes on
            return self.fail(sample, f"verify raised {type(e).__name__}: {e}", generation=False)
        if not 0.0 <= reward <= 1.0:
            raise ValueError(f"domain {sample.domain.name!r}: verify returned {reward}, outside [0, 1]")
        sample.reward = reward

    def fail(self, sample: _Sample, error: str, generation: bool = True) -> None:
        """Score the sample 0 and keep why; `generation`: the turn could not be generated (finish_reason "error")."""
        sample.error, sample.reward = error, 0.0
        if generation:
            sample.finish_reason = "error"


def _reasoning_tokens(ids: list[int], opened: bool, start_id: int | None, end_id: int | None) -> int:
    """Tokens of the turn's thinking block: from the start when the prompt opened `<think>` (else from a `<think>`
    the model wrote first) to `</think>`, or to the end when it never closed."""
    if not opened:
        if start_id is None or not ids or ids[0] != start_id:
            return 0
        ids = ids[1:]
    return ids.index(end_id) if end_id in ids else len(ids)


def _tool_output(domain: Domain, task: Task, name: str, arguments: str) -> str:
    """What the tool returns to the model; a call that cannot run gets an error message, never an exception."""
    args = tool_arguments(name, arguments)
    if isinstance(args, str):
        return args
    try:
        return str(domain.run_tool(task, name, args))
    except Exception as e:  # the interface says run_tool never raises; a domain that does still must not stop us
        return f"error: {type(e).__name__}: {e}"


def _domain_info(domain: Domain, tasks: list[Task], s: TaskEvalSettings) -> dict:
    """Tasks, distinct prompts, and how many of the prompts also come from the first overlap_seeds training seeds."""
    keys = [prompt_key(t) for t in tasks]
    train = {prompt_key(domain.generate(seed, s.difficulty)) for seed in split_seeds("train", s.overlap_seeds)}
    return {
        "description": domain.description,
        "tasks": len(tasks),
        "unique_prompts": len(set(keys)),
        "train_overlap": sum(k in train for k in keys),
        "overlap_seeds": s.overlap_seeds,
    }


def evaluate_tasks(
    model_or_engine,
    tokenizer,
    domains: str | Iterable[str | Domain] | None = None,
    samples: int = 20,
    *,
    max_num_seqs: int = 8,
    max_model_len: int | None = None,
    checkpoint: str | None = None,
    progress: bool = True,
    deadline: float | None = None,
    **settings,
) -> TaskEvalResult:
    """Evaluate on `samples` tasks of each domain (names, a comma-separated string or Domain objects; None: all).

    model_or_engine: an Engine (with no requests of its own in flight), or a HybridMoEForCausalLM, for which an
    Engine of `max_num_seqs` slots of `max_model_len` tokens (default: the config's max_position_embeddings) is
    built. settings: the fields of `TaskEvalSettings` (difficulty, reasoning, reasoning_budget, temperature, top_p,
    seed, pass_k, max_new_tokens, max_tool_rounds, split, offset, overlap_seeds). checkpoint: a label for reports.
    deadline (time.monotonic): the samples not finished by then are left out (run["not_evaluated"] counts them);
    the engine takes the samples task by task across domains and modes, so a cut leaves out the last tasks of every
    domain alike."""
    from ..serve.engine import Engine
    from ..serve.load import stop_token_ids

    s = TaskEvalSettings(samples=samples, **settings)
    domain_list = resolve_domains(domains, s.difficulty)
    engine = model_or_engine
    if not isinstance(engine, Engine):
        engine = Engine(
            model_or_engine, max_num_seqs=max_num_seqs,
            max_model_len=max_model_len or model_or_engine.config.max_position_embeddings,
            eos_token_id=stop_token_ids(tokenizer), detokenize=tokenizer, seed=s.seed,
        )  # fmt: skip
    elif engine.has_unfinished():
        raise ValueError("the engine has requests in flight; task evaluation steps the engine itself, so pass an "
                         "idle one")  # fmt: skip

    tasks = {d.name: [d.generate(seed, s.difficulty) for seed in split_seeds(s.split, s.samples, s.offset)]
             for d in domain_list}  # fmt: skip
    info = {d.name: _domain_info(d, tasks[d.name], s) for d in domain_list}
    runs = [
        _Sample(d, task, reasoning, k, list(task.messages))
        for reasoning in s.modes for d in domain_list for task in tasks[d.name] for k in range(s.pass_k)
    ]  # fmt: skip
    order = sorted(range(len(runs)), key=lambda i: (runs[i].task.seed, runs[i].k))  # stable: modes, domains within
    t0 = time.perf_counter()
    _Runner(engine, tokenizer, s, progress).run([runs[i] for i in order], deadline)
    elapsed = time.perf_counter() - t0
    records = [r.record() for r in runs if not r.cut]
    generated = sum(r["generated_tokens"] for r in records)
    run = {
        "format": FORMAT, "checkpoint": checkpoint, "domains": [d.name for d in domain_list],
        "max_num_seqs": engine.max_num_seqs, "max_model_len": engine.max_model_len, "elapsed_s": round(elapsed, 3),
        "generated_tokens": generated, "tokens_per_s": round(generated / elapsed, 2) if elapsed > 0 else None,
        "not_evaluated": sum(r.cut for r in runs),
    }  # fmt: skip
    return TaskEvalResult(run | {"settings": asdict(s)}, info, _summarize(records, s), records)


# ---------------------------------------------------------------------------------------------- results


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _summarize(records: list[dict], s: TaskEvalSettings) -> list[dict]:
    """One row per (domain, reasoning mode), in the order the records come in."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["domain"], r["reasoning"]), []).append(r)
    rows = []
    for (domain, mode), rs in groups.items():
        by_task: dict[int, list[float]] = {}
        for r in rs:
            by_task.setdefault(r["seed"], []).append(r["reward"])
        pass_at = {
            k: _mean([pass_at_k(len(v), sum(x >= 1.0 for x in v), k) for v in by_task.values()])
            for k in range(1, s.pass_k + 1)
        }
        rows.append({
            "domain": domain, "reasoning": mode, "tasks": len(by_task), "samples": len(rs),
            "accuracy": _mean([r["reward"] for r in rs]), "pass_at": pass_at,
            "mean_tokens": _mean([r["generated_tokens"] for r in rs]),
            "mean_reasoning_tokens": _mean([r["reasoning_tokens"] for r in rs]),
            "mean_tool_calls": _mean([r["tool_calls"] for r in rs]),
            "truncated": sum(r["finish_reason"] == "length" for r in rs), "failed": sum(r["failed"] for r in rs),
        })  # fmt: skip
    return rows


@dataclass
class TaskEvalResult:
    """run: settings and totals; domains: per-domain task counts and train overlap; summary: one row per (domain,
    reasoning mode); records: every sample. `to_dict()` is what tasks.json holds."""

    run: dict
    domains: dict[str, dict]
    summary: list[dict]
    records: list[dict]

    def row(self, domain: str, reasoning: str = "on") -> dict:
        for r in self.summary:
            if r["domain"] == domain and r["reasoning"] == reasoning:
                return r
        raise KeyError(f"no results for domain {domain!r} with reasoning {reasoning}")

    def accuracy(self, domain: str, reasoning: str = "on") -> float | None:
        """The mean reward (pass@1) of `domain` in a reasoning mode ("on" or "off"); None when none of its samples
        was evaluated (an evaluation cut at its deadline)."""
        try:
            return self.row(domain, reasoning)["accuracy"]
        except KeyError:
            return None

    def overall(self) -> dict[str, dict]:
        """Per reasoning mode: the mean over domains of accuracy, pass@k and tokens; failed and truncated summed."""
        out = {}
        for mode in dict.fromkeys(r["reasoning"] for r in self.summary):
            rows = [r for r in self.summary if r["reasoning"] == mode]
            out[mode] = {
                "domains": len(rows), "samples": sum(r["samples"] for r in rows),
                "accuracy": _mean([r["accuracy"] for r in rows]),
                "pass_at": {k: _mean([r["pass_at"][k] for r in rows]) for k in rows[0]["pass_at"]},
                "mean_tokens": _mean([r["mean_tokens"] for r in rows]),
                "mean_reasoning_tokens": _mean([r["mean_reasoning_tokens"] for r in rows]),
                "truncated": sum(r["truncated"] for r in rows), "failed": sum(r["failed"] for r in rows),
            }  # fmt: skip
        return out

    def to_dict(self) -> dict:
        return {"run": self.run, "domains": self.domains, "summary": self.summary, "overall": self.overall(),
                "records": self.records}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> TaskEvalResult:
        """Inverse of to_dict (as read back from tasks.json: pass@k keys come back as strings)."""
        summary = [r | {"pass_at": {int(k): v for k, v in r["pass_at"].items()}} for r in d["summary"]]
        return cls(d["run"], d["domains"], summary, d["records"])

    def table(self, markdown: bool = False) -> str:
        """Rows: domain x reasoning mode, then the mean over domains per mode. Accuracy and pass@K in percent;
        tokens, reasoning tokens and tool calls are means per answer; truncated (hit max_new_tokens) and failed
        count samples."""
        k = self.run["settings"]["pass_k"]
        header = ["domain", "reasoning", "tasks", "samples", "accuracy %", *([f"pass@{k} %"] if k > 1 else []),
                  "tokens", "reasoning tokens", "tool calls", "truncated", "failed"]  # fmt: skip

        def cells(name: str, r: dict, tasks: str, tool_calls: str) -> list[str]:
            return [name, r.get("reasoning", ""), tasks, str(r["samples"]), f"{100 * r['accuracy']:.1f}",
                    *([f"{100 * r['pass_at'][k]:.1f}"] if k > 1 else []), f"{r['mean_tokens']:.1f}",
                    f"{r['mean_reasoning_tokens']:.1f}", tool_calls, str(r["truncated"]), str(r["failed"])]  # fmt: skip

        rows = [cells(r["domain"], r, str(r["tasks"]), f"{r['mean_tool_calls']:.2f}") for r in self.summary]
        for mode, r in self.overall().items():
            rows.append(cells("(mean)", r | {"reasoning": mode}, "", ""))
        if markdown:
            lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
            return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [header, *rows])

    def markdown(self) -> str:
        s = self.run["settings"]
        sampling = ("greedy decoding" if s["temperature"] == 0 else
                    f"sampled (temperature {s['temperature']}, top-p {s['top_p']}, seed {s['seed']}), "
                    f"{s['pass_k']} samples per task")  # fmt: skip
        budget = "none" if s["reasoning_budget"] is None else f"{s['reasoning_budget']} tokens per turn"
        lines = [
            f"# Task evaluation: {self.run['checkpoint'] or 'model'}",
            "",
            f"{s['samples']} {s['split']} tasks per domain (seeds from offset {s['offset']}), difficulty "
            f"{s['difficulty']}, {sampling}; at most {s['max_new_tokens']} new tokens per turn and "
            f"{s['max_tool_rounds']} tool rounds; reasoning budget: {budget}. Accuracy is the mean reward of "
            "`verify` (pass@1); tokens are generated tokens per answer (every turn), reasoning tokens those inside "
            "the thinking block.",
            "",
            self.table(markdown=True),
            "",
            "![accuracy per domain](tasks.png)",
            "",
        ]
        overlap = [f"{name}: {i['train_overlap']} of {i['tasks']}" for name, i in self.domains.items()
                   if i["train_overlap"]]  # fmt: skip
        repeated = [f"{name}: {i['unique_prompts']} distinct of {i['tasks']}" for name, i in self.domains.items()
                    if i["unique_prompts"] < i["tasks"]]  # fmt: skip
        if overlap:
            lines += [f"Prompts also among the first {s['overlap_seeds']} training seeds: {'; '.join(overlap)}.", ""]
        if repeated:
            lines += [f"Repeated prompts: {'; '.join(repeated)}.", ""]
        failed = [r for r in self.records if r["failed"]]
        if failed:
            lines += [f"{len(failed)} failed samples (scored 0), e.g.:", ""]
            lines += [f"- {r['domain']} seed {r['seed']} reasoning {r['reasoning']}: {r['error']}" for r in failed[:5]]
            lines.append("")
        return "\n".join(lines)


def _bar_chart(series: dict[str, dict[str, float]], path: str, title: str) -> None:
    """Grouped bars: domains along x, one bar per series (accuracy 0-1 shown in percent); missing values leave a
    gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(dict.fromkeys(d for values in series.values() for d in values))
    width = 0.8 / max(len(series), 1)
    fig_width = min(18.0, max(6.0, 1.5 + 0.3 * len(domains) * max(2, len(series))))
    fig, ax = plt.subplots(figsize=(fig_width, 4.5))
    for i, (label, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(domains))]
        heights = [100 * values.get(d, math.nan) for d in domains]
        bars = ax.bar(xs, heights, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    ax.set_ylim(0, 120)  # the top is room for the legend
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("accuracy (%)")
    ax.set_title("\n".join(textwrap.wrap(title, int(8 * fig_width))))  # about 8 characters an inch at 12 pt
    ax.legend(fontsize=8, loc="upper left", ncols=min(len(series), 4))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _series(result: TaskEvalResult, label: str | None = None) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in result.summary:
        name = f"reasoning {r['reasoning']}" if label is None else f"{label}, reasoning {r['reasoning']}"
        out.setdefault(name, {})[r["domain"]] = r["accuracy"]
    return out


def plot_tasks(result: TaskEvalResult, path: str) -> None:
    """Accuracy per domain, reasoning on and off as grouped bars."""
    _bar_chart(_series(result), path, f"Task accuracy: {os.path.basename(result.run['checkpoint'] or 'model')}")


def plot_comparison(results: dict[str, TaskEvalResult], path: str, title: str = "Task accuracy") -> None:
    """Several runs side by side (e.g. {"before SFT": r0, "after SFT": r1}): a bar per run and reasoning mode."""
    series: dict[str, dict[str, float]] = {}
    for label, result in results.items():
        series |= _series(result, label)
    _bar_chart(series, path, title)


def write_task_report(result: TaskEvalResult, out_dir: str) -> dict[str, str]:
    """tasks.json, tasks.md and tasks.png in out_dir (each written atomically); returns their paths."""
    files = {k: os.path.join(out_dir, f"tasks.{k}") for k in ("json", "md", "png")}
    atomic_write_text(files["json"], json.dumps(result.to_dict(), indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(files["md"], result.markdown())
    plot_tasks(result, files["png"])
    return files
