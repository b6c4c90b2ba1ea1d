"""Context parallelism (issue 18): one long `tiny` training step over cp processes against one process.

The same model (the `tiny` preset, fp32, seed 0) and the same batch (one sequence of --seq random tokens, labels the
tokens; --packed adds document ids, a new document every --seq / 5 tokens) run forward and backward once:
  - single: one process, the whole sequence;
  - cp: --cp processes (gloo, spawned), each holding two chunks of the sequence (`hybridmoe.distributed.cp`)
    and FSDP2 shards of the weights; the logged loss is the mean over ranks (what the trainer logs), the gradient
    norm the global one (`distributed.clip_grad_norm_`).
Memory, each measured in runs of their own (the profiler's bookkeeping would add to the resident size):
  - tensor peak: the peak of live tensor bytes from building the model to the end of the step, from torch.profiler's
    memory profiling (`bench_memory.TensorPeak`, the CPU's counterpart of torch.cuda.max_memory_allocated: what a
    GPU's peak memory is). Parameters and gradients count; allocator slack and the runtime do not;
  - resident peak (getrusage ru_maxrss) and "added": that peak minus the resident size just before the model is
    built (after imports and, for cp, joining the process group), so the Python/torch runtime that every process
    carries is left out. Every process runs with MALLOC_MMAP_THRESHOLD_=65536 (freed blocks of 64 KiB or more go back
    to the system at once, as bench_memory.py measures) unless --default-malloc.
The ratios compare each cp rank's peak with the single process's.

    python benchmarks/bench_context_parallel.py --seq 16384 --cp 4
Results: benchmarks/results/context_parallel.json (--out) and a line per run on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_memory import MMAP_FIXED, TensorPeak


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batch(seq: int, vocab: int, packed: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, seq), generator=g)
    docs = (torch.arange(seq) // max(seq // 5, 1))[None] if packed else None
    return ids, ids.clone(), docs


def _step(model, ids, labels, docs):
    t0 = time.perf_counter()
    out = model(ids, labels=labels, document_ids=docs, return_logits=False)
    out.loss.backward()
    return out, time.perf_counter() - t0


def _single(_, args, out_dir, measure):
    from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM

    torch.set_num_threads(args.threads)
    base = _rss_mb()
    with TensorPeak() if measure == "tensor" else contextlib.nullcontext() as peak:
        torch.manual_seed(0)
        model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("tiny")).train()
        ids, labels, docs = _batch(args.seq, model.config.vocab_size, args.packed)
        out, seconds = _step(model, ids, labels, docs)
    result = _memory(measure, peak, base)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
    result.update(loss=float(out.loss.detach()), grad_norm=grad_norm, step_s=seconds)
    with open(os.path.join(out_dir, f"single-{measure}.json"), "w") as fh:
        json.dump(result, fh)


def _memory(measure: str, peak, base: float) -> dict:
    if measure == "tensor":
        return {"tensor_peak_mb": peak.bytes / 2**20}
    rss = _rss_mb()
    return {"peak_mb": rss, "base_mb": base, "added_mb": rss - base}


def _cp_rank(rank, args, out_dir, measure):
    from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
    from hybridmoe.distributed import clip_grad_norm_, parallelize, setup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store-{measure}", rank=rank, world_size=args.cp)
    os.environ.update(WORLD_SIZE=str(args.cp), RANK=str(rank))
    try:
        par = setup(cp=args.cp, backend="gloo")
        base = _rss_mb()
        with TensorPeak() if measure == "tensor" else contextlib.nullcontext() as peak:
            torch.manual_seed(0)
            model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("tiny")).train()
            parallelize(model, par)
            ids, labels, docs = _batch(args.seq, model.config.vocab_size, args.packed)
            out, seconds = _step(model, ids, labels, docs)
        result = {"rank": rank, **_memory(measure, peak, base)}
        grad_norm = float(clip_grad_norm_([p for p in model.parameters() if p.grad is not None], float("inf"), par))
        loss = par.sum([float(out.loss.detach())])[0] / args.cp
        result.update(loss=loss, grad_norm=grad_norm, step_s=seconds)
        with open(os.path.join(out_dir, f"cp-{measure}-{rank}.json"), "w") as fh:
            json.dump(result, fh)
    finally:
        dist.destroy_process_group()


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=16384, help="tokens of the one sequence")
    parser.add_argument("--cp", type=int, default=4, help="context-parallel processes")
    parser.add_argument("--packed", action="store_true", help="packed documents (a boundary every seq / 5 tokens)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the single process")
    parser.add_argument("--measure", default="tensor,rss", help="tensor (profiler peak), rss (resident), or both")
    parser.add_argument("--default-malloc", action="store_true", help="glibc's default malloc (no mmap threshold)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "context_parallel.json"))
    parser.add_argument("--reuse-single", action="store_true",
                        help="take the single process's figures from --out's run of the same setting (a change to "
                             "distributed.cp does not change them) and measure the cp ranks only")  # fmt: skip
    args = parser.parse_args(argv)
    measures = args.measure.split(",")
    if not set(measures) <= {"tensor", "rss"}:
        parser.error(f"--measure {args.measure!r}: use tensor, rss or tensor,rss")
    if not args.default_malloc:
        os.environ.update(MMAP_FIXED)  # read by glibc when each spawned process starts
    single, ranks = {}, [{"rank": r} for r in range(args.cp)]
    with tempfile.TemporaryDirectory() as tmp:
        for measure in measures if not args.reuse_single else ():  # one at a time: never two memory-heavy runs at once
            mp.start_processes(_single, args=(args, tmp, measure), nprocs=1, start_method="spawn")
            single.update(_read_json(os.path.join(tmp, f"single-{measure}.json")))
        for measure in measures:
            mp.start_processes(_cp_rank, args=(args, tmp, measure), nprocs=args.cp, start_method="spawn")
            for r in range(args.cp):
                ranks[r].update(_read_json(os.path.join(tmp, f"cp-{measure}-{r}.json")))
    malloc = "glibc default" if args.default_malloc else "MALLOC_MMAP_THRESHOLD_=65536"
    key = lambda r: (r["seq"], r["cp"], r["packed"], r.get("malloc", "glibc default"))  # noqa: E731
    this = (args.seq, args.cp, args.packed, malloc)
    runs = _read_json(args.out)["runs"] if os.path.exists(args.out) else []
    for r in runs:  # the same setting measured before: keep what this invocation did not measure
        if key(r) == this:
            single = {**r["single"], **single}
            ranks = [{**old, **new} for old, new in zip(r["ranks"], ranks)]
    if args.reuse_single and "loss" not in single:
        parser.error(f"--reuse-single: {args.out} has no single-process run of this setting; run without it first")
    run = {
        "seq": args.seq, "cp": args.cp, "packed": args.packed, "preset": "tiny", "dtype": "fp32", "malloc": malloc,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (2-core AMD EPYC with "
                   "AVX512-BF16, shared with other agents)",
        "torch": torch.__version__, "single": single, "ranks": ranks,
        "loss_rel_diff": abs(ranks[0]["loss"] - single["loss"]) / abs(single["loss"]),
        "grad_norm_rel_diff": abs(ranks[0]["grad_norm"] - single["grad_norm"]) / abs(single["grad_norm"]),
    }  # fmt: skip
    line = (
        f"seq {args.seq} cp {args.cp}{' packed' if args.packed else ''}: loss {single['loss']:.6f} (single) vs "
        f"{ranks[0]['loss']:.6f} (cp, rel {run['loss_rel_diff']:.1e}); grad norm rel {run['grad_norm_rel_diff']:.1e}"
    )
    if "tensor_peak_mb" in single:
        worst = max(r["tensor_peak_mb"] for r in ranks)
        run["max_rank_tensor_ratio"] = worst / single["tensor_peak_mb"]
        line += f"; tensor peak {single['tensor_peak_mb']:.0f} MB vs max rank {worst:.0f} MB "
        line += f"({run['max_rank_tensor_ratio']:.1%})"
    if "added_mb" in single:
        added, peak = max(r["added_mb"] for r in ranks), max(r["peak_mb"] for r in ranks)
        run["max_rank_added_ratio"] = added / single["added_mb"]
        run["max_rank_peak_ratio"] = peak / single["peak_mb"]
        line += (
            f"; added resident peak {single['added_mb']:.0f} MB vs max rank {added:.0f} MB "
            f"({run['max_rank_added_ratio']:.1%}); resident peak {single['peak_mb']:.0f} vs {peak:.0f} MB "
            f"({run['max_rank_peak_ratio']:.1%})"
        )
    print(line)
    runs = [r for r in runs if key(r) != this] + [run]
    from hybridmoe.utils import atomic_write_text

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write_text(args.out, json.dumps({"runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
