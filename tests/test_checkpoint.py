"""Checkpoint directories and config.json: the published nemotron_h layout in and out, and the config reader.

Covers what `hybridmoe.checkpoint` and `HybridMoEConfig` promise: the key layout (`backbone.*`, one tensor per expert,
`lm_head.weight`, `mtp.layers.*`), sharding with an index and the removal of stale shards, bf16 loading with an fp32
router, errors that name the offending key or field, every spelling of a config.json that transformers or NVIDIA
have written, validation, and the presets' parameter counts against the published ones.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.cli import main as cli_main

transformers.logging.set_verbosity_error()

# M * E - E: every layer kind, two MoE layers of 4 experts in a latent space of 16.
BASE = dict(
    vocab_size=128,
    hidden_size=32,
    hybrid_override_pattern="M*E-E",
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=64,
    mamba_num_heads=4,
    mamba_head_dim=8,
    ssm_state_size=8,
    n_groups=2,
    chunk_size=8,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=32,
    moe_latent_size=16,
    initializer_range=0.1,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster than two, and far faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**overrides) -> HybridMoEConfig:
    return HybridMoEConfig(**BASE | overrides)


def _model(seed=0, **overrides) -> HybridMoEForCausalLM:
    torch.manual_seed(seed)
    model = HybridMoEForCausalLM(_config(**overrides))
    with torch.no_grad():  # no constant tensors: a swapped or skipped one must show
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("norm.weight", "layernorm.weight", "norm_f.weight", ".D", "e_score_correction_bias")):
                t.add_(0.1 * torch.randn_like(t))
    return model.eval()


def _ids(vocab_size, shape=(2, 11), seed=3):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def _keys(path) -> set[str]:
    keys = set()
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys |= set(f.keys())
    return keys


def _rewrite(path, edit):
    """Apply edit(dict of tensors) to the single model.safetensors of a checkpoint directory."""
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _transformers_shapes(hf_config) -> dict[str, tuple]:
    """Parameter shapes of transformers' model for a config, named as in our model (model. -> backbone.)."""
    with torch.device("meta"):
        model = transformers.NemotronHForCausalLM(hf_config)
    return {re.sub(r"^model\.", "backbone.", k): tuple(v.shape) for k, v in model.state_dict().items()}


def _our_shapes(config, mtp=False) -> dict[str, tuple]:
    sd = HybridMoEForCausalLM(config, device="meta").state_dict()
    return {k: tuple(v.shape) for k, v in sd.items() if mtp or not k.startswith("mtp.")}


# ---------------------------------------------------------------------------------------------- layout


