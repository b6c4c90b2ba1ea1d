"""Tensor parallelism (+ sequence parallelism, vocab-parallel loss) on CPU with gloo: the native model split over
tp ranks, alone and under FSDP2 over dp (dp x tp), gives the single-process loss and gradients."""

from __future__ import annotations

import json
import os

import pytest
import test_distributed
import torch
import torch.distributed as dist
from ranks import start_ranks
from safetensors.torch import load_file
from test_distributed import _assert_exported_equals, _assert_same_trajectory, _ranks
from test_pretrain import step_records

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.train.config import Recipe
from hybridmoe.train.pretrain import pretrain as train

dist_setup = test_distributed.dist_setup  # the debug recipe and its single-process run (a module-scoped fixture)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _config(**overrides):
    # debug with MTP; an aux-loss coefficient large enough that its gradient is seen
    return HybridMoEConfig.from_preset("debug", **{"router_aux_loss_coef": 1e-2, **overrides})


def _batch(rows: int, t: int, vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, t), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # the same in every row: each data-parallel rank averages over as many targets
    docs = (torch.arange(t) >= t // 3).long().expand(rows, t).clone()  # two packed documents per row
    return ids, labels, docs


def _tp_worker(rank, world, store, out_dir, tp, steps, ep=1, overrides=None, weighted=False):
    from hybridmoe.distributed import clip_grad_norm_, parallelize, reduce_partial_grads, setup
    from hybridmoe.distributed.tp import reference_order

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
    try:
        par = setup(tp=tp, ep=ep, backend="gloo")
        torch.manual_seed(0)
        config = _config(**(overrides or {}))
        ref = HybridMoEForCausalLM(config).train()
        model = HybridMoEForCausalLM(config).train()
        model.load_state_dict(ref.state_dict())
        parallelize(model, par)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        ids, labels, docs = _batch(4, 32, config.vocab_size)
        # SFT's per-token loss weights through the vocab-parallel loss (with tp alone every rank holds every row)
        weights = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) if weighted else None
        losses, ref_losses, grad_errors = [], [], []
        for _ in range(steps):
            out = ref(ids, labels=labels, document_ids=docs, loss_weights=weights, return_logits=False)
            out.loss.backward()
            ref_losses.append(float(out.loss))
            rows = par.local_rows({"ids": ids, "labels": labels, "docs": docs})
            out = model(rows["ids"], labels=rows["labels"], document_ids=rows["docs"], loss_weights=weights,
                        return_logits=False)  # fmt: skip
            out.loss.backward()
            reduce_partial_grads(model, par)
            losses.append(par.sum([float(out.loss)])[0] / world)
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
            grads = reference_order(grads, config, tp)
            err = max(
                float((grads[n] - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-12))
                for n, p in ref.named_parameters()
            )
            grad_errors.append(err)
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0, par)
            ref_opt.step(), opt.step()
            ref_opt.zero_grad(), opt.zero_grad()
        if rank == 0:
            result = {"losses": losses, "ref": ref_losses, "grad_errors": grad_errors}
            with open(os.path.join(out_dir, "tp.json"), "w") as fh:
                json.dump(result, fh)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "world,tp,ep,overrides,weighted",
    [(2, 2, 1, None, True), (4, 2, 1, None, False), (4, 2, 2, None, False), (2, 2, 2, None, False),
     (2, 2, 1, {"num_key_value_heads": 1}, False), (4, 4, 1, {"n_groups": 4}, False)],
    ids=["tp2-loss-weights", "dp2xtp2", "dp2xtp2xep2", "tp2xep2", "tp2-one-kv-head", "tp4-two-kv-heads"],
)  # fmt: skip
def test_tensor_parallel_matches_single_process(tmp_path, world, tp, ep, overrides, weighted):
    """ep borrows its ranks from tp too (`distributed.mesh`); with fewer KV heads than tp ranks (all Nemotron 3
    models have 2) each rank computes the KV head its query heads read; SFT's loss weights (tp2-loss-weights) go
    through the vocab-parallel loss."""
    args = (world, str(tmp_path / "store"), str(tmp_path), tp, 3, ep, overrides, weighted)
    start_ranks(_tp_worker, args, nprocs=world)
    r = json.loads((tmp_path / "tp.json").read_text())
    assert r["losses"] == pytest.approx(r["ref"], rel=1e-4), r
    assert max(r["grad_errors"]) < 1e-4, r


# ---------------------------------------------------------------------------------------------- trainer


def test_cli_tensor_parallel_matches_single_process(dist_setup, tmp_path):
    """`hybridmoe pretrain ... parallel.tp=2` on 4 processes (dp 2 x tp 2): the single-process losses and gradient
    norms, step by step; the consolidated checkpoint (Mamba rows back in the Hugging Face order) and the export
    equal the single-process model (resuming with another tp degree: `test_resume_layouts`)."""
    root, path, reference, single = dist_setup
    out = tmp_path / "tp"
    _ranks(4, path, "parallel.tp=2", f"train.out_dir={out}", "train.steps=10")
    _assert_same_trajectory(step_records(out), reference, list(range(1, 11)))
    _assert_exported_equals(out, tmp_path / "exported", single["model"].state_dict())


def test_cli_mixed_precision_matches_autocast(dist_setup, tmp_path):
    """parallel.mixed_precision=bf16 (FSDP2: bf16 compute copies of fp32 master weights, fp32 gradient reduction)
    on 2 processes follows the single-process bf16-autocast run; the checkpoint holds fp32 weights."""
    root, path, _, _ = dist_setup
    steps = ["train.steps=4", "train.save_every=0"]
    autocast = tmp_path / "autocast"
    train(Recipe.from_yaml(str(path), ["train.precision=autocast-bf16", f"train.out_dir={autocast}", *steps]))
    out = tmp_path / "mixed"
    _ranks(2, path, "parallel.mixed_precision=bf16", f"train.out_dir={out}", *steps)
    records, reference = step_records(out), step_records(autocast)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r, ref in zip(records, reference):
        assert r["loss"] == pytest.approx(ref["loss"], rel=5e-3), (r["step"], r["loss"], ref["loss"])
    weights = load_file(str(out / "checkpoints" / "step-0000004" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
    with pytest.raises(ValueError, match="train.precision=fp32"):
        Recipe.from_yaml(str(path), ["parallel.mixed_precision=bf16", "train.precision=bf16"]).validate()
