"""Task accuracy against the reasoning budget: how much of a model's accuracy its thinking carries, token by token.

One engine over the checkpoint answers the same held-out tasks of each domain once per budget (greedy, reasoning
on) and once with reasoning off (`hybridmoe.eval.budget.sweep_reasoning_budget`: the budget is the server's
`ReasoningBudget` logits processor, which forces `</think>` once that many thinking tokens were generated in a
turn). "none" is no budget; reasoning off is drawn as a dashed line per domain. Each point also records the mean and
largest reasoning tokens of its answers (every turn together) and the largest of any one turn, which is what the
budget caps, so the budget is seen to hold (largest turn <= budget). `hybridmoe posttrain` runs the same sweep on its
MOPD student.

Writes benchmarks/results/reasoning-budget.json and benchmarks/reasoning-budget.png.

    python benchmarks/bench_reasoning_budget.py --checkpoint runs/speedrun/sft --samples 40
"""

import argparse
import json
import os
import platform
import time

import torch

from hybridmoe.cli import reasoning_budgets
from hybridmoe.eval.budget import budget_label, plot_budget, sweep_reasoning_budget
from hybridmoe.eval.tasks import resolve_domains
from hybridmoe.serve.load import load_engine
from hybridmoe.utils import atomic_write_text

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a model directory with its tokenizer")
    p.add_argument("--domains", default="word_problems,strings", help="task domains, comma-separated")
    p.add_argument("--samples", type=int, default=40, help="held-out tasks per domain")
    p.add_argument("--offset", type=int, default=0, help="first held-out seed")
    p.add_argument("--budgets", type=reasoning_budgets, default=reasoning_budgets("0,4,8,16,32,64,none"))
    p.add_argument("--max-new-tokens", type=int, default=128, help="per answer (reasoning and answer together)")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--out", default=os.path.join(HERE, "results", "reasoning-budget.json"))
    a = p.parse_args()
    domains = [d.name for d in resolve_domains(a.domains)]
    t0 = time.perf_counter()
    engine, tok = load_engine(a.checkpoint, max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len)
    settings = dict(split="heldout", offset=a.offset, temperature=0.0, max_new_tokens=a.max_new_tokens)
    sweep = sweep_reasoning_budget(engine, tok, domains, a.samples, a.budgets, **settings)
    for d in domains:
        for c in sweep["curves"][d]:
            print(f"{d:15s} budget {budget_label(c['budget']):>4s}: accuracy {100 * c['accuracy']:5.1f}%, reasoning "
                  f"tokens mean {c['mean_reasoning_tokens']:5.1f} max {c['max_reasoning_tokens']:3d} (a turn: "
                  f"{c['max_turn_reasoning_tokens']:3d})", flush=True)  # fmt: skip
        print(f"{d:15s} reasoning off: accuracy {100 * sweep['reasoning_off'][d]['accuracy']:5.1f}%")
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
        "passes": [{k: p[k] for k in ("budget", "elapsed_s", "generated_tokens")} for p in sweep["passes"]],
        "curves": sweep["curves"],
        "reasoning_off": sweep["reasoning_off"],
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    atomic_write_text(a.out, json.dumps(result, indent=1) + "\n")
    s = result["settings"]
    plot_budget(result, os.path.join(HERE, os.path.basename(a.out).replace(".json", ".png")),
                f"Accuracy against reasoning budget ({s['samples']} tasks per domain, greedy)")  # fmt: skip
    print(f"{result['wall_s']} s; wrote {a.out}")


if __name__ == "__main__":
    main()
