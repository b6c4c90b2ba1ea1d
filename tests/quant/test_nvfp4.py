"""NVFP4 and MXFP8 formats: bit-exact against hand-computed codes and scales (no tolerance)."""

import pytest
import torch

from hybridmoe.quant import mxfp8, nvfp4

# A block whose amax is 6 as the tensor's amax: S_enc = 448, the block scale is 448 and the element factor 1, so the
# elements are rounded as they are.
TIES = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.0, 0.0, 0.5, 1.0, 1.5, 3.0, 4.0]
TIES_CODES = [7, 0, 2, 2, 4, 4, 6, 6, 8, 8, 0, 1, 2, 3, 5, 6]  # ties to even; -0.25 -> -0 (sign kept)


def codes_of(t):
    return nvfp4.unpack(t.codes).tolist()


def test_ties_round_to_even_and_scales():
    t = nvfp4.quantize(torch.tensor(TIES))
    assert codes_of(t) == TIES_CODES
    assert t.scales.dtype == torch.float8_e4m3fn and t.scales.float().tolist() == [448.0]
    assert t.global_scale.item() == torch.tensor(6.0 / 2688).item()
    d = nvfp4.dequantize(t)
    expected = nvfp4.e2m1_decode(torch.tensor(TIES_CODES, dtype=torch.uint8)) * 448.0 * t.global_scale
    assert torch.equal(d, expected)
    assert d[9].item() == 0.0 and torch.signbit(d[9]) and torch.signbit(d[8])  # negative zero survives


def test_e2m1_rounding_table():
    v = torch.tensor([0.25, 0.26, 0.74, 0.75, 1.25, 1.26, 1.75, 2.49, 2.5, 2.51, 3.5, 4.99, 5.0, 5.01, 6.0, 7.0, 1e9])
    expected = [0.0, 0.5, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0, 2.0, 3.0, 4.0, 4.0, 4.0, 6.0, 6.0, 6.0, 6.0]
    assert nvfp4.round_e2m1(v).tolist() == expected
    down = [0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0, 2.0, 3.0, 4.0, 4.0, 4.0, 6.0, 6.0, 6.0]
    assert nvfp4.round_e2m1(v, u=torch.ones_like(v)).tolist() == down  # stochastic, draws of 1: never up


def test_block_scale_rounded_down_saturates_elements():
    # Global amax 6 (first block); the second block's amax 5.3 gives 5.3 * 448 / 6 = 395.7 -> E4M3 384, so its
    # largest element scales to 5.3 * 448 / 384 = 6.18 and saturates to 6.
    x = torch.zeros(32)
    x[0], x[16], x[17] = 6.0, 5.3, -5.3
    t = nvfp4.quantize(x)
    assert t.scales.float().tolist() == [448.0, 384.0]
    assert codes_of(t)[16:18] == [7, 15]
    assert nvfp4.dequantize(t)[16].item() == pytest.approx(6 * 384 * 6 / 2688, rel=1e-7)


def test_scales_match_torch_float8_conversion():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g) * torch.logspace(-6, 2, 64)  # blocks from tiny to large
    t = nvfp4.quantize(x)
    amax = x.abs().amax()
    s_enc = torch.tensor(2688.0) / amax
    block_amax = x.abs().view(8, 4, 16).amax(-1)
    expected = (block_amax * (s_enc * (1.0 / 6))).clamp(max=448).to(torch.float8_e4m3fn)
    assert torch.equal(t.scales.view(torch.uint8), expected.view(torch.uint8))
    assert (t.scales.float() < 2**-6).any()  # some scales are E4M3 subnormals


def test_all_zero_and_tiny_blocks():
    t = nvfp4.quantize(torch.zeros(2, 16))
    assert codes_of(t) == [[0] * 16] * 2 and t.scales.float().tolist() == [[0.0], [0.0]]
    assert t.global_scale.item() == 0.0 and torch.equal(nvfp4.dequantize(t), torch.zeros(2, 16))
    # A block whose scale rounds to zero in E4M3 (1e-6 * 448 / 6 = 7.5e-5 < 2^-10) keeps zero codes, sign kept.
    x = torch.zeros(32)
    x[0], x[16], x[17] = 6.0, 1e-6, -1e-6
    t = nvfp4.quantize(x)
    assert t.scales.float()[1].item() == 0.0
    assert codes_of(t)[16:18] == [0, 8]
    assert nvfp4.dequantize(t)[16:].abs().max().item() == 0.0


