"""Environment evaluation: a model plays held-out episodes of the RL environments (`hybridmoe.envs`) through the
same agent loop RL uses (`hybridmoe.envs.agent`), greedy, and each environment's `verify` scores them (pass@1);
`hybridmoe eval envs CHECKPOINT --envs a,b --samples N` calls `evaluate_envs` and `write_env_report`.

- Episodes: `samples` seeds per environment from the held-out split (`split_seeds("heldout", samples, offset)`), at
  one difficulty, reasoning on and/or off (separate passes over the same seeds).
- Generation: the in-process engine (`hybridmoe.serve.Engine`) behind `EngineGenerator`; every episode of a pass
  advances in one batched call per turn. `max_new_tokens` is per episode (all turns together), as in RL.
- Scores: accuracy is the mean reward (rewards in [0, 1]; some environments give partial credit or weighted
  components, see each module), `solved` the share of episodes with the full reward; each reward component's mean
  is reported too. An episode that fails (finish_reason "error") scores 0, is counted and keeps its error message.

Outputs (`write_env_report`): envs.md (the table), envs.json (settings, summary and every episode) and envs.png
(accuracy per environment, reasoning on/off as grouped bars, drawn by `hybridmoe.eval.tasks`' chart), written
atomically.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..envs.base import Environment
from ..tasks import split_seeds
from ..utils import atomic_write_text
from .tasks import MODES, _bar_chart, _mean

FORMAT = "hybridmoe-env-eval-1"


def resolve_envs(envs: str | Sequence[str] | dict[str, Environment] | None, difficulty: int = 1):
    """Environments by name (comma-separated string or list; None: every registered one) or as given; a difficulty
    beyond an environment's tasks is an error before any model is loaded."""
    from ..envs.agent import make_envs

    resolved = dict(envs) if isinstance(envs, dict) else make_envs(envs)
    for name, env in resolved.items():
        top = getattr(env, "max_difficulty", None)
        if difficulty < 1 or (top is not None and difficulty > top):
            raise ValueError(f"difficulty {difficulty} is outside 1..{top} for environment {name!r}")
    return resolved


def evaluate_envs(
    model_or_engine,
    tokenizer,
    envs: str | Sequence[str] | dict[str, Environment] | None = None,
    samples: int = 20,
    *,
    difficulty: int = 1,
    reasoning: str = "both",
    max_new_tokens: int = 512,
    split: str = "heldout",
    offset: int = 0,
    max_num_seqs: int = 8,
    max_model_len: int | None = None,
    seed: int = 0,
    checkpoint: str | None = None,
) -> EnvEvalResult:
    """Greedy pass@1 of `samples` held-out episodes per environment. model_or_engine: an idle Engine, or a model
    for which one of `max_num_seqs` slots of `max_model_len` tokens (default: the config's) is built."""
    from ..envs.agent import EngineGenerator, play
    from ..serve.engine import Engine
    from ..serve.load import stop_token_ids
    from ..serve.sampling import SamplingParams

    if samples < 1 or max_new_tokens < 1:
        raise ValueError(f"need samples >= 1 and max_new_tokens >= 1, got {samples} and {max_new_tokens}")
    if reasoning not in MODES:
        raise ValueError(f"reasoning must be one of {', '.join(MODES)}, got {reasoning!r}")
    seeds = list(split_seeds(split, samples, offset))
    resolved = resolve_envs(envs, difficulty)
    engine = model_or_engine
    if not isinstance(engine, Engine):
        engine = Engine(
            model_or_engine, max_num_seqs=max_num_seqs,
            max_model_len=max_model_len or model_or_engine.config.max_position_embeddings,
            eos_token_id=stop_token_ids(tokenizer), detokenize=tokenizer, seed=seed,
        )  # fmt: skip
    generator = EngineGenerator(engine)
    requests = [(name, s) for name in resolved for s in seeds]
    records, t0 = [], time.perf_counter()
    for mode in MODES[reasoning]:
        rollouts = play(resolved, requests, generator, tokenizer, params=SamplingParams(temperature=0.0),
                        difficulty=difficulty, reasoning=mode, max_new_tokens=max_new_tokens)  # fmt: skip
        records += [_record(r, "on" if mode else "off") for r in rollouts]
    elapsed = time.perf_counter() - t0
    generated = sum(r["generated_tokens"] for r in records)
    run = {
        "format": FORMAT, "checkpoint": checkpoint, "envs": list(resolved), "samples": samples,
        "difficulty": difficulty, "reasoning": reasoning, "max_new_tokens": max_new_tokens, "split": split,
        "offset": offset, "decoding": "greedy", "max_num_seqs": engine.max_num_seqs,
        "max_model_len": engine.max_model_len, "elapsed_s": round(elapsed, 3), "generated_tokens": generated,
        "tokens_per_s": round(generated / elapsed, 2) if elapsed > 0 else None,
    }  # fmt: skip
    return EnvEvalResult(run, _summarize(records), records)


