"""MOPD (`train.distill`, `hybridmoe distill`): the advantage on hand-computed log-probabilities, routing, the
tokenizer check, and the stage end to end on `debug` models with test_rl's stand-in agent loop (environments `even`
and `odd`, each with its own random teacher)."""

from __future__ import annotations

import json
import math
import os
import sys
import types

import pytest
import torch
from test_finetune import tokenizer_dir  # noqa: F401 (fixture)
from test_rl import agent, rl_recipe, step_records  # noqa: F401 (fixture)
from transformers import AutoTokenizer

from hybridmoe.config import HybridMoEConfig
from hybridmoe.data.tokenizer import train_tokenizer
from hybridmoe.modeling import HybridMoEForCausalLM
from hybridmoe.train.config import DistillRecipe
from hybridmoe.train.distill import check_tokenizer, distill, mopd_advantages, route


def save_model(path, tokenizer_dir, seed: int, scale: float = 1.0, prefer: str | None = None) -> str:  # noqa: F811
    """A `debug` model (seeded random init, the LM head scaled) with the tokenizer. prefer even | odd: the other
    parity's logits lowered by about 3 (their LM-head rows moved against the mean final hidden state, which nearly
    every position's hidden state points along), so that the model puts ~95% of its mass on the preferred tokens."""
    torch.manual_seed(seed)
    model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug")).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
        if prefer is not None:
            mean = model(torch.randint(0, 400, (32, 12)), logits_to_keep=1).hidden_states.flatten(0, 1).mean(0)
            other = slice(1, None, 2) if prefer == "even" else slice(0, None, 2)
            model.lm_head.weight[other] -= 3.0 * mean / (mean @ mean)
    model.save_pretrained(str(path))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(str(path))
    return str(path)


def distill_recipe(out_dir, tokenizer_dir, teachers, steps=3, distill_keys=None, **sections) -> DistillRecipe:  # noqa: F811
    d = rl_recipe(out_dir, tokenizer_dir, steps=steps, **sections).to_dict()
    d["rl"]["group_size"] = sections.get("rl", {}).get("group_size", 1)
    d["rl"]["prompts_per_step"] = sections.get("rl", {}).get("prompts_per_step", 4)
    d["distill"] = {"teachers": teachers, **(distill_keys or {})}
    return DistillRecipe.from_dict(d)


# ---------------------------------------------------------------------------------------------- the arithmetic


def test_advantages_hand_computed():
    teacher = torch.tensor([-1.0, -2.0, -0.5, -30.0, -0.25], requires_grad=True)
    old = torch.tensor([-1.5, -1.0, -0.5, -1.0, -12.25])
    # log-ratios 0.5, -1, 0, -29, 12: clipped to +-5
    adv, ratio = mopd_advantages(teacher, old, clip=5.0)
    assert ratio.tolist() == [0.5, -1.0, 0.0, -29.0, 12.0]
    assert adv.tolist() == [0.5, -1.0, 0.0, -5.0, 5.0] and not adv.requires_grad
    orm = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0])
    adv, _ = mopd_advantages(teacher, old, 5.0, opd_weight=0.5, orm_advantages=orm, orm_weight=2.0)
    assert adv.tolist() == [0.25 + 2, -0.5 + 2, 0.0 - 2, -2.5 - 2, 2.5]
    with pytest.raises(ValueError, match="orm_advantages"):
        mopd_advantages(teacher, old, 5.0, orm_weight=1.0)


def test_routing():
    teachers = {"math": "/t/math", "code": "/t/code"}
    assert route("math", teachers, "/t/all") == ("math", "/t/math")
    assert route("code", teachers, None) == ("code", "/t/code")
    assert route("search", teachers, "/t/all") == ("default", "/t/all")
    with pytest.raises(ValueError, match="'search' has no teacher"):
        route("search", teachers, None)


