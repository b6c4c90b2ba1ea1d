"""Parity with Hugging Face transformers' `NemotronHForCausalLM` (models/nemotron_h), both ways through a checkpoint.

(a) our model -> `save_pretrained` -> `transformers.AutoModelForCausalLM.from_pretrained`;
(b) a random `transformers.NemotronHForCausalLM` -> its own `save_pretrained` -> `HybridMoEForCausalLM.from_pretrained`.
Each side then sees the same token ids in fp32 and eval mode: logits agree to fp32 rounding (below), losses on the
same labels to 1e-5, and greedy generation of 32 new tokens is token-identical.

Tolerance. Both sides compute the same operations in fp32 in a different order (a chunked scan laid out per B/C
group here, per head there; fused vs unfused residual adds), so they differ by rounding, which grows with the size of
the values: the bound is relative to the logits' scale, max|diff| <= LOGITS_RTOL * max|reference logits|. Measured
against transformers 5.25.0 (torch 2.13 CPU): at most 8.7e-7 of max|logits| over every case here (1.9e-6 absolute,
logits up to 2.9), so 5e-6 leaves a 6x margin for other CPUs and BLAS builds. It is tight on purpose: the former
absolute 1e-4 (3.5e-5 of these logits) let a real difference through, the dt clamp at time_step_min that
transformers < 5.25 applies, which moved the logits by 1.6e-5 to 5.7e-5 in the transformers -> ours direction
(2.8e-4 to 6.9e-4 elsewhere); every case fails with it at 5e-6.

The time step follows state-spaces/mamba's scan kernels, as transformers' NemotronHMamba2Mixer does from 5.25.0 on
(pyproject's floor): dt = clamp(softplus(dt + dt_bias), time_step_limit), time_step_min only bounding the
initialization; `test_time_step_settings_match_transformers` checks it where the clamp bites.

The tensors both initializations leave at a constant (RMSNorm weights, D, conv and projection biases, the router's
correction bias) are randomized before saving, so a mis-mapped norm or bias cannot hide behind a value of 1 or 0.
Configurations are tiny: one pattern per concern (latent vs plain MoE, group-limited routing, several attention
layers, dense MLP layers, several Mamba layers and B/C groups, MTP layers), each with a sequence length that is
not a multiple of `chunk_size`.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM

LOGITS_RTOL = 5e-6  # of max|reference logits|: see the module docstring
LOSS_ATOL = 1e-5
NEW_TOKENS = 32

transformers.logging.set_verbosity_error()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster than two, and far faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# eos_token_id=None everywhere: transformers' `min_new_tokens` works by forbidding the eos token, which would make
# the two greedy decoders differ whenever eos happens to be the argmax; without an eos both decode freely.
_SMALL = dict(
    vocab_size=256,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=64,
    mamba_num_heads=4,
    mamba_head_dim=8,
    ssm_state_size=8,
    n_groups=2,
    chunk_size=8,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=64,
    initializer_range=0.08,
    eos_token_id=None,
)


def _latent_moe():
    # debug preset: M * E M - E, LatentMoE (latent 32 of hidden 64), two Mamba B/C groups; no MTP here.
    cfg = HybridMoEConfig.from_preset(
        "debug",
        num_nextn_predict_layers=0,
        mtp_num_depths=None,
        chunk_size=8,
        initializer_range=0.08,
        eos_token_id=None,
    )
    return cfg, 21


def _plain_moe_group_limited():
    # moe_latent_size None; 8 experts in n_group=2 groups of 4, only topk_group=1 group kept, top-3 inside it.
    cfg = HybridMoEConfig(
        **_SMALL | dict(num_experts_per_tok=3, n_group=2, topk_group=1, routed_scaling_factor=2.0),
        hybrid_override_pattern="ME*E",
        moe_latent_size=None,
    )
    return cfg, 19


def _attention_heavy():
    # three attention layers (GQA 8 query heads on 2 KV heads, head_dim*heads != hidden), dense MLP, biases on,
    # no conv bias, a 3-tap conv, unnormalized routing weights, 4 groups keeping 3.
    cfg = HybridMoEConfig(
        **_SMALL
        | dict(
            hidden_size=48,
            num_attention_heads=8,
            mamba_num_heads=8,
            n_groups=4,
            chunk_size=16,
            conv_kernel=3,
            n_group=4,
            topk_group=3,
            num_experts_per_tok=4,
        ),
        hybrid_override_pattern="*M*-E*",
        moe_latent_size=16,
        use_bias=True,
        mlp_bias=True,
        use_conv_bias=False,
        norm_topk_prob=False,
    )
    return cfg, 37


def _mamba_heavy():
    # four Mamba layers with 4 B/C groups (2 heads per group), plain MoE; seq 37 over chunks of 16. (One attention
    # layer stays: transformers' hybrid cache needs one to count the tokens it has seen.)
    cfg = HybridMoEConfig(
        **_SMALL | dict(mamba_num_heads=8, n_groups=4, ssm_state_size=16, chunk_size=16),
        hybrid_override_pattern="MM*MEM",
        moe_latent_size=None,
    )
    return cfg, 37


def _with_mtp():
    # the debug preset as is: one MTP layer ("*E", applied at two depths); transformers ignores it on load.
    cfg = HybridMoEConfig.from_preset("debug", chunk_size=8, initializer_range=0.08, eos_token_id=None)
    assert cfg.num_nextn_predict_layers == 1
    return cfg, 21


CONFIGS = {
    "latent_moe": _latent_moe,
    "plain_moe_group_limited": _plain_moe_group_limited,
    "attention_heavy_biases": _attention_heavy,
    "mamba_heavy": _mamba_heavy,
    "mtp": _with_mtp,
}
# transformers cannot write MTP weights (it drops them), so direction (b) runs on the configs without MTP.
CONFIGS_WITHOUT_MTP = [name for name in CONFIGS if name != "mtp"]


def _randomize_constant_tensors_(model: torch.nn.Module, seed: int) -> None:
    """Give every tensor that initialization sets to a constant a random value (works on both implementations:
    the names below are shared, the norm classes are recognized by name)."""
    g = torch.Generator().manual_seed(seed)

    def rand(t, scale, shift=0.0):
        t.copy_(shift + scale * torch.randn(t.shape, generator=g))

    with torch.no_grad():
        for _, module in model.named_modules():
            if "Norm" in type(module).__name__:
                rand(module.weight, 0.2, 1.0)
            for name, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if name == "bias" and p is not None:
                    rand(p, 0.05)
                elif name == "D":
                    rand(p, 0.5, 1.0)
                elif name == "A_log":
                    p.copy_(torch.log(torch.empty(p.shape).uniform_(1.0, 16.0, generator=g)))
                elif name == "dt_bias":  # softplus^-1 of dt log-uniform in [1e-3, 1e-1]
                    dt = torch.exp(torch.empty(p.shape).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
                    p.copy_(dt + torch.log(-torch.expm1(-dt)))
                elif name == "e_score_correction_bias":
                    rand(p, 0.05)


def _assert_logits_close(got, want, what="logits"):
    """max|got - want| <= LOGITS_RTOL * max|want| (fp32 rounding, relative to the logits' scale)."""
    diff, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert diff <= LOGITS_RTOL * scale, (
        f"{what} differ from transformers by {diff:.3g} = {diff / scale:.3g} of max|logits| {scale:.3g} "
        f"(tolerance {LOGITS_RTOL:g} of it)"
    )


def _inputs(cfg: HybridMoEConfig, seq_len: int, seed: int = 1234):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # ignored positions must be ignored the same way on both sides
    labels[1, seq_len // 2] = -100
    return ids, labels


def _ours_then_transformers(cfg: HybridMoEConfig, path):
    torch.manual_seed(0)
    ours = HybridMoEForCausalLM(cfg)
    _randomize_constant_tensors_(ours, seed=1)
    ours.eval()
    ours.save_pretrained(path)
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert type(theirs).__name__ == "NemotronHForCausalLM"
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    assert all(k.startswith("mtp.") for k in info["unexpected_keys"]), info["unexpected_keys"]
    return ours, theirs.eval()


def _transformers_then_ours(cfg: HybridMoEConfig, path):
    hf_config = transformers.NemotronHConfig(**cfg.to_hf_dict())
    torch.manual_seed(0)
    theirs = transformers.NemotronHForCausalLM(hf_config)
    _randomize_constant_tensors_(theirs, seed=2)
    theirs.eval()
    theirs.save_pretrained(path)
    ours = HybridMoEForCausalLM.from_pretrained(path)
    return ours, theirs


def _assert_forward_parity(ours, theirs, cfg, seq_len):
    ids, labels = _inputs(cfg, seq_len)
    with torch.no_grad():
        out = ours(ids, labels=labels)
        ref = theirs(input_ids=ids, labels=labels)
    assert out.logits.dtype == ref.logits.dtype == torch.float32
    assert out.logits.shape == ref.logits.shape == (2, seq_len, cfg.vocab_size)
    assert ref.logits.std() > 0.1, "degenerate reference logits: the comparison would prove little"
    _assert_logits_close(out.logits, ref.logits)
    # lm_loss is the next-token loss transformers computes; `loss` adds the MTP term when MTP layers exist.
    assert abs(out.lm_loss.item() - ref.loss.item()) <= LOSS_ATOL, (out.lm_loss.item(), ref.loss.item())
    if cfg.num_nextn_predict_layers == 0:
        assert abs(out.loss.item() - ref.loss.item()) <= LOSS_ATOL, (out.loss.item(), ref.loss.item())
    else:
        expected = out.lm_loss + cfg.mtp_loss_weight * out.mtp_loss
        assert torch.isfinite(out.mtp_loss) and abs(out.loss.item() - expected.item()) <= LOSS_ATOL


# ---------------------------------------------------------------------------------------------- (a) ours -> HF


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ours_loaded_by_transformers_same_logits_and_loss(name, tmp_path):
    cfg, seq_len = CONFIGS[name]()
    ours, theirs = _ours_then_transformers(cfg, tmp_path)
    _assert_forward_parity(ours, theirs, cfg, seq_len)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ours_loaded_by_transformers_same_greedy_generation(name, tmp_path):
    cfg, seq_len = CONFIGS[name]()
    ours, theirs = _ours_then_transformers(cfg, tmp_path)
    prompt, _ = _inputs(cfg, seq_len, seed=99)
    got = ours.generate(prompt, max_new_tokens=NEW_TOKENS)
    with torch.no_grad():
        want = theirs.generate(prompt, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    assert got.shape == want.shape == (2, seq_len + NEW_TOKENS)
    assert torch.equal(got[:, :seq_len], prompt)
    mismatch = (got != want).nonzero()
    assert mismatch.numel() == 0, f"first differing (row, position): {mismatch[0].tolist()}"


@pytest.mark.parametrize("name", ["latent_moe", "attention_heavy_biases", "mamba_heavy"])
def test_cached_decode_steps_match_transformers_full_forward(name, tmp_path):
    """Prefill, then one token at a time through our cache: each step's logits equal transformers' logits for the
    same position of a full forward (its non-cached path, the one the chunked scan defines)."""
    cfg, seq_len = CONFIGS[name]()
    ours, theirs = _ours_then_transformers(cfg, tmp_path)
    ids, _ = _inputs(cfg, seq_len + 6, seed=7)
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        cache = ours.new_cache(2, capacity=8)  # smaller than needed: the KV cache must grow on the way
        steps = [ours(ids[:, :seq_len], cache=cache).logits]
        steps += [ours(ids[:, t : t + 1], cache=cache).logits for t in range(seq_len, ids.shape[1])]
    _assert_logits_close(torch.cat(steps, dim=1), want, "cached logits (vs transformers' full forward)")


def test_left_padded_batch_matches_transformers(tmp_path):
    cfg, _ = CONFIGS["latent_moe"]()
    ours, theirs = _ours_then_transformers(cfg, tmp_path)
    ids, _ = _inputs(cfg, 13, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = cfg.pad_token_id
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
        want = theirs(input_ids=ids, attention_mask=mask).logits
    _assert_logits_close(got[mask.bool()], want[mask.bool()], "logits of real tokens")
    new = 8
    got_ids = ours.generate(ids, max_new_tokens=new, attention_mask=mask)
    with torch.no_grad():
        want_ids = theirs.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new)
    assert torch.equal(got_ids, want_ids), (got_ids[:, -new:], want_ids[:, -new:])


@pytest.mark.parametrize(
    "time_steps",
    [
        pytest.param(dict(time_step_limit=(0.0, 0.02)), id="finite_time_step_limit"),
        pytest.param(dict(time_step_min=0.05), id="time_step_min_is_no_clamp"),
    ],
)
def test_time_step_settings_match_transformers(time_steps, tmp_path):
    """dt = clamp(softplus(dt + dt_bias), time_step_limit), as state-spaces/mamba's kernels take `dt_limit` and
    transformers (>= 5.25.0) passes `time_step_limit` to them; time_step_min bounds only the initialization (it was
    a clamp in transformers < 5.25 and here before). Full forward and cached decode (which clamps like the scan, so
    that it continues exactly what a full forward computes) against transformers' full forward, in settings where
    the clamp bites: the randomized dt lies in [1e-3, 0.1] before the input's share."""
    cfg = _latent_moe()[0].replace(**time_steps)
    ours, theirs = _ours_then_transformers(cfg, tmp_path / "model")
    ids, _ = _inputs(cfg, 21 + 6, seed=7)
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        _assert_logits_close(ours(ids).logits, want)
        cache = ours.new_cache(2, capacity=32)
        steps = [ours(ids[:, :21], cache=cache).logits]
        steps += [ours(ids[:, t : t + 1], cache=cache).logits for t in range(21, ids.shape[1])]
        _assert_logits_close(torch.cat(steps, dim=1), want, "cached logits (vs transformers' full forward)")
        # The setting bites: the other reading of it (no upper clamp; a clamp at time_step_min) moves the logits.
        other_limit = (0.0, math.inf) if "time_step_limit" in time_steps else (cfg.time_step_min, math.inf)
        other = HybridMoEForCausalLM(cfg.replace(time_step_limit=other_limit))
        other.load_state_dict(ours.state_dict())
        assert (other.eval()(ids).logits - want).abs().max() > 100 * LOGITS_RTOL * want.abs().max()


# ---------------------------------------------------------------------------------------------- (b) HF -> ours


@pytest.mark.parametrize("name", CONFIGS_WITHOUT_MTP)
def test_transformers_checkpoint_loaded_by_us_same_logits_and_loss(name, tmp_path):
    cfg, seq_len = CONFIGS[name]()
    ours, theirs = _transformers_then_ours(cfg, tmp_path)
    # transformers wrote its own config.json (layers_block_type list, {"__float__": "Infinity"}, runtime keys):
    # it must read back to the very config we started from.
    assert ours.config == cfg
    # every tensor arrived: our parameters equal theirs (backbone. on disk is model. in transformers' memory).
    theirs_sd = theirs.state_dict()
    for key, value in ours.state_dict().items():
        hf_key = "model." + key.removeprefix("backbone.") if key.startswith("backbone.") else key
        assert torch.equal(value, theirs_sd[hf_key]), key
    _assert_forward_parity(ours, theirs, cfg, seq_len)
