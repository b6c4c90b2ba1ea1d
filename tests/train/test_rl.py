"""The GRPO stage (`train.rl`, `hybridmoe rl`) on a `debug` model with a stand-in agent loop.

`fake_agent` replaces `hybridmoe.envs.agent` (make_envs, EngineGenerator, run_episodes with the shared signature):
each episode is two model turns around a tool output (trained: the two turns; not trained: prompt and tool output),
sampled on the real in-process engine, so the trainer's log-probabilities must reproduce the engine's (the packing,
masks and document ids are right only if they do). Environments: `even` rewards a first generated token that is
even, `odd` one that is odd, `easy` gives 1 to even seeds whatever the model says (the pass-rate filter's case)."""

from __future__ import annotations

import math
import os
import sys
import types

import pytest
import torch
from test_finetune import tokenizer_dir  # noqa: F401 (fixture)

from hybridmoe.envs.base import Completion, Environment, Trajectory
from hybridmoe.train.config import RLRecipe
from hybridmoe.train.metrics import read_log
from hybridmoe.train.model import build_model
from hybridmoe.train.rl import collate, pack, rl

TOOL_OUTPUT = [9, 9, 9]


class _Env(Environment):
    def __init__(self, name):
        self.name = name


def _reward(env: str, seed: int, first: int) -> float:
    if env == "easy":
        return float(seed % 2 == 0)
    return float(first % 2 == (0 if env == "even" else 1))


class _EngineGenerator:
    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompts, params):
        outs = self.engine.generate(prompts, params)
        return [Completion(o.token_ids, [lp.logprob for lp in o.logprobs], o.finish_reason) for o in outs]


SEEN: list[tuple[str, int]] = []  # requests run (this process)


def _run_episodes(envs, requests, generator, tokenizer, *, group_size=1, params, difficulty=1, reasoning=True,
                  max_new_tokens=256, group_offset=0):  # fmt: skip
    from dataclasses import replace

    SEEN.extend(requests)
    turn = replace(params, max_tokens=min(3, max_new_tokens), ignore_eos=True, stop_token_ids=[])
    prompts = [[5 + seed % 40, 6, 7 + len(env)] for env, seed in requests for _ in range(group_size)]
    first = generator.generate(prompts, turn)
    second = generator.generate([p + c.token_ids + TOOL_OUTPUT for p, c in zip(prompts, first)], turn)
    out = []
    for k, (p, a, b) in enumerate(zip(prompts, first, second)):
        i = k // group_size
        env, seed = requests[i]
        ids = p + a.token_ids + TOOL_OUTPUT + b.token_ids
        mask = [0] * len(p) + [1] * len(a.token_ids) + [0] * len(TOOL_OUTPUT) + [1] * len(b.token_ids)
        logp = [0.0] * len(p) + a.logprobs + [0.0] * len(TOOL_OUTPUT) + b.logprobs
        out.append(Trajectory(env, seed, group_offset + i, ids, mask, logp, _reward(env, seed, a.token_ids[0]),
                              weight_version=min(a.weight_version, b.weight_version), finish_reason="length",
                              num_tool_calls=1))  # fmt: skip
    return out


def fake_agent() -> types.ModuleType:
    module = types.ModuleType("hybridmoe.envs.agent")
    module.make_envs = lambda names=None: {n: _Env(n) for n in (names or ["even", "odd", "easy"])
                                           if n in ("even", "odd", "easy")}  # fmt: skip
    module.EngineGenerator = _EngineGenerator
    module.run_episodes = _run_episodes
    module.ENVIRONMENTS = {"even": _Env, "odd": _Env, "easy": _Env}
    return module


@pytest.fixture
def agent(monkeypatch):
    monkeypatch.setitem(sys.modules, "hybridmoe.envs.agent", fake_agent())
    SEEN.clear()
    return SEEN


