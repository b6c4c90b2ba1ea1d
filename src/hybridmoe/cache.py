"""The hybrid cache: what decoding keeps between steps.

A Mamba-2 layer keeps two constant-size tensors per sequence: the last `conv_kernel - 1` inputs of its causal conv
(b, k-1, conv_dim) in the model dtype, and the SSM state (b, heads, head_dim, state) in fp32. An attention layer
keeps its keys and values (b, kv_heads, capacity, head_dim), written in place and grown by doubling when a forward
needs more room. MoE and MLP layers keep nothing. Rows are sequences ("slots"), so an engine can reuse them.

Faithful to transformers' hybrid Mamba cache for nemotron_h in content (conv window, fp32 SSM state, KV); laid out
for in-place decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import HybridMoEConfig


@dataclass
class MambaState:
    conv: torch.Tensor  # (b, k-1, conv_dim)
    ssm: torch.Tensor  # (b, h, p, n) fp32


@dataclass
class KVState:
    key: torch.Tensor  # (b, kv, capacity, d)
    value: torch.Tensor

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (b,kv,t,d) at positions start..start+t-1; return the keys/values 0..start+t-1."""
        end = start + k.shape[2]
        if end > self.key.shape[2]:
            capacity = max(end, 2 * self.key.shape[2])
            grow = capacity - self.key.shape[2]
            pad = self.key.new_zeros(*self.key.shape[:2], grow, self.key.shape[3])
            self.key = torch.cat([self.key, pad], dim=2)
            self.value = torch.cat([self.value, pad], dim=2)
        self.key[:, :, start:end] = k
        self.value[:, :, start:end] = v
        return self.key[:, :, :end], self.value[:, :, :end]


class HybridCache:
    """Per-layer decoding state for `batch_size` sequences; `seq_len` tokens have been seen by every layer."""

    def __init__(
        self,
        config: HybridMoEConfig,
        batch_size: int,
        capacity: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        include_mtp: bool = False,
    ):
        self.config = config
        self.batch_size = batch_size
        self.seq_len = 0
        pattern = config.hybrid_override_pattern
        if include_mtp and config.num_nextn_predict_layers:
            pattern = pattern + config.mtp_hybrid_override_pattern * config.num_nextn_predict_layers
        self.layers: list[MambaState | KVState | None] = [
            self._new_state(symbol, batch_size, capacity, dtype, device) for symbol in pattern
        ]

    def _new_state(self, symbol, b, capacity, dtype, device):
        c = self.config
        if symbol == "M":
            return MambaState(
                conv=torch.zeros(b, c.conv_kernel - 1, c.mamba_conv_dim, dtype=dtype, device=device),
                ssm=torch.zeros(
                    b, c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size, dtype=torch.float32, device=device
                ),
            )
        if symbol == "*":
            shape = (b, c.num_key_value_heads, capacity, c.head_dim)
            return KVState(
                torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
            )
        return None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep (and reorder) the rows in `index`, e.g. to drop finished sequences."""
        for state in self.layers:
            if isinstance(state, MambaState):
                state.conv, state.ssm = state.conv[index], state.ssm[index]
            elif isinstance(state, KVState):
                state.key, state.value = state.key[index], state.value[index]
        self.batch_size = int(index.numel())

    def memory_bytes(self) -> int:
        total = 0
        for state in self.layers:
            if state is not None:
                for t in vars(state).values():
                    total += t.numel() * t.element_size()
        return total
