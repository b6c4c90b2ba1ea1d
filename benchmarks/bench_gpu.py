"""hybridmoe on one GPU against Hugging Face transformers on the same weights, side by side in one run (issue 16).

What it measures (bf16 weights and compute; fused AdamW, lr 1e-4, betas 0.9 / 0.95, weight decay 0.1; random weights,
the same for every implementation of a shape because each loads one checkpoint written first; the same batches and
prompts for every implementation):

  train     NemotronH training step tokens/s, MFU and peak memory, with the loss of every step:
              "1.2B"        hidden 2048, pattern MEMEM*EMEMEM*E, 64 experts top-6 of width 1024 in a latent space of
                            1024, shared expert 2048, Mamba 64 heads x 64, state 128, 8 groups, attention 32 heads
                            (2 KV) of 128, vocab 32768 (1.23B parameters, 0.50B active); batch 4 x 2048;
              "nano-slice"  the `nano-30b-a3b` preset with pattern MEME* (3.4B parameters, 128 experts); 1 x 8192;
            for hybridmoe eager, hybridmoe compiled (`compile_model`: every block compiled, as `train.compile: true`;
            1.2B only) and transformers' NemotronHForCausalLM with `--hf-experts` (its `experts_implementation`).
  serve     the 1.2B weights served: prefill tokens/s of one 2048-token prompt and decode tokens/s at batch 1 and
            32 (128-token prompts, 128 new tokens, greedy, no eos) through hybridmoe's engine
            (`hybridmoe.serve.Engine`, once per `--decode-modes` entry: eager and graphs on CUDA, eager and static
            on CPU),
            against transformers' forward (prefill) and `generate` (decode: the time of 128 new tokens less that of
            1, over 127 x batch tokens).
  finetune  the fine-tuning layer: `hybridmoe.automodel` against transformers' `--hf-experts` on a Qwen3-MoE shape
            (hidden 1024, 8 layers, 16 heads of 64 with 4 KV heads, 64 experts top-8 of width 512, vocab 32768),
            batch 4 x 2048: tokens/s, peak memory and losses.

Correctness beside the speed: every training row has its losses, compared with hybridmoe eager's (the first step's
loss is on identical weights and batch; later steps also see the two optimizers' rounding, and hybridmoe's router
aux loss, coefficient 1e-4, which transformers' NemotronH does not add); the automodel row is compared with
transformers'. The serve rows compare the greedy tokens of hybridmoe and transformers prompt by prompt (how many
rows are identical, and the mean length of their common prefix: bf16 rounding can flip a near-tie late).

Method: every implementation (and the checkpoint writer) runs in its own subprocess, so memory peaks and compile
caches never mix; tokens/s is the median over `--steps` timed steps after `--warmup` untimed ones (the compile
happens in those); decode tokens/s counts the steady state, from the step where every request has its first token
to the step where the first one finishes. Peak memory is `torch.cuda.max_memory_allocated` over the whole process
(weights, optimizer state, activations) on CUDA, the peak resident size (ru_maxrss) on CPU. MFU is the model FLOPs
of `hybridmoe.accounting.flops_per_token` over `--peak-tflops` (790: dense bf16 on one H200).

    python benchmarks/bench_gpu.py                  # everything: sized to finish within 5 minutes on one H200
    python benchmarks/bench_gpu.py --parts train --hf-experts grouped_mm,batched_mm
    python benchmarks/bench_gpu.py --decode-modes eager,graphs,compile
    python benchmarks/bench_gpu.py --smoke --jobs 2 # the same code path, tiny shapes: ~45 s of CPU time (2 cores)
Results: benchmarks/results/gpu.json (raw, saved after every measurement; --out), the markdown table on stdout and
beside the JSON (gpu.md). `--smoke` writes gpu-smoke.json / gpu-smoke.md unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# ------------------------------------------------------------------------------------------------ shapes


def shapes(smoke: bool) -> dict[str, dict]:
    """Every shape by name: its kind, its model config overrides and its batch. `--smoke` keeps the names and the
    code path and shrinks every dimension (hidden 64, 8 experts, vocab 512, 64-128 tokens); its "1.2b" has one layer
    of each kind (M*E), since tracing for torch.compile takes time per layer."""
    big = {
        "1.2b": dict(
            kind="nemotron", preset="nano-30b-a3b", batch=4, seq=2048,
            config=dict(hidden_size=2048, hybrid_override_pattern="MEMEM*EMEMEM*E", n_routed_experts=64,
                        num_experts_per_tok=6, moe_intermediate_size=1024, moe_latent_size=1024,
                        moe_shared_expert_intermediate_size=2048, mamba_num_heads=64, vocab_size=32768),
        ),
        "nano-slice": dict(
            kind="nemotron", preset="nano-30b-a3b", batch=1, seq=8192,
            config=dict(hybrid_override_pattern="MEME*"),
        ),
        "qwen3-moe": dict(
            kind="qwen3", batch=4, seq=2048,
            config=dict(vocab_size=32768, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                        num_key_value_heads=4, head_dim=64, intermediate_size=2048, moe_intermediate_size=512,
                        num_experts=64, num_experts_per_tok=8),
        ),
    }  # fmt: skip
    if not smoke:
        return big
    tiny = dict(hidden_size=64, vocab_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    tiny_nemotron = dict(tiny, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                         moe_shared_expert_intermediate_size=64, intermediate_size=64, mamba_num_heads=4,
                         mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=16)  # fmt: skip
    return {
        "1.2b": dict(big["1.2b"], batch=2, seq=64,
                     config=dict(tiny_nemotron, hybrid_override_pattern="M*E", moe_latent_size=32)),
        "nano-slice": dict(big["nano-slice"], seq=128, config=dict(tiny_nemotron, hybrid_override_pattern="MEME*")),
        "qwen3-moe": dict(big["qwen3-moe"], batch=2, seq=64,
                          config=dict(tiny, num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=32,
                                      num_experts=8, num_experts_per_tok=2)),
    }  # fmt: skip


def serve_shape(smoke: bool) -> dict:
    """Prefill prompt, decode prompt and new tokens, batch sizes (served on the "1.2b" weights)."""
    if smoke:
        return dict(prefill=64, prompt=16, new=12, batches=[1, 4])
    return dict(prefill=2048, prompt=128, new=128, batches=[1, 32])


def nemotron_config(shape: dict):
    from hybridmoe import HybridMoEConfig

    # eos_token_id None: nothing ends a generation early, on either side (transformers' generate then needs no
    # min_new_tokens, which would mask the eos logit and change the greedy tokens).
    return HybridMoEConfig.from_preset(shape["preset"], **shape["config"], eos_token_id=None)


def qwen3_config(shape: dict):
    import transformers

    return transformers.Qwen3MoeConfig(**shape["config"], norm_topk_prob=True, tie_word_embeddings=False,
                                       initializer_range=0.02, eos_token_id=None)  # fmt: skip


# ------------------------------------------------------------------------------------------------ the plan


def plan(args: argparse.Namespace) -> list[dict]:
    """Every measurement, in order, each one subprocess. The checkpoint writer comes first; every other spec reads
    the checkpoints it writes."""
    parts = args.parts.split(",")
    experts = [e for e in args.hf_experts.split(",") if e]
    modes = args.decode_modes.split(",")
    common = dict(smoke=args.smoke, device=args.device, warmup=args.warmup, steps=args.steps, ckpt=args.ckpt_dir)
    specs = []
    if "train" in parts:
        for shape in ("1.2b", "nano-slice"):
            specs.append(dict(common, part="train", shape=shape, impl="hybridmoe"))
            if shape == "1.2b":
                specs.append(dict(common, part="train", shape=shape, impl="hybridmoe-compiled",
                                  compile_backend=args.compile_backend))  # fmt: skip
            specs += [dict(common, part="train", shape=shape, impl="transformers", experts=e) for e in experts]
    if "serve" in parts:
        specs += [dict(common, part="serve", shape="1.2b", impl="hybridmoe", decode_mode=m) for m in modes]
        specs += [dict(common, part="serve", shape="1.2b", impl="transformers", experts=e) for e in experts]
    if "finetune" in parts:
        specs.append(dict(common, part="finetune", shape="qwen3-moe", impl="hybridmoe.automodel"))
        specs += [dict(common, part="finetune", shape="qwen3-moe", impl="transformers", experts=e) for e in experts]
    needed = list(dict.fromkeys(spec["shape"] for spec in specs))
    return [dict(common, part="checkpoints", shape=",".join(needed), impl="writer"), *specs]


# ------------------------------------------------------------------------------------------------ workers


def peak_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_model(model, backend: str = "inductor"):
    """The compiled training model, as the trainer compiles it with `train.compile: true`: every block on its own
    (`hybridmoe.train.model.compile_blocks`)."""
    from hybridmoe.train.model import compile_blocks

    compile_blocks(model, backend=backend)
    return model


def write_checkpoints(spec: dict) -> dict:
    """Random weights (seed 0) for the shapes measured, built on the device and saved in bf16: what every worker loads.
    Also names the device (the parent process never touches CUDA)."""
    import torch
    import transformers

    from hybridmoe import HybridMoEForCausalLM

    device = torch.device(spec["device"])
    out = {}
    for name in spec["shape"].split(","):
        shape = shapes(spec["smoke"])[name]
        t0 = time.perf_counter()
        torch.manual_seed(0)
        path = os.path.join(spec["ckpt"], name)
        if shape["kind"] == "nemotron":
            model = HybridMoEForCausalLM(nemotron_config(shape), device=device, dtype=torch.bfloat16)
        else:
            with device:  # transformers builds the modules under the default device
                model = transformers.AutoModelForCausalLM.from_config(qwen3_config(shape), dtype=torch.bfloat16)
        model.save_pretrained(path)
        out[name] = dict(params=sum(p.numel() for p in model.parameters()), seconds=time.perf_counter() - t0)
        del model
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {"machine": f"{name}, torch {torch.__version__}", "checkpoints": out, "kernels": kernel_libraries(device)}


def kernel_libraries(device) -> dict:
    """The fused-kernel libraries behind `hybridmoe.kernels` on this machine: each one's version where it imports
    (on CUDA: where the dispatch of kernels/ssd_cuda.py finds it), else None; on CPU none of them runs."""
    from hybridmoe.kernels import ssd_cuda

    found = {"triton": None, "mamba_ssm": ssd_cuda.mamba_chunk_scan, "causal_conv1d": ssd_cuda.causal_conv1d_cuda}
    out = {}
    for package, probe in found.items():
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = None
        out[package] = version if version and (device.type != "cuda" or probe is None or probe()) else None
    return out


def load(spec: dict, path: str, device):
    """The model of one implementation from a checkpoint directory, on `device`, bf16."""
    import torch

    dtype = torch.bfloat16
    where = {"device_map": str(device)} if device.type != "cpu" else {}
    if spec["impl"].startswith("hybridmoe") and spec["part"] != "finetune":
        from hybridmoe import HybridMoEForCausalLM

        return HybridMoEForCausalLM.from_pretrained(path, dtype=dtype, device=device)
    import transformers

    transformers.logging.set_verbosity_error()
    if spec["impl"] == "hybridmoe.automodel":
        from hybridmoe.automodel import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **where)
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, experts_implementation=spec["experts"], **where
    )


def train(spec: dict) -> dict:
    """Training steps of one implementation: forward + backward + AdamW on the shape's batches (seed 1)."""
    import torch

    device = torch.device(spec["device"])
    shape = shapes(spec["smoke"])[spec["shape"]]
    t0 = time.perf_counter()
    model = load(spec, os.path.join(spec["ckpt"], spec["shape"]), device)
    load_s = time.perf_counter() - t0
    native = spec["impl"] in ("hybridmoe", "hybridmoe-compiled")
    if spec["impl"] == "hybridmoe-compiled":
        compile_model(model, spec["compile_backend"])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    g = torch.Generator().manual_seed(1)
    vocab, b, t = model.config.vocab_size, shape["batch"], shape["seq"]
    times, losses = [], []
    for _ in range(spec["warmup"] + spec["steps"]):
        ids = torch.randint(0, vocab, (b, t), generator=g).to(device)
        sync(device)
        t0 = time.perf_counter()
        if native:
            res = model(ids, labels=ids, return_logits=False)
            loss, report = res.loss, res.lm_loss  # report: the LM loss alone (transformers' loss is that)
        else:
            loss = report = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(report))  # (waits for the step)
        sync(device)
        times.append(time.perf_counter() - t0)
    timed = times[spec["warmup"] :]
    return dict(
        tokens_per_s=b * t / statistics.median(timed), step_s=statistics.median(timed), first_step_s=times[0],
        load_s=load_s, losses=losses, peak_gb=peak_gb(device), params=sum(p.numel() for p in model.parameters()),
    )  # fmt: skip


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """The same prompts for every implementation."""
    import torch

    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed)).tolist()


