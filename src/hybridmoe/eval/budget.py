"""Task accuracy against the reasoning budget: how much of a model's accuracy its thinking carries, token by token.

One engine answers the same held-out tasks of each domain once per budget (reasoning on, through
`hybridmoe.eval.tasks.evaluate_tasks`): the budget is the server's `ReasoningBudget` logits processor, which forces
`</think>` once that many thinking tokens were generated in a turn, after which the model writes its answer (what
`hybridmoe serve` does for a request's `reasoning_budget`). Budget None is no budget; one more pass with reasoning
off (an empty thinking block in the prompt) is the floor. Each point records the accuracy, the mean and largest
reasoning tokens of an answer (its turns together) and the largest of any one turn, which is what the budget caps
(each turn of a tool-using answer is its own request), so the budget is seen to hold.

`sweep_reasoning_budget` runs the passes (resuming from the passes of an earlier sweep with the same settings, each
pass with its share of an optional deadline), `plot_budget` draws accuracy against budget per domain and
`budget_table` writes it as markdown. `benchmarks/bench_reasoning_budget.py` and `hybridmoe posttrain` use them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ..utils import atomic_write
from .tasks import evaluate_tasks, resolve_domains

OFF = "reasoning off"  # the `budget` of the reasoning-off pass


def parse_budgets(text: str) -> list[int | None]:
    """ "0,4,none" -> [0, 4, None] (none: no budget). A budget is a whole number of tokens >= 0, each listed once."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in ("none", "unlimited"):
            out.append(None)
        elif item.isdigit():
            out.append(int(item))
        else:
            raise ValueError(f"a reasoning budget is a number of tokens >= 0 or 'none', got {item!r} in {text!r}")
    check_budgets(out)
    return out


def check_budgets(budgets: Sequence[int | None]) -> None:
    if not budgets:
        raise ValueError("no reasoning budgets given; pass e.g. 0,4,16,none")
    for b in budgets:
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 0):
            raise ValueError(f"a reasoning budget is a whole number of tokens >= 0 or None (no budget), got {b!r}")
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"a reasoning budget is listed twice: {list(budgets)}")


def point(result, domain: str, mode: str) -> dict | None:
    """One domain's figures in one pass (None: none of its tasks was answered before the deadline)."""
    records = [r for r in result.records if r["domain"] == domain and r["reasoning"] == mode]
    if not records:
        return None
    row = result.row(domain, mode)
    return {"accuracy": row["accuracy"], "tasks": row["tasks"], "mean_tokens": row["mean_tokens"],
            "mean_reasoning_tokens": row["mean_reasoning_tokens"],
            "max_reasoning_tokens": max(r["reasoning_tokens"] for r in records),  # an answer's turns together
            "max_turn_reasoning_tokens": max(r["max_turn_reasoning_tokens"] for r in records),  # what a budget caps
            "truncated": row["truncated"], "failed": row["failed"]}  # fmt: skip


