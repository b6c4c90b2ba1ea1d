"""The SFT stage (`train.sft`): the native model (MTP included) on packed conversations, exact resume, the two
loss normalizations against a direct computation over the global batch, the transformers source against an
independent plain training loop, and the recipe."""

from __future__ import annotations

import math
import os
import random
import time

import pytest
import torch
import torch.nn.functional as F
import transformers
from test_finetune import CHATS, _model_dir, _qwen3_moe, _write_chats, tokenizer_dir  # noqa: F401 (fixture)

from hybridmoe import HybridMoEForCausalLM
from hybridmoe.data.sft import IGNORE_INDEX, load_sft_samples
from hybridmoe.train.config import SFTRecipe
from hybridmoe.train.metrics import read_log
from hybridmoe.train.model import build_model
from hybridmoe.train.sft import loss_weights, sft

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    _write_chats(path, CHATS * 4)
    return str(path)


def native_recipe(out_dir, chats, tokenizer_dir, steps=4, **sections) -> SFTRecipe:  # noqa: F811
    d = {
        "model": {"preset": "debug"},
        "data": {
            "datasets": {chats: 1.0},
            "tokenizer": tokenizer_dir,
            "seq_len": 96,
            "batch_size": 2,
            "grad_accum": 2,
        },  # fmt: skip
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "schedule": "cosine"},
        "train": {
            "steps": steps,
            "out_dir": str(out_dir),
            "progress": False,
            "tensorboard": False,
            "peak_gflops": 100.0,
        },  # fmt: skip
    }
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    return SFTRecipe.from_dict(d)


def step_records(out_dir):
    return [r for r in read_log(os.path.join(out_dir, "log.jsonl")) if "loss" in r]


def test_native_sft_trains_the_mtp_layers_and_resumes_exactly(tmp_path, chats, tokenizer_dir):  # noqa: F811
    full = sft(native_recipe(tmp_path / "full", chats, tokenizer_dir, steps=6))
    records = step_records(tmp_path / "full")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[-1]["loss"] < records[0]["loss"]
    for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm", "lr", "tokens", "tokens_per_s", "mfu",
                "step_s", "loss_tokens", "padding", "expert_imbalance"):  # fmt: skip
        assert records[-1][key] is not None and math.isfinite(records[-1][key]), key
    assert records[-1]["tokens"] == 6 * 4 * 96 and 0 < records[-1]["padding"] < 1
    # the loss is lm + 0.3 * mtp + aux (the reference's SFT MTP weight), and the checkpoint keeps that weight
    r = records[-1]
    assert r["loss"] == pytest.approx(r["lm_loss"] + 0.3 * r["mtp_loss"] + 1e-4 * r["aux_loss"], rel=1e-5)
    saved = HybridMoEForCausalLM.from_pretrained(full["checkpoint"])
    assert saved.config.mtp_loss_weight == 0.3 and any(n.startswith("mtp.") for n, _ in saved.named_parameters())
    assert os.path.isfile(os.path.join(full["checkpoint"], "tokenizer.json"))
    # stopped after 2 steps (mid-epoch: 6 samples, 4 per step) and resumed: the same losses as the unbroken run
    part = native_recipe(tmp_path / "part", chats, tokenizer_dir, steps=6)
    first = sft(part, stop_after=2)
    assert first["interrupted"] and first["stopped"] == "stop_after" and first["steps"] == 2
    second = sft(part, resume=True)
    assert second["start_step"] == 2 and second["steps"] == 6
    resumed = step_records(tmp_path / "part")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(records, resumed):
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm", "lr", "tokens", "loss_tokens"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])


def test_replan_fits_the_schedule_to_the_pace_and_survives_a_resume(tmp_path, chats, tokenizer_dir, monkeypatch):  # noqa: F811
    from test_session import SlowClock

    from hybridmoe.train import session as session_mod
    from hybridmoe.train.optim import lr_at

    SlowClock(100.0).slow_down(monkeypatch, session_mod)  # every step takes 100 s more than it does
    r = native_recipe(tmp_path / "run", chats, tokenizer_dir, steps=5, train={"time_limit_s": 1000, "replan_at": 3})
    first = sft(r, stop_after=5)
    # at step 3, ~300 s in: the pace since step 1 is 100 s, 700 s are left; the last step starts with the slowest
    # step (100 s) left: 3 + 1 + (0.98 * 700 - 100) // 100 = 9
    assert first["replanned_steps"] == 9 and first["stopped"] == "stop_after" and first["steps"] == 5
    second = sft(r, resume=True)  # the limit counts from each start; the re-planned count is the checkpoint's
    assert second["steps"] == 9 and "interrupted" not in second and "replanned_steps" not in second
    records = step_records(tmp_path / "run")
    assert [x["step"] for x in records] == list(range(1, 10))
    # steps 1-3 ran on the plan of 5 steps, the rest on the cosine of 9
    assert [x["lr"] for x in records] == [lr_at(s, 5 if s < 3 else 9, r.optim) for s in range(9)]
    with pytest.raises(ValueError, match="replan_at"):
        native_recipe(tmp_path / "x", chats, tokenizer_dir, train={"replan_at": -1}).validate()
    with pytest.raises(ValueError, match="replan_at=1.*>= 2"):
        native_recipe(tmp_path / "x", chats, tokenizer_dir, train={"replan_at": 1}).validate()


