"""Fine-tuning Hugging Face MoE models: plain transformers (each `experts_implementation`) vs `hybridmoe.automodel`,
side by side in one run, on the same random weights and the same batches (issue 6).

Two shapes, random init, bf16 weights and compute (--dtype fp32 for fp32), AdamW (lr 1e-4), batch 2 x 512:
  - qwen3_moe: 4 layers, hidden 512, 8 heads of 64 (4 KV), 128 experts of width 128, top-8, vocab 8192;
  - nemotron_h: the same width and experts as a hybrid, Mamba-2 / MoE / attention / MoE / Mamba-2 / MoE (6 layers),
    no latent projection.
Each (shape, implementation) runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own; "added"
is the peak minus the resident size just before the model is built. Tokens/s is the median over the timed steps
(after `--warmup` untimed ones); the losses of every step are recorded so the curves can be compared.
`--tensor-peak` also profiles one more step's peak of live tensor bytes; `--lora` trains rank-8 adapters instead
(hybridmoe's `apply_lora` against PEFT on the transformers model, the same targets).

    python benchmarks/bench_automodel.py                 # hybridmoe, eager, grouped_mm: about 20 minutes on 2 cores
    python benchmarks/bench_automodel.py --impls hybridmoe,grouped_mm --lora --tensor-peak
    python benchmarks/bench_automodel.py --impls batched_mm --shapes qwen3_moe   # many GB and a long time here
Results: benchmarks/results/automodel.json (--out), benchmarks/automodel-loss.png (named after --out) and a
markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

IMPLS = ["hybridmoe", "eager", "grouped_mm", "batched_mm"]


def make_config(shape: str):
    import transformers

    common = dict(vocab_size=8192, hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                  initializer_range=0.02, tie_word_embeddings=False)  # fmt: skip
    if shape == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common, num_hidden_layers=4, intermediate_size=1024, moe_intermediate_size=128, num_experts=128,
            num_experts_per_tok=8, norm_topk_prob=True,
        )  # fmt: skip
    if shape == "nemotron_h":
        kinds = ["linear_attention", "moe", "full_attention", "moe", "linear_attention", "moe"]
        return transformers.NemotronHConfig(
            **common, layers_block_type=kinds, intermediate_size=1024, mamba_num_heads=16, mamba_head_dim=64,
            ssm_state_size=64, n_groups=2, chunk_size=128, n_routed_experts=128, num_experts_per_tok=8,
            moe_intermediate_size=128, moe_shared_expert_intermediate_size=256, n_group=1, topk_group=1,
            num_nextn_predict_layers=0, eos_token_id=None,
        )  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


EXPERT_WEIGHTS = {"qwen3_moe": ["experts.gate_up_proj", "experts.down_proj"],
                  "nemotron_h": ["experts.up_proj", "experts.down_proj"]}  # fmt: skip


# PEFT refuses LoRA on a Mamba mixer's out_proj, so nemotron_h adapts every other linear layer, on both sides.
LINEAR_TARGETS = {
    "qwen3_moe": "all-linear",
    "nemotron_h": ["in_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
}


DTYPES = {"bf16": "bfloat16", "fp32": "float32"}  # torch dtype names (torch is imported in the workers only)


def add_lora(model, shape: str, impl: str):
    """Rank-8 LoRA (alpha 16) on the linear layers (all but the LM head; nemotron_h: but the Mamba out_proj) and on
    both expert weights: hybridmoe's grouped expert LoRA, or PEFT's (target_parameters) on the transformers model;
    the base weights frozen."""
    if impl == "hybridmoe":
        from hybridmoe.automodel import apply_lora

        return apply_lora(model, r=8, alpha=16, target_modules=LINEAR_TARGETS[shape], experts=True)
    import peft

    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=LINEAR_TARGETS[shape], target_parameters=EXPERT_WEIGHTS[shape]
    )
    return peft.get_peft_model(model, config)


def tensor_peak_mb(step) -> float:
    """The peak of live tensor bytes over one call of `step`, from torch.profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        step()
    _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline("cpu")
    return max(sum(row) for row in sizes) / 2**20