def test_saved_layout_is_the_published_one(tmp_path):
    model = _model(num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    keys = _keys(tmp_path)
    assert all(k.startswith(("backbone.", "lm_head.", "mtp.layers.")) for k in keys), keys
    assert {"backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight"} <= keys
    assert not any(k.endswith(("experts.up_proj", "experts.down_proj")) for k in keys), "3D experts were written"
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        for layer in (2, 4):
            mixer = model.backbone.layers[layer].mixer
            for e in range(4):
                up = f.get_tensor(f"backbone.layers.{layer}.mixer.experts.{e}.up_proj.weight")
                down = f.get_tensor(f"backbone.layers.{layer}.mixer.experts.{e}.down_proj.weight")
                assert up.shape == (16, 16) and torch.equal(up, mixer.experts.up_proj[e])
                assert down.shape == (16, 16) and torch.equal(down, mixer.experts.down_proj[e])
            assert f.get_tensor(f"backbone.layers.{layer}.mixer.gate.e_score_correction_bias").dtype == torch.float32
    assert f"backbone.layers.{len(model.backbone.layers)}.norm.weight" not in keys
    # MTP: one layer of two blocks (* then E) stored as mtp.layers.0 / mtp.layers.1, with the published extras.
    mtp = {k for k in keys if k.startswith("mtp.")}
    assert {
        "mtp.layers.0.enorm.weight",
        "mtp.layers.0.hnorm.weight",
        "mtp.layers.0.eh_proj.weight",
        "mtp.layers.0.mixer.q_proj.weight",
        "mtp.layers.1.mixer.experts.3.up_proj.weight",
        "mtp.layers.1.mixer.gate.weight",
        "mtp.layers.1.final_layernorm.weight",
    } <= mtp
    assert not any(k.startswith("mtp.layers.2.") for k in mtp)
    # every parameter and persistent buffer is written once, experts split: 2 x (4 + 4) expert tensors replace
    # 2 x 2 stacked ones in the backbone and 4 + 4 replace 2 in the MTP block.
    assert len(keys) == len(model.state_dict()) + 3 * (8 - 2)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "nemotron_h"
    assert config["architectures"] == ["NemotronHForCausalLM"]
    assert config["num_hidden_layers"] == 5
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(hf).__name__ == "NemotronHConfig"
    assert hf.hybrid_override_pattern == "M*E-E"
    assert hf.layers_block_type == ["linear_attention", "full_attention", "moe", "mlp", "moe"]
    assert hf.num_nextn_predict_layers == 1 and hf.mtp_hybrid_override_pattern == "*E"
    assert (hf.moe_latent_size, hf.n_routed_experts, hf.time_step_limit[1]) == (16, 4, math.inf)


def test_reload_restores_everything_including_mtp(tmp_path):
    model = _model(num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E", mtp_num_depths=2)
    model.save_pretrained(tmp_path)
    loaded = HybridMoEForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert not loaded.training
    _assert_same_state(model, loaded)
    assert len(loaded.mtp.layers) == 2
    ids = _ids(128)
    with torch.no_grad():
        a, b = model(ids, labels=ids), loaded(ids, labels=ids)
    assert torch.equal(a.logits, b.logits)
    assert a.mtp_loss is not None and torch.equal(a.mtp_loss, b.mtp_loss) and torch.equal(a.loss, b.loss)


# ---------------------------------------------------------------------------------------------- sharding


def test_sharded_save_loads_everywhere_and_unsharded_resave_cleans_up(tmp_path):
    torch.manual_seed(0)
    model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug", chunk_size=8)).eval()  # ~1.3 MB in fp32
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    n = len(shards)
    assert n >= 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert set(weight_map.values()) == set(shards)
    assert set(weight_map) == _keys(tmp_path)
    total = 0
    for shard in shards:
        with safe_open(str(tmp_path / shard), framework="pt") as f:
            assert {k for k, v in weight_map.items() if v == shard} == set(f.keys())
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total

    ids = _ids(512, (1, 13))
    with torch.no_grad():
        want = model(ids).logits
    ours = HybridMoEForCausalLM.from_pretrained(tmp_path)
    _assert_same_state(model, ours)
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert (theirs.eval()(input_ids=ids).logits - want).abs().max() <= 1e-4

    # fewer, larger shards: the old ones go
    model.save_pretrained(tmp_path, max_shard_size="600KB")
    fewer = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert 2 <= len(fewer) < n and all(name.endswith(f"-of-{len(fewer):05d}.safetensors") for name in fewer)
    _assert_same_state(model, HybridMoEForCausalLM.from_pretrained(tmp_path))

    # unsharded into the same directory: stale shards and index removed, nothing else left behind
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    _assert_same_state(model, HybridMoEForCausalLM.from_pretrained(tmp_path))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (theirs(input_ids=ids).logits - want).abs().max() <= 1e-4


def test_bad_max_shard_size_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="max_shard_size"):
        _model().save_pretrained(tmp_path, max_shard_size="5 parsecs")


def test_legacy_embedding_key_is_read(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"backbone.embedding.weight": t.pop("backbone.embeddings.weight")}))
    _assert_same_state(model, HybridMoEForCausalLM.from_pretrained(tmp_path))


def test_index_listing_a_missing_shard_is_an_error(tmp_path):
    _model().save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[-1].unlink()
    with pytest.raises(ValueError, match=re.escape(shards[-1].name)):
        HybridMoEForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16"])
