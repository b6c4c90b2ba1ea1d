"""Tensor parallelism (+ sequence parallelism, vocab-parallel loss) on CPU with gloo: the native model split over
tp ranks, alone and under FSDP2 over dp (dp x tp), gives the single-process loss and gradients."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _config():
    # debug with MTP; an aux-loss coefficient large enough that its gradient is seen
    return HybridMoEConfig.from_preset("debug", router_aux_loss_coef=1e-2)


def _batch(rows: int, t: int, vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, t), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # the same in every row: each data-parallel rank averages over as many targets
    docs = (torch.arange(t) >= t // 3).long().expand(rows, t).clone()  # two packed documents per row
    return ids, labels, docs


def _tp_worker(rank, world, store, out_dir, tp, steps):
    from hybridmoe.distributed import clip_grad_norm_, parallelize, reduce_partial_grads, setup
    from hybridmoe.distributed.tp import reference_order

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
    try:
        par = setup(tp=tp, backend="gloo")
        torch.manual_seed(0)
        config = _config()
        ref = HybridMoEForCausalLM(config).train()
        model = HybridMoEForCausalLM(config).train()
        model.load_state_dict(ref.state_dict())
        parallelize(model, par)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        ids, labels, docs = _batch(4, 32, config.vocab_size)
        losses, ref_losses, grad_errors = [], [], []
        for _ in range(steps):
            out = ref(ids, labels=labels, document_ids=docs, return_logits=False)
            out.loss.backward()
            ref_losses.append(float(out.loss))
            rows = par.local_rows({"ids": ids, "labels": labels, "docs": docs})
            out = model(rows["ids"], labels=rows["labels"], document_ids=rows["docs"], return_logits=False)
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


@pytest.mark.parametrize("world,tp", [(2, 2), (4, 2)], ids=["tp2", "dp2xtp2"])
def test_tensor_parallel_matches_single_process(tmp_path, world, tp):
    mp.start_processes(_tp_worker, args=(world, str(tmp_path / "store"), str(tmp_path), tp, 3), nprocs=world,
                       start_method="spawn")  # fmt: skip
    r = json.loads((tmp_path / "tp.json").read_text())
    assert r["losses"] == pytest.approx(r["ref"], rel=1e-4), r
    assert max(r["grad_errors"]) < 1e-4, r