def test_stochastic_rounding_is_unbiased_and_reproducible():
    # amax 6 makes the factor 1: 0.3 lies between 0 and 0.5 and rounds up with probability 0.6, 2.2 between 2 and 3
    # (up with probability 0.2).
    x = torch.tensor([6.0] + [0.3] * 7 + [2.2] * 8).repeat(4000)
    g = torch.Generator().manual_seed(1)
    v, scale = nvfp4.quantize_dequantize(x, rounding="stochastic", generator=g)
    v = v / 448  # the E2M1 values (the block scale is 448 and the factor 1)
    small, large = v.view(-1, 16)[:, 1:8].flatten(), v.view(-1, 16)[:, 8:].flatten()
    assert set(small.unique().tolist()) == {0.0, 0.5} and set(large.unique().tolist()) == {2.0, 3.0}
    n = small.numel()
    for got, mean, step in ((small.mean(), 0.3, 0.5), (large.mean(), 2.2, 1.0)):
        assert abs(got.item() - mean) < 4 * step * 0.5 / n**0.5  # within 4 standard errors (std <= step / 2)
    again, _ = nvfp4.quantize_dequantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(1))
    assert torch.equal(again / 448, v)
    near = nvfp4.quantize(x)
    assert codes_of(near)[1:3] == [1, 1]  # nearest: 0.3 -> 0.5


def test_pack_layout_low_nibble_first():
    codes = torch.tensor([1, 2, 15, 8, 0, 7], dtype=torch.uint8)
    packed = nvfp4.pack(codes)
    assert packed.tolist() == [0x21, 0x8F, 0x70]
    assert torch.equal(nvfp4.unpack(packed), codes)
    with pytest.raises(ValueError, match="even"):
        nvfp4.pack(codes[:5])


def test_2d_blocks_quantize_w_and_w_transposed_identically():
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(2))
    a, b = nvfp4.quantize(w, "16x16"), nvfp4.quantize(w.T.contiguous(), "16x16")
    assert a.scales.shape == (3, 5) and a.codes.shape == (48, 40)
    assert torch.equal(nvfp4.dequantize(a).T, nvfp4.dequantize(b))
    rows = nvfp4.quantize(w, "1x16")
    assert rows.scales.shape == (48, 5)
    assert not torch.equal(nvfp4.dequantize(rows).T, nvfp4.dequantize(nvfp4.quantize(w.T.contiguous())))


def test_padding_and_quantize_dequantize_agree():
    x = torch.randn(3, 5, 37, generator=torch.Generator().manual_seed(3))
    for block in nvfp4.BLOCKS:
        t = nvfp4.quantize(x, block)
        d = nvfp4.dequantize(t, torch.float32)
        assert d.shape == x.shape and t.codes.shape[-1] == 24
        v, scale = nvfp4.quantize_dequantize(x, block)
        assert torch.equal(v * scale, d)
        assert torch.equal(v.bfloat16().float(), v)  # exact in bf16
        assert (d - x).norm() / x.norm() < 0.2


