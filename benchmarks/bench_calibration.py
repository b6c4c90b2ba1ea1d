"""How far the speedrun's timing calibration lands from the steps it plans for. The speedrun times a pretraining step
and an SFT step of the default model on random tokens before it plans step counts (`speedrun._calibrate`); SFT
later scales pretraining's measured step by the ratio of the two. This repeats both calibrations `--rounds` times,
timing 1 step (the speedrun's calibration) and the median of 3 side by side, then times `--steps`
consecutive steps of each shape, and reports each calibration's error against those and the SFT / pretraining ratio.

    python benchmarks/bench_calibration.py --rounds 5 --steps 20
Results: benchmarks/results/calibration.json (--out) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from hybridmoe import speedrun as sr  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="calibrations of each kind")
    p.add_argument("--steps", type=int, default=20, help="consecutive steps timed for the reference")
    p.add_argument("--preset", default=sr.Plan.preset, help="the model (default: the speedrun's)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "calibration.json"))
    args = p.parse_args()
    if args.rounds < 1 or args.steps < 2:
        p.error("--rounds must be >= 1 and --steps >= 2")

    plan = sr.Plan(preset=args.preset)
    recipe = sr._recipe(plan, None, {"modules": "m", "tests": "t"}, "unused", steps=1)
    shapes = {
        "pretrain": {},
        "sft": {"doc_len": sr.SFT_DOC_LEN, "loss_share": sr.SFT_LOSS_SHARE},
    }
    # the reference: the median of many consecutive steps (calibrate's own loop, its 1.15 allowance removed)
    reference = {k: sr._calibrate(recipe, plan.batch_size, plan.seq_len, timed=args.steps, **kw) / 1.15
                 for k, kw in shapes.items()}  # fmt: skip
    rows = []
    for timed in (1, 3):
        for r in range(args.rounds):
            got = {k: sr._calibrate(recipe, plan.batch_size, plan.seq_len, timed=timed, **kw) / 1.15
                   for k, kw in shapes.items()}  # fmt: skip
            rows.append({"timed": timed, "round": r, **got, "ratio": got["sft"] / got["pretrain"]})
            print(f"timed {timed}, round {r}: pretrain {got['pretrain']:.3f} s, sft {got['sft']:.3f} s, "
                  f"ratio {rows[-1]['ratio']:.3f}", flush=True)  # fmt: skip

    ref_ratio = reference["sft"] / reference["pretrain"]
    print(f"\nreference ({args.steps} steps each): pretrain {reference['pretrain']:.3f} s, "
          f"sft {reference['sft']:.3f} s, ratio {ref_ratio:.3f}\n")  # fmt: skip
    print("| steps timed | pretrain, worst error | sft, worst error | ratio, min-max | ratio, worst error |")
    print("|---:|---:|---:|---:|---:|")
    summary = {}
    for timed in (1, 3):
        mine = [r for r in rows if r["timed"] == timed]
        err = {k: max(abs(r[k] / reference[k] - 1) for r in mine) for k in ("pretrain", "sft")}
        ratios = [r["ratio"] for r in mine]
        err["ratio"] = max(abs(x / ref_ratio - 1) for x in ratios)
        summary[timed] = {**err, "ratio_min": min(ratios), "ratio_max": max(ratios),
                          "ratio_sd": statistics.pstdev(ratios)}  # fmt: skip
        print(f"| {timed} | {100 * err['pretrain']:.1f}% | {100 * err['sft']:.1f}% | "
              f"{min(ratios):.3f}-{max(ratios):.3f} | {100 * err['ratio']:.1f}% |")  # fmt: skip

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)",
        "preset": plan.preset, "batch": plan.batch_size, "seq_len": plan.seq_len, "reference_steps": args.steps,
        "reference": {**reference, "ratio": ref_ratio}, "rounds": rows, "summary": summary,
    }  # fmt: skip
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
