"""The training loop end to end on the `debug` preset and tiny synthetic data: loss falls, exact resume,
interruption, the schedule, balancing, the recipe."""

import math
import os
import signal
import sys
import time

import numpy as np
import pytest
import torch
from helpers import write_prepared

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.train import loop as loop_mod
from hybridmoe.train.balance import balance_experts, moe_layers
from hybridmoe.train.config import OptimSection, Recipe
from hybridmoe.train.metrics import MetricsLog, read_log
from hybridmoe.train.optim import build_optimizer, lr_at
from hybridmoe.train.state import load_distributed_checkpoint, save_checkpoint

VOCAB = 512


def pattern_docs(n, seed):
    """Arithmetic progressions (mod the vocabulary): the next token follows from the previous two."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        start, stride, length = rng.integers(1, VOCAB - 1), rng.integers(1, 4), rng.integers(20, 60)
        docs.append([1 + int(start + k * stride) % (VOCAB - 2) for k in range(length)])
    return docs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("data"), pattern_docs(400, 0), vocab=VOCAB, dtype="uint16")


def recipe(out_dir, data_dir, steps, **train):
    return Recipe.from_dict(
        {
            "model": {"preset": "debug", "overrides": {"num_nextn_predict_layers": 0}},
            "data": {
                "phases": [{"datasets": {str(data_dir): 1.0}}],
                "seq_len": 64,
                "batch_size": 4,
                "val_fraction": 0.05,
            },
            "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "decay_fraction": 0.3},
            "train": {
                "steps": steps,
                "out_dir": str(out_dir),
                "progress": False,
                "tensorboard": False,
                "val_batches": 2,
                **train,
            },
        }
    )


def step_records(out_dir):
    return [r for r in read_log(os.path.join(out_dir, "log.jsonl")) if "loss" in r]


def test_debug_run_loss_falls_and_writes_a_self_contained_checkpoint(tmp_path, data_dir):
    summary = loop_mod.train(recipe(tmp_path / "run", data_dir, 20), peak_gflops=100.0)
    records = step_records(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 21))
    first, last = records[0]["loss"], np.mean([r["loss"] for r in records[-3:]])
    assert last < first - 1.0, (first, last)
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 1.0
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "expert_imbalance", "aux_loss", "tokens"):
        assert records[-1][key] is not None and math.isfinite(records[-1][key]), key
    assert records[-1]["tokens"] == 20 * 4 * 64
    ckpt = summary["checkpoint"]
    assert os.path.basename(ckpt) == "step-0000020"
    for f in (
        "config.json",
        "model.safetensors",
        "recipe.yaml",
        "trainer_state/state.json",
        "trainer_state/optimizer.pt",
    ):
        assert os.path.exists(os.path.join(ckpt, f)), f
    reloaded = HybridMoEForCausalLM.from_pretrained(ckpt)
    for (n, a), (_, b) in zip(summary["model"].state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, data_dir):
    loop_mod.train(recipe(tmp_path / "full", data_dir, 8), peak_gflops=100.0)
    part = recipe(tmp_path / "part", data_dir, 8)
    first = loop_mod.train(part, stop_after=3, peak_gflops=100.0)
    assert first["interrupted"] and first["steps"] == 3
    second = loop_mod.train(part, resume=True, peak_gflops=100.0)
    assert second["start_step"] == 3 and second["steps"] == 8
    full, resumed = step_records(tmp_path / "full"), step_records(tmp_path / "part")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(full, resumed):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens", "expert_imbalance"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    for (n, a), (_, b) in zip(
        second["model"].state_dict().items(), loop_mod.build_model(part, first["checkpoint"]).state_dict().items()
    ):
        assert a.shape == b.shape, n


def test_sigterm_finishes_the_step_and_writes_a_checkpoint(tmp_path, data_dir, monkeypatch):
    calls = {"n": 0}
    real = loop_mod.balance_experts

    def balance_then_signal(model, rate):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, rate)

    monkeypatch.setattr(loop_mod, "balance_experts", balance_then_signal)
    summary = loop_mod.train(recipe(tmp_path / "run", data_dir, 10), peak_gflops=100.0)
    assert summary["interrupted"] and summary["stopped"] == "signal" and summary["steps"] == 3
    assert os.path.basename(summary["checkpoint"]) == "step-0000003"
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is restored


class SlowClock:
    """The `time` module as the training loop sees it on a slow machine: every training step takes `step_s`
    seconds more than it really does."""

    def __init__(self, step_s):
        self.step_s, self.offset = step_s, 0.0

    def monotonic(self):
        return time.monotonic() + self.offset

    def __getattr__(self, name):
        return getattr(time, name)

    def slow_down(self, monkeypatch, module):
        real = module.train_step

        def slow_step(*args, **kwargs):
            self.offset += self.step_s
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "time", self)
        monkeypatch.setattr(module, "train_step", slow_step)


def test_time_limit_stops_before_the_step_that_would_end_past_it(tmp_path, data_dir, monkeypatch):
    SlowClock(100.0).slow_down(monkeypatch, loop_mod)
    summary = loop_mod.train(recipe(tmp_path / "run", data_dir, 20, time_limit_s=450), peak_gflops=100.0)
    # 100 s steps (plus the real few seconds of the whole run): step 4 ends at ~400 s, a 5th would end past 450 s
    assert summary["interrupted"] and summary["stopped"] == "deadline" and summary["steps"] == 4
    assert os.path.basename(summary["checkpoint"]) == "step-0000004"
    assert [r["step"] for r in step_records(tmp_path / "run")] == [1, 2, 3, 4]
    resumed = loop_mod.train(recipe(tmp_path / "run", data_dir, 5, time_limit_s=450), resume=True, peak_gflops=100.0)
    assert resumed["steps"] == 5 and "interrupted" not in resumed  # the limit counts from each start
    with pytest.raises(ValueError, match="time_limit_s"):
        recipe(tmp_path / "x", data_dir, 2, time_limit_s=0).validate()


def test_ranks_agree_on_when_and_why_to_stop():
    class OtherRanks:  # par.sum as seen by this rank when the other ranks' votes are `others`
        def __init__(self, others):
            self.others = others

        def sum(self, values):
            return [v + o for v, o in zip(values, self.others)]

    flag = loop_mod._StopFlag()
    flag.agree(OtherRanks([0, 0, 0]))
    assert not flag.requested and flag.reason is None
    flag.agree(OtherRanks([0, 1, 0]))  # another rank reached its deadline: this one stops at the same step
    assert flag.requested and flag.reason == "deadline"
    flag = loop_mod._StopFlag()
    flag.request("stop_after")
    flag.agree(OtherRanks([1, 1, 0]))
    assert flag.reason == "signal"


def test_resume_refuses_a_pickled_trainer_state_without_running_it(tmp_path, data_dir):
    first = loop_mod.train(recipe(tmp_path / "run", data_dir, 2), stop_after=1, peak_gflops=100.0)
    marker = tmp_path / "code-ran"

    class Payload:  # unpickling it calls open(marker, "w")
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = os.path.join(first["checkpoint"], "trainer_state", "optimizer.pt")
    torch.save({"optimizer": Payload(), "torch_rng": torch.get_rng_state()}, path)
    with pytest.raises(ValueError, match="optimizer.pt holds more than tensors and plain data"):
        loop_mod.train(recipe(tmp_path / "run", data_dir, 2), resume=True, peak_gflops=100.0)
    assert not marker.exists()
    with open(path, "wb") as fh:
        fh.write(b"PK\x03\x04 torn")
    with pytest.raises(ValueError, match="optimizer.pt cannot be read"):
        loop_mod.train(recipe(tmp_path / "run", data_dir, 2), resume=True, peak_gflops=100.0)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process, as intended here
def test_distributed_resume_refuses_a_pickled_rng_state(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug"))
    optimizer = build_optimizer(model, OptimSection())
    model_sd, optim_sd = get_state_dict(model, optimizer)
    ckpt = tmp_path / "step-0000001"
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(ckpt / "dcp"), no_dist=True)
    (ckpt / "trainer_state").mkdir()
    (ckpt / "trainer_state" / "state.json").write_text('{"step": 1}')
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"torch_rng": Payload()}, ckpt / "trainer_state" / "rng-0.pt")
    with pytest.raises(ValueError, match="rng-0.pt holds more than tensors"):
        load_distributed_checkpoint(str(ckpt), model, optimizer, None)
    assert not marker.exists()


def test_resume_after_a_kill_during_a_save_and_a_log_write(tmp_path, data_dir, caplog):
    run = tmp_path / "run"
    loop_mod.train(recipe(run, data_dir, 4), stop_after=2, peak_gflops=100.0)
    # What a kill leaves: the next checkpoint and `latest` under their temporary names, half a log record.
    ckpts = run / "checkpoints"
    (ckpts / ".step-0000003.k2x_9qab" / "trainer_state").mkdir(parents=True)
    (ckpts / ".latest.a1b2c3d4.tmp").write_text("step-0000003")
    (ckpts / ".step-0000003.mine").mkdir()  # not a name a save uses: left alone
    with open(run / "log.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": 4.1')
    second = loop_mod.train(recipe(run, data_dir, 4), resume=True, peak_gflops=100.0)
    assert second["start_step"] == 2 and second["steps"] == 4
    assert [r["step"] for r in step_records(run)] == [1, 2, 3, 4]
    assert sorted(os.listdir(ckpts)) == [".step-0000003.mine", "latest", "step-0000002", "step-0000004"]
    assert "line 4: incomplete record" in caplog.text
    assert "removed .latest.a1b2c3d4.tmp" in caplog.text and "removed .step-0000003.k2x_9qab" in caplog.text


def test_a_damaged_log_line_is_an_error_unless_it_is_the_torn_last_one(tmp_path, caplog):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_log(str(path)) == [{"step": 1}, {"step": 2}]
    assert "log.jsonl, line 3: incomplete record" in caplog.text
    MetricsLog(str(tmp_path), tensorboard=False, resume_step=1).close()  # truncated to the checkpoint's step
    assert path.read_text() == '{"step": 1}\n'
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"log.jsonl, line 2: not a JSON record"):
        read_log(str(path))
    with pytest.raises(ValueError, match=r"log.jsonl, line 2: not a JSON record"):
        MetricsLog(str(tmp_path), tensorboard=False, resume_step=3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_checkpoint_files_are_fsynced_and_stale_temporaries_removed(tmp_path, monkeypatch):
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tok / name).write_text("{}")
    stale = tmp_path / "run" / "checkpoints" / ".step-0000001.abcd1234"
    stale.mkdir(parents=True)
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug"))
    optimizer = build_optimizer(model, OptimSection())
    save_checkpoint(str(tmp_path / "run"), 1, model, optimizer, {}, "train: {}\n", str(tok))
    assert (tmp_path / "run" / "checkpoints" / "step-0000001" / "tokenizer.json").read_text() == "{}"
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors", "recipe.yaml", "optimizer.pt"):
        assert any(s == name or s.startswith(f".{name}.") for s in synced), (name, synced)
    assert not stale.exists()


def test_keep_last_prunes_old_checkpoints(tmp_path, data_dir):
    loop_mod.train(recipe(tmp_path / "run", data_dir, 6, save_every=2, keep_last=2), peak_gflops=100.0)
    names = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert names == ["latest", "step-0000004", "step-0000006"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-0000006"


def test_document_masking_passes_document_ids(tmp_path, data_dir, monkeypatch):
    seen = []
    real = HybridMoEForCausalLM.forward

    def spy(self, input_ids, labels=None, document_ids=None, **kw):
        if self.training:
            seen.append(document_ids)
        return real(self, input_ids, labels=labels, document_ids=document_ids, **kw)

    monkeypatch.setattr(HybridMoEForCausalLM, "forward", spy)
    loop_mod.train(recipe(tmp_path / "a", data_dir, 1), peak_gflops=100.0)
    loop_mod.train(recipe(tmp_path / "b", data_dir, 1, seed=0), peak_gflops=100.0)
    assert seen[0] is None
    r = recipe(tmp_path / "c", data_dir, 1)
    r.data.document_masking = True
    loop_mod.train(r, peak_gflops=100.0)
    assert seen[-1] is not None and seen[-1].shape == (4, 64) and int(seen[-1].max()) > 0


def test_wsd_minus_sqrt_schedule_values():
    cfg = OptimSection(lr=1e-3, min_lr=1e-5, schedule="wsd-sqrt", warmup_steps=10, decay_fraction=0.2)
    assert lr_at(0, 100, cfg) == pytest.approx(1e-4)
    assert lr_at(9, 100, cfg) == pytest.approx(1e-3)
    assert lr_at(50, 100, cfg) == pytest.approx(1e-3)
    assert lr_at(80, 100, cfg) == pytest.approx(1e-3)  # the decay starts at 80 = 100 - 20
    assert lr_at(85, 100, cfg) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 - math.sqrt(5 / 20)))
    assert lr_at(99, 100, cfg) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 - math.sqrt(19 / 20)))
    assert lr_at(100, 100, cfg) == pytest.approx(1e-5)
    cos = OptimSection(lr=1e-3, min_lr=0.0, schedule="cosine", warmup_steps=0)
    assert lr_at(0, 100, cos) == pytest.approx(1e-3) and lr_at(50, 100, cos) == pytest.approx(5e-4)
    wsd_cos = OptimSection(lr=1e-3, min_lr=0.0, schedule="wsd-cosine", decay_fraction=0.5)
    assert lr_at(75, 100, wsd_cos) == pytest.approx(5e-4)
    assert lr_at(10, 100, OptimSection(lr=2e-4, schedule="constant")) == 2e-4


def test_balancing_moves_the_bias_toward_underloaded_experts():
    model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug", n_routed_experts=4, num_experts_per_tok=2))
    layers = moe_layers(model)
    for m in layers:
        m.tokens_per_expert.copy_(torch.tensor([10, 0, 5, 5]))
    before = [m.gate.e_score_correction_bias.clone() for m in layers]
    imbalance = balance_experts(model, rate=1e-3)
    assert imbalance == pytest.approx(2.0)
    for m, b in zip(layers, before):
        delta = m.gate.e_score_correction_bias - b
        torch.testing.assert_close(delta, torch.tensor([-1e-3, 1e-3, 0.0, 0.0]))
        assert int(m.tokens_per_expert.sum()) == 0


def test_bias_updates_undo_a_skewed_router():
    """Start with expert 0 favoured by every token (a +1 selection bias); the aux-loss-free updates take the
    bias back down step by step and the load evens out."""
    torch.manual_seed(0)
    model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug", num_nextn_predict_layers=0))
    model.train()
    for m in moe_layers(model):
        m.gate.e_score_correction_bias[0] = 1.0
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    history = []
    for _ in range(15):
        with torch.no_grad():
            model(ids)
        history.append(balance_experts(model, rate=0.1))
    assert history[0] == pytest.approx(4.0)  # top-2 of 8: expert 0 takes every token, 4x the mean load
    # Updates of a fixed size end in a two-step cycle around the balance (2.06, 1.56 here): judge a whole cycle.
    assert sum(history[-2:]) / 2 < 2.0, history
    for m in moe_layers(model):
        assert float(m.gate.e_score_correction_bias[0]) < 0.5


def test_optimizer_groups_follow_the_tags():
    model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug"))
    opt = build_optimizer(model, OptimSection(weight_decay=0.1))
    decay, plain = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {names[id(p)] for p in plain["params"]} == model.no_weight_decay_parameter_names()
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_recipe_overrides_and_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {preset: debug}\ndata: {phases: [{datasets: {x: 1.0}}]}\noptim: {lr: 0.001}\n")
    r = Recipe.from_yaml(str(path), ["optim.lr=3e-4", "train.steps=7", "data.document_masking=true"])
    assert r.optim.lr == 3e-4 and r.train.steps == 7 and r.data.document_masking is True
    assert Recipe.from_yaml(str(path)).optim.lr == 0.001
    assert "lr: 0.0003" in r.to_yaml()
    with pytest.raises(ValueError, match="unknown key"):
        Recipe.from_yaml(str(path), ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="key=value"):
        Recipe.from_yaml(str(path), ["optim.lr"])
    bad = Recipe.from_yaml(str(path), ["optim.schedule=linear"])
    with pytest.raises(ValueError, match="schedule"):
        bad.validate()
    assert Recipe.from_yaml(str(path), ["data.verify=no"]).data.verify is False  # YAML's no
    with pytest.raises(ValueError, match=r"data.verify='nope': use true or false"):
        Recipe.from_yaml(str(path), ["data.verify=nope"])


def test_every_shipped_recipe_parses_and_validates():
    root = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")
    names = sorted(f for f in os.listdir(root) if f.endswith(".yaml"))
    assert {"tiny-pretrain.yaml", "tiny-long-context.yaml", "ultra-550b-a55b-pretrain.yaml"} <= set(names)
    for name in names:
        r = Recipe.from_yaml(os.path.join(root, name))
        r.validate()
        HybridMoEConfig.from_preset(r.model.preset, **r.model.overrides)


def test_init_from_a_run_directory_uses_its_newest_checkpoint(tmp_path, data_dir):
    first = loop_mod.train(recipe(tmp_path / "pre", data_dir, 2), peak_gflops=100.0)
    r = recipe(tmp_path / "next", data_dir, 1)
    r.model.init_from = str(tmp_path / "pre")
    model = loop_mod.build_model(r, None)
    for (n, a), (_, b) in zip(model.state_dict().items(), first["model"].state_dict().items()):
        assert torch.equal(a, b), n
    r.model.init_from = str(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="init_from"):
        loop_mod.build_model(r, None)


def _two_step_losses(tmp_path, data_dir, name, **changes):
    r = recipe(tmp_path / name, data_dir, 2)
    for key, value in changes.items():
        section, field = key.split("__")
        setattr(getattr(r, section), field, value)
    loop_mod.train(r, peak_gflops=100.0)
    return [rec["loss"] for rec in step_records(tmp_path / name)]


def test_gradient_accumulation_matches_one_big_batch(tmp_path, data_dir):
    """2 micro-batches of 2 sequences = 1 batch of 4 (every token is a target, so the means agree)."""
    big = _two_step_losses(tmp_path, data_dir, "big", data__batch_size=4, data__grad_accum=1)
    accum = _two_step_losses(tmp_path, data_dir, "accum", data__batch_size=2, data__grad_accum=2)
    np.testing.assert_allclose(accum, big, rtol=1e-4)


def test_activation_checkpointing_does_not_change_the_run(tmp_path, data_dir):
    plain = _two_step_losses(tmp_path, data_dir, "plain")
    recomputed = _two_step_losses(tmp_path, data_dir, "ckpt", train__activation_checkpointing=True)
    np.testing.assert_allclose(recomputed, plain, rtol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "autocast-bf16"])
def test_bf16_precisions_train(tmp_path, data_dir, precision):
    fp32 = _two_step_losses(tmp_path, data_dir, "fp32")
    low = _two_step_losses(tmp_path, data_dir, precision, train__precision=precision)
    assert all(math.isfinite(x) for x in low)
    np.testing.assert_allclose(low, fp32, rtol=0.05)
