"""Find the MoE experts (and nemotron_h's Mamba mixers) of a transformers model and run them on hybridmoe's kernels.

Faithful to transformers v5's experts contract (`transformers/integrations/moe.py`, `use_experts_implementation`):
an experts module holds 3D expert weights and is called as `experts(hidden_states (t, d), top_k_index (t, k),
top_k_weights (t, k))`, returning the routing-weighted sum of its experts' outputs (t, d). Its router is a sibling
module whose weight has one row per expert. Every family's own layout and activation come from its modeling file
in `transformers/models/<family>/` (read against transformers 5.24):

  family       experts class       weights (stored)                                   activation
  qwen3_moe    Qwen3MoeExperts     gate_up_proj (e, 2i, d) [gate; up], down (e, d, i)  silu(gate) * up
  qwen2_moe    Qwen2MoeExperts     same                                               same
  mixtral      MixtralExperts      same                                               same
  olmoe        OlmoeExperts        same                                               same
  deepseek_v3  DeepseekV3Experts   same                                               same
  gpt_oss      GptOssExperts       gate_up_proj (e, d, 2i) interleaved + bias,        clamped swiglu
                                   down_proj (e, i, d) + bias
  nemotron_h   NemotronHExperts    up_proj (e, i, d), down_proj (e, d, i)             relu(u)^2

Only the forward computation is replaced, per module instance: the parameters, their names and shapes stay
transformers' own, so state dicts, `save_pretrained` and plain transformers loading are untouched. The experts then
run `hybridmoe.kernels.moe.experts_grouped` (sort by expert; on a CPU one matmul per expert segment with a
hand-written backward that saves only the sorted inputs and pre-activations; on a GPU torch._grouped_mm with no loop
over experts or rows on the host). nemotron_h's `NemotronHMamba2Mixer` runs its conv and scan on
`hybridmoe.kernels.ssd` (`causal_conv1d`, `ssd_chunked`) when called without a cache, i.e. in training and in
plain forward passes; with a cache (generation) it keeps transformers' forward.

In training with labels, the model's LM head and loss are fused (`kernels.loss.linear_cross_entropy`): the loss
of transformers' `ForCausalLMLoss` (with the router aux loss where the family adds it) without the [tokens x vocab]
logits, which the output then leaves as None; eval mode and calls without labels return transformers' logits.

Limits: an experts module under transformers' own expert parallelism (`_is_expert_parallel`) keeps transformers'
forward; an experts class outside the table is accelerated only when it declares transformers' standard layout
(fused [gate; up], not transposed, no biases, no post-expert norm, the default gate, SiLU); the Mamba mixers are left
alone where transformers would use the `mamba-ssm` CUDA kernels.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.linear import Linear, widen_bf16_on_cpu
from ..kernels.moe import ExpertActivation, ExpertLoRA, clamped_swiglu, experts_grouped
from ..kernels.ssd import causal_conv1d, ssd_chunked
from ..modeling import _ScaleGrad

log = logging.getLogger(__name__)

# Set on every module whose forward was replaced: what now runs it (also makes patching idempotent).
PATCHED_ATTR = "_hybridmoe_kernel"
# Set by `automodel.parallel.parallelize` on experts modules split over an expert-parallel process group.
EP_GROUP_ATTR = "_hybridmoe_ep_group"


# ---------------------------------------------------------------------------------------------- adapters


def _silu_gated(experts: nn.Module) -> ExpertActivation | str | None:
    from transformers.activations import SiLUActivation

    return "silu_gated" if isinstance(getattr(experts, "act_fn", None), (SiLUActivation, nn.SiLU)) else None


def _relu2(experts: nn.Module) -> ExpertActivation | str | None:
    from transformers.activations import ReLUSquaredActivation

    return "relu2" if isinstance(getattr(experts, "act_fn", None), ReLUSquaredActivation) else None


def _gpt_oss_swiglu(experts: nn.Module) -> ExpertActivation | str | None:
    return clamped_swiglu(alpha=float(experts.alpha), limit=float(experts.limit))


@dataclass(frozen=True)
class ExpertsAdapter:
    """How one family's experts module stores its weights and which activation it applies. `activation` reads the
    module (its act_fn, GPT-OSS's alpha and limit) and returns None when the module uses one we have no kernel for."""

    family: str
    experts_class: str
    activation: Callable[[nn.Module], ExpertActivation | str | None]
    up: str = "gate_up_proj"
    down: str = "down_proj"
    transposed: bool = False  # stored (e, in, out) instead of nn.Linear's (e, out, in)
    up_bias: str | None = None
    down_bias: str | None = None


ADAPTERS = {
    a.experts_class: a
    for a in (
        ExpertsAdapter("qwen3_moe", "Qwen3MoeExperts", _silu_gated),
        ExpertsAdapter("qwen2_moe", "Qwen2MoeExperts", _silu_gated),
        ExpertsAdapter("mixtral", "MixtralExperts", _silu_gated),
        ExpertsAdapter("olmoe", "OlmoeExperts", _silu_gated),
        ExpertsAdapter("deepseek_v3", "DeepseekV3Experts", _silu_gated),
        ExpertsAdapter(
            "gpt_oss",
            "GptOssExperts",
            _gpt_oss_swiglu,
            transposed=True,
            up_bias="gate_up_proj_bias",
            down_bias="down_proj_bias",
        ),  # fmt: skip
        ExpertsAdapter("nemotron_h", "NemotronHExperts", _relu2, up="up_proj"),
    )
}

# The Mamba-2 mixers whose forward `_mamba2_forward` reproduces (it reads their attribute names).
MAMBA_MIXERS = {"NemotronHMamba2Mixer": "nemotron_h"}


def _standard_adapter(experts: nn.Module, family: str) -> ExpertsAdapter | None:
    """An adapter for an experts class outside the table that declares, through transformers'
    `use_experts_implementation` flags, exactly the layout of the silu-gated families above."""
    from transformers.integrations.moe import _default_apply_gate

    standard = (
        getattr(experts, "has_gate", None) is True
        and getattr(experts, "has_bias", None) is False
        and getattr(experts, "is_transposed", None) is False
        and getattr(experts, "is_concatenated", None) is True
        and getattr(experts, "has_post_expert_norm", None) is False
        and getattr(type(experts), "_apply_gate", None) is _default_apply_gate
    )
    if not standard:
        return None
    return ExpertsAdapter(f"{family} (standard v5 experts)", type(experts).__name__, _silu_gated)


# ---------------------------------------------------------------------------------------------- detection


def _expert_weights(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}


def find_moe_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, experts module) of every MoE block: a module with a child holding 3D expert weights (at least
    two: up and down) and a sibling router whose 2D weight has one row per expert."""
    found = []
    for block_name, block in model.named_modules():
        children = dict(block.named_children())
        for name, child in children.items():
            weights = _expert_weights(child)
            if len(weights) < 2:
                continue
            num_experts = next(iter(weights.values())).shape[0]
            has_router = any(
                isinstance(getattr(other, "weight", None), torch.Tensor)
                and other.weight.dim() == 2
                and other.weight.shape[0] == num_experts
                for other_name, other in children.items()
                if other_name != name
            )
            if has_router:
                found.append((f"{block_name}.{name}" if block_name else name, child))
    return found


# ---------------------------------------------------------------------------------------------- report


@dataclass
class PatchReport:
    """What `patch_model` replaced, per family and kind, and what it left alone (with the reason)."""

    model: str
    replaced: Counter = field(default_factory=Counter)  # (family, what) -> modules
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.replaced:
            why = "" if self.skipped else " (no MoE experts with a router, no Mamba-2 mixers)"
            head = (
                f"hybridmoe.automodel: {self.model}: nothing accelerated{why}; it runs unchanged on transformers' "
                "implementation"
            )
        else:
            parts = ", ".join(f"{n} {what} ({family})" for (family, what), n in sorted(self.replaced.items()))
            head = f"hybridmoe.automodel: {self.model}: replaced the forward of {parts}"
            if any(what == "Mamba-2 mixers" for _, what in self.replaced):
                head += " (Mamba-2 mixers: forward passes without a cache; cached generation keeps transformers')"
        return head + "".join(f"; left alone: {s}" for s in self.skipped)


# ---------------------------------------------------------------------------------------------- patching


def patch_model(model: nn.Module) -> PatchReport:
    """Replace, in place, the forward of every MoE experts module (and nemotron_h Mamba-2 mixer) with hybridmoe's
    kernels; parameters are untouched. Logs and returns what was replaced. Calling it twice changes nothing more."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None) or type(model).__name__
    report = PatchReport(type(model).__name__)

    for name, experts in find_moe_experts(model):
        if hasattr(experts, PATCHED_ATTR):
            report.replaced[(_family_of(experts, family), "experts modules")] += 1
            continue
        adapter = ADAPTERS.get(type(experts).__name__) or _standard_adapter(experts, family)
        if adapter is None:
            report.skipped.append(f"{name} ({type(experts).__name__}: no adapter for this experts layout)")
            continue
        activation = adapter.activation(experts)
        if activation is None:
            act = type(getattr(experts, "act_fn", None)).__name__
            report.skipped.append(f"{name} ({type(experts).__name__}: no kernel for its activation {act})")
            continue
        experts.forward = types.MethodType(_experts_forward(adapter, activation), experts)
        setattr(experts, PATCHED_ATTR, (adapter.family, getattr(activation, "name", activation)))
        report.replaced[(adapter.family, "experts modules")] += 1

    mamba_ssm = importlib.util.find_spec("mamba_ssm") is not None
    for name, mixer in model.named_modules():
        mixer_family = MAMBA_MIXERS.get(type(mixer).__name__)
        if mixer_family is None:
            continue
        if hasattr(mixer, PATCHED_ATTR):
            report.replaced[(mixer_family, "Mamba-2 mixers")] += 1
        elif mamba_ssm:
            report.skipped.append(f"{name} (transformers runs mamba-ssm's kernels here)")
        elif getattr(mixer, "activation", None) != "silu":
            report.skipped.append(f"{name} (conv activation {getattr(mixer, 'activation', None)!r}, not silu)")
        else:
            mixer.forward = types.MethodType(_mamba2_forward, mixer)
            setattr(mixer, PATCHED_ATTR, (mixer_family, "mamba2"))
            report.replaced[(mixer_family, "Mamba-2 mixers")] += 1

    if report.replaced:
        why_not = _patch_lm_loss(model, family)
        if why_not is None:
            report.replaced[(family, "LM head + loss (fused in training)")] += 1
        else:
            report.skipped.append(f"the LM loss ({why_not})")

    # On a CPU without bf16 matmul units, bf16 GEMMs run several times slower than fp32 ones: the linear layers of
    # an accelerated model multiply widened operands instead (`kernels.linear`; exact products, fp32 accumulation,
    # bf16 saved for backward). A model with nothing else to accelerate stays untouched.
    if report.replaced and widen_bf16_on_cpu():
        for module in model.modules():
            if type(module) is nn.Linear:  # the same parameters and state dict; only the class's forward differs
                module.__class__ = Linear
                report.replaced[(family, "linear layers (bf16 matmuls widened to fp32 on this CPU)")] += 1

    (log.info if report.replaced else log.warning)(report.summary())
    return report


