"""SFT against pretraining at the same shape, side by side in one process (issue 13's throughput target).

Both train the same native model with the same optimizer step (`train.model.native_forward_backward`, gradient
clipping, AdamW), on batches of `--batch` x `--seq-len` tokens:
  - pretrain: the standard library's source text, tokenized and cut into plain sequences (no document ids, as
    Nemotron 3 pretrains);
  - sft (token): conversations of every task domain (`hybridmoe.tasks`, training seeds) rendered with the chat
    template, assistant-only labels, packed first-fit with conversation ids (`data.sft.load_sft_samples`) and the
    stage's loss weights (`train.sft.loss_weights`, Super's stage-1 token mean over the batch);
  - sft (conversation): the same batches with stage-2 per-conversation weights (the fused loss takes the weights
    per row: one pass over the rows whichever the normalization).
The three alternate step by step after `--warmup` untimed steps each, so a machine that slows down slows all three;
tokens/s is the median over `--steps` timed steps. The packing's padding share is reported beside it.

    python benchmarks/bench_sft.py                                   # tiny, fp32, 8 x 512, on this CPU
    python benchmarks/bench_sft.py --shape 1.2b --device cuda --precision bf16 --batch 4 --seq-len 2048
Results: benchmarks/results/sft.json (--out) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from hybridmoe.accounting import flops_per_token  # noqa: E402
from hybridmoe.config import HybridMoEConfig  # noqa: E402
from hybridmoe.data.sft import load_sft_samples  # noqa: E402
from hybridmoe.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from hybridmoe.modeling import HybridMoEForCausalLM  # noqa: E402
from hybridmoe.speedrun import stdlib_sources  # noqa: E402
from hybridmoe.tasks import DOMAINS, write_sft_jsonl  # noqa: E402
from hybridmoe.train.model import native_forward_backward  # noqa: E402
from hybridmoe.train.sft import loss_weights  # noqa: E402

# The "1.2B" NemotronH shape measured on an H200 before (hidden 2048, 64 experts top-6, latent 1024).
SHAPES = {
    "1.2b": dict(
        vocab_size=32768, hidden_size=2048, hybrid_override_pattern="MEMEM*EMEMEM*E", num_attention_heads=16,
        num_key_value_heads=2, head_dim=128, intermediate_size=4096, mamba_num_heads=64, mamba_head_dim=64,
        ssm_state_size=128, n_groups=8, n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=1024,
        moe_shared_expert_intermediate_size=2048, moe_latent_size=1024, max_position_embeddings=8192,
    ),
}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny", help="a preset name (tiny, small, ...) or 1.2b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="weights and compute")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--per-domain", type=int, default=400, help="SFT conversations per task domain")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sft.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    work = tempfile.mkdtemp(prefix="bench-sft-")
    modules, _ = stdlib_sources(max_files=300)
    tok_dir = os.path.join(work, "tokenizer")
    vocab = SHAPES[args.shape]["vocab_size"] if args.shape in SHAPES else 8192
    train_tokenizer(modules, tok_dir, vocab_size=min(vocab, 8192), max_bad_fraction=1.0, show_progress=False)
    tok = load_tokenizer(tok_dir)

    # pretraining batches: the library's text, cut into plain sequences
    ids = []
    for f in modules:
        with open(f, encoding="utf-8", errors="replace") as fh:
            ids += tok(fh.read(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) > (args.steps + args.warmup) * args.batch * args.seq_len + 1:
            break
    n = len(ids) // args.seq_len
    plain = torch.tensor(ids[: n * args.seq_len]).view(n, args.seq_len)

    # SFT batches: packed conversations of every domain
    jsonl = os.path.join(work, "sft.jsonl")
    write_sft_jsonl(jsonl, {name: args.per_domain for name in DOMAINS})
    samples, report = load_sft_samples(jsonl, tok, args.seq_len, drop_long=True, seed=0)
    print(report.summary(), flush=True)

    config = (
        HybridMoEConfig(**SHAPES[args.shape])
        if args.shape in SHAPES
        else HybridMoEConfig.from_preset(args.shape, vocab_size=vocab)
    )
    torch.manual_seed(0)
    model = HybridMoEForCausalLM(config, dtype=dtype, device=device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def pretrain_batch(i):
        rows = plain[torch.arange(i * args.batch, (i + 1) * args.batch) % len(plain)]
        return [{"input_ids": rows.to(device), "labels": rows.to(device)}]

    def sft_batch(i, normalization):
        batch = [samples[(i * args.batch + j) % len(samples)] for j in range(args.batch)]
        weights = loss_weights(batch, normalization)
        rows = {k: torch.stack([s[k] for s in batch]).to(device) for k in ("input_ids", "labels", "document_ids")}
        rows["loss_weights"] = torch.stack(weights).to(device)
        return [rows]

    kinds = {
        "pretrain": pretrain_batch,
        "sft (token)": lambda i: sft_batch(i, "token"),
        "sft (conversation)": lambda i: sft_batch(i, "conversation"),
    }
    times = {k: [] for k in kinds}
    losses = {k: [] for k in kinds}
    for i in range(args.warmup + args.steps):
        for kind, make in kinds.items():
            micro = make(i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = native_forward_backward(model, micro, "fp32")
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[kind].append(time.perf_counter() - t0)
                losses[kind].append(out["loss"])
        print(f"step {i + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items() if v), flush=True)

    tokens = args.batch * args.seq_len
    padding = report.padding / max(1, report.tokens + report.padding)
    rows = []
    for kind in kinds:
        median = statistics.median(times[kind])
        rows.append({"kind": kind, "median_step_s": median, "tokens_per_s": tokens / median,
                     "tokens_per_s_steps": [tokens / t for t in times[kind]], "losses": losses[kind]})  # fmt: skip
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_pretrain"] = r["tokens_per_s"] / base
    result = {
        "machine": {
            "platform": platform.platform(), "processor": _cpu_name(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        },
        "args": vars(args), "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_token": flops_per_token(config, args.seq_len),
        "sft_data": {"conversations": report.conversations, "samples": report.samples, "tokens": report.tokens,
                     "loss_tokens": report.loss_tokens, "padding_share": padding},
        "rows": rows,
    }  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    where = f"{result['machine']['device']} ({result['machine']['processor']})"
    print(
        f"\n{args.shape}, {args.precision}, {args.batch} x {args.seq_len} tokens on {where}; SFT packing: "
        f"{report.samples} sequences, padding {padding:.2%}\n"
    )
    print("| kind | median step (s) | tokens/s | vs pretraining |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['median_step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['vs_pretrain']:.2f}x |")
    print(f"\nwrote {args.out}")
    return 0


def _cpu_name() -> str:
    """The CPU model and whether it has AVX512-BF16 (bf16 matmuls are ~7x slower without it)."""
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
    except OSError:
        return platform.processor()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    return name + (" (AVX512-BF16)" if "avx512_bf16" in info else " (no AVX512-BF16)")


if __name__ == "__main__":
    raise SystemExit(main())
