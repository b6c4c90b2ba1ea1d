"""Run checkpoints: self-contained Hugging Face model directories plus what resuming a training run needs.

Every training stage (`train.session`) saves and resumes through these functions, so a pretraining, long-context
or SFT run leaves checkpoints of one format. The model part is written in the Hugging Face layout of
`hybridmoe.checkpoint` (the model in and out, without trainer state), or by the stage (a LoRA run's adapters).

    out_dir/checkpoints/step-0000100/
        config.json, model.safetensors       the model in the published nemotron_h layout (transformers loads it)
        tokenizer files                      copied from the recipe's tokenizer, so the directory is usable alone
        recipe.yaml                          the resolved recipe
        trainer_state/state.json             step, tokens, the stage's data position
        trainer_state/optimizer.pt           optimizer state and RNG state
    out_dir/checkpoints/latest               the name of the newest complete checkpoint

A checkpoint is written under a temporary name (`.step-0000100.<random>`, `.step-0000100.partial` under torchrun)
and renamed when complete, so a crash never leaves a partial directory under a final name; the oldest checkpoints
beyond `keep_last` are then removed (except those whose step is a multiple of `keep_every`, when it is not 0:
milestones to evaluate later), and so are temporary names a killed save left behind (at the next save or
resume). Every file is fsynced before the rename that publishes the directory.

The `.pt` files hold only tensors, numbers, strings, lists and dicts, and are read with `torch.load(...,
weights_only=True)`: a checkpoint may come from someone else, and unpickling arbitrary objects runs their code
(https://pytorch.org/docs/stable/notes/serialization.html#weights-only).

Runs under torchrun write distributed checkpoints instead: every rank saves its own shards of the model and
optimizer with torch.distributed.checkpoint (DCP), which can be loaded back on any number of ranks and with any
layout (another tp degree: `load_distributed_checkpoint` converts the rows tensor parallelism orders per degree):

    out_dir/checkpoints/step-0000100/
        config.json, tokenizer files, recipe.yaml
        model.safetensors                    only with train.consolidate: the full model, gathered on rank 0
        dcp/                                 model and optimizer shards (`hybridmoe export` makes an HF directory)
        trainer_state/state.json             step, tokens, loader state (the same on every rank)
        trainer_state/rng-<rank>.pt          each rank's RNG state
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import re
import shutil
import tempfile

import torch

from ..utils import atomic_write, atomic_write_text

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)

# What a save writes under a temporary name in checkpoints/: the directory (tempfile.mkdtemp's 8 random characters,
# or the fixed `.partial` of distributed saves) and `latest` (utils.atomic_write). Nothing else there is touched.
_UNFINISHED = re.compile(r"\.step-\d{7,}\.(partial|[a-z0-9_]{8})|\.latest\.[a-z0-9_]{8}\.tmp")

log = logging.getLogger(__name__)


def save_checkpoint(
    out_dir,
    step,
    model,
    optimizer,
    state: dict,
    recipe_yaml: str,
    tokenizer_dir,
    keep_last=2,
    save_model=None,
    keep_every=0,
):
    """Write checkpoint `step` atomically. save_model(directory) writes the model part (default: the model's
    save_pretrained; a LoRA run saves its adapters instead)."""
    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    remove_unfinished_saves(out_dir)
    name = f"step-{step:07d}"
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=root)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is a normal directory
    try:
        (save_model or model.save_pretrained)(tmp)
        if tokenizer_dir:
            _copy_present(tokenizer_dir, tmp, TOKENIZER_FILES)
        atomic_write_text(os.path.join(tmp, "recipe.yaml"), recipe_yaml)
        os.makedirs(os.path.join(tmp, "trainer_state"))
        payload = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
        atomic_write(os.path.join(tmp, "trainer_state", "optimizer.pt"), lambda p: torch.save(payload, p))
        atomic_write_text(os.path.join(tmp, "trainer_state", "state.json"), json.dumps({"step": step, **state}))
        return _publish(out_dir, tmp, name, keep_last, keep_every)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left under a temporary name (once renamed: a no-op)
        raise


def _copy_present(src_dir, dst_dir, names) -> None:
    """Copy those of `names` that exist in src_dir (each fsynced, as every file of a checkpoint is)."""
    for f in names:
        src = os.path.join(src_dir, f)
        if os.path.exists(src):
            atomic_write(os.path.join(dst_dir, f), functools.partial(shutil.copyfile, src))


def remove_unfinished_saves(out_dir) -> list[str]:
    """Remove what a save killed before it finished left in out_dir/checkpoints (the temporary names above, and
    only those); returns the names removed."""
    root = os.path.join(out_dir, "checkpoints")
    names = sorted(n for n in os.listdir(root) if _UNFINISHED.fullmatch(n)) if os.path.isdir(root) else []
    for name in names:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
        log.warning("%s: removed %s, left by a checkpoint save that did not finish", root, name)
    return names


def _publish(out_dir, tmp, name, keep_last, keep_every=0) -> str:
    """Rename a complete checkpoint directory to its final name, point `latest` at it, drop the oldest (but the
    multiples of keep_every)."""
    root = os.path.join(out_dir, "checkpoints")
    final = os.path.join(root, name)
    if os.path.exists(final):  # the same step saved again (e.g. interrupted right after a save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(os.path.join(root, "latest"), name + "\n")
    for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        if keep_every > 0 and int(os.path.basename(old).removeprefix("step-")) % keep_every == 0:
            continue
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir) -> list[str]:
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step-") and os.path.isdir(os.path.join(root, n)))
    return [os.path.join(root, n) for n in names]


def latest_checkpoint(out_dir) -> str | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def load_trainer_state(ckpt_dir) -> tuple[dict, dict]:
    """(state.json contents, optimizer.pt payload) of a checkpoint directory."""
    d = os.path.join(ckpt_dir, "trainer_state")
    if not os.path.exists(os.path.join(d, "state.json")):
        raise ValueError(f"{ckpt_dir} has no trainer_state/: it is a model directory, not a resumable checkpoint")
    with open(os.path.join(d, "state.json")) as fh:
        state = json.load(fh)
    payload = load_plain(os.path.join(d, "optimizer.pt"), {"optimizer": dict, "torch_rng": torch.Tensor})
    return state, payload


def load_plain(path, expected: dict[str, type]) -> dict:
    """torch.load a file that must hold plain data only (tensors, numbers, strings, lists, dicts: what the savers
    here write) and a dict with at least the `expected` keys and types. Anything else, including a pickled object
    that would run code when loaded, is a ValueError naming the file and never unpickled."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line), str(e))
        raise ValueError(
            f"{path} holds more than tensors and plain data ({detail}). hybridmoe never writes such a file and does "
            f"not unpickle one (that could run code from it): resume from a checkpoint you wrote, or start afresh "
            f"without --resume"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"{path} cannot be read ({first}): the checkpoint is damaged; resume from an earlier one (remove this "
            f"checkpoint directory) or start afresh without --resume"
        ) from None
    wrong = [k for k, kind in expected.items() if not isinstance(payload, dict) or not isinstance(payload.get(k), kind)]
    if wrong:
        raise ValueError(f"{path} is not a trainer state file: {', '.join(wrong)} missing or of the wrong type")
    return payload


