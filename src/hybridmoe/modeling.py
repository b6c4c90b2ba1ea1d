"""The whole hybrid Mamba-2 / attention / LatentMoE language model in one file.

Faithful to Hugging Face transformers' `models/nemotron_h/modeling_nemotron_h.py` (the parity reference: same module
names, same parameter shapes, same numerics in fp32) and to the Nemotron 3 reports for what transformers leaves out:
multi-token prediction (MTP), the sequence-level balancing loss, packed-document masking and the initialization.

Every layer is `x + mixer(RMSNorm(x))`; the layer pattern picks the mixer once, in `__init__`:
    M  Mamba2Mixer   in_proj -> causal conv + SiLU -> SSD scan (+ D skip) -> gated group RMSNorm -> out_proj
    *  Attention     GQA, no positional encoding (NoPE), causal SDPA, KV cache
    E  LatentMoE     fp32 sigmoid router on the full width, group-limited top-k with a selection-only bias,
                     experts in the latent space (fc1 -> experts -> fc2), shared expert at full width
    -  MLP           down(relu(up(x))^2)
Kernels (SSD, conv, experts, attention, loss) live in `hybridmoe.kernels`, each beside its reference twin.

Shape legend: b batch, t time, d hidden, v vocab.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cache import HybridCache, KVState
from .config import HybridMoEConfig
from .kernels.activations import relu_squared
from .kernels.attention import attention
from .kernels.linear import Linear, matmul_dtype
from .kernels.loss import IGNORE_INDEX, linear_cross_entropy
from .kernels.moe import count_per_expert, experts_grouped
from .kernels.norm import gated_rms_norm
from .kernels.ssd import causal_conv1d, causal_conv1d_step, conv_window, ssd_chunked, ssd_step
from .utils import eager_under_compile


class ForwardContext:
    """What every layer of one forward pass needs to know besides its input.

    A plain class on purpose, not a dataclass: FSDP2's forward hooks rebuild dataclass and list arguments, which
    would hand each sharded block a copy and lose the aux losses the MoE layers append."""

    def __init__(
        self,
        start: int = 0,  # tokens already in the cache (absolute position of the first input token)
        cache: HybridCache | None = None,
        document_ids: torch.Tensor | None = None,  # (b, t) packed-document ids, contiguous runs
        pad_mask: torch.Tensor | None = None,  # (b, t) True for real tokens of this forward (left padding)
        key_valid: torch.Tensor | None = None,  # (b, start + t) True for real tokens among all keys
        aux_losses: list[torch.Tensor] | None = None,  # filled by MoE layers in training
        cp=None,  # context parallelism (`distributed.cp.Shard`): this rank's shard of the sequences
    ):
        self.start, self.cache, self.document_ids = start, cache, document_ids
        self.pad_mask, self.key_valid = pad_mask, key_valid
        self.aux_losses = [] if aux_losses is None else aux_losses
        self.cp = cp


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None = None  # (b, t, v) fp32, or (b, logits_to_keep, v)
    loss: torch.Tensor | None = None  # lm_loss + mtp_loss_weight * mtp_loss + router_aux_loss_coef * aux_loss
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None  # mean over depths
    aux_loss: torch.Tensor | None = None  # sequence-level balancing loss, mean over MoE layers
    cache: HybridCache | None = None
    hidden_states: torch.Tensor | None = None  # final-normed hidden states (b, t, d)
    mtp_hidden_states: list[torch.Tensor] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, weight applied in fp32, result cast back (as transformers' NemotronHRMSNorm)."""

    _no_weight_decay = ("weight",)

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) over `size / group_size` groups, in fp32 (Mamba-2's norm_before_gate=False)."""

    _no_weight_decay = ("weight",)

    def __init__(self, size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y, z, out_dtype: torch.dtype | None = None):
        """fp32, or `out_dtype` (written directly by the fused kernel on CUDA, `kernels.norm`)."""
        return gated_rms_norm(y, z, _local(self.weight), self.group_size, self.eps, out_dtype=out_dtype)


# ---------------------------------------------------------------------------------------------- Mamba-2


class Mamba2Mixer(nn.Module):
    _no_weight_decay = ("A_log", "D", "dt_bias")

    def __init__(self, config: HybridMoEConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = c.mamba_num_heads, c.mamba_head_dim
        self.n_groups, self.state_size = c.n_groups, c.ssm_state_size
        self.intermediate_size, self.conv_dim = c.mamba_intermediate_size, c.mamba_conv_dim
        self.chunk_size = c.chunk_size
        # dt = clamp(softplus(dt + dt_bias), time_step_limit), as state-spaces/mamba's Mamba2 passes
        # dt_limit=self.dt_limit to its scan kernels (and transformers' NemotronHMamba2Mixer from 5.25.0 on);
        # time_step_min/max only bound the initialization of dt_bias.
        self.dt_limit = c.time_step_limit
        self.in_proj = Linear(c.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, bias=c.use_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, c.conv_kernel, groups=self.conv_dim, padding=c.conv_kernel - 1,
            bias=c.use_conv_bias,
        )  # fmt: skip
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(self.intermediate_size, self.intermediate_size // self.n_groups, c.layer_norm_epsilon)
        self.out_proj = Linear(self.intermediate_size, c.hidden_size, bias=c.use_bias)

    def forward(self, x_btd, ctx: ForwardContext):
        b, t, _ = x_btd.shape
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.state_size
        state = ctx.cache.layers[self.layer_idx] if ctx.cache is not None else None
        if ctx.pad_mask is not None:  # padding contributes nothing to the conv window or the state
            x_btd = x_btd * ctx.pad_mask[..., None].to(x_btd.dtype)
        z, xBC, dt = self.in_proj(x_btd).split([self.intermediate_size, self.conv_dim, H], dim=-1)
        # under tensor parallelism these are this rank's heads and channels (`distributed.tp`)
        A = -torch.exp(_local(self.A_log).float())
        conv_w, conv_b = _local(self.conv1d.weight).squeeze(1), _local(self.conv1d.bias)  # (conv_dim, k)
        D, dt_bias = _local(self.D), _local(self.dt_bias)

        if state is not None and ctx.start > 0 and t == 1:  # decode: one recurrent step
            xBC = F.silu(causal_conv1d_step(state.conv, xBC[:, 0], conv_w, conv_b))
            xs, Bs, Cs = xBC.split([self.intermediate_size, G * N, G * N], dim=-1)
            y = ssd_step(
                state.ssm, xs.view(b, H, P), dt[:, 0], A, Bs.view(b, G, N), Cs.view(b, G, N), D,
                dt_bias=dt_bias, dt_softplus=True, dt_limit=self.dt_limit,
            )  # fmt: skip
            y = y.view(b, 1, self.intermediate_size)
        else:
            resume = state is not None and ctx.start > 0
            conv_init = state.conv if resume else None
            if state is not None:  # the window the next step starts from (read before the conv uses conv_init)
                next_window = conv_window(conv_init, xBC, state.conv.shape[1])
            if ctx.cp is not None:  # the previous shard's last inputs come first (`distributed.cp`)
                xBC = ctx.cp.causal_conv(xBC, conv_w, conv_b, ctx.document_ids)
            else:
                xBC = causal_conv1d(xBC, conv_w, conv_b, ctx.document_ids, conv_init, activation="silu")
            if state is not None:
                state.conv.copy_(next_window)
            if ctx.pad_mask is not None:
                xBC = xBC * ctx.pad_mask[..., None]
            xs, Bs, Cs = xBC.split([self.intermediate_size, G * N, G * N], dim=-1)
            scan = {"initial_state": state.ssm if resume else None} if ctx.cp is None else {}
            y, final_state = (ssd_chunked if ctx.cp is None else ctx.cp.ssd)(
                xs.reshape(b, t, H, P), dt, A, Bs.reshape(b, t, G, N), Cs.reshape(b, t, G, N), D,
                chunk_size=self.chunk_size, seq_idx=ctx.document_ids, dt_bias=dt_bias, dt_softplus=True,
                dt_limit=self.dt_limit, **scan,
            )  # fmt: skip
            if state is not None:
                state.ssm.copy_(final_state)
            y = y.reshape(b, t, self.intermediate_size)
        return self.out_proj(self.norm(y, z, out_dtype=x_btd.dtype))


# ---------------------------------------------------------------------------------------------- attention


class Attention(nn.Module):
    def __init__(self, config: HybridMoEConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x_btd, ctx: ForwardContext):
        b, t, _ = x_btd.shape
        q = self.q_proj(x_btd).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_btd).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_btd).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if ctx.cache is not None:
            state: KVState = ctx.cache.layers[self.layer_idx]
            k, v = state.update(ctx.start, k, v)
        cdt = matmul_dtype(q)
        if ctx.cp is not None:  # the keys of the whole context-parallel group (`distributed.cp`)
            o = ctx.cp.attention(q.to(cdt), k.to(cdt), v.to(cdt))
        else:
            o = attention(
                q.to(cdt), k.to(cdt), v.to(cdt), q_offset=ctx.start, document_ids=ctx.document_ids,
                key_valid=ctx.key_valid,
            )  # fmt: skip
        return self.o_proj(o.to(x_btd.dtype).transpose(1, 2).reshape(b, t, -1))


# ---------------------------------------------------------------------------------------------- MoE and MLP


class MLP(nn.Module):
    def __init__(self, config: HybridMoEConfig, intermediate_size: int, layer_idx: int | None = None):
        super().__init__()
        self.up_proj = Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = Linear(intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x, ctx: ForwardContext | None = None):
        return self.down_proj(relu_squared(self.up_proj(x)))


class TopkRouter(nn.Module):
    """Sigmoid router (fp32, full width). Selection: scores + e_score_correction_bias, group-limited (a group is
    scored by the sum of its top-2 biased scores; keep topk_group groups), then top-k. Weights: the unbiased
    scores of the chosen experts, renormalized to sum 1 (norm_topk_prob), times routed_scaling_factor."""

    def __init__(self, config: HybridMoEConfig):
        super().__init__()
        c = config
        self.top_k, self.num_experts = c.num_experts_per_tok, c.n_routed_experts
        self.n_group, self.topk_group = c.n_group, c.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, c.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # Like transformers' _keep_in_fp32_modules_strict: the router stays fp32 whatever the model dtype.
        super()._apply(fn, recurse)
        if self.weight.dtype != torch.float32:
            self.weight.data = self.weight.data.float()
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x_TD):
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = logits_TE.sigmoid()
        choice_TE = scores_TE + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = choice_TE.view(-1, self.n_group, self.num_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (T, n_group)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1, sorted=False).indices, True)
            choice_TE = grouped.masked_fill(~keep[..., None], -torch.inf).view_as(choice_TE)
        topk_idx_TK = choice_TE.topk(self.top_k, dim=-1, sorted=False).indices
        topk_w_TK = scores_TE.gather(1, topk_idx_TK)
        if self.norm_topk_prob:
            topk_w_TK = topk_w_TK / (topk_w_TK.sum(-1, keepdim=True) + 1e-20)
        return scores_TE, topk_w_TK * self.routed_scaling_factor, topk_idx_TK