def test_recipe_checks(tmp_path, tokenizer_dir):  # noqa: F811
    ok = distill_recipe(tmp_path, tokenizer_dir, {"even": "a", "odd": "b"})
    ok.validate()  # one sample per prompt: allowed without the outcome reward
    assert ok.rl.group_size == 1 and DistillRecipe().rl.group_size == 1
    with pytest.raises(ValueError, match="group of >= 2"):
        distill_recipe(tmp_path, tokenizer_dir, {"even": "a", "odd": "b"}, distill_keys={"orm_weight": 0.5}).validate()
    with pytest.raises(ValueError, match=r"\['odd'\] have no teacher"):
        distill_recipe(tmp_path, tokenizer_dir, {"even": "a"}).validate()
    distill_recipe(tmp_path, tokenizer_dir, {"even": "a"}, distill_keys={"default_teacher": "c"}).validate()
    with pytest.raises(ValueError, match="not in envs.ratios"):
        distill_recipe(tmp_path, tokenizer_dir, {"even": "a", "odd": "b", "math": "c"}).validate()
    with pytest.raises(ValueError, match="logratio_clip"):
        distill_recipe(tmp_path, tokenizer_dir, {"even": "a", "odd": "b"}, distill_keys={"logratio_clip": 0}).validate()


def test_shipped_recipe_parses_and_validates():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "tiny-distill.yaml")
    r = DistillRecipe.from_yaml(path, ["distill.orm_weight=0.5", "rl.group_size=4"])
    r.validate()
    assert r.rl.group_size == 4 and r.distill.opd_weight == 1.0 and r.distill.default_teacher
    assert set(r.distill.teachers) <= set(r.envs.ratios)


def test_tokenizer_mismatch_is_refused(tmp_path, tokenizer_dir, agent):  # noqa: F811
    student = AutoTokenizer.from_pretrained(tokenizer_dir)
    same = save_model(tmp_path / "same", tokenizer_dir, seed=1)
    check_tokenizer(student, tokenizer_dir, same)
    corpus = tmp_path / "other.txt"
    corpus.write_text("\n".join(["a completely different corpus of words", "zebra quartz jumps"] * 50))
    train_tokenizer([corpus], tmp_path / "other-tok", vocab_size=300, min_frequency=1, show_progress=False)
    other = save_model(tmp_path / "other", str(tmp_path / "other-tok"), seed=1)
    with pytest.raises(ValueError, match=f"the teacher {other} and the student {tokenizer_dir}.*vocabularies differ"):
        check_tokenizer(student, tokenizer_dir, other)
    special = AutoTokenizer.from_pretrained(tokenizer_dir)
    special.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    special.save_pretrained(tmp_path / "special")
    save_model(tmp_path / "special", str(tmp_path / "special"), seed=1)
    with pytest.raises(ValueError, match="special tokens differ"):
        check_tokenizer(student, tokenizer_dir, str(tmp_path / "special"))
    bare = tmp_path / "bare"
    HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug")).save_pretrained(str(bare))
    with pytest.raises(ValueError, match="no tokenizer can be loaded"):
        check_tokenizer(student, tokenizer_dir, str(bare))
    # the stage refuses it before building anything
    with pytest.raises(ValueError, match="different tokenizers"):
        distill(distill_recipe(tmp_path / "run", tokenizer_dir, {"even": same, "odd": other}, steps=1))
    assert agent == []  # nothing was sampled


# ---------------------------------------------------------------------------------------------- the stage


def test_teacher_identical_to_student_gives_zero_advantage_and_gradient(tmp_path, tokenizer_dir, agent):  # noqa: F811
    start = save_model(tmp_path / "start", tokenizer_dir, seed=3, scale=5.0)
    recipe = distill_recipe(tmp_path / "run", tokenizer_dir, {"even": start}, steps=1,
                            distill_keys={"default_teacher": start}, model={"init_from": start},
                            optim={"weight_decay": 0.0})  # fmt: skip
    summary = distill(recipe)
    r = step_records(tmp_path / "run")[0]
    assert r["reverse_kl"] == 0.0 and r["reverse_kl_even"] == 0.0 and r["reverse_kl_odd"] == 0.0
    assert r["loss"] == 0.0 and r["pg"] == 0.0 and r["grad_norm"] == 0.0
    assert r["teacher_samples_even"] == 2 and r["teacher_samples_default"] == 2
    trained = summary["model"].state_dict()
    first = HybridMoEForCausalLM.from_pretrained(start).state_dict()
    assert torch.equal(trained["lm_head.weight"], first["lm_head.weight"])  # no gradient, no decay: not moved


def _reverse_kl(student, teacher, env: str, seeds) -> float:
    """The exact KL(student || teacher) of the first generated token's distribution over `env`'s prompts."""
    prompts = torch.tensor([[5 + s % 40, 6, 7 + len(env)] for s in seeds])
    with torch.no_grad():
        s = torch.log_softmax(student.eval()(prompts).logits[:, -1].float(), -1)
        t = torch.log_softmax(teacher.eval()(prompts).logits[:, -1].float(), -1)
    return float((s.exp() * (s - t)).sum(-1).mean())