def engine_decode(engine, batch: list[list[int]], new: int, device) -> dict:
    """Greedy decoding of `batch` to `new` tokens each through `engine`: the steady-state decode tokens/s (from the
    step where every request has its first token to the step where the first one finishes: all `len(batch)`
    requests decoding together) and every request's tokens."""
    from hybridmoe.serve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in batch]
    tokens = {i: [] for i in ids}
    start = end = None
    counted = 0
    while engine.has_unfinished():
        outputs = engine.step()
        sync(device)
        now = time.perf_counter()
        for o in outputs:
            if o.finish_reason == "error":
                raise RuntimeError(f"the engine failed request {o.request_id}: {o.error}")
            tokens[o.request_id] += o.new_token_ids
        if start is not None and end is None:
            counted += sum(len(o.new_token_ids) for o in outputs)
            if any(o.finished for o in outputs):
                end = now
        if start is None and all(tokens.values()):
            start = now
            if any(o.finished for o in outputs):  # new == 1: nothing left to decode
                end = now
    decode_s = (end or now) - start
    return dict(tokens_per_s=counted / decode_s if decode_s > 0 else None, tokens=[tokens[i] for i in ids])


def serve(spec: dict) -> dict:
    """Prefill and decode of one implementation on the 1.2b weights."""
    import torch

    device = torch.device(spec["device"])
    s = serve_shape(spec["smoke"])
    model = load(spec, os.path.join(spec["ckpt"], "1.2b"), device).eval()
    vocab = model.config.vocab_size
    out: dict = {"decode": {}}
    long_prompt = prompts(1, s["prefill"], vocab, seed=2)
    if spec["impl"] == "hybridmoe":
        from hybridmoe.serve import Engine, SamplingParams

        engine = Engine(model, max_num_seqs=1, max_model_len=s["prefill"] + 1, prefill_chunk=s["prefill"],
                        eos_token_id=None, decode_mode=spec["decode_mode"])  # fmt: skip
        out["decode_mode"] = engine.decode_mode
        once = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        times = []
        for _ in range(3):  # the first is warm-up
            sync(device)
            t0 = time.perf_counter()
            engine.generate(long_prompt, once)
            sync(device)
            times.append(time.perf_counter() - t0)
        del engine
        for b in s["batches"]:
            engine = Engine(model, max_num_seqs=b, max_model_len=s["prompt"] + s["new"], prefill_chunk=s["prompt"],
                            eos_token_id=None, decode_mode=spec["decode_mode"])  # fmt: skip
            batch = prompts(b, s["prompt"], vocab, seed=3)
            # warm-up, long enough for all b requests to decode together (graphs captured, kernels compiled)
            engine_decode(engine, batch, min(s["new"], b + 8), device)
            out["decode"][str(b)] = engine_decode(engine, batch, s["new"], device)
            del engine
    else:
        times = []
        with torch.no_grad():
            ids = torch.tensor(long_prompt, device=device)
            for _ in range(3):
                sync(device)
                t0 = time.perf_counter()
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
                sync(device)
                times.append(time.perf_counter() - t0)
            for b in s["batches"]:
                ids = torch.tensor(prompts(b, s["prompt"], vocab, seed=3), device=device)
                hf_generate(model, ids, 2, device)  # warm-up
                first = min(hf_generate(model, ids, 1, device)[0] for _ in range(2))  # the prefill alone
                total, new = hf_generate(model, ids, s["new"], device)
                out["decode"][str(b)] = dict(tokens_per_s=b * (s["new"] - 1) / max(1e-9, total - first),
                                             tokens=new.tolist())  # fmt: skip
    out.update(prefill_tokens_per_s=s["prefill"] / min(times[1:]), peak_gb=peak_gb(device))
    return out