def rl_recipe(out_dir, tokenizer_dir, steps=3, **sections) -> RLRecipe:  # noqa: F811
    d = {
        "model": {"preset": "debug", "tokenizer": tokenizer_dir},
        "envs": {"ratios": {"even": 1.0, "odd": 1.0}, "pool": 16},
        "rl": {
            "group_size": 4,
            "prompts_per_step": 2,
            "max_new_tokens": 3,
            "seq_len": 40,
            "micro_batch_size": 2,
            "max_model_len": 64,
            "max_num_seqs": 8,
        },  # fmt: skip
        "optim": {"lr": 3e-3, "min_lr": 0.0},
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
    return RLRecipe.from_dict(d)


def step_records(out_dir):
    return [r for r in read_log(os.path.join(out_dir, "log.jsonl")) if "loss" in r]


def test_rl_trains_on_engine_samples_logs_and_resumes_exactly(tmp_path, tokenizer_dir, agent):  # noqa: F811
    full = rl(rl_recipe(tmp_path / "full", tokenizer_dir, steps=4))
    records = step_records(tmp_path / "full")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and full["steps"] == 4
    r = records[0]
    for key in ("loss", "pg", "kl", "grad_norm", "lr", "tokens", "tokens_per_s", "mfu", "step_s", "reward",
                "reward_even", "reward_odd", "accuracy", "staleness_max", "staleness_mean", "trajectories",
                "loss_tokens", "zero_variance_groups", "filtered_prompts", "truncated", "clip_fraction",
                "mismatch_mean", "mismatch_max", "mismatch_kl", "tis_clipped", "masked_sequences",
                "expert_imbalance", "rollout_s"):  # fmt: skip
        assert r[key] is not None and math.isfinite(r[key]), key
    # 2 prompts x 4 samples, 2 turns of 3 generated tokens each: 6 loss tokens per trajectory
    assert r["trajectories"] == 8 and r["loss_tokens"] == 48 and r["staleness_max"] == 0
    # every step samples with the weights of that step: the trainer's log-probs are the engine's
    assert max(x["mismatch_max"] for x in records) < 1e-3 and max(x["tis_clipped"] for x in records) == 0
    assert r["reward"] == pytest.approx((r["reward_even"] + r["reward_odd"]) / 2)
    assert all(0 < x["rollout_s"] < x["step_s"] for x in records)  # generation is part of the step
    assert len(set(agent)) == len(agent) == 8  # 4 steps x 2 prompts, no prompt twice (pools of 16)
    assert [env for env, _ in agent] == ["even", "odd"] * 4  # the ratio holds in every batch
    # stopped after 2 steps and resumed: the same prompts, samples and losses as the unbroken run
    part = rl_recipe(tmp_path / "part", tokenizer_dir, steps=4)
    first = rl(part, stop_after=2)
    assert first["interrupted"] and first["steps"] == 2
    assert rl(part, resume=True)["start_step"] == 2
    resumed = step_records(tmp_path / "part")
    assert [x["step"] for x in resumed] == [1, 2, 3, 4]
    for a, b in zip(records, resumed):
        for key in ("loss", "pg", "grad_norm", "reward", "accuracy", "loss_tokens", "mismatch_mean"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])


def test_rl_at_a_temperature_scores_tokens_as_the_engine_sampled_them(tmp_path, tokenizer_dir, agent):  # noqa: F811
    # rl.temperature 0.6: the engine reports logprobs of softmax(logits / 0.6) and the trainer computes the same,
    # so with the weights that sampled them the two agree (raw logprobs on either side would differ by ~0.1-1)
    rl(rl_recipe(tmp_path / "t", tokenizer_dir, steps=2, rl={"temperature": 0.6}))
    records = step_records(tmp_path / "t")
    assert len(records) == 2 and max(x["mismatch_max"] for x in records) < 1e-3
    assert max(x["tis_clipped"] for x in records) == 0


def test_rl_with_asynchronous_rollouts_on_a_serve_worker(tmp_path, tokenizer_dir, agent):  # noqa: F811
    # rl.rollout=async: a `hybridmoe serve` worker process samples over HTTP (processed logprobs at temperature 0.6)
    # and the trainer posts its weights to it after every step. At staleness 0 every batch must come from the
    # trainer's current weights, so the trainer reproduces the worker's logprobs at every step, the first (the
    # starting weights) and the later ones (only if the posted weights arrived and the worker stamped their version).
    out = tmp_path / "a"
    rl(rl_recipe(out, tokenizer_dir, steps=3, rl={"rollout": "async", "max_staleness": 0, "temperature": 0.6}))
    records = step_records(out)
    assert [x["step"] for x in records] == [1, 2, 3]
    assert max(x["staleness_max"] for x in records) == 0 and max(x["mismatch_max"] for x in records) < 1e-3
    # (no check on the losses differing: the samples, and so whether any group's rewards differ, depend on how the
    # worker batched the requests, which the machine's load changes; the trajectories' versions are what matter)
    assert sum(x["trajectories"] for x in records) == 3 * 2 * 4


