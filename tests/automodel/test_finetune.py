"""Supervised fine-tuning of Hugging Face MoE models: packed conversations kept apart in attention and Mamba state,
and `hybridmoe finetune` (the SFT stage with
model.source=transformers, tests/train/test_sft.py) end to end with resume, LoRA and its flags' errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import transformers

from hybridmoe.automodel import AutoModelForCausalLM
from hybridmoe.data.tokenizer import train_tokenizer
from hybridmoe.train import session as session_mod
from hybridmoe.train.metrics import read_log
from hybridmoe.train.sft import finetune_recipe, sft

transformers.logging.set_verbosity_error()

CHATS = [
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Two plus two is four."}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green."},
    ],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there, friend."}],
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    text = root / "corpus.txt"
    lines = [m["content"] for chat in CHATS for m in chat] * 20
    text.write_text("\n".join(lines))
    train_tokenizer([text], root / "tok", vocab_size=400, min_frequency=1, show_progress=False)
    return str(root / "tok")


def _write_chats(path, chats):
    with open(path, "w") as fh:
        for chat in chats:
            fh.write(json.dumps({"messages": chat}) + "\n")


def _qwen3_moe(vocab):
    return transformers.Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
        initializer_range=0.1, tie_word_embeddings=False,
    )  # fmt: skip


def _nemotron_h(vocab):
    return transformers.NemotronHConfig(
        vocab_size=vocab, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        layers_block_type=["linear_attention", "moe", "full_attention", "linear_attention"], intermediate_size=48,
        mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=8, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, n_group=1,
        topk_group=1, num_nextn_predict_layers=0, initializer_range=0.1, eos_token_id=None,
    )  # fmt: skip


@pytest.mark.parametrize("make_config", [_qwen3_moe, _nemotron_h])
def test_packed_conversations_do_not_see_each_other(make_config):
    """Logits of a conversation packed after another equal its logits alone: attention through position_ids,
    nemotron_h's Mamba layers through seq_idx."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(97)).eval()
    a, b = torch.randint(0, 97, (1, 11)), torch.randint(0, 97, (1, 13))
    packed = torch.cat([a, b], 1)
    position_ids = torch.cat([torch.arange(11), torch.arange(13)])[None]
    extra = {}
    if "nemotron" in model.config.model_type:
        extra["seq_idx"] = torch.tensor([[0] * 11 + [1] * 13])
    with torch.no_grad():
        together = model(packed, position_ids=position_ids, use_cache=False, **extra).logits
        alone = model(b, use_cache=False).logits
    assert (together[:, 11:] - alone).abs().max() < 1e-5


def _model_dir(tmp_path, tokenizer_dir, make_config):
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config(len(tok)))
    path = tmp_path / "base"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("make_config", [_qwen3_moe, _nemotron_h])
def test_finetune_learns_saves_and_resumes_exactly(tmp_path, tokenizer_dir, make_config):
    base = _model_dir(tmp_path, tokenizer_dir, make_config)
    data = tmp_path / "chats.jsonl"
    _write_chats(data, CHATS * 4)
    out_dir = str(tmp_path / "run")
    recipe = finetune_recipe(
        model=base, data=str(data), out_dir=out_dir, seq_len=96, batch_size=2, steps=6, lr=3e-3, dtype="fp32",
        save_every=3, progress=False,
    )  # fmt: skip
    assert recipe.model.source == "transformers" and recipe.sft.loss_normalization == "token"
    summary = sft(recipe, peak_gflops=100.0)
    log = read_log(os.path.join(out_dir, "log.jsonl"))
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["loss"] < log[0]["loss"]
    # the final directory is a plain transformers model with the tokenizer
    final = transformers.AutoModelForCausalLM.from_pretrained(summary["final"])
    assert final.config.model_type == make_config(8).model_type
    assert transformers.AutoTokenizer.from_pretrained(summary["final"]).chat_template
    # resume from step 3 (as if interrupted after it): steps 4-6 log the same losses
    shutil.rmtree(os.path.join(out_dir, "checkpoints", "step-0000006"))
    sft(recipe, resume=True, peak_gflops=100.0)
    again = read_log(os.path.join(out_dir, "log.jsonl"))
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    for first, second in zip(log[3:], again[3:]):
        assert second["loss"] == pytest.approx(first["loss"], rel=1e-6, abs=1e-7)


def test_finetune_rejects_bad_arguments(tmp_path, tokenizer_dir):
    data = tmp_path / "chats.jsonl"
    _write_chats(data, CHATS)
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        finetune_recipe(model=str(tmp_path), data=str(data))
    base = _model_dir(tmp_path, tokenizer_dir, _qwen3_moe)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        finetune_recipe(model=base, data=str(data), batch_size=3, micro_batch_size=2)
    with pytest.raises(ValueError, match="must split into 2 ranks"):
        finetune_recipe(model=base, data=str(data), batch_size=3, world_size=2)
    with pytest.raises(ValueError, match="dtype='float16'"):
        finetune_recipe(model=base, data=str(data), dtype="float16")
    with pytest.raises(ValueError, match="steps=0: must be >= 1"):  # it trained an epoch instead
        finetune_recipe(model=base, data=str(data), steps=0)
    with pytest.raises(ValueError, match="more than seq_len"):
        sft(finetune_recipe(model=base, data=str(data), seq_len=8, progress=False, out_dir=str(tmp_path / "r")))


def test_finetune_lora_resumes_and_merges(tmp_path, tokenizer_dir, capsys, monkeypatch):
    """`hybridmoe finetune --lora`: only adapters train, resume is exact, final/ is the merged model (plain
    transformers) with the PEFT adapter beside it."""
    from hybridmoe.cli import main

    monkeypatch.setattr(session_mod, "_matmul_peak", lambda: 100.0)  # MFU's peak: seconds of matmuls otherwise
    base = _model_dir(tmp_path, tokenizer_dir, _qwen3_moe)
    data = tmp_path / "chats.jsonl"
    _write_chats(data, CHATS * 4)
    out = tmp_path / "run"
    args = ["finetune", "--model", base, "--data", str(data), "--out", str(out), "--seq-len", "96",
            "--batch-size", "2", "--steps", "4", "--lr", "1e-2", "--dtype", "fp32", "--lora", "--lora-r", "4",
            "--save-every", "2"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    log = read_log(out / "log.jsonl")
    assert log[-1]["loss"] < log[0]["loss"]
    assert os.path.isfile(out / "checkpoints" / "step-0000002" / "adapter_config.json")
    merged = transformers.AutoModelForCausalLM.from_pretrained(summary["final"])
    plain = transformers.AutoModelForCausalLM.from_pretrained(base)
    changed = [n for n, p in merged.state_dict().items() if not torch.equal(p, plain.state_dict()[n])]
    assert changed and all("proj" in n for n in changed)  # the adapted linears and experts moved, nothing else
    assert os.path.isfile(os.path.join(summary["final"], "adapter", "adapter_model.safetensors"))
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    assert main([*args, "--resume"]) == 0
    again = read_log(out / "log.jsonl")
    for first, second in zip(log[2:], again[2:]):
        assert second["loss"] == pytest.approx(first["loss"], rel=1e-6, abs=1e-7)
