"""Memory and FLOPs planner: what one training step of a preset needs per GPU under a parallel layout.

`hybridmoe plan --preset ultra-550b-a55b --gpus 1024 --gpu-memory 80 --seq 8192 [--dp --ep --tp --pp --cp]`

The model is this repository's own trainer, written out as formulas in the config's dimensions:

  - parameters, gradients and AdamW state: fp32 master weights, fp32 gradients and two fp32 moments
    (16 bytes per parameter), fully sharded (FSDP2 / ZeRO-3) over every rank of a pipeline stage: non-expert weights
    split by tensor parallelism and sharded over dp x cp, expert weights split by expert over ep and sharded over the
    rest (dp x cp x tp / ep). What hybridmoe's tensor parallelism leaves whole on every tp rank (the embedding, the
    norms between the mixers, the MoE router and latent projections, MTP's eh_proj; `distributed.tp`) is sharded
    over dp x cp only;
  - the FSDP working set: the gathered bf16 weights of the running block and the prefetched next one, and one
    block's unsharded gradients (bf16, plus the fp32 copy reduce-scattered); experts count only when FSDP holds
    them (not when ep spans all the ranks of a stage);
  - activations: what autograd keeps for backward, per layer kind, read off `modeling.py` (each term names the
    tensor it is; tests/test_plan.py checks the sums against `saved_tensors_hooks` on real forwards). With
    activation checkpointing each block keeps only its input, and one block's activations are rebuilt in backward;
  - transients: the fused LM-loss chunk (two fp32 [rows x vocab] buffers: the logits and logsumexp's
    temporary), a block's backward working set (about six [tokens x hidden] fp32 buffers), and the MoE dispatch
    buffers of expert parallelism (token copies sent, received, computed and sent back);
  - the loss keeps fp32 dL/dh and dL/dW_head per LM head application (the main head and each MTP depth).

Layout rules (Megatron-style): gpus = dp x tp x pp x cp; expert parallelism borrows from dp x cp x tp within a
pipeline stage; tensor parallelism uses sequence parallelism, so every activation is divided by tp, except the
mixers' all-gathered inputs (what their first matmul saves) and the vocabulary-parallel loss, which runs on the
gathered tokens of the micro-batch over vocab / tp; context parallelism divides the tokens by cp; a 1F1B pipeline
keeps (pp - stage) micro-batches of activations in flight.
hybridmoe implements dp x pp x cp x tp x ep (`hybridmoe.distributed`: FSDP2, 1F1B pipeline stages, context
parallelism, tensor + sequence parallelism, expert parallelism borrowing from dp x cp x tp) and bf16 mixed precision
over fp32 master weights, as the published recipes compose them. FLOPs per step follow
`accounting.flops_per_token` (MTP and recomputation excluded).

What is not modeled: the CUDA context, NCCL and cuBLAS workspaces and allocator fragmentation (`overhead_gib`, a
stated reserve), routing imbalance beyond `moe_imbalance`, and pipeline bubbles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .accounting import flops_per_token
from .config import HybridMoEConfig

GIB = 2**30
FP32 = 4


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    micro_batch: int = 1  # sequences per rank per micro-step
    checkpointing: bool = False  # full activation recomputation, one checkpoint per block

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def describe(self) -> str:
        s = f"dp {self.dp} x tp {self.tp} x pp {self.pp} x cp {self.cp}, ep {self.ep}, micro-batch {self.micro_batch}"
        return s + (", activation checkpointing" if self.checkpointing else "")


@dataclass
class Plan:
    """Bytes per GPU on the fullest pipeline stage, and FLOPs per step."""

    layout: Layout
    seq: int
    global_batch: int
    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    fsdp_buffers: float = 0.0
    activations: float = 0.0
    moe_dispatch: float = 0.0
    transient: float = 0.0
    overhead: float = 0.0
    stage: int = 0
    flops_per_step: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        parts = (self.params, self.grads, self.optimizer, self.fsdp_buffers, self.activations, self.moe_dispatch)
        return sum(parts) + self.transient + self.overhead

    def table(self) -> str:
        rows = [
            ("parameters (fp32 shards)", self.params),
            ("gradients (fp32 shards)", self.grads),
            ("optimizer state (AdamW, fp32)", self.optimizer),
            ("FSDP gathered weights and gradients", self.fsdp_buffers),
            ("activations kept for backward", self.activations),
            ("MoE dispatch buffers", self.moe_dispatch),
            ("transient peak (loss chunk / block backward)", self.transient),
            ("runtime reserve", self.overhead),
            ("total", self.total),
        ]
        return "\n".join(f"  {name:<46} {value / GIB:9.2f} GiB" for name, value in rows)


# ---------------------------------------------------------------------------------------------- activations


def _norm(t: float, d: int, a: int, output_kept: bool = True) -> float:
    """RMSNorm in fp32: its fp32 input (x itself when x is fp32), the rsqrt, the normalized fp32 tensor, and the
    cast output when the next op keeps it (a matmul does; the fused loss and a concatenation do not)."""
    return t * (d * (FP32 + FP32 + (a if output_kept else 0)) + FP32)


def layer_activation_bytes(c: HybridMoEConfig, symbol: str, batch: int, seq: int, a: int, tp: int = 1) -> float:
    """Bytes one block (norm + mixer) keeps for backward for `batch` sequences of `seq` tokens, activations of
    `a` bytes (4 fp32, 2 bf16; fp32 internals stay 4). Matches saved_tensors_hooks on the CPU fp32 path.
    tp > 1: `seq` is the rank's sequence-parallel share and the mixer's heads are split over tp; the mixer's first
    matmul keeps its input all-gathered over the tp ranks (tp x the norm's output; MoE: the shared expert's, while
    the router and the latent projection keep the local one)."""
    t, d = batch * seq, c.hidden_size
    out = _norm(t, d, a)
    if tp > 1:
        out += t * d * a * (tp if symbol == "E" else tp - 1)
    if symbol == "M":
        h, p, g, n, L, k = (
            c.mamba_num_heads,
            c.mamba_head_dim,
            c.n_groups,
            c.ssm_state_size,
            c.chunk_size,
            c.conv_kernel,
        )
        inner, conv = c.mamba_intermediate_size, c.mamba_conv_dim
        chunks = batch * math.ceil(seq / L)
        out += t * (inner + conv + h) * a  # in_proj output (z, xBC, dt)
        out += batch * (seq + k - 1) * conv * a  # the padded conv input
        out += t * conv * FP32  # conv output (pre-activation)
        out += t * h * 7 * FP32  # dt before/after softplus, dt * A and its cumulative sums
        out += t * h * L * 3.5 * FP32  # intra-chunk decay and C.B^T score matrices
        out += t * g * L * FP32 + 2 * t * g * n * FP32  # per-group C.B^T, chunked B and C
        out += chunks * h * p * n * FP32 + batch * h * (chunks / batch + 1) * p * n * FP32  # chunk states, carried
        out += t * inner * FP32 * 5 + t * g * FP32  # chunked x, gated norm (y, silu(z), product, normalized)
        out += t * inner * a  # out_proj input
    elif symbol == "*":
        # with fewer KV heads than tp ranks each rank computes the one KV head its query heads read (`distributed.tp`)
        nh, kv, hd = c.num_attention_heads, max(c.num_key_value_heads, tp), c.head_dim
        out += t * (2 * nh + 2 * kv) * hd * a + t * nh * FP32  # q, k, v, output; logsumexp
    elif symbol == "E":
        e, k, i, si = (
            c.n_routed_experts,
            c.num_experts_per_tok,
            c.moe_intermediate_size,
            c.moe_shared_expert_intermediate_size,
        )
        dl = c.moe_input_size
        m = t * k  # token copies
        out += t * e * FP32 + t * k * (8 + FP32) + 2 * t * FP32 + batch * e * FP32  # router scores, top-k, aux loss
        if a != FP32:
            out += t * d * FP32  # the router's fp32 input
        out += m * (2 * 8 + FP32) + m * i * a + m * dl * a  # order, token ids, weights; pre-activations; outputs
        if c.moe_latent_size is not None:
            # the experts' input (fc1_latent_proj's output; without a latent space it is the norm output, which the
            # shared expert saves anyway) and fc2_latent_proj's input
            out += 2 * t * dl * a
        out += 2 * t * si * a  # shared expert: up_proj output and its relu^2
    elif symbol == "-":
        out += 2 * t * c.intermediate_size * a
    else:
        raise ValueError(f"unknown layer symbol {symbol!r}")
    return out


def head_activation_bytes(c: HybridMoEConfig, batch: int, seq: int, a: int, vocab_shards: int = 1) -> float:
    """The final norm, the fused loss's saved dL/dh and dL/dW_head (fp32) and labels; per MTP depth also the
    embedding/hidden norms, the concatenation eh_proj reads, the MTP blocks and another loss. vocab_shards = tp:
    `seq` is the rank's sequence-parallel share; the vocabulary-parallel loss runs on the gathered tokens."""
    t, d = batch * seq, c.hidden_size
    rows = t * vocab_shards  # the loss's tokens: gathered along the sequence under tensor parallelism
    loss = rows * d * FP32 + c.vocab_size * d * FP32 / vocab_shards + rows * 8
    out = _norm(t, d, a, output_kept=False) + loss
    if c.num_nextn_predict_layers:
        pattern = c.mtp_hybrid_override_pattern
        per_depth = 3 * _norm(t, d, a, output_kept=False) + 2 * t * d * a + loss
        per_depth += sum(layer_activation_bytes(c, s, batch, seq, a, vocab_shards) for s in pattern)
        out += c.mtp_num_depths * per_depth
    return out


