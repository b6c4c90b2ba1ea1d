"""Soak test of `hybridmoe serve` (issue 12): many concurrent streaming clients with random disconnects, for minutes.

A `hybridmoe serve` subprocess on 127.0.0.1 serves the `debug` preset (random weights, a small BPE tokenizer trained
here on this file's own text; or `--checkpoint DIR`). `--clients` asyncio clients loop for `--seconds`: each sends a
streaming chat or completions request (random prompt, 8-64 new tokens, temperature 0 or 0.8), reads the SSE stream,
and with probability `--disconnect` closes the connection after a random number of chunks. Reported: requests
served (streams that ended with [DONE]), disconnects, errors by kind (HTTP status, error event code, exception),
latency p50/p99 (request sent to [DONE]) and time to first token, and the server's resident memory before (after a
warm-up), at the end, and its peak; then whether /health and a normal request still succeed and the engine is idle.

    python benchmarks/bench_soak.py                          # 200 clients, 120 s
    python benchmarks/bench_soak.py --clients 50 --seconds 20
Results: benchmarks/results/soak.json and a summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

SOURCE = Path(__file__).read_text()
WORDS = re.findall(r"[A-Za-z]+", SOURCE)


def status_mb(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) / 1024


def make_checkpoint(path: str) -> str:
    import torch

    from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
    from hybridmoe.data.tokenizer import load_tokenizer, train_tokenizer, vocab_size_of

    os.makedirs(path, exist_ok=True)
    corpus = os.path.join(path, "corpus.txt")
    with open(corpus, "w") as f:
        f.write(SOURCE * 20)
    train_tokenizer([corpus], path, vocab_size=512, show_progress=False)
    os.remove(corpus)
    torch.manual_seed(0)
    config = HybridMoEConfig.from_preset("debug", vocab_size=vocab_size_of(load_tokenizer(path)))
    HybridMoEForCausalLM(config).save_pretrained(path)
    return path


def start_server(checkpoint: str, log_path: str, max_num_seqs: int):
    cmd = [sys.executable, "-m", "hybridmoe.cli", "serve", checkpoint, "--port", "0", "--served-model-name", "soak",
           "--max-model-len", "512", "--max-num-seqs", str(max_num_seqs), "--grace", "5"]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("HYBRIDMOE_API_KEY", None)
    with open(log_path, "w") as log:  # a file: a pipe nobody reads would fill and block the server
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if m := re.search(r"on (http://127\.0\.0\.1:\d+)", Path(log_path).read_text()):
            url = m.group(1)
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        return proc, url
                except httpx.TransportError:
                    time.sleep(0.1)
        time.sleep(0.1)
    raise RuntimeError(f"the server did not start:\n{Path(log_path).read_text()}")


def request_body(rng: random.Random) -> tuple[str, dict]:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60)))
    common = {"model": "soak", "max_tokens": rng.randint(8, 64), "temperature": rng.choice([0, 0.8]), "stream": True}
    if rng.random() < 0.5:
        return "/v1/chat/completions", common | {"messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", common | {"prompt": prompt}


async def client_loop(i: int, url: str, end: float, p_disconnect: float, stats: dict) -> None:
    rng = random.Random(i)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0)) as client:
        while time.monotonic() < end:
            path, body = request_body(rng)
            cut = rng.randint(1, 8) if rng.random() < p_disconnect else None
            t0, first, chunks = time.monotonic(), None, 0
            try:
                async with client.stream("POST", path, json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        code = r.json().get("error", {}).get("code") if r.content else None
                        stats["errors"][f"HTTP {r.status_code} {code}"] += 1
                        continue
                    done = False
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            done = True
                            break
                        event = json.loads(line[6:])
                        if "error" in event:
                            stats["errors"][f"stream error {event['error'].get('code')}"] += 1
                            break
                        first = first or time.monotonic()
                        chunks += 1
                        if cut is not None and chunks >= cut:
                            break  # leaving the block closes the connection: a disconnect
                    if cut is not None and not done:
                        stats["disconnects"] += 1
                    elif done:
                        stats["served"] += 1
                        stats["latency"].append(time.monotonic() - t0)
                        if first is not None:
                            stats["ttft"].append(first - t0)
            except httpx.HTTPError as e:
                stats["errors"][type(e).__name__] += 1


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--disconnect", type=float, default=0.2, help="probability that a client hangs up mid-stream")
    ap.add_argument("--max-num-seqs", type=int, default=16, help="engine slots")
    ap.add_argument("--checkpoint", help="a model directory (default: the debug preset with random weights)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "soak.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or make_checkpoint(os.path.join(tmp, "debug"))
        proc, url = start_server(checkpoint, os.path.join(tmp, "server.log"), args.max_num_seqs)
        try:
            for i in range(5):  # warm-up
                httpx.post(url + "/v1/completions", json={"model": "soak", "prompt": f"warm up {i}", "max_tokens": 8},
                           timeout=120).raise_for_status()  # fmt: skip
            rss_before = status_mb(proc.pid, "VmRSS")
            stats = {"served": 0, "disconnects": 0, "errors": Counter(), "latency": [], "ttft": []}
            t0 = time.monotonic()
            end = t0 + args.seconds

            async def run():
                await asyncio.gather(*(client_loop(i, url, end, args.disconnect, stats) for i in range(args.clients)))

            asyncio.run(run())
            elapsed = time.monotonic() - t0
            health = httpx.get(url + "/health", timeout=60).json()
            normal = httpx.post(url + "/v1/completions", json={"model": "soak", "prompt": "after", "max_tokens": 4},
                                timeout=120).status_code  # fmt: skip
            metrics = httpx.get(url + "/metrics", timeout=60).text
            running = re.search(r"^hybridmoe_num_requests_running (\d+)", metrics, re.M).group(1)
            waiting = re.search(r"^hybridmoe_num_requests_waiting (\d+)", metrics, re.M).group(1)
            rss_after, rss_peak = status_mb(proc.pid, "VmRSS"), status_mb(proc.pid, "VmHWM")
        finally:
            proc.terminate()
            proc.wait(60)

    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "avx512_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text()},  # fmt: skip
        "clients": args.clients, "seconds": round(elapsed, 1), "disconnect_probability": args.disconnect,
        "max_num_seqs": args.max_num_seqs, "served": stats["served"], "disconnects": stats["disconnects"],
        "errors": dict(stats["errors"]), "latency_p50_s": percentile(stats["latency"], 0.5),
        "latency_p99_s": percentile(stats["latency"], 0.99), "ttft_p50_s": percentile(stats["ttft"], 0.5),
        "ttft_p99_s": percentile(stats["ttft"], 0.99), "rss_before_mb": round(rss_before), "rss_after_mb":
        round(rss_after), "rss_peak_mb": round(rss_peak), "health_after": health, "normal_request_after": normal,
        "engine_after": {"running": int(running), "waiting": int(waiting)},
    }  # fmt: skip
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
