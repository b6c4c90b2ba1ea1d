"""One import for Hugging Face MoE models: `from hybridmoe.automodel import AutoModelForCausalLM`.

Faithful to the call shape of `transformers.AutoModelForCausalLM` (`from_pretrained(path, dtype=..., **kwargs)`,
`from_config(config, **kwargs)`; every argument goes to transformers unchanged) and to NeMo AutoModel's promise
(NVIDIA-NeMo/Automodel, `NeMoAutoModelForCausalLM` in `nemo_automodel/_transformers/auto_model.py`, for models it
does not re-implement): the result is the plain transformers model, whose MoE experts (and, for
nemotron_h, Mamba-2 mixers) run on hybridmoe's kernels (`patch.py` says which and how). Parameters, state dicts and
`save_pretrained` stay transformers' own, so what this model saves, plain transformers loads.
"""

from __future__ import annotations

import os

import transformers
from transformers import PretrainedConfig, PreTrainedModel

from .lora import LoraSpec, apply_lora, load_lora, lora_spec, merge_lora, save_lora
from .patch import ADAPTERS, PatchReport, find_moe_experts, patch_model

__all__ = [
    "ADAPTERS",
    "AutoModelForCausalLM",
    "LoraSpec",
    "PatchReport",
    "apply_lora",
    "find_moe_experts",
    "load_lora",
    "lora_spec",
    "merge_lora",
    "patch_model",
    "save_lora",
]


class AutoModelForCausalLM:
    """`transformers.AutoModelForCausalLM`, then `patch_model` on the model it returns."""

    def __init__(self, *args, **kwargs):
        raise TypeError(
            "hybridmoe.automodel.AutoModelForCausalLM is not instantiated: use "
            "AutoModelForCausalLM.from_pretrained(path, ...) or AutoModelForCausalLM.from_config(config, ...)"
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> PreTrainedModel:
        _check_local_path(pretrained_model_name_or_path)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives (model, info)
        patch_model(model)
        return loaded

    @classmethod
    def from_config(cls, config, **kwargs) -> PreTrainedModel:
        if not isinstance(config, PretrainedConfig):
            raise TypeError(
                f"AutoModelForCausalLM.from_config expects a transformers PretrainedConfig, got {type(config).__name__}"
                " (to load a checkpoint directory, use from_pretrained)"
            )
        model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
        patch_model(model)
        return model


def _check_local_path(path) -> None:
    """Fail early and clearly on a local path that holds no model, before transformers would take it for a Hub id.
    Hub ids ("org/name") pass through to transformers unchanged."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(
            f"AutoModelForCausalLM.from_pretrained expects a model directory or a Hub id, got {type(path).__name__}"
        )
    text = os.fspath(path)
    looks_local = isinstance(path, os.PathLike) or text.startswith(("/", ".", "~")) or text.count("/") > 1
    local = os.path.expanduser(text)
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise FileNotFoundError(f"AutoModelForCausalLM.from_pretrained: {text} holds no config.json")
    elif looks_local:
        raise FileNotFoundError(f"AutoModelForCausalLM.from_pretrained: no model directory at {text}")
