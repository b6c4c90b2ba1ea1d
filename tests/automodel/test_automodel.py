"""`hybridmoe.automodel.AutoModelForCausalLM` against plain transformers, one tiny random config per MoE family.

Per family: a plain transformers model is built from a config written here, its constant-initialized tensors (norm
weights, biases, Mamba's D / A_log / dt_bias, routers' correction biases) are randomized, and it is saved; the same
directory is loaded through our import. In fp32: logits agree to 1e-4 and losses to 1e-6 (eval mode), and in train
mode the gradients of every parameter agree to 1e-4 of that parameter's largest gradient. The patched model's
`save_pretrained` is loaded back by plain transformers with identical tensors. A non-MoE model loads unchanged
and the log says nothing was accelerated; bad inputs fail with clear errors.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import transformers

from hybridmoe.automodel import AutoModelForCausalLM, patch_model
from hybridmoe.automodel.patch import PATCHED_ATTR

LOGITS_ATOL = 1e-4
LOSS_ATOL = 1e-6
GRAD_RTOL = 1e-4
SEQ = (2, 19)

transformers.logging.set_verbosity_error()

_ATTN = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)


LOSS = "LM head + loss (fused in training)"


def _qwen3_moe():
    # layer 1 is a dense MLP (mlp_only_layers): the detection must leave it alone.
    cfg = transformers.Qwen3MoeConfig(
        **_ATTN, head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
    )  # fmt: skip
    return cfg, {("qwen3_moe", "experts modules"): 1, ("qwen3_moe", LOSS): 1}


def _qwen2_moe():
    cfg = transformers.Qwen2MoeConfig(
        **_ATTN, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_hidden_layers=2, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False,
    )  # fmt: skip
    return cfg, {("qwen2_moe", "experts modules"): 2, ("qwen2_moe", LOSS): 1}


def _mixtral():
    cfg = transformers.MixtralConfig(
        **_ATTN, head_dim=8, intermediate_size=16, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2
    )
    return cfg, {("mixtral", "experts modules"): 2, ("mixtral", LOSS): 1}


def _olmoe():
    cfg = transformers.OlmoeConfig(
        **_ATTN, intermediate_size=16, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, clip_qkv=4.0
    )
    return cfg, {("olmoe", "experts modules"): 2, ("olmoe", LOSS): 1}


def _deepseek_v3():
    # MLA (as many KV heads as heads); layer 0 dense (first_k_dense_replace), then sigmoid routing over 2 groups
    # of 4 experts keeping 1, plus a shared expert.
    cfg = transformers.DeepseekV3Config(
        **_ATTN | dict(num_key_value_heads=4), intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
        topk_group=1, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=8,
    )  # fmt: skip
    return cfg, {("deepseek_v3", "experts modules"): 1, ("deepseek_v3", LOSS): 1}


def _gpt_oss():
    # swiglu_limit 1.5 (7 in the released models) so the clamps bite on these small activations.
    cfg = transformers.GptOssConfig(
        **_ATTN, head_dim=8, intermediate_size=16, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=8, swiglu_limit=1.5,
    )  # fmt: skip
    return cfg, {("gpt_oss", "experts modules"): 2, ("gpt_oss", LOSS): 1}


def _nemotron_h():
    # Mamba, LatentMoE (latent 16 of hidden 32), attention, Mamba, MoE; sequence 19 over chunks of 8.
    cfg = transformers.NemotronHConfig(
        **_ATTN, head_dim=8, layers_block_type=["linear_attention", "moe", "full_attention", "linear_attention", "moe"],
        intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=8,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=24,
        moe_latent_size=16, n_group=2, topk_group=1, num_nextn_predict_layers=0, eos_token_id=None,
    )  # fmt: skip
    return cfg, {("nemotron_h", "experts modules"): 2, ("nemotron_h", LOSS): 1, ("nemotron_h", "Mamba-2 mixers"): 2}


def _glm4_moe():
    # not in the adapter table: accelerated through transformers' standard experts flags (the generic adapter).
    cfg = transformers.Glm4MoeConfig(
        **_ATTN, head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        first_k_dense_replace=0, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
        topk_group=1, use_qk_norm=True,
    )  # fmt: skip
    return cfg, {("glm4_moe (standard v5 experts)", "experts modules"): 2, ("glm4_moe", LOSS): 1}


FAMILIES = {
    "qwen3_moe": _qwen3_moe,
    "qwen2_moe": _qwen2_moe,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
    "gpt_oss": _gpt_oss,
    "nemotron_h": _nemotron_h,
    "glm4_moe": _glm4_moe,
}


def _randomize_constant_tensors_(model: torch.nn.Module, seed: int = 1) -> None:
    """Norm weights around 1, biases and correction biases small, and Mamba's A_log / dt_bias / D in their usual
    ranges, so that a mis-handled norm or bias cannot hide behind a value of 1 or 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if p is None or not p.is_floating_point():
                    continue
                if "Norm" in type(module).__name__ and name == "weight":
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                elif name.endswith("bias") and name != "dt_bias":
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
                elif name == "D":
                    p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
                elif name == "A_log":
                    p.copy_(torch.log(torch.empty(p.shape).uniform_(1.0, 16.0, generator=g)))
                elif name == "dt_bias":  # softplus^-1 of dt log-uniform in [1e-3, 1e-1]
                    dt = torch.exp(torch.empty(p.shape).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
                    p.copy_(dt + torch.log(-torch.expm1(-dt)))
                elif name == "sinks":
                    p.copy_(torch.randn(p.shape, generator=g))


def _plain_checkpoint(family: str, path):
    cfg, expected = FAMILIES[family]()
    torch.manual_seed(0)
    plain = transformers.AutoModelForCausalLM.from_config(cfg)
    _randomize_constant_tensors_(plain)
    plain.save_pretrained(path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # as loaded from disk
    return plain, expected


def _inputs(vocab_size: int, seed: int = 1234):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, SEQ, generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def _state_dict_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].shape == sb[key].shape and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers(family, tmp_path, caplog):
    plain, expected = _plain_checkpoint(family, tmp_path / "plain")
    with caplog.at_level(logging.INFO, logger="hybridmoe.automodel"):
        fast = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    assert type(fast) is type(plain)
    report = patch_model(fast)  # a second call is idempotent and reports what is patched
    assert dict(report.replaced) == expected and not report.skipped, report.summary()
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("hybridmoe.automodel")]
    assert any("replaced the forward of" in m and family in m for m in messages), messages
    _state_dict_equal(fast, plain)

    ids, labels = _inputs(plain.config.vocab_size)
    plain.eval(), fast.eval()
    with torch.no_grad():
        ref = plain(input_ids=ids, labels=labels)
        out = fast(input_ids=ids, labels=labels)
    assert ref.logits.std() > 0.1, "degenerate reference logits: the comparison would prove little"
    diff = (out.logits - ref.logits).abs().max().item()
    print(f"{family}: logits max abs diff {diff:.2e}")
    assert diff <= LOGITS_ATOL, f"{family}: logits differ from transformers by {diff:.3g}"
    assert abs(out.loss.item() - ref.loss.item()) <= LOSS_ATOL, (out.loss.item(), ref.loss.item())

    plain.train(), fast.train()
    ref_loss = plain(input_ids=ids, labels=labels).loss
    out_loss = fast(input_ids=ids, labels=labels).loss
    assert abs(out_loss.item() - ref_loss.item()) <= LOSS_ATOL, (out_loss.item(), ref_loss.item())
    ref_loss.backward()
    out_loss.backward()
    fast_params = dict(fast.named_parameters())
    worst = 0.0
    for name, p in plain.named_parameters():
        q = fast_params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is None:
            continue
        scale = p.grad.abs().max().item()
        err = (q.grad - p.grad).abs().max().item()
        worst = max(worst, err / max(scale, 1e-12))
        assert err <= GRAD_RTOL * scale + 1e-10, f"{family}: grad {name}: {err:.3g} > {GRAD_RTOL} * {scale:.3g}"
    print(f"{family}: worst relative gradient diff {worst:.2e}")

    fast.save_pretrained(tmp_path / "fast")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fast", dtype=torch.float32)
    assert not any(hasattr(m, PATCHED_ATTR) for m in reloaded.modules())
    _state_dict_equal(reloaded, fast)