def _record(r, mode: str) -> dict:
    traj = r.trajectory()
    return {
        "env": traj.env, "seed": traj.seed, "reasoning": mode, "reward": traj.reward, "components": traj.components,
        "finish_reason": traj.finish_reason, "tool_calls": traj.num_tool_calls, "generated_tokens": r.generated,
        "prompt": r.prompt_text, "completion": r.completion, "content": r.content, "messages": traj.messages,
        "failed": r.error is not None, "error": r.error,
    }  # fmt: skip


def _summarize(records: list[dict]) -> list[dict]:
    """One row per (environment, reasoning mode), in the order the records come in."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["env"], r["reasoning"]), []).append(r)
    rows = []
    for (env, mode), rs in groups.items():
        names = list(dict.fromkeys(k for r in rs for k in r["components"]))
        rows.append({
            "env": env, "reasoning": mode, "samples": len(rs), "accuracy": _mean([r["reward"] for r in rs]),
            "solved": _mean([float(r["reward"] >= 1.0) for r in rs]),
            "components": {k: _mean([r["components"].get(k, 0.0) for r in rs]) for k in names},
            "mean_tokens": _mean([r["generated_tokens"] for r in rs]),
            "mean_tool_calls": _mean([r["tool_calls"] for r in rs]),
            "truncated": sum(r["finish_reason"] == "length" for r in rs), "failed": sum(r["failed"] for r in rs),
        })  # fmt: skip
    return rows


@dataclass
class EnvEvalResult:
    """run: settings and totals; summary: one row per (environment, reasoning mode); records: every episode.
    `to_dict()` is what envs.json holds."""

    run: dict
    summary: list[dict]
    records: list[dict]

    def row(self, env: str, reasoning: str = "on") -> dict:
        for r in self.summary:
            if r["env"] == env and r["reasoning"] == reasoning:
                return r
        raise KeyError(f"no results for environment {env!r} with reasoning {reasoning}")

    def accuracy(self, env: str, reasoning: str = "on") -> float:
        """The mean reward (greedy pass@1) of `env` in a reasoning mode ("on" or "off")."""
        return self.row(env, reasoning)["accuracy"]

    def to_dict(self) -> dict:
        return {"run": self.run, "summary": self.summary, "records": self.records}

    @classmethod
    def from_dict(cls, d: dict) -> EnvEvalResult:
        return cls(d["run"], d["summary"], d["records"])

    def table(self, markdown: bool = False) -> str:
        """Accuracy and solved in percent, reward components as means, tokens and tool calls per episode;
        truncated (token or step limit) and failed count episodes."""
        header = ["env", "reasoning", "samples", "accuracy %", "solved %", "components", "tokens", "tool calls",
                  "truncated", "failed"]  # fmt: skip
        rows = [
            [r["env"], r["reasoning"], str(r["samples"]), f"{100 * r['accuracy']:.1f}", f"{100 * r['solved']:.1f}",
             " ".join(f"{k}={v:.2f}" for k, v in r["components"].items()) or "-", f"{r['mean_tokens']:.1f}",
             f"{r['mean_tool_calls']:.2f}", str(r["truncated"]), str(r["failed"])]
            for r in self.summary
        ]  # fmt: skip
        if markdown:
            lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * 3 + "---|" + "---:|" * 4]
            return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [header, *rows])

    def markdown(self) -> str:
        s = self.run
        lines = [
            f"# Environment evaluation: {s['checkpoint'] or 'model'}",
            "",
            f"{s['samples']} {s['split']} episodes per environment (seeds from offset {s['offset']}), difficulty "
            f"{s['difficulty']}, greedy decoding, at most {s['max_new_tokens']} generated tokens per episode. "
            "Accuracy is the mean reward of the environment's `verify` (pass@1), solved the share of episodes with "
            "the full reward.",
            "",
            self.table(markdown=True),
            "",
            "![accuracy per environment](envs.png)",
            "",
        ]
        failed = [r for r in self.records if r["failed"]]
        if failed:
            lines += [f"{len(failed)} failed episodes (scored 0), e.g.:", ""]
            lines += [f"- {r['env']} seed {r['seed']} reasoning {r['reasoning']}: {r['error']}" for r in failed[:5]]
            lines.append("")
        return "\n".join(lines)


def plot_envs(result: EnvEvalResult, path: str) -> None:
    """Accuracy per environment, reasoning on and off as grouped bars."""
    series: dict[str, dict[str, float]] = {}
    for r in result.summary:
        series.setdefault(f"reasoning {r['reasoning']}", {})[r["env"]] = r["accuracy"]
    name = os.path.basename(result.run["checkpoint"] or "model")
    _bar_chart(series, path, f"Environment accuracy: {name}")


def write_env_report(result: EnvEvalResult, out_dir: str) -> dict[str, str]:
    """envs.json, envs.md and envs.png in out_dir (each written atomically); returns their paths."""
    files = {k: os.path.join(out_dir, f"envs.{k}") for k in ("json", "md", "png")}
    atomic_write_text(files["json"], json.dumps(result.to_dict(), indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(files["md"], result.markdown())
    plot_envs(result, files["png"])
    return files
