"""The memory planner: its activation formulas against what autograd really keeps, its total against the measured
peak of a real training step, its layout arithmetic, and the `hybridmoe plan` command."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from ranks import start_ranks

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.cli import main
from hybridmoe.plan import (
    GIB,
    Layout,
    block_parameters,
    feasible_layouts,
    head_activation_bytes,
    layer_activation_bytes,
    plan,
    split_stages,
)


def saved_bytes_by_block(model, ids):
    """Bytes of the unique storages autograd saves during one training forward, per backbone block (keyed by
    index) and "head" for everything else (final norm, loss, MTP); parameters and the input ids left out."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {ids.untyped_storage().data_ptr()}
    where, seen = ["head"], {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen.setdefault(where[0], {})[ptr] = t.untyped_storage().nbytes()
        return t

    for i, layer in enumerate(model.backbone.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i))
        layer.register_forward_hook(lambda m, a, o: where.__setitem__(0, "head"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids, return_logits=False)
    return {k: sum(v.values()) for k, v in seen.items()}


@pytest.mark.parametrize(
    "overrides,batch,seq",
    [
        ({}, 2, 32),
        ({}, 1, 100),  # a partial SSD chunk
        ({"moe_latent_size": None, "num_nextn_predict_layers": 0, "hidden_size": 96}, 3, 64),
    ],
)
def test_activation_formulas_match_saved_tensors(overrides, batch, seq):
    config = HybridMoEConfig.from_preset("debug", **overrides)
    torch.manual_seed(0)
    model = HybridMoEForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    measured = saved_bytes_by_block(model, ids)
    for i, symbol in enumerate(config.hybrid_override_pattern):
        predicted = layer_activation_bytes(config, symbol, batch, seq, 4)
        tol = 0.035 if symbol == "M" else 1e-9  # the SSD's small chunk-boundary tensors are approximated
        assert predicted == pytest.approx(measured[i], rel=tol), (symbol, predicted, measured[i])
    assert head_activation_bytes(config, batch, seq, 4) == pytest.approx(measured["head"], rel=0.02)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_planned_peak_matches_measured_allocation_peak(checkpointing):
    """A whole training step (forward, backward, fused AdamW) of `debug`: the plan's total against the peak of live
    tensor bytes that torch.profiler records (the CPU's torch.cuda.max_memory_allocated)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    config = HybridMoEConfig.from_preset("debug", vocab_size=4096)
    torch.manual_seed(0)
    model = HybridMoEForCausalLM(config).train()
    model.backbone.gradient_checkpointing = checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, config.vocab_size, (4, 256))

    def step():
        model(ids, labels=ids, return_logits=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step()  # optimizer state allocated
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        step()
    _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline("cpu")
    measured = max(sum(row) for row in sizes)
    planned = plan(config, Layout(micro_batch=4, checkpointing=checkpointing), 256, precision="fp32")
    assert planned.total == pytest.approx(measured, rel=0.15), (planned.total, measured)


def test_single_process_state_is_sixteen_bytes_per_parameter():
    config = HybridMoEConfig.from_preset("debug")
    n = sum(p.numel() for p in HybridMoEForCausalLM(config, device="meta").parameters())
    p = plan(config, Layout(), 64, precision="fp32")
    assert p.params + p.grads + p.optimizer == 16 * n
    assert p.fsdp_buffers == 0 and p.moe_dispatch == 0


def test_sharding_and_checkpointing_scale_as_they_should():
    config = HybridMoEConfig.from_preset("nano-30b-a3b")
    params = block_parameters(config)
    one = plan(config, Layout(dp=8, ep=8), 4096, params=params)
    two = plan(config, Layout(dp=16, ep=8), 4096, params=params)
    assert two.params == pytest.approx(one.params / 2)
    assert two.activations == one.activations  # same micro-batch per rank
    ckpt = plan(config, Layout(dp=8, ep=8, checkpointing=True), 4096, params=params)
    assert ckpt.activations < one.activations / 10
    assert ckpt.transient > one.transient  # one block is rebuilt in backward
    tp = plan(config, Layout(dp=4, tp=2, ep=4), 4096, params=params)
    # sequence parallelism halves the activations but for the mixers' all-gathered inputs and the loss's rows
    assert one.activations / 2 < tp.activations < one.activations / 2 * 1.05
    assert not any("planned" in n for n in tp.notes)  # tp is implemented
    assert not plan(config, Layout(dp=4, tp=2, ep=8), 4096, params=params).notes  # ep borrows from tp too
    assert not any("planned" in n for n in plan(config, Layout(dp=4, pp=2, ep=4), 4096, params=params).notes)
    for composed in (Layout(dp=2, tp=2, pp=2, ep=2), Layout(dp=2, cp=2, pp=2, ep=2)):  # pp with tp or cp runs
        assert not any("planned" in n for n in plan(config, composed, 4096, params=params).notes), composed
    assert not any("planned" in n for n in plan(config, Layout(dp=4, cp=2, ep=4), 4096, params=params).notes)
    # 1F1B: the first stage holds pp micro-batches of its activations
    pp = plan(config, Layout(dp=4, pp=2, ep=4), 4096, params=params)
    assert pp.stage == 0 and pp.activations > one.activations * 0.9


def _tp_rank(rank, store, out_dir):
    from hybridmoe.distributed import parallelize, setup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    os.environ.update(WORLD_SIZE="2", RANK=str(rank))
    try:
        par = setup(tp=2, backend="gloo")
        model = parallelize(HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug")), par)
        held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as fh:
            json.dump(held, fh)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_tensor_parallel_parameters_are_what_each_rank_holds(tmp_path):
    """Under tp 2 each rank holds the split weights' halves and, whole, what tensor parallelism leaves whole (the
    embedding, the norms between mixers, the router, the latent projections, the routed experts): the plan's
    parameter bytes are those of the parallelized model on each gloo rank."""
    start_ranks(_tp_rank, (str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    held = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    planned = plan(HybridMoEConfig.from_preset("debug"), Layout(tp=2), 64, precision="fp32")
    assert held[0] == held[1] and planned.params == 4 * held[0], (planned.params / 4, held)
    # the vocabulary-parallel loss runs on the gathered tokens: a chunk of min(tokens, 2048) rows x vocab / 2
    config = HybridMoEConfig.from_preset("tiny")
    assert plan(config, Layout(tp=2), 2048, precision="fp32").transient == 2 * 2048 * config.vocab_size // 2 * 4


def test_split_stages_and_layout_errors():
    assert split_stages("MEM*E", 2) == ["MEM", "*E"]
    assert "".join(split_stages("MEMEMEM*EMEM", 5)) == "MEMEMEM*EMEM"
    config = HybridMoEConfig.from_preset("debug")
    with pytest.raises(ValueError, match="does not divide the 8 experts"):
        plan(config, Layout(dp=3, ep=3), 64)
    with pytest.raises(ValueError, match="must divide dp x cp x tp"):
        plan(config, Layout(dp=1, ep=2), 64)
    with pytest.raises(ValueError, match="attention heads"):
        plan(config, Layout(tp=8), 64)
    with pytest.raises(ValueError, match="pipeline stages"):
        plan(config, Layout(pp=7), 64)
    with pytest.raises(ValueError, match="global batch"):
        plan(config, Layout(dp=2), 64, global_batch=3)


def test_feasible_layouts_fit_and_respect_the_rules():
    config = HybridMoEConfig.from_preset("nano-30b-a3b")
    found = feasible_layouts(config, gpus=16, gpu_memory_gib=80, seq=4096)
    assert found
    for p in found:
        L = p.layout
        assert L.gpus == 16 and p.total <= 80 * GIB
        assert config.n_routed_experts % L.ep == 0 and (L.dp * L.cp * L.tp) % L.ep == 0
    assert [p.layout.checkpointing for p in found] == sorted(p.layout.checkpointing for p in found)
    only = feasible_layouts(config, gpus=16, gpu_memory_gib=80, seq=4096, implemented_only=True)
    assert only and all((p.layout.dp * p.layout.cp * p.layout.tp) % p.layout.ep == 0 for p in only)
    # context parallelism runs: a long sequence that fits only split over cp ranks is found
    long = feasible_layouts(config, gpus=16, gpu_memory_gib=80, seq=262144, implemented_only=True, limit=99)
    assert any(p.layout.cp > 1 for p in long)
    assert any(p.layout.pp > 1 and p.layout.tp > 1 and p.layout.cp > 1 for p in long)  # pp x tp x cp runs
    # the search keeps to what the trainer's tensor parallelism splits: 2 Mamba groups allow tp 2 at most, while
    # Nano's 2 KV heads allow tp 8 (each rank computes the KV head its query heads read)
    two_groups = HybridMoEConfig.from_preset("nano-30b-a3b", n_groups=2)
    assert {p.layout.tp for p in feasible_layouts(two_groups, 16, 40, 4096, implemented_only=True, limit=99)} <= {1, 2}
    assert 8 in {p.layout.tp for p in feasible_layouts(config, 16, 40, 4096, implemented_only=True, limit=99)}
    assert feasible_layouts(config, gpus=1, gpu_memory_gib=80, seq=4096) == []


def test_plan_command(capsys):
    assert main(["plan", "--preset", "debug", "--gpus", "4", "--dp", "2", "--tp", "2", "--ep", "2",
                 "--seq", "256", "--json"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    parts = ("params", "grads", "optimizer", "fsdp_buffers", "activations", "moe_dispatch", "transient", "overhead")
    assert out["total"] == pytest.approx(sum(out[k] for k in parts))
    assert out["flops_per_step"] > 0
    assert main(["plan", "--preset", "debug", "--gpus", "2", "--dp", "2", "--seq", "256"]) == 0
    text = capsys.readouterr().out
    assert "activations kept for backward" in text and "with activation checkpointing: activations" in text
    assert (
        main(["plan", "--preset", "debug", "--gpus", "4", "--seq", "256", "--gpu-memory", "1", "--overhead-gib", "0"])
        == 0
    )
    assert "feasible layouts" in capsys.readouterr().out
    assert main(["plan", "--preset", "debug", "--gpus", "4", "--dp", "3", "--seq", "256"]) == 2
    assert "make them agree" in capsys.readouterr().err


def test_pipeline_peak_follows_the_micro_batches_in_flight():
    """1F1B on stage 0 of 2: with 2 micro-batches per step both are in flight at the first backward, before any
    gradient of the step exists; with 8 the steady phase holds 2 in flight and the gradients; 1 is refused (the
    trainer needs at least pp), and the default global batch gives pp."""
    config = HybridMoEConfig.from_preset("tiny")
    layout = Layout(dp=1, pp=2)
    two, eight = (plan(config, layout, 2048, global_batch=n, precision="fp32") for n in (2, 8))
    assert two.stage == eight.stage == 0
    assert eight.activations == two.activations and two.grads == 0 and eight.grads > 0
    single = plan(config, Layout(), 2048, precision="fp32")
    assert two.activations > 1.8 * single.activations / 2  # about half the layers, twice
    with pytest.raises(ValueError, match="at least pp = 2"):
        plan(config, layout, 2048, global_batch=1)
    assert plan(config, layout, 2048, precision="fp32").global_batch == 2
