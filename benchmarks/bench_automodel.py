"""Fine-tuning Hugging Face MoE models: plain transformers (each `experts_implementation`) vs `hybridmoe.automodel`,
side by side in one run, on the same random weights and the same batches (issue 6).

Two shapes, random init, bf16 weights and compute (--dtype fp32 for fp32), AdamW (lr 1e-4), batch 2 x 512:
  - qwen3_moe: 4 layers, hidden 512, 8 heads of 64 (4 KV), 128 experts of width 128, top-8, vocab 8192;
  - nemotron_h: the same width and experts as a hybrid, Mamba-2 / MoE / attention / MoE / Mamba-2 / MoE (6 layers),
    no latent projection.
Each (shape, implementation) runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own; "added"
is the peak minus the resident size just before the model is built. Tokens/s is the median over the timed steps
(after `--warmup` untimed ones); the losses of every step are recorded so the curves can be compared.
`--tensor-peak` also measures one more step's peak of live tensor bytes. `--lora` trains rank-8 adapters instead:
hybridmoe's `load_lora` against PEFT's `PeftModel.from_pretrained` on the transformers model, both from one adapter
file written first (the same layers, A random, B zero), so the losses compare as in full fine-tuning.
`--nproc N` runs each implementation as N torchrun processes (gloo) that load one checkpoint of the same random
weights, with FSDP2 and expert parallelism over all N: hybridmoe's `parallelize`, and for transformers its own
`DistributedConfig(fsdp_size=N, ep_size=N, ep_implementation="all_to_all")`; each process trains on its rows of
the `--batch`, and the memory figures are the largest process's.

    python benchmarks/bench_automodel.py                 # hybridmoe, eager, grouped_mm: about 20 minutes on 2 cores
    python benchmarks/bench_automodel.py --impls hybridmoe,grouped_mm --lora --tensor-peak
    python benchmarks/bench_automodel.py --impls hybridmoe,grouped_mm --nproc 2 --batch 4 --tensor-peak
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


# The same layers on both sides, named: PEFT's "all-linear" would also adapt the routers (hybridmoe's does not), and
# PEFT refuses LoRA on a Mamba mixer's out_proj, so nemotron_h adapts every other linear layer.
LINEAR_TARGETS = {
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "nemotron_h": ["in_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
}


DTYPES = {"bf16": "bfloat16", "fp32": "float32"}  # torch dtype names (torch is imported in the workers only)


def make_lora_init(shape: str, directory: str) -> None:
    """Write the starting adapters of a LoRA run once, in PEFT's format: rank 8, alpha 16, on LINEAR_TARGETS and both
    expert weights, A random (seed 2), B zero. Both sides load the same file, so their losses can be compared."""
    import torch

    from hybridmoe.automodel import AutoModelForCausalLM, apply_lora, save_lora

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(make_config(shape), dtype=torch.bfloat16)
    save_lora(apply_lora(model, r=8, alpha=16, target_modules=LINEAR_TARGETS[shape], experts=True), directory)


def add_lora(model, impl: str, directory: str):
    """The adapters of `directory` (make_lora_init), trainable, the base weights frozen: hybridmoe's LoRA (grouped
    over the experts), or PEFT's (target_parameters for the expert weights) on the transformers model."""
    if impl == "hybridmoe":
        from hybridmoe.automodel import load_lora

        return load_lora(model, directory)
    import peft

    return peft.PeftModel.from_pretrained(model, directory, is_trainable=True)


def tensor_peak_mb(step, model, opt) -> float:
    """The peak of live tensor bytes over one call of `step`, which must start and end with no gradients: the bytes
    alive before it (this rank's parameters, buffers and optimizer state) plus the highest running sum of the
    allocations and frees torch.profiler records during it. (torch.profiler's memory timeline gives the same peak
    within 0.1 MB in one process, but its data-flow checks reject the all-to-all of expert parallelism.)"""
    import torch
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    storages = {}
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    for t in [*model.parameters(), *model.buffers(), *state]:
        t = getattr(t, "_local_tensor", t)  # a DTensor's shard on this rank
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        step()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = sorted(
        (e.start_time_ns, e.extra_fields.alloc_size)
        for e in walk(p.profiler.kineto_results.experimental_event_tree())
        if e.tag == _EventType.Allocation
    )
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return (sum(storages.values()) + peak) / 2**20


