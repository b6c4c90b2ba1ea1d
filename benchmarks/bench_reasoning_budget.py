"""Task accuracy against the reasoning budget: how much of a model's accuracy its thinking carries, token by token.

One engine over the checkpoint answers the same held-out tasks of each domain once per budget (greedy, reasoning
on, through `hybridmoe.eval.tasks.evaluate_tasks`): the budget is the server's `ReasoningBudget` logits processor,
which forces `</think>` once that many thinking tokens were generated, after which the model writes its answer (as
`hybridmoe serve` does for a request's `reasoning_budget`). "none" is no budget; one more pass with reasoning off (an
empty thinking block in the prompt) is drawn as a dashed line per domain. Each point also records the mean and the
largest number of reasoning tokens of its answers (every turn together) and the largest of any one turn, which is
what the budget caps (each turn of a tool-using answer is its own request), so the budget is seen to hold (largest
turn <= budget).

Writes benchmarks/results/reasoning-budget.json and benchmarks/reasoning-budget.png.

    python benchmarks/bench_reasoning_budget.py --checkpoint runs/speedrun/sft --samples 40
"""

import argparse
import json
import os
import platform
import time

import torch

from hybridmoe.eval.tasks import evaluate_tasks, resolve_domains
from hybridmoe.serve.load import load_engine
from hybridmoe.utils import atomic_write_text

HERE = os.path.dirname(os.path.abspath(__file__))


def budgets(text: str) -> list[int | None]:
    """ "0,4,none" -> [0, 4, None] (none: no budget)."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in ("none", "unlimited"):
            out.append(None)
        elif item.isdigit():
            out.append(int(item))
        else:
            raise argparse.ArgumentTypeError(f"a budget is a number of tokens >= 0 or 'none', got {item!r}")
    return out


def point(result, domain: str, mode: str) -> dict:
    row = result.row(domain, mode)
    records = [r for r in result.records if r["domain"] == domain and r["reasoning"] == mode]
    return {"accuracy": row["accuracy"], "mean_tokens": row["mean_tokens"],
            "mean_reasoning_tokens": row["mean_reasoning_tokens"],
            "max_reasoning_tokens": max(r["reasoning_tokens"] for r in records),  # an answer's turns together
            "max_turn_reasoning_tokens": max(r["max_turn_reasoning_tokens"] for r in records),  # what a budget caps
            "truncated": row["truncated"], "failed": row["failed"]}  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a model directory with its tokenizer")
    p.add_argument("--domains", default="word_problems,strings", help="task domains, comma-separated")
    p.add_argument("--samples", type=int, default=40, help="held-out tasks per domain")
    p.add_argument("--offset", type=int, default=0, help="first held-out seed")
    p.add_argument("--budgets", type=budgets, default=budgets("0,4,8,16,32,64,none"))
    p.add_argument("--max-new-tokens", type=int, default=128, help="per answer (reasoning and answer together)")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--out", default=os.path.join(HERE, "results", "reasoning-budget.json"))
    a = p.parse_args()
    domains = [d.name for d in resolve_domains(a.domains)]
    t0 = time.perf_counter()
    engine, tok = load_engine(a.checkpoint, max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len)
    settings = dict(split="heldout", offset=a.offset, temperature=0.0, max_new_tokens=a.max_new_tokens)
    curves = {d: [] for d in domains}
    passes = []  # time and tokens of each evaluation pass
    for budget in a.budgets:
        result = evaluate_tasks(engine, tok, domains, a.samples, reasoning="on", reasoning_budget=budget,
                                progress=False, **settings)  # fmt: skip
        passes.append({"budget": budget, "elapsed_s": result.run["elapsed_s"],
                       "generated_tokens": result.run["generated_tokens"]})  # fmt: skip
        for d in domains:
            curves[d].append({"budget": budget} | point(result, d, "on"))
            c = curves[d][-1]
            print(f"{d:15s} budget {str(budget):>4s}: accuracy {100 * c['accuracy']:5.1f}%, reasoning tokens mean "
                  f"{c['mean_reasoning_tokens']:5.1f} max {c['max_reasoning_tokens']:3d} (a turn: "
                  f"{c['max_turn_reasoning_tokens']:3d})", flush=True)  # fmt: skip
    off = evaluate_tasks(engine, tok, domains, a.samples, reasoning="off", progress=False, **settings)
    reasoning_off = {d: point(off, d, "off") for d in domains}
    passes.append({"budget": "reasoning off", "elapsed_s": off.run["elapsed_s"],
                   "generated_tokens": off.run["generated_tokens"]})  # fmt: skip
    for d in domains:
        print(f"{d:15s} reasoning off: accuracy {100 * reasoning_off[d]['accuracy']:5.1f}%")
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "checkpoint": a.checkpoint,
        "settings": {k: v for k, v in vars(a).items() if k not in ("checkpoint", "out")} | settings | {"greedy": True},
        "wall_s": round(time.perf_counter() - t0, 1),
        "passes": passes,
        "curves": curves,
        "reasoning_off": reasoning_off,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    atomic_write_text(a.out, json.dumps(result, indent=1) + "\n")
    plot(result, os.path.join(HERE, os.path.basename(a.out).replace(".json", ".png")))
    print(f"{result['wall_s']} s; wrote {a.out}")


def plot(result: dict, path: str) -> None:
    """Accuracy against budget per domain, the budgets evenly spaced (they roughly double), "none" last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (domain, curve) in enumerate(result["curves"].items()):
        xs = list(range(len(curve)))
        color = f"C{i}"
        ax.plot(xs, [100 * c["accuracy"] for c in curve], marker="o", color=color, label=f"{domain}, reasoning on")
        ax.axhline(100 * result["reasoning_off"][domain]["accuracy"], color=color, linestyle="--", alpha=0.6,
                   label=f"{domain}, reasoning off")  # fmt: skip
    labels = [str(c["budget"]) if c["budget"] is not None else "none" for c in curve]
    ax.set_xticks(xs, labels)
    ax.set_xlabel("reasoning budget (thinking tokens before </think> is forced)")
    ax.set_ylabel("accuracy, % of held-out tasks")
    s = result["settings"]
    ax.set_title(f"Accuracy against reasoning budget ({s['samples']} tasks per domain, greedy)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
