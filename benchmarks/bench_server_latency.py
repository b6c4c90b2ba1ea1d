"""Per-request latency of `hybridmoe serve` over kept-alive connections, one source tree against another.

Each tree's server runs in its own subprocess (`hybridmoe serve` on 127.0.0.1, the `debug` preset with random
weights and bench_soak's small tokenizer), the trees taking turns round by round. Per round, one client each:
  - health: `--requests` GET /health on one kept-alive connection (httpx);
  - completions: `--requests` non-streaming completions of 1 new token through the official OpenAI client (its
    connection pool keeps the connection alive, as every OpenAI client does);
  - stream: `--streams` streaming completions of 64 new tokens (eos ignored): the time to [DONE] and the gaps between
    chunks as the client receives them.
Reported: the median per-request latency, the median and largest chunk gap, per tree (median over rounds).
Written for the Nagle fix (TCP_NODELAY on accepted connections, `serve.server.build_server`): before it every
request after a connection's first waited for the client's delayed ACK.

    python benchmarks/bench_server_latency.py --trees OLD_CHECKOUT,.      # before / after, side by side
Results: benchmarks/results/server-latency.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import openai

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_soak import make_checkpoint, start_server  # noqa: E402


def measure(url: str, requests: int, streams: int) -> dict:
    out = {}
    with httpx.Client() as http:
        http.get(url + "/health")
        times = []
        for _ in range(requests):
            t = time.perf_counter()
            assert http.get(url + "/health").status_code == 200
            times.append(time.perf_counter() - t)
    out["health_ms"] = 1000 * statistics.median(times)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    client.completions.create(model="soak", prompt="warm up", max_tokens=1)
    times = []
    for i in range(requests):
        t = time.perf_counter()
        client.completions.create(model="soak", prompt=f"request {i}", max_tokens=1)
        times.append(time.perf_counter() - t)
    out["completion_ms"] = 1000 * statistics.median(times)
    totals, gaps = [], []
    for i in range(streams):
        t = last = time.perf_counter()
        stream = client.completions.create(model="soak", prompt=f"stream {i}", max_tokens=64, stream=True,
                                           extra_body={"ignore_eos": True})  # fmt: skip
        for chunk_index, _ in enumerate(stream):
            now = time.perf_counter()
            if chunk_index:
                gaps.append(now - last)
            last = now
        totals.append(time.perf_counter() - t)
    out["stream_s"] = statistics.median(totals)
    out["chunk_gap_ms_p50"] = 1000 * statistics.median(gaps)
    out["chunk_gap_ms_max"] = 1000 * max(gaps)
    return out


def revision(tree: str) -> str:
    """The tree's commit (short), with "+changes" when its working tree differs from it (results aside)."""
    git = ["git", "-C", tree]
    rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    status = [*git, "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"]
    dirty = subprocess.run(status, capture_output=True, text=True)
    return (rev or "unknown") + ("+changes" if dirty.stdout.strip() else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", default=".", help="comma-separated source trees (each with src/hybridmoe)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--streams", type=int, default=10)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "server-latency.json"))
    a = p.parse_args()
    trees = [os.path.abspath(t) for t in a.trees.split(",")]
    for tree in trees:
        if not os.path.isdir(os.path.join(tree, "src", "hybridmoe")):
            raise SystemExit(f"--trees: {tree} has no src/hybridmoe (give checkouts of this repository)")
    work = tempfile.mkdtemp(prefix="server-latency-")
    checkpoint = make_checkpoint(os.path.join(work, "ckpt"))
    servers = {}
    try:
        for i, tree in enumerate(trees):
            os.environ["PYTHONPATH"] = os.path.join(tree, "src")
            servers[tree] = start_server(checkpoint, os.path.join(work, f"server-{i}.log"), max_num_seqs=4)
        rounds = {tree: [] for tree in trees}
        for r in range(a.rounds):
            for tree in trees:
                rounds[tree].append(measure(servers[tree][1], a.requests, a.streams))
                print(f"round {r + 1} {tree}: {json.dumps(rounds[tree][-1])}", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    keys = list(rounds[trees[0]][0])
    summary = {tree: {k: statistics.median(m[k] for m in rounds[tree]) for k in keys} for tree in trees}
    revisions = {tree: revision(tree) for tree in trees}
    print("\n| tree | /health ms | completion (1 token) ms | stream of 64 tokens s | chunk gap p50 / max ms |")
    print("|---|---:|---:|---:|---:|")
    for tree, s in summary.items():
        print(f"| {revisions[tree]} | {s['health_ms']:.1f} | {s['completion_ms']:.1f} | {s['stream_s']:.3f} | "
              f"{s['chunk_gap_ms_p50']:.1f} / {s['chunk_gap_ms_max']:.1f} |")  # fmt: skip
    record = {"machine": platform.processor() or platform.machine(), "args": vars(a), "summary": summary,
              "revisions": revisions, "rounds": rounds, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=1)
    os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