def sweep_reasoning_budget(
    model_or_engine,
    tokenizer,
    domains,
    samples: int,
    budgets: Sequence[int | None],
    *,
    deadline: float | None = None,
    previous: dict | None = None,
    on_pass: Callable[[dict], None] | None = None,
    progress: bool = False,
    **settings,
) -> dict:
    """One pass with reasoning on per budget, then one with reasoning off, over `samples` tasks of each domain.

    settings: `evaluate_tasks`'s (max_num_seqs, max_model_len, checkpoint, and TaskEvalSettings fields but
    reasoning and reasoning_budget; greedy unless a temperature is given). deadline (time.monotonic): each pass not
    yet run gets an equal share of the time left; answers not finished by then are left out and counted in the
    pass's `not_evaluated`. previous: an earlier sweep's result: its complete passes with the same settings are kept,
    not run again (a pass cut at its deadline runs again). on_pass(result): called after every pass, to save it.

    Returns {"settings", "passes": [{budget, reasoning, elapsed_s, generated_tokens, not_evaluated, points: {domain:
    point}}], "curves": {domain: [point + budget]}, "reasoning_off": {domain: point}}."""
    check_budgets(budgets)
    for key in ("reasoning", "reasoning_budget"):
        if key in settings:
            raise ValueError(f"the sweep sets {key} itself; do not pass it")
    resolved = resolve_domains(domains)
    names = [d.name for d in resolved]
    run_keys = ("max_num_seqs", "max_model_len", "checkpoint")
    task_settings = {k: v for k, v in settings.items() if k not in run_keys}
    recorded = {"domains": names, "samples": samples, **task_settings}
    kept = {}
    if previous and previous.get("settings") == recorded:
        kept = {_key(p): p for p in previous.get("passes", []) if not p["not_evaluated"]}
    plan = [(b, "on") for b in budgets] + [(OFF, "off")]
    passes = []
    for i, (budget, mode) in enumerate(plan):
        if (budget, mode) in kept:
            passes.append(kept[(budget, mode)])
            continue
        until = None
        if deadline is not None:
            left = sum((b, m) not in kept for b, m in plan[i:])
            until = time.monotonic() + max(0.0, deadline - time.monotonic()) / left
        out = evaluate_tasks(model_or_engine, tokenizer, resolved, samples, reasoning=mode, deadline=until,
                             reasoning_budget=None if mode == "off" else budget, progress=progress,
                             **settings)  # fmt: skip
        passes.append({"budget": budget, "reasoning": mode, "elapsed_s": out.run["elapsed_s"],
                       "generated_tokens": out.run["generated_tokens"], "not_evaluated": out.run["not_evaluated"],
                       "points": {d: point(out, d, mode) for d in names}})  # fmt: skip
        result = _assemble(recorded, passes, names)
        if on_pass is not None:
            on_pass(result)
    return _assemble(recorded, passes, names)


def _key(p: dict) -> tuple:
    return (p["budget"], p["reasoning"])


def _assemble(settings: dict, passes: list[dict], names: list[str]) -> dict:
    on = [p for p in passes if p["reasoning"] == "on"]
    off = next((p for p in passes if p["reasoning"] == "off"), None)
    return {
        "settings": settings,
        "passes": list(passes),
        "curves": {d: [{"budget": p["budget"]} | (p["points"][d] or {"accuracy": None}) for p in on] for d in names},
        "reasoning_off": {d: off["points"][d] if off else None for d in names},
        "not_evaluated": sum(p["not_evaluated"] for p in passes),
    }


def budget_label(budget) -> str:
    return "none" if budget is None else str(budget)


def budget_table(result: dict) -> list[str]:
    """Markdown rows: a budget per row; per domain its accuracy and the largest reasoning tokens of one turn."""

    def cells(p):
        if p is None or p.get("accuracy") is None:
            return "n/a | n/a"
        return f"{100 * p['accuracy']:.1f}% | {p['max_turn_reasoning_tokens']}"

    domains = list(result["curves"])
    lines = [
        "| reasoning budget | " + " | ".join(f"{d} accuracy | {d} most thinking tokens in a turn" for d in domains)
        + " |",
        "|---|" + "---:|" * (2 * len(domains)),
    ]  # fmt: skip
    n = len(next(iter(result["curves"].values()), []))
    for i in range(n):
        budget = result["curves"][domains[0]][i]["budget"]
        lines.append(f"| {budget_label(budget)} | " + " | ".join(cells(result["curves"][d][i]) for d in domains)
                     + " |")  # fmt: skip
    lines.append("| reasoning off | " + " | ".join(cells(result["reasoning_off"][d]) for d in domains) + " |")
    return lines


def plot_budget(result: dict, path: str, title: str | None = None) -> str:
    """Accuracy against budget per domain, the budgets evenly spaced (they roughly double), "none" last; reasoning off
    as a dashed line per domain. Written atomically; returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = []
    for i, (domain, curve) in enumerate(result["curves"].items()):
        color = f"C{i}"
        xs = [j for j, c in enumerate(curve) if c.get("accuracy") is not None]
        ax.plot(xs, [100 * curve[j]["accuracy"] for j in xs], marker="o", color=color, label=f"{domain}, reasoning on")
        off = result["reasoning_off"].get(domain)
        if off is not None:
            ax.axhline(100 * off["accuracy"], color=color, linestyle="--", alpha=0.6, label=f"{domain}, reasoning off")
        labels = [budget_label(c["budget"]) for c in curve]
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("reasoning budget (thinking tokens per turn before </think> is forced)")
    ax.set_ylabel("accuracy, % of held-out tasks")
    samples = result["settings"]["samples"]
    ax.set_title(title or f"Accuracy against reasoning budget ({samples} tasks per domain)", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path
