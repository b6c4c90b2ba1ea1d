"""Where a CPU training step's memory goes: parameters, gradients, AdamW state, saved activations, and the
process's measured peak. The measurements a memory planner must reproduce (issue 4).

Each case runs in a fresh process: build the model, run `--steps` training steps (forward, backward, fused
AdamW) on random tokens, and record
  - params / grads / adam MB: bytes of the parameters, their gradients and the optimizer's exp_avg/exp_avg_sq;
  - activations MB: the bytes autograd keeps for backward during one forward (unique storages handed to
    `saved_tensors_hooks`, parameters and the input ids excluded); not measured with activation checkpointing,
    where the recomputation in backward would be counted too;
  - peak MB: the process's peak resident memory (ru_maxrss), and base MB: resident memory after imports.
Unlike bench_model.py, the workers run with glibc's default malloc settings (what `hybridmoe pretrain` gets):
keeping freed blocks for reuse (MALLOC_MMAP_THRESHOLD_ etc.) is faster but raises the peak, by 2.1 GB for `tiny`
at 32K tokens.

    python benchmarks/bench_memory.py                 # the default cases (a few minutes on 2 cores)
    python benchmarks/bench_memory.py --cases tiny:8:512:0,small:2:1024:0
Results: benchmarks/results/memory.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

DEFAULT_CASES = "tiny:8:512:0,tiny:8:512:1,tiny:1:4096:0,tiny:1:32768:1,small:2:1024:0,small:2:1024:1"


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(preset: str, batch: int, seq: int, checkpointing: bool, steps: int) -> dict:
    import torch

    from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM

    base = rss_mb()
    torch.manual_seed(0)
    model = HybridMoEForCausalLM(HybridMoEConfig.from_preset(preset))
    model.backbone.gradient_checkpointing = checkpointing
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs and ptr != ids.untyped_storage().data_ptr():
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    for step in range(steps):
        if step == 0 and not checkpointing:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(ids, labels=ids, return_logits=False).loss
        else:
            loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradients allocated, as a training loop's peak has them
    mb = 2**-20
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    adam = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {
        "params_mb": params * mb,
        "grads_mb": params * mb,
        "adam_mb": adam * mb,
        "activations_mb": sum(saved.values()) * mb if not checkpointing else None,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "base_mb": base,
        "loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES, help="preset:batch:seq:checkpointing(0/1), comma-separated")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "memory.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        preset, batch, seq, ckpt = args.worker.split(":")
        print(json.dumps(worker(preset, int(batch), int(seq), ckpt == "1", args.steps)))
        return
    rows = []
    for case in args.cases.split(","):
        cmd = [sys.executable, __file__, "--worker", case, "--steps", str(args.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True)  # glibc's default malloc, as users run
        preset, batch, seq, ckpt = case.split(":")
        row = {"preset": preset, "batch": int(batch), "seq": int(seq), "checkpointing": ckpt == "1"}
        if proc.returncode != 0:
            row["error"] = f"exit code {proc.returncode}: " + (proc.stderr.strip().splitlines() or [""])[-1][-200:]
        else:
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        rows.append(row)
        print(json.dumps(row), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as fh:
            json.dump(rows, fh, indent=1)
        os.replace(args.out + ".tmp", args.out)
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = [
        "| preset | batch x seq | checkpointing | params MB | grads MB | adam MB | activations MB | peak MB | "
        "peak - base MB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['preset']} | {r['batch']} x {r['seq']} | {'yes' if r['checkpointing'] else 'no'} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80]} | | | | | |")
            continue
        act = f"{r['activations_mb']:.0f}" if r["activations_mb"] is not None else "-"
        lines.append(
            f"{head} {r['params_mb']:.0f} | {r['grads_mb']:.0f} | {r['adam_mb']:.0f} | {act} | "
            f"{r['peak_mb']:.0f} | {r['peak_mb'] - r['base_mb']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