class Experts(nn.Module):
    """Routed experts as 3D weights: up_proj (e, i, d_in), down_proj (e, d_in, i), d_in = latent or hidden."""

    def __init__(self, config: HybridMoEConfig):
        super().__init__()
        e, i, d = config.n_routed_experts, config.moe_intermediate_size, config.moe_input_size
        self.up_proj = nn.Parameter(torch.empty(e, i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))
        # Expert parallelism (`hybridmoe.distributed.parallelize`): the weights become DTensors sharded over the
        # ranks of this group by expert, and the tokens travel to their experts with all-to-alls. A local expert's
        # gradient then sums the contributions of the tokens of all ep ranks, while data parallelism averages over
        # ranks: it is multiplied by grad_scale here (`Parallel.expert_grad_scale`) and averaged by FSDP there.
        self.ep_group = None
        self.grad_scale = 1.0
        # Emulated low-precision GEMMs (`hybridmoe.quant.training.apply_precision`): None, or a callable
        # quant(x, weight, bias) each expert's up and down GEMM goes through.
        self.quant = None

    def forward(self, x_TD, topk_idx_TK, topk_w_TK):
        up, down = self.up_proj, self.down_proj
        if self.ep_group is not None:
            up, down = up.to_local(), down.to_local()
        if self.grad_scale != 1.0:
            up, down = _ScaleGrad.apply(up, self.grad_scale), _ScaleGrad.apply(down, self.grad_scale)
        return experts_grouped(x_TD, up, down, topk_idx_TK, topk_w_TK, ep_group=self.ep_group, quant=self.quant)