def test_hadamard16_matrix_and_invariance():
    eye = torch.eye(16)
    m = nvfp4.hadamard16(eye)  # row i: e_i times the matrix
    assert torch.equal(m[0], torch.full((16,), 0.25))
    assert m[3].tolist() == [-0.25, 0.25, 0.25, -0.25] * 4  # sign -1 times Sylvester row 3, (-1)^popcount(3 & j)
    assert torch.equal(m @ m.T, eye)  # orthonormal, exactly
    assert torch.equal(m.abs(), torch.full((16, 16), 0.25))
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(5, 64, generator=g), torch.randn(7, 64, generator=g)
    assert torch.allclose(nvfp4.hadamard16(a) @ nvfp4.hadamard16(b).T, a @ b.T, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 16"):
        nvfp4.hadamard16(torch.ones(3, 20))


def test_bad_arguments():
    with pytest.raises(ValueError, match="block"):
        nvfp4.quantize(torch.ones(16), block="2x8")
    with pytest.raises(ValueError, match="rounding"):
        nvfp4.quantize(torch.ones(16), rounding="up")
    with pytest.raises(TypeError, match="floating"):
        nvfp4.quantize(torch.ones(16, dtype=torch.int32))
    with pytest.raises(ValueError, match="16x16"):
        nvfp4.quantize(torch.ones(16), block="16x16")


def test_mxfp8_scales_and_elements():
    x = torch.zeros(96)
    x[0] = 448.0  # scale 2^0: biased 127
    x[32], x[33] = 449.0, 1.0  # 449 / 448 > 1: scale 2^1 (rounded up so nothing saturates); 1 / 2 = 0.5
    x[64:] = 0.0  # a zero block: the smallest scale
    t = mxfp8.quantize(x)
    assert t.scales.tolist() == [127, 128, 0]
    assert t.data.float()[[0, 32, 33]].tolist() == [448.0, 224.0, 0.5]  # 449 / 2 = 224.5 -> 224 (E4M3 step 16)
    d = mxfp8.dequantize(t)
    assert d[[0, 32, 33]].tolist() == [448.0, 448.0, 1.0] and torch.equal(d[64:], torch.zeros(32))
    y = torch.randn(4, 70, generator=torch.Generator().manual_seed(5))
    q = mxfp8.quantize_dequantize(y)
    assert q.shape == y.shape and torch.equal(q.bfloat16().float(), q)
    assert ((q - y).abs() <= y.abs() * 2**-4 + 1e-30).all()  # E4M3 keeps 3 mantissa bits: error <= 1/16


def test_compiled_kernels_give_the_same_bits():
    """The fused (torch.compile) path against the eager one, which the tests above pin down."""
    import shutil

    from hybridmoe.quant import kernels

    g = torch.Generator().manual_seed(6)
    for shape in ((64, 256), (19, 40), (3, 48)):
        x = torch.randn(shape, generator=g) * torch.logspace(-5, 2, shape[-1])
        for block in nvfp4.BLOCKS:
            for rounding in nvfp4.ROUNDINGS:
                want = nvfp4.quantize_dequantize(x, block, rounding, torch.Generator().manual_seed(7))
                got = nvfp4.fast_quantize_dequantize(x, block, rounding, torch.Generator().manual_seed(7))
                assert torch.equal(got[0].view(torch.int32), want[0].view(torch.int32)), (shape, block, rounding)
                assert torch.equal(got[1], want[1])
        assert torch.equal(mxfp8.fast_quantize_dequantize(x), mxfp8.quantize_dequantize(x))
    if kernels.mode() == "auto" and shutil.which("c++"):  # with a compiler, the compiled path really ran
        assert not kernels._BROKEN


def test_a_kernel_is_traced_once_for_shapes_that_differ_in_sizes_only(monkeypatch):
    """Dynamic shapes without duck shaping (`kernels._no_duck_shapes`): 16 blocks of 16 elements, then another
    number of blocks, a square tensor, then a tall one, all reuse the first graph (with duck shaping, each of those
    equalities became a guard and the next shape a recompile)."""
    import functools

    from hybridmoe.quant import kernels

    if kernels.mode() == "eager":
        pytest.skip("HYBRIDMOE_QUANT_KERNELS=eager")
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compile_counting = functools.cache(lambda fn, device_type: torch.compile(fn, dynamic=True, backend=counting))
    monkeypatch.setattr(kernels, "_compile", compile_counting)
    for shape in ((32, 256), (32, 512), (64, 64), (80, 48)):  # (one row of tiles, size 1, is a graph of its own)
        x = torch.randn(shape)
        got = nvfp4.fast_quantize_dequantize(x, "16x16")
        want = nvfp4.quantize_dequantize(x, "16x16")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(graphs) == 1


def test_grouped_quantizers_give_each_group_the_bits_of_its_own_call():
    """Segments of rows, segments of columns and stacks (the routed experts' operands) in one call: every group
    quantized as a tensor of its own, bitwise, stochastic rounding included where the draws concatenate."""
    g = torch.Generator().manual_seed(8)
    counts = [37, 0, 21, 16, 1, 50]  # an empty segment, a single row, segments of any length
    x = (torch.randn(sum(counts), 40, generator=g) * torch.logspace(-4, 2, 40)).bfloat16()
    x[37:58] *= 1000  # segment amaxes far apart: a shared amax would change the bits
    for rounding in nvfp4.ROUNDINGS:
        v, scales = nvfp4.quantize_dequantize_segments(x, counts, rounding, torch.Generator().manual_seed(9))
        one = torch.Generator().manual_seed(9)
        want = [nvfp4.quantize_dequantize(s, "1x16", rounding, one) for s in x.split(counts) if s.shape[0]]
        assert torch.equal(v.view(torch.int32), torch.cat([w for w, _ in want]).view(torch.int32)), rounding
        assert torch.equal(scales[[0, 2, 3, 4, 5]], torch.stack([s for _, s in want])) and scales[1] == 0
    cols = [48, 0, 16, 112]
    spread = torch.tensor([1.0, 1e-3, 1e3]).repeat_interleave(torch.tensor([48, 16, 112]))
    xt = torch.randn(24, sum(cols), generator=g) * spread
    v, scales = nvfp4.quantize_dequantize_column_segments(xt, cols)
    want = [nvfp4.quantize_dequantize(s.contiguous()) for s in xt.split(cols, 1) if s.shape[1]]
    assert torch.equal(v, torch.cat([w for w, _ in want], 1))
    assert torch.equal(scales[[0, 2, 3]], torch.stack([s for _, s in want]))
    w = torch.randn(3, 40, 24, generator=g) * torch.tensor([1.0, 1e-4, 1e4])[:, None, None]
    for block in nvfp4.BLOCKS:
        for rounding in nvfp4.ROUNDINGS:
            v, scales = nvfp4.quantize_dequantize_batched(w, block, rounding, torch.Generator().manual_seed(9))
            one = torch.Generator().manual_seed(9)
            want = [nvfp4.quantize_dequantize(t, block, rounding, one) for t in w]
            assert torch.equal(v, torch.stack([a for a, _ in want])), (block, rounding)
            assert torch.equal(scales, torch.stack([s for _, s in want])), (block, rounding)
    with pytest.raises(ValueError, match="sum\\(counts\\)"):
        nvfp4.quantize_dequantize_segments(x, [1, 2])
    with pytest.raises(ValueError, match="multiples of 16"):
        nvfp4.quantize_dequantize_column_segments(xt, [40, 136])


def test_mxfp8_rounding_in_arithmetic_equals_torch_float8_conversion():
    """The compiled MXFP8 kernel rounds to E4M3 in fp32 arithmetic (`mxfp8.round_e4m3`): against torch's own
    float8_e4m3fn conversion on every E4M3 value, every midpoint and its fp32 neighbours (ties to even), subnormals
    and random magnitudes; and the whole fast path against the eager one on bf16 and transposed inputs."""
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3 = e4m3[torch.isfinite(e4m3)].sort().values
    mids = (e4m3[1:] + e4m3[:-1]) / 2
    g = torch.Generator().manual_seed(10)
    spread = torch.randn(20000, generator=g) * torch.logspace(-45, 2.6, 20000)
    y = torch.cat([e4m3, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), spread])
    y = y[y.abs() <= 448]
    assert torch.equal(mxfp8.round_e4m3(y).view(torch.int32), y.to(torch.float8_e4m3fn).float().view(torch.int32))
    x = torch.randn(37, 70, generator=g) * torch.logspace(-30, 30, 70)
    for xx in (x, x.bfloat16(), x.T):
        assert torch.equal(mxfp8.fast_quantize_dequantize(xx).view(torch.int32),
                           mxfp8.quantize_dequantize(xx).view(torch.int32))  # fmt: skip
