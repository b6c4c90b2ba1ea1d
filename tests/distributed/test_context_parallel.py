"""Context parallelism on CPU with gloo: each rank runs one contiguous shard of every sequence (attention over the
group's gathered keys, Mamba-2's conv inputs and SSM states passed between shards), alone and under FSDP2 over
dp x cp, and gives the single-process losses and gradients, with packed documents crossing the shard boundaries."""

from __future__ import annotations

import json
import os

import pytest
import test_distributed
import torch
import torch.distributed as dist
from ranks import start_ranks
from test_distributed import _assert_same_trajectory, _ranks
from test_pretrain import step_records

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM

dist_setup = test_distributed.dist_setup  # the debug recipe and its single-process run (a module-scoped fixture)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

T = 48  # two shards of 24 tokens: not a multiple of the debug chunk size (16)


def _config():
    # debug with MTP; an aux-loss coefficient large enough that its gradient is seen
    return HybridMoEConfig.from_preset("debug", router_aux_loss_coef=1e-2)


def _batch(vocab: int):
    g = torch.Generator().manual_seed(2)  # no near-tie of two experts (within float noise) in these 3 steps
    ids = torch.randint(0, vocab, (4, T), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[:, 30:36] = -100  # the shards hold different numbers of targets
    pos = torch.arange(T)
    # as many boundaries in rows 0-1 as in rows 2-3: each data-parallel rank's MTP loss averages over as many
    # targets (it is the mean over the rank's own targets), away from the ignored labels
    docs = torch.stack([
        (pos >= 10).long() + (pos >= 40).long(),  # a document across the shard boundary (24): the state passes
        (pos >= 24).long(),  # a document starting exactly at shard 1's first token: nothing passes
        (pos >= 8).long() + (pos >= 25).long(),  # a boundary within the conv window of shard 1's start
        (pos >= 40).long(),  # shard 1 continues shard 0's document, then another one starts
    ])  # fmt: skip
    return ids, labels, docs


def _cp_worker(rank, world, store, out_dir, cp, steps, packed, tp=1, ep=1):
    from hybridmoe.distributed import clip_grad_norm_, parallelize, reduce_partial_grads, setup
    from hybridmoe.distributed.tp import reference_order

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
    try:
        par = setup(cp=cp, tp=tp, ep=ep, backend="gloo")
        torch.manual_seed(0)
        config = _config()
        ref = HybridMoEForCausalLM(config).train()
        model = HybridMoEForCausalLM(config).train()
        model.load_state_dict(ref.state_dict())
        parallelize(model, par)
        # The losses follow the single-process run's; the gradients are compared at the same weights (the sharded
        # model's, in `probe`): along two runs, float noise moves a top-k choice of some token after a few steps
        # (an MTP MoE layer at step 3 here), which changes a few experts' gradients by percents and the loss by
        # ~1e-7. eps 1e-6: AdamW's first step turns a gradient element that is float noise (~1e-9, layer 0's
        # gated-norm weight here) into an update of ~lr / 3, a different one in each process.
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-6)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, foreach=True)
        ids, labels, docs = _batch(config.vocab_size)
        docs = docs if packed else None
        probe = HybridMoEForCausalLM(config).train()  # the single-process gradients at the sharded model's weights
        losses, ref_losses, grad_errors = [], [], []
        for _ in range(steps):
            out = ref(ids, labels=labels, document_ids=docs, return_logits=False)
            out.loss.backward()
            ref_losses.append(float(out.loss.detach()))
            weights = reference_order({n: p.full_tensor() for n, p in model.named_parameters()}, config, tp)
            probe.load_state_dict(weights, strict=False)
            probe(ids, labels=labels, document_ids=docs, return_logits=False).loss.backward()
            rows = par.local_rows({"ids": ids, "labels": labels, "docs": docs})
            out = model(rows["ids"], labels=rows["labels"], document_ids=rows["docs"], return_logits=False)
            out.loss.backward()
            reduce_partial_grads(model, par)
            losses.append(par.sum([float(out.loss.detach())])[0] / world)  # what the session logs
            grads = reference_order({n: p.grad.full_tensor() for n, p in model.named_parameters()}, config, tp)
            err = max(
                float((grads[n] - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-12))
                for n, p in probe.named_parameters()
            )
            grad_errors.append(err)
            probe.zero_grad()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0, par)
            ref_opt.step(), opt.step()
            ref_opt.zero_grad(), opt.zero_grad()
        if rank == 0:
            with open(os.path.join(out_dir, "cp.json"), "w") as fh:
                json.dump({"losses": losses, "ref": ref_losses, "grad_errors": grad_errors}, fh)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "world,cp,packed,tp,ep",
    [(2, 2, True, 1, 1), (2, 2, False, 1, 1), (4, 2, True, 1, 1), (4, 2, True, 2, 1), (4, 2, True, 2, 4)],
    ids=["cp2-packed", "cp2", "dp2xcp2-packed", "cp2xtp2-packed", "cp2xtp2xep4"],
)  # fmt: skip
def test_context_parallel_matches_single_process(tmp_path, world, cp, packed, tp, ep):
    # ep borrows its ranks from cp and tp too (the experts' mesh folds every rank of the stage: `distributed.mesh`)
    start_ranks(_cp_worker, (world, str(tmp_path / "store"), str(tmp_path), cp, 3, packed, tp, ep),
                       nprocs=world)  # fmt: skip
    r = json.loads((tmp_path / "cp.json").read_text())
    assert r["losses"] == pytest.approx(r["ref"], rel=1e-4), r
    assert max(r["grad_errors"]) < 1e-4, r


