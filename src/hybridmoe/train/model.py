"""Where a stage's model comes from and how it trains: the model side of every stage, in one place.

Two sources (`model.source` in an SFT recipe; pretraining is always native):
  - native: `HybridMoEForCausalLM` (MTP layers included) from the checkpoint being resumed, else `model.init_from`
    (a model directory, or a run directory: its newest checkpoint), else a fresh init of `model.preset`; sharded
    under torchrun with `hybridmoe.distributed.parallelize`;
  - transformers: a Hugging Face MoE model directory (`model.init_from`) loaded through `hybridmoe.automodel` (this
    package's expert and Mamba kernels, the fused LM loss), optionally with LoRA adapters (`model.lora`); sharded
    with `hybridmoe.automodel.parallel.parallelize`. Its run checkpoints hold transformers' own layout (or the
    PEFT adapter), and the end of a run writes `OUT/final`, a plain Hugging Face directory (LoRA merged, the
    adapter in `final/adapter`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import torch

from .. import distributed
from ..config import HybridMoEConfig
from ..modeling import HybridMoEForCausalLM
from ..quant.training import apply_precision
from .checkpoint import is_distributed_checkpoint, latest_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "autocast-bf16": torch.float32}
LOSS_PARTS = ("loss", "lm_loss", "mtp_loss", "aux_loss")


def is_transformers(recipe) -> bool:
    return getattr(recipe.model, "source", "native") == "transformers"


def load_model(recipe, ckpt: str | None, par, pipeline: bool = False):
    """The stage's model in training mode, on this rank's device and sharded under torchrun (FSDP2 + expert
    parallelism; with parallel.pp > 1, this rank's pipeline stage, which only a stage that says it runs pipelines
    (`pipeline`: pretraining) accepts). ckpt: the run checkpoint being resumed (a distributed one's weights are
    loaded after sharding)."""
    if par is not None and par.pp > 1 and not pipeline:
        raise ValueError(
            f"parallel.pp={par.pp}: pipeline parallelism runs pretraining (hybridmoe pretrain) only; set parallel.pp=1"
        )
    if is_transformers(recipe):
        model = load_transformers_model(recipe, ckpt)
    else:
        model = build_model(recipe, ckpt)
    if par is not None:
        model.to(par.device)  # a GPU per rank under torchrun with NCCL; a no-op on CPU
        if is_transformers(recipe):
            from ..automodel.parallel import parallelize

            parallelize(model, par, recipe.parallel.reshard_after_forward)
        else:
            p = recipe.parallel
            model = distributed.parallelize(model, par, p.reshard_after_forward, p.pp_split_points)
    if recipe.train.compile:
        compile_blocks(model)
    model.train()
    return model


def compile_blocks(model, backend: str = "inductor") -> int:
    """torch.compile every layer block (`modeling.Block`: the backbone's and the MTP layers') in place, after tensor
    parallelism and FSDP: regional compilation, as torchtitan's `apply_compile` does it (pytorch/torchtitan,
    `torchtitan/models/llama4/infra/parallelize.py`). The repeated blocks share a few compiled graphs (one per kind
    of mixer), so compile time does not grow with depth, and the code around them (the input checks, the fused
    chunked loss, the MTP inputs, the pipeline schedule) stays eager. In place (`nn.Module.compile`), so parameter
    names, checkpoints and FSDP units do not change. Returns the number of blocks compiled.

    Mamba, attention and MLP blocks compile to one graph each (`fullgraph=True`: a graph break is an error). MoE
    blocks are compiled without fullgraph, with deliberate breaks (`modeling`, `kernels.moe`): where a training
    forward hands its aux loss to the forward's list, and where the routed experts need the per-expert counts on
    the host (the CPU segment loop, expert parallelism's all-to-alls, emulated low precision; on a GPU with
    torch._grouped_mm in bf16 the experts trace whole); under torchrun the router and the experts are FSDP units of
    their own. Shapes are static (`dynamic=False`): a new sequence length compiles its own graphs, and
    tensor-parallel DTensors never meet symbolic shapes (torch 2.13's DTensor sharding propagation rejects them)."""
    from ..kernels.linear import widen_bf16_on_cpu
    from ..modeling import Block, LatentMoE
    from ..utils import prepare_compile

    # Decided once per process by a probe Dynamo does not trace: decide it now rather than in the first graph.
    widen_bf16_on_cpu()
    prepare_compile()  # the host-loop paths of the experts run eagerly between graphs
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    # Compiled entries of Block.forward: one per kind of mixer, mode (training / evaluation), with or without document
    # ids, and sequence length: more than Dynamo's default of 8 per function.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in blocks:
        block.compile(fullgraph=not isinstance(block.mixer, LatentMoE), dynamic=False, backend=backend)
    return len(blocks)


def build_model(recipe, ckpt: str | None) -> HybridMoEForCausalLM:
    """Native: from a checkpoint being resumed, else from `model.init_from`, else a fresh init of the preset. An SFT
    recipe's `sft.mtp_loss_weight` replaces the config's. The recipe's `precision` section (emulated NVFP4 GEMMs)
    is applied to the model and its summary printed."""
    m = recipe.model
    overrides = dict(m.overrides)
    if hasattr(recipe, "sft"):
        overrides["mtp_loss_weight"] = recipe.sft.mtp_loss_weight
    dtype = DTYPES[recipe.train.precision]
    source = ckpt or resolve_init(m.init_from)
    if source is not None and not os.path.exists(os.path.join(source, "config.json")):
        raise ValueError(f"{source} has no config.json: not a model directory")
    if ckpt is not None and is_distributed_checkpoint(ckpt):
        # the weights come from the DCP shards after sharding (the directory may hold no full copy)
        model = HybridMoEForCausalLM(HybridMoEConfig.from_pretrained(ckpt), dtype=dtype)
    elif source is not None:
        model = HybridMoEForCausalLM.from_pretrained(source, dtype=dtype)
        if overrides:  # e.g. a loss weight changed for this stage; shapes must not change
            model.config = model.config.replace(**overrides)
    else:
        config = HybridMoEConfig.from_preset(m.preset, **overrides)
        if "router_aux_loss_coef" not in overrides:
            config = config.replace(router_aux_loss_coef=recipe.balance.aux_loss_coef)
        model = HybridMoEForCausalLM(config, dtype=dtype)
    model.backbone.gradient_checkpointing = recipe.train.activation_checkpointing
    precision = getattr(recipe, "precision", None)
    if precision is not None and precision.recipe != "none":
        summary = apply_precision(model, precision.policy())
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(summary, flush=True)
    model.train()
    return model


def resolve_init(path: str | None) -> str | None:
    """`model.init_from` may name a model directory or a run directory (its newest checkpoint is used)."""
    if path is None or os.path.exists(os.path.join(path, "config.json")):
        return path
    newest = latest_checkpoint(path)
    if newest is None:
        raise ValueError(f"model.init_from={path!r} is neither a model directory nor a run with checkpoints")
    return newest


def load_transformers_model(recipe, ckpt: str | None):
    """transformers: the model of `model.init_from` through `hybridmoe.automodel`, or of the one-process checkpoint
    being resumed; with `model.lora`, the base model with new adapters (or the checkpoint's)."""
    from ..automodel import AutoModelForCausalLM, apply_lora, load_lora

    m = recipe.model
    dtype = DTYPES[recipe.train.precision]
    resumed = ckpt if ckpt is not None and not is_distributed_checkpoint(ckpt) else None
    if m.lora is None:
        return AutoModelForCausalLM.from_pretrained(resumed or m.init_from, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(m.init_from, dtype=dtype)
    if resumed is not None:  # the adapters of the checkpoint (base weights frozen, adapters trainable)
        return load_lora(model, resumed)
    targets = m.lora.targets if m.lora.targets is not None else "all-linear"
    return apply_lora(model, r=m.lora.r, alpha=m.lora.alpha, target_modules=targets, experts=m.lora.experts)


def autocast(model, precision: str):
    """bf16 autocast over fp32 weights (train.precision autocast-bf16), else nothing."""
    if precision != "autocast-bf16":
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)


def native_forward_backward(model, micro_batches, precision: str) -> dict[str, float]:
    """Forward and backward of a native model over the micro-batches of one optimizer step; the gradients of
    `loss / len(micro_batches)` accumulate. Each micro-batch: input_ids, labels, and optionally document_ids and
    loss_weights. Returns the mean of each loss part over the micro-batches."""
    accum = len(micro_batches)
    sums: dict[str, float] = {}
    for batch in micro_batches:
        with autocast(model, precision):
            out = model(
                batch["input_ids"],
                labels=batch["labels"],
                document_ids=batch.get("document_ids"),
                return_logits=False,
                loss_weights=batch.get("loss_weights"),
            )
        (out.loss / accum).backward()
        for name in LOSS_PARTS:
            value = getattr(out, name)
            if value is not None:
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / accum
    return sums


def transformers_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token of a transformers MoE model, as `accounting.flops_per_token` counts them: 6 per
    active matmul parameter (routed experts counted top-k of n, the embedding left out), plus attention's
    QK^T and AV over the causal half of the context for every layer with k_proj."""
    from ..automodel import find_moe_experts

    c = model.config
    params = {id(p): p.numel() for p in model.parameters()}
    total = sum(params.values())
    embed = model.get_input_embeddings()
    total -= sum(params.get(id(p), 0) for p in embed.parameters())
    k = getattr(c, "num_experts_per_tok", None)
    for _, experts in find_moe_experts(model):
        for p in experts.parameters(recurse=False):
            if p.dim() == 3 and k:
                total -= p.numel() * (p.shape[0] - k) // p.shape[0]
    layers = sum(1 for name, _ in model.named_modules() if name.endswith("k_proj"))
    heads, head_dim = getattr(c, "num_attention_heads", 0), getattr(c, "head_dim", None) or 0
    attn = layers * 2 * 2 * heads * head_dim * (seq_len + 1) / 2
    return 3 * (2 * total + attn)


def save_final(recipe, model, tokenizer, out_dir: str, par=None) -> str:
    """OUT/final: a transformers model as a plain Hugging Face directory (LoRA: merged; the adapter in
    final/adapter), with the tokenizer. Under torchrun the full state dict is gathered and rank 0 writes it from
    an unsharded copy of the model."""
    final = os.path.join(out_dir, "final")
    if par is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if par.is_main:
            whole = load_transformers_model(recipe, None)
            whole.load_state_dict(full)
            save_final(recipe, whole, tokenizer, out_dir)
        par.barrier()
        return final
    tmp = tempfile.mkdtemp(prefix=".final.", dir=out_dir)
    try:
        if recipe.model.lora is not None:
            from ..automodel import merge_lora, save_lora

            save_lora(model, os.path.join(tmp, "adapter"))
            model = merge_lora(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
