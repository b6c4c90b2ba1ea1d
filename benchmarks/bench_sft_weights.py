"""SFT of a transformers MoE model with per-conversation normalization: the loss from formed logits against the fused
loss with per-token weights (`automodel.patch`'s forward with `loss_weights`), side by side in one process.

The model: bench_automodel's qwen3_moe shape (4 layers, hidden 512, 128 experts of width 128, top-8) with a
`--vocab` of 32768 by default (Qwen3's is 151,936), random init, patched by `hybridmoe.automodel`, AdamW. The batch:
`--batch` packed samples of `--seq` tokens, conversations of 64-256 tokens each whose first 70% are the prompt (no
loss) and the rest the answer; the weights are the SFT stage's (`train.sft.loss_weights`, "conversation": each
conversation's targets share 1 / C of the loss). Both paths are the SFT stage's:
  - logits: the forward without labels, then the weighted cross-entropy of the (b, t, v) logits (what the stage did
    for every transformers model before, and still does for one `patch_model` could not fuse);
  - fused: the forward with `labels` and `loss_weights`: no logits formed, and on a CPU only the rows with a loss go
    through the LM head.
They alternate batch by batch after `--warmup` untimed batches, forward and backward only (no optimizer step: both
paths see the same weights, so their losses must agree); s/step is the median over `--steps` batches. Then one
more forward and backward of each under torch.profiler gives its peak of live tensor bytes (weights, gradients,
activations).

    python benchmarks/bench_sft_weights.py
Results: benchmarks/results/sft-weights.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_automodel import make_config, tensor_peak_mb  # noqa: E402
from bench_sft import _cpu_name  # noqa: E402 (also puts this checkout's src/ first on sys.path)

from hybridmoe.automodel import AutoModelForCausalLM  # noqa: E402
from hybridmoe.kernels.loss import weighted_cross_entropy  # noqa: E402
from hybridmoe.train.sft import loss_weights  # noqa: E402
from hybridmoe.utils import atomic_write_text  # noqa: E402


def packed_batch(batch: int, seq: int, vocab: int, g: torch.Generator) -> dict:
    samples = []
    for _ in range(batch):
        ids = torch.randint(0, vocab, (seq,), generator=g)
        labels, docs = torch.full((seq,), -100), torch.zeros(seq, dtype=torch.long)
        start, doc = 0, 0
        while start < seq:
            n = min(int(torch.randint(64, 257, (), generator=g)), seq - start)
            answer = start + int(0.7 * n)
            labels[answer : start + n] = ids[answer : start + n]
            docs[start : start + n] = doc
            start, doc = start + n, doc + 1
        samples.append({"input_ids": ids, "labels": labels, "document_ids": docs})
    weights = loss_weights(samples, "conversation")
    rows = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    rows["loss_weights"] = torch.stack(weights)
    return rows


def loss_of(model, rows: dict, path: str) -> torch.Tensor:
    if path == "fused":
        return model(input_ids=rows["input_ids"], labels=rows["labels"], loss_weights=rows["loss_weights"],
                     use_cache=False).loss  # fmt: skip
    logits = model(input_ids=rows["input_ids"], use_cache=False).logits[:, :-1]
    return weighted_cross_entropy(logits.flatten(0, 1), rows["labels"][:, 1:].flatten(),
                                  rows["loss_weights"][:, 1:].flatten())  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sft-weights.json"))
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    config = make_config("qwen3_moe")
    config.vocab_size = a.vocab
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    assert getattr(model, "_hybridmoe_fused_loss", False), "patch_model did not fuse the LM loss"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batches = [packed_batch(a.batch, a.seq, a.vocab, g) for _ in range(a.warmup + a.steps)]
    in_loss = float((batches[0]["loss_weights"][:, 1:] > 0).float().mean())
    paths = ("logits", "fused")
    times, losses = {k: [] for k in paths}, {k: [] for k in paths}
    for i, rows in enumerate(batches):
        for path in paths:
            t = time.perf_counter()
            loss = loss_of(model, rows, path)
            loss.backward()
            elapsed = time.perf_counter() - t
            model.zero_grad(set_to_none=True)
            losses[path].append(float(loss))
            if i >= a.warmup:
                times[path].append(elapsed)
        print(f"step {i}: " + ", ".join(f"{k} {losses[k][-1]:.6f}" for k in paths), flush=True)

    def one_step(path):
        return lambda: (loss_of(model, batches[0], path).backward(), model.zero_grad(set_to_none=True))

    peaks = {path: tensor_peak_mb(one_step(path), model, opt) for path in paths}
    tokens = a.batch * a.seq
    summary = {path: {"s_per_step": statistics.median(times[path]), "tokens_per_s": tokens / statistics.median(
        times[path]), "tensor_peak_mb": peaks[path]} for path in paths}  # fmt: skip
    diff = max(abs(x - y) for x, y in zip(losses["logits"], losses["fused"]))
    print(f"\n{_cpu_name()}, {torch.get_num_threads()} threads, qwen3_moe vocab {a.vocab}, {a.batch} x {a.seq} fp32, "
          f"{in_loss:.0%} of the tokens in the loss; median of {a.steps} steps (forward + backward)")  # fmt: skip
    print("| loss path | s / step | tokens/s | peak of live tensors, MB |")
    print("|---|---:|---:|---:|")
    for path, s in summary.items():
        print(f"| {path} | {s['s_per_step']:.3f} | {s['tokens_per_s']:.0f} | {s['tensor_peak_mb']:.0f} |")
    print(f"largest loss difference over {len(batches)} steps: {diff:.2e}")
    record = {"machine": _cpu_name(), "threads": torch.get_num_threads(), "args": vars(a), "summary": summary,
              "loss_share": in_loss, "losses": losses, "max_loss_diff": diff,
              "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    atomic_write_text(a.out, json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
