"""LoRA for the Hugging Face MoE models hybridmoe runs: adapters on linear layers and grouped adapters on the experts.

Faithful to LoRA (Hu et al. 2021, eq. 3: h = W0 x + (alpha / r) B A x, A kaiming-uniform, B zero, so training starts
from the base model; only A and B train) as PEFT implements it, and to PEFT's adapter files (read against peft
0.21.2: `adapter_config.json` + `adapter_model.safetensors`), so that `peft.PeftModel.from_pretrained(plain
transformers model, directory)` loads what `save_lora` writes and `load_lora` loads what PEFT writes for these layers:

  what                 in the model                                   in the file (keys after `base_model.model.`)
  nn.Linear W (o, i)   children lora_A (r, i), lora_B (o, r);          <module>.lora_A.weight (r, i), .lora_B.weight
                       forward W x + b + scaling B A x                 (o, r): PEFT's `lora.Linear`
  expert weight        lora_A[name] A (E, r, in), lora_B[name]         PEFT's `lora.ParamWrapper` (`target_parameters`):
  (E, out, in)         B (E, out, r) on the experts module; the        <experts>.lora_A.weight (E*r, in), row e*r + j =
                       experts kernel adds scaling (x A[e]^T) B[e]^T   A[e, j]; .lora_B.weight (out, r*E), column
                       to each token copy of expert e                  j*E + e = B[e, :, j]

PEFT wraps each targeted weight of one module in its own ParamWrapper, nested in the order the module registers
its weights (the first innermost), so a weight's keys carry one `base_layer.` per targeted weight registered after
it: with both adapted, `<experts>.base_layer.lora_A.weight` belongs to gate_up_proj (up_proj for nemotron_h) and
`<experts>.lora_A.weight` to down_proj. PEFT takes (in, out) from the storage order, (e, out, in) unless the
experts module says `is_transposed` (GPT-OSS stores (e, in, out)); A and B here are always in the kernel's (out, in)
orientation. Modules are matched by name as PEFT matches `target_modules` (a list: a module whose qualified name
equals an entry or ends with "." + entry; a string: a regex over the full name; "all-linear": every nn.Linear but
the output layer) and expert weights as PEFT matches `target_parameters` ("<module>.<weight>" equal to an entry or
ending with "." + entry).

Two PEFT rules shape the choice of layers: PEFT refuses LoRA on a Mamba mixer's `out_proj` (transformers' fused
mamba-ssm path reads its weight directly), so "all-linear" leaves it out and naming it is an error; and for Mixtral
and the families transformers converts like Qwen2-MoE (qwen3_moe, olmoe, deepseek_v3, glm4_moe, ...), PEFT takes
`target_modules` named `gate_proj` / `up_proj` / `down_proj` (`w1`..`w3`) for transformers v4 expert layers, so it
does not load the LoRA of dense or shared-expert layers of those names: `save_lora` says so in the log, and
`load_lora` loads them.

Adapters are fp32 when the base weights are bf16 / fp16 (PEFT's `autocast_adapter_dtype`), else in their dtype.
Not supported: dropout on the adapters (a loaded config's dropout is ignored: it only acts in training), LoRA
biases, DoRA, rsLoRA, per-module rank / alpha patterns, several adapters at once, expert LoRA under transformers'
own expert parallelism.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..kernels.linear import linear
from .patch import (
    ADAPTERS,
    MAMBA_MIXERS,
    PATCHED_ATTR,
    ExpertsAdapter,
    _standard_adapter,
    find_moe_experts,
    patch_model,
)

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_ATTR = "_hybridmoe_lora"  # on the model: its LoraSpec


@dataclass(frozen=True)
class LoraSpec:
    """What `apply_lora` adapted: rank, alpha, the nn.Linear modules and the expert weights ("<module>.<weight>")."""

    r: int
    alpha: float
    linear: tuple[str, ...]
    experts: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def lora_spec(model: nn.Module) -> LoraSpec:
    spec = getattr(model, LORA_ATTR, None)
    if spec is None:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters (apply_lora or load_lora first)")
    return spec


# ---------------------------------------------------------------------------------------------- applying


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    target_modules: str | Sequence[str] | None = "all-linear",
    experts: bool | Sequence[str] = True,
) -> nn.Module:
    """Freeze every parameter of `model` and add trainable LoRA adapters, in place; returns the model.

    `target_modules`: the nn.Linear layers to adapt (PEFT's matching, see the module docstring; None or [] for
    none). `experts`: True adapts every 3D weight of every MoE experts module (applying `patch_model` first, since
    the adapters run inside hybridmoe's experts kernel), False none, a list of names selects weights as PEFT's
    `target_parameters` do (e.g. ["experts.down_proj"]). The scaling is alpha / r."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"apply_lora: the rank r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise ValueError(f"apply_lora: alpha must be a positive number, got {alpha!r}")
    if getattr(model, LORA_ATTR, None) is not None:
        raise ValueError(f"{type(model).__name__} already has LoRA adapters: merge_lora it or start from a fresh model")
    linear = _match_linear(model, target_modules)
    expert_weights = _match_expert_weights(model, experts)
    if not linear and not expert_weights:
        raise ValueError("apply_lora: nothing to adapt (no target_modules and no expert weights)")

    model.requires_grad_(False)
    spec = LoraSpec(r, float(alpha), tuple(linear), tuple(f"{m}.{w}" for m, w in expert_weights))
    for name in linear:
        _add_linear_lora(model.get_submodule(name), r, spec.scaling)
    for module_name, names in _by_module(spec.experts).items():
        experts_module = model.get_submodule(module_name)
        _add_experts_lora(experts_module, _adapter_of(experts_module), names, r, spec.scaling)
    setattr(model, LORA_ATTR, spec)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "hybridmoe LoRA r=%d alpha=%g: %d linear layers, %d expert weights in %d experts modules; trainable %d of %d "
        "parameters (%.2f%%)", r, alpha, len(linear), len(spec.experts), len(_by_module(spec.experts)), trainable,
        total, 100.0 * trainable / max(total, 1),
    )  # fmt: skip
    return model


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype


