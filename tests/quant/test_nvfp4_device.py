"""The NVFP4 and MXFP8 emulation on an accelerator against its twin on the CPU: the quantizers' bits (compiled, on the
device, against eager on the CPU, fed the same stochastic-rounding draws), the recipe's GEMMs and a model step.

On a CPU-only machine the bit tests run with device "cpu" (compiled C++ against eager); the rest skip. On a GPU the
compiled kernels are Triton code, whose division, subnormal flushing and FMA contraction differ from eager CUDA's
unless `hybridmoe.quant.kernels` asks Inductor for eager numerics: these tests are what checks it there."""

import shutil

import pytest
import torch

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.kernels.moe import experts_grouped
from hybridmoe.quant import kernels, mxfp8, nvfp4
from hybridmoe.quant.training import NVFP4Recipe, PrecisionPolicy, apply_precision, module_formats

ACCELERATORS = ["cuda"] if torch.cuda.is_available() else []
needs_accelerator = pytest.mark.skipif(not ACCELERATORS, reason="needs a CUDA GPU")


def bits(t):
    return t.cpu().view(torch.int32) if t.dtype == torch.float32 else t.cpu().view(torch.uint8)


def hard_inputs(g, rows=64, cols=256):
    """Magnitudes from fp32 subnormals to 1e3 along the columns (so blocks from all-subnormal to large), exact ties of
    the E2M1 grid, zeros and negative zeros."""
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-42, 3, cols)
    x[0, :16] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.0, 0.0, 0.5, 1.0, 1.5, 3.0, 4.0])
    x[1] = 0.0
    x[2, 16:32] = -0.0
    return x


def compiled_ran():
    """Whether the compiled path ran (not the eager fallback): on a GPU always expected, on a CPU with a compiler."""
    return kernels.mode() != "auto" or kernels._BROKEN is False


@pytest.mark.parametrize("device", ["cpu", *ACCELERATORS])
def test_compiled_quantizers_on_the_device_give_the_bits_of_eager_on_the_cpu(device):
    g = torch.Generator().manual_seed(11)
    x = hard_inputs(g)
    for block in nvfp4.BLOCKS:
        xb = nvfp4._blocks(x, block)
        u = torch.rand(xb.shape, generator=g)
        for rounding in nvfp4.ROUNDINGS:
            draws = () if rounding == "nearest" else (u,)
            want = nvfp4._qdq_blocks(xb, block, *(draws or (None,)))
            got = kernels.compiled(nvfp4._VARIANTS[block, rounding])(xb.to(device), *(d.to(device) for d in draws))
            assert torch.equal(bits(got[0]), bits(want[0])), (block, rounding)
            assert torch.equal(bits(got[1]), bits(want[1])), (block, rounding)

    # Many amaxes at once (one per stacked tensor, from fp32 subnormals up): thousands of divisions of the scale chain
    stack = torch.randn(512, 16, 32, generator=g) * torch.logspace(-40, 3, 512)[:, None, None]
    group = torch.arange(512).view(-1, 1, 1)
    for block in nvfp4.BLOCKS:
        xb = nvfp4._blocks(stack, block)
        u = torch.rand(xb.shape, generator=g)
        for rounding in nvfp4.ROUNDINGS:
            draws = () if rounding == "nearest" else (u,)
            grouped = (group, torch.zeros(512))
            want = nvfp4._qdq_blocks(xb, block, draws[0] if draws else None, *grouped)
            on_device = (a.to(device) for a in (xb, *grouped, *draws))
            got = kernels.compiled(nvfp4._GROUPED_VARIANTS[block, rounding])(*on_device)
            assert torch.equal(bits(got[0]), bits(want[0])), (block, rounding)
            assert torch.equal(bits(got[1]), bits(want[1])), (block, rounding)

    # MXFP8: scales down to 2^-127 (an fp32 subnormal), E4M3 subnormal elements
    for xx in (x, x.bfloat16(), stack.flatten(0, 1) * 1e-3):
        b = torch.nn.functional.pad(xx, (0, -xx.shape[-1] % 32)).unflatten(-1, (-1, 32))
        want = mxfp8._qdq_blocks(b)
        assert torch.equal(bits(kernels.compiled(mxfp8._qdq_blocks)(b.to(device))), bits(want))
    if device != "cpu" or shutil.which("c++"):
        assert compiled_ran()


