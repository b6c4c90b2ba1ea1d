"""Trainer checkpoints: self-contained Hugging Face model directories plus what resuming needs.

    out_dir/checkpoints/step-0000100/
        config.json, model.safetensors       the model in the published nemotron_h layout (transformers loads it)
        tokenizer files                      copied from the recipe's tokenizer, so the directory is usable alone
        recipe.yaml                          the resolved recipe
        trainer_state/state.json             step, tokens, loader state, log position
        trainer_state/optimizer.pt           optimizer state and RNG state
    out_dir/checkpoints/latest               the name of the newest complete checkpoint

A checkpoint is written under a temporary name and renamed when complete, so a crash never leaves a partial
directory under a final name; the oldest checkpoints beyond `keep_last` are then removed.
"""

from __future__ import annotations

import json
import os
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


def save_checkpoint(out_dir, step, model, optimizer, state: dict, recipe_yaml: str, tokenizer_dir, keep_last=2):
    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=root)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is a normal directory
    try:
        model.save_pretrained(tmp)
        if tokenizer_dir:
            for f in TOKENIZER_FILES:
                src = os.path.join(tokenizer_dir, f)
                if os.path.exists(src):
                    shutil.copyfile(src, os.path.join(tmp, f))
        atomic_write_text(os.path.join(tmp, "recipe.yaml"), recipe_yaml)
        os.makedirs(os.path.join(tmp, "trainer_state"))
        payload = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
        atomic_write(os.path.join(tmp, "trainer_state", "optimizer.pt"), lambda p: torch.save(payload, p))
        atomic_write_text(os.path.join(tmp, "trainer_state", "state.json"), json.dumps({"step": step, **state}))
        final = os.path.join(root, name)
        if os.path.exists(final):  # the same step saved again (e.g. interrupted right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(os.path.join(root, "latest"), name + "\n")
    for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
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
    payload = torch.load(os.path.join(d, "optimizer.pt"), weights_only=False)
    return state, payload
