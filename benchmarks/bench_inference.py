"""Inference side by side in one run (issue 5): long generation, serving throughput, and a 1M-token prefill.

  long     one request, a 1K-token prompt and `--long-out` new tokens (greedy, eos ignored), decode tokens/s and
           peak memory: the hybrid `tiny` on hybridmoe's engine, an all-attention model of about the same size on
           the same engine (tiny with every Mamba layer an attention layer of 7 full heads, which has the Mamba
           layer's parameter count), and transformers' `generate` on the hybrid's weights (NemotronHForCausalLM).
  serve    32 requests of 128 prompt tokens and 128 new tokens at once: the engine (32 slots) against
           transformers' `generate` on the same batch.
  mtp      MTP speculative decoding on the speedrun's model (run `hybridmoe speedrun --out runs/speedrun` first):
           an MTP layer is added and trained for `--mtp-steps` on the speedrun's own token shards with the rest
           frozen, then 16 held-out prompts of 64 tokens decode 128 tokens greedily, plainly and with 1-3 drafts:
           tokens/s, acceptance, and whether the outputs are identical.
  prefill  the `debug` preset prefilling one prompt of 64K, 256K and 1M tokens in chunks of 16K through the engine:
           time and peak memory, beside the attention KV cache the prompt fills (the Mamba state is constant).

Random weights except in `mtp` (speed and memory do not depend on them; eos is ignored so every run makes all its
tokens), bf16 for `long` and `serve` (the CPU's widened matmuls), fp32 for `prefill`. Each measurement runs in a fresh
subprocess, so its peak resident memory (ru_maxrss) is its own; "added" is the peak minus the resident size just
before the model is built.

    python benchmarks/bench_inference.py                        # everything (about 30 minutes on 2 cores)
    python benchmarks/bench_inference.py --parts prefill --prefill-lengths 65536
Results: benchmarks/results/inference.json and markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(kind: str, dtype):
    import torch

    from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM

    torch.manual_seed(0)
    if kind == "hybrid":
        config = HybridMoEConfig.from_preset("tiny")
    elif kind == "attention":
        tiny = HybridMoEConfig.from_preset("tiny")
        pattern = tiny.hybrid_override_pattern.replace("M", "*")
        config = HybridMoEConfig.from_preset("tiny", hybrid_override_pattern=pattern, num_attention_heads=7,
                                             num_key_value_heads=7)  # fmt: skip
    elif kind == "debug":
        config = HybridMoEConfig.from_preset("debug", num_nextn_predict_layers=0, max_position_embeddings=2**21)
    else:
        raise ValueError(kind)
    return HybridMoEForCausalLM(config, dtype=dtype).eval()


def worker(spec: dict) -> dict:
    import torch

    from hybridmoe.serve import Engine, SamplingParams

    torch.manual_seed(0)
    base = rss_mb()
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    g = torch.Generator().manual_seed(1)
    out: dict = {}
    if spec["impl"] == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
        ours = build("hybrid", torch.float32)
        with tempfile.TemporaryDirectory() as tmp:
            ours.save_pretrained(tmp)
            del ours
            base = rss_mb()
            model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
        out["params"] = sum(p.numel() for p in model.parameters())
        ids = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["prompt"]), generator=g)
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            gen = model.generate(ids, max_new_tokens=spec["new"], min_new_tokens=spec["new"], do_sample=False)
            t2 = time.perf_counter()
        assert gen.shape[1] == spec["prompt"] + spec["new"]
        prefill_s = t1 - t0
        out["decode_tokens_per_s"] = spec["batch"] * (spec["new"] - 1) / max(1e-9, (t2 - t1) - prefill_s)
        out["tokens_per_s"] = spec["batch"] * spec["new"] / (t2 - t1)
    else:
        model = build(spec["model"], dtype)
        out["params"] = sum(p.numel() for p in model.parameters())
        length = spec["prompt"] + spec["new"]
        engine = Engine(model, max_num_seqs=spec["batch"], max_model_len=length, prefill_chunk=spec["chunk"])
        out["cache_mb"] = engine.cache_bytes / 2**20
        prompts = [torch.randint(0, model.config.vocab_size, (spec["prompt"],), generator=g).tolist()
                   for _ in range(spec["batch"])]  # fmt: skip
        params = SamplingParams(temperature=0, max_tokens=spec["new"], ignore_eos=True)
        ids = [engine.add_request(p, params) for p in prompts]
        t0 = time.perf_counter()
        first = None
        produced = 0
        while engine.has_unfinished():
            for o in engine.step():
                produced += len(o.new_token_ids)
            if first is None and produced >= spec["batch"]:  # every request has its first token: prefill done
                first = time.perf_counter()
        t2 = time.perf_counter()
        assert produced == spec["batch"] * spec["new"], (produced, ids)
        out["prefill_s"] = (first or t2) - t0
        out["decode_tokens_per_s"] = spec["batch"] * (spec["new"] - 1) / max(1e-9, t2 - (first or t0))
        out["tokens_per_s"] = spec["batch"] * spec["new"] / (t2 - t0)
        out["seconds"] = t2 - t0
    out["peak_mb"] = peak_mb()
    out["added_mb"] = peak_mb() - base
    return out


def mtp_worker(spec: dict) -> dict:
    import glob

    import numpy as np
    import torch

    from hybridmoe import HybridMoEForCausalLM
    from hybridmoe.serve.sampling import SamplingParams
    from hybridmoe.serve.speculative import speculative_generate
    from hybridmoe.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(os.path.join(spec["run"], "long-context"))
    if ckpt is None:
        raise SystemExit(f"no checkpoint under {spec['run']}/long-context: run hybridmoe speedrun --out {spec['run']}")
    base = HybridMoEForCausalLM.from_pretrained(ckpt)
    torch.manual_seed(0)
    model = HybridMoEForCausalLM(base.config.replace(num_nextn_predict_layers=1, mtp_num_depths=1, mtp_loss_weight=1.0))
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("mtp.") for k in missing)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("mtp."))
    shards = sorted(glob.glob(os.path.join(spec["run"], "data", "modules", "*.bin")))
    tokens = np.concatenate([np.fromfile(f, dtype=np.uint16) for f in shards]).astype(np.int64)
    held_out = tokens[-len(tokens) // 10 :]  # prompts come from the last tenth, training windows from the rest
    train = tokens[: -len(tokens) // 10]
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        starts = rng.integers(0, len(train) - 257, size=8)
        ids = torch.from_numpy(np.stack([train[s : s + 256] for s in starts]))
        out = model(ids, labels=ids, return_logits=False)
        out.mtp_loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0
    model.eval()
    prompts = [held_out[s : s + 64].tolist() for s in rng.integers(0, len(held_out) - 65, size=16)]
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    result = {"train_steps": spec["steps"], "train_s": train_s, "final_mtp_loss": float(out.mtp_loss)}
    plain, t0 = [], time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            plain.append(model.generate(torch.tensor([p]), max_new_tokens=128, do_sample=False)[0, 64:].tolist())
    result["plain_tokens_per_s"] = 16 * 128 / (time.perf_counter() - t0)
    for k in (1, 2, 3):
        t0, same, accepted, drafted, steps = time.perf_counter(), True, 0, 0, 0
        parts = dict.fromkeys(("draft_s", "verify_s", "replay_s", "commit_s"), 0.0)
        for p, ref in zip(prompts, plain):
            o = speculative_generate(model, p, params, num_draft_tokens=k)
            same &= o.token_ids == ref
            accepted, drafted = accepted + o.stats.num_accepted, drafted + o.stats.num_drafted
            steps += o.stats.num_verify_steps
            for name in parts:
                parts[name] += getattr(o.stats, name)
        result[f"k{k}"] = {
            "tokens_per_s": 16 * 128 / (time.perf_counter() - t0), "acceptance": accepted / max(1, drafted),
            "tokens_per_verify": 16 * 128 / max(1, steps), "identical": bool(same),
            **{f"{name[:-2]}_ms_per_token": 1e3 * v / (16 * 128) for name, v in parts.items()},
        }  # fmt: skip
    # What one cached forward of the main model costs for 1..4 new tokens (the verification forward of k drafts
    # reads k + 1): the mean of 32 calls after a 64-token prompt.
    result["forward_ms"] = {}
    with torch.no_grad():
        for n in (1, 2, 3, 4):
            cache = model.new_cache(1, capacity=64 + 32 * n + 1)
            model(torch.tensor([prompts[0]]), cache=cache, logits_to_keep=1)
            ids = torch.tensor([prompts[1][:n]])
            t0 = time.perf_counter()
            for _ in range(32):
                model(ids, cache=cache)
            result["forward_ms"][str(n)] = 1e3 * (time.perf_counter() - t0) / 32
    return result


def run(spec: dict, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        return {**spec, "error": f"exit code {proc.returncode}: " + (proc.stderr.strip().splitlines() or [""])[-1]}
    return {**spec, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="long,serve,mtp,prefill")
    parser.add_argument("--long-prompt", type=int, default=1024)
    parser.add_argument("--long-out", type=int, default=8192)
    parser.add_argument("--prefill-lengths", default="65536,262144,1048576")
    parser.add_argument("--run", default="runs/speedrun", help="the speedrun output the mtp part builds on")
    parser.add_argument("--mtp-steps", type=int, default=300)
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "inference.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(mtp_worker(spec) if spec["part"] == "mtp" else worker(spec)))
        return
    import torch

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "command": " ".join(["python", "benchmarks/bench_inference.py", *sys.argv[1:]]),
        "rows": [],
    }
    specs = []
    parts = args.parts.split(",")
    if "long" in parts:
        common = dict(part="long", dtype="bf16", batch=1, prompt=args.long_prompt, new=args.long_out, chunk=1024)
        specs += [dict(common, impl="hybridmoe", model="hybrid"), dict(common, impl="hybridmoe", model="attention"),
                  dict(common, impl="transformers", model="hybrid")]  # fmt: skip
    if "serve" in parts:
        common = dict(part="serve", dtype="bf16", batch=32, prompt=128, new=128, chunk=512)
        specs += [dict(common, impl="hybridmoe", model="hybrid"), dict(common, impl="transformers", model="hybrid")]
    if "mtp" in parts:
        specs.append(dict(part="mtp", run=args.run, steps=args.mtp_steps))
    if "prefill" in parts:
        for n in (int(x) for x in args.prefill_lengths.split(",")):
            specs.append(dict(part="prefill", dtype="fp32", batch=1, prompt=n, new=1, chunk=16384, impl="hybridmoe",
                              model="debug"))  # fmt: skip
    for spec in specs:
        row = run(spec, args.timeout)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as fh:
            json.dump(results, fh, indent=1)
        os.replace(args.out + ".tmp", args.out)
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = []
    rows = results["rows"]
    name = lambda r: f"{r['impl']} {r['model']}" if r["impl"] == "hybridmoe" else "transformers generate (hybrid)"  # noqa: E731
    for part in ("long", "serve"):
        sel = [r for r in rows if r["part"] == part]
        if not sel:
            continue
        lines += ["", f"| {part} | params | decode tokens/s | all tokens/s | peak MB | added MB |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in sel:
            if "error" in r:
                lines.append(f"| {name(r)} | failed: {r['error'][:80]} | | | | |")
                continue
            lines.append(
                f"| {name(r)} | {r['params'] / 1e6:.1f}M | {r['decode_tokens_per_s']:.1f} | {r['tokens_per_s']:.1f} | "
                f"{r['peak_mb']:.0f} | {r['added_mb']:.0f} |"
            )
    for r in (r for r in rows if r["part"] == "mtp"):
        if "error" in r:
            lines += ["", f"mtp failed: {r['error'][:200]}"]
            continue
        lines += ["", f"MTP layer trained {r['train_steps']} steps ({r['train_s']:.0f} s, final MTP loss "
                  f"{r['final_mtp_loss']:.3f}); plain greedy decoding {r['plain_tokens_per_s']:.1f} tokens/s", "",
                  "| drafts | tokens/s | speedup | acceptance | tokens per verify forward | identical output |",
                  "|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for k in (1, 2, 3):
            m = r[f"k{k}"]
            lines.append(
                f"| {k} | {m['tokens_per_s']:.1f} | {m['tokens_per_s'] / r['plain_tokens_per_s']:.2f}x | "
                f"{m['acceptance']:.1%} | {m['tokens_per_verify']:.2f} | {m['identical']} |"
            )
        if "draft_ms_per_token" in r["k1"]:
            lines += ["", f"plain decoding: {1e3 / r['plain_tokens_per_s']:.1f} ms per token; one cached forward "
                      "of the main model for 1 / 2 / 3 / 4 new tokens: "
                      + " / ".join(f"{v:.1f}" for v in r["forward_ms"].values()) + " ms", "",
                      "| drafts | draft ms/token | verify ms/token | replay ms/token | MTP commit ms/token |",
                      "|---:|---:|---:|---:|---:|"]  # fmt: skip
            for k in (1, 2, 3):
                m = r[f"k{k}"]
                lines.append(
                    f"| {k} | {m['draft_ms_per_token']:.1f} | {m['verify_ms_per_token']:.1f} | "
                    f"{m['replay_ms_per_token']:.1f} | {m['commit_ms_per_token']:.1f} |"
                )
    sel = [r for r in rows if r["part"] == "prefill"]
    if sel:
        lines += ["", "| prompt tokens | prefill s | tokens/s | KV + state cache MB | peak MB | added MB |",
                  "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in sel:
            if "error" in r:
                lines.append(f"| {r['prompt']} | failed: {r['error'][:80]} | | | | |")
                continue
            lines.append(
                f"| {r['prompt']} | {r['prefill_s']:.1f} | {r['prompt'] / r['prefill_s']:.0f} | {r['cache_mb']:.0f} | "
                f"{r['peak_mb']:.0f} | {r['added_mb']:.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
