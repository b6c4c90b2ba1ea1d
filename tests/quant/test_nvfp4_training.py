"""The NVFP4 training recipe, emulated (`hybridmoe.quant.training`): the three GEMMs of a quantized linear against
F.linear (quantization replaced by the identity), hand-computed cases and a float64 twin on the same quantization;
which operand each GEMM quantizes how (and what each ablation switch changes); unbiased stochastic rounding; the
routed experts' path; the precision policy; the recipe keys; a few training steps."""

import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import write_prepared
from test_pretrain import pattern_docs, recipe, step_records

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.kernels.moe import experts_grouped
from hybridmoe.quant import nvfp4
from hybridmoe.quant.training import (
    MXFP8Recipe,
    NVFP4Recipe,
    PrecisionPolicy,
    apply_precision,
    module_formats,
    mxfp8_linear,
    nvfp4_linear,
    reference_linear,
)
from hybridmoe.train.config import Recipe, SFTRecipe
from hybridmoe.train.pretrain import pretrain

ABLATIONS = [
    NVFP4Recipe(),
    NVFP4Recipe(rht=False),
    NVFP4Recipe(stochastic_rounding=False),
    NVFP4Recipe(weight_2d=False),
]


def identity_qdq(x, block="1x16", rounding="nearest", generator=None):
    return x.float(), torch.ones(())


def grads(fn, x, w, b, g):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    y = fn(x, w, b)
    y.backward(g)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("recipe_", ABLATIONS, ids=["default", "no_rht", "no_sr", "no_2d"])