def test_bf16_load_keeps_the_router_in_fp32(tmp_path, dtype):
    model = _model()
    model.save_pretrained(tmp_path)
    loaded = HybridMoEForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    router = {"gate.weight", "gate.e_score_correction_bias"}
    fp32 = {name for name, t in loaded.state_dict().items() if t.dtype == torch.float32}
    assert fp32 == {n for n in loaded.state_dict() if n.split("mixer.", 1)[-1] in router}
    assert len(fp32) == 4
    assert all(t.dtype == torch.bfloat16 for n, t in loaded.state_dict().items() if n not in fp32)
    # fp32 tensors arrive untouched; bf16 ones are the rounded fp32 ones
    for name, t in loaded.state_dict().items():
        want = model.state_dict()[name]
        assert torch.equal(t, want if name in fp32 else want.to(torch.bfloat16)), name
    ids = _ids(128, (2, 17))
    with torch.no_grad():
        want = model(ids).logits
        got = loaded(ids).logits
    assert got.dtype == torch.float32
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.03, f"bf16 logits are {rel:.3f} (relative) from the fp32 model's"
    # and a bf16 save round-trips exactly, its config.json naming the dtype
    loaded.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("backbone.layers.2.mixer.experts.0.up_proj.weight").dtype == torch.bfloat16
        assert f.get_tensor("backbone.layers.2.mixer.gate.weight").dtype == torch.float32
    _assert_same_state(loaded, HybridMoEForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------- load errors


@pytest.fixture
def saved(tmp_path):
    _model().save_pretrained(tmp_path)
    return tmp_path


def test_missing_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.pop("backbone.layers.0.mixer.D"))
    with pytest.raises(ValueError, match=re.escape("backbone.layers.0.mixer.D")):
        HybridMoEForCausalLM.from_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.update({"backbone.layers.1.mixer.rotary.inv_freq": torch.ones(4)}))
    with pytest.raises(ValueError, match=re.escape("backbone.layers.1.mixer.rotary.inv_freq")):
        HybridMoEForCausalLM.from_pretrained(saved)


def test_misshaped_tensor_names_key_and_both_shapes(saved):
    key = "backbone.layers.0.mixer.in_proj.weight"  # (2*32 + 2*2*8 + 4, 32) = (100, 32)
    _rewrite(saved, lambda t: t.update({key: torch.zeros(99, 32)}))
    with pytest.raises(ValueError) as err:
        HybridMoEForCausalLM.from_pretrained(saved)
    msg = str(err.value)
    assert key in msg and "(99, 32)" in msg and "(100, 32)" in msg, msg


def test_misshaped_expert_names_key_and_both_shapes(saved):
    key = "backbone.layers.4.mixer.experts.2.down_proj.weight"
    _rewrite(saved, lambda t: t.update({key: torch.zeros(16, 15)}))
    with pytest.raises(ValueError) as err:
        HybridMoEForCausalLM.from_pretrained(saved)
    msg = str(err.value)
    assert key in msg and "(16, 15)" in msg and "(16, 16)" in msg, msg


def test_missing_expert_is_named(saved):
    _rewrite(saved, lambda t: t.pop("backbone.layers.2.mixer.experts.1.up_proj.weight"))
    with pytest.raises(ValueError) as err:
        HybridMoEForCausalLM.from_pretrained(saved)
    msg = str(err.value)
    assert "backbone.layers.2.mixer.experts.up_proj" in msg and "[1]" in msg, msg


def test_expert_beyond_n_routed_experts_is_named(saved):
    key = "backbone.layers.2.mixer.experts.4.up_proj.weight"
    _rewrite(saved, lambda t: t.update({key: torch.zeros(16, 16)}))
    with pytest.raises(ValueError, match=re.escape(key)):
        HybridMoEForCausalLM.from_pretrained(saved)


def test_num_hidden_layers_disagreeing_with_pattern(saved):
    config = json.loads((saved / "config.json").read_text())
    config["num_hidden_layers"] = 7
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        HybridMoEForCausalLM.from_pretrained(saved)


def test_mtp_weights_without_mtp_config_are_unexpected(tmp_path):
    _model(num_nextn_predict_layers=1).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mtp\.layers\."):
        HybridMoEForCausalLM.from_pretrained(tmp_path)