def test_fused_lm_loss_matches_transformers_loss_variants(tmp_path):
    """The training loss without logits equals transformers' in each of its variants: the router aux loss
    (output_router_logits), a sum over num_items_in_batch (gradient accumulation), shift_labels given, another
    ignore_index; eval mode and label-free calls keep transformers' logits."""
    plain, _ = _plain_checkpoint("qwen3_moe", tmp_path / "plain")
    fast = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    ids, labels = _inputs(plain.config.vocab_size)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    odd = torch.where(labels == -100, -1, labels)
    variants = {
        "aux loss": dict(labels=labels, output_router_logits=True),
        "num_items_in_batch": dict(labels=labels, num_items_in_batch=torch.tensor(50)),
        "shift_labels": dict(labels=labels, shift_labels=shifted),
        "ignore_index -1": dict(labels=odd, ignore_index=-1),
    }
    plain.train(), fast.train()
    for name, kw in variants.items():
        ref, out = plain(input_ids=ids, **kw), fast(input_ids=ids, **kw)
        assert out.logits is None and ref.logits is not None, name
        assert abs(out.loss.item() - ref.loss.item()) <= LOSS_ATOL, (name, out.loss.item(), ref.loss.item())
        if name == "aux loss":
            assert out.aux_loss is not None and torch.allclose(out.aux_loss, ref.aux_loss), name
        g_ref = torch.autograd.grad(ref.loss, plain.lm_head.weight)[0]
        g_out = torch.autograd.grad(out.loss, fast.lm_head.weight)[0]
        assert (g_out - g_ref).abs().max() <= GRAD_RTOL * g_ref.abs().max(), name
    assert fast(input_ids=ids).logits is not None  # no labels: logits as usual
    fast.eval()
    with torch.no_grad():
        out = fast(input_ids=ids, labels=labels)
    assert (
        out.logits is not None
        and abs(out.loss.item() - plain.eval()(input_ids=ids, labels=labels).loss.item()) <= LOSS_ATOL
    )