def test_identity_quantization_gives_f_linear(recipe_):
    """With quantize_dequantize replaced by the identity, every GEMM (and the RHT on wgrad, over 19 tokens padded to
    32) reduces to F.linear: values and gradients, a leading batch dim and a bias included."""
    torch.manual_seed(0)
    x, w, b = torch.randn(1, 19, 40), torch.randn(24, 40), torch.randn(24)
    g = torch.randn(1, 19, 24)
    want = grads(F.linear, x, w, b, g)
    got = grads(lambda x, w, b: nvfp4_linear(x, w, b, recipe_, qdq=identity_qdq), x, w, b, g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    got = grads(lambda x, w, b: mxfp8_linear(x, w, b, qdq=lambda t: t.float()), x, w, b, g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def spy(log):
    def qdq(x, block="1x16", rounding="nearest", generator=None):
        log.append((tuple(x.shape), block, rounding))
        return x.float(), torch.ones(())

    def hadamard(x):
        log.append((tuple(x.shape), "rht"))
        return nvfp4.hadamard16(x)

    return qdq, hadamard


@pytest.mark.parametrize(
    "recipe_, expected",
    [
        (NVFP4Recipe(), [((19, 40), "1x16", "nearest"), ((24, 40), "16x16", "nearest"),
                         ((19, 24), "1x16", "stochastic"),
                         ((24, 32), "rht"), ((40, 32), "rht"),
                         ((24, 32), "1x16", "stochastic"), ((40, 32), "1x16", "nearest")]),
        (NVFP4Recipe(rht=False), [((19, 40), "1x16", "nearest"), ((24, 40), "16x16", "nearest"),
                                  ((19, 24), "1x16", "stochastic"),
                                  ((24, 32), "1x16", "stochastic"), ((40, 32), "1x16", "nearest")]),
        (NVFP4Recipe(stochastic_rounding=False), [((19, 40), "1x16", "nearest"), ((24, 40), "16x16", "nearest"),
                                                  ((19, 24), "1x16", "nearest"),
                                                  ((24, 32), "rht"), ((40, 32), "rht"),
                                                  ((24, 32), "1x16", "nearest"), ((40, 32), "1x16", "nearest")]),
        (NVFP4Recipe(weight_2d=False), [((19, 40), "1x16", "nearest"), ((24, 40), "1x16", "nearest"),
                                        ((19, 24), "1x16", "stochastic"), ((40, 24), "1x16", "nearest"),
                                        ((24, 32), "rht"), ((40, 32), "rht"),
                                        ((24, 32), "1x16", "stochastic"), ((40, 32), "1x16", "nearest")]),
    ],
    ids=["default", "no_rht", "no_sr", "no_2d"],
)  # fmt: skip
def test_each_gemm_quantizes_its_operands_as_the_recipe_says(recipe_, expected):
    """fprop: x 1x16 along in, W 16x16 (1x16 along in without 2D); dgrad: g 1x16 along out (stochastic), W^T along
    out only without 2D (else the forward's tiles are reused); wgrad: g^T and x^T along tokens (19 padded to 32),
    RHT first."""
    log = []
    qdq, hadamard = spy(log)
    x, w = torch.randn(19, 40, requires_grad=True), torch.randn(24, 40, requires_grad=True)
    nvfp4_linear(x, w, None, recipe_, qdq=qdq, hadamard=hadamard).backward(torch.randn(19, 24))
    assert log == expected


def test_exactly_representable_operands_multiply_exactly_and_ties_round_to_even():
    """Values on the E2M1 grid with amax 6 (block scale 448, global scale 6/2688: v * s = the value) quantize to
    themselves, so y is the plain product; 0.75 is a tie that rounds to 1 and 5 one that rounds to 4."""
    w = torch.zeros(16, 16)
    w[0, :4] = torch.tensor([6.0, 1.0, -0.5, 2.0])
    w[1, :3] = torch.tensor([1.0, 1.0, 1.0])
    x = torch.zeros(2, 16)
    x[0, :4] = torch.tensor([1.0, 3.0, 4.0, -6.0])  # on the grid
    x[1, :3] = torch.tensor([6.0, 0.75, 5.0])  # 0.75 -> 1, 5 -> 4
    y = nvfp4_linear(x, w)
    want = torch.tensor([[6 + 3 - 2 - 12, 1 + 3 + 4], [36 + 1 - 2, 6 + 1 + 4]], dtype=torch.float32)
    torch.testing.assert_close(y[:, :2], want, rtol=1e-6, atol=0)  # (the global scales 6 / 2688 are inexact in fp32)
    assert (y[:, 2:] == 0).all()


@pytest.mark.parametrize("recipe_", ABLATIONS, ids=["default", "no_rht", "no_sr", "no_2d"])
def test_the_function_equals_its_float64_twin(recipe_):
    """Forward and both gradients against `reference_linear` on the same quantize_dequantize calls (the same random
    draws under the same seed): fp32 compute agrees to fp32 rounding."""
    torch.manual_seed(1)
    x, w = torch.randn(3, 21, 48), torch.randn(40, 48) * 0.1
    x[0, 0, 0] = 30.0  # an outlier
    g = torch.randn(3, 21, 40)
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = nvfp4_linear(xx, ww, None, recipe_)
    torch.manual_seed(7)
    y.backward(g)
    y_ref, grad_fn = reference_linear(x, w, None, recipe_)
    torch.manual_seed(7)
    dx_ref, dw_ref = grad_fn(g)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xx.grad.double(), dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ww.grad.double(), dw_ref, rtol=1e-5, atol=1e-5)
    # and the quantization is real: the product differs from the unquantized one
    assert (y - F.linear(x, w)).abs().max() > 1e-3


def test_bf16_and_autocast_runs():
    """bf16 operands: the same quantized values, multiplied in bf16 (exact operands, fp32 accumulation): the output
    is the fp32 computation's rounded to bf16 (twice: the GEMM's output, then scaled). Under autocast the fp32 master
    weight and bias get fp32 gradients and the output is bf16."""
    torch.manual_seed(2)
    x, w, b = (t.bfloat16() for t in (torch.randn(32, 64), torch.randn(48, 64) * 0.1, torch.randn(48)))
    y32 = nvfp4_linear(x.float(), w.float(), b.float())
    y16 = nvfp4_linear(x, w, b)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=2**-7, atol=2**-6)  # bf16 ulps of the bias-sized sums
    ww, bb = w.float().requires_grad_(), b.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = NVFP4Recipe()(x.float(), ww, bb)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert ww.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32
    assert torch.isfinite(ww.grad).all()


