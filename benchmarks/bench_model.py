"""hybridmoe vs Hugging Face transformers' NemotronHForCausalLM on the same weights, side by side in one run.

For each preset (tiny, small) and dtype (fp32, bf16) it measures, for hybridmoe and for transformers with each of
its `experts_implementation` choices (eager, grouped_mm, batched_mm):
  - training step tokens/s (forward + backward + AdamW, batch 2 x 1024), peak and added memory, MFU, first loss;
  - prefill tokens/s (one 1024-token prompt);
  - decode tokens/s at batch 1 and batch 8 (64-token prompts, 64 new tokens, greedy).
Every measurement runs in a fresh subprocess so that peak memory (ru_maxrss) belongs to it alone; "added" memory is
the peak minus the process's resident size just before the model is loaded (imports excluded). All subprocesses get
the same glibc malloc settings (MALLOC_ENV below).

    python benchmarks/bench_model.py                     # everything (about an hour on 2 cores)
    python benchmarks/bench_model.py --presets small --dtypes bf16 --tasks train
    python benchmarks/bench_model.py --resume            # continue an interrupted run: measure only missing rows
Results: benchmarks/results/model.json (raw, saved after every measurement) and a markdown table on stdout (copied
into benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

IMPLS = [("hybridmoe", None), ("transformers", "eager"), ("transformers", "grouped_mm"), ("transformers", "batched_mm")]


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(spec):
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    if spec["impl"] == "hybridmoe":
        from hybridmoe import HybridMoEForCausalLM

        return HybridMoEForCausalLM.from_pretrained(spec["ckpt"], dtype=dtype)
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        spec["ckpt"], dtype=dtype, experts_implementation=spec["experts"]
    )


def worker(spec: dict) -> dict:
    import torch

    torch.manual_seed(0)
    if spec["impl"] == "transformers":
        import transformers  # noqa: F401  (import before the baseline so its memory is not counted)
    else:
        import hybridmoe  # noqa: F401
    base = rss_mb()
    model = load(spec)
    vocab = model.config.vocab_size
    out = {"baseline_mb": base}
    ours = spec["impl"] == "hybridmoe"
    if spec["task"] == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, vocab, (2, 1024), generator=g) for _ in range(spec["steps"] + 1)]
        times, losses = [], []
        for ids in batches:
            t0 = time.perf_counter()
            if ours:
                res = model(ids, labels=ids, return_logits=False)
                loss, report = res.loss, res.lm_loss
            else:
                res = model(input_ids=ids, labels=ids)
                loss = report = res.loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            losses.append(float(report))
        steady = sorted(times[1:])[len(times[1:]) // 2]  # median after one warm-up step
        out.update(tokens_per_s=2 * 1024 / steady, step_s=steady, losses=losses)
    elif spec["task"] == "prefill":
        model.eval()
        ids = torch.randint(0, vocab, (1, 1024), generator=torch.Generator().manual_seed(2))
        times = []
        with torch.no_grad():
            for _ in range(3):
                t0 = time.perf_counter()
                if ours:
                    model(ids, cache=model.new_cache(1, 1024), logits_to_keep=1)
                else:
                    model(input_ids=ids, use_cache=True, logits_to_keep=1)
                times.append(time.perf_counter() - t0)
        out.update(tokens_per_s=1024 / min(times[1:]))
    else:  # decode
        model.eval()
        b, new = spec["batch"], 64
        ids = torch.randint(0, vocab, (b, 64), generator=torch.Generator().manual_seed(3))

        def gen(n):
            t0 = time.perf_counter()
            with torch.no_grad():
                if ours:
                    res = model.generate(ids, max_new_tokens=n)
                else:
                    res = model.generate(
                        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
                    )
            assert res.shape[1] == 64 + n, res.shape
            return time.perf_counter() - t0, res

        gen(2)
        t1 = min(gen(1)[0] for _ in range(2))
        tn, res = gen(new)
        out.update(tokens_per_s=b * (new - 1) / (tn - t1), first_tokens=res[0, 64:80].tolist())
    out.update(peak_mb=peak_rss_mb(), added_mb=peak_rss_mb() - base)
    return out


# Every worker, transformers' and ours alike, runs with glibc malloc keeping freed blocks for reuse: by default
# each large temporary tensor is a fresh mmap whose page faults cost 10-20% of a training step on this machine.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36)}


def run_worker(spec: dict, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ | MALLOC_ENV)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout}s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        killed = " (killed by the kernel: out of memory?)" if proc.returncode == -9 else ""
        return {"error": f"exit code {proc.returncode}{killed}: " + " | ".join(tail)[-300:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--tasks", default="train,prefill,decode1,decode8")
    parser.add_argument("--impls", default=",".join(i if e is None else f"{i}:{e}" for i, e in IMPLS))
    parser.add_argument("--steps", type=int, default=3, help="measured training steps (after one warm-up step)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per measurement")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "model.json"))
    parser.add_argument(
        "--resume", action="store_true", help="keep the rows already in --out and measure only the missing ones"
    )
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = parser.parse_args()
    if args.table:
        with open(args.out) as fh:
            print(markdown(json.load(fh)["results"]))
        return
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
    from hybridmoe.accounting import flops_per_token, measure_matmul_peak

    peak = measure_matmul_peak()
    best_peak = max(peak.values())
    machine = (
        f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"# machine: {machine}; matmul peak GFLOP/s: {json.dumps({k: round(v, 1) for k, v in peak.items()})}")
    impls = [(s.split(":")[0], s.split(":")[1] if ":" in s else None) for s in args.impls.split(",")]
    results, runs = [], []
    if args.resume and os.path.exists(args.out):
        with open(args.out) as fh:
            previous = json.load(fh)
        results, runs = previous["results"], previous.get("runs", [])
    runs.append({"machine": machine, "matmul_peak_gflops": peak, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    done = {(r["preset"], r["dtype"], r["task"], r["impl"], r["experts"]) for r in results}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            config = HybridMoEConfig.from_preset(preset)
            torch.manual_seed(0)
            ckpt = os.path.join(tmp, preset)
            HybridMoEForCausalLM(config).save_pretrained(ckpt)
            fpt = flops_per_token(config, 1024, training=True)
            for dtype in args.dtypes.split(","):
                for task in args.tasks.split(","):
                    for impl, experts in impls:
                        if (preset, dtype, task, impl, experts) in done:
                            continue
                        spec = dict(impl=impl, experts=experts, ckpt=ckpt, dtype=dtype, steps=args.steps)
                        spec.update(task="decode" if task.startswith("decode") else task)
                        if task.startswith("decode"):
                            spec["batch"] = int(task.removeprefix("decode"))
                        t0 = time.time()
                        res = run_worker(spec, args.timeout)
                        row = dict(preset=preset, dtype=dtype, task=task, impl=impl, experts=experts, **res)
                        row["wall_s"] = round(time.time() - t0, 1)
                        if task == "train" and "tokens_per_s" in res:
                            row["mfu"] = res["tokens_per_s"] * fpt / (best_peak * 1e9)
                        row["run"] = len(runs) - 1
                        results.append(row)
                        print(json.dumps(row), flush=True)
                        save(args.out, {"runs": runs, "results": results})
    print(markdown(results))


def save(path: str, data: dict) -> None:
    """Written after every measurement, atomically, so an interrupted run keeps what it measured (see --resume)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


def markdown(results: list[dict]) -> str:
    lines = [
        "| preset | dtype | task | implementation | tokens/s | vs best transformers | peak MB | added MB | MFU |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["preset"], r["dtype"], r["task"]), []).append(r)
    for (preset, dtype, task), rows in groups.items():
        hf = [r.get("tokens_per_s", 0) for r in rows if r["impl"] == "transformers" and "tokens_per_s" in r]
        best = max(hf) if hf else None
        for r in rows:
            name = r["impl"] + (f" ({r['experts']})" if r["experts"] else "")
            if "error" in r:
                lines.append(f"| {preset} | {dtype} | {task} | {name} | failed: {r['error'][:80]} | | | | |")
                continue
            ratio = f"{r['tokens_per_s'] / best:.2f}x" if best else "-"
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
            lines.append(
                f"| {preset} | {dtype} | {task} | {name} | {r['tokens_per_s']:.1f} | {ratio} | "
                f"{r['peak_mb']:.0f} | {r['added_mb']:.0f} | {mfu} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
