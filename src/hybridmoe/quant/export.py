"""`hybridmoe quantize`: post-training quantization of a BF16/FP32 checkpoint to an NVFP4 checkpoint directory in the
TensorRT Model Optimizer layout (`hybridmoe.quant.layout`, `hybridmoe.quant.modules`).

The steps follow ModelOpt's NVFP4 PTQ (`NVIDIA/Model-Optimizer: examples/llm_ptq/hf_ptq.py`, `modelopt/torch/
quantization/qtensor/nvfp4_tensor.py`): run calibration text through the model with forward hooks that record the
amax of each quantized layer's input (per expert for the routed experts: the rows routed to it, and its relu^2
hidden state for the down projection); quantize each weight with 1x16 blocks along the input dimension
(`hybridmoe.quant.nvfp4.quantize`: E4M3 block scales, fp32 global scale amax / 2688, round to nearest even);
write `input_scale = input amax / 2688`. An expert that no calibration token reached takes the largest input amax of
its layer's other experts (ModelOpt likewise fills uncalibrated experts from their siblings). The modules left
unquantized are stored in BF16 (the router's weights stay FP32, as in every hybridmoe checkpoint).

Calibration data (`calibration`): text / JSON lines / Parquet files or folders, or a folder written by `hybridmoe
prepare` (its tokenizer must be the checkpoint's), read as `hybridmoe eval ppl` reads them. Without it, hybridmoe's
own Python source files, tokenized with the checkpoint's tokenizer (shipped with the package: nothing to download).

The output directory is written whole into a temporary directory beside it and renamed into place at the end, so a
failed or interrupted run leaves no partial checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch

from ..kernels.activations import relu_squared
from .layout import QUANT_CONFIG_NAME, default_exclude_modules, quantization_config, quantized_names
from .modules import NVFP4Experts, NVFP4Linear, replace_module, weight_bytes

FORMATS = ("nvfp4",)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json", QUANT_CONFIG_NAME)


def default_calibration_texts() -> list[str]:
    """hybridmoe's own Python sources, in path order (the package ships them)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names if f.endswith(".py"))
    texts = []
    for file in files:
        with open(file, encoding="utf-8") as fh:
            texts.append(fh.read())
    return texts


def calibration_windows(tokenizer, data: list[str] | None, seq_len: int, max_tokens: int, field: str = "text"):
    """Token windows (seq_len, the last possibly shorter) of the calibration documents, at most max_tokens in all."""
    import numpy as np

    from ..data.sources import empty_counts
    from ..eval.perplexity import _document_tokens, _windows

    if data:
        docs = _document_tokens(list(data), tokenizer, field, "all", empty_counts())
    else:
        eos = tokenizer.eos_token_id
        docs = (
            np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos], dtype=np.int64)
            for text in default_calibration_texts()
        )
    windows = [torch.from_numpy(w) for w in _windows(docs, seq_len, max_tokens)]
    if not windows:
        raise ValueError(f"the calibration data {data} holds no tokens; give documents with text in them")
    return windows


@torch.no_grad()
def calibrate(model, linears: list[str], experts: list[str], windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Input amax of each quantized linear (a 0-dim tensor) and of each experts module's projections (per expert:
    `{name}.up_proj` and `{name}.down_proj`, (e,) tensors, NaN for experts no token reached), over the windows."""
    amax: dict[str, torch.Tensor] = {}

    def keep_max(key: str, value: torch.Tensor) -> None:
        amax[key] = value if key not in amax else torch.fmax(amax[key], value)

    def linear_hook(name):
        return lambda module, args: keep_max(name, args[0].detach().abs().amax().float())

    def experts_hook(name):
        def hook(module, args):
            x_TD, idx_TK = args[0].float(), args[1]
            e = module.up_proj.shape[0]
            up = torch.full((e,), torch.nan)
            down = torch.full((e,), torch.nan)
            for expert in idx_TK.unique().tolist():
                rows = x_TD[(idx_TK == expert).any(-1)]
                h = relu_squared(rows @ module.up_proj[expert].float().T)
                up[expert], down[expert] = rows.abs().amax(), h.abs().amax()
            keep_max(f"{name}.up_proj", up)
            keep_max(f"{name}.down_proj", down)

        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(linear_hook(n)) for n in linears]
    hooks += [model.get_submodule(n).register_forward_pre_hook(experts_hook(n)) for n in experts]
    was_training = model.training
    model.eval()
    try:
        for window in windows:
            model(window[None].to(model.lm_head.weight.device), logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    missing = [n for n in linears if n not in amax]
    if missing:
        raise ValueError(f"no calibration input reached {missing[:3]}; these layers cannot be calibrated")
    return amax


def quantize_model(model, exclude: list[str], amax: dict[str, torch.Tensor]) -> dict:
    """Replace the quantized modules by packed ones in place (uncalibrated experts take their layer's largest
    calibrated amax) and record the quantization config; returns what was done."""
    linears, experts = quantized_names(model, exclude)
    filled = 0
    for name in linears:
        m = model.get_submodule(name)
        replace_module(model, name, NVFP4Linear.from_weight(m.weight, m.bias, float(amax[name])))
    for name in experts:
        m = model.get_submodule(name)
        layer_amax = {}
        for proj in ("up_proj", "down_proj"):
            a = amax.get(f"{name}.{proj}", torch.full((m.up_proj.shape[0],), torch.nan))
            seen = a[~a.isnan()]
            fallback = seen.max() if seen.numel() else torch.tensor(0.0)
            filled += int(a.isnan().sum()) if proj == "up_proj" else 0
            layer_amax[proj] = torch.where(a.isnan(), fallback, a)
        replace_module(model, name, NVFP4Experts.from_weights(m.up_proj, m.down_proj, layer_amax))
    model.config.extra["quantization_config"] = quantization_config(exclude)
    return {"linears": linears, "experts": experts, "uncalibrated_experts": filled}


def to_bf16(model) -> None:
    """Cast the parameters that are neither packed nor the router's to BF16, in place. (`model.to` would round the
    router's FP32 weights to BF16 values as well, though it keeps their dtype.)"""
    from ..modeling import TopkRouter

    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, TopkRouter):
                for p in module.parameters(recurse=False):
                    p.data = p.data.to(torch.bfloat16)