def test_a_streamed_step_trains_as_the_whole_batch(tmp_path, tokenizer_dir, agent, monkeypatch):  # noqa: F811
    """rl.stream_groups: an asynchronous batch taken group by group (`stream_batch`), each part trained as it comes
    and the gradient divided by the batch's token count at the end, trains as the whole batch does (the same
    trajectories here: the synchronous engine's, handed out in parts)."""
    from hybridmoe.train.rl import RLStage

    real = RLStage._make_rollouts
    parts = []

    class InParts:
        def __init__(self, source):
            self.source = source

        def next_batch(self, version):
            return self.source.next_batch(version)

        def stream_batch(self, version):
            groups = {}
            for t in self.source.next_batch(version):
                groups.setdefault(t.group, []).append(t)
            parts.append(len(groups))
            yield from groups.values()

        def publish(self, model, version):
            self.source.publish(model, version)

        def close(self):
            self.source.close()

    def make(self, model, version):
        self.recipe.rl.rollout = "sync"
        try:
            source = real(self, model, version)
        finally:
            self.recipe.rl.rollout = "async"
        source.publish(model, version)
        return InParts(source)

    monkeypatch.setattr(RLStage, "_make_rollouts", make)
    models, losses = [], []
    for stream in (True, False):
        out = tmp_path / f"stream-{stream}"
        recipe = rl_recipe(out, tokenizer_dir, steps=3, rl={"rollout": "async", "stream_groups": stream})
        models.append(rl(recipe)["model"].state_dict())
        losses.append([(x["loss"], x["grad_norm"], x["loss_tokens"], x["trajectories"]) for x in step_records(out)])
    assert parts == [2, 2, 2]  # the streamed run took every batch in parts, the other none
    (streamed, whole) = losses
    assert [x[2:] for x in streamed] == [x[2:] for x in whole]
    assert abs(streamed[0][1] - whole[0][1]) <= 1e-5 * whole[0][1]  # the first gradient, from the same weights
    for a, b in zip(streamed, whole):
        assert abs(a[0] - b[0]) <= 1e-4 * max(1.0, abs(b[0]))
    # Adam turns rounding in a tiny gradient into a visible step; measured 4e-5 at lr 3e-3
    assert max(float((models[0][k].float() - models[1][k].float()).abs().max()) for k in models[1]) <= 3e-4


def _even_mass(model, seeds) -> float:
    """The model's mean probability of an even first token over the `even` prompts of these seeds."""
    prompts = torch.tensor([[5 + s % 40, 6, 7 + len("even")] for s in seeds])
    with torch.no_grad():
        p = torch.softmax(model.eval()(prompts).logits[:, -1].float(), -1)
    return float(p[:, 0::2].sum(-1).mean())


def test_rl_raises_the_reward(tmp_path, tokenizer_dir, agent):  # noqa: F811
    """The sign of the update: trained on `even` alone, the model puts more mass on even first tokens."""
    recipe = rl_recipe(tmp_path / "run", tokenizer_dir, steps=6, envs={"ratios": {"even": 1.0}, "pool": 16},
                       rl={"group_size": 8, "prompts_per_step": 4}, optim={"lr": 1e-2})  # fmt: skip
    torch.manual_seed(recipe.train.seed)
    start = build_model(recipe, None)
    trained = rl(recipe)["model"]
    seeds = range(1_000_000, 1_000_016)
    before, after = _even_mass(start, seeds), _even_mass(trained, seeds)
    assert after > before + 0.1, (before, after)  # measured: 0.50 -> 0.66


def test_router_frozen_or_not(tmp_path, tokenizer_dir, agent, monkeypatch):  # noqa: F811
    """Frozen: the routers' weights and expert biases stay as they were. Free: every router weight is trained and
    the bias update runs at balance.bias_update_rate (its result is not compared: a sign update of +rate then -rate
    in two steps leaves a bias exactly where it was)."""
    import hybridmoe.train.rl as rl_module

    rates = []
    real = rl_module.balance_experts
    monkeypatch.setattr(rl_module, "balance_experts", lambda model, rate: rates.append(rate) or real(model, rate))
    recipe = rl_recipe(tmp_path / "frozen", tokenizer_dir, steps=2, balance={"bias_update_rate": 0.1})
    torch.manual_seed(recipe.train.seed)
    start = build_model(recipe, None).state_dict()
    routers = [k for k in start if ".gate." in k]
    assert {k.rsplit(".", 1)[1] for k in routers} == {"weight", "e_score_correction_bias"}
    trained = rl(recipe)["model"].state_dict()
    assert all(torch.equal(trained[k], start[k]) for k in routers)
    assert not torch.equal(trained["lm_head.weight"], start["lm_head.weight"])
    assert rates == [0.0, 0.0]
    rates.clear()
    free = rl(rl_recipe(tmp_path / "free", tokenizer_dir, steps=2, rl={"freeze_router": False},
                        balance={"bias_update_rate": 0.1}))["model"].state_dict()  # fmt: skip
    weights = [k for k in routers if k.endswith(".weight") and not k.startswith("mtp.")]  # MTP: unused
    assert weights and all(not torch.equal(free[k], start[k]) for k in weights)
    assert rates == [0.1, 0.1]