def test_replan_agrees_across_ranks():
    from hybridmoe.train.session import _replan

    class TwoRanks:  # par.sum as seen by one of 2 ranks whose other rank counted `other` steps
        world_size = 2

        def __init__(self, other):
            self.other = other

        def sum(self, values):
            return [values[0] + self.other]

    now = time.monotonic()
    # 1 s a step; the last step starts with the slowest (3 s) left: 1 + (98% of 100.5 s - 3 s) / 1 s = 96 more
    assert _replan(10, (now - 9.0, 1), now + 100.5, 3.0, None) == 10 + 96
    assert _replan(10, (now - 9.0, 1), now + 100.5, 3.0, TwoRanks(60)) == (106 + 60) // 2
    assert _replan(10, (now - 9.0, 1), now - 5.0, 3.0, None) == 11  # past the deadline: one more step


def test_native_sft_conversations_apart_assistant_loss(tmp_path, chats, tokenizer_dir, monkeypatch):  # noqa: F811
    """document_ids reach the model; loss weights are positive exactly on the assistant targets."""
    seen = []
    real = HybridMoEForCausalLM.forward

    def spy(self, input_ids, labels=None, document_ids=None, loss_weights=None, **kw):
        if self.training:
            seen.append((labels, document_ids, loss_weights))
        return real(self, input_ids, labels=labels, document_ids=document_ids, loss_weights=loss_weights, **kw)

    monkeypatch.setattr(HybridMoEForCausalLM, "forward", spy)
    sft(native_recipe(tmp_path / "run", chats, tokenizer_dir, steps=1))
    assert len(seen) == 2  # grad_accum micro-batches
    for labels, docs, weights in seen:
        assert docs is not None and int(docs.max()) > 0  # several conversations per packed sample
        targets = labels != IGNORE_INDEX
        targets[:, 0] = False
        assert bool((weights[targets] > 0).all()) and not bool(weights[~targets].any())


def _reference_loss(model, batch, normalization):
    """The loss of a global batch computed directly: every conversation's per-token CE from full logits."""
    per_conv, total, n = [], 0.0, 0
    with torch.no_grad():
        for s in batch:
            logits = model(s["input_ids"][None], document_ids=s["document_ids"][None]).logits[0, :-1]
            y = s["labels"][1:]
            ce = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="none")
            docs = s["document_ids"][1:]
            for d in docs.unique():
                mask = (docs == d) & (y != IGNORE_INDEX)
                if mask.any():
                    per_conv.append(float(ce[mask].mean()))
                    total += float(ce[mask].sum())
                    n += int(mask.sum())
    return total / n if normalization == "token" else sum(per_conv) / len(per_conv)


@pytest.mark.parametrize("normalization", ["token", "conversation"])
def test_loss_normalization_over_the_global_batch(tmp_path, chats, tokenizer_dir, normalization):  # noqa: F811
    """The first step's logged LM loss (before any update) equals the token mean, or the mean of conversation
    means, over all 4 samples of the global batch (2 micro-batches of 2)."""
    recipe = native_recipe(tmp_path / "run", chats, tokenizer_dir, steps=1, sft={"loss_normalization": normalization})
    sft(recipe)
    logged = step_records(tmp_path / "run")[0]["lm_loss"]
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe, None).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    samples, _ = load_sft_samples(chats, tok, 96, seed=0)
    order = list(range(len(samples)))
    random.Random(0).shuffle(order)
    batch = [samples[i] for i in order[:4]]
    expected = _reference_loss(model, batch, normalization)
    assert logged == pytest.approx(expected, rel=1e-5)
    other = _reference_loss(model, batch, "token" if normalization == "conversation" else "conversation")
    assert abs(other - expected) > 1e-3  # the two normalizations differ on this batch: the test can tell them apart


def test_loss_weights_sum_to_one_per_global_batch():
    labels = torch.tensor([-100, 5, 5, -100, -100, 7, 7, 7, 7, -100])
    docs = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 2])
    batch = [{"labels": labels, "document_ids": docs}, {"labels": labels.roll(-1), "document_ids": docs}]
    token = loss_weights(batch, "token")
    assert float(sum(w.sum() for w in token)) == pytest.approx(1.0)
    nonzero = torch.cat(token)[torch.cat(token) > 0]
    assert nonzero.tolist() == pytest.approx([1 / 11] * 11)  # 6 + 5 targets (the second's label at 0 dropped)
    conv = loss_weights(batch, "conversation")
    assert float(sum(w.sum() for w in conv)) == pytest.approx(1.0)
    assert conv[0][1] == pytest.approx(1 / (4 * 2)) and conv[0][5] == pytest.approx(1 / (4 * 4))


