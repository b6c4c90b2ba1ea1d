"""Which model size learns the task domains fastest on this machine: SFT from a fresh init for the same wall time.

Each model trains on the same packed task conversations of a speedrun (its `data/sft.jsonl` and tokenizer) for
`--seconds` of SFT at 8 x 512 tokens a step (the speedrun's SFT settings: lr 3e-3 -> 3e-4 cosine, 10% reasoning off,
3% reasoning cut to 16 tokens), then `hybridmoe eval tasks` scores 50 held-out tasks of eight domains, reasoning on
and off. A fresh init, not the speedrun's base: from bases of 77 to 1,474 pretraining steps `tiny`'s SFT loss at a
given step differed by under 0.04 (benchmarks/README.md, "Where the 30 minutes go"), so SFT's own tokens are what
is compared. Resumable: a model whose evaluation exists is not run again.

    python benchmarks/bench_sft_model_size.py runs/speedrun --out runs/sft-model-size

Writes benchmarks/results/sft-model-size.json and .md and benchmarks/sft-model-size.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = os.path.join(HERE, "..", "recipes", "tiny-sft.yaml")
DOMAINS = ["json_schema", "strings", "word_problems", "arithmetic", "lists", "python", "calculator", "instructions"]
# name -> (preset, overrides as a YAML flow mapping, the cosine schedule's steps for 420 s, about what fits in them)
HALF_WIDTH = ("hidden_size: 128, num_attention_heads: 2, num_key_value_heads: 1, mamba_num_heads: 4, "
              "intermediate_size: 512, moe_intermediate_size: 96, moe_shared_expert_intermediate_size: 256, "
              "moe_latent_size: 32, n_groups: 1")  # fmt: skip
MODELS = {
    "tiny": ("tiny", "", 280),
    "tiny-half-width": ("tiny", HALF_WIDTH, 650),
    "micro": ("micro", "", 1000),
}


def run_model(name: str, run_dir: str, out: str, seconds: float) -> None:
    preset, overrides, steps_420 = MODELS[name]
    target = os.path.join(out, name)
    if os.path.exists(os.path.join(target, "eval", "tasks.json")):
        print(f"{name}: done already ({target})")
        return
    steps = round(steps_420 * seconds / 420)
    subprocess.run(
        ["hybridmoe", "sft", RECIPE, "model.init_from=null", f"model.preset={preset}",
         f"model.overrides={{{overrides}}}", f"data.tokenizer={run_dir}/tokenizer",
         f"data.datasets={{{run_dir}/data/sft.jsonl: 1.0}}", f"train.steps={steps}", f"train.time_limit_s={seconds}",
         "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=20", "sft.reasoning_off_fraction=0.1",
         "sft.reasoning_truncate_fraction=0.03", "sft.reasoning_truncate_tokens=16", f"train.out_dir={target}",
         "train.save_every=100000", "train.keep_last=1", "train.seed=0", "train.tensorboard=false"],
        check=True,
    )  # fmt: skip
    subprocess.run(
        ["hybridmoe", "eval", "tasks", target, "--domains", ",".join(DOMAINS), "--samples", "50", "--reasoning",
         "both", "--out", os.path.join(target, "eval")],
        check=True,
    )  # fmt: skip


def summarize(out: str, names: list[str]) -> dict:
    from hybridmoe.config import HybridMoEConfig
    from hybridmoe.modeling import HybridMoEForCausalLM

    rows = {}
    for name in names:
        target = os.path.join(out, name)
        log = [r for r in _jsonl(os.path.join(target, "log.jsonl")) if "loss" in r]
        with open(os.path.join(target, "eval", "tasks.json")) as f:
            evals = json.load(f)
        preset, _, _ = MODELS[name]
        config = HybridMoEConfig.from_pretrained(sorted(_checkpoints(target))[-1])
        with torch.device("meta"):
            params = sum(p.numel() for p in HybridMoEForCausalLM(config).parameters())
        acc = {(r["domain"], r["reasoning"]): 100 * r["accuracy"] for r in evals["summary"]}
        rows[name] = {
            "preset": preset, "hidden_size": config.hidden_size, "pattern": config.hybrid_override_pattern,
            "parameters": params, "steps": len(log), "tokens": log[-1]["tokens"],
            "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in log[5:]),
            "loss_last_40": statistics.mean(r["loss"] for r in log[-40:]),
            "accuracy": {f"{d} {m}": acc.get((d, m)) for d in DOMAINS for m in ("on", "off")},
        }  # fmt: skip
    return rows


def _jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _checkpoints(target: str) -> list[str]:
    root = os.path.join(target, "checkpoints")
    return [os.path.join(root, d) for d in os.listdir(root) if d.startswith("step-")]


def write(rows: dict, seconds: float, machine: str) -> None:
    results = os.path.join(HERE, "results")
    with open(os.path.join(results, "sft-model-size.json"), "w") as f:
        json.dump({"seconds": seconds, "machine": machine, "models": rows}, f, indent=1)
    names = list(rows)
    lines = [f"# SFT from a fresh init, {seconds:.0f} s each ({machine})", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]  # fmt: skip
    for key, fmt in (("parameters", "{:,}"), ("hidden_size", "{}"), ("pattern", "`{}`"), ("steps", "{}"),
                     ("tokens", "{:,}"), ("tokens_per_s", "{:,.0f}"), ("loss_last_40", "{:.3f}")):  # fmt: skip
        lines.append(f"| {key} | " + " | ".join(fmt.format(rows[n][key]) for n in names) + " |")
    for key in rows[names[0]]["accuracy"]:
        lines.append(f"| {key} | " + " | ".join(f"{rows[n]['accuracy'][key]:.0f}%" for n in names) + " |")
    with open(os.path.join(results, "sft-model-size.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        on = [rows[name]["accuracy"][f"{d} on"] for d in DOMAINS]
        label = f"{name} ({rows[name]['parameters'] / 1e6:.1f}M, {rows[name]['tokens'] / 1e6:.1f}M tokens)"
        ax.bar([j + i * width for j in range(len(DOMAINS))], on, width, label=label)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(DOMAINS))], DOMAINS, rotation=20)
    ax.set_ylabel("held-out accuracy %, reasoning on")
    ax.set_title(f"SFT from a fresh init for {seconds:.0f} s on this CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "sft-model-size.png"), dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a speedrun directory (its data/sft.jsonl and tokenizer)")
    p.add_argument("--out", default="runs/sft-model-size")
    p.add_argument("--seconds", type=float, default=420.0)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    args = p.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    for name in names:
        run_model(name, os.path.abspath(args.run), args.out, args.seconds)
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    bf16 = "with AVX512-BF16" if "avx512_bf16" in flags else "without AVX512-BF16"
    machine = f"{platform.machine()}, {os.cpu_count()} cores {bf16}, torch {torch.__version__}"
    write(summarize(args.out, names), args.seconds, machine)


if __name__ == "__main__":
    main()