def test_pass_rate_filter_drops_solved_prompts_once(tmp_path, tokenizer_dir, agent):  # noqa: F811
    sections = dict(envs={"ratios": {"easy": 1.0, "even": 1.0}, "pool": 6},
                    rl={"pass_rate_filter": {"samples": 2, "drop_at": 1.0}})  # fmt: skip
    summary = rl(rl_recipe(tmp_path / "run", tokenizer_dir, steps=2, **sections))
    assert summary["filtered"]["easy"] == 3 and summary["pools"]["easy"] == 3  # the even seeds always pass
    assert step_records(tmp_path / "run")[0]["filtered_prompts"] == 3 + summary["filtered"]["even"]
    trained = [(env, seed) for env, seed in agent[12:] if env == "easy"]  # after the 12 measured prompts
    assert trained and all(seed % 2 == 1 for _, seed in trained)
    assert os.path.isfile(tmp_path / "run" / "pass_rates.json")
    agent.clear()  # resumed: read back, not measured again
    rl(rl_recipe(tmp_path / "run", tokenizer_dir, steps=3, **sections), resume=True)
    assert len(agent) == 2
    with pytest.raises(ValueError, match="other settings"):
        rl(rl_recipe(tmp_path / "run", tokenizer_dir, steps=4, envs={"ratios": {"easy": 1.0}, "pool": 6},
                     rl={"pass_rate_filter": {"samples": 3}}), resume=True)  # fmt: skip


def test_kl_term_against_the_starting_model(tmp_path, tokenizer_dir, agent):  # noqa: F811
    rl(rl_recipe(tmp_path / "run", tokenizer_dir, steps=2, rl={"kl_coef": 0.5, "importance": "mask"}))
    records = step_records(tmp_path / "run")
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6) and records[1]["kl"] > 0  # pi = pi_ref at step 1
    assert records[1]["loss"] == pytest.approx(records[1]["pg"] + 0.5 * records[1]["kl"], rel=1e-5, abs=1e-7)


def test_stale_trajectories_are_refused(tmp_path, tokenizer_dir, agent, monkeypatch):  # noqa: F811
    from hybridmoe.train.rl import RLStage

    class Old:
        def next_batch(self, version):
            return [Trajectory("even", 1, 0, [1, 2], [0, 1], [0.0, -1.0], 1.0, weight_version=version - 1)] * 2

        def publish(self, model, version):
            pass

        def close(self):
            pass

    monkeypatch.setattr(RLStage, "_make_rollouts", lambda self, model, version: Old())
    with pytest.raises(RuntimeError, match="staleness"):
        rl(rl_recipe(tmp_path / "run", tokenizer_dir, steps=1))


def test_pack_rows_apart_and_masked():
    def traj(n_prompt, n_gen, group):
        ids = list(range(1, n_prompt + n_gen + 1))
        return Trajectory("e", 0, group, ids, [0] * n_prompt + [1] * n_gen, [0.0] * n_prompt + [-0.5] * n_gen, 1.0)

    trajs = [traj(3, 2, 0), traj(2, 2, 0), traj(6, 3, 1)]
    rows = pack(trajs, [1.0, -1.0, 0.5], seq_len=10)
    assert len(rows) == 2  # 5 + 4 tokens in the first row; 9 in the second
    assert rows[0]["document_ids"].tolist() == [0] * 5 + [1] * 4
    assert rows[0]["mask"].tolist() == [False] * 3 + [True] * 2 + [False] * 2 + [True] * 2
    assert rows[0]["advantages"].tolist() == [1.0] * 5 + [-1.0] * 4
    assert rows[0]["sequence"].tolist() == [0] * 5 + [1] * 4 and rows[1]["sequence"].tolist() == [2] * 9
    assert len(pack(trajs, [0.0] * 3, seq_len=0)) == 3  # one per row
    batch = collate(rows)
    assert batch["input_ids"].shape == (2, 9)
    short = collate([rows[0], {k: v[:4] for k, v in rows[1].items()}])
    assert short["document_ids"][1].tolist() == [0] * 4 + [1] * 5 and not short["mask"][1, 4:].any()
    with pytest.raises(ValueError, match="first token"):
        pack([Trajectory("e", 0, 0, [1, 2], [1, 1], [0.0, 0.0], 1.0)], [0.0])


def test_cli_rl(tmp_path, tokenizer_dir, agent, capsys):  # noqa: F811
    from hybridmoe.cli import main

    path = tmp_path / "rl.yaml"
    path.write_text(rl_recipe(tmp_path / "run", tokenizer_dir, steps=1).to_yaml())
    assert main(["rl", str(path), "rl.group_size=2"]) == 0
    assert "finished at step 1" in capsys.readouterr().out
    assert step_records(tmp_path / "run")[0]["trajectories"] == 4
    assert main(["rl", str(path), "rl.importance=clip"]) == 2