@eager_under_compile
def _add_aux_loss(ctx: ForwardContext, loss: torch.Tensor) -> None:
    """ctx.aux_losses.append(loss), outside torch.compile: a compiled block that appended to the list would be guarded
    on the list's length and compiled again for every MoE layer (the layers of one forward find 0, 1, 2, ... losses
    there). Under compilation this is one deliberate graph break per MoE layer."""
    ctx.aux_losses.append(loss)


class _SequenceSum(torch.autograd.Function):
    """Sum over the ranks holding the other tokens of the same sequences. Every rank then computes the same loss
    and backpropagates it through its own tokens only, so the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by `scale`."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class LatentMoE(nn.Module):
    """out = fc2_latent_proj(sum_k w_k expert_k(fc1_latent_proj(x))) + shared_experts(x); the latent projections
    are absent (identity) when moe_latent_size is None."""

    def __init__(self, config: HybridMoEConfig, layer_idx: int | None = None):
        super().__init__()
        c = config
        self.gate = TopkRouter(c)
        self.experts = Experts(c)
        self.shared_experts = MLP(c, c.moe_shared_expert_intermediate_size)
        self.fc1_latent_proj = self.fc2_latent_proj = None
        if c.moe_latent_size is not None:
            self.fc1_latent_proj = Linear(c.hidden_size, c.moe_latent_size, bias=c.mlp_bias)
            self.fc2_latent_proj = Linear(c.moe_latent_size, c.hidden_size, bias=c.mlp_bias)
        self.aux_loss_coef = c.router_aux_loss_coef
        # Tensor parallelism (`distributed.tp`): the group whose ranks hold the other tokens of the same sequences
        self.sequence_group = None
        # Tokens routed to each expert since the trainer last read them, for the aux-loss-free bias update
        # (int64, so casting the model to bf16 leaves the counts exact).
        self.register_buffer("tokens_per_expert", torch.zeros(c.n_routed_experts, dtype=torch.long), persistent=False)

    def forward(self, x_btd, ctx: ForwardContext | None = None):
        b, t, d = x_btd.shape
        x_TD = x_btd.reshape(-1, d)
        scores_TE, topk_w_TK, topk_idx_TK = self.gate(x_TD)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += count_per_expert(topk_idx_TK.flatten(), scores_TE.shape[1])
            if self.aux_loss_coef > 0 and ctx is not None:
                aux_loss = self._sequence_aux_loss(scores_TE.view(b, t, -1), topk_idx_TK.view(b, t, -1), ctx.cp)
                _add_aux_loss(ctx, aux_loss)
        h = self.fc1_latent_proj(x_TD) if self.fc1_latent_proj is not None else x_TD
        h = self.experts(h, topk_idx_TK, topk_w_TK)
        h = self.fc2_latent_proj(h) if self.fc2_latent_proj is not None else h
        return h.view(b, t, d) + self.shared_experts(x_btd)

    def _sequence_aux_loss(self, scores_bte, topk_idx_btk, cp=None):
        """E * sum_i f_i P_i per sequence, averaged over sequences: f_i the fraction of the sequence's token
        copies sent to expert i, P_i its mean normalized score (DeepSeek-V3's sequence-wise balance loss)."""
        b, t, e = scores_bte.shape
        k = topk_idx_btk.shape[-1]
        counts = torch.zeros(b, e, device=scores_bte.device).scatter_add_(
            1, topk_idx_btk.reshape(b, -1), torch.ones(b, t * k, device=scores_bte.device)
        )
        normalized = scores_bte / scores_bte.sum(-1, keepdim=True)
        if self.sequence_group is None and cp is None:
            P = normalized.mean(1)
        else:  # this rank holds t of each sequence's tokens: sum over the ranks holding the others
            P = normalized.sum(1)
            if self.sequence_group is not None:
                t = t * torch.distributed.get_world_size(self.sequence_group)
                counts, P = _SequenceSum.apply(counts, self.sequence_group), _SequenceSum.apply(P, self.sequence_group)
            if cp is not None:  # context parallelism: every rank's loss is backpropagated (`distributed.cp`)
                t = t * cp.size
                counts, P = cp.sum(counts), cp.sum(P)
            P = P / t
        f = counts / (t * k)
        return e * (f * P).sum(-1).mean()


MIXERS = {"M": Mamba2Mixer, "*": Attention, "E": LatentMoE}


class Block(nn.Module):
    """x + mixer(norm(x)). MTP blocks also carry enorm/hnorm/eh_proj (first block of an MTP layer) and
    final_layernorm (last block), as in the published checkpoint layout."""

    def __init__(self, config: HybridMoEConfig, layer_idx: int, symbol: str, mtp_first=False, mtp_last=False):
        super().__init__()
        self.symbol = symbol
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        if symbol == "-":
            self.mixer = MLP(config, config.intermediate_size)
        else:
            self.mixer = MIXERS[symbol](config, layer_idx)
        if mtp_first:
            self.enorm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
            self.hnorm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
            self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        if mtp_last:
            self.final_layernorm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, x, ctx: ForwardContext):
        return x + self.mixer(self.norm(x), ctx)

    def mtp_input(self, emb_btd, h_btd):
        """The input of the MTP layer this block opens: eh_proj([enorm(emb(next tokens)), hnorm(h)]) (2d -> d), h the
        previous depth's hidden state (the MTP module of the DeepSeek-V3 technical report, 2024, section 2.2, with the
        embedding first as in the Nemotron 3 checkpoints). Used by `forward_mtp` and `serve.speculative`'s drafts."""
        return self.eh_proj(torch.cat([self.enorm(emb_btd), self.hnorm(h_btd)], dim=-1))