def test_stochastic_rounding_of_the_gradient_is_unbiased_and_nearest_is_not():
    """g = [6, 0.75 x 15] (block scale 448: 0.75 lies halfway between 0.5 and 1) through W = I: dx averages to g over
    many draws with stochastic rounding; rounding to nearest gives 1 every time."""
    n = 400
    g = torch.full((n, 16), 0.75)
    g[:, 0] = 6.0
    x, w = torch.zeros(n, 16, requires_grad=True), torch.eye(16).requires_grad_()
    torch.manual_seed(3)
    nvfp4_linear(x, w).backward(g)  # n rows: n independent draws (one block each)
    dx = x.grad[:, 1:]
    assert (((dx - 0.5).abs() < 1e-5) | ((dx - 1.0).abs() < 1e-5)).all()
    mean, sem = dx.mean(), dx.std() / math.sqrt(dx.numel())
    assert abs(mean - 0.75) < 4 * sem, (mean, sem)
    x.grad = None
    nvfp4_linear(x, w, None, NVFP4Recipe(stochastic_rounding=False)).backward(g)
    torch.testing.assert_close(x.grad[:, 1:], torch.ones(n, 15), rtol=1e-5, atol=0)


def test_rht_leaves_the_weight_gradient_of_exact_operands_unchanged():
    """The RHT is orthonormal along tokens: with the identity quantization dW = g^T x whether or not it is applied,
    yet the operands it hands the quantizer differ."""
    torch.manual_seed(4)
    x, w, g = torch.randn(37, 32), torch.randn(16, 32), torch.randn(37, 16)
    seen = {}

    def qdq(t, block="1x16", rounding="nearest", generator=None):
        seen.setdefault(rounding, []).append(t.clone())
        return t.float(), torch.ones(())

    dws = []
    for rht in (True, False):
        ww = w.clone().requires_grad_()
        nvfp4_linear(x, ww, None, NVFP4Recipe(rht=rht), qdq=qdq).backward(g)
        dws.append(ww.grad)
    torch.testing.assert_close(dws[0], g.T @ x, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dws[1], g.T @ x, rtol=1e-5, atol=1e-4)
    wgrad_x_rht, wgrad_x_plain = seen["nearest"][2], seen["nearest"][5]  # [x, W (fprop), x^T (wgrad)] per run
    assert wgrad_x_rht.shape == wgrad_x_plain.shape == (32, 48)
    assert not torch.allclose(wgrad_x_rht, wgrad_x_plain)


# ---------------------------------------------------------------------------------------------- experts and model


def test_quantized_experts_twin_and_per_segment_scales():
    """experts_grouped with `quant`: identity quantization reproduces the default path (values and gradients); with
    NVFP4 each expert's segment is quantized as its own tensor (one call per segment and GEMM)."""
    torch.manual_seed(5)
    t, d, i, e, k = 20, 32, 48, 4, 2
    x, up, down = torch.randn(t, d), torch.randn(e, i, d) * 0.2, torch.randn(e, d, i) * 0.2
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    idx[:, 0] = torch.where(idx[:, 0] == 3, 0, idx[:, 0])  # expert 3 gets fewer tokens
    wts = torch.rand(t, k)
    g = torch.randn(t, d)

    def run(quant):
        xx, uu, dd = (a.clone().requires_grad_() for a in (x, up, down))
        y = experts_grouped(xx, uu, dd, idx, wts, quant=quant)
        y.backward(g)
        return y, xx.grad, uu.grad, dd.grad

    want = run(None)
    got = run(lambda x, w, b: nvfp4_linear(x, w, b, qdq=identity_qdq))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    calls = []

    def counting(x, w, b):
        calls.append(x.shape[0])
        return nvfp4_linear(x, w, b)

    got = run(counting)
    counts = torch.bincount(idx.flatten(), minlength=e)
    assert calls == [n for n in counts.tolist() for _ in range(2) if n]
    assert all(torch.isfinite(a).all() for a in got)
    assert (got[0] - want[0]).abs().max() > 1e-3  # quantized