def worker(
    shape: str, impl: str, steps: int, warmup: int, batch: int, seq: int, lora: bool, tensor_peak: bool, dtype: str
) -> dict:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = make_config(shape)
    base = rss_mb()
    if impl == "hybridmoe":
        from hybridmoe.automodel import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, DTYPES[dtype]))
    else:
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, DTYPES[dtype]), experts_implementation=impl
        )
    if lora:
        model = add_lora(model, shape, impl)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(1)
    losses, times = [], []

    def step(ids):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    for i in range(warmup + steps):
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
        t0 = time.perf_counter()
        step(ids)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {
        "params": params,
        "trainable": sum(p.numel() for p in trainable),
        "tokens_per_s": batch * seq / statistics.median(times),
        "peak_mb": peak_rss_mb(),
        "added_mb": peak_rss_mb() - base,
    }
    if tensor_peak:  # one more step, after the timed ones and the resident-size reading
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
        out["tensor_peak_mb"] = tensor_peak_mb(lambda: step(ids))
    return out | {"losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen3_moe,nemotron_h")
    parser.add_argument("--impls", default="hybridmoe,eager,grouped_mm", help=f"some of {','.join(IMPLS)}")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="weights and compute")
    parser.add_argument("--lora", action="store_true", help="train rank-8 LoRA adapters (linears and experts) only")
    parser.add_argument("--tensor-peak", action="store_true", help="also profile one more step's live tensor peak")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "automodel.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        shape, impl = args.worker.split(":")
        row = worker(
            shape, impl, args.steps, args.warmup, args.batch, args.seq, args.lora, args.tensor_peak, args.dtype
        )
        print(json.dumps(row))
        return
    import torch

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "command": " ".join(["python", "benchmarks/bench_automodel.py", *sys.argv[1:]]),
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup, "lora": args.lora,
        "dtype": args.dtype,
        "rows": [],
    }  # fmt: skip
    for shape in args.shapes.split(","):
        for impl in args.impls.split(","):
            cmd = [sys.executable, __file__, "--worker", f"{shape}:{impl}", "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq),
                   "--dtype", args.dtype, *(["--lora"] if args.lora else []),
                   *(["--tensor-peak"] if args.tensor_peak else [])]  # fmt: skip
            row = {"shape": shape, "impl": impl}
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                if proc.returncode != 0:
                    tail = (proc.stderr.strip().splitlines() or [""])[-1][-200:]
                    row["error"] = f"exit code {proc.returncode}: {tail}"
                else:
                    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            except subprocess.TimeoutExpired:
                row["error"] = f"timed out after {args.timeout} s"
            results["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
            save(args.out, results)
    print(markdown(results))
    name = os.path.splitext(os.path.basename(args.out))[0]  # results/automodel.json -> automodel-loss.png
    plot(results, os.path.join(os.path.dirname(os.path.abspath(args.out)), "..", f"{name}-loss.png"))


def save(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(path + ".tmp", path)


def markdown(results: dict) -> str:
    lines = [
        "| shape | implementation | tokens/s | vs best transformers | peak MB | added MB | added vs best | "
        "tensor peak MB | tensor peak vs best | max loss diff vs transformers |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape in dict.fromkeys(r["shape"] for r in results["rows"]):
        rows = [r for r in results["rows"] if r["shape"] == shape]
        theirs = [r for r in rows if r["impl"] != "hybridmoe" and "error" not in r]
        best = max(theirs, key=lambda r: r["tokens_per_s"]) if theirs else None
        for r in rows:
            name = "hybridmoe.automodel" if r["impl"] == "hybridmoe" else f"transformers {r['impl']}"
            if "error" in r:
                lines.append(f"| {shape} | {name} | failed: {r['error'][:60]} | | | | | | | |")
                continue
            speed = f"{r['tokens_per_s'] / best['tokens_per_s']:.2f}x" if best else "-"
            mem = f"{r['added_mb'] / best['added_mb'] - 1:+.0%}" if best else "-"
            diff = max(abs(a - b) for a, b in zip(r["losses"], best["losses"])) if best else float("nan")
            tp, tp_best = r.get("tensor_peak_mb"), best.get("tensor_peak_mb") if best else None
            tensor = f"{tp:.0f}" if tp else "-"
            tensor_vs = f"{tp / tp_best - 1:+.0%}" if tp and tp_best else "-"
            lines.append(
                f"| {shape} | {name} | {r['tokens_per_s']:.0f} | {speed} | {r['peak_mb']:.0f} | {r['added_mb']:.0f} "
                f"| {mem} | {tensor} | {tensor_vs} | {diff:.2e} |"
            )
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in results["rows"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 3.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for r in results["rows"]:
            if r["shape"] == shape and "losses" in r:
                label = "hybridmoe.automodel" if r["impl"] == "hybridmoe" else r["impl"]
                ax.plot(range(1, len(r["losses"]) + 1), r["losses"], marker="o", label=label, alpha=0.8)
        mode = ", LoRA r=8" if results.get("lora") else ""
        ax.set_title(f"{shape}, {results.get('dtype', 'bf16')}, batch {results['batch']} x {results['seq']}{mode}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
