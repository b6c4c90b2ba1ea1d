"""HybridMoEConfig: the one description of a hybrid Mamba-2 / attention / LatentMoE model.

Faithful to Hugging Face transformers' `NemotronHConfig` (model_type `nemotron_h`): field names and defaults are the
same, so a published `config.json` reads into this dataclass and writes back out in a form transformers loads.
The layer list is kept as the pattern string the published configs use (`hybrid_override_pattern`):

    M = Mamba-2 mixer   * = attention   E = (Latent)MoE   - = dense relu^2 MLP

What is read: the pattern as a string or as a list (`layers_block_type` / `layer_types`, with the old names
`mamba` / `attention` and the new `linear_attention` / `full_attention`), the legacy `mamba_*` aliases, the MTP
fields, and `time_step_limit` in any of the JSON spellings of infinity. Keys that do not change the model
(`use_cache`, `architectures`, ...) are accepted; any other key is kept in `extra` and written back unchanged, so
nothing in a config is silently lost.

Three fields are ours (transformers ignores them): `mtp_num_depths` (how many times the MTP layers are applied,
Super/Ultra: 2), `mtp_loss_weight` (total weight of the MTP loss) and `router_aux_loss_coef` (sequence-level
balancing loss).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

LAYER_SYMBOLS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
# Every name transformers has used for a layer type, old and new, mapped to our pattern symbol.
_LAYER_NAME_TO_SYMBOL = {
    "mamba": "M",
    "linear_attention": "M",
    "attention": "*",
    "full_attention": "*",
    "moe": "E",
    "mlp": "-",
}
# Legacy config keys (NVIDIA's remote code, transformers < 5.x) -> the field they mean now.
_LEGACY_ALIASES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "num_local_experts": "n_routed_experts",
}
# Keys of a nemotron_h config.json that describe the file or the runtime, not the model.
_RUNTIME_KEYS = {
    "architectures",
    "model_type",
    "auto_map",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "num_logits_to_keep",
    "use_mamba_kernels",
    "output_router_logits",
    "mamba_ssm_cache_dtype",
    "residual_in_fp32",
    "moe_shared_expert_overlap",
    "sliding_window",
    "_name_or_path",
    "name_or_path",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "problem_type",
    "id2label",
    "label2id",
    "tokenizer_class",
    "task_specific_params",
}


@dataclass
class HybridMoEConfig:
    # vocabulary and width
    vocab_size: int = 131072
    hidden_size: int = 4096
    hybrid_override_pattern: str = "ME*-"
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    max_position_embeddings: int = 4096  # nominal: there are no position embeddings (NoPE)
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # dense MLP layers ("-")
    intermediate_size: int = 21504
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    # Mamba-2
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    expand: int = 2  # nominal: only mamba_num_heads * mamba_head_dim matters
    chunk_size: int = 128
    mamba_hidden_act: str = "silu"
    use_conv_bias: bool = True
    use_bias: bool = False
    mamba_proj_bias: bool = False
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    # MoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0
    # multi-token prediction
    num_nextn_predict_layers: int = 0
    mtp_hybrid_override_pattern: str = "*E"
    mtp_num_depths: int | None = None  # None: one depth per MTP layer
    mtp_loss_weight: float = 0.3
    # norms and init
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    hidden_dropout: float = 0.0
    # anything else found in a config.json, written back unchanged
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.time_step_limit = tuple(_parse_float(v) for v in self.time_step_limit)
        if self.mtp_num_depths is None and self.num_nextn_predict_layers > 0:
            self.mtp_num_depths = self.num_nextn_predict_layers
        self.validate()

    # ------------------------------------------------------------------ derived quantities
    @property
    def num_hidden_layers(self) -> int:
        return len(self.hybrid_override_pattern)

    @property
    def layer_types(self) -> list[str]:
        """Our names for the layers: 'mamba', 'attention', 'moe', 'mlp'."""
        return [LAYER_SYMBOLS[s] for s in self.hybrid_override_pattern]

    @property
    def layers_block_type(self) -> list[str]:
        """transformers' current names for the layers."""
        new = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}
        return [new[s] for s in self.hybrid_override_pattern]

    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_intermediate_size + 2 * self.n_groups * self.ssm_state_size

    @property
    def moe_input_size(self) -> int:
        """Width the routed experts work in: the latent size for LatentMoE, else hidden_size."""
        return self.moe_latent_size if self.moe_latent_size is not None else self.hidden_size

    @property
    def num_mtp_blocks(self) -> int:
        return self.num_nextn_predict_layers * len(self.mtp_hybrid_override_pattern)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name: str, problem: str, fix: str) -> ValueError:
            return ValueError(f"HybridMoEConfig.{name}={getattr(self, name)!r}: {problem}. Fix: {fix}.")

        for name in ("hybrid_override_pattern", "mtp_hybrid_override_pattern"):
            pattern = getattr(self, name)
            if not isinstance(pattern, str) or not pattern:
                raise bad(name, "must be a non-empty string of layer symbols", "use e.g. 'MEM*E' (M, E, *, -)")
            unknown = sorted(set(pattern) - set(LAYER_SYMBOLS))
            if unknown:
                raise bad(
                    name,
                    f"unknown layer symbol(s) {unknown}",
                    "use only M (Mamba-2), * (attention), E (MoE) and - (dense MLP)",
                )
        positive = [
            "vocab_size",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "mamba_num_heads",
            "mamba_head_dim",
            "ssm_state_size",
            "n_groups",
            "conv_kernel",
            "chunk_size",
            "n_routed_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "moe_shared_expert_intermediate_size",
            "n_group",
            "topk_group",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(name, "must be a positive integer", f"set {name} to an integer >= 1")
        for name in ("initializer_range", "layer_norm_epsilon", "time_step_min", "time_step_max"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be > 0", f"set {name} to a positive number")
        if self.time_step_min > self.time_step_max:
            raise bad("time_step_min", f"is larger than time_step_max={self.time_step_max}", "swap them")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad(
                "num_key_value_heads",
                f"does not divide num_attention_heads={self.num_attention_heads} (grouped-query attention)",
                "choose num_key_value_heads among the divisors of num_attention_heads",
            )
        if self.mamba_num_heads % self.n_groups:
            raise bad(
                "n_groups",
                f"does not divide mamba_num_heads={self.mamba_num_heads} (each B/C group serves whole heads)",
                "choose n_groups among the divisors of mamba_num_heads",
            )
        if self.num_experts_per_tok > self.n_routed_experts:
            raise bad(
                "num_experts_per_tok",
                f"top-k is larger than the number of experts n_routed_experts={self.n_routed_experts}",
                "lower num_experts_per_tok or raise n_routed_experts",
            )
        if self.n_routed_experts % self.n_group:
            raise bad(
                "n_group",
                f"does not divide n_routed_experts={self.n_routed_experts}",
                "choose n_group among the divisors of n_routed_experts",
            )
        if self.n_routed_experts // self.n_group < 2:
            raise bad(
                "n_group",
                "leaves fewer than 2 experts per group (a group is scored by its top-2 experts)",
                "use fewer groups",
            )
        if self.topk_group > self.n_group:
            raise bad("topk_group", f"is larger than n_group={self.n_group}", "set topk_group <= n_group")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            raise bad(
                "num_experts_per_tok",
                f"exceeds the experts left in topk_group={self.topk_group} groups",
                "raise topk_group or lower num_experts_per_tok",
            )
        if self.moe_latent_size is not None:
            if not isinstance(self.moe_latent_size, int) or self.moe_latent_size <= 0:
                raise bad("moe_latent_size", "must be a positive integer or None", "use None for a plain MoE")
            if self.moe_latent_size >= self.hidden_size:
                raise bad(
                    "moe_latent_size",
                    f"is not smaller than hidden_size={self.hidden_size} (the latent space must be smaller)",
                    "use a latent size below hidden_size, or None for a plain MoE",
                )
        if not self.routed_scaling_factor > 0:
            raise bad("routed_scaling_factor", "must be > 0", "the published models use 1.0 to 5.0")
        if self.num_nextn_predict_layers < 0:
            raise bad("num_nextn_predict_layers", "must be >= 0", "use 0 to disable multi-token prediction")
        if self.num_nextn_predict_layers > 0 and (self.mtp_num_depths is None or self.mtp_num_depths < 1):
            raise bad("mtp_num_depths", "must be >= 1 when MTP layers exist", "use 1 or more")
        if self.mtp_loss_weight < 0 or self.router_aux_loss_coef < 0:
            raise ValueError("HybridMoEConfig: mtp_loss_weight and router_aux_loss_coef must be >= 0.")
        if self.mamba_hidden_act != "silu":
            raise bad("mamba_hidden_act", "only 'silu' is implemented (as in every nemotron_h model)", "use 'silu'")
        if self.mlp_hidden_act != "relu2":
            raise bad("mlp_hidden_act", "only 'relu2' is implemented (as in every nemotron_h model)", "use 'relu2'")
        if self.attention_bias:
            raise bad("attention_bias", "nemotron_h attention has no biases", "set attention_bias to false")
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", "nemotron_h keeps embedding and lm_head untied", "set it to false")
        if self.hidden_dropout or self.attention_dropout:
            raise ValueError(
                "HybridMoEConfig: dropout is not implemented; set hidden_dropout and attention_dropout to 0."
            )
        lo, hi = self.time_step_limit
        if not (0 <= lo <= hi):
            raise bad("time_step_limit", "must be (low, high) with 0 <= low <= high", "use (0.0, inf)")

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> HybridMoEConfig:
        from .presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}. Fix: use one of {sorted(PRESETS)}.")
        values = dict(PRESETS[name])
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown HybridMoEConfig field(s) {unknown} in overrides for preset {name!r}.")
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes) -> HybridMoEConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> HybridMoEConfig:
        d = dict(d)
        if d.get("model_type", "nemotron_h") != "nemotron_h":
            raise ValueError(
                f"config has model_type={d['model_type']!r}; HybridMoEConfig reads nemotron_h configs only."
            )
        for old, new in _LEGACY_ALIASES.items():
            if old in d:
                value = d.pop(old)
                d.setdefault(new, value)
        if "layer_types" in d:
            d.setdefault("layers_block_type", d.pop("layer_types"))
        pattern = _pattern_from(d, "layers_block_type", "hybrid_override_pattern")
        mtp_pattern = _pattern_from(d, "mtp_layers_block_type", "mtp_hybrid_override_pattern")
        num_layers = d.pop("num_hidden_layers", None)
        if pattern is None:
            pattern = cls.hybrid_override_pattern
        if num_layers is not None and num_layers != len(pattern):
            raise ValueError(
                f"config.json: num_hidden_layers={num_layers} but the layer pattern {pattern!r} has {len(pattern)} "
                "layers. Fix: make num_hidden_layers equal to the pattern's length (or drop it)."
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "hybrid_override_pattern"}
        kwargs: dict[str, Any] = {"hybrid_override_pattern": pattern, "extra": {}}
        if mtp_pattern is not None:
            kwargs["mtp_hybrid_override_pattern"] = mtp_pattern
        for key, value in d.items():
            if key in known:
                kwargs[key] = value
            elif key not in _RUNTIME_KEYS:
                kwargs["extra"][key] = value
        if "time_step_limit" in kwargs:
            kwargs["time_step_limit"] = tuple(_parse_float(v) for v in kwargs["time_step_limit"])
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"]}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            d[f.name] = value
        d["num_hidden_layers"] = self.num_hidden_layers
        # JSON has no infinity; python's json writes `Infinity`, which transformers' reader also accepts.
        d["time_step_limit"] = [float(v) for v in self.time_step_limit]
        d.update(self.extra)
        return d

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> HybridMoEConfig:
        file = os.path.join(path, "config.json") if os.path.isdir(path) else str(path)
        if not os.path.exists(file):
            raise ValueError(f"no config.json at {path!s}. Fix: pass a Hugging Face model directory.")
        with open(file) as fh:
            try:
                d = json.load(fh)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file} is not a JSON config ({e}). Fix: pass a Hugging Face config.json.") from None
        return cls.from_hf_dict(d)

    def save_pretrained(self, path: str | os.PathLike, dtype: str | None = None) -> None:
        from .utils import atomic_write_text

        d = self.to_hf_dict()
        if dtype is not None:
            d["dtype"] = dtype
        os.makedirs(path, exist_ok=True)
        atomic_write_text(os.path.join(path, "config.json"), json.dumps(d, indent=2, sort_keys=True) + "\n")

    def summary(self) -> str:
        return (
            f"{self.num_hidden_layers} layers {self.hybrid_override_pattern!r}, hidden {self.hidden_size}, "
            f"vocab {self.vocab_size}, experts {self.n_routed_experts} top-{self.num_experts_per_tok}"
            + (f" latent {self.moe_latent_size}" if self.moe_latent_size else "")
            + (f", MTP {self.num_nextn_predict_layers}x{self.mtp_num_depths}" if self.num_nextn_predict_layers else "")
        )


def _pattern_from(d: dict[str, Any], list_key: str, str_key: str) -> str | None:
    """Read a layer pattern given as a list of names (`list_key`) or a string (`str_key`); the list wins."""
    as_list = d.pop(list_key, None)
    as_str = d.pop(str_key, None)
    if as_list is not None:
        if isinstance(as_list, str):
            as_list = [as_list]
        unknown = sorted({name for name in as_list if name not in _LAYER_NAME_TO_SYMBOL})
        if unknown:
            raise ValueError(
                f"config.json: {list_key} has unknown layer type(s) {unknown}. "
                f"Fix: use {sorted(_LAYER_NAME_TO_SYMBOL)}."
            )
        return "".join(_LAYER_NAME_TO_SYMBOL[name] for name in as_list)
    return as_str


def _parse_float(value: Any) -> float:
    """Floats as transformers writes them, including {'__float__': 'Infinity'} and the string 'inf'."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    return float(value)
