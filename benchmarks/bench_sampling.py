"""The engine's sampling step, one source tree against another: decode throughput of a sampled batch and the cost
of drawing one token.

Each tree runs in its own subprocess (PYTHONPATH=<tree>/src), the trees taking turns round by round. Per round:
  - engine (after a short untimed pass of every setting): the `tiny` preset (random weights, fp32, vocabulary
    8192) decoding `--batch` requests of `--prompt` random prompt tokens and `--new` new tokens each (eos
    ignored), in three settings: greedy (temperature 0, the control: no draw), sampled (temperature 1), and
    sampled with the chosen token's logprob (`logprobs=0`, what the RL rollouts ask for), taking turns `--repeats`
    times. `--varied`: each request's max_tokens drawn from 16..`--new` (the same draws on every tree), so that
    requests finish at different steps. Reported: tokens/s from the step at which `--batch` tokens have come out
    to the last (at the defaults about the 10th step of 175: the engine prefills one prompt a step while the
    prompts before it decode, so the window holds the later prefills too); the median of the repeats, then of
    the rounds.
  - draw: `serve.sampling.sample` on one row of 8192 logits at temperature 1, microseconds per call (median of 5
    timings of 500 calls).
Both are measured with `--threads` torch threads (2: this machine's cores). Written for the inverse-transform
sampler (`generation.sample_from`), which replaced `torch.multinomial`; the greedy column is the engine's step without
a draw (used for the decode batch's in-place views, `--out benchmarks/results/decode-views.json`).

    python benchmarks/bench_sampling.py --trees OLD_CHECKOUT,.      # before / after, side by side
Results: benchmarks/results/sampling.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 1.0},
            "sampled_logprobs": {"temperature": 1.0, "logprobs": 0}}  # fmt: skip


def worker(args: argparse.Namespace) -> dict:
    import torch

    from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
    from hybridmoe.serve.engine import Engine
    from hybridmoe.serve.sampling import SamplingParams, sample

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("tiny")).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (args.prompt,), generator=g).tolist() for _ in range(args.batch)]
    if args.varied:  # requests that finish at different steps, as sampled answers do
        max_tokens = torch.randint(16, args.new + 1, (args.batch,), generator=g).tolist()
    else:
        max_tokens = [args.new] * args.batch
    out = {}
    warmup = Engine(model, max_num_seqs=args.batch, max_model_len=args.prompt + 8, seed=0)
    for setting in SETTINGS.values():  # the first calls of each kernel and allocation are not timed
        warmup.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True, **setting))
    runs = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):  # the settings take turns, against this machine's drift
        for name, setting in SETTINGS.items():
            engine = Engine(model, max_num_seqs=args.batch, max_model_len=args.prompt + args.new, seed=0)
            for p, n in zip(prompts, max_tokens):
                engine.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True, **setting))
            produced, first = 0, None
            while engine.has_unfinished():
                for o in engine.step():
                    produced += len(o.new_token_ids)
                if first is None and produced >= args.batch:
                    first = time.perf_counter()
            t1 = time.perf_counter()
            assert produced == sum(max_tokens), produced
            runs[name].append((produced - args.batch) / (t1 - first))  # about: the tokens after `first`
    for name, values in runs.items():
        out[f"{name}_decode_tokens_per_s"] = statistics.median(values)
    logits = torch.randn(vocab, generator=g) * 3
    params = SamplingParams(temperature=1.0)
    timings = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(500):
            sample(logits, params, g)
        timings.append((time.perf_counter() - t) / 500 * 1e6)
    out["draw_us"] = statistics.median(timings)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", default=".", help="comma-separated source trees (each with src/hybridmoe)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs of each setting per round (median)")
    p.add_argument("--varied", action="store_true", help="max_tokens drawn from 16..--new per request")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sampling.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    # imported here, not in the worker: bench_sft puts this checkout's src/ first on sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_server_latency import revision
    from bench_sft import _cpu_name

    from hybridmoe.utils import atomic_write_text

    trees = [os.path.abspath(t) for t in a.trees.split(",")]
    for tree in trees:
        if not os.path.isdir(os.path.join(tree, "src", "hybridmoe")):
            raise SystemExit(f"--trees: {tree} has no src/hybridmoe (give checkouts of this repository)")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--batch", str(a.batch), "--prompt", str(a.prompt),
           "--new", str(a.new), "--threads", str(a.threads), "--repeats", str(a.repeats),
           *(["--varied"] if a.varied else [])]  # fmt: skip
    rounds = {tree: [] for tree in trees}
    for r in range(a.rounds):
        for tree in trees:
            env = os.environ | {"PYTHONPATH": os.path.join(tree, "src")}
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"the worker for {tree} failed:\n{done.stderr[-3000:]}")
            rounds[tree].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {tree}: {json.dumps(rounds[tree][-1])}", flush=True)
    keys = list(rounds[trees[0]][0])
    summary = {tree: {k: statistics.median(m[k] for m in rounds[tree]) for k in keys} for tree in trees}
    revisions = {tree: revision(tree) for tree in trees}
    print(
        f"\n{_cpu_name()}, {a.threads} threads, {a.batch} requests x {a.new} new tokens, "
        f"median of {a.repeats} x {a.rounds} rounds"
    )
    print("| tree | tokens/s: greedy | sampled | sampled + logprobs | one draw, us |")
    print("|---|---:|---:|---:|---:|")
    for tree, s in summary.items():
        print(f"| {revisions[tree]} | {s['greedy_decode_tokens_per_s']:.0f} | {s['sampled_decode_tokens_per_s']:.0f} | "
              f"{s['sampled_logprobs_decode_tokens_per_s']:.0f} | {s['draw_us']:.1f} |")  # fmt: skip
    record = {"machine": _cpu_name(), "args": vars(a), "summary": summary, "revisions": revisions, "rounds": rounds,
              "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    atomic_write_text(a.out, json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