@needs_accelerator
@pytest.mark.parametrize("device", ACCELERATORS)
def test_public_quantizers_on_the_device_match_the_cpu(device):
    """quantize (codes, E4M3 scales, global scale), dequantize and the fast path, eager on the device against the
    CPU, in fp32 and bf16; stochastic rounding draws from the device's generator, so only its range is checked."""
    g = torch.Generator().manual_seed(12)
    x = hard_inputs(g, 48, 160)
    for xx in (x, x.bfloat16()):
        for block in nvfp4.BLOCKS:
            want, got = nvfp4.quantize(xx, block), nvfp4.quantize(xx.to(device), block)
            assert torch.equal(got.codes.cpu(), want.codes), block
            assert torch.equal(bits(got.scales.view(torch.uint8)), bits(want.scales.view(torch.uint8))), block
            assert torch.equal(bits(got.global_scale), bits(want.global_scale)), block
            assert torch.equal(bits(nvfp4.dequantize(got)), bits(nvfp4.dequantize(want))), block
            fast = nvfp4.fast_quantize_dequantize(xx.to(device), block)
            assert torch.equal(bits(fast[0]), bits(nvfp4.quantize_dequantize(xx, block)[0])), block
            sr = nvfp4.fast_quantize_dequantize(xx.to(device), block, "stochastic")[0].cpu()
            near = nvfp4.quantize_dequantize(xx, block)[0]
            assert torch.isfinite(sr).all() and (sr.abs() <= near.abs().amax()).all()
        assert torch.equal(bits(mxfp8.fast_quantize_dequantize(xx.to(device))), bits(mxfp8.quantize_dequantize(xx)))
    h = torch.randn(40, 64, generator=g)
    torch.testing.assert_close(nvfp4.hadamard16(h.to(device)).cpu(), nvfp4.hadamard16(h), rtol=1e-6, atol=1e-7)
    k = torch.randint(-8, 9, (40, 64), generator=g).float()  # sums of +-k/4 are exact: the same bits on every device
    assert torch.equal(bits(nvfp4.hadamard16(k.to(device))), bits(nvfp4.hadamard16(k)))
    assert compiled_ran()


def close(a, b, tol):
    """Relative Frobenius distance: the GEMMs accumulate in another order on each device."""
    return (a.cpu().double() - b.double()).norm() <= tol * b.double().norm()


@needs_accelerator
@pytest.mark.parametrize("device", ACCELERATORS)
def test_recipe_gemms_and_experts_on_the_device_match_the_cpu(device):
    """A quantized linear's three GEMMs and the routed experts' one-call path, rounding to nearest, on the device
    against the CPU (operands quantized from the same values: the GEMMs' summation order is what differs)."""
    torch.manual_seed(13)
    recipe = NVFP4Recipe(stochastic_rounding=False)
    x, w, b, g = torch.randn(70, 96), torch.randn(48, 96) * 0.1, torch.randn(48) * 0.1, torch.randn(70, 48)

    def linear(dev):
        leaves = [a.to(dev).requires_grad_() for a in (x, w, b)]
        y = recipe(*leaves)
        y.backward(g.to(dev))
        return [y.detach()] + [a.grad for a in leaves]

    for got, want in zip(linear(device), linear("cpu")):
        assert close(got, want, 1e-5)

    t, d, i, e, k = 45, 32, 48, 5, 2
    ex, up, down = torch.randn(t, d), torch.randn(e, i, d) * 0.2, torch.randn(e, d, i) * 0.2
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    idx[idx == 3] = 4  # an expert without tokens
    wts, gy = torch.rand(t, k), torch.randn(t, d)

    def experts(dev):
        leaves = [a.to(dev).requires_grad_() for a in (ex, up, down)]
        y = experts_grouped(*leaves, idx.to(dev), wts.to(dev), quant=recipe)
        y.backward(gy.to(dev))
        return [y.detach()] + [a.grad for a in leaves]

    for got, want in zip(experts(device), experts("cpu")):
        assert close(got, want, 1e-4)


@needs_accelerator
@pytest.mark.parametrize("device", ACCELERATORS)
def test_debug_model_trains_in_nvfp4_on_the_device(device):
    """The whole recipe (NVFP4, MXFP8 out_proj, BF16 tail) on the `debug` model, fp32 master weights: the loss on the
    device within 0.5% of the CPU's with rounding to nearest (an activation's code may flip where the two devices'
    GEMMs round differently), and with the full recipe every quantized weight gets a finite, nonzero gradient."""
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(14))

    def step(dev, policy):
        torch.manual_seed(0)
        model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug")).to(dev)
        apply_precision(model, policy)
        out = model(ids.to(dev), labels=ids.to(dev))
        out.loss.backward()
        return model, out.loss.item()

    nearest = PrecisionPolicy(recipe="nvfp4", stochastic_rounding=False)
    (_, on_device), (_, on_cpu) = step(device, nearest), step("cpu", nearest)
    assert abs(on_device - on_cpu) <= 5e-3 * on_cpu, (on_device, on_cpu)
    model, loss = step(device, PrecisionPolicy(recipe="nvfp4"))
    assert abs(loss - on_cpu) <= 5e-2 * on_cpu
    formats = module_formats(model)
    quantized = [n for n, f in formats.items() if f in ("nvfp4", "mxfp8")]
    assert len(quantized) >= 8
    for name in quantized:
        module = model.get_submodule(name)
        for p in module.parameters(recurse=False) if name.endswith("experts") else [module.weight]:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_kernels_compile_for_gpus_with_eager_numerics(monkeypatch):
    """GPU tensors get Inductor's eager-numerics options (correctly rounded division, no flush to zero, no FMA
    contraction), CPU tensors the defaults; torch >= 2.11 (pyproject's floor) knows all three."""
    assert kernels.exact_options() == {
        "eager_numerics.division_rounding": True,
        "eager_numerics.disable_ftz": True,
        "emulate_precision_casts": True,
    }
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw.get("options")) or fn)
    kernels._compile.cache_clear()
    try:
        kernels._compile(mxfp8._qdq_blocks, "cpu")
        kernels._compile(mxfp8._qdq_blocks, "cuda")
    finally:
        kernels._compile.cache_clear()
    assert seen == [None, kernels.exact_options()]
