"""Hugging Face checkpoint directories: the published `nemotron_h` layout in and out (model weights and config).

Run checkpoints (what resuming a training run needs: optimizer, RNG, data position, distributed DCP shards) live in
`hybridmoe.train.checkpoint`; each of its checkpoint directories holds a model directory in this layout.

The layout is the one NVIDIA publishes for its NVIDIA-Nemotron-3 models on the Hugging Face Hub and transformers 5.x
writes (`transformers/models/nemotron_h/`):
`config.json`, one `model.safetensors` or several shards with `model.safetensors.index.json`, keys under
`backbone.` and `lm_head.`, MTP layers under `mtp.layers.`, and routed experts stored one tensor per expert
(`...mixer.experts.{e}.up_proj.weight`). Our module names are the checkpoint's, except that the experts of a
layer live in one 3D parameter; `_EXPERT_KEY` maps between the two.

NVFP4 checkpoints (TensorRT Model Optimizer layout: `hf_quant_config.json` and/or config.json's
`quantization_config`; `hybridmoe.quant.layout`) load into a model whose quantized linear layers and experts stay
packed (`hybridmoe.quant.modules`): their `weight` (uint8), `weight_scale` (float8_e4m3fn), `weight_scale_2` and
`input_scale` (fp32) are read as stored, dtypes checked, and a packed model saves back to the same layout.

Loading builds the model on the meta device, allocates it once in the requested dtype, and copies each tensor
from the safetensors files straight into its parameter, so no second copy of the weights is ever held.
A missing, unexpected or mis-shaped tensor is an error naming the key (and both shapes).
"""

from __future__ import annotations

import json
import logging
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import HybridMoEConfig
from .dtypes import resolve_dtype
from .modeling import HybridMoEForCausalLM
from .quant.layout import QUANT_CONFIG_NAME, hf_quant_config, pack_for_loading, read_quantization
from .quant.modules import PACKED_DTYPES, packed_modules
from .utils import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# experts.{e}.{proj}.{tensor} in the checkpoint <-> experts.{proj}[e] (weight) or experts.{proj}_{tensor}[e] in memory
_SCALES = "weight_scale|weight_scale_2|input_scale"
_EXPERT_KEY = re.compile(rf"^(.*\.experts)\.(\d+)\.(up_proj|down_proj)\.(weight|{_SCALES})$")
_EXPERT_STATE = re.compile(rf"^(.*\.experts)\.(up_proj|down_proj)(?:_({_SCALES}))?$")
# ModelOpt's FP8 KV-cache scales (kv_cache_quant_algo FP8): not used, the cache keeps the activation dtype.
_KV_SCALE_KEY = re.compile(r"^.*\.(k_proj\.k_scale|v_proj\.v_scale|k_scale|v_scale)$")
# Names older checkpoints used for the same tensor.
_LEGACY_NAMES = {"backbone.embedding.weight": "backbone.embeddings.weight"}


def _checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise ValueError(f"{index} lists shard(s) that are not in {path}: {missing}")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, WEIGHTS_NAME)
    if os.path.exists(single):
        return [single]
    raise ValueError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {path}. Fix: pass a Hugging Face checkpoint directory.")


