"""Pipeline parallelism (1F1B over micro-batches, stages split by layer count) on CPU with gloo: alone (pp 2), under
FSDP2 over dp (dp 2 x pp 2), with tensor parallelism (tp 2 x pp 2) and with context parallelism (cp 2 x pp 2) it
gives the single-process losses, gradients, MoE balancing and weights."""

from __future__ import annotations

import json
import os

import pytest
import test_distributed
import torch
import torch.distributed as dist
from ranks import start_ranks
from test_distributed import _assert_exported_equals, _assert_same_trajectory, _ranks, _resume_from_step5
from test_pretrain import step_records

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.distributed.pp import split_points
from hybridmoe.train.config import _validate_parallel
from hybridmoe.train.metrics import read_log

dist_setup = test_distributed.dist_setup  # the debug recipe and its single-process run (a module-scoped fixture)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _config():
    # debug with MTP (two depths); an aux-loss coefficient large enough that its gradient is seen
    return HybridMoEConfig.from_preset("debug", router_aux_loss_coef=1e-2)


def _batch(rows: int, t: int, vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, t), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # the same in every row: each data-parallel rank averages over as many targets
    # packed documents that differ per row: the MTP targets per row differ, so a micro-batch's own mean would not do
    docs = (torch.arange(t) >= t // 3).long().expand(rows, t).clone()
    docs[1::2, t // 2 :] = 2
    return ids, labels, docs


def _pp_worker(rank, world, store, out_dir, pp, steps, microbatches, tp=1, cp=1, ep=1):
    from hybridmoe.distributed import clip_grad_norm_, parallelize, reduce_partial_grads, setup
    from hybridmoe.distributed.pp import forward_backward, full_state_dict
    from hybridmoe.distributed.tp import reference_order
    from hybridmoe.train.balance import balance_experts

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
    try:
        par = setup(pp=pp, tp=tp, cp=cp, ep=ep, backend="gloo")
        torch.manual_seed(0)
        config = _config()
        ref = HybridMoEForCausalLM(config).train()
        model = HybridMoEForCausalLM(config).train()
        model.load_state_dict(ref.state_dict())
        stage = parallelize(model, par)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
        opt = torch.optim.AdamW(stage.parameters(), lr=1e-3, foreach=True)
        dp = world // (pp * tp * cp)
        ids, labels, docs = _batch(2 * dp * microbatches, 32, config.vocab_size)
        result = {"losses": [], "ref": [], "grad_errors": [], "imbalance": [], "ref_imbalance": []}
        for _ in range(steps):
            # the reference: two batches of grad_accum, as the pipeline step takes them
            halves = [slice(0, len(ids) // 2), slice(len(ids) // 2, None)]
            ref_loss = 0.0
            for h in halves:
                out = ref(ids[h], labels=labels[h], document_ids=docs[h], return_logits=False)
                (out.loss / 2).backward()
                ref_loss += float(out.loss) / 2
            batches = [par.local_rows({"input_ids": ids[h], "labels": labels[h], "document_ids": docs[h]})
                       for h in halves]  # fmt: skip
            losses = forward_backward(stage, batches, "fp32", par, microbatches)
            reduce_partial_grads(stage, par)
            result["losses"].append(par.sum([losses["loss"]])[0] / world)
            result["ref"].append(ref_loss)
            ref_grads = dict(ref.named_parameters())
            grads = reference_order({n: p.grad.full_tensor() for n, p in stage.named_parameters()}, config, tp)
            err = torch.zeros(())
            for name, g in grads.items():
                expected = ref_grads[name].grad
                err = torch.maximum(err, (g - expected).abs().max() / expected.abs().max().clamp(min=1e-12))
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            result["grad_errors"].append(float(err))
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            clip_grad_norm_([p for p in stage.parameters() if p.grad is not None], 1.0, par)
            ref_opt.step(), opt.step()
            ref_opt.zero_grad(), opt.zero_grad()
            result["imbalance"].append(balance_experts(stage, 1e-3))
            # every rank holds the whole reference: its counts summed over ranks scale, the update and ratio do not
            result["ref_imbalance"].append(balance_experts(ref, 1e-3))
        full = reference_order(full_state_dict(stage, par), config, tp)
        if rank == 0:
            expected = ref.state_dict()
            assert sorted(full) == sorted(k for k in expected if not k.endswith("tokens_per_expert"))
            # 3 AdamW steps of lr 1e-3 on weights of ~0.1: a wrongly gathered stage would be off by far more; the
            # rounding of another summation order (rows in another order in one process) moves them by ~2e-5
            result["weight_error"] = max(float((full[k] - expected[k]).abs().max()) for k in full)
            with open(os.path.join(out_dir, "pp.json"), "w") as fh:
                json.dump(result, fh)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "world,pp,tp,cp,ep",
    [(2, 2, 1, 1, 1), (8, 2, 2, 2, 2)],
    ids=["pp2", "tp2xcp2xep2xpp2"],
)
def test_pipeline_parallel_matches_single_process(tmp_path, world, pp, tp, cp, ep):
    """Packed documents (one crossing the context-parallel shard boundary, one starting on it), MTP (two depths: its
    carried embeddings are each rank's sequence shard and the two tokens after it) and the aux loss. The 8-process
    layout is the issue's: every dimension at once, ep borrowing its ranks from tp (`distributed.mesh`). dp 2 x pp 2,
    tp 2 x pp 2 and cp 2 x pp 2 alone: `benchmarks/bench_parallel_layouts.py` (10 steps each) and the command-line
    tests below (dp x pp, tp x pp), kept out of the suite for time."""
    start_ranks(_pp_worker, (world, str(tmp_path / "store"), str(tmp_path), pp, 3, 2, tp, cp, ep),
                       nprocs=world)  # fmt: skip
    r = json.loads((tmp_path / "pp.json").read_text())
    assert r["losses"] == pytest.approx(r["ref"], rel=1e-4), r
    assert max(r["grad_errors"]) < 1e-4, r
    assert r["imbalance"] == pytest.approx(r["ref_imbalance"], rel=1e-6), r
    assert r["weight_error"] < 1e-4, r


def test_stage_shards():
    """Each rank's tokens (what crosses the stages): the cp rank's two chunks, then the tp rank's share of them."""
    from hybridmoe.distributed.cp import ContextParallel
    from hybridmoe.distributed.pp import PipelineStageModel, _shifted
    from hybridmoe.distributed.tp import VocabParallelLoss

    stage = PipelineStageModel(HybridMoEForCausalLM(_config(), device="meta"), 0, 2, range(0, 3))
    assert stage.shard_runs(64) == [(0, 64)]
    stage.tensor_parallel = VocabParallelLoss(None, 1, 2)
    assert stage.shard_runs(64) == [(32, 32)]
    stage.context_parallel = ContextParallel(None, 1, 2)
    assert stage.shard_runs(64) == [(32, 16)]  # cp rank 1: chunks 1 and 2 ([16, 48)), tp rank 1 the second half
    stage.tensor_parallel = None
    assert stage.shard_runs(64) == [(16, 16), (32, 16)]
    stage.context_parallel = ContextParallel(None, 0, 2)
    assert stage.shard_runs(64) == [(0, 16), (48, 16)]
    with pytest.raises(ValueError, match=r"parallel.cp=2 x parallel.tp=1 must divide the sequence length \(30\)"):
        stage.shard_runs(30)
    # the embeddings of two runs of 2 tokens, each with 1 token after it: shift 1 takes the tokens after each
    windows = torch.tensor([[0, 1, 2, 10, 11, 12]])[..., None]
    assert _shifted(windows, [(0, 2), (10, 2)], 1, 1)[..., 0].tolist() == [[1, 2, 11, 12]]


def test_split_points():
    assert split_points(6, 2) == [0, 3, 6]
    assert split_points(7, 3) == [0, 3, 5, 7]
    assert split_points(6, 2, [2]) == [0, 2, 6]
    with pytest.raises(ValueError, match="pp_split_points"):
        split_points(6, 3, [4, 2])
    with pytest.raises(ValueError, match="more than the model's 6 layers"):
        split_points(6, 8)


# ---------------------------------------------------------------------------------------------- trainer


def test_cli_pipeline_parallel_matches_single_process(dist_setup, tmp_path):
    """`hybridmoe pretrain ... parallel.pp=2` on 4 processes (dp 2 x pp 2, 2 micro-batches of one sequence per
    data-parallel rank): the single-process losses (LM, MTP, aux), gradient norms and validation loss, step by step;
    the consolidated checkpoint (gathered stage by stage) and the export equal the single-process model; its step-5
    checkpoint resumes without pipelining (dp 2) and logs steps 6-10 as the single-process run (the stages save
    their layers under the whole model's names)."""
    root, path, reference, single = dist_setup
    out = tmp_path / "pp"
    _ranks(4, path, "parallel.pp=2", f"train.out_dir={out}", "train.steps=10")
    _assert_same_trajectory(step_records(out), reference, list(range(1, 11)))
    val, val_ref = (
        [(r["step"], r["val_loss"]) for r in read_log(os.path.join(d, "log.jsonl")) if "val_loss" in r]
        for d in (out, root / "single")
    )
    assert [s for s, _ in val] == [s for s, _ in val_ref] == [0, 10]
    assert [v for _, v in val] == pytest.approx([v for _, v in val_ref], rel=1e-4)
    _assert_exported_equals(out, tmp_path / "exported", single["model"].state_dict())
    resumed = tmp_path / "resumed"
    _resume_from_step5(out, resumed, 2, path, "train.steps=10", "parallel.consolidate=false")
    _assert_same_trajectory(step_records(resumed), reference, list(range(1, 11)))


def test_cli_pipeline_tensor_parallel_matches_single_process(dist_setup, tmp_path):
    """`hybridmoe pretrain ... parallel.pp=2 parallel.tp=2` on 4 processes (2 micro-batches of two sequences, each
    rank running its half of every sequence): the single-process losses, gradient norms and validation loss, step
    by step; the consolidated checkpoint (gathered stage by stage, the Mamba rows back in the Hugging Face order) and
    the export of the distributed one equal the single-process model; its step-5 checkpoint resumes as dp 4 (no
    stages, no tensor parallelism: the Mamba rows reordered, `train.checkpoint`) and logs steps 6-10 as the
    single-process run. (pp 2 x cp 2 runs the same way: the spawned test above checks its gradients.)"""
    root, path, reference, single = dist_setup
    out = tmp_path / "run"
    _ranks(4, path, "parallel.pp=2", "parallel.tp=2", f"train.out_dir={out}", "train.steps=10")
    _assert_same_trajectory(step_records(out), reference, list(range(1, 11)))
    val, val_ref = (
        [v for r in read_log(os.path.join(d, "log.jsonl")) if (v := r.get("val_loss")) is not None]
        for d in (out, root / "single")
    )
    assert len(val) == 2 and val == pytest.approx(val_ref, rel=1e-4)
    _assert_exported_equals(out, tmp_path / "exported", single["model"].state_dict())
    resumed = tmp_path / "resumed"
    _resume_from_step5(out, resumed, 4, path, "train.steps=10", "parallel.consolidate=false")
    _assert_same_trajectory(step_records(resumed), reference, list(range(1, 11)))


def test_pipeline_settings_are_checked(tmp_path):
    from types import SimpleNamespace

    from hybridmoe.distributed import ParallelDims, setup
    from hybridmoe.train.config import SFTRecipe
    from hybridmoe.train.model import load_model

    with pytest.raises(ValueError, match="parallel.pp=2 needs several processes"):
        setup(pp=2)
    assert ParallelDims(8, pp=2, cp=2, tp=2).resolved().dp_shard == 1
    assert ParallelDims(8, pp=2, ep=2).resolved().dp_shard == 4
    with pytest.raises(ValueError, match="at least pp micro-batches"):
        _validate_parallel(SFTRecipe().parallel.__class__(pp=4, microbatches=2), SFTRecipe().train)
    with pytest.raises(ValueError, match="runs pretraining"):
        load_model(SFTRecipe(), None, SimpleNamespace(pp=2))