# ---------------------------------------------------------------------------------------------- distributed


def is_distributed_checkpoint(ckpt_dir) -> bool:
    return os.path.isdir(os.path.join(ckpt_dir, "dcp"))


def reference_order(state_dict: dict, config, tp: int) -> dict:
    from ..distributed.tp import reference_order

    return reference_order(state_dict, config, tp)


def save_distributed_checkpoint(
    out_dir,
    step,
    model,
    optimizer,
    state: dict,
    recipe_yaml: str,
    tokenizer_dir,
    par,
    keep_last=2,
    consolidate=True,
    keep_every=0,
):
    """Collective: every rank calls it. Rank 0 owns the directory; all ranks write their DCP shards into it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    root = os.path.join(out_dir, "checkpoints")
    name = f"step-{step:07d}"
    tmp = os.path.join(root, f".{name}.partial")  # the same name on every rank
    if par.is_main:
        remove_unfinished_saves(out_dir)  # before the barrier: no rank writes into checkpoints/ yet
        os.makedirs(os.path.join(tmp, "trainer_state"))
    par.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.path.join(tmp, "dcp"))
    rng_path = os.path.join(tmp, "trainer_state", f"rng-{par.rank}.pt")
    atomic_write(rng_path, lambda p: torch.save({"torch_rng": torch.get_rng_state()}, p))
    full = None
    tp = getattr(model, "tp_degree", 1)  # the DCP shards hold the Mamba rows in tensor parallelism's order
    if consolidate:
        if par.pp > 1:  # each stage holds its own layers: gathered stage by stage (`distributed.pp`)
            from ..distributed.pp import full_state_dict

            full = full_state_dict(model, par)
        else:
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        full = reference_order(full, model.config, tp)
    par.barrier()  # every rank's files are in place before rank 0 renames the directory
    if par.is_main:
        if full is not None:
            save_state_dict_pretrained(model.config, full, tmp)
        else:
            model.config.save_pretrained(tmp)
        if tokenizer_dir:
            _copy_present(tokenizer_dir, tmp, TOKENIZER_FILES)
        atomic_write_text(os.path.join(tmp, "recipe.yaml"), recipe_yaml)
        record = json.dumps({"step": step, "tp": tp, "pp": par.pp, **state})
        atomic_write_text(os.path.join(tmp, "trainer_state", "state.json"), record)
        _publish(out_dir, tmp, name, keep_last, keep_every)
    par.barrier()
    return os.path.join(root, name)


def load_distributed_checkpoint(ckpt_dir, model, optimizer, par) -> dict:
    """Load model and optimizer shards (resharded to this job's layout, whatever the saving job's: its number of
    ranks, pp stages and tp degree) and this rank's RNG state; returns state.json. Works in one process without
    torchrun too (par None)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    with open(os.path.join(ckpt_dir, "trainer_state", "state.json")) as fh:
        state = json.load(fh)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(sd, checkpoint_id=os.path.join(ckpt_dir, "dcp"), no_dist=par is None)
    saved_tp, tp = state.get("tp", 1), getattr(model, "tp_degree", 1)
    if saved_tp != tp:  # the Mamba rows just read are in the saved degree's order
        _reload_tp_rows(sd, os.path.join(ckpt_dir, "dcp"), model.config, saved_tp, tp, no_dist=par is None)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
    rank = par.rank if par is not None else 0
    rng = os.path.join(ckpt_dir, "trainer_state", f"rng-{rank}.pt")
    if not os.path.exists(rng):  # resumed on more ranks than saved: the new ranks take rank 0's state
        rng = os.path.join(ckpt_dir, "trainer_state", "rng-0.pt")
    torch.set_rng_state(load_plain(rng, {"torch_rng": torch.Tensor})["torch_rng"])
    return state