def test_directory_without_weights_or_config(tmp_path):
    _config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model.safetensors"):
        HybridMoEForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        HybridMoEForCausalLM.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        HybridMoEForCausalLM.from_pretrained(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- config reading

# A config.json as transformers 5.x writes it (see NemotronHConfig), minimal otherwise.
HF_STYLE = dict(
    model_type="nemotron_h",
    vocab_size=128,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=64,
    mamba_num_heads=4,
    mamba_head_dim=8,
    ssm_state_size=8,
    n_groups=2,
    n_routed_experts=4,
    moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=32,
)


@pytest.mark.parametrize(
    "layers",
    [
        {"hybrid_override_pattern": "M*E-ME"},
        {"layers_block_type": ["linear_attention", "full_attention", "moe", "mlp", "linear_attention", "moe"]},
        {"layers_block_type": ["mamba", "attention", "moe", "mlp", "mamba", "moe"]},
        {"layer_types": ["linear_attention", "full_attention", "moe", "mlp", "mamba", "moe"]},
        {"layers_block_type": ["mamba", "attention", "moe", "mlp", "mamba", "moe"], "num_hidden_layers": 6},
    ],
    ids=["pattern", "new_names", "old_names", "layer_types", "with_num_hidden_layers"],
)
def test_layer_pattern_spellings(layers):
    cfg = HybridMoEConfig.from_hf_dict(HF_STYLE | layers)
    assert cfg.hybrid_override_pattern == "M*E-ME"
    assert cfg.num_hidden_layers == 6
    assert cfg.layers_block_type == ["linear_attention", "full_attention", "moe", "mlp", "linear_attention", "moe"]
    assert cfg.extra == {}
    # transformers reads the same dict to the same layers
    hf = transformers.NemotronHConfig(**{k: v for k, v in (HF_STYLE | layers).items() if k != "model_type"})
    assert hf.hybrid_override_pattern == "M*E-ME"


def test_unknown_layer_type_name_is_an_error():
    with pytest.raises(ValueError, match="layers_block_type") as err:
        HybridMoEConfig.from_hf_dict(HF_STYLE | {"layers_block_type": ["mamba", "sliding_attention"]})
    assert "sliding_attention" in str(err.value)


def test_wrong_model_type_is_an_error():
    with pytest.raises(ValueError, match="model_type"):
        HybridMoEConfig.from_hf_dict(HF_STYLE | {"model_type": "llama"})


def test_legacy_aliases_match_transformers():
    legacy = {
        "mamba_n_groups": 4,
        "mamba_d_conv": 3,
        "mamba_expand": 3,
        "mamba_dt_min": 0.002,
        "mamba_dt_max": 0.05,
        "mamba_dt_limit": [0.0, 1.5],
        "mamba_dt_init_floor": 3e-4,
        "mamba_conv_bias": False,
        "mamba_chunk_size": 16,
    }
    d = HF_STYLE | {"hybrid_override_pattern": "M*E", "num_local_experts": 8} | legacy
    d.pop("n_groups")
    d.pop("n_routed_experts")
    cfg = HybridMoEConfig.from_hf_dict(d)
    assert (cfg.n_groups, cfg.conv_kernel, cfg.expand, cfg.chunk_size, cfg.use_conv_bias) == (4, 3, 3, 16, False)
    assert (cfg.time_step_min, cfg.time_step_max, cfg.time_step_floor) == (0.002, 0.05, 3e-4)
    assert cfg.time_step_limit == (0.0, 1.5)
    assert cfg.n_routed_experts == 8
    assert cfg.extra == {}
    assert not set(legacy) & set(cfg.to_hf_dict()), "legacy names are read, never written"
    hf = transformers.NemotronHConfig(**{k: v for k, v in d.items() if k != "model_type"})
    assert (hf.n_groups, hf.conv_kernel, hf.expand, hf.chunk_size, hf.use_conv_bias) == (4, 3, 3, 16, False)
    assert (hf.time_step_min, hf.time_step_max, hf.time_step_floor, hf.n_routed_experts) == (0.002, 0.05, 3e-4, 8)
    # the current name wins over the legacy alias when both are given
    assert HybridMoEConfig.from_hf_dict(HF_STYLE | {"chunk_size": 32, "mamba_chunk_size": 16}).chunk_size == 32


@pytest.mark.parametrize(
    "text",
    [
        '[0.0, {"__float__": "Infinity"}]',  # transformers' own spelling
        "[0.0, Infinity]",  # python's json
        '[0.0, "inf"]',
    ],
)
def test_time_step_limit_spellings_of_infinity(tmp_path, text):
    body = json.dumps(HF_STYLE | {"hybrid_override_pattern": "ME*"})[:-1] + f', "time_step_limit": {text}}}'
    (tmp_path / "config.json").write_text(body)
    cfg = HybridMoEConfig.from_pretrained(tmp_path)
    assert cfg.time_step_limit == (0.0, math.inf)
    assert isinstance(cfg.time_step_limit, tuple)
    # written back in a form both readers accept, and still infinite
    cfg.save_pretrained(tmp_path / "out")
    assert HybridMoEConfig.from_pretrained(tmp_path / "out").time_step_limit == (0.0, math.inf)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").time_step_limit[1] == math.inf


@pytest.mark.parametrize(
    "mtp",
    [
        {"mtp_hybrid_override_pattern": "*E-"},
        {"mtp_layers_block_type": ["full_attention", "moe", "mlp"]},
        {"mtp_layers_block_type": ["attention", "moe", "mlp"]},
    ],
    ids=["pattern", "new_names", "old_names"],
)
def test_mtp_fields(mtp):
    cfg = HybridMoEConfig.from_hf_dict(
        HF_STYLE | {"hybrid_override_pattern": "M*E", "num_nextn_predict_layers": 1} | mtp
    )
    assert cfg.mtp_hybrid_override_pattern == "*E-"
    assert cfg.num_mtp_blocks == 3 and cfg.mtp_num_depths == 1
    model = HybridMoEForCausalLM(cfg, device="meta")
    assert [b.symbol for b in model.mtp.layers] == ["*", "E", "-"]
    assert hasattr(model.mtp.layers[0], "eh_proj") and hasattr(model.mtp.layers[2], "final_layernorm")
    hf = transformers.NemotronHConfig(**{k: v for k, v in (HF_STYLE | mtp).items() if k != "model_type"})
    assert hf.mtp_hybrid_override_pattern == "*E-"


def test_unknown_keys_are_kept_and_written_back(tmp_path):
    d = HF_STYLE | {
        "hybrid_override_pattern": "ME",
        "my_rope_experiment": {"theta": 10000, "scale": [1, 2]},
        "quantization_config": {"quant_method": "fp8"},
        # runtime keys: accepted, not kept
        "use_cache": False,
        "architectures": ["NemotronHForCausalLM"],
        "transformers_version": "5.3.0",
        "torch_dtype": "bfloat16",
        "residual_in_fp32": True,
    }
    cfg = HybridMoEConfig.from_hf_dict(d)
    assert cfg.extra == {
        "my_rope_experiment": {"theta": 10000, "scale": [1, 2]},
        "quantization_config": {"quant_method": "fp8"},
    }
    out = cfg.to_hf_dict()
    assert out["my_rope_experiment"] == {"theta": 10000, "scale": [1, 2]}
    assert out["quantization_config"] == {"quant_method": "fp8"}
    cfg.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["my_rope_experiment"] == {"theta": 10000, "scale": [1, 2]}
    assert HybridMoEConfig.from_pretrained(tmp_path) == cfg


@pytest.mark.parametrize(
    "cfg",
    [
        HybridMoEConfig.from_preset("debug"),
        HybridMoEConfig.from_preset("nano-30b-a3b"),
        HybridMoEConfig.from_preset("ultra-550b-a55b"),
        HybridMoEConfig(**BASE, eos_token_id=[2, 11], time_step_limit=(0.0, 4.0), extra={"custom": [1, "x"]}),
    ],
    ids=["debug", "nano", "ultra", "custom"],
)
def test_round_trip_through_hf_dict_and_json(cfg):
    assert HybridMoEConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    assert HybridMoEConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


def test_config_written_by_transformers_reads_to_the_same_model_shape(tmp_path):
    hf_config = transformers.NemotronHConfig(
        **{k: v for k, v in HF_STYLE.items() if k != "model_type"},
        layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "linear_attention", "moe"],
        moe_latent_size=16,
        n_group=2,
        topk_group=1,
        num_nextn_predict_layers=1,
        mtp_layers_block_type=["attention", "moe"],
    )
    hf_config.save_pretrained(tmp_path)
    cfg = HybridMoEConfig.from_pretrained(tmp_path)
    assert cfg.hybrid_override_pattern == "ME*-ME"
    assert (cfg.num_nextn_predict_layers, cfg.mtp_hybrid_override_pattern) == (1, "*E")
    assert cfg.time_step_limit == (0.0, math.inf)
    assert cfg.extra == {}
    assert _our_shapes(cfg) == _transformers_shapes(hf_config)
    # and the other way: transformers reads our config.json to its model of the same shape
    cfg.save_pretrained(tmp_path / "ours")
    assert _our_shapes(cfg) == _transformers_shapes(transformers.AutoConfig.from_pretrained(tmp_path / "ours"))


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"hybrid_override_pattern": "M*X"}, "hybrid_override_pattern"),
        ({"hybrid_override_pattern": ""}, "hybrid_override_pattern"),
        ({"mtp_hybrid_override_pattern": "*Q"}, "mtp_hybrid_override_pattern"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"n_groups": 3}, "n_groups"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"n_routed_experts": 8, "n_group": 3}, "n_group"),
        ({"n_routed_experts": 8, "n_group": 2, "topk_group": 3}, "topk_group"),
        ({"moe_latent_size": 32}, "moe_latent_size"),
        ({"moe_latent_size": 48}, "moe_latent_size"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"vocab_size": -5}, "vocab_size"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
        ({"ssm_state_size": 2.5}, "ssm_state_size"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError) as err:
        _config(**overrides)
    assert re.search(rf"\b{field}\b", str(err.value)), str(err.value)