# ---------------------------------------------------------------------------------------------- trainer


def test_cli_context_parallel_matches_single_process(dist_setup, tmp_path):
    """`hybridmoe pretrain ... parallel.cp=2 parallel.ep=2` on 4 processes (dp 2 x cp 2, the experts split over the
    data-parallel ranks): the single-process losses, aux loss and gradient norms, step by step, packed documents
    masked; the consolidated checkpoint equals the single-process model."""
    root, path, reference, single = dist_setup
    out = tmp_path / "cp"
    _ranks(4, path, "parallel.cp=2", "parallel.ep=2", f"train.out_dir={out}", "train.steps=10")
    _assert_same_trajectory(step_records(out), reference, list(range(1, 11)))
    model = HybridMoEForCausalLM.from_pretrained(str(out / "checkpoints" / "step-0000010"))
    expected = single["model"].state_dict()
    for name, tensor in model.state_dict().items():
        if not name.endswith("tokens_per_expert"):
            torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_zigzag_chunks_balance_the_causal_work():
    """cp 2 over 16 tokens: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2; each rank's queries see as many
    causal query-key pairs; `runs` maps local tokens back to positions."""
    from hybridmoe.distributed.cp import ContextParallel, Shard

    x = torch.arange(16)[None]
    shards = [Shard(ContextParallel(None, r, 2), 16, None) for r in range(2)]
    assert shards[0].local(x).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert shards[1].local(x).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert shards[0].runs(2, 4) == [(2, 2), (12, 2)] and shards[1].runs(4, 4) == [(8, 4)]
    pairs = [sum(int(p) + 1 for p in s.local(x)[0]) for s in shards]  # query at position p sees p + 1 keys
    assert pairs[0] == pairs[1]
    for size in (2, 4):  # every position once over the group
        group = [Shard(ContextParallel(None, r, size), 32, None) for r in range(size)]
        assert sorted(torch.cat([s.local(torch.arange(32)[None])[0] for s in group]).tolist()) == list(range(32))


def test_context_parallel_refuses_what_it_does_not_run():
    from hybridmoe.distributed.mesh import ParallelDims

    with pytest.raises(ValueError, match=r"parallel.cp=2: the sequence length \(7\) must be a multiple of 2 x cp"):
        from hybridmoe.distributed.cp import ContextParallel
        from hybridmoe.modeling import ForwardContext

        ContextParallel(None, 0, 2).begin(ForwardContext(), 7, 4)
    with pytest.raises(ValueError, match="parallel.tp=1 x parallel.cp=2 must divide the number of processes"):
        ParallelDims(3, cp=2).resolved()
    assert ParallelDims(8, cp=2, tp=2, ep=2).resolved().dp_shard == 2