def test_student_moves_toward_each_environments_teacher(tmp_path, tokenizer_dir, agent):  # noqa: F811
    """Two different teachers: the student's own random init with opposite preferences (even tokens for `even`,
    odd ones for `odd`), so that the KL to each is that preference alone. The sampled reverse-KL gradient is noisy
    (no baseline: every sampled token's advantage is about -KL) and Adam's first steps move every parameter by about
    the learning rate whatever its gradient's size, so the learning rate is small: then the drift the noise adds to
    the KL is second order in it and the descent first order (measured at lr 1e-2: the KL to both teachers rose).
    32 prompts a step keep the noise below the descent: over train seeds 4-11 every run lowered both KLs (by at least
    0.008), where 8 prompts a step raised the `even` one in 3 of 4 seeds."""
    student = save_model(tmp_path / "student", tokenizer_dir, seed=0)
    teachers = {"even": save_model(tmp_path / "t-even", tokenizer_dir, seed=0, prefer="even"),
                "odd": save_model(tmp_path / "t-odd", tokenizer_dir, seed=0, prefer="odd")}  # fmt: skip
    recipe = distill_recipe(tmp_path / "run", tokenizer_dir, teachers, steps=6, optim={"lr": 1e-4},
                            model={"init_from": student}, rl={"group_size": 4, "prompts_per_step": 32})  # fmt: skip
    trained = distill(recipe)["model"]
    start = HybridMoEForCausalLM.from_pretrained(student)
    records = step_records(tmp_path / "run")
    r = records[0]
    for key in ("loss", "pg", "grad_norm", "reward", "accuracy", "mismatch_mean", "staleness_max", "reverse_kl",
                "reverse_kl_even", "reverse_kl_odd", "logratio_clipped"):  # fmt: skip
        assert r[key] is not None and math.isfinite(r[key]), key
    # 32 prompts a step, 4 samples each, half of the prompts per environment: each scored by its own teacher
    assert r["trajectories"] == 128 and r["teacher_samples_even"] == 64 and r["teacher_samples_odd"] == 64
    assert r["reverse_kl"] == pytest.approx((r["reverse_kl_even"] + r["reverse_kl_odd"]) / 2)
    seeds = range(1_000_000, 1_000_016)
    for env in ("even", "odd"):
        teacher = HybridMoEForCausalLM.from_pretrained(teachers[env])
        before, after = _reverse_kl(start, teacher, env, seeds), _reverse_kl(trained, teacher, env, seeds)
        assert after < before, (env, before, after)  # measured: even 0.402 -> 0.398, odd 0.938 -> 0.911


def test_asynchronous_rollouts_as_in_the_rl_stage(tmp_path, tokenizer_dir, agent):  # noqa: F811
    """rl.rollout=async, as test_rl's: a `hybridmoe serve` worker samples and the trainer posts its weights after every
    step. At staleness 0 every batch comes from the trainer's current weights, so the trainer reproduces the worker's
    log-probabilities at every step, and each sample is still scored by its own environment's teacher."""
    teachers = {"even": save_model(tmp_path / "t-even", tokenizer_dir, seed=11, scale=4.0),
                "odd": save_model(tmp_path / "t-odd", tokenizer_dir, seed=12, scale=4.0)}  # fmt: skip
    out = tmp_path / "a"
    rl = {"rollout": "async", "max_staleness": 0, "temperature": 0.6}
    distill(distill_recipe(out, tokenizer_dir, teachers, steps=3, rl=rl))
    records = step_records(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert max(r["staleness_max"] for r in records) == 0 and max(r["mismatch_max"] for r in records) < 1e-3
    for r in records:  # 4 prompts a step, one rollout each, every one scored by a teacher
        assert r["trajectories"] == 4 == r.get("teacher_samples_even", 0) + r.get("teacher_samples_odd", 0)
        assert math.isfinite(r["reverse_kl"]) and r["reverse_kl"] > 0
    assert len({r["loss"] for r in records}) == 3


def test_resume_is_exact(tmp_path, tokenizer_dir, agent):  # noqa: F811
    teachers = {"even": save_model(tmp_path / "t-even", tokenizer_dir, seed=11, scale=4.0),
                "odd": save_model(tmp_path / "t-odd", tokenizer_dir, seed=12, scale=4.0)}  # fmt: skip
    keys = {"orm_weight": 0.5, "logratio_clip": 2.0}
    full = distill_recipe(tmp_path / "full", tokenizer_dir, teachers, steps=4, distill_keys=keys, rl={"group_size": 2})
    distill(full)
    records = step_records(tmp_path / "full")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[0]["trajectories"] == 8
    assert 0 < max(r["logratio_clipped"] for r in records) < 1
    part = distill_recipe(tmp_path / "part", tokenizer_dir, teachers, steps=4, distill_keys=keys, rl={"group_size": 2})
    first = distill(part, stop_after=2)
    assert first["interrupted"] and first["steps"] == 2
    assert distill(part, resume=True)["start_step"] == 2
    resumed = step_records(tmp_path / "part")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(records, resumed):
        for key in ("loss", "pg", "grad_norm", "reward", "reverse_kl", "reverse_kl_even", "logratio_clipped"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])


