"""LoRA on hybridmoe's Hugging Face MoE models (`hybridmoe.automodel.lora`), against its definitions and against PEFT.

Kernel: the grouped expert LoRA inside `experts_grouped` equals the loop-over-experts `experts_reference` (outputs and
gradients, fp32, 1e-5), for each expert activation, up / down / both adapted, base weights frozen or not. Models
(tiny random configs of test_automodel, fp32): with B = 0 the adapted model is the base model exactly; a few SGD steps
change only the adapters and lower the loss; PEFT loads the saved adapters into the plain transformers model and
gives the same logits and adapter gradients; adapters PEFT saves load here; `load_lora` reproduces the model exactly;
merging keeps the logits and saves a checkpoint plain transformers loads. Bad arguments fail with clear errors.
"""

from __future__ import annotations

import functools
import json
import logging

import pytest
import torch
import transformers
from test_automodel import _inputs, _plain_checkpoint

from hybridmoe.automodel import (
    AutoModelForCausalLM,
    apply_lora,
    find_moe_experts,
    load_lora,
    lora_spec,
    merge_lora,
    save_lora,
)
from hybridmoe.automodel.lora import CONFIG_NAME, _peft_entries
from hybridmoe.kernels.moe import ExpertLoRA, clamped_swiglu, experts_grouped, experts_reference

FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss", "nemotron_h"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# qwen3_moe's test config has a dense MLP layer whose gate_proj / up_proj / down_proj PEFT takes for transformers v4
# expert layers (see lora._peft_renamed): the PEFT comparisons adapt its attention only.
PEFT_TARGETS = {"qwen3_moe": ATTENTION}


def _peft():
    return pytest.importorskip("peft")


def _models(family, tmp_path):
    plain, _ = _plain_checkpoint(family, tmp_path / "plain")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    return plain, ours