# ---------------------------------------------------------------------------------------------- fused LM loss

# Families whose `*ForCausalLM.forward` is: hidden = base model; logits = lm_head(hidden) (maybe `.float()`); loss =
# ForCausalLMLoss(logits, labels); plus, with output_router_logits, router_aux_loss_coef * aux_loss.
FUSED_LOSS_FAMILIES = {"qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss", "nemotron_h", "glm4_moe"}
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _patch_lm_loss(model: nn.Module, family: str) -> str | None:
    """In training with labels, compute the loss from the LM head's input without forming the [tokens x vocab]
    logits (`kernels.loss.linear_cross_entropy`, chunked on a CPU); returns None when patched, else why not."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    if hasattr(model, "_hybridmoe_fused_loss"):
        return None
    head = getattr(model, "lm_head", None)
    if family not in FUSED_LOSS_FAMILIES:
        return f"{family}: its LM head and loss are not known to be the standard ones"
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return "the LM head is not a linear layer without bias"
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return "the model's loss is not transformers' ForCausalLMLoss"
    config = model.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return "the logits are transformed after the LM head"
    # transformers' generate reads the forward's signature (logits_to_keep, cache support): keep the original one
    forward = functools.wraps(type(model).forward)(lambda self, *a, **kw: _fused_loss_forward(self, *a, **kw))
    model.forward = types.MethodType(forward, model)
    model._hybridmoe_fused_loss = True
    return None


def _fused_loss_forward(self, *args, labels=None, loss_weights=None, **kwargs):
    """transformers' forward, except in training with labels: then the LM head is skipped (its input comes back as
    the "logits"), the loss is the chunked fused cross-entropy over that input (logits rounded to the head's dtype,
    as transformers' bf16 head gives them; the mean over the labelled tokens, or the sum over `num_items_in_batch`,
    as `ForCausalLMLoss`), and the output's `logits` is None: no [tokens x vocab] tensor is formed. Eval mode, no
    labels, `logits_to_keep` or a LoRA-adapted head: transformers' forward unchanged.

    `loss_weights` (b, t), aligned with `labels` (hybridmoe's own argument, which the SFT stage's per-conversation
    normalization uses): the loss is the sum of each labelled token's loss times its weight, the weights carrying
    the normalization (no division, `num_items_in_batch` not used). Fused as above where it applies, from the
    logits otherwise."""
    from ..kernels.loss import linear_cross_entropy, weighted_cross_entropy

    head = self.lm_head
    if args:  # positional arguments (input_ids, attention_mask, ...) by their names in transformers' signature
        names = list(inspect.signature(type(self).forward).parameters)[1:]
        if len(args) > len(names) or any(n in kwargs for n in names[: len(args)]):
            if loss_weights is not None:
                raise TypeError("loss_weights: pass the model's other arguments by name")
            return type(self).forward(self, *args, labels=labels, **kwargs)
        kwargs.update(zip(names, args))
        labels = kwargs.pop("labels", labels)
    if loss_weights is not None:
        if labels is None or kwargs.get("shift_labels") is not None:
            raise ValueError("loss_weights weigh the loss of `labels` (aligned with them): pass labels, "
                             "not shift_labels")  # fmt: skip
        if loss_weights.shape != labels.shape:
            raise ValueError(f"loss_weights of shape {tuple(loss_weights.shape)}: give one per label, "
                             f"{tuple(labels.shape)}")  # fmt: skip
    fuse = (
        labels is not None
        and isinstance(head, nn.Linear)
        and "forward" not in vars(head)  # a LoRA-adapted head (its own forward) keeps transformers' path
        and self.training
        and torch.is_grad_enabled()
        and kwargs.get("logits_to_keep", 0) == 0
        and kwargs.get("return_dict", True) is not False
    )
    if not fuse and loss_weights is None:
        return type(self).forward(self, labels=labels, **kwargs)
    num_items = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    shift_labels = kwargs.pop("shift_labels", None)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    y = shift_labels.reshape(-1)
    if ignore_index != -100:
        y = torch.where(y == ignore_index, -100, y)
    w = None if loss_weights is None else F.pad(loss_weights, (0, 1))[..., 1:].reshape(-1)
    if not fuse:  # weighted, from the logits
        out = type(self).forward(self, labels=None, **kwargs)
        logits = out.logits
        loss = weighted_cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(logits.device), w.to(logits.device))
    else:
        self._modules["lm_head"] = nn.Identity()  # the forward returns the head's input as "logits"
        try:
            out = type(self).forward(self, labels=None, **kwargs)
        finally:
            self._modules["lm_head"] = head
        hidden = out.logits.to(head.weight.dtype)  # exact: a head that upcasts (`.float()`) only widened it
        y = y.to(hidden.device)
        # one chunk's fp32 logits within 32 MB on a CPU; on a GPU the kernel's default (a few large chunks, no sync)
        rows = max(128, 2**23 // head.weight.shape[0]) if hidden.device.type == "cpu" else None
        total = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, y, chunk_size=rows,
                                     logits_dtype=head.weight.dtype,
                                     weights=None if w is None else w.to(hidden.device))  # fmt: skip
        if w is not None:
            loss = total
        else:
            loss = total / (num_items if num_items is not None else (y != -100).sum())
        out = type(out)(**{k: v for k, v in out.items() if k != "logits"})
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + self.router_aux_loss_coef * out.aux_loss.to(loss.device)
    return type(out)(**{k: v for k, v in out.items() if k != "loss"}, loss=loss)


def _family_of(module: nn.Module, default: str) -> str:
    return getattr(module, PATCHED_ATTR, (default,))[0]


def _experts_forward(adapter: ExpertsAdapter, activation: ExpertActivation | str):
    """The replacement forward of one experts module (transformers' call signature)."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        lora = _expert_lora(self, adapter)
        if getattr(self, "_is_expert_parallel", False):  # transformers' EP marks foreign experts with sentinel ids
            if lora is not None:
                raise NotImplementedError("expert LoRA under transformers' own expert parallelism is not supported")
            return type(self).forward(self, hidden_states, top_k_index, top_k_weights)
        ep_group = getattr(self, EP_GROUP_ATTR, None)

        def local(p):  # under expert parallelism: this rank's experts (`automodel.parallel`)
            if ep_group is None:
                return p
            if not hasattr(p, "to_local"):
                raise ValueError(
                    "expert LoRA added after automodel.parallelize: its adapters are whole on every rank; call "
                    "apply_lora (or load_lora) before parallelize, so that they are split with their experts"
                )
            return _local_experts(p, ep_group)

        def weight(name):
            return local(getattr(self, name))

        if lora is not None and ep_group is not None:
            pair = lambda ab: None if ab is None else (local(ab[0]), local(ab[1]))  # noqa: E731
            lora = ExpertLoRA(up=pair(lora.up), down=pair(lora.down), scaling=lora.scaling)

        w_up, w_down = weight(adapter.up), weight(adapter.down)
        if adapter.transposed:
            w_up, w_down = w_up.transpose(1, 2), w_down.transpose(1, 2)  # views: (e, out, in) as the kernel reads
        return experts_grouped(
            hidden_states, w_up, w_down, top_k_index, top_k_weights, activation=activation,
            b_up_EU=weight(adapter.up_bias) if adapter.up_bias else None,
            b_down_ED=weight(adapter.down_bias) if adapter.down_bias else None, lora=lora, ep_group=ep_group,
        )  # fmt: skip

    return forward


def _local_experts(p: torch.Tensor, ep_group) -> torch.Tensor:
    """This rank's block of an expert-sharded DTensor parameter, differentiable, its gradient divided by the ep
    degree: it sums the tokens of every ep peer, while FSDP averages over the data-parallel ranks only."""
    return _ScaleGrad.apply(p.to_local(), 1.0 / torch.distributed.get_world_size(ep_group))


def _expert_lora(experts: nn.Module, adapter: ExpertsAdapter) -> ExpertLoRA | None:
    """The grouped LoRA that `hybridmoe.automodel.lora.apply_lora` attached to an experts module, if any: parameter
    dicts `lora_A` (A (e, r, in) per adapted 3D weight name) and `lora_B` (B (e, out, r)), in the kernel's (out, in)
    orientation whatever the weight's storage, and the float `lora_scaling`."""
    lora_A, lora_B = getattr(experts, "lora_A", None), getattr(experts, "lora_B", None)
    if not isinstance(lora_A, nn.ParameterDict):
        return None
    pair = lambda name: (lora_A[name], lora_B[name]) if name in lora_A else None  # noqa: E731
    return ExpertLoRA(up=pair(adapter.up), down=pair(adapter.down), scaling=experts.lora_scaling)


def _mamba2_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """transformers' `NemotronHMamba2Mixer.forward` without a cache, on hybridmoe's conv and chunked scan:
    in_proj -> (gate z, xBC, dt); xBC -> causal depthwise conv + SiLU; SSD scan with D skip and dt =
    clamp(softplus(dt + dt_bias), time_step_limit); gated RMSNorm with z; out_proj. Padding (the 2D
    `attention_mask`) is zeroed before the projection and after the conv, as transformers does. `seq_idx` (b, t),
    one id per packed document, keeps documents apart in the conv and the scan."""
    if cache is not None or (kwargs.get("cu_seqlens") is not None and kwargs.get("seq_idx") is None):
        return type(self).forward(self, hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    b, t, _ = hidden_states.shape
    dtype = hidden_states.dtype
    H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
    if attention_mask is not None:
        hidden_states = (hidden_states * attention_mask[:, :, None]).to(dtype)
    gate, xBC, dt = self.in_proj(hidden_states).split([self.intermediate_size, self.conv_dim, H], dim=-1)
    seq_idx = kwargs.get("seq_idx")
    xBC = causal_conv1d(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, seq_idx=seq_idx, activation="silu")
    if attention_mask is not None:
        xBC = xBC * attention_mask[:, :, None]
    x, B, C = xBC.split([self.intermediate_size, G * N, G * N], dim=-1)
    dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.time_step_limit)
    A = -torch.exp(self.A_log.float())
    y, _ = ssd_chunked(
        x.view(b, t, H, P), dt, A, B.view(b, t, G, N), C.view(b, t, G, N), self.D,
        chunk_size=self.chunk_size, seq_idx=seq_idx,
    )  # fmt: skip
    y = self.norm(y.reshape(b, t, -1), gate)
    return self.out_proj(y.to(dtype))