def load_pretrained(
    path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
) -> HybridMoEForCausalLM:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory. Fix: pass a Hugging Face checkpoint directory.")
    config = HybridMoEConfig.from_pretrained(path)
    quant = read_quantization(path, config.extra)
    dtype = resolve_dtype(dtype)
    model = HybridMoEForCausalLM(config, device="meta")
    if quant is not None:
        config.extra["quantization_config"] = quant  # normalized; save_pretrained writes it back
        pack_for_loading(model, quant)
    packed_dtypes = {  # packed tensors are read as stored: their dtype must be the layout's
        f"{name}.{b}": buffer.dtype for name, m in packed_modules(model).items() for b, buffer in m.named_buffers()
    }
    if dtype is not None:
        model.to(dtype)  # on meta: free; the router stays fp32
    model.to_empty(device=device)
    with torch.no_grad():  # buffers that are not in checkpoints (expert token counters) start at zero
        persistent = model.state_dict().keys()
        for name, buffer in model.named_buffers():
            if name not in persistent:
                buffer.zero_()
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    expected = {name for name, _ in model.named_parameters()} | {
        name for name, b in model.named_buffers() if name in model.state_dict()
    }
    filled: dict[str, set[int] | bool] = {}
    kv_scales = 0
    with torch.no_grad():
        for file in _checkpoint_files(path):
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    name = _LEGACY_NAMES.get(key, key)
                    m = _EXPERT_KEY.match(name)
                    if m:
                        target = f"{m.group(1)}.{m.group(3)}" + ("" if m.group(4) == "weight" else f"_{m.group(4)}")
                    else:
                        target = name
                    if quant is not None and quant["kv_cache_quant_algo"] and _KV_SCALE_KEY.match(name):
                        kv_scales += 1
                        continue
                    if target not in expected and name.rsplit(".", 1)[-1] in PACKED_DTYPES:
                        if quant is None:
                            raise ValueError(
                                f"{file}: tensor {key!r} belongs to a quantized checkpoint, but {path} has neither "
                                f"{QUANT_CONFIG_NAME} nor a quantization_config in config.json. Fix: restore the "
                                "quantization config the checkpoint was exported with."
                            )
                        raise ValueError(
                            f"{file}: tensor {key!r} is an NVFP4 tensor of a module that exclude_modules "
                            f"{quant['exclude_modules']} keeps unquantized. Fix: make the quantization config list "
                            "exactly the modules the files hold in BF16."
                        )
                    if target not in expected:
                        raise ValueError(
                            f"{file}: unexpected tensor {key!r}: the model built from config.json has no such "
                            "parameter. Fix: check that config.json matches the weights (layer pattern, MTP layers)."
                        )
                    param = params[target]
                    tensor = f.get_tensor(key)
                    want = tuple(param.shape[1:]) if m else tuple(param.shape)
                    if target in packed_dtypes:
                        if tensor.dtype != packed_dtypes[target]:
                            raise ValueError(
                                f"{file}: tensor {key!r} is {tensor.dtype} but the NVFP4 layout stores it as "
                                f"{packed_dtypes[target]}. Fix: export the checkpoint again with `hybridmoe quantize`"
                                " (or ModelOpt), or exclude the module in the quantization config."
                            )
                        if want == () and tensor.numel() == 1:  # scalar scales: () or (1,) in published files
                            tensor = tensor.reshape(())
                    if m and int(m.group(2)) >= param.shape[0]:
                        raise ValueError(
                            f"{file}: {key!r} is expert {m.group(2)} but config.json has "
                            f"n_routed_experts={param.shape[0]}"
                        )
                    if tuple(tensor.shape) != want:
                        raise ValueError(
                            f"{file}: tensor {key!r} has shape {tuple(tensor.shape)} but the model expects {want} "
                            f"(parameter {target!r}). Fix: check that config.json matches the weights."
                        )
                    if m:
                        param[int(m.group(2))].copy_(tensor)
                        filled.setdefault(target, set()).add(int(m.group(2)))
                    else:
                        param.copy_(tensor)
                        filled[target] = True
                    del tensor
    missing = []
    for name in sorted(expected):
        got = filled.get(name)
        if got is None:
            missing.append(name)
        elif isinstance(got, set) and len(got) != params[name].shape[0]:
            absent = sorted(set(range(params[name].shape[0])) - got)
            missing.append(f"{name} (experts {absent[:8]}{'...' if len(absent) > 8 else ''})")
    if missing:
        quantized = [n for n in missing if n.split(" ")[0] in packed_dtypes]
        hint = (
            f" The quantization config quantizes these modules, but {quantized[:3]} are not in the files: the "
            "checkpoint must hold weight, weight_scale, weight_scale_2 and input_scale for each (or exclude them)."
            if quantized
            else ""
        )
        raise ValueError(
            f"{path}: the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}. "
            "Fix: check that config.json matches the weights (layer pattern, MTP layers, expert count)." + hint
        )
    if kv_scales:
        log.warning("%s: %d FP8 KV-cache scales (k_scale / v_scale) not used", path, kv_scales)
    model.eval()
    return model


def checkpoint_tensors(model: HybridMoEForCausalLM) -> dict[str, torch.Tensor]:
    """The state dict in the published layout: 3D expert weights (and packed experts' scales) split into one tensor
    per expert."""
    out = {}
    for name, tensor in model.state_dict().items():
        m = _EXPERT_STATE.match(name)
        if m:
            for e in range(tensor.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.{m.group(3) or 'weight'}"] = tensor[e]
        else:
            out[name] = tensor
    return out


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use bytes or a size like '5GB' / '500MB'")
    unit = m.group(2).upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def save_pretrained(model: HybridMoEForCausalLM, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
    """Write config.json and safetensors shards (an index when there is more than one); every file is written
    atomically, and shards of an earlier save that the new index does not list are removed."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    limit = _parse_size(max_shard_size)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in checkpoint_tensors(model).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    config = model.config
    quant_path = os.path.join(path, QUANT_CONFIG_NAME)
    if packed_modules(model):  # a packed NVFP4 model saves back to its layout, with both config files
        spec = config.extra.get("quantization_config")
        if spec is None:
            raise ValueError("the model holds packed NVFP4 modules but its config has no quantization_config")
        atomic_write_text(quant_path, json.dumps(hf_quant_config(spec), indent=2) + "\n")
    else:  # (a model dequantized from an NVFP4 checkpoint is an ordinary one again)
        if "quantization_config" in config.extra:
            config = config.replace(extra={k: v for k, v in config.extra.items() if k != "quantization_config"})
        if os.path.exists(quant_path):
            os.unlink(quant_path)
    config.save_pretrained(path, dtype=dtype)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]  # fmt: skip
    for name, shard in zip(names, shards):
        atomic_write(
            os.path.join(path, name), lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"})
        )
    index_path = os.path.join(path, INDEX_NAME)
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")
    elif os.path.exists(index_path):
        os.unlink(index_path)
    for stale in os.listdir(path):
        if stale not in names and re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", stale):
            os.unlink(os.path.join(path, stale))
