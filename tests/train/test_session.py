"""The training session (`train.session`) through its pretraining stage on the `debug` preset: exact resume, the
agreed stop (signals, deadline, stop_after), refusing unsafe or damaged trainer state, crash leftovers, the log,
checkpoint pruning. The SFT stage runs the same code (tests/train/test_sft.py checks its resume)."""

import os
import signal
import time

import pytest
import torch
from helpers import write_prepared
from test_pretrain import VOCAB, pattern_docs, recipe, step_records

from hybridmoe.train import pretrain as pretrain_mod
from hybridmoe.train import session as session_mod
from hybridmoe.train.metrics import MetricsLog, read_log
from hybridmoe.train.model import build_model
from hybridmoe.train.pretrain import pretrain


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("data"), pattern_docs(400, 0), vocab=VOCAB, dtype="uint16")


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, data_dir):
    pretrain(recipe(tmp_path / "full", data_dir, 8), peak_gflops=100.0)
    part = recipe(tmp_path / "part", data_dir, 8)
    first = pretrain(part, stop_after=3, peak_gflops=100.0)
    assert first["interrupted"] and first["steps"] == 3
    second = pretrain(part, resume=True, peak_gflops=100.0)
    assert second["start_step"] == 3 and second["steps"] == 8
    full, resumed = step_records(tmp_path / "full"), step_records(tmp_path / "part")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(full, resumed):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens", "expert_imbalance"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    for (n, a), (_, b) in zip(
        second["model"].state_dict().items(), build_model(part, first["checkpoint"]).state_dict().items()
    ):
        assert a.shape == b.shape, n


def test_sigterm_finishes_the_step_and_writes_a_checkpoint(tmp_path, data_dir, monkeypatch):
    calls = {"n": 0}
    real = pretrain_mod.balance_experts

    def balance_then_signal(model, rate):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, rate)

    monkeypatch.setattr(pretrain_mod, "balance_experts", balance_then_signal)
    summary = pretrain(recipe(tmp_path / "run", data_dir, 10), peak_gflops=100.0)
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
    SlowClock(100.0).slow_down(monkeypatch, session_mod)
    summary = pretrain(recipe(tmp_path / "run", data_dir, 20, time_limit_s=450), peak_gflops=100.0)
    # 100 s steps (plus the real few seconds of the whole run): step 4 ends at ~400 s, a 5th would end past 450 s
    assert summary["interrupted"] and summary["stopped"] == "deadline" and summary["steps"] == 4
    assert os.path.basename(summary["checkpoint"]) == "step-0000004"
    assert [r["step"] for r in step_records(tmp_path / "run")] == [1, 2, 3, 4]
    resumed = pretrain(recipe(tmp_path / "run", data_dir, 5, time_limit_s=450), resume=True, peak_gflops=100.0)
    assert resumed["steps"] == 5 and "interrupted" not in resumed  # the limit counts from each start
    with pytest.raises(ValueError, match="time_limit_s"):
        recipe(tmp_path / "x", data_dir, 2, time_limit_s=0).validate()
    bad = recipe(tmp_path / "x", data_dir, 2, time_limit_s=10)
    bad.train.replan_at = 5  # pretraining's blend is laid out over train.steps
    with pytest.raises(ValueError, match="replan_at is for SFT"):
        bad.validate()


def test_ranks_agree_on_when_and_why_to_stop():
    class OtherRanks:  # par.sum as seen by this rank when the other ranks' votes are `others`
        def __init__(self, others):
            self.others = others

        def sum(self, values):
            return [v + o for v, o in zip(values, self.others)]

    flag = session_mod.StopFlag()
    flag.agree(OtherRanks([0, 0, 0]))
    assert not flag.requested and flag.reason is None
    flag.agree(OtherRanks([0, 1, 0]))  # another rank reached its deadline: this one stops at the same step
    assert flag.requested and flag.reason == "deadline"
    flag = session_mod.StopFlag()
    flag.request("stop_after")
    flag.agree(OtherRanks([1, 1, 0]))
    assert flag.reason == "signal"


def test_resume_refuses_a_pickled_trainer_state_without_running_it(tmp_path, data_dir):
    first = pretrain(recipe(tmp_path / "run", data_dir, 2), stop_after=1, peak_gflops=100.0)
    marker = tmp_path / "code-ran"

    class Payload:  # unpickling it calls open(marker, "w")
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = os.path.join(first["checkpoint"], "trainer_state", "optimizer.pt")
    torch.save({"optimizer": Payload(), "torch_rng": torch.get_rng_state()}, path)
    with pytest.raises(ValueError, match="optimizer.pt holds more than tensors and plain data"):
        pretrain(recipe(tmp_path / "run", data_dir, 2), resume=True, peak_gflops=100.0)
    assert not marker.exists()
    with open(path, "wb") as fh:
        fh.write(b"PK\x03\x04 torn")
    with pytest.raises(ValueError, match="optimizer.pt cannot be read"):
        pretrain(recipe(tmp_path / "run", data_dir, 2), resume=True, peak_gflops=100.0)


def test_resume_after_a_kill_during_a_save_and_a_log_write(tmp_path, data_dir, caplog):
    run = tmp_path / "run"
    pretrain(recipe(run, data_dir, 4), stop_after=2, peak_gflops=100.0)
    # What a kill leaves: the next checkpoint and `latest` under their temporary names, half a log record.
    ckpts = run / "checkpoints"
    (ckpts / ".step-0000003.k2x_9qab" / "trainer_state").mkdir(parents=True)
    (ckpts / ".latest.a1b2c3d4.tmp").write_text("step-0000003")
    (ckpts / ".step-0000003.mine").mkdir()  # not a name a save uses: left alone
    with open(run / "log.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": 4.1')
    second = pretrain(recipe(run, data_dir, 4), resume=True, peak_gflops=100.0)
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


def test_keep_last_prunes_old_checkpoints(tmp_path, data_dir):
    pretrain(recipe(tmp_path / "run", data_dir, 6, save_every=2, keep_last=2), peak_gflops=100.0)
    names = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert names == ["latest", "step-0000004", "step-0000006"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-0000006"


def test_keep_every_keeps_milestones_beyond_keep_last(tmp_path, data_dir):
    pretrain(recipe(tmp_path / "run", data_dir, 8, save_every=1, keep_last=2, keep_every=3), peak_gflops=100.0)
    names = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert names == ["latest", "step-0000003", "step-0000006", "step-0000007", "step-0000008"]
    with pytest.raises(ValueError, match=r"train.keep_last=2, train.keep_every=-1: must be >= 0"):
        recipe(tmp_path / "bad", data_dir, 8, keep_every=-1).validate()