def _lora_A(rows: int, in_features: int, like: torch.Tensor) -> torch.Tensor:
    """(rows, in) kaiming-uniform with a = sqrt(5) (bound 1 / sqrt(in)), nn.Linear's and PEFT's init of A."""
    a = torch.empty(rows, in_features, dtype=_adapter_dtype(like), device=like.device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a


def _add_linear_lora(linear: nn.Linear, r: int, scaling: float) -> None:
    w = linear.weight
    linear.lora_A = nn.Linear(linear.in_features, r, bias=False, device=w.device, dtype=_adapter_dtype(w))
    linear.lora_B = nn.Linear(r, linear.out_features, bias=False, device=w.device, dtype=_adapter_dtype(w))
    with torch.no_grad():
        linear.lora_A.weight.copy_(_lora_A(r, linear.in_features, w))
        linear.lora_B.weight.zero_()
    linear.lora_scaling = scaling
    linear.forward = types.MethodType(_lora_linear_forward, linear)


def _lora_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """W x + b + scaling B A x, in the order PEFT's `lora.Linear` computes it (the base layer first)."""
    result = linear(x, self.weight, self.bias)  # F.linear, or widened bf16 on a CPU without bf16 units
    return result + (self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.lora_scaling).to(result.dtype)


def _kernel_shape(weight: torch.Tensor, adapter: ExpertsAdapter) -> tuple[int, int, int]:
    """(e, out, in) of a stored 3D expert weight."""
    e, a, b = weight.shape
    return (e, b, a) if adapter.transposed else (e, a, b)


def _add_experts_lora(experts: nn.Module, adapter: ExpertsAdapter, names: list[str], r: int, scaling: float) -> None:
    experts.lora_A, experts.lora_B = nn.ParameterDict(), nn.ParameterDict()
    for name in names:
        w = getattr(experts, name)
        e, out_features, in_features = _kernel_shape(w, adapter)
        experts.lora_A[name] = nn.Parameter(_lora_A(e * r, in_features, w).view(e, r, in_features))
        experts.lora_B[name] = nn.Parameter(torch.zeros(e, out_features, r, dtype=_adapter_dtype(w), device=w.device))
    experts.lora_scaling = scaling


# ---------------------------------------------------------------------------------------------- matching


def _peft_list_match(key: str, targets: Sequence[str]) -> bool:
    return key in targets or any(key.endswith(f".{t}") for t in targets)


def _base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules without the adapters' own containers (what PEFT sees on the plain model)."""
    for name, module in model.named_modules():
        if name and not {"lora_A", "lora_B"} & set(name.split(".")):
            yield name, module


def _match_linear(model: nn.Module, target_modules) -> list[str]:
    if target_modules is None or (not isinstance(target_modules, str) and len(target_modules) == 0):
        return []
    modules = dict(_base_modules(model))
    linear_names = sorted({n.rpartition(".")[2] for n, m in modules.items() if isinstance(m, nn.Linear)})
    # As PEFT: no LoRA on a Mamba mixer's out_proj, which transformers' fused mamba-ssm path reads as a bare weight.
    mamba_out = {f"{n}.out_proj" for n, m in modules.items() if type(m).__name__ in MAMBA_MIXERS}
    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":
            out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            return [n for n, m in modules.items() if isinstance(m, nn.Linear) and m is not out and n not in mamba_out]
        chosen = [n for n in modules if re.fullmatch(target_modules, n)]
        if not chosen:
            raise ValueError(
                f"target_modules={target_modules!r} (a regex over full module names) matches no module of "
                f"{type(model).__name__}; its linear layers are named {linear_names}"
            )
    else:
        targets = list(target_modules)
        unmatched = [t for t in targets if not any(_peft_list_match(n, [t]) for n in modules)]
        if unmatched:
            raise ValueError(
                f"target_modules {unmatched} match no module of {type(model).__name__}; its linear layers are named "
                f"{linear_names}"
            )
        chosen = [n for n in modules if _peft_list_match(n, targets)]
    if mamba_out & set(chosen):
        raise ValueError(
            f"target_modules selects a Mamba mixer's out_proj ({sorted(mamba_out & set(chosen))[0]}, ...): "
            "transformers' fused mamba-ssm path reads its weight directly, so a LoRA there would be skipped "
            "(PEFT refuses it too)"
        )
    not_linear = [f"{n} ({type(modules[n]).__name__})" for n in chosen if not isinstance(modules[n], nn.Linear)]
    if not_linear:
        raise ValueError(
            f"target_modules selects modules that are not nn.Linear: {not_linear[:4]}"
            f"{' ...' if len(not_linear) > 4 else ''}; LoRA adapts nn.Linear layers, and the experts' 3D weights "
            "through `experts=`"
        )
    return chosen


def _adapter_of(experts: nn.Module) -> ExpertsAdapter | None:
    return ADAPTERS.get(type(experts).__name__) or _standard_adapter(experts, type(experts).__name__)


def _match_expert_weights(model: nn.Module, experts) -> list[tuple[str, str]]:
    """(experts module, weight name) of every expert weight to adapt."""
    if experts is False or experts is None:
        return []
    found = find_moe_experts(model)
    if found and not all(hasattr(m, PATCHED_ATTR) for _, m in found):
        patch_model(model)  # the expert adapters run inside hybridmoe's experts kernel
    candidates, unsupported = [], {}
    for name, module in found:
        adapter = _adapter_of(module) if hasattr(module, PATCHED_ATTR) else None
        for weight in (n for n, p in module.named_parameters(recurse=False) if p.dim() == 3):
            if adapter is not None and weight in (adapter.up, adapter.down):
                candidates.append((name, weight))
            else:
                unsupported[f"{name}.{weight}"] = type(module).__name__
    if experts is True:
        if unsupported:
            raise ValueError(
                f"experts=True, but these expert weights do not run on hybridmoe's experts kernel, which applies the "
                f"expert LoRA: {sorted(unsupported)[:4]} (see patch_model's log); pass experts=False"
            )
        return candidates
    if isinstance(experts, str):
        experts = [experts]
    targets = list(experts)
    keys = [f"{m}.{w}" for m, w in candidates]
    for t in targets:
        if any(_peft_list_match(k, [t]) for k in unsupported):
            raise ValueError(f"experts: {t!r} selects expert weights hybridmoe's experts kernel does not run")
        if not any(_peft_list_match(k, [t]) for k in keys):
            names = sorted({".".join(k.split(".")[-2:]) for k in keys})
            raise ValueError(f"experts: {t!r} matches no expert weight of {type(model).__name__}; they are {names}")
    return [(m, w) for (m, w), k in zip(candidates, keys) if _peft_list_match(k, targets)]


def _by_module(expert_weights: Sequence[str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for key in expert_weights:
        module, _, weight = key.rpartition(".")
        grouped.setdefault(module, []).append(weight)
    return grouped


# ---------------------------------------------------------------------------------------------- merging


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights (W += scaling * B A, in fp32, rounded once to W's dtype) and remove
    them, in place; returns the model, a plain transformers model again (experts still on hybridmoe's kernels).
    Parameters stay frozen, as after PEFT's `merge_and_unload`."""
    spec = lora_spec(model)
    with torch.no_grad():
        for name in spec.linear:
            linear = model.get_submodule(name)
            delta = linear.lora_scaling * (linear.lora_B.weight.float() @ linear.lora_A.weight.float())
            linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))
            del linear.lora_A, linear.lora_B, linear.lora_scaling, linear.forward
        for module_name, names in _by_module(spec.experts).items():
            experts = model.get_submodule(module_name)
            adapter = _adapter_of(experts)
            for name in names:
                a_ERI, b_EOR = experts.lora_A[name].float(), experts.lora_B[name].float()
                delta_EOI = experts.lora_scaling * torch.bmm(b_EOR, a_ERI)
                w = getattr(experts, name)
                w.copy_((w.float() + (delta_EOI.transpose(1, 2) if adapter.transposed else delta_EOI)).to(w.dtype))
            del experts.lora_A, experts.lora_B, experts.lora_scaling
    delattr(model, LORA_ATTR)
    log.info("hybridmoe LoRA: merged %d linear and %d expert adapters", len(spec.linear), len(spec.experts))
    return model


# ---------------------------------------------------------------------------------------------- PEFT files


@dataclass(frozen=True)
class _Entry:
    """One tensor of the PEFT file: our parameter and the two layout conversions."""

    param: nn.Parameter
    to_file: Callable[[torch.Tensor], torch.Tensor]
    from_file: Callable[[torch.Tensor], torch.Tensor]


def _peft_entries(model: nn.Module) -> dict[str, _Entry]:
    spec = lora_spec(model)
    same = lambda t: t  # noqa: E731
    entries = {}
    for name in spec.linear:
        linear = model.get_submodule(name)
        entries[f"{PEFT_PREFIX}{name}.lora_A.weight"] = _Entry(linear.lora_A.weight, same, same)
        entries[f"{PEFT_PREFIX}{name}.lora_B.weight"] = _Entry(linear.lora_B.weight, same, same)
    for module_name, names in _by_module(spec.experts).items():
        experts = model.get_submodule(module_name)
        adapter = _adapter_of(experts)
        if bool(getattr(experts, "is_transposed", False)) != adapter.transposed:
            raise ValueError(
                f"{module_name}: is_transposed={getattr(experts, 'is_transposed', False)} disagrees with the storage "
                "hybridmoe reads; PEFT would read the adapters of this module in the other orientation"
            )
        # PEFT nests the wrappers in registration order: the first targeted weight is the innermost.
        ordered = [n for n, _ in experts.named_parameters(recurse=False) if n in names]
        for depth, name in enumerate(reversed(ordered)):
            prefix = f"{PEFT_PREFIX}{module_name}" + ".base_layer" * depth
            a, b = experts.lora_A[name], experts.lora_B[name]
            e, out_features, r = b.shape
            entries[f"{prefix}.lora_A.weight"] = _Entry(
                a, lambda t, e=e, r=r: t.reshape(e * r, -1), lambda t, e=e, r=r: t.reshape(e, r, -1)
            )
            entries[f"{prefix}.lora_B.weight"] = _Entry(
                b,
                lambda t, e=e, o=out_features, r=r: t.permute(1, 2, 0).reshape(o, r * e),
                lambda t, e=e, o=out_features, r=r: t.reshape(o, r, e).permute(2, 0, 1),
            )
    return entries


def _exact_patterns(keys: Sequence[str], chosen: Sequence[str]) -> list[str]:
    """The shortest name suffixes that select exactly `chosen` among `keys` under PEFT's list matching, else the full
    names: the config reads like a hand-written one and PEFT adapts exactly what we adapted."""
    chosen_set = set(chosen)
    for k in (1, 2, 3):
        patterns = sorted({".".join(c.split(".")[-k:]) for c in chosen_set})
        if {key for key in keys if _peft_list_match(key, patterns)} == chosen_set:
            return patterns
    return sorted(chosen_set)


def _peft_renamed(model: nn.Module, linear: Sequence[str]) -> list[str]:
    """The adapted linear layers PEFT will take for transformers v4 expert layers (see the module docstring), read
    from the installed peft's own tables (`peft.utils.transformers_weight_conversion`); [] without peft."""
    try:
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
    except (ImportError, AttributeError):
        return []
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    v4_names = _MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type), {})
    return [n for n in linear if n.rpartition(".")[2] in v4_names]


def save_lora(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the adapters as PEFT does: `adapter_config.json` and `adapter_model.safetensors` in `directory`."""
    spec = lora_spec(model)
    renamed = _peft_renamed(model, spec.linear)
    if renamed:
        log.warning(
            "hybridmoe LoRA: peft will not load the adapters of %d linear layers (%s, ...): for %s it takes their "
            "names for transformers v4 expert layers; hybridmoe's load_lora loads them",
            len(renamed), renamed[0], model.config.model_type,
        )  # fmt: skip
    tensors = {k: e.to_file(e.param.detach()).contiguous().cpu() for k, e in _peft_entries(model).items()}
    module_keys = [n for n, _ in _base_modules(model)]
    param_keys = [f"{n}.{p}" for n, m in _base_modules(model) for p, _ in m.named_parameters(recurse=False)]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": spec.r,
        "lora_alpha": int(spec.alpha) if spec.alpha.is_integer() else spec.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        # [] rather than None: with None, PEFT would fill in its default target modules for the architecture.
        "target_modules": _exact_patterns(module_keys, spec.linear) if spec.linear else [],
        "target_parameters": _exact_patterns(param_keys, spec.experts) if spec.experts else None,
    }
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


_UNSUPPORTED = {  # adapter_config.json key -> the value we support
    "use_rslora": False,
    "use_dora": False,
    "lora_bias": False,
    "bias": "none",
    "fan_in_fan_out": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "layers_to_transform": None,
    "exclude_modules": None,
}


def load_lora(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Apply the adapters saved in `directory` (by `save_lora` or by PEFT) to `model`, in place; returns the model."""
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"load_lora: {directory} holds no {CONFIG_NAME}")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_lora: {config_path} is a {config.get('peft_type')!r} adapter, not LORA")
    for key, supported in _UNSUPPORTED.items():
        value = config.get(key)
        if value is not None and value != supported and value not in ([], {}):
            raise ValueError(f"load_lora: {key}={value!r} in {config_path} is not supported")
    target_parameters = config.get("target_parameters") or []
    apply_lora(
        model, r=config["r"], alpha=config["lora_alpha"], target_modules=config.get("target_modules") or None,
        experts=list(target_parameters) if target_parameters else False,
    )  # fmt: skip
    tensors = load_file(os.path.join(directory, WEIGHTS_NAME))
    tensors = {k.replace(".default.", "."): v for k, v in tensors.items()}  # tolerate an adapter-named save
    entries = _peft_entries(model)
    missing, unexpected = sorted(entries.keys() - tensors.keys()), sorted(tensors.keys() - entries.keys())
    if missing or unexpected:
        raise ValueError(
            f"load_lora: {directory} does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    with torch.no_grad():
        for key, entry in entries.items():
            value = entry.from_file(tensors[key])
            if value.shape != entry.param.shape:
                shape = tuple(tensors[key].shape)
                raise ValueError(f"load_lora: {key} has shape {shape}, which does not fit the model")
            entry.param.copy_(value)
    return model
