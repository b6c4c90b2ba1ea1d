"""The memory planner against the measured per-rank peak of parallel layouts (issue 18).

For each layout, gloo processes (spawned, as tests/distributed/ spawns them) build the same model (--preset, fp32,
seed 0), `hybridmoe.distributed.parallelize` it and run --steps training steps as the trainer does
(`train.session.train_step`: forward and backward, or the 1F1B schedule under pipeline parallelism; the partial
gradients of tensor parallelism reduced, clipping, foreach AdamW, gradients set to None) on random tokens: every
data-parallel rank --micro-batch sequences of --seq tokens per micro-batch (--microbatches of them under pp).
Each rank records its tensor peak, the peak of live tensor bytes from building the model to the end of the last
step (`bench_memory.TensorPeak`, torch.profiler's memory profiling: the CPU's counterpart of
torch.cuda.max_memory_allocated), next to `hybridmoe.plan` for the same layout, micro-batch, sequence and precision
(fp32; the planner gives the ranks of the fullest pipeline stage). The "1" layout is one process without
torchrun (fused AdamW, as the trainer runs it there).

    python benchmarks/bench_parallel_memory.py                      # the default layouts
    python benchmarks/bench_parallel_memory.py --layouts pp2xtp2,pp2xcp2   # pp composed with tp / cp
    python benchmarks/bench_parallel_memory.py --table              # the table of the saved results
    python benchmarks/bench_parallel_memory.py --replan             # the saved measurements, the current planner
Results: benchmarks/results/parallel_memory.json (--out) and a markdown table on stdout. A layout that
`parallelize` refuses is recorded with its error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_memory import TensorPeak

# name -> degrees (dp, tp, cp, pp, ep); dp fills what the others leave of the processes
LAYOUTS = {
    "1": {},
    "dp2": {"dp": 2},
    "tp2": {"tp": 2},
    "cp2": {"cp": 2},
    "ep2": {"dp": 2, "ep": 2},
    "pp2": {"pp": 2},
    "tp2xdp2": {"tp": 2, "dp": 2},
    "cp2xtp2": {"cp": 2, "tp": 2},
    "pp2xtp2": {"pp": 2, "tp": 2},
    "pp2xcp2": {"pp": 2, "cp": 2},
}
DEFAULT = "1,dp2,tp2,cp2,ep2,pp2,tp2xdp2,cp2xtp2"
MB = 2**-20


def degrees(name: str) -> dict[str, int]:
    d = {"dp": 1, "tp": 1, "cp": 1, "pp": 1, "ep": 1, **LAYOUTS[name]}
    d["world"] = d["dp"] * d["tp"] * d["cp"] * d["pp"]
    return d


def _batch(args, rows: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, args.seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "document_ids": None}


def _train(args, model, par, d) -> tuple[float, float]:
    """--steps training steps as `train.session.train_step` runs them; (the last loss, peak bytes)."""
    from hybridmoe import distributed
    from hybridmoe.train.config import OptimSection
    from hybridmoe.train.optim import build_optimizer

    microbatches = args.microbatches if d["pp"] > 1 else 1
    rows = d["dp"] * args.micro_batch * microbatches
    with TensorPeak() as peak:
        torch.manual_seed(0)
        model = model()
        if par is not None:
            model = distributed.parallelize(model, par)
        opt = build_optimizer(model, OptimSection(), fused=par is None)
        batch = _batch(args, rows, model.config.vocab_size)
        local = par.local_rows(batch) if par is not None else batch
        for _ in range(args.steps):
            if d["pp"] > 1:
                from hybridmoe.distributed.pp import forward_backward

                loss = forward_backward(model, [local], "fp32", par, microbatches)["loss"]
            else:
                out = model(local["input_ids"], labels=local["labels"], return_logits=False)
                out.loss.backward()
                loss = float(out.loss.detach())
            distributed.reduce_partial_grads(model, par)
            distributed.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0, par)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return loss, peak.bytes


def _rank(rank, args, name, out_dir):
    from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
    from hybridmoe.distributed import setup

    d = degrees(name)
    result = {"rank": rank}
    model = lambda: HybridMoEForCausalLM(HybridMoEConfig.from_preset(args.preset)).train()  # noqa: E731
    try:
        if d["world"] == 1:
            torch.set_num_threads(2)
            loss, peak = _train(args, model, None, d)
        else:
            torch.set_num_threads(1)
            dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=d["world"])
            os.environ.update(WORLD_SIZE=str(d["world"]), RANK=str(rank))
            try:
                par = setup(ep=d["ep"], tp=d["tp"], cp=d["cp"], pp=d["pp"], backend="gloo")
                result["stage"] = par.pp_rank
                loss, peak = _train(args, model, par, d)
                loss = par.sum([loss])[0] / d["world"]
            finally:
                dist.destroy_process_group()
        result.update(loss=loss, tensor_peak_mb=peak * MB)
    except ValueError as e:  # a layout parallelize refuses (pp with tp or cp before they are merged)
        result["error"] = f"{type(e).__name__}: {e}"
    except Exception:
        result["error"] = traceback.format_exc().strip().splitlines()[-1]
        raise
    finally:
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as fh:
            json.dump(result, fh)


def planned(args, name: str):
    from hybridmoe import HybridMoEConfig
    from hybridmoe.plan import Layout, plan

    d = degrees(name)
    layout = Layout(dp=d["dp"], tp=d["tp"], pp=d["pp"], cp=d["cp"], ep=d["ep"], micro_batch=args.micro_batch)
    rows = d["dp"] * args.micro_batch * (args.microbatches if d["pp"] > 1 else 1)  # the step's sequences (`_train`)
    return plan(HybridMoEConfig.from_preset(args.preset), layout, args.seq, global_batch=rows, precision="fp32")


def run_layout(args, name: str) -> dict:
    d = degrees(name)
    row = {"layout": name, **{k: d[k] for k in ("dp", "tp", "cp", "pp", "ep", "world")}}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.start_processes(_rank, args=(args, name, tmp), nprocs=d["world"], start_method="spawn")
        except mp.ProcessRaisedException as e:
            row["error"] = str(e).strip().splitlines()[-1][-300:]
        ranks = []
        for r in range(d["world"]):
            path = os.path.join(tmp, f"{r}.json")
            if os.path.exists(path):
                with open(path) as fh:
                    ranks.append(json.load(fh))
    errors = [r["error"] for r in ranks if "error" in r]
    if errors or "error" in row:
        row["error"] = errors[0] if errors else row["error"]
        return row
    row.update(ranks=ranks, loss=ranks[0]["loss"], measured_mb=max(r["tensor_peak_mb"] for r in ranks))
    return add_plan(args, row)


def add_plan(args, row: dict) -> dict:
    """The planner's prediction for the row's layout beside its measurement."""
    p = planned(args, row["layout"])
    parts = ("params", "grads", "optimizer", "fsdp_buffers", "activations", "moe_dispatch", "transient")
    row.update(planned_mb=p.total * MB, planned_stage=p.stage, plan={k: getattr(p, k) * MB for k in parts})
    row["planned_vs_measured"] = row["planned_mb"] / row["measured_mb"] - 1
    return row


def table(result: dict) -> str:
    a = result["args"]
    lines = [
        f"`{a['preset']}`, fp32, micro-batch {a['micro_batch']} x {a['seq']} tokens per data-parallel rank "
        f"({a['microbatches']} micro-batches under pp), {a['steps']} steps; MB",
        "",
        "| layout | processes | loss | measured peak, max rank (per rank) | planned (stage) | planned vs measured |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['layout']} | {r['world']} | refused: {r['error'][:160]} | | | |")
            continue
        per = ", ".join(f"{x['tensor_peak_mb']:.0f}" for x in r["ranks"])
        stage = f" ({r['planned_stage']})" if r["pp"] > 1 else ""
        lines.append(
            f"| {r['layout']} | {r['world']} | {r['loss']:.6f} | {r['measured_mb']:.0f} ({per}) | "
            f"{r['planned_mb']:.0f}{stage} | {r['planned_vs_measured']:+.1%} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default=DEFAULT, help=f"comma-separated, of: {', '.join(LAYOUTS)}")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per data-parallel rank per micro-batch")
    parser.add_argument("--microbatches", type=int, default=2, help="micro-batches per step under pp")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="print the table of --out and exit")
    parser.add_argument("--replan", action="store_true", help="recompute the plans of --out's rows, print the table")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "parallel_memory.json"))
    args = parser.parse_args(argv)
    if args.table or args.replan:
        with open(args.out) as fh:
            result = json.load(fh)
        if args.replan:  # the saved measurements against the current planner
            setting = argparse.Namespace(**result["args"])
            result["rows"] = [add_plan(setting, r) if "error" not in r else r for r in result["rows"]]
            from hybridmoe.utils import atomic_write_text

            atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
        print(table(result))
        return 0
    names = args.layouts.split(",")
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layouts {unknown}: use some of {', '.join(LAYOUTS)}")
    from hybridmoe.utils import atomic_write_text

    setting = {k: getattr(args, k) for k in ("preset", "seq", "micro_batch", "microbatches", "steps")}
    result = {"rows": []}
    if os.path.exists(args.out):
        with open(args.out) as fh:
            result = json.load(fh)
        if result.get("args") != setting:  # another setting: start over
            result = {"rows": []}
    result["args"] = setting
    result["machine"] = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (2-core AMD EPYC with AVX512-BF16, "
        "shared with other agents)"
    )
    result["torch"] = torch.__version__
    for name in names:  # one layout at a time: never two memory-heavy runs at once
        row = run_layout(args, name)
        result["rows"] = [r for r in result["rows"] if r["layout"] != name] + [row]
        result["rows"].sort(key=lambda r: list(LAYOUTS).index(r["layout"]))
        print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