def test_warmup_sft_on_teacher_samples(tmp_path, tokenizer_dir, agent):  # noqa: F811
    """The warm-up: each environment's teacher plays through the agent loop (here a stand-in `play` that records
    which model played), the fully rewarded conversations become SFT data, the student is fine-tuned on them and
    MOPD starts from that checkpoint."""
    played = []

    def play(envs, requests, generator, tokenizer, **kwargs):
        (env,) = envs
        played.append((env, generator.engine.model.lm_head.weight.norm().item(), len(requests)))
        out = []
        for i, (_, seed) in enumerate(requests):
            messages = [
                {"role": "user", "content": f"Say hello {seed}."},
                {"role": "assistant", "content": "Hello there.", "reasoning_content": "Say hello."},
            ]
            episode = types.SimpleNamespace(messages=messages, tools=None)
            out.append(types.SimpleNamespace(episode=episode, finish_reason="stop",
                                             reward=types.SimpleNamespace(total=float(i % 2 == 0))))  # fmt: skip
        return out

    sys.modules["hybridmoe.envs.agent"].play = play
    teachers = {"even": save_model(tmp_path / "t-even", tokenizer_dir, seed=11, scale=20.0),
                "odd": save_model(tmp_path / "t-odd", tokenizer_dir, seed=12, scale=2.0)}  # fmt: skip
    warm = {"warmup": {"samples": 3, "steps": 2, "seq_len": 128, "batch_size": 2, "lr": 1e-3}}
    recipe = distill_recipe(tmp_path / "run", tokenizer_dir, teachers, steps=1, distill_keys=warm)
    summary = distill(recipe)
    norms = {env: HybridMoEForCausalLM.from_pretrained(p).lm_head.weight.norm().item() for env, p in teachers.items()}
    assert [(env, n) for env, n, _ in played] == [("even", pytest.approx(norms["even"])),
                                                  ("odd", pytest.approx(norms["odd"]))]  # fmt: skip
    w = summary["warmup"]
    assert w["kept"] == {"even": 2, "odd": 2} and w["sampled"] == {"even": 3, "odd": 3} and w["conversations"] == 4
    with open(tmp_path / "run" / "warmup" / "data.jsonl") as fh:
        lines = [json.loads(x) for x in fh]
    assert len(lines) == 4 and lines[0]["messages"][1]["reasoning_content"] == "Say hello."
    assert w["checkpoint"].endswith("step-0000002")
    saved = DistillRecipe.from_yaml(os.path.join(summary["checkpoint"], "recipe.yaml"))
    assert saved.model.init_from == w["checkpoint"]  # MOPD started from the warm-up's weights
    # resumed: neither sampled nor trained again
    played.clear()
    distill(distill_recipe(tmp_path / "run", tokenizer_dir, teachers, steps=2, distill_keys=warm), resume=True)
    assert played == []


def test_cli_distill(tmp_path, tokenizer_dir, agent, capsys):  # noqa: F811
    from hybridmoe.cli import main

    teacher = save_model(tmp_path / "t", tokenizer_dir, seed=11)
    path = tmp_path / "distill.yaml"
    recipe = distill_recipe(tmp_path / "run", tokenizer_dir, {}, steps=1, distill_keys={"default_teacher": teacher})
    path.write_text(recipe.to_yaml())
    assert main(["distill", str(path), "rl.prompts_per_step=2"]) == 0
    assert "finished at step 1" in capsys.readouterr().out
    assert step_records(tmp_path / "run")[0]["teacher_samples_default"] == 2
    assert main(["distill", str(path), "distill.orm_weight=1"]) == 2  # group_size 1 cannot have the outcome reward