def test_invalid_config_from_json_names_the_field():
    with pytest.raises(ValueError, match=r"\bnum_key_value_heads\b"):
        HybridMoEConfig.from_hf_dict(HF_STYLE | {"num_key_value_heads": 3})


def test_unknown_preset_and_override_are_named():
    with pytest.raises(ValueError, match="nano-31b"):
        HybridMoEConfig.from_preset("nano-31b")
    with pytest.raises(ValueError, match="hiden_size"):
        HybridMoEConfig.from_preset("debug", hiden_size=32)
    with pytest.raises(ValueError, match=r"\bnum_key_value_heads\b"):
        HybridMoEConfig.from_preset("debug", num_key_value_heads=3)


# ---------------------------------------------------------------------------------------------- presets

# Published parameter counts (shared/reference/architecture.md): total, with MTP, active (embedding + head once).
PUBLISHED = {
    "nano-30b-a3b": (31.58e9, None, 3.58e9),
    "super-120b-a12b": (120.67e9, 123.61e9, 12.77e9),
    "ultra-550b-a55b": (549.31e9, 560.52e9, 56.06e9),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_presets_parameter_counts(name):
    cfg = HybridMoEConfig.from_preset(name)
    counts = HybridMoEForCausalLM(cfg, device="meta").parameter_counts()
    total, with_mtp, active = PUBLISHED[name]
    assert counts["total"] == pytest.approx(total, rel=0.01)
    assert counts["active"] == pytest.approx(active, rel=0.01)
    if with_mtp is None:
        assert cfg.num_nextn_predict_layers == 0 and counts["mtp"] == 0
        assert counts["total_with_mtp"] == counts["total"]
    else:
        assert counts["total_with_mtp"] == pytest.approx(with_mtp, rel=0.01)
        assert counts["total_with_mtp"] == counts["total"] + counts["mtp"]


@pytest.mark.parametrize("name, total", [("tiny", 10e6), ("small", 65e6)])
def test_cpu_presets_sizes(name, total):
    counts = HybridMoEForCausalLM(HybridMoEConfig.from_preset(name), device="meta").parameter_counts()
    assert counts["total"] == pytest.approx(total, rel=0.05)
    assert counts["active"] < counts["total"]


def test_debug_preset_and_overrides():
    cfg = HybridMoEConfig.from_preset("debug", chunk_size=8)
    assert cfg.chunk_size == 8
    assert set(cfg.hybrid_override_pattern) == {"M", "*", "E", "-"}
    assert cfg.num_nextn_predict_layers == 1 and cfg.moe_latent_size is not None
    assert HybridMoEConfig.from_preset("debug") == HybridMoEConfig.from_preset("debug")
    counts = HybridMoEForCausalLM(cfg, device="meta").parameter_counts()
    assert counts["mtp"] > 0 and counts["active"] < counts["total"] < counts["total_with_mtp"]


def test_cli_params_json(capsys):
    assert cli_main(["params", "--preset", "ultra-550b-a55b", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) == {"total", "active"}
    assert result["total"] == pytest.approx(549.31e9, rel=0.01)
    assert result["active"] == pytest.approx(56.06e9, rel=0.01)


def test_cli_params_reports_a_bad_override(capsys):
    assert cli_main(["params", "--preset", "tiny", "--json", "hiden_size=3"]) == 2
    assert "hiden_size" in capsys.readouterr().err
