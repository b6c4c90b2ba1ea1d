"""NVFP4 checkpoint directories (TensorRT Model Optimizer layout): their quantization config, which modules are
quantized, and the packed form of a model built from config.json, into which `hybridmoe.checkpoint` reads the tensors.

A ModelOpt NVFP4 export (`NVIDIA/Model-Optimizer: modelopt/torch/export/unified_export_hf.py`,
`modelopt/torch/export/convert_hf_config.py`) describes its quantization twice:
  - `hf_quant_config.json`: {"producer": {"name", "version"}, "quantization": {"quant_algo": "NVFP4",
    "kv_cache_quant_algo": null | "FP8", "group_size": 16, "exclude_modules": [fnmatch patterns]}};
  - `config.json` -> "quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": [...], ...}
    (newer exports; vLLM and transformers read this one).
Either is enough to load; when both are present they must agree. Every linear layer (and every routed expert's
up/down projection) whose module name no exclude pattern matches is quantized: a pattern matches a module name by
`fnmatch`, or when it names one of the module's parents (as vLLM's `is_layer_excluded` does).

Which modules stay in BF16 by default (`default_exclude_modules`): NVIDIA's NVFP4 Nemotron 3 Nano
(`nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-NVFP4`, its hf_quant_config.json; the Nemotron 3 Nano technical report,
section 4) keeps the LM head, every attention projection (q/k/v/o) and the in/out projections of each Mamba layer that
feeds an attention layer in BF16, the router and the Mamba conv1d in high precision (they are not linear layers here),
and quantizes the routed and shared experts and the other Mamba projections. We do the same, and also keep the MTP
layers and the LatentMoE latent projections in BF16 (the Nemotron 3 NVFP4 training recipe's precision policy; no
published NVFP4 export with them was available to check). Linear layers whose input width is not a multiple of 16
cannot take the layout and are excluded by name.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os

from torch import nn

from .modules import GROUP_SIZE, NVFP4Experts, NVFP4Linear, replace_module

log = logging.getLogger(__name__)

QUANT_CONFIG_NAME = "hf_quant_config.json"
QUANT_ALGO = "NVFP4"


def is_excluded(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name.startswith(p.rstrip(".") + ".") for p in patterns)


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear layer of the model by module name (the LM head included)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer's routed experts (`modeling.Experts`, or already packed) by module name."""
    from ..modeling import Experts

    return {name: m for name, m in model.named_modules() if isinstance(m, (Experts, NVFP4Experts))}