@pytest.mark.parametrize("recipe_", ABLATIONS[1:], ids=["no_rht", "no_sr", "no_2d"])
def test_experts_in_one_call_per_operand_equal_the_per_segment_path_bitwise(recipe_, monkeypatch):
    """`NVFP4Recipe.segments` (all the experts' segments of a GEMM quantized in one call per operand) against its twin,
    one `nvfp4_linear` per segment: the same loss, output and gradients, bit for bit, with biases, an expert without
    tokens and segments of any length, in fp32 and under bf16 autocast. Stochastic rounding is off in both (its draws
    come in another order), so the no_rht and no_2d ablations run with rounding to nearest too."""
    recipe_ = NVFP4Recipe(recipe_.rht, False, recipe_.weight_2d)
    torch.manual_seed(6)
    t, d, i, e, k = 45, 32, 48, 5, 2
    x, up, down = torch.randn(t, d), torch.randn(e, i, d) * 0.2, torch.randn(e, d, i) * 0.2
    b_up, b_down = torch.randn(e, i) * 0.1, torch.randn(e, d) * 0.1
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    idx[idx == 3] = 4  # expert 3 gets no tokens
    wts, g = torch.rand(t, k), torch.randn(t, d)
    calls = []
    for name in ("quantize_dequantize_segments", "quantize_dequantize_column_segments", "quantize_dequantize_batched"):
        fn = getattr(nvfp4, name)
        monkeypatch.setattr(nvfp4, name, lambda *a, fn=fn, **kw: calls.append(1) or fn(*a, **kw))

    def run(quant, autocast):
        leaves = [a.clone().requires_grad_() for a in (x, up, down, b_up, b_down)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = experts_grouped(*leaves[:3], idx, wts, b_up_EU=leaves[3], b_down_ED=leaves[4], quant=quant)
        y.backward(g)
        return [y.detach()] + [a.grad for a in leaves]

    for autocast in (False, True):
        want = run(lambda x, w, b: recipe_(x, w, b), autocast)  # a plain callable: the per-segment path
        calls.clear()
        got = run(recipe_, autocast)
        assert len(calls) == (10 if recipe_.weight_2d else 12)  # (2 + 1 + 2) per GEMM (+1 for dgrad's W^T without 2D)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        assert got[2][3].abs().max() == 0 and got[1].abs().max() > 0


def debug_model(**overrides):
    torch.manual_seed(0)
    return HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug", **overrides))


def test_model_with_identity_quantization_everywhere_matches_the_default_path():
    """The Linear hook and the experts path inside the whole model: identity quantization on every linear and expert
    bank gives the default model's loss and gradients."""
    model = debug_model()
    ids = torch.randint(0, 512, (2, 24))
    out = model(ids, labels=ids)
    out.loss.backward()
    want = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad()
    ident = lambda x, w, b: nvfp4_linear(x, w, b, qdq=identity_qdq)  # noqa: E731
    hooked = 0
    for module in model.modules():
        if hasattr(module, "quant"):
            module.quant = ident
            hooked += 1
    assert hooked > 20
    out = model(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), want[0], rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if n in want[1]:
            torch.testing.assert_close(p.grad, want[1][n], rtol=1e-4, atol=1e-5, msg=n)


def test_apply_precision_follows_the_policy():
    """debug: layers M * E M - E (+ an MTP layer * E); the last round(0.15 * 6) = 1 layer stays high precision."""
    model = debug_model()
    summary = apply_precision(model, PrecisionPolicy(recipe="nvfp4"))
    f = module_formats(model)
    layer = "backbone.layers.{}.mixer.".format
    nvfp4_modules = [
        layer(0) + "in_proj", layer(3) + "in_proj", layer(4) + "up_proj", layer(4) + "down_proj",
        layer(2) + "experts", layer(2) + "shared_experts.up_proj", layer(2) + "shared_experts.down_proj",
    ]  # fmt: skip
    mxfp8_modules = [layer(0) + "out_proj", layer(3) + "out_proj"]
    for name in nvfp4_modules:
        assert f.pop(name) == "nvfp4", name
    for name in mxfp8_modules:
        assert f.pop(name) == "mxfp8", name
    assert f.pop(layer(2) + "gate") == f.pop(layer(5) + "gate") == "fp32"
    assert f.pop("mtp.layers.1.mixer.gate") == "fp32"
    # everything else at the base precision: attention, latent projections, the tail layer, MTP, lm_head
    assert set(f.values()) == {"bf16"}
    for name in (layer(1) + "q_proj", layer(1) + "o_proj", layer(2) + "fc1_latent_proj", layer(2) + "fc2_latent_proj",
                 layer(5) + "experts", layer(5) + "shared_experts.up_proj", "mtp.layers.1.mixer.experts",
                 "mtp.layers.0.eh_proj", "lm_head"):  # fmt: skip
        assert name in f, name
    e = model.config.n_routed_experts
    assert summary.startswith(f"precision.recipe=nvfp4: weight matrices NVFP4 {4 + 2 * e + 2}, MXFP8 2,")
    assert model.backbone.layers[0].mixer.in_proj.quant == NVFP4Recipe()
    assert model.backbone.layers[0].mixer.out_proj.quant == MXFP8Recipe()

    apply_precision(model, PrecisionPolicy(recipe="nvfp4", rht=False, bf16_tail_fraction=0.0, mamba_out_proj="bf16"))
    f = module_formats(model)
    assert f[layer(5) + "experts"] == "nvfp4" and f[layer(0) + "out_proj"] == "bf16"
    assert model.backbone.layers[5].mixer.experts.quant == NVFP4Recipe(rht=False)
    apply_precision(model, PrecisionPolicy(recipe="nvfp4", mamba_out_proj="nvfp4"))
    assert module_formats(model)[layer(0) + "out_proj"] == "nvfp4"
    apply_precision(model, PrecisionPolicy())  # recipe none: every hook cleared
    assert set(module_formats(model).values()) == {"bf16", "fp32"}


# ---------------------------------------------------------------------------------------------- recipes and training


def test_recipe_keys_parse_override_and_validate(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"data:\n  phases: [{{datasets: {{{tmp_path}: 1.0}}}}]\n")
    r = Recipe.from_yaml(str(path))
    assert r.precision.recipe == "none" and r.precision.policy() == PrecisionPolicy()
    r = Recipe.from_yaml(str(path), ["precision.recipe=nvfp4", "precision.rht=false", "precision.mamba_out_proj=bf16",
                                     "precision.bf16_tail_fraction=0.2"])  # fmt: skip
    r.validate()
    assert r.precision.policy() == PrecisionPolicy("nvfp4", False, True, True, 0.2, "bf16")
    assert "precision:\n  recipe: nvfp4" in r.to_yaml()
    for override, message in [
        ("precision.recipe=fp4", "precision.recipe='fp4': use none or nvfp4"),
        ("precision.mamba_out_proj=fp8", "precision.mamba_out_proj='fp8'"),
        ("precision.bf16_tail_fraction=1.5", "precision.bf16_tail_fraction=1.5"),
        ("precision.weight_2d=maybe", "use true or false"),
        ("precision.fp4=1", "unknown key(s) ['fp4']"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            Recipe.from_yaml(str(path), [override]).validate()
    sft = SFTRecipe.from_dict({"data": {"datasets": {"x.jsonl": 1.0}}, "precision": {"recipe": "nvfp4"}})
    sft.validate()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    sft.model.source, sft.model.init_from = "transformers", str(tmp_path / "hf")
    with pytest.raises(ValueError, match="precision.recipe=nvfp4 is for native models"):
        sft.validate()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("data"), pattern_docs(200, 0), vocab=512, dtype="uint16")


def nvfp4_run(out_dir, data_dir, steps):
    r = recipe(out_dir, data_dir, steps, precision="autocast-bf16", val_every=0)
    r.precision.recipe = "nvfp4"
    summary = pretrain(r, peak_gflops=100.0)
    return summary, [rec["loss"] for rec in step_records(out_dir)]


def test_nvfp4_pretraining_learns_and_a_fixed_seed_reproduces_it(tmp_path, data_dir, capsys):
    summary, losses = nvfp4_run(tmp_path / "a", data_dir, 8)
    assert "precision.recipe=nvfp4: weight matrices NVFP4" in capsys.readouterr().out
    model = summary["model"]
    assert module_formats(model)["backbone.layers.0.mixer.in_proj"] == "nvfp4"
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert os.path.exists(os.path.join(summary["checkpoint"], "model.safetensors"))
    _, again = nvfp4_run(tmp_path / "b", data_dir, 2)
    assert again == losses[:2]