def hf_generate(model, ids, n: int, device) -> tuple[float, object]:
    """transformers' greedy `generate` of exactly `n` tokens after `ids`: (seconds, the new tokens)."""
    import torch

    sync(device)
    t0 = time.perf_counter()
    res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    sync(device)
    new = res[:, ids.shape[1] :]
    assert new.shape[1] == n, new.shape
    return time.perf_counter() - t0, new


def worker(spec: dict) -> dict:
    import torch

    torch.manual_seed(0)
    if spec["part"] == "checkpoints":
        return write_checkpoints(spec)
    if spec["part"] in ("train", "finetune"):
        return train(spec)
    return serve(spec)


# ------------------------------------------------------------------------------------------------ the runner


def run_worker(spec: dict, timeout: int, env: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        res = {"error": f"timed out after {timeout} s"}
    else:
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            res = {"error": f"exit code {proc.returncode}: " + " | ".join(tail)[-400:]}
        else:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
    row = {k: spec[k] for k in ("part", "shape", "impl") if k in spec}
    row.update({k: spec[k] for k in ("experts", "decode_mode", "compile_backend") if spec.get(k)})
    return {**row, **res, "wall_s": round(time.time() - t0, 1)}


def add_comparisons(rows: list[dict], smoke: bool, peak_tflops: float) -> None:
    """MFU of the training rows, loss differences against the reference implementation of their shape, greedy tokens
    of transformers against hybridmoe's engine; written into the rows."""
    from hybridmoe.accounting import flops_per_token

    table = shapes(smoke)
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        if r["part"] == "train":
            shape = table[r["shape"]]
            r["mfu"] = r["tokens_per_s"] * flops_per_token(nemotron_config(shape), shape["seq"]) / (peak_tflops * 1e12)
        # train: every other row against hybridmoe eager; finetune: hybridmoe.automodel against transformers
        compared = {("train", "hybridmoe-compiled"): "hybridmoe", ("train", "transformers"): "hybridmoe",
                    ("finetune", "hybridmoe.automodel"): "transformers"}  # fmt: skip
        ref_impl = compared.get((r["part"], r["impl"]))
        if ref_impl is not None:
            ref = next((x for x in ok if x["shape"] == r["shape"] and x["impl"] == ref_impl), None)
            if ref is not None:
                diffs = [abs(a - b) for a, b in zip(r["losses"], ref["losses"])]
                r["loss_vs"] = dict(impl=name(ref), first=diffs[0], max=max(diffs))
        if r["part"] == "serve" and r["impl"] == "transformers":
            r["greedy_vs_hybridmoe"] = {}
            for ours in (x for x in ok if x["part"] == "serve" and x["impl"] == "hybridmoe"):
                mode = ours["decode_mode"]
                per_batch = {}
                for b, theirs in r["decode"].items():
                    pairs = list(zip(ours["decode"][b]["tokens"], theirs["tokens"]))
                    prefixes = [next((i for i, (x, y) in enumerate(zip(a, c)) if x != y), len(a)) for a, c in pairs]
                    per_batch[b] = dict(identical=sum(a == c for a, c in pairs), rows=len(pairs),
                                        mean_common_prefix=statistics.mean(prefixes),
                                        length=len(pairs[0][0]))  # fmt: skip
                r["greedy_vs_hybridmoe"][mode] = per_batch


def name(r: dict) -> str:
    if r["impl"] == "transformers":
        return f"transformers ({r.get('experts')})"
    extra = r.get("decode_mode") or (r.get("compile_backend") if r["impl"] == "hybridmoe-compiled" else None)
    return f"{r['impl']} ({extra})" if extra else r["impl"]


def header(results: dict) -> str:
    """The machine, transformers' version and the kernel libraries found, in a line."""
    kernels = ", ".join(f"{k} {v or 'absent'}" for k, v in results.get("kernels", {}).items())
    return f"{results['machine']}; transformers {results['transformers']}; {kernels or 'kernels unknown'}"


def markdown(results: dict) -> str:
    rows = results["rows"]
    lines = [header(results), ""] if results.get("machine") else []
    training = [r for r in rows if r["part"] in ("train", "finetune")]
    if training:
        lines += ["| part | shape | implementation | tokens/s | vs transformers | MFU | peak GB | "
                  "peak vs transformers | first loss | loss diff (first / max) |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in training:
        if "error" in r:
            lines.append(f"| {r['part']} | {r['shape']} | {name(r)} | failed: {r['error'][:100]} |" + " |" * 6)
            continue
        # against transformers' fastest experts_implementation for this shape
        hf = [x for x in rows if (x["part"], x["shape"], x["impl"]) == (r["part"], r["shape"], "transformers")
              and "error" not in x]  # fmt: skip
        best = max(hf, key=lambda x: x["tokens_per_s"]) if hf else None
        vs = f"{r['tokens_per_s'] / best['tokens_per_s']:.2f}x" if best else "-"
        memory = f"{r['peak_gb'] / best['peak_gb'] - 1:+.0%}" if best else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        diff = "-"
        if "loss_vs" in r:
            diff = f"{r['loss_vs']['first']:.1e} / {r['loss_vs']['max']:.1e} vs {r['loss_vs']['impl']}"
        lines.append(
            f"| {r['part']} | {r['shape']} | {name(r)} | {r['tokens_per_s']:,.0f} | {vs} | {mfu} | {r['peak_gb']:.1f} "
            f"| {memory} | {r['losses'][0]:.4f} | {diff} |"
        )
    serve_rows = [r for r in rows if r["part"] == "serve"]
    if serve_rows:
        batches = serve_shape(results["smoke"])["batches"]
        decode = " | ".join(f"decode b{b} tokens/s" for b in batches)
        lines += ["" if lines else None,
                  f"| serve (1.2b) | prefill tokens/s | {decode} | peak GB | greedy tokens identical to hybridmoe "
                  "(rows; mean common prefix) |", "|---|---:|" + "---:|" * len(batches) + "---:|---|"]  # fmt: skip
        for r in serve_rows:
            if "error" in r:
                lines.append(f"| {name(r)} | failed: {r['error'][:100]} |" + " |" * (len(batches) + 2))
                continue
            speeds = " | ".join(f"{r['decode'][str(b)]['tokens_per_s']:,.1f}" for b in batches)
            greedy = "; ".join(
                f"{mode}: " + ", ".join(f"b{b} {g['identical']}/{g['rows']} ({g['mean_common_prefix']:.0f} of "
                                        f"{g['length']})" for b, g in per.items())
                for mode, per in r.get("greedy_vs_hybridmoe", {}).items()
            )  # fmt: skip
            greedy = greedy or ("reference" if r["impl"] == "hybridmoe" else "-")
            lines.append(f"| {name(r)} | {r['prefill_tokens_per_s']:,.0f} | {speeds} | {r['peak_gb']:.1f} | {greedy} |")
    return "\n".join(line for line in lines if line is not None)


def save(path: str, results: dict) -> None:
    """The JSON and its table, each written atomically, after every measurement (an interrupted run keeps what it
    measured)."""
    from hybridmoe.utils import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=1) + "\n")
    atomic_write_text(os.path.splitext(path)[0] + ".md", markdown(results) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 warm-up + 1 timed step: a check of the "
                        "code path (on CPU without a GPU)")  # fmt: skip
    parser.add_argument("--parts", default="train,serve,finetune")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--hf-experts", default="grouped_mm",
                        help="transformers' experts_implementation(s), comma-separated; each is one row, the best "
                        "is what hybridmoe is compared with (batched_mm copies weights per token)")  # fmt: skip
    parser.add_argument("--decode-modes", "--decode-mode", default="",
                        help="the engine's decode_mode(s), comma-separated, one serve row each (default eager,graphs "
                        "on CUDA, eager,static on CPU)")  # fmt: skip
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend of the compiled training row "
                        "(default inductor; eager under --smoke: dynamo only, no C++/Triton build)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=None, help="untimed training steps (default 3; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 5; smoke 1)")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the device's dense bf16 peak, for MFU")
    parser.add_argument("--jobs", type=int, default=1, help="measurements at once (keep 1 on a GPU)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per subprocess")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu.json, gpu-smoke.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.steps = args.steps if args.steps is not None else (1 if args.smoke else 5)
    args.out = args.out or os.path.join(RESULTS, "gpu-smoke.json" if args.smoke else "gpu.json")
    if args.steps < 1 or args.warmup < 0 or args.jobs < 1:
        parser.error("need --steps >= 1, --warmup >= 0 and --jobs >= 1")
    unknown = set(args.parts.split(",")) - {"train", "serve", "finetune"}
    if unknown:
        parser.error(f"unknown --parts {sorted(unknown)}: use some of train,serve,finetune")
    from hybridmoe.serve.engine import DECODE_MODES

    args.decode_modes = args.decode_modes or ("eager,graphs" if args.device == "cuda" else "eager,static")
    unknown = set(args.decode_modes.split(",")) - set(DECODE_MODES)
    if unknown:
        parser.error(f"unknown --decode-modes {sorted(unknown)}: use some of {','.join(DECODE_MODES)}")
    results = {
        "machine": None, "transformers": importlib.metadata.version("transformers"), "device": args.device,
        "smoke": args.smoke,
        "command": " ".join(["python", "benchmarks/bench_gpu.py", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "peak_tflops": args.peak_tflops,
        "warmup": args.warmup, "steps": args.steps, "shapes": shapes(args.smoke), "serve": serve_shape(args.smoke),
        "rows": [],
    }  # fmt: skip
    env = dict(os.environ)
    if args.jobs > 1 or args.smoke:  # workers side by side share the cores; tiny shapes run fastest on one thread
        env["OMP_NUM_THREADS"] = "1"
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        args.ckpt_dir = tmp
        specs = plan(args)
        writer = run_worker(specs[0], args.timeout, env)
        if "error" in writer:
            save(args.out, results | {"checkpoints": writer})
            raise SystemExit(f"writing the checkpoints failed: {writer['error']}")
        results.update(machine=writer["machine"], checkpoints=writer["checkpoints"], kernels=writer["kernels"])
        print(f"# {header(results)}", flush=True)
        print(json.dumps(writer), flush=True)

        def measure(spec):
            row = run_worker(spec, args.timeout, env)
            with lock:
                print(json.dumps({k: v for k, v in row.items() if k not in ("losses", "decode")}), flush=True)
            return row

        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(measure, spec) for spec in specs[1:]]
            for future in futures:  # saved in plan order as they come
                results["rows"].append(future.result())
                add_comparisons(results["rows"], args.smoke, args.peak_tflops)
                save(args.out, results)
    print(markdown(results))
    failed = [name(r) for r in results["rows"] if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} measurement(s) failed: {', '.join(failed)} (see {args.out})")


if __name__ == "__main__":
    main()
