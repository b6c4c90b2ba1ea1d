"""Does a checkpoint copy from its context? The repeated-sequence test of induction heads (Olsson et al., "In-context
Learning and Induction Heads", 2022): random token sequences shown twice; a model that copies predicts the second
showing far better than the first (per-token loss drops from about ln(vocab) towards 0), one that does not scores
both alike. Every task domain's answer has to be read from the prompt, so this bounds what SFT can reach.

    python benchmarks/bench_copying.py runs/speedrun/pretrain runs/speedrun/long-context runs/speedrun/sft
Results: benchmarks/results/copying.json (--out) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from hybridmoe.serve.load import load_model  # noqa: E402
from hybridmoe.train.checkpoint import latest_checkpoint  # noqa: E402


def copying(model, vocab: int, rows: int = 8, length: int = 64, seed: int = 0) -> tuple[float, float]:
    """Mean next-token loss (nats) over the first and the second showing of `rows` random sequences."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(100, vocab, (rows, length), generator=g)  # past the special and byte tokens
    ids = torch.cat([x, x], 1)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
    nll = -logp.gather(2, ids[:, 1:, None]).squeeze(2)
    return float(nll[:, : length - 1].mean()), float(nll[:, length:].mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="model directories or run directories (their newest checkpoint)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "copying.json"))
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for path in args.checkpoints:
        ckpt = path if os.path.exists(os.path.join(path, "config.json")) else latest_checkpoint(path)
        model, _ = load_model(ckpt, device="cpu", dtype="float32")
        first, second = copying(model, model.config.vocab_size)
        rows.append({"checkpoint": ckpt, "first_nll": first, "second_nll": second, "drop": first - second})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)
    print("| checkpoint | loss, first showing | loss, second showing | drop |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['checkpoint']} | {r['first_nll']:.2f} | {r['second_nll']:.2f} | {r['drop']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