def _reload_tp_rows(sd: dict, dcp_dir: str, config, saved_tp: int, tp: int, no_dist: bool) -> None:
    """Replace in sd (`get_state_dict`'s {"model", "optimizer"}) what tensor parallelism stores in an order of its
    degree's (`distributed.tp.row_order`: the Mamba in_proj and conv1d parameters, and their per-row optimizer
    states, AdamW's exp_avg and exp_avg_sq) by the checkpoint's, read whole, converted from tp degree saved_tp's row
    order to tp's, and laid out as the live tensor (this rank's shard of a DTensor: FSDP's dp shard, 2-D over dp x tp
    with a strided shard under tp; or a plain tensor). One parameter at a time: each rank holds it and its moments
    whole for a moment (at Nano's size an in_proj is 28M values)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, distribute_tensor

    from ..distributed.tp import convert_rows, row_order

    def shard_like(live, full: torch.Tensor, name: str):
        full = convert_rows(name, full.to(live.device), config, saved_tp, tp)
        if isinstance(live, DTensor):
            return distribute_tensor(full, live.device_mesh, live.placements, src_data_rank=None)
        return full

    for name in [n for n in sd["model"] if row_order(n, config, 2) is not None]:  # the same for every degree > 1
        state = sd["optimizer"]["state"].get(name, {})
        moments = [k for k, t in state.items() if torch.is_tensor(t) and t.dim() > 0]  # not AdamW's scalar step
        whole = {
            "model": {name: torch.empty(sd["model"][name].shape, dtype=sd["model"][name].dtype)},
            "optimizer": {"state": {name: {k: torch.empty(state[k].shape, dtype=state[k].dtype) for k in moments}}},
        }
        dcp.load(whole, checkpoint_id=dcp_dir, no_dist=no_dist)
        sd["model"][name] = shard_like(sd["model"][name], whole["model"][name], name)
        for k in moments:
            state[k] = shard_like(state[k], whole["optimizer"]["state"][name][k], name)


def save_state_dict_pretrained(config, state_dict: dict, path: str) -> None:
    """Write a full model state dict (model parameter names) in the Hugging Face layout."""
    from ..modeling import HybridMoEForCausalLM

    model = HybridMoEForCausalLM(config, device="meta")
    model.load_state_dict(state_dict, assign=True, strict=True)
    model.save_pretrained(path)


def export_distributed_checkpoint(ckpt_dir, out_dir) -> str:
    """`hybridmoe export`: a distributed checkpoint (any number of ranks) -> a Hugging Face model directory."""
    import torch.distributed.checkpoint as dcp

    from ..config import HybridMoEConfig
    from ..modeling import HybridMoEForCausalLM

    if not is_distributed_checkpoint(ckpt_dir):
        raise ValueError(f"{ckpt_dir} has no dcp/ directory: it is not a distributed checkpoint")
    config = HybridMoEConfig.from_pretrained(ckpt_dir)
    model = HybridMoEForCausalLM(config, device="meta")
    model.to_empty(device="cpu")
    sd = {"model": model.state_dict()}
    dcp.load(sd, checkpoint_id=os.path.join(ckpt_dir, "dcp"), no_dist=True)
    with open(os.path.join(ckpt_dir, "trainer_state", "state.json")) as fh:
        tp = json.load(fh).get("tp", 1)
    model.load_state_dict(reference_order(sd["model"], config, tp))
    model.save_pretrained(out_dir)
    _copy_present(ckpt_dir, out_dir, (*TOKENIZER_FILES, "recipe.yaml"))
    return out_dir