def test_fused_lm_loss_takes_per_token_weights(tmp_path):
    """`loss_weights` (aligned with the labels, as the SFT stage's per-conversation normalization gives them): the
    sum of each labelled token's loss times its weight, fused in training and from the logits in eval mode, against
    the weighted cross-entropy of transformers' own logits; the weights' shape and alignment are checked."""
    plain, _ = _plain_checkpoint("qwen3_moe", tmp_path / "plain")
    fast = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    ids, labels = _inputs(plain.config.vocab_size)
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(0))
    weights[1, 4:9] = 0.0  # rows with a label but no weight
    plain.train(), fast.train()
    logits = plain(input_ids=ids).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="none")
    ref = (ce * weights[:, 1:].flatten()).sum()
    out = fast(input_ids=ids, labels=labels, loss_weights=weights)
    assert out.logits is None and abs(out.loss.item() - ref.item()) <= LOSS_ATOL * max(1.0, ref.item())
    g_ref = torch.autograd.grad(ref, plain.lm_head.weight)[0]
    g_out = torch.autograd.grad(out.loss, fast.lm_head.weight)[0]
    assert (g_out - g_ref).abs().max() <= GRAD_RTOL * g_ref.abs().max()
    fast.eval()
    with torch.no_grad():
        out = fast(input_ids=ids, labels=labels, loss_weights=weights)
    assert out.logits is not None and abs(out.loss.item() - ref.item()) <= LOSS_ATOL * max(1.0, ref.item())
    with pytest.raises(ValueError, match="give one per label"):
        fast(input_ids=ids, labels=labels, loss_weights=weights[:, 1:])
    with pytest.raises(ValueError, match="pass labels"):
        fast(input_ids=ids, loss_weights=weights)


def test_from_config_patches_the_new_model():
    cfg, expected = _mixtral()
    model = AutoModelForCausalLM.from_config(cfg)
    patched = [m for m in model.modules() if hasattr(m, PATCHED_ATTR)]
    assert len(patched) == expected[("mixtral", "experts modules")]
    assert all(getattr(m, PATCHED_ATTR) == ("mixtral", "silu_gated") for m in patched)