def loss_transient_bytes(c: HybridMoEConfig, tokens: float, vocab_shards: int = 1) -> float:
    """One chunk of the fused LM loss: its fp32 logits and logsumexp's temporary (two [rows x vocab]). tokens: what
    the loss runs on (under tensor parallelism the gathered tokens, each rank its vocab / vocab_shards columns);
    the chunk rule is `kernels.loss` / `distributed.tp.VocabParallelLoss`'s over the local vocabulary."""
    vocab = c.vocab_size // vocab_shards
    rows = min(tokens, max(256, min(2048, 2**26 // vocab)))
    return 2 * rows * vocab * FP32


def block_backward_bytes(c: HybridMoEConfig, tokens: float) -> float:
    """A block's backward working set beyond what it saved: gradients of its input, output and norm (fp32)."""
    return 6 * tokens * c.hidden_size * FP32


def moe_dispatch_bytes(c: HybridMoEConfig, tokens: float, a: int, imbalance: float) -> float:
    """Expert parallelism's all-to-all buffers of one MoE layer: the sorted copies sent, those received, the
    experts' output and what comes back ([copies x latent width] each)."""
    return 4 * tokens * c.num_experts_per_tok * c.moe_input_size * a * imbalance


# ---------------------------------------------------------------------------------------------- parameters


TP_WHOLE = ("norm.", "enorm.", "hnorm.", "final_layernorm.", "eh_proj.", "mixer.gate.", "mixer.fc1_latent_proj.",
            "mixer.fc2_latent_proj.")  # fmt: skip


def block_parameters(c: HybridMoEConfig) -> dict[str, tuple[int, int, int]]:
    """(non-expert, expert, tp-whole) parameter counts of one block of each kind, the embedding, the LM head and
    one MTP layer, counted on a meta-device model. tp-whole: the non-expert parameters that hybridmoe's tensor
    parallelism leaves whole on every tp rank (`distributed.tp.parallelize_native`: the norms between the mixers,
    MTP's enorm / hnorm / final_layernorm / eh_proj, the router and the latent projections, the embedding and the
    final norm; the Mamba mixer's own gated norm is split with its heads)."""
    from .modeling import HybridMoEForCausalLM

    model = HybridMoEForCausalLM(c.replace(num_nextn_predict_layers=min(c.num_nextn_predict_layers, 1)), device="meta")
    out: dict[str, tuple[int, int, int]] = {}

    def split(module) -> tuple[int, int, int]:
        expert = sum(p.numel() for n, p in module.named_parameters() if ".experts." in f".{n}")
        whole = sum(p.numel() for n, p in module.named_parameters() if n.startswith(TP_WHOLE))
        return sum(p.numel() for p in module.parameters()) - expert, expert, whole

    for layer in model.backbone.layers:
        out.setdefault(layer.symbol, split(layer))
    n = model.backbone.embeddings.weight.numel()
    out["embedding"] = (n, 0, n)
    n = model.backbone.norm_f.weight.numel()
    out["head"] = (model.lm_head.weight.numel() + n, 0, n)
    if model.mtp is not None:
        counts = [split(block) for block in model.mtp.layers]
        out["mtp"] = tuple(sum(x) * c.num_nextn_predict_layers for x in zip(*counts))
    return out


def split_stages(pattern: str, pp: int) -> list[str]:
    """Contiguous, near-equal pipeline stages of the layer pattern (the first stages take one more layer)."""
    if pp > len(pattern):
        raise ValueError(f"pp={pp} is more pipeline stages than the {len(pattern)} layers; use pp <= {len(pattern)}")
    size, extra = divmod(len(pattern), pp)
    stages, start = [], 0
    for s in range(pp):
        n = size + (1 if s < extra else 0)
        stages.append(pattern[start : start + n])
        start += n
    return stages


# ---------------------------------------------------------------------------------------------- the plan


def check_layout(c: HybridMoEConfig, layout: Layout, seq: int) -> None:
    """Clear errors for layouts the model cannot be split into."""
    L = layout
    for name in ("dp", "tp", "pp", "cp", "ep", "micro_batch"):
        if getattr(L, name) < 1:
            raise ValueError(f"{name}={getattr(L, name)}: must be >= 1")
    if c.n_routed_experts % L.ep:
        raise ValueError(f"ep={L.ep} does not divide the {c.n_routed_experts} experts; use a divisor of it")
    if (L.dp * L.cp * L.tp) % L.ep:
        raise ValueError(
            f"ep={L.ep} must divide dp x cp x tp = {L.dp * L.cp * L.tp} (experts are spread over the ranks of a "
            "pipeline stage); raise dp or lower ep"
        )
    for what, n in (("attention heads", c.num_attention_heads), ("Mamba heads", c.mamba_num_heads)):
        if n % L.tp:
            raise ValueError(f"tp={L.tp} does not divide the {n} {what}; use a divisor of it")
    if seq % L.cp:
        raise ValueError(f"cp={L.cp} does not divide the sequence length {seq}")
    split_stages(c.hybrid_override_pattern, L.pp)


def plan(
    c: HybridMoEConfig,
    layout: Layout,
    seq: int,
    global_batch: int | None = None,
    precision: str = "bf16",
    overhead_gib: float = 0.0,
    moe_imbalance: float = 1.0,
    params: dict[str, tuple[int, int, int]] | None = None,
    flops_per_tok: float | None = None,
) -> Plan:
    """Per-GPU memory of the fullest pipeline stage and FLOPs per step. precision: "bf16" (fp32 master weights,
    bf16 compute, as the GPU recipes) or "fp32" (everything fp32, as the CPU runs this is checked against)."""
    check_layout(c, layout, seq)
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision={precision!r}: use bf16 or fp32")
    L = layout
    a = 2 if precision == "bf16" else FP32
    global_batch = global_batch or L.dp * L.micro_batch * L.pp  # a 1F1B pipeline needs at least pp micro-batches
    if global_batch % (L.dp * L.micro_batch):
        raise ValueError(f"global batch {global_batch} is not a multiple of dp x micro_batch = {L.dp * L.micro_batch}")
    if global_batch // (L.dp * L.micro_batch) < L.pp:
        raise ValueError(
            f"global batch {global_batch} gives each data-parallel rank {global_batch // (L.dp * L.micro_batch)} "
            f"micro-batches of {L.micro_batch}: the 1F1B schedule needs at least pp = {L.pp}; raise the global batch"
        )
    params = params or block_parameters(c)
    stages = split_stages(c.hybrid_override_pattern, L.pp)
    stage_ranks = L.dp * L.tp * L.cp  # ranks holding one pipeline stage
    distributed = L.gpus > 1
    tokens = L.micro_batch * seq / L.cp / L.tp  # activation rows per rank (sequence parallel over tp)
    b, s = L.micro_batch, seq / L.cp / L.tp  # the formulas see `b` sequences of this many tokens

    act = {sym: layer_activation_bytes(c, sym, b, s, a, L.tp) for sym in set(c.hybrid_override_pattern)}
    head = head_activation_bytes(c, b, s, a, vocab_shards=L.tp)
    best = None
    for idx, pattern in enumerate(stages):
        first, last = idx == 0, idx == len(stages) - 1
        blocks = list(pattern)
        units = [params[sym] for sym in blocks]
        if first:
            units.append(params["embedding"])
        if last:
            units.append(params["head"])
            if "mtp" in params:
                units.append(params["mtp"])
        p = Plan(layout=L, seq=seq, global_batch=global_batch, stage=idx)
        # per rank: what tensor parallelism leaves whole over dp x cp, the rest (routed experts too) over the stage
        shard = sum((ne - w + ex) / stage_ranks + w / (L.dp * L.cp) for ne, ex, w in units)
        p.params, p.grads, p.optimizer = shard * FP32, shard * FP32, shard * 2 * FP32
        if distributed:  # gathered (compute-dtype) weights of the running and the next unit, one unit's gradients
            # experts split over all the stage's ranks stay out of FSDP: nothing of theirs is gathered
            gathered_experts = 0.0 if 1 < L.ep == stage_ranks else 1.0
            unit = max((ne - w) / L.tp + w + gathered_experts * ex / L.ep for ne, ex, w in units)
            p.fsdp_buffers = unit * (2 * a + a + FP32)
        # activations
        if L.checkpointing:
            kept = len(blocks) * tokens * c.hidden_size * a
        else:
            kept = sum(act[sym] for sym in blocks)
        if last:
            kept += head
        # 1F1B: stage idx runs pp - idx forwards before its first backward (fewer with fewer micro-batches)
        micro = global_batch // (L.dp * L.micro_batch)
        in_flight = L.pp - idx
        p.activations = kept * in_flight
        if 1 < in_flight == micro:
            # every micro-batch of the step is in flight at once: the peak is at the first backward, before any
            # gradient of the step exists (the previous step's were set to None); with more micro-batches than
            # that, the steady 1F1B phase holds the accumulated gradients as well
            p.grads = 0.0
        biggest = max(act[sym] for sym in blocks)
        backward = block_backward_bytes(c, tokens) + (biggest if L.checkpointing else 0)
        p.transient = max(backward, loss_transient_bytes(c, tokens * L.tp, L.tp) if last else 0)
        if "E" in blocks and L.ep > 1:
            p.moe_dispatch = moe_dispatch_bytes(c, tokens, a, moe_imbalance)
        p.overhead = overhead_gib * GIB
        if best is None or p.total > best.total:
            best = p
    best.flops_per_step = (flops_per_tok or flops_per_token(c, seq)) * seq * global_batch
    return best


def feasible_layouts(
    c: HybridMoEConfig,
    gpus: int,
    gpu_memory_gib: float,
    seq: int,
    global_batch: int | None = None,
    gpus_per_node: int = 8,
    overhead_gib: float = 4.0,
    moe_imbalance: float = 1.0,
    limit: int = 10,
    implemented_only: bool = False,
) -> list[Plan]:
    """Layouts of `gpus` GPUs that fit `gpu_memory_gib`, best first: no recomputation before recomputation, then
    the least model parallelism (tp within a node, then pp, then cp). For each (tp, pp, cp) the smallest expert
    parallelism that fits is kept (fewer ranks in each all-to-all). pp and cp are searched up to 16 and 32;
    implemented_only: only what hybridmoe's trainer runs today (dp x pp x cp x tp x ep; tp splitting the model's
    heads; pp at most the layers)."""
    found, params, flops = [], block_parameters(c), flops_per_token(c, seq)
    for tp in [x for x in (1, 2, 4, 8) if x <= gpus_per_node and (not implemented_only or _splits(c, x))]:
        pps = [x for x in _divisors(gpus // tp) if x <= 16]
        if implemented_only:  # pipeline stages (`distributed.pp`): at least one layer each
            pps = [x for x in pps if x <= c.num_hidden_layers]
        for pp in pps:
            cps = [x for x in _divisors(gpus // (tp * pp)) if x <= 32 and seq % x == 0 and seq // x >= 1024]
            for cp in cps or [1]:
                dp = gpus // (tp * pp * cp)
                if dp * tp * pp * cp != gpus:
                    continue
                if global_batch and global_batch % dp:
                    continue
                for ckpt in (False, True):
                    eps = [x for x in _divisors(c.n_routed_experts) if (dp * cp * tp) % x == 0]
                    for ep in eps:
                        layout = Layout(dp=dp, tp=tp, pp=pp, cp=cp, ep=ep, checkpointing=ckpt)
                        try:
                            p = plan(c, layout, seq, global_batch, "bf16", overhead_gib, moe_imbalance, params, flops)
                        except ValueError:
                            continue
                        if p.total <= gpu_memory_gib * GIB:
                            found.append(p)
                            break
    found.sort(key=lambda p: (p.layout.checkpointing, p.layout.tp * p.layout.pp * p.layout.cp, p.layout.pp,
                              p.layout.cp, p.total))  # fmt: skip
    return found[:limit]


def _splits(c: HybridMoEConfig, tp: int) -> bool:
    """Whether hybridmoe's tensor parallelism can split the model over tp ranks (`distributed.tp`)."""
    from .distributed.tp import check_divisible

    try:
        check_divisible(c, tp)
    except ValueError:
        return False
    return True


def _divisors(n: int) -> list[int]:
    return [x for x in range(1, n + 1) if n % x == 0]
