"""NVFP4 training ablations at small scale: `tiny` from scratch in BF16 and in emulated NVFP4 (`quant.training`).

Six runs on the same data, seed and steps, all with fp32 master weights and bf16 autocast (train.precision
autocast-bf16): BF16 (precision.recipe none); the NVFP4 recipe; NVFP4 without the random Hadamard transform, without
stochastic rounding, without 2D weight scaling, and without the BF16 tail (bf16_tail_fraction 0). Each records the
validation loss along training (fixed held-out windows), the share of exactly-zero weight-gradient elements (every
linear and routed-expert weight, and the linears alone; the embedding, whose rows see only some tokens, left out)
and the step time.
Writes benchmarks/results/nvfp4_ablations.json and benchmarks/nvfp4-ablations.png (the relative validation-loss gap
of each run against BF16 along training, and the zero-gradient share).

Data: the Python standard library's own source files (the corpus `hybridmoe speedrun` trains on; nothing is
downloaded), as UTF-8 bytes (vocab_size 256: no tokenizer to train); every 20th file is held out for validation.

    python benchmarks/bench_nvfp4.py                       # 6 runs x 120 steps of 4 x 128 tokens
    python benchmarks/bench_nvfp4.py --steps 20 --runs bf16,nvfp4
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch

from hybridmoe.kernels.linear import Linear
from hybridmoe.modeling import Experts
from hybridmoe.speedrun import stdlib_sources
from hybridmoe.train.balance import balance_experts
from hybridmoe.train.config import Recipe
from hybridmoe.train.model import autocast, build_model
from hybridmoe.train.optim import build_optimizer, lr_at, set_lr
from hybridmoe.utils import atomic_write_text

RUNS = {
    "bf16": {"recipe": "none"},
    "nvfp4": {"recipe": "nvfp4"},
    "nvfp4 no RHT": {"recipe": "nvfp4", "rht": False},
    "nvfp4 no SR": {"recipe": "nvfp4", "stochastic_rounding": False},
    "nvfp4 no 2D weights": {"recipe": "nvfp4", "weight_2d": False},
    "nvfp4 no BF16 tail": {"recipe": "nvfp4", "bf16_tail_fraction": 0.0},
}
HERE = os.path.dirname(os.path.abspath(__file__))


def byte_streams(val_every_file: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    modules, tests = stdlib_sources()
    train, val = [], []
    for i, path in enumerate(sorted(modules + tests)):
        with open(path, "rb") as fh:
            (val if i % val_every_file == 0 else train).append(fh.read())
    as_bytes = lambda docs: torch.frombuffer(bytearray(b"\0".join(docs)), dtype=torch.uint8)  # noqa: E731
    return as_bytes(train), as_bytes(val)


def windows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()]).long()


def make_recipe(a, name: str) -> Recipe:
    return Recipe.from_dict(
        {
            "model": {"preset": a.preset, "overrides": {"vocab_size": 256}},
            "data": {"phases": [{"datasets": {"stdlib-bytes": 1.0}}], "seq_len": a.seq_len, "batch_size": a.batch},
            "optim": {"lr": a.lr, "min_lr": a.lr / 10, "warmup_steps": max(1, a.steps // 10), "decay_fraction": 0.2},
            "train": {"steps": a.steps, "precision": "autocast-bf16", "seed": a.seed},
            "precision": RUNS[name],
        }
    )


def gemm_weights(model) -> dict[str, list[torch.Tensor]]:
    """The weights of every linear (dense) and of the routed experts (experts)."""
    out = {"dense": [], "experts": []}
    for module in model.modules():
        if isinstance(module, Linear):
            out["dense"].append(module.weight)
        elif isinstance(module, Experts):
            out["experts"] += [module.up_proj, module.down_proj]
    return out


def zero_grad_share(weights) -> float:
    zeros = sum(int((w.grad == 0).sum()) for w in weights if w.grad is not None)
    return zeros / sum(w.numel() for w in weights)


@torch.no_grad()
def val_loss(model, val_batches) -> float:
    model.eval()
    losses = []
    for ids in val_batches:
        with autocast(model, "autocast-bf16"):
            losses.append(float(model(ids, labels=ids, return_logits=False).lm_loss))
    model.train()
    return sum(losses) / len(losses)


def train_one(a, name, train_stream, val_batches) -> dict:
    recipe = make_recipe(a, name)
    recipe.validate()
    torch.manual_seed(a.seed)
    model = build_model(recipe, None)  # applies (and prints) the precision policy
    opt = build_optimizer(model, recipe.optim)
    weights = gemm_weights(model)
    data_gen = torch.Generator().manual_seed(a.seed + 1)  # the same batches in every run
    torch.manual_seed(a.seed + 2 if a.sr_seed is None else a.sr_seed)  # stochastic rounding draws
    curve = [{"step": 0, "val_loss": val_loss(model, val_batches)}]
    train_losses, zero_share, zero_dense, step_s = [], [], [], []
    for step in range(a.steps):
        starts = torch.randint(0, len(train_stream) - a.seq_len, (a.batch,), generator=data_gen)
        ids = windows(train_stream, starts, a.seq_len)
        t0 = time.perf_counter()
        set_lr(opt, lr_at(step, a.steps, recipe.optim))
        with autocast(model, "autocast-bf16"):
            out = model(ids, labels=ids, return_logits=False)
        out.loss.backward()
        share = zero_grad_share(weights["dense"] + weights["experts"])
        zero_dense.append(zero_grad_share(weights["dense"]))
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        balance_experts(model, recipe.balance.bias_update_rate)
        step_s.append(time.perf_counter() - t0)
        train_losses.append(float(out.lm_loss.detach()))
        zero_share.append(share)
        if (step + 1) % a.val_every == 0 or step + 1 == a.steps:
            curve.append({"step": step + 1, "val_loss": val_loss(model, val_batches)})
            print(f"  {name:22s} step {step + 1:4d} train {train_losses[-1]:.4f} val {curve[-1]['val_loss']:.4f} "
                  f"zero-grad {share:.2%} step {statistics.median(step_s):.2f}s", flush=True)  # fmt: skip
    return {
        "precision": RUNS[name],
        "val_curve": curve,
        "train_loss": train_losses,
        "zero_grad_share": zero_share,
        "zero_grad_share_dense": zero_dense,
        "step_s_median": statistics.median(step_s[1:] or step_s),
        "final_val_loss": curve[-1]["val_loss"],
    }


def interleaved_cost(a, rounds: int = 3, steps: int = 4) -> dict:
    """Step time of BF16 against NVFP4 on one model, alternating the two every few steps (so a shared machine's
    changing load hits both alike), the part of an NVFP4 step spent in quantization calls (all the NVFP4 and MXFP8
    ones, grouped experts' included) and the RHT, and the number of quantization calls per step."""
    from hybridmoe.quant import mxfp8, nvfp4
    from hybridmoe.quant.training import PrecisionPolicy, apply_precision

    spent = {"quantize_dequantize": 0.0, "hadamard16": 0.0, "calls": 0}

    def timed(module, name, key):
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[key] += time.perf_counter() - t0
            spent["calls"] += key != "hadamard16"
            return out

        return wrapper

    patches = [(nvfp4, "fast_quantize_dequantize"), (mxfp8, "fast_quantize_dequantize"), (nvfp4, "hadamard16")]
    originals = [getattr(m, n) for m, n in patches]
    for (module, name), key in zip(patches, ["quantize_dequantize", "quantize_dequantize", "hadamard16"]):
        setattr(module, name, timed(module, name, key))
    try:
        torch.manual_seed(a.seed)
        model = build_model(make_recipe(a, "bf16"), None)
        ids = torch.randint(0, 256, (a.batch, a.seq_len))
        times = {"bf16": [], "nvfp4": []}
        for _ in range(rounds):
            for name in times:
                apply_precision(model, PrecisionPolicy(**RUNS[name]))
                for i in range(steps + 1):
                    for key in spent:
                        spent[key] = 0.0
                    t0 = time.perf_counter()
                    with autocast(model, "autocast-bf16"):
                        model(ids, labels=ids, return_logits=False).loss.backward()
                    model.zero_grad(set_to_none=True)
                    if i:  # the first step after a switch is a warm-up
                        times[name].append((time.perf_counter() - t0, dict(spent)))
    finally:
        for (module, name), fn in zip(patches, originals):
            setattr(module, name, fn)
    med = {name: statistics.median(t for t, _ in v) for name, v in times.items()}
    parts = {key: statistics.median(s[key] for _, s in times["nvfp4"]) for key in spent}
    calls = int(parts.pop("calls"))
    return {"step_s_median": med, "ratio": med["nvfp4"] / med["bf16"], "nvfp4_step_parts_s": parts,
            "quantization_calls_per_step": calls,
            "rounds": rounds, "steps_per_round": steps, "note": "forward + backward, no optimizer step"}  # fmt: skip


def last10(values) -> float:
    return sum(values[-10:]) / len(values[-10:])


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = {p["step"]: p["val_loss"] for p in results["bf16"]["val_curve"]}
    fig, (ax, az) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in results.items():
        if name == "bf16":
            continue
        steps = [p["step"] for p in run["val_curve"] if p["step"] > 0]
        gaps = [100 * (p["val_loss"] - base[p["step"]]) / base[p["step"]] for p in run["val_curve"] if p["step"] > 0]
        ax.plot(steps, gaps, marker="o", ms=3, label=name)
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(1, color="gray", lw=0.8, ls="--", label="1% target")
    ax.set(xlabel="step", ylabel="validation loss gap vs BF16 (%)", title="NVFP4 recipe ablations, tiny (emulated)")
    ax.legend(fontsize=8)
    for name, run in results.items():
        az.plot(range(1, len(run["zero_grad_share"]) + 1), [100 * s for s in run["zero_grad_share"]], label=name)
    az.set(
        xlabel="step",
        ylabel="exactly-zero weight-gradient elements (%)",
        title="zero weight gradients (linears + routed experts)",
    )
    az.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--val-every", type=int, default=10)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sr-seed", type=int, default=None, help="seed of the stochastic rounding draws alone (seed + 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared, loaded CPU)")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of: " + ", ".join(RUNS))
    p.add_argument("--out", default=os.path.join(HERE, "results", "nvfp4_ablations.json"))
    p.add_argument("--chart", default=os.path.join(HERE, "nvfp4-ablations.png"))
    p.add_argument("--cost-only", action="store_true", help="only the interleaved step-time comparison (--cost-out)")
    p.add_argument("--cost-out", default=os.path.join(HERE, "results", "nvfp4_cost.json"))
    a = p.parse_args()
    names = a.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown or "bf16" not in names:
        p.error(f"--runs: unknown {unknown}; known {list(RUNS)}, and bf16 (the baseline) is required")
    torch.set_num_threads(a.threads)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores ({a.threads} thread), torch "
    machine += torch.__version__
    if a.cost_only:
        cost = interleaved_cost(a)
        atomic_write_text(a.cost_out, json.dumps({"args": vars(a), "machine": machine, **cost}, indent=1) + "\n")
        print(json.dumps(cost, indent=1))
        return
    train_stream, val_stream = byte_streams()
    val_starts = torch.arange(a.val_batches * a.batch) * ((len(val_stream) - a.seq_len) // (a.val_batches * a.batch))
    val_batches = windows(val_stream, val_starts, a.seq_len).split(a.batch)
    print(f"{len(train_stream):,} training bytes, {len(val_stream):,} validation bytes", flush=True)
    t_start = time.time()
    results = {}
    for name in names:
        t0 = time.time()
        results[name] = train_one(a, name, train_stream, val_batches)
        results[name]["wall_s"] = time.time() - t0
    base = results["bf16"]
    summary = {}
    for name, run in results.items():
        summary[name] = {
            "final_val_loss": run["final_val_loss"],
            "gap_vs_bf16": (run["final_val_loss"] - base["final_val_loss"]) / base["final_val_loss"],
            "zero_grad_share_final": last10(run["zero_grad_share"]),
            "zero_grad_share_dense_final": last10(run["zero_grad_share_dense"]),
            "step_s_median": run["step_s_median"],
            "cost_vs_bf16": run["step_s_median"] / base["step_s_median"],
        }
        print(f"{name:22s} val {run['final_val_loss']:.4f} gap {summary[name]['gap_vs_bf16']:+.2%} zero-grad "
              f"{summary[name]['zero_grad_share_final']:.2%} (dense {summary[name]['zero_grad_share_dense_final']:.2%})"
              f" step {run['step_s_median']:.2f}s "
              f"({summary[name]['cost_vs_bf16']:.2f}x)")  # fmt: skip
    record = {
        "args": vars(a),
        "machine": machine,
        "total_wall_s": time.time() - t_start,
        "summary": summary,
        "runs": results,
    }
    atomic_write_text(a.out, json.dumps(record, indent=1) + "\n")
    plot(results, a.chart)
    print(f"wrote {a.out} and {a.chart} ({record['total_wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