def _randomize_lora_(model, seed=0, std=0.2):
    """Nonzero B (and fresh A) so that the adapters change the logits markedly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(std * torch.randn(p.shape, generator=g))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------- kernel


def _scaled_diff(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


ACTIVATIONS = {
    "relu2": ("relu2", 1, False),
    "silu_gated": ("silu_gated", 2, False),
    "clamped_swiglu_biases": (clamped_swiglu(alpha=1.702, limit=0.75), 2, True),
}


@pytest.mark.parametrize("backend", ["segments", "grouped_mm"])  # grouped_mm: a GPU's loop-free path, forced here
@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("adapted", ["up", "down", "both"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_grouped_expert_lora_matches_reference(activation, adapted, frozen, backend):
    act, up_factor, with_bias = ACTIVATIONS[activation]
    t, e, k, d, i, r = 11, 6, 2, 8, 6 if backend == "segments" else 8, 3  # _grouped_mm: 16-byte aligned rows
    g = torch.Generator().manual_seed(len(activation) * 10 + len(adapted))
    rand = lambda *shape, s=1.0: s * torch.randn(*shape, generator=g)  # noqa: E731
    scores = rand(t, e)
    scores[:, 4] = -1e9  # expert 4 receives no token: its adapters get exactly zero gradient
    topk_idx = scores.topk(k, dim=-1).indices
    tensors = {
        "x": rand(t, d),
        "w_up": rand(e, up_factor * i, d, s=0.4),
        "w_down": rand(e, d, i, s=0.4),
        "topk_w": torch.rand(t, k, generator=g) + 0.1,
    }
    if with_bias:
        tensors |= {"b_up": rand(e, up_factor * i, s=0.1), "b_down": rand(e, d, s=0.1)}
    if adapted in ("up", "both"):
        tensors |= {"a_up": rand(e, r, d, s=0.5), "bl_up": rand(e, up_factor * i, r, s=0.5)}
    if adapted in ("down", "both"):
        tensors |= {"a_down": rand(e, r, i, s=0.5), "bl_down": rand(e, d, r, s=0.5)}
    trainable = [n for n in tensors if not (frozen and n in ("w_up", "w_down"))]

    def run(fn):
        v = {n: x.clone().requires_grad_(n in trainable) for n, x in tensors.items()}
        lora = ExpertLoRA(
            up=(v["a_up"], v["bl_up"]) if "a_up" in v else None,
            down=(v["a_down"], v["bl_down"]) if "a_down" in v else None,
            scaling=1.5,
        )
        out = fn(
            v["x"], v["w_up"], v["w_down"], topk_idx, v["topk_w"], activation=act, b_up_EU=v.get("b_up"),
            b_down_ED=v.get("b_down"), lora=lora,
        )  # fmt: skip
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        return out, {n: v[n].grad for n in trainable}, {n: v[n].grad for n in v if n not in trainable}

    ref, ref_grads, _ = run(experts_reference)
    out, grads, frozen_grads = run(functools.partial(experts_grouped, backend=backend))
    assert _scaled_diff(out, ref) <= 1e-5
    for name in trainable:
        assert _scaled_diff(grads[name], ref_grads[name]) <= 1e-5, name
    assert all(grad is None for grad in frozen_grads.values())
    for name in ("a_up", "bl_up", "a_down", "bl_down"):
        if name in grads:
            assert grads[name][4].abs().max() == 0, name


def test_expert_lora_bf16_weights_fp32_adapters():
    """bf16 tokens and weights with fp32 adapters (as apply_lora makes them): gradients come back in fp32."""
    t, e, k, d, i, r = 9, 4, 2, 8, 6, 2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(t, d, generator=g)
    w_up, w_down = 0.4 * torch.randn(e, 2 * i, d, generator=g), 0.4 * torch.randn(e, d, i, generator=g)
    topk_idx, topk_w = torch.randn(t, e, generator=g).topk(k, -1).indices, torch.rand(t, k, generator=g)
    a, b = 0.5 * torch.randn(e, r, d, generator=g), 0.5 * torch.randn(e, 2 * i, r, generator=g)
    a16, b16 = a.clone().requires_grad_(), b.clone().requires_grad_()
    lora16 = ExpertLoRA(up=(a16, b16), scaling=2.0)
    out = experts_grouped(
        x.bfloat16(), w_up.bfloat16(), w_down.bfloat16(), topk_idx, topk_w, activation="silu_gated", lora=lora16
    )
    a32, b32 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ref = experts_reference(
        x, w_up, w_down, topk_idx, topk_w, "silu_gated", lora=ExpertLoRA(up=(a32, b32), scaling=2.0)
    )
    assert out.dtype == torch.bfloat16 and _scaled_diff(out.float(), ref) <= 2e-2
    out.float().sum().backward()
    ref.sum().backward()
    assert a16.grad.dtype == torch.float32 and _scaled_diff(a16.grad, a32.grad) <= 3e-2
    assert _scaled_diff(b16.grad, b32.grad) <= 3e-2


# ---------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_B_is_the_base_model_and_training_moves_only_adapters(family, tmp_path):
    _, model = _models(family, tmp_path)
    ids, labels = _inputs(model.config.vocab_size)
    base = _logits(model, ids)
    apply_lora(model, r=4, alpha=8)
    spec = lora_spec(model)
    assert spec.linear and len(spec.experts) == 2 * len(find_moe_experts(model))  # (gate_)up and down each
    assert torch.equal(_logits(model, ids), base)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"{family}: losses {[round(x, 4) for x in losses]}")
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable), name


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_our_adapters(family, tmp_path):
    peft = _peft()
    plain, ours = _models(family, tmp_path)
    apply_lora(ours, r=4, alpha=8, target_modules=PEFT_TARGETS.get(family, "all-linear"))
    _randomize_lora_(ours)
    save_lora(ours, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / CONFIG_NAME).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_parameters"]

    ids, labels = _inputs(ours.config.vocab_size)
    base = _logits(plain, ids)
    theirs = peft.PeftModel.from_pretrained(plain, tmp_path / "lora", is_trainable=True)  # wraps `plain` in place
    entries = _peft_entries(ours)
    state = peft.get_peft_model_state_dict(theirs)
    assert state.keys() == entries.keys()  # PEFT adapted exactly what we adapted
    want, got = _logits(theirs, ids), _logits(ours, ids)
    assert (want - base).abs().max() > 0.1, "the adapters should change the logits"
    diff = (got - want).abs().max().item()
    print(f"{family}: logits vs PEFT max abs diff {diff:.2e}")
    assert diff <= 1e-4

    theirs.train(), ours.train()
    theirs(input_ids=ids, labels=labels).loss.backward()
    ours(input_ids=ids, labels=labels).loss.backward()
    params = dict(theirs.named_parameters())
    worst = 0.0
    for key, entry in entries.items():
        theirs_grad = entry.from_file(params[key.replace(".weight", ".default.weight")].grad)
        err = _scaled_diff(entry.param.grad, theirs_grad)
        worst = max(worst, err)
        assert err <= 1e-4, key
    print(f"{family}: adapter gradients vs PEFT worst relative diff {worst:.2e}")

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    load_lora(again, tmp_path / "lora")
    assert lora_spec(again) == lora_spec(ours)
    assert torch.equal(_logits(again, ids), _logits(ours, ids))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "nemotron_h"])
def test_we_load_adapters_peft_saved(family, tmp_path):
    peft = _peft()
    plain, ours = _models(family, tmp_path)
    up = "up_proj" if family == "nemotron_h" else "gate_up_proj"
    config = peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=["q_proj", "o_proj"], target_parameters=[f"experts.{up}", "experts.down_proj"]
    )
    theirs = peft.get_peft_model(plain, config)
    _randomize_lora_(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "peft")
    load_lora(ours, tmp_path / "peft")
    assert lora_spec(ours).r == 3 and lora_spec(ours).alpha == 5
    ids, _ = _inputs(ours.config.vocab_size)
    diff = (_logits(ours, ids) - _logits(theirs, ids)).abs().max().item()
    print(f"{family}: PEFT-made adapters, logits max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_subset_of_expert_weights_round_trips_through_peft(tmp_path):
    """Only down_proj adapted: PEFT wraps it alone (no nested base_layer)."""
    peft = _peft()
    plain, ours = _models("mixtral", tmp_path)
    apply_lora(ours, r=2, alpha=4, target_modules=["q_proj", "v_proj"], experts=["experts.down_proj"])
    assert lora_spec(ours).experts == ("model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj")
    _randomize_lora_(ours)
    save_lora(ours, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / CONFIG_NAME).read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["target_parameters"] == ["down_proj"]
    theirs = peft.PeftModel.from_pretrained(plain, tmp_path / "lora")
    ids, _ = _inputs(ours.config.vocab_size)
    assert (_logits(ours, ids) - _logits(theirs, ids)).abs().max() <= 1e-4


def test_save_warns_where_peft_would_rename_dense_layers(tmp_path, caplog):
    _peft()  # the warning reads the installed peft's tables
    _, ours = _models("qwen3_moe", tmp_path)
    apply_lora(ours, r=2, alpha=2)  # all-linear: includes layer 1's dense gate_proj / up_proj / down_proj
    with caplog.at_level(logging.WARNING, logger="hybridmoe.automodel"):
        save_lora(ours, tmp_path / "lora")
    assert any("peft will not load the adapters of 3 linear layers" in r.getMessage() for r in caplog.records)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    load_lora(again, tmp_path / "lora")  # ours reads them all
    assert lora_spec(again) == lora_spec(ours)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge(family, tmp_path):
    _, ours = _models(family, tmp_path)
    apply_lora(ours, r=4, alpha=8)
    _randomize_lora_(ours)
    ids, _ = _inputs(ours.config.vocab_size)
    adapted = _logits(ours, ids)
    merge_lora(ours)
    assert not any("lora_" in n for n, _ in ours.named_parameters())
    assert not any("forward" in vars(m) for m in ours.modules() if isinstance(m, torch.nn.Linear))
    merged = _logits(ours, ids)
    diff = (merged - adapted).abs().max().item()
    print(f"{family}: merged vs adapted logits max abs diff {diff:.2e}")
    assert diff <= 1e-5

    ours.save_pretrained(tmp_path / "merged")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    state, plain_state = ours.state_dict(), plain.state_dict()
    assert state.keys() == plain_state.keys()
    assert all(torch.equal(state[k], plain_state[k]) for k in state)
    assert (_logits(plain, ids) - merged).abs().max() <= 1e-4


def test_bad_arguments_give_clear_errors(tmp_path):
    cfg = transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=8,
        num_hidden_layers=1, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg)
    for r in (0, -1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="rank r must be a positive integer"):
            apply_lora(model, r=r)
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        apply_lora(model, r=2, alpha=0)
    with pytest.raises(ValueError, match=r"\['nope'\] match no module .* linear layers are named"):
        apply_lora(model, target_modules=["q_proj", "nope"])
    with pytest.raises(ValueError, match="matches no module"):
        apply_lora(model, target_modules=r".*\.nope")
    with pytest.raises(ValueError, match="not nn.Linear"):
        apply_lora(model, target_modules=["experts"])
    with pytest.raises(ValueError, match="matches no expert weight"):
        apply_lora(model, experts=["experts.w3"])
    with pytest.raises(ValueError, match="nothing to adapt"):
        apply_lora(model, target_modules=None, experts=False)
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        save_lora(model, tmp_path / "x")
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        merge_lora(model)
    assert all(p.requires_grad for p in model.parameters()), "a failed apply_lora must leave the model untouched"
    apply_lora(model, r=2)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, r=2)
    with pytest.raises(FileNotFoundError, match="holds no adapter_config.json"):
        load_lora(model, tmp_path)
    save_lora(model, tmp_path / "dora")
    config_path = tmp_path / "dora" / CONFIG_NAME
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True .* is not supported"):
        load_lora(AutoModelForCausalLM.from_config(cfg), tmp_path / "dora")

    nemotron = transformers.NemotronHConfig(
        vocab_size=64, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        layers_block_type=["linear_attention", "moe"], intermediate_size=16, mamba_num_heads=2, mamba_head_dim=8,
        ssm_state_size=8, n_groups=1, chunk_size=8, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=8, moe_shared_expert_intermediate_size=8, n_group=1, topk_group=1,
        num_nextn_predict_layers=0, eos_token_id=None,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(nemotron)
    with pytest.raises(ValueError, match="Mamba mixer's out_proj"):
        apply_lora(model, target_modules=["in_proj", "out_proj"])
    apply_lora(model)  # all-linear leaves the Mamba out_proj alone, as PEFT requires
    assert not any(n.endswith("out_proj") for n in lora_spec(model).linear)