def _plain_reference_losses(base, chats, normalization, steps, batch, micro, lr):
    """An independent plain loop: transformers' own model (no hybridmoe kernels), the packed samples in seeded
    epoch order, the global batch's loss normalization, AdamW (0.9, 0.95) on a cosine schedule to 0, clip 1."""
    tok = transformers.AutoTokenizer.from_pretrained(base)
    samples, _ = load_sft_samples(chats, tok, 96, seed=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    order = []
    for epoch in range(10):
        o = list(range(len(samples)))
        random.Random(epoch).shuffle(o)
        order += o
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        rows = [samples[i] for i in order[step * batch : (step + 1) * batch]]
        weights = [None] * len(rows)
        if normalization == "conversation":
            convs = [(i, d) for i, s in enumerate(rows) for d in s["document_ids"].unique()
                     if ((s["labels"][1:] != IGNORE_INDEX) & (s["document_ids"][1:] == d)).any()]  # fmt: skip
            for i, s in enumerate(rows):
                w = torch.zeros(96)
                for j, d in convs:
                    if j == i:
                        mask = (s["document_ids"] == d) & (s["labels"] != IGNORE_INDEX)
                        mask[0] = False
                        w[mask] = 1 / (int(mask.sum()) * len(convs))
                weights[i] = w
        n = sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in rows)
        total = 0.0
        for k in range(0, batch, micro):
            part = {key: torch.stack([s[key] for s in rows[k : k + micro]]) for key in rows[0]}
            logits = model(input_ids=part["input_ids"], position_ids=part["position_ids"], use_cache=False).logits
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), part["labels"][:, 1:].flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="none")  # fmt: skip
            if normalization == "token":
                loss = ce.sum() / n
            else:
                loss = (ce * torch.stack(weights[k : k + micro])[:, 1:].flatten()).sum()
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


@pytest.mark.parametrize("normalization", ["token", "conversation"])
def test_transformers_source_matches_a_plain_reference_loop(tmp_path, tokenizer_dir, chats, normalization):  # noqa: F811
    base = _model_dir(tmp_path, tokenizer_dir, _qwen3_moe)
    recipe = SFTRecipe.from_dict(
        {
            "model": {"source": "transformers", "init_from": base},
            "data": {"datasets": {chats: 1.0}, "seq_len": 96, "batch_size": 2, "grad_accum": 2},
            "sft": {"loss_normalization": normalization},
            "optim": {"lr": 3e-3, "min_lr": 0.0, "schedule": "cosine", "weight_decay": 0.0},
            "train": {
                "steps": 3,
                "precision": "fp32",
                "out_dir": str(tmp_path / "run"),
                "progress": False,
                "tensorboard": False,
                "peak_gflops": 100.0,
            },  # fmt: skip
        }
    )
    summary = sft(recipe)
    got = [r["loss"] for r in step_records(tmp_path / "run")]
    expected = _plain_reference_losses(base, chats, normalization, steps=3, batch=4, micro=2, lr=3e-3)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert expected[-1] < expected[0]
    final = transformers.AutoModelForCausalLM.from_pretrained(summary["final"])
    assert final.config.model_type == "qwen3_moe"


def test_recipe_errors_name_the_key(tmp_path, chats, tokenizer_dir):  # noqa: F811
    def check(match, **sections):
        with pytest.raises(ValueError, match=match):
            native_recipe(tmp_path, chats, tokenizer_dir, **sections).validate()

    check("model.source='hf'", model={"source": "hf"})
    check("not a Hugging Face model directory", model={"source": "transformers", "init_from": str(tmp_path)})
    check("model.lora is for model.source=transformers", model={"lora": {"r": 4}})
    check("sft.mtp_loss_weight", model={"overrides": {"mtp_loss_weight": 0.5}})
    check("sft.loss_normalization='sample'", sft={"loss_normalization": "sample"})
    check("sft.reasoning_off_fraction=1.5", sft={"reasoning_off_fraction": 1.5})
    check("data.epochs=0", data={"epochs": 0})
    with pytest.raises(ValueError, match="data.datasets is empty"):
        SFTRecipe.from_dict({"data": {"datasets": {}}}).validate()
    with pytest.raises(ValueError, match="unknown key"):
        SFTRecipe.from_dict({"sft": {"normalization": "token"}})


def test_every_shipped_sft_recipe_parses_and_validates():
    names = sorted(f for f in os.listdir(RECIPES) if f.endswith(".yaml") and "sft" in f)
    assert {"tiny-sft.yaml", "nano-30b-a3b-sft.yaml", "super-120b-a12b-sft.yaml", "ultra-550b-a55b-sft.yaml"} <= set(
        names
    )
    for name in names:
        r = SFTRecipe.from_yaml(os.path.join(RECIPES, name))
        if r.model.source == "native":
            r.validate()
        if "tiny" not in name:  # the published sizes: the reference's SFT hyperparameters
            assert (r.optim.lr, tuple(r.optim.betas), r.optim.weight_decay, r.sft.mtp_loss_weight) == (
                1e-5, (0.9, 0.95), 0.1, 0.3
            )  # fmt: skip
