"""The numbers users see, computed in one place: model FLOPs per token, the machine's matmul peak, MFU.

Model FLOPs follow the usual convention (Kaplan et al. 2020; PaLM's MFU, Chowdhery et al. 2022, appendix B):
2 FLOPs per active matmul parameter per token forward (the embedding lookup is not a matmul and is left out),
plus attention's QK^T and AV over the causal half of the context, plus the SSD recurrence (state update and read-out,
2 * heads * head_dim * state each); training costs 3x the forward (backward = 2x forward). Recomputation
(activation checkpointing) is not counted: MFU counts the model's FLOPs, not the hardware's.
"""

from __future__ import annotations

import time

import torch

from .config import HybridMoEConfig


def active_matmul_params(config: HybridMoEConfig) -> int:
    """Parameters one token multiplies through: active parameters minus the embedding table."""
    from .modeling import HybridMoEForCausalLM

    counts = HybridMoEForCausalLM(config, device="meta").parameter_counts()
    return counts["active"] - config.vocab_size * config.hidden_size


def flops_per_token(config: HybridMoEConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token for sequences of `seq_len` tokens (MTP layers, when trained, are not included)."""
    pattern = config.hybrid_override_pattern
    attn = pattern.count("*") * 2 * 2 * config.num_attention_heads * config.head_dim * (seq_len + 1) / 2
    ssd = pattern.count("M") * 2 * 2 * config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size
    forward = 2 * active_matmul_params(config) + attn + ssd
    return 3 * forward if training else forward


def measure_matmul_peak(dtypes=(torch.float32, torch.bfloat16), rounds: int = 2) -> dict:
    """Best sustained GFLOP/s of square matmuls (torch.mm and F.linear layouts, several sizes, best of `rounds`)
    per dtype on this machine's CPU. The best over sizes is taken so that MFU is not flattered by a low peak."""
    out = {}
    for dtype in dtypes:
        sizes = (512, 1024, 2048, 4096) if dtype == torch.float32 else (512, 1024, 2048)
        best = 0.0
        for _ in range(rounds):
            for fn in (torch.mm, torch.nn.functional.linear):
                for n in sizes:
                    a = torch.randn(n, n).to(dtype)
                    b = torch.randn(n, n).to(dtype)
                    t0 = time.perf_counter()
                    fn(a, b)
                    first = time.perf_counter() - t0
                    repeats = max(1, int(0.5 / first))  # about half a second per size
                    t0 = time.perf_counter()
                    for _ in range(repeats):
                        fn(a, b)
                    best = max(best, 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9)
                    if first > 1.0:  # a slow layout (some bf16 kernels on CPUs without bf16 units): no larger sizes
                        break
        out[str(dtype).removeprefix("torch.")] = best
    return out


def mfu(tokens_per_second: float, flops_per_tok: float, peak_gflops: float) -> float:
    return tokens_per_second * flops_per_tok / (peak_gflops * 1e9)
