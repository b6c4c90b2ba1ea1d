"""Can the `tiny` preset learn to copy from its context within the speedrun's step budget?

Trains a freshly initialized model on nothing but copy data (each row: random token spans of 8-64 tokens, every
span shown twice) and prints, every 25 steps, the loss on a held-out probe of 64 random tokens shown twice: a model
that copies (an induction head, Olsson et al. 2022, arXiv 2209.11895) predicts the second showing far better than
the first. `--alphabet` draws the random tokens from that many ids only; `--pattern` replaces the layer pattern
(e.g. `M*-M*-`: no MoE); `--lag N` makes every span N tokens long, a
copy at a fixed distance (N = 1: each token repeated once, which the Mamba conv window alone can predict).
`--control llama` trains transformers' `LlamaForCausalLM` instead (attention with rotary positions and SwiGLU MLPs,
`--layers` of them, hidden 256, 4 heads, 2 KV heads: the textbook architecture for induction heads) on the same data:
whether a plateau is this hybrid's or the task's at this budget. `--control attention-only` trains the setting of
the induction-head papers: `--layers` causal attention layers (hidden 256, 4 heads) with learned absolute positions,
no MLPs, a LayerNorm before the output, over the token ids in use only.
The default speedrun runs about 350 pretraining + 380 SFT steps of 8 x 512 tokens.

    python benchmarks/bench_induction.py --steps 200                    # 7,900 token ids
    python benchmarks/bench_induction.py --steps 150 --alphabet 50      # 50 token ids
    python benchmarks/bench_induction.py --steps 150 --alphabet 50 --pattern 'M*-M*-'
    python benchmarks/bench_induction.py --steps 150 --alphabet 50 --lag 20 --batch 4 --lr 1e-3   # fixed lag
    python benchmarks/bench_induction.py --control llama --steps 400 --alphabet 1000 --seq-len 256 --lr 1e-3
    python benchmarks/bench_induction.py --control attention-only --seq-len 64 --batch 64 --alphabet 64 --lr 1e-3 \\
        --steps 600
"""

import argparse
import json
import os
import platform
import random
import time
from types import SimpleNamespace

import torch

from hybridmoe.config import HybridMoEConfig
from hybridmoe.modeling import HybridMoEForCausalLM


class AttentionOnly(torch.nn.Module):
    """Token and learned position embeddings, `layers` residual causal self-attention layers, LayerNorm, unembedding."""

    def __init__(self, vocab: int, positions: int, layers: int, hidden: int = 256, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.embed, self.position = torch.nn.Embedding(vocab, hidden), torch.nn.Embedding(positions, hidden)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(hidden, 3 * hidden, bias=False) for _ in range(layers))
        self.out = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden, bias=False) for _ in range(layers))
        self.norm, self.unembed = torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids, labels=None):
        b, t = ids.shape
        x = self.embed(ids) + self.position(torch.arange(t))
        for qkv, out in zip(self.qkv, self.out):
            q, k, v = qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + out(y.transpose(1, 2).reshape(b, t, -1))
        logits = self.unembed(self.norm(x))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return SimpleNamespace(logits=logits, loss=loss)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--alphabet", type=int, default=7900, help="random tokens are ids 100 .. 100 + alphabet")
    p.add_argument("--pattern", default=None, help="hybrid_override_pattern instead of the preset's")
    p.add_argument("--lag", type=int, default=None, help="spans of exactly this many tokens: a copy at a fixed lag")
    p.add_argument("--preset", default="tiny")
    p.add_argument(
        "--control",
        choices=["llama", "attention-only"],
        default=None,
        help="a transformers Llama, or attention layers alone, instead of the preset",
    )
    p.add_argument("--layers", type=int, default=2, help="the control's layers")
    p.add_argument("--seed", type=int, default=0, help="the model's initialization and the training data")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "induction.jsonl"))
    a = p.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(2)
    if a.control == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=a.layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        ))  # fmt: skip
    elif a.control == "attention-only":
        model = AttentionOnly(vocab=100 + a.alphabet, positions=max(a.seq_len, 128), layers=a.layers)
    else:
        overrides = {"hybrid_override_pattern": a.pattern} if a.pattern else {}
        model = HybridMoEForCausalLM(HybridMoEConfig.from_preset(a.preset, vocab_size=8192, **overrides))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = random.Random(a.seed)

    def row():
        out = []
        while len(out) < a.seq_len:
            span = [rng.randrange(100, 100 + a.alphabet) for _ in range(a.lag or rng.randint(8, 64))]
            out += span + span
        return out[: a.seq_len]

    g = torch.Generator().manual_seed(123)
    probe = torch.randint(100, 100 + a.alphabet, (8, 64), generator=g)
    probe = torch.cat([probe, probe], 1)

    def copy_test():
        model.eval()
        with torch.no_grad():
            lp = torch.log_softmax(model(probe).logits[:, :-1], -1).gather(2, probe[:, 1:, None]).squeeze(2)
        model.train()
        return -lp[:, :63].mean().item(), -lp[:, 64:].mean().item()

    curve, t0 = [], time.time()
    for step in range(1, a.steps + 1):
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1, step / 20)
        ids = torch.tensor([row() for _ in range(a.batch)])
        out = model(ids, labels=ids) if a.control else model(ids, labels=ids, return_logits=False)
        lm_loss = out.loss if a.control else out.lm_loss
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 25 == 0 or step == 1:
            first, second = copy_test()
            curve.append({"step": step, "loss": lm_loss.item(), "first": first, "second": second})
            print(f"step {step} loss {lm_loss.item():.3f} copy probe: first showing {first:.2f}, "
                  f"second {second:.2f} ({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
    record = {"args": vars(a), "machine": platform.processor() or platform.machine(), "curve": curve}
    with open(a.out, "a") as fh:
        fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