def default_exclude_modules(model: nn.Module) -> list[str]:
    """The module names and patterns kept in BF16 by default (module docstring), for this model's layer pattern."""
    config = model.config
    out = ["lm_head", "backbone.embeddings", "*.mixer.gate", "mtp.*", "*.fc1_latent_proj", "*.fc2_latent_proj"]
    pattern = config.hybrid_override_pattern
    for i, symbol in enumerate(pattern):
        if symbol == "*":
            out += [f"backbone.layers.{i}.mixer.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
            if i > 0 and pattern[i - 1] == "M":
                out += [f"backbone.layers.{i - 1}.mixer.{p}" for p in ("in_proj", "out_proj")]
    for name, m in linear_modules(model).items():
        if m.in_features % GROUP_SIZE and not is_excluded(name, out):
            out.append(name)
    return out


def quantized_names(model: nn.Module, exclude: list[str]) -> tuple[list[str], list[str]]:
    """(linear layers, expert modules) that `exclude` leaves quantized. An experts module is quantized when none of
    its experts' projections (`{name}.{e}.up_proj` / `.down_proj`) is excluded; excluding only some is an error."""
    linears = [name for name in linear_modules(model) if not is_excluded(name, exclude)]
    experts = []
    for name, m in expert_modules(model).items():
        per_expert = [f"{name}.{e}.{p}" for e in range(m.up_proj.shape[0]) for p in ("up_proj", "down_proj")]
        excluded = [is_excluded(n, exclude) for n in per_expert]
        if any(excluded) and not all(excluded):
            raise ValueError(
                f"exclude_modules {exclude} keeps some experts of {name} in BF16 and quantizes others; hybridmoe "
                "holds a layer's experts in one tensor, so exclude all of them or none"
            )
        if not any(excluded):
            experts.append(name)
    if "lm_head" in linears:
        raise ValueError(
            "the quantization config quantizes lm_head; hybridmoe keeps the LM head in BF16 (the chunked loss and "
            "the cache read its weight). Fix: add 'lm_head' to exclude_modules and keep its BF16 weight."
        )
    return linears, experts


def pack_for_loading(model: nn.Module, spec: dict) -> None:
    """Replace (on the meta device) the modules `spec["exclude_modules"]` leaves quantized by empty packed modules
    of the same shapes; `hybridmoe.checkpoint.load_pretrained` then fills them from the files."""
    linears, experts = quantized_names(model, spec["exclude_modules"])
    for name in linears:
        m = model.get_submodule(name)
        replace_module(model, name, NVFP4Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta"))
    for name in experts:
        e, i, d = model.get_submodule(name).up_proj.shape
        replace_module(model, name, NVFP4Experts(e, i, d, device="meta"))


def read_quantization(path: str, extra: dict) -> dict | None:
    """The quantization of a checkpoint directory as one normalized `quantization_config` dict (written back by
    `quantization_config`), or None when neither hf_quant_config.json nor config.json's quantization_config exists.
    `extra`: the config's unknown keys (`HybridMoEConfig.extra`), where config.json's quantization_config lands."""
    file = os.path.join(path, QUANT_CONFIG_NAME)
    sources: list[tuple[str, dict]] = []
    if os.path.exists(file):
        try:
            with open(file) as fh:
                hf = json.load(fh)
            section = hf["quantization"]
            if not isinstance(section, dict):
                raise TypeError("'quantization' is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{file} is not a ModelOpt quantization config ({e!r}); it needs a 'quantization' "
                             "object with quant_algo, group_size and exclude_modules") from None  # fmt: skip
        sources.append((file, section))
    if extra.get("quantization_config") is not None:
        qc = extra["quantization_config"]
        if not isinstance(qc, dict):
            raise ValueError(f"{path}/config.json: quantization_config must be an object, got {type(qc).__name__}")
        method = qc.get("quant_method", "modelopt")
        if method != "modelopt":
            raise ValueError(f"{path}/config.json: quant_method {method!r} is not supported; hybridmoe loads "
                             "TensorRT Model Optimizer NVFP4 checkpoints (quant_method 'modelopt')")  # fmt: skip
        sources.append((f"{path}/config.json quantization_config", qc))
    if not sources:
        return None
    algos = {where: s.get("quant_algo") for where, s in sources}
    for where, algo in algos.items():
        if algo != QUANT_ALGO:
            raise ValueError(f"{where}: quant_algo {algo!r} is not supported; hybridmoe loads quant_algo "
                             f"{QUANT_ALGO!r} (group_size {GROUP_SIZE}) checkpoints")  # fmt: skip
    for where, s in sources:
        size = s.get("group_size", GROUP_SIZE)
        if size != GROUP_SIZE:
            raise ValueError(f"{where}: group_size {size!r}; NVFP4 blocks hold {GROUP_SIZE} elements")
    excludes = []
    for where, s in sources:
        patterns = s.get("exclude_modules", s.get("ignore"))
        if patterns is None:
            raise ValueError(f"{where} lists no exclude_modules (or ignore): say which modules stay unquantized")
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"{where}: exclude_modules must be a list of module-name patterns, got {patterns!r}")
        excludes.append((where, patterns))
    if len(excludes) == 2 and sorted(excludes[0][1]) != sorted(excludes[1][1]):
        raise ValueError(f"{excludes[0][0]} and {excludes[1][0]} exclude different modules; make them agree")
    kv = next((s["kv_cache_quant_algo"] for _, s in sources if s.get("kv_cache_quant_algo")), None)
    if kv is not None:
        log.warning("%s: kv_cache_quant_algo %s is not applied; the KV cache is kept in the activation dtype", path, kv)
    producer = next((s.get("producer") for _, s in sources if s.get("producer")), None)
    if producer is None and os.path.exists(file):
        producer = hf.get("producer")
    return quantization_config(excludes[0][1], kv_cache_quant_algo=kv, producer=producer)


def quantization_config(exclude: list[str], kv_cache_quant_algo: str | None = None, producer: dict | None = None):
    """config.json's `quantization_config` for an NVFP4 checkpoint excluding `exclude`."""
    return {
        "quant_method": "modelopt",
        "quant_algo": QUANT_ALGO,
        "group_size": GROUP_SIZE,
        "kv_cache_quant_algo": kv_cache_quant_algo,
        "exclude_modules": list(exclude),
        "ignore": list(exclude),
        "producer": producer or _producer(),
    }


def hf_quant_config(spec: dict) -> dict:
    """hf_quant_config.json's content for a normalized quantization_config."""
    return {
        "producer": spec.get("producer") or _producer(),
        "quantization": {
            "quant_algo": spec["quant_algo"],
            "kv_cache_quant_algo": spec.get("kv_cache_quant_algo"),
            "group_size": spec["group_size"],
            "exclude_modules": list(spec["exclude_modules"]),
        },
    }


def _producer() -> dict:
    from .. import __version__

    return {"name": "hybridmoe", "version": __version__}
