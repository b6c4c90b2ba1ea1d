"""Context parallelism (issue 18): one long `tiny` training step over cp processes against one process.

The same model (the `tiny` preset, fp32, seed 0) and the same batch (one sequence of --seq random tokens, labels the
tokens; --packed adds document ids, a new document every --seq / 5 tokens) run forward and backward once:
  - single: one process, the whole sequence;
  - cp: --cp processes (gloo, spawned), each holding one contiguous shard of the sequence (`hybridmoe.distributed.cp`)
    and FSDP2 shards of the weights; the logged loss is the mean over ranks (what the trainer logs), the gradient
    norm the global one (`distributed.clip_grad_norm_`).
Memory: each process's peak resident size (getrusage ru_maxrss) and "added": that peak minus the resident size just
before the model is built (after imports and, for cp, joining the process group), so the Python/torch runtime that
every process carries is left out. The ratio compares each cp rank's added peak with the single process's.

    python benchmarks/bench_context_parallel.py --seq 16384 --cp 4
Results: benchmarks/results/context_parallel.json (--out) and a line per run on stdout.
"""

from __future__ import annotations

import argparse
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


def _single(_, args, out_dir):
    from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM

    torch.set_num_threads(args.threads)
    base = _rss_mb()
    torch.manual_seed(0)
    model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("tiny")).train()
    ids, labels, docs = _batch(args.seq, model.config.vocab_size, args.packed)
    out, seconds = _step(model, ids, labels, docs)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
    peak = _rss_mb()
    result = {"loss": float(out.loss.detach()), "grad_norm": grad_norm, "step_s": seconds, "peak_mb": peak,
              "base_mb": base, "added_mb": peak - base}  # fmt: skip
    with open(os.path.join(out_dir, "single.json"), "w") as fh:
        json.dump(result, fh)


def _cp_rank(rank, args, out_dir):
    from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
    from hybridmoe.distributed import clip_grad_norm_, parallelize, setup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=args.cp)
    os.environ.update(WORLD_SIZE=str(args.cp), RANK=str(rank))
    try:
        par = setup(cp=args.cp, backend="gloo")
        base = _rss_mb()
        torch.manual_seed(0)
        model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("tiny")).train()
        parallelize(model, par)
        ids, labels, docs = _batch(args.seq, model.config.vocab_size, args.packed)
        out, seconds = _step(model, ids, labels, docs)
        grad_norm = float(clip_grad_norm_([p for p in model.parameters() if p.grad is not None], float("inf"), par))
        peak = _rss_mb()
        loss = par.sum([float(out.loss.detach())])[0] / args.cp
        result = {"rank": rank, "loss": loss, "grad_norm": grad_norm, "step_s": seconds, "peak_mb": peak,
                  "base_mb": base, "added_mb": peak - base}  # fmt: skip
        with open(os.path.join(out_dir, f"cp-{rank}.json"), "w") as fh:
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
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "context_parallel.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_single, args=(args, tmp), nprocs=1, start_method="spawn")
        single = _read_json(os.path.join(tmp, "single.json"))
        mp.start_processes(_cp_rank, args=(args, tmp), nprocs=args.cp, start_method="spawn")
        ranks = [_read_json(os.path.join(tmp, f"cp-{r}.json")) for r in range(args.cp)]
    run = {
        "seq": args.seq, "cp": args.cp, "packed": args.packed, "preset": "tiny", "dtype": "fp32",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (2-core AMD EPYC with "
                   "AVX512-BF16, shared with other agents)",
        "torch": torch.__version__, "single": single, "ranks": ranks,
        "loss_rel_diff": abs(ranks[0]["loss"] - single["loss"]) / abs(single["loss"]),
        "grad_norm_rel_diff": abs(ranks[0]["grad_norm"] - single["grad_norm"]) / abs(single["grad_norm"]),
        "max_rank_added_ratio": max(r["added_mb"] for r in ranks) / single["added_mb"],
        "max_rank_peak_ratio": max(r["peak_mb"] for r in ranks) / single["peak_mb"],
    }  # fmt: skip
    print(
        f"seq {args.seq} cp {args.cp}{' packed' if args.packed else ''}: loss {single['loss']:.6f} (single) vs "
        f"{ranks[0]['loss']:.6f} (cp, rel {run['loss_rel_diff']:.1e}); grad norm rel {run['grad_norm_rel_diff']:.1e}; "
        f"added peak {single['added_mb']:.0f} MB vs max rank {max(r['added_mb'] for r in ranks):.0f} MB "
        f"({run['max_rank_added_ratio']:.0%}); resident peak {single['peak_mb']:.0f} vs "
        f"{max(r['peak_mb'] for r in ranks):.0f} MB ({run['max_rank_peak_ratio']:.0%}); step "
        f"{single['step_s']:.1f} s vs {max(r['step_s'] for r in ranks):.1f} s"
    )
    runs = []
    if os.path.exists(args.out):
        runs = [r for r in _read_json(args.out)["runs"] if (r["seq"], r["cp"], r["packed"]) !=
                (args.seq, args.cp, args.packed)]  # fmt: skip
    runs.append(run)
    from hybridmoe.utils import atomic_write_text

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write_text(args.out, json.dumps({"runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
