"""Every parallel dimension alone and composed (issue 18's first target): 10 fp32 training steps of `debug` (MTP with
two depths, the balancing loss, packed documents) under each layout against the same steps in one process, on gloo.

The workers are the test suite's (tests/distributed: `_cp_worker` for layouts without pipeline stages, `_pp_worker`
with them), run here for 10 steps instead of the tests' 3. Reported per layout: the largest relative difference of
the logged loss from the single-process loss over the steps, and the largest relative gradient error (per parameter,
max |g - g_ref| / max |g_ref|, the worst parameter and step). `_cp_worker` compares the gradients at the same weights
(a single-process probe loaded with the sharded model's weights), `_pp_worker` along the two trajectories; both
also check the MoE expert-balance bookkeeping or the final weights (see the tests).

    python benchmarks/bench_parallel_layouts.py [--steps 10] [--only NAME ...]
Results: benchmarks/results/parallel_layouts.json and one line per layout on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(HERE, "..", "tests")
sys.path[:0] = [os.path.join(TESTS, "distributed"), TESTS, os.path.join(TESTS, "train")]

# name: (processes, pp, tp, cp, ep)
LAYOUTS = {
    "tp2": (2, 1, 2, 1, 1),
    "cp2": (2, 1, 1, 2, 1),
    "pp2": (2, 2, 1, 1, 1),
    "dp2xtp2": (4, 1, 2, 1, 1),
    "dp2xtp2xep4": (4, 1, 2, 1, 4),
    "cp2xtp2xep2": (4, 1, 2, 2, 2),
    "dp2xpp2": (4, 2, 1, 1, 1),
    "pp2xtp2": (4, 2, 2, 1, 1),
    "pp2xcp2": (4, 2, 1, 2, 1),
    "pp2xtp2xcp2xep2": (8, 2, 2, 2, 2),
}


def run(name: str, steps: int) -> dict:
    from test_context_parallel import _cp_worker
    from test_pipeline_parallel import _pp_worker

    world, pp, tp, cp, ep = LAYOUTS[name]
    with tempfile.TemporaryDirectory() as d:
        start = time.time()
        if pp > 1:
            args = (world, os.path.join(d, "store"), d, pp, steps, 2, tp, cp, ep)
            mp.start_processes(_pp_worker, args=args, nprocs=world, start_method="spawn")
            with open(os.path.join(d, "pp.json")) as fh:
                r = json.load(fh)
        else:
            args = (world, os.path.join(d, "store"), d, cp, steps, True, tp, ep)
            mp.start_processes(_cp_worker, args=args, nprocs=world, start_method="spawn")
            with open(os.path.join(d, "cp.json")) as fh:
                r = json.load(fh)
        seconds = time.time() - start
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], r["ref"]))
    return {
        "layout": name, "processes": world, "pp": pp, "tp": tp, "cp": cp, "ep": ep, "steps": steps,
        "losses": r["losses"], "ref_losses": r["ref"], "max_loss_rel_diff": loss_rel,
        "max_grad_error": max(r["grad_errors"]), "weight_error": r.get("weight_error"), "seconds": round(seconds, 1),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--only", nargs="*", choices=sorted(LAYOUTS), help="run only these layouts")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "parallel_layouts.json"))
    args = ap.parse_args()
    rows = []
    for name in args.only or LAYOUTS:
        row = run(name, args.steps)
        rows.append(row)
        print(f"{name:>18}: {row['processes']} processes, loss rel. diff {row['max_loss_rel_diff']:.1e}, "
              f"grad error {row['max_grad_error']:.1e} ({row['seconds']} s)", flush=True)  # fmt: skip
    out = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "layouts": rows}
    from hybridmoe.utils import atomic_write_text

    atomic_write_text(args.out, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