def quantize_checkpoint(
    checkpoint: str,
    output: str,
    format: str = "nvfp4",
    calibration: list[str] | None = None,
    exclude: list[str] | None = None,
    max_tokens: int = 16384,
    seq_len: int = 512,
    field: str = "text",
    max_shard_size: int | str = "5GB",
) -> dict:
    """Write the NVFP4 checkpoint of `checkpoint` (a Hugging Face model directory with its tokenizer) to `output`
    (module docstring). exclude: fnmatch patterns of modules to keep in BF16, besides `default_exclude_modules`."""
    from ..checkpoint import load_pretrained, save_pretrained
    from ..config import HybridMoEConfig
    from ..data.tokenizer import load_tokenizer
    from .layout import read_quantization

    if format not in FORMATS:
        raise ValueError(f"--format {format!r} is not supported; use one of {FORMATS}")
    if max_tokens < 2 or seq_len < 2:
        raise ValueError(f"--calibration-tokens and --seq-len must be >= 2, got {max_tokens} and {seq_len}")
    checkpoint, output = os.path.abspath(checkpoint), os.path.abspath(output)
    if not os.path.isdir(checkpoint):
        raise ValueError(f"checkpoint {checkpoint}: no such directory; pass a Hugging Face model directory")
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ValueError(f"--output {output} exists and is not an empty directory; remove it or pick another path")
    if read_quantization(checkpoint, HybridMoEConfig.from_pretrained(checkpoint).extra) is not None:
        raise ValueError(f"{checkpoint} is already quantized; quantize its BF16 (or FP32) checkpoint instead")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(checkpoint)
    model = load_pretrained(checkpoint, dtype=torch.float32)
    exclude = default_exclude_modules(model) + [p for p in (exclude or []) if p]
    linears, experts = quantized_names(model, exclude)
    windows = calibration_windows(tokenizer, calibration, seq_len, max_tokens, field)
    amax = calibrate(model, linears, experts, windows)
    done = quantize_model(model, exclude, amax)
    to_bf16(model)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", suffix=".tmp", dir=parent)
    skipped = []
    try:
        save_pretrained(model, tmp, max_shard_size=max_shard_size)
        for entry in sorted(os.listdir(checkpoint)):
            src = os.path.join(checkpoint, entry)
            if entry in _WEIGHT_FILES or (entry.startswith("model-") and entry.endswith(".safetensors")):
                continue
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(tmp, entry))
            else:
                skipped.append(entry)
        os.chmod(tmp, 0o755)
        if os.path.isdir(output):
            os.rmdir(output)  # (empty, checked above)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = weight_bytes(model)
    return {
        "checkpoint": checkpoint,
        "output": output,
        "format": format,
        "quantized_linears": len(done["linears"]),
        "quantized_expert_layers": len(done["experts"]),
        "uncalibrated_experts": done["uncalibrated_experts"],
        "exclude_modules": exclude,
        "calibration": [os.path.abspath(d) for d in calibration] if calibration else "hybridmoe sources",
        "calibration_tokens": sum(len(w) for w in windows),
        "weight_bytes": sizes["total"],
        "quantized_weight_bytes": sizes["quantized"],
        "skipped_directories": skipped,
        "seconds": round(time.perf_counter() - t0, 2),
    }