def worker(shape: str, impl: str, args: argparse.Namespace) -> dict | None:
    """One (shape, implementation) run. Under torchrun (--nproc) the model loads from `--checkpoint`, spread over all
    ranks with FSDP2 and expert parallelism: hybridmoe's `parallelize`, or transformers' own DistributedConfig; each
    rank trains on its rows of the global batch; the peaks are the largest rank's, the loss the ranks' average.
    Returns the row on rank 0, None on the others."""
    import torch
    import transformers

    batch, checkpoint = args.batch, args.checkpoint
    transformers.logging.set_verbosity_error()
    torch_dtype = getattr(torch, DTYPES[args.dtype])
    par = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from hybridmoe import distributed

        world = int(os.environ["WORLD_SIZE"])
        if batch % world:
            raise ValueError(f"--batch {batch} must split evenly over the {world} processes of --nproc")
        par = distributed.setup(ep=world if impl == "hybridmoe" else 1, backend="gloo")
    torch.manual_seed(0)
    config = make_config(shape)
    base = rss_mb()
    if impl == "hybridmoe":
        from hybridmoe.automodel import AutoModelForCausalLM

        if par is None:
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype)
    elif par is None:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype, experts_implementation=impl)
    else:  # transformers' FSDP2 + expert parallelism (all-to-all token exchange), the same layout as hybridmoe's
        from transformers.distributed import DistributedConfig

        layout = DistributedConfig(fsdp_size=par.world_size, ep_size=par.world_size, ep_implementation="all_to_all")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=torch_dtype, experts_implementation=impl, distributed_config=layout
        )
    if args.lora_init:
        model = add_lora(model, impl, args.lora_init)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if par is not None and impl == "hybridmoe":
        from hybridmoe.automodel.parallel import parallelize

        parallelize(model, par)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=par is None)
    g = torch.Generator().manual_seed(1)
    losses, times = [], []

    def step(ids):
        if par is not None:
            rows = batch // par.world_size
            ids = ids[par.rank * rows : (par.rank + 1) * rows]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        losses.append(par.sum([value])[0] / par.world_size if par is not None else value)

    for i in range(args.warmup + args.steps):
        ids = torch.randint(0, config.vocab_size, (batch, args.seq), generator=g)
        t0 = time.perf_counter()
        step(ids)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    mine = {"peak_mb": peak_rss_mb(), "added_mb": peak_rss_mb() - base}
    if args.tensor_peak:  # one more step, after the timed ones and the resident-size reading
        ids = torch.randint(0, config.vocab_size, (batch, args.seq), generator=g)
        mine["tensor_peak_mb"] = tensor_peak_mb(lambda: step(ids), model, opt)
    ranks = [mine]
    if par is not None:
        ranks = par_gather(mine, par)
        times = [max(ts) for ts in zip(*par_gather(times, par))]  # a step ends when its slowest rank does
        if par.rank != 0:
            return None
    out = {"params": params, "trainable": trainable, "tokens_per_s": batch * args.seq / statistics.median(times)}
    out |= {key: max(r[key] for r in ranks) for key in mine}  # the largest rank's peaks
    if par is not None:
        out |= {"nproc": par.world_size, "ep": par.world_size, "ranks": ranks}  # both sides: EP over all ranks
    return out | {"losses": losses}


def par_gather(values: list, par) -> list[list]:
    import torch.distributed as dist

    out = [None] * par.world_size
    dist.all_gather_object(out, values)
    return out


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
    parser.add_argument("--nproc", type=int, default=1, help="processes (torchrun, gloo): FSDP2 + EP on both sides")
    parser.add_argument("--tensor-peak", action="store_true", help="also profile one more step's live tensor peak")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "automodel.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--lora-init", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        shape, impl = args.worker.split(":")
        row = worker(shape, impl, args)
        if row is not None:
            print(json.dumps(row))
        return
    if args.nproc < 1 or args.batch % args.nproc:
        parser.error(f"--batch {args.batch} must be a positive multiple of --nproc {args.nproc}")
    import tempfile

    import torch
    import transformers

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "command": " ".join(["python", "benchmarks/bench_automodel.py", *sys.argv[1:]]),
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup, "lora": args.lora,
        "dtype": args.dtype, "nproc": args.nproc,
        "rows": [],
    }  # fmt: skip
    launch = [sys.executable]
    if args.nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
    tmp = tempfile.TemporaryDirectory(prefix="bench_automodel_")
    for shape in args.shapes.split(","):
        lora_init = os.path.join(tmp.name, f"lora-{shape}")
        if args.lora:
            make_lora_init(shape, lora_init)
        checkpoint = os.path.join(tmp.name, f"model-{shape}")
        if args.nproc > 1:  # the processes load one checkpoint: the random weights the single-process runs build
            torch.manual_seed(0)
            transformers.AutoModelForCausalLM.from_config(
                make_config(shape), dtype=getattr(torch, DTYPES[args.dtype])
            ).save_pretrained(checkpoint)
        for impl in args.impls.split(","):
            cmd = [*launch, __file__, "--worker", f"{shape}:{impl}", "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq),
                   "--dtype", args.dtype, *(["--lora-init", lora_init] if args.lora else []),
                   *(["--checkpoint", checkpoint] if args.nproc > 1 else []),
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
        mode += f", {results['nproc']} processes" if results.get("nproc", 1) > 1 else ""
        ax.set_title(f"{shape}, {results.get('dtype', 'bf16')}, batch {results['batch']} x {results['seq']}{mode}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
