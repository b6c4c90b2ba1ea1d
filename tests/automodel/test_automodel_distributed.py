"""Expert parallelism and FSDP2 for transformers MoE models (`hybridmoe.automodel.parallelize`) on 2 CPU processes
with gloo: each rank's logits and every parameter's gradient equal the single-process model's on the same batch."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from ranks import start_ranks
from test_automodel import FAMILIES, _randomize_constant_tensors_

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2


def _add_lora(model, family):
    """Rank-2 LoRA on every linear layer and the experts, the same on every rank; B random (not zero) so that every
    factor gets a gradient."""
    from hybridmoe.automodel import apply_lora

    torch.manual_seed(5)
    apply_lora(model, r=2, alpha=4)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _worker(rank, world, store, out_dir, family, ep, lora=False):
    import transformers
    from torch.distributed.fsdp import FSDPModule

    from hybridmoe.automodel import AutoModelForCausalLM
    from hybridmoe.automodel.parallel import parallelize
    from hybridmoe.automodel.patch import find_moe_experts
    from hybridmoe.distributed import setup

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
    try:
        par = setup(ep=ep, backend="gloo")
        config, _ = FAMILIES[family]()
        torch.manual_seed(0)
        reference = AutoModelForCausalLM.from_config(config)
        _randomize_constant_tensors_(reference)
        reference.train()
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(reference.state_dict())
        if lora:
            _add_lora(reference, family)
            _add_lora(model, family)
        model.train()
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, config.vocab_size, (2 * world, 16), generator=g)
        # single process: the whole batch (every rank computes it)
        ref_out = reference(ids, labels=ids)  # training with labels: the fused LM loss (logits None)
        ref_out.loss.backward()
        # parallel: this rank's rows; the loss is a mean over rows of equal length, so the rank average is exact
        parallelize(model, par)
        rows = slice(2 * rank, 2 * rank + 2)
        with torch.no_grad():  # the logits first: FSDP2 drops the root's gradients at a forward after backward
            logits, ref_logits = model(ids[rows]).logits, reference(ids).logits[rows]
        out = model(ids[rows], labels=ids[rows])
        out.loss.backward()
        assert out.logits is None and ref_out.logits is None
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        result = {
            "logits": (logits - ref_logits).abs().max().item(),
            "loss": abs(loss.item() / world - ref_out.loss.item()),
            "grads": {},
            "sharded": 0,
        }
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}
        for name, p in model.named_parameters():
            if not p.requires_grad:  # frozen under LoRA
                assert p.grad is None and ref_grads[name] is None, name
                continue
            assert p.grad is not None, f"{family}: {name} has no gradient"
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            ref = ref_grads[name]
            result["grads"][name] = ((grad - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()
            local = p.to_local() if hasattr(p, "to_local") else p
            result["sharded"] += int(local.numel() < p.numel())
        result["expert_lora_sharded"] = sum(
            int(hasattr(p, "to_local") and p.to_local().shape[0] < p.shape[0])
            for name, p in model.named_parameters()
            if ".experts.lora_" in name
        )
        result["experts_in_fsdp"] = sum(isinstance(m, FSDPModule) for _, m in find_moe_experts(model))
        with open(os.path.join(out_dir, f"{family}-{ep}-{rank}.json"), "w") as fh:
            json.dump(result, fh)
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "family,ep", [("qwen3_moe", 2), ("mixtral", 2), ("nemotron_h", 2), ("gpt_oss", 2), ("qwen3_moe", 1)]
)
def test_parallel_equals_single_process(tmp_path, family, ep):
    start_ranks(_worker, (WORLD, str(tmp_path / "store"), str(tmp_path), family, ep), nprocs=WORLD)
    for rank in range(WORLD):
        with open(tmp_path / f"{family}-{ep}-{rank}.json") as fh:
            r = json.load(fh)
        assert r["logits"] <= 1e-5, r["logits"]
        assert r["loss"] <= 1e-6, r["loss"]
        worst = max(r["grads"].items(), key=lambda kv: kv[1])
        assert worst[1] <= 1e-4, worst
        assert r["sharded"] > 0  # FSDP (and EP) really split the parameters
        if ep == WORLD:  # each expert on one rank: FSDP leaves the experts alone
            assert r["experts_in_fsdp"] == 0, r["experts_in_fsdp"]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_expert_lora_under_expert_parallelism_equals_single_process(tmp_path, family):
    start_ranks(_worker, (WORLD, str(tmp_path / "store"), str(tmp_path), family, 2, True), nprocs=WORLD)
    for rank in range(WORLD):
        with open(tmp_path / f"{family}-2-{rank}.json") as fh:
            r = json.load(fh)
        assert r["logits"] <= 1e-5 and r["loss"] <= 1e-6, (r["logits"], r["loss"])
        assert any(".experts.lora_" in name for name in r["grads"]), "no expert adapters were trained"
        worst = max(r["grads"].items(), key=lambda kv: kv[1])
        assert worst[1] <= 1e-4, worst
        assert r["expert_lora_sharded"] > 0, "the expert adapters were not split with their experts"
