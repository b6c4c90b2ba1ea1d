"""Training with `train.compile` (per-block torch.compile, `train.model.compile_blocks`): the same losses as eager
on this CPU (Inductor's C++ backend), the recipe key, and the graph breaks the model's training forward is left
with (the MoE layers' deliberate ones)."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import write_prepared
from test_pretrain import VOCAB, pattern_docs, step_records

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.kernels.moe import count_per_expert
from hybridmoe.modeling import Block, _local
from hybridmoe.train.config import Recipe, RLRecipe, SFTRecipe
from hybridmoe.train.pretrain import pretrain


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("data"), pattern_docs(200, 1), vocab=VOCAB, dtype="uint16")


def _recipe(out_dir, data_dir, **train):
    return Recipe.from_dict(
        {
            # a Mamba, an attention and an MoE block, and the MTP layers (attention + MoE, two depths)
            "model": {"preset": "debug", "overrides": {"hybrid_override_pattern": "M*E"}},
            "data": {"phases": [{"datasets": {str(data_dir): 1.0}}], "seq_len": 32, "batch_size": 2,
                     "val_fraction": 0.05},
            "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
            "train": {"steps": 3, "out_dir": str(out_dir), "progress": False, "tensorboard": False, "val_batches": 0,
                      **train},
        }
    )  # fmt: skip


def test_compiled_training_matches_eager(tmp_path, data_dir):
    eager = pretrain(_recipe(tmp_path / "eager", data_dir), peak_gflops=100.0)
    compiled = pretrain(_recipe(tmp_path / "compiled", data_dir, compile=True), peak_gflops=100.0)
    # activation checkpointing recomputes each compiled block in the backward (the graphs compiled above are reused)
    pretrain(_recipe(tmp_path / "recomputed", data_dir, compile=True, activation_checkpointing=True), peak_gflops=100.0)
    blocks = [m for m in compiled["model"].modules() if isinstance(m, Block)]
    assert len(blocks) == 5 and all(b._compiled_call_impl is not None for b in blocks)  # 3 backbone + 2 MTP
    assert all(b._compiled_call_impl is None for b in eager["model"].modules() if isinstance(b, Block))
    reference = step_records(tmp_path / "eager")
    for run in ("compiled", "recomputed"):
        records = step_records(tmp_path / run)
        for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm"):
            got, want = [r[key] for r in records], [r[key] for r in reference]
            np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{run}: {key}")
    # the parameter names (and so checkpoints) are those of the eager model
    assert list(compiled["model"].state_dict()) == list(eager["model"].state_dict())


def test_the_recipe_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {preset: debug}\ndata: {phases: [{datasets: {x: 1.0}}]}\n")
    assert Recipe.from_yaml(str(path)).train.compile is False
    assert Recipe.from_yaml(str(path), ["train.compile=true"]).train.compile is True
    with pytest.raises(ValueError, match=r"train.compile='fast': use true or false"):
        Recipe.from_yaml(str(path), ["train.compile=fast"])
    sft = SFTRecipe.from_dict({"model": {"source": "transformers", "init_from": str(tmp_path)},
                               "data": {"datasets": {"x.jsonl": 1.0}}, "train": {"compile": True}})  # fmt: skip
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="train.compile=true compiles the blocks of a native model"):
        sft.validate()
    rl = RLRecipe.from_dict({"model": {"tokenizer": "tok"}, "train": {"compile": True}})
    with pytest.raises(ValueError, match="train.compile=true is for hybridmoe pretrain and sft"):
        rl.validate()


def test_count_per_expert_compiles_to_bincount():
    idx = torch.randint(0, 6, (40,))
    compiled = torch.compile(count_per_expert, backend="eager", fullgraph=True)
    assert torch.equal(compiled(idx, 9), torch.bincount(idx, minlength=9))


def test_the_training_forward_breaks_only_where_the_experts_need_eager_code():
    """Dynamo traces the whole training forward (input checks, routing, the bias-update counts) without a graph break
    but the two each MoE layer takes on purpose: around its host-side segment loop, and where it hands its aux loss
    to the forward's list (a traced append would compile the block again for every MoE layer)."""
    torch.manual_seed(0)
    config = HybridMoEConfig.from_preset("debug", num_nextn_predict_layers=0)
    model = HybridMoEForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 16))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids, labels=ids)
    reasons = [r.reason for r in explained.break_reasons]
    moe_layers = config.hybrid_override_pattern.count("E")
    assert sum("_segment_experts" in r for r in reasons) >= moe_layers, reasons
    assert sum("_add_aux_loss" in r for r in reasons) >= moe_layers, reasons
    assert all("_segment_experts" in r or "_add_aux_loss" in r for r in reasons), reasons
    # the checks still run outside compilation
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(ids + config.vocab_size)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_compiled_blocks_see_the_local_shard_of_a_tensor_parallel_parameter(tmp_path):
    """Under tensor parallelism the Mamba mixer reads its conv weight, A, D and dt_bias through `_local`; Dynamo
    answered hasattr(DTensor, "to_local") False, so a compiled block mixed a DTensor into plain-tensor math."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        weight = torch.nn.Parameter(distribute_tensor(torch.randn(6), init_device_mesh("cpu", (1,)), [Shard(0)]))
        out = torch.compile(lambda w: _local(w) * 2, backend="eager", fullgraph=True)(weight)
        assert not isinstance(out, DTensor)
        torch.testing.assert_close(out, weight.to_local() * 2)
    finally:
        dist.destroy_process_group()


def test_host_loop_paths_run_eagerly_under_compile_once_prepared():
    # `eager_under_compile` marks them at import without importing torch._dynamo; `prepare_compile` (which
    # compile_blocks and the engine's compile mode call) swaps in their torch.compiler.disable versions, so Dynamo
    # does not trace their per-expert host loops
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "import hybridmoe.modeling as m, hybridmoe.kernels.moe as moe\n"
        "from hybridmoe.utils import prepare_compile\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "names = ('_segment_experts', '_quantized_experts', 'expert_parallel_segments')\n"
        "before = [getattr(moe, n) for n in names] + [m._add_aux_loss]\n"
        "prepare_compile(); prepare_compile()\n"
        "after = [getattr(moe, n) for n in names] + [m._add_aux_loss]\n"
        "assert all(a is not b and a.__wrapped__ is b for a, b in zip(after, before)), after\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stdout + out.stderr
