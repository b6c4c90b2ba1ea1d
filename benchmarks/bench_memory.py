"""Where a CPU training step's memory goes: parameters, gradients, AdamW state, saved activations, and the
process's measured peak. The measurements a memory planner must reproduce (issue 4).

Each case runs in a fresh process: build the model, run `--steps` training steps (forward, backward, fused
AdamW) on random tokens, and record
  - params / grads / adam MB: bytes of the parameters, their gradients and the optimizer's exp_avg/exp_avg_sq;
  - activations MB: the bytes autograd keeps for backward during one forward (unique storages handed to
    `saved_tensors_hooks`, parameters and the input ids excluded); not measured with activation checkpointing,
    where the recomputation in backward would be counted too;
  - peak MB: the process's peak resident memory (ru_maxrss), and base MB: resident memory after imports, with
    glibc's default malloc (what `hybridmoe pretrain` gets) and again with MALLOC_MMAP_THRESHOLD_=65536 (freed
    blocks of 64 KiB or more go back to the system at once, so the resident peak follows the live tensors);
  - allocated MB: the peak of live tensor bytes over the steps, from torch.profiler's memory profiling
    (`TensorPeak`, a third run; the CPU's counterpart of torch.cuda.max_memory_allocated);
  - planned MB: what `hybridmoe.plan` predicts for the same step (fp32, one process).
Unlike bench_model.py's, these workers do not keep freed blocks for reuse, which is faster but raises the peak
(by 2.1 GB for `tiny` at 32K tokens).

    python benchmarks/bench_memory.py                 # the default cases (about 20 minutes on 2 cores)
    python benchmarks/bench_memory.py --table         # the table of the saved results
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

MMAP_FIXED = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # blocks >= 64 KiB mmapped and returned when freed
DEFAULT_CASES = "debug:1:64:0,tiny:8:512:0,tiny:8:512:1,tiny:1:4096:0,tiny:1:32768:1,small:2:1024:0,small:2:1024:1"


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class TensorPeak:
    """`with TensorPeak() as peak: ...`, then `peak.bytes`: the peak of live tensor bytes on the CPU while the block
    ran, the CPU's counterpart of torch.cuda.max_memory_allocated. torch.profiler's memory profiling (on for the
    whole block) reports, with every allocation, the bytes of the tensors allocated under it and still alive; enter
    it before the model is built so that parameters, gradients and optimizer state count. Unlike the profiler's
    MemoryProfileTimeline this needs no data-flow graph, which fails on the in-place collectives of
    torch.distributed; on one process both give the same peak (443.8 MB for a `tiny` 2 x 512 step with AdamW)."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self.bytes = None
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        from torch._C._profiler import _EventType

        self._profile.__exit__(*exc)
        peak, todo = 0, list(self._profile.profiler.kineto_results.experimental_event_tree())
        while todo:
            event = todo.pop()
            todo.extend(event.children)
            if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == "cpu":
                peak = max(peak, event.typed[1].total_allocated)
        self.bytes = peak
        return False


def worker(preset: str, batch: int, seq: int, checkpointing: bool, steps: int, allocated: bool = False) -> dict:
    import torch

    from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM

    base = rss_mb()
    peak = TensorPeak().__enter__() if allocated else None  # from before the model is built to the last step
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
        if step == 0 and not checkpointing and not allocated:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(ids, labels=ids, return_logits=False).loss
        else:
            loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradients allocated, as a training loop's peak has them
    mb = 2**-20
    if allocated:
        peak.__exit__(None, None, None)
        return {"allocated_mb": peak.bytes * mb}
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


def run_worker(case: str, steps: int, env: dict | None = None, allocated: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", case, "--steps", str(steps)] + (["--allocated"] if allocated else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        return {"error": f"exit code {proc.returncode}: " + (proc.stderr.strip().splitlines() or [""])[-1][-200:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predicted_mb(preset: str, batch: int, seq: int, checkpointing: bool) -> float:
    from hybridmoe import HybridMoEConfig
    from hybridmoe.plan import Layout, plan

    layout = Layout(micro_batch=batch, checkpointing=checkpointing)
    return plan(HybridMoEConfig.from_preset(preset), layout, seq, precision="fp32").total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES, help="preset:batch:seq:checkpointing(0/1), comma-separated")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "memory.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--allocated", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args()
    if args.table:
        with open(args.out) as fh:
            print(table(json.load(fh)))
        return
    if args.worker:
        preset, batch, seq, ckpt = args.worker.split(":")
        print(json.dumps(worker(preset, int(batch), int(seq), ckpt == "1", args.steps, args.allocated)))
        return
    rows = []
    for case in args.cases.split(","):
        preset, batch, seq, ckpt = case.split(":")
        row = {"preset": preset, "batch": int(batch), "seq": int(seq), "checkpointing": ckpt == "1"}
        row.update(run_worker(case, args.steps))  # glibc's default malloc, as users run
        if "error" not in row:
            fixed = run_worker(case, args.steps, env=MMAP_FIXED)
            row["peak_mmap_fixed_mb"] = fixed.get("peak_mb")
            row["base_mmap_fixed_mb"] = fixed.get("base_mb")
            row.update(run_worker(case, args.steps, allocated=True))
            row["planned_mb"] = predicted_mb(preset, int(batch), int(seq), ckpt == "1")
        rows.append(row)
        print(json.dumps(row), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as fh:
            json.dump(rows, fh, indent=1)
        os.replace(args.out + ".tmp", args.out)
    print(table(rows))


def table(rows: list[dict]) -> str:
    """The measurements and the planner's prediction side by side. "runtime" is what a process needs beyond its
    tensors (autograd engine, thread pools, oneDNN): the `debug` row's RSS growth minus its tensor peak, measured,
    then added to the plan of every other row and compared with that row's RSS under the fixed mmap threshold."""
    fixed = lambda r: r["peak_mmap_fixed_mb"] - r["base_mmap_fixed_mb"]  # noqa: E731
    debug = next((r for r in rows if r["preset"] == "debug" and "error" not in r), None)
    runtime = fixed(debug) - debug["allocated_mb"] if debug else 0.0
    lines = [
        f"runtime (debug row's RSS growth minus its tensor peak): {runtime:.0f} MB",
        "",
        "| preset | batch x seq | ckpt | params | grads | adam | activations | planned | allocated peak | "
        "planned / allocated | RSS, fixed threshold | planned + runtime vs it | RSS, default malloc |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['preset']} | {r['batch']} x {r['seq']} | {'yes' if r['checkpointing'] else 'no'} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80]} | | | | | | | | | |")
            continue
        act = f"{r['activations_mb']:.0f}" if r["activations_mb"] is not None else "-"
        vs = (r["planned_mb"] + runtime) / fixed(r) - 1
        lines.append(
            f"{head} {r['params_mb']:.0f} | {r['grads_mb']:.0f} | {r['adam_mb']:.0f} | {act} | "
            f"{r['planned_mb']:.0f} | {r['allocated_mb']:.0f} | {r['planned_mb'] / r['allocated_mb']:.3f} | "
            f"{fixed(r):.0f} | {vs:+.1%} | {r['peak_mb'] - r['base_mb']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