def test_model_without_moe_loads_unchanged(tmp_path, caplog):
    cfg = transformers.LlamaConfig(**_ATTN, intermediate_size=48, num_hidden_layers=2)
    torch.manual_seed(0)
    plain = transformers.AutoModelForCausalLM.from_config(cfg)
    plain.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="hybridmoe.automodel"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(model) is type(plain)
    assert not any(hasattr(m, PATCHED_ATTR) for m in model.modules())
    assert not any("forward" in vars(m) for m in model.modules()), "a forward was replaced"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("nothing accelerated" in m and "LlamaForCausalLM" in m for m in warnings), warnings
    _state_dict_equal(model, plain)
    ids, _ = _inputs(cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)


def test_output_loading_info_is_passed_through(tmp_path):
    _plain_checkpoint("olmoe", tmp_path)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sum(hasattr(m, PATCHED_ATTR) for m in model.modules()) == 2


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model directory at"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))
    with pytest.raises(TypeError, match="model directory or a Hub id"):
        AutoModelForCausalLM.from_pretrained(42)
    with pytest.raises(TypeError, match="PretrainedConfig"):
        AutoModelForCausalLM.from_config({"model_type": "mixtral"})
    with pytest.raises(TypeError, match="from_pretrained"):
        AutoModelForCausalLM()


def test_mamba_mixer_keeps_packed_documents_apart():
    """With `seq_idx`, one forward over two packed documents equals two forwards over each document alone."""
    cfg, _ = _nemotron_h()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    _randomize_constant_tensors_(model)
    mixer = model.model.layers[0].mixer
    assert getattr(mixer, PATCHED_ATTR) == ("nemotron_h", "mamba2")
    x = torch.randn(1, 19, cfg.hidden_size)
    seq_idx = torch.tensor([[0] * 11 + [1] * 8], dtype=torch.int32)
    with torch.no_grad():
        packed = mixer(x, seq_idx=seq_idx)
        alone = torch.cat([mixer(x[:, :11]), mixer(x[:, 11:])], dim=1)
    diff = (packed - alone).abs().max().item()
    assert diff <= 1e-5, f"packed documents leak into each other: {diff:.3g}"


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "nemotron_h"])
def test_greedy_generation_matches_transformers(family, tmp_path):
    """Cached decoding: the experts run on our kernels one token at a time; nemotron_h's Mamba mixers fall back to
    transformers' forward whenever a cache is passed."""
    plain, _ = _plain_checkpoint(family, tmp_path)
    fast = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids, _ = _inputs(plain.config.vocab_size, seed=7)
    kwargs = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    with torch.no_grad():
        want = plain.eval().generate(ids, **kwargs)
        got = fast.eval().generate(ids, **kwargs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["qwen3_moe", "nemotron_h"])
def test_bf16_training_step_matches_transformers(family, tmp_path):
    """bf16, as fine-tuning runs: on a CPU without bf16 matmul units every linear layer multiplies widened operands
    (exact products, fp32 accumulation, like a bf16 GEMM); loss and gradients agree with transformers' bf16 within
    bf16 rounding. Not to 0.99 in cosine: on these tiny random models bf16 rounding flips the top-k choice of a token
    or two (transformers' own bf16 flips one of 38 in nemotron_h's last MoE layer against fp32, ours two), which moves
    that layer's expert gradients to a cosine of about 0.96-0.98 on both sides; a wrong kernel gives far less."""
    from hybridmoe.kernels.linear import Linear, widen_bf16_on_cpu

    _plain_checkpoint(family, tmp_path / "plain")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.bfloat16)
    fast = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.bfloat16)
    linears = [m for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    assert all((type(m) is Linear) == widen_bf16_on_cpu() for m in linears)
    ids, labels = _inputs(plain.config.vocab_size)
    plain.train(), fast.train()
    ref, out = plain(input_ids=ids, labels=labels).loss, fast(input_ids=ids, labels=labels).loss
    assert abs(out.item() - ref.item()) <= 2e-2 * abs(ref.item())
    ref.backward(), out.backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        cos = torch.nn.functional.cosine_similarity(p.grad.float().flatten(), q.grad.float().flatten(), dim=0)
        assert cos > 0.95, (name, cos.item())