class HybridMoEModel(nn.Module):
    """The backbone: embeddings, the layer stack, the final norm (checkpoint prefix `backbone.`)."""

    def __init__(self, config: HybridMoEConfig):
        super().__init__()
        # (an explicit empty weight skips nn.Embedding's own init, which is slow on the meta device)
        self.embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(
            [Block(config, i, symbol) for i, symbol in enumerate(config.hybrid_override_pattern)]
        )
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.gradient_checkpointing = False  # recompute each layer in backward instead of keeping its activations

    def forward(self, input_ids, ctx: ForwardContext):
        h = self.embeddings(input_ids)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, ctx, use_reentrant=False)
            else:
                h = layer(h, ctx)
        return self.norm_f(h)


class HybridMoEForCausalLM(nn.Module):
    """Backbone + untied lm_head (+ MTP layers). Build with `HybridMoEForCausalLM(config)` (initialized) or
    `HybridMoEForCausalLM(config, device="meta")` (shapes only; then `to_empty(device=...)` and `init_weights()`).
    Without `device`, torch's default device: `with torch.device("meta"): HybridMoEForCausalLM(config)` works too."""

    def __init__(self, config: HybridMoEConfig, device: torch.device | str | None = None, dtype=None):
        super().__init__()
        self.config = config
        # Tensor parallelism (`distributed.tp.VocabParallelLoss`): the sequence gather and the vocab-parallel loss
        self.tensor_parallel = None
        # Context parallelism (`distributed.cp.ContextParallel`): this rank's shard of every sequence
        self.context_parallel = None
        device = torch.device(device) if device is not None else torch.get_default_device()
        with device:
            self.backbone = HybridMoEModel(config)
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
            self.mtp = None
            if config.num_nextn_predict_layers:
                pattern = config.mtp_hybrid_override_pattern
                n = len(pattern)
                blocks = []
                for layer in range(config.num_nextn_predict_layers):
                    for j, symbol in enumerate(pattern):
                        blocks.append(
                            Block(config, config.num_hidden_layers + layer * n + j, symbol, j == 0, j == n - 1)
                        )
                self.mtp = nn.Module()
                self.mtp.layers = nn.ModuleList(blocks)
            if device.type != "meta":
                self.init_weights()
        if dtype is not None:
            self.to(dtype)

    # ------------------------------------------------------------------ initialization
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Megatron / Nemotron 3 init: N(0, std) for linears and embeddings, N(0, std / sqrt(num_layers)) for the
        projections that write into the residual stream; Mamba A_log = log U(1, 16), D = 1,
        dt_bias = softplus^-1(dt) with dt log-uniform in [time_step_min, time_step_max] floored at time_step_floor."""
        c = self.config
        std = c.initializer_range
        out_std = std / math.sqrt(c.num_hidden_layers) if c.rescale_prenorm_residual else std
        residual_writers = ("o_proj", "out_proj", "down_proj", "fc2_latent_proj")
        for name, module in self.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, out_std if leaf in residual_writers else std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, (RMSNorm, GatedRMSNorm)):
                module.weight.fill_(1.0)
            elif isinstance(module, TopkRouter):
                module.weight.normal_(0.0, std, generator=generator)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, Experts):
                module.up_proj.normal_(0.0, std, generator=generator)
                module.down_proj.normal_(0.0, out_std, generator=generator)
            elif isinstance(module, LatentMoE):
                module.tokens_per_expert.zero_()
            elif isinstance(module, Mamba2Mixer):
                h = module.num_heads
                module.A_log.copy_(torch.log(torch.empty(h).uniform_(1.0, 16.0, generator=generator)))
                module.D.fill_(1.0)
                lo, hi = math.log(c.time_step_min), math.log(c.time_step_max)
                dt = torch.exp(torch.empty(h).uniform_(lo, hi, generator=generator)).clamp(min=c.time_step_floor)
                module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
                conv = module.conv1d
                bound = 1.0 / math.sqrt(conv.weight.shape[1] * conv.weight.shape[2])  # kaiming_uniform(a=sqrt(5))
                conv.weight.uniform_(-bound, bound, generator=generator)
                if conv.bias is not None:
                    conv.bias.uniform_(-bound, bound, generator=generator)

    def no_weight_decay_parameter_names(self) -> set[str]:
        """Parameters trained without weight decay: norms, biases, A_log, D, dt_bias (tagged where defined)."""
        names = set()
        for mod_name, module in self.named_modules():
            tagged = getattr(module, "_no_weight_decay", ())
            for p_name, _ in module.named_parameters(recurse=False):
                if p_name in tagged or p_name == "bias":
                    names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
        return names

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_logits: bool = True,
        loss_weights: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids (b, t). labels (b, t), unshifted, -100 = ignore. document_ids (b, t): packed documents never
        share state or attention. cache: a HybridCache, advanced by t. attention_mask (b, cache.seq_len + t): 1 for
        real tokens, 0 for left padding. logits_to_keep > 0: logits of the last positions only.
        return_logits=False with labels: the loss is computed in chunks and no (b, t, v) tensor is formed.
        loss_weights (b, t), aligned with labels: each loss (the LM loss and every MTP depth, whose targets are the
        labels shifted further) becomes the weighted sum over its targets, sum_j w_j * CE_j, instead of the mean;
        the caller normalizes (SFT: 1 / loss tokens of the global batch, or per conversation)."""
        ctx = self._context(input_ids, labels, document_ids, cache, attention_mask)
        if loss_weights is not None and (loss_weights.shape != input_ids.shape or not loss_weights.is_floating_point()):
            raise ValueError(
                f"loss_weights must be floats of shape {tuple(input_ids.shape)} (one per label), got "
                f"{tuple(loss_weights.shape)} {loss_weights.dtype}"
            )
        sharded = self.tensor_parallel is not None or self.context_parallel is not None
        if sharded and (return_logits or labels is None):
            raise ValueError("a tensor- or context-parallel model computes the loss only: pass labels and "
                             "return_logits=False")  # fmt: skip
        full_document_ids = ctx.document_ids
        if self.context_parallel is not None:  # this rank's shard; the loss shifts the full labels
            ctx.cp = self.context_parallel.begin(ctx, input_ids.shape[1], self.config.conv_kernel)
            ctx.document_ids = ctx.cp.local(ctx.document_ids)
        h = self.backbone(ctx.cp.local(input_ids) if ctx.cp is not None else input_ids, ctx)
        out = CausalLMOutput(cache=cache, hidden_states=h)
        if return_logits or labels is None:
            h_kept = h[:, -logits_to_keep:] if logits_to_keep else h
            out.logits = self.lm_head(h_kept).float()
        if labels is not None:
            if out.logits is not None and not logits_to_keep:
                out.lm_loss = self._loss_from_logits(out.logits, labels, shift=1, weights=loss_weights)
            else:
                out.lm_loss = self._loss_from_hidden(h, labels, shift=1, weights=loss_weights, cp=ctx.cp)
            out.loss = out.lm_loss
            if self.mtp is not None and self.config.mtp_loss_weight > 0:
                out.mtp_hidden_states = self.forward_mtp(h, input_ids, ctx)
                depth_losses = [
                    self._loss_from_hidden(
                        hk, labels, shift=k + 2, document_ids=full_document_ids, weights=loss_weights, cp=ctx.cp
                    )  # fmt: skip
                    for k, hk in enumerate(out.mtp_hidden_states)
                ]
                out.mtp_loss = torch.stack(depth_losses).mean()
                out.loss = out.loss + self.config.mtp_loss_weight * out.mtp_loss
            if ctx.aux_losses:  # training with router_aux_loss_coef > 0 (MTP MoE layers included)
                out.aux_loss = torch.stack(ctx.aux_losses).mean()
                out.loss = out.loss + self.config.router_aux_loss_coef * out.aux_loss
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        return out

    def forward_mtp(self, h_btd, input_ids, ctx: ForwardContext, shifted_embeddings=None) -> list[torch.Tensor]:
        """Multi-token prediction. Depth k (0-based) sees the hidden state of depth k-1 (the backbone's output for
        k = 0) and the embedding of token i+k+1, and predicts token i+k+2. MTP layer k % num_nextn_predict_layers
        serves depth k (Super/Ultra: one layer, two depths, shared weights). Returns each depth's final-normed
        hidden states (b, t, d); positions past the end see token 0 and their labels are ignored.
        shifted_embeddings(s): the embeddings of input_ids shifted left by s, for a caller without the embedding
        table (the last pipeline stage, `distributed.pp`); by default they are looked up here."""
        c = self.config
        n = len(c.mtp_hybrid_override_pattern)
        outs = []
        mtp_ctx = ForwardContext(
            document_ids=ctx.document_ids,
            pad_mask=ctx.pad_mask,
            key_valid=ctx.key_valid,
            aux_losses=ctx.aux_losses,
            cp=ctx.cp,
        )
        for depth in range(c.mtp_num_depths):
            blocks = self.mtp.layers[(depth % c.num_nextn_predict_layers) * n :][:n]
            if shifted_embeddings is None:
                ids = _shift_left(input_ids, depth + 1, fill=0)
                if ctx.cp is not None:
                    ids = ctx.cp.local(ids)
                emb = self.backbone.embeddings(ids)
            else:
                emb = shifted_embeddings(depth + 1)
            x = blocks[0].mtp_input(emb, h_btd)
            for block in blocks:
                x = block(x, mtp_ctx)
            h_btd = x
            outs.append(blocks[-1].final_layernorm(x))
        return outs

    def _loss_from_logits(self, logits, labels, shift, weights=None):
        y = _shift_left(labels, shift, fill=IGNORE_INDEX)
        if weights is not None:
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX,
                                 reduction="none")  # fmt: skip
            return (ce * _shift_left(weights, shift, fill=0).reshape(-1).float()).sum()
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX,
                                reduction="sum")  # fmt: skip
        return total / (y != IGNORE_INDEX).sum().clamp(min=1)

    def _loss_from_hidden(self, h, labels, shift, document_ids=None, weights=None, cp=None):
        y = _shift_left(labels, shift, fill=IGNORE_INDEX)
        if document_ids is not None:  # no target from another packed document
            y = torch.where(_shift_left(document_ids, shift, fill=-1) == document_ids, y, IGNORE_INDEX)
        if cp is not None:  # h holds this rank's shard of the sequences
            y = cp.local(y)
            weights = cp.local(_shift_left(weights, shift, fill=0)) if weights is not None else None
            shift = 0
        loss_fn = linear_cross_entropy
        if self.tensor_parallel is not None:  # h holds this rank's tokens, lm_head this rank's vocabulary slice
            h, loss_fn = self.tensor_parallel.gather_sequence(h), self.tensor_parallel.linear_cross_entropy
        h, y = h.reshape(-1, h.shape[-1]), y.reshape(-1)
        if weights is not None:
            w = _shift_left(weights, shift, fill=0).reshape(-1)
            total = loss_fn(h, self.lm_head.weight, y, weights=w)  # sum_j w_j * CE_j, one pass, nothing read back
            return total * cp.size if cp is not None else total
        total = loss_fn(h, self.lm_head.weight, y)
        if cp is not None:
            return cp.normalize(total, (y != IGNORE_INDEX).sum())
        return total / (y != IGNORE_INDEX).sum().clamp(min=1)

    def _context(self, input_ids, labels, document_ids, cache, attention_mask) -> ForwardContext:
        """Check the inputs (clear errors, nothing clamped) and gather what the layers need."""
        c = self.config
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must hold integer token ids (int64 or int32), got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must have shape (batch, time), got {tuple(input_ids.shape)}"
                + ("; add a batch dimension with input_ids[None]" if input_ids.dim() == 1 else "")
            )
        b, t = input_ids.shape
        if b == 0 or t == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); pass at least one token")
        _check_ids("input_ids", input_ids, c.vocab_size)
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} differs from input_ids {tuple(input_ids.shape)}")
            if labels.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"labels must be int64 (or int32) token ids with -100 to ignore, got {labels.dtype}")
            _check_ids("labels", labels, c.vocab_size, allow=IGNORE_INDEX)
        start = cache.seq_len if cache is not None else 0
        if cache is not None and cache.batch_size != b:
            raise ValueError(f"cache holds {cache.batch_size} sequences but input_ids has batch size {b}")
        if document_ids is not None:
            if document_ids.shape != input_ids.shape or document_ids.dtype.is_floating_point:
                raise ValueError(
                    f"document_ids must be integers of shape {tuple(input_ids.shape)}, got "
                    f"{tuple(document_ids.shape)} {document_ids.dtype}"
                )
            if start > 0:
                raise ValueError("document_ids are for packed training sequences; they cannot continue a cache")
            # Ids only need to change at document starts: make them contiguous runs even if an id repeats.
            document_ids = F.pad((document_ids[:, 1:] != document_ids[:, :-1]).long().cumsum(1), (1, 0))
        pad_mask = key_valid = None
        if attention_mask is not None:
            if attention_mask.shape != (b, start + t):
                raise ValueError(
                    f"attention_mask must have shape (batch, cached + new tokens) = {(b, start + t)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            key_valid = attention_mask.bool()
            if bool(key_valid.all()):
                key_valid = None
            else:
                pad_mask = key_valid[:, start:]
        return ForwardContext(start, cache, document_ids, pad_mask, key_valid)

    # ------------------------------------------------------------------ conveniences
    def new_cache(self, batch_size: int, capacity: int = 256, include_mtp: bool = False) -> HybridCache:
        p = self.lm_head.weight
        return HybridCache(self.config, batch_size, capacity, p.dtype, p.device, include_mtp)

    def generate(self, input_ids, max_new_tokens: int = 32, **kwargs):
        from .generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu") -> HybridMoEForCausalLM:
        from .checkpoint import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path, max_shard_size: int | str = "5GB") -> None:
        from .checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size)

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters of the backbone + head, with MTP, and active per token (each MoE layer counting only
        top-k of its routed experts; embedding and head counted once each)."""
        total = mtp = inactive = 0
        for name, p in self.named_parameters():
            if name.startswith("mtp."):
                mtp += p.numel()
            else:
                total += p.numel()
        k, e = self.config.num_experts_per_tok, self.config.n_routed_experts
        for layer in self.backbone.layers:
            if layer.symbol == "E":
                experts = layer.mixer.experts
                inactive += (experts.up_proj.numel() + experts.down_proj.numel()) * (e - k) // e
        return {"total": total, "total_with_mtp": total + mtp, "active": total - inactive, "mtp": mtp}


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's part of a parameter split by tensor parallelism (a DTensor), or the tensor itself. (isinstance, not
    hasattr(t, "to_local"): torch.compile's Dynamo answers hasattr False for a DTensor parameter.) A DTensor exists only
    once torch.distributed.tensor is imported, which costs a second at start-up: this module leaves that to the
    distributed code."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return t.to_local() if dtensor is not None and isinstance(t, dtensor.DTensor) else t


def _shift_left(x: torch.Tensor, shift: int, fill: int) -> torch.Tensor:
    """x[:, shift:] padded on the right with `fill` back to x's length (all `fill` when shift >= length)."""
    shift = min(shift, x.shape[1])
    return F.pad(x[:, shift:], (0, shift), value=fill)


def _check_ids(name: str, ids: torch.Tensor, vocab_size: int, allow: int | None = None) -> None:
    """ValueError naming the first id outside [0, vocab_size). The check reads a flag back from the device: under
    torch.compile (a whole-model `torch.compile(model.forward)`) that would break the graph, so it is skipped there;
    the trainer's per-block compilation (`train.compile`) runs this forward, and the check, eagerly."""
    if torch.compiler.is_compiling() or (ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        return  # nor can a CUDA graph capture read a tensor back to the host
    bad = (ids < 0) | (ids >= vocab_size)
    if allow is not None:
        bad &= ids != allow
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}[{pos[0]}, {pos[1]}] = {int(ids[pos])} is outside the vocabulary [0, {vocab_size})"
            + (f" (and is not the ignore index {allow})" if allow is not None else "")
            + "; check the tokenizer matches the model's vocab_size"
        )
