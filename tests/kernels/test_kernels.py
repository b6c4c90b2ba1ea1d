"""Every fast kernel in `hybridmoe.kernels` against its plain reference twin: outputs and gradients.

Sizes are tiny on purpose (the suite runs on a 2-core CPU). Comparisons use explicit tolerances scaled by the
magnitude of the expected tensor: `max|actual - expected| <= tol * (1 + max|expected|)`.

Note on dtypes: the SSD and conv kernels compute in fp32 whatever the input dtype (their docstrings say so), so
float64 inputs are checked against a float64 oracle at fp32 precision, and bf16 inputs (widened exactly) give fp32
outputs; the gradients flowing back to bf16 inputs are rounded to bf16, hence the looser tolerance there.
"""

from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridmoe.kernels import linear as linear_mod
from hybridmoe.kernels import loss as loss_mod
from hybridmoe.kernels.activations import relu_squared, relu_squared_backward, relu_squared_reference
from hybridmoe.kernels.attention import attention, attention_after_prefix, attention_reference
from hybridmoe.kernels.loss import (
    IGNORE_INDEX,
    default_chunk_size,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from hybridmoe.kernels.moe import ACTIVATIONS, clamped_swiglu, experts_backend, experts_grouped, experts_reference
from hybridmoe.kernels.ssd import (
    causal_conv1d,
    causal_conv1d_reference,
    causal_conv1d_step,
    ssd_chunked,
    ssd_dt,
    ssd_reference,
    ssd_step,
)

HYP = settings(max_examples=20, deadline=None, derandomize=True)


# ---------------------------------------------------------------------------------------------- helpers


def _triton_version() -> tuple[int, int] | None:
    try:
        return tuple(int(part) for part in importlib.metadata.version("triton").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


# Triton 3.6's interpreter (the one torch 2.11 pins) was seen failing on kernels whose loops have a runtime bound,
# ours and mamba-ssm's alike ("only 0-dimensional arrays can be converted to Python scalars", numpy 2.4); 3.7.1 and
# later run them. The compiled kernels are not concerned.
interpreter_loops_work = pytest.mark.skipif(
    (_triton_version() or (3, 7)) < (3, 7), reason="Triton's interpreter before 3.7 fails on loops with runtime bounds"
)


def assert_close_scaled(actual, expected, tol, name="tensor"):
    """max|actual - expected| <= tol * (1 + max|expected|), and actual is finite."""
    assert actual is not None, f"{name}: no value (missing gradient?)"
    assert expected is not None, f"{name}: no expected value"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    assert torch.isfinite(e).all(), f"{name}: non-finite expected values"
    if a.numel() == 0:
        return
    err = (a - e).abs().max().item()
    scale = 1.0 + e.abs().max().item()
    assert err <= tol * scale, f"{name}: max abs error {err:.3e} > {tol:.1e} * {scale:.3e}"


def grads_of(outputs, cotangents, inputs):
    """Gradients of sum(output * cotangent) w.r.t. inputs (all must require grad)."""
    loss = sum((o.float() * c).sum() for o, c in zip(outputs, cotangents))
    return torch.autograd.grad(loss, inputs)


def make_gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def seq_idx_from_boundaries(t, boundaries):
    """Document ids (t,) for documents starting at each position in `boundaries` (position 0 always starts one)."""
    ids = torch.zeros(t, dtype=torch.long)
    for pos in boundaries:
        ids[pos:] += 1
    return ids


# ---------------------------------------------------------------------------------------------- SSD


def make_ssd_inputs(gen, b, t, h, p, g, n, dtype=torch.float32, with_D=True, with_state=True):
    """Returns a dict of leaf tensors (requires_grad) in `dtype`; D and initial_state may be None."""
    x = torch.randn(b, t, h, p, generator=gen)
    dt = F.softplus(torch.randn(b, t, h, generator=gen) - 0.5)
    A = -(0.05 + 1.5 * torch.rand(h, generator=gen))
    B = torch.randn(b, t, g, n, generator=gen)
    C = torch.randn(b, t, g, n, generator=gen)
    D = torch.randn(h, generator=gen) if with_D else None
    s0 = torch.randn(b, h, p, n, generator=gen) if with_state else None
    out = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "initial_state": s0}
    return {k: (v.to(dtype).requires_grad_() if v is not None else None) for k, v in out.items()}


def ssd_oracle_f64(x, dt, A, B, C, D=None, initial_state=None, seq_idx=None):
    """The recurrence of the docstring written independently in float64 (no einsum, explicit reset)."""
    x, dt, A, B, C = (v.detach().double() for v in (x, dt, A, B, C))
    b, t, h, p = x.shape
    rep = h // B.shape[2]
    n = B.shape[3]
    state = initial_state.detach().double().clone() if initial_state is not None else torch.zeros(b, h, p, n).double()
    ys = torch.zeros(b, t, h, p, dtype=torch.float64)
    for bi in range(b):
        for i in range(t):
            if seq_idx is not None and i > 0 and seq_idx[bi, i] != seq_idx[bi, i - 1]:
                state[bi] = 0.0
            for hi in range(h):
                gi = hi // rep
                a = math.exp(float(dt[bi, i, hi] * A[hi]))
                state[bi, hi] = a * state[bi, hi] + dt[bi, i, hi] * torch.outer(x[bi, i, hi], B[bi, i, gi])
                ys[bi, i, hi] = state[bi, hi] @ C[bi, i, gi]
                if D is not None:
                    ys[bi, i, hi] += float(D[hi].detach()) * x[bi, i, hi]
    return ys, state


SSD_ARGS = ("x", "dt", "A", "B", "C", "D", "initial_state")


def check_ssd_against_reference(ins, chunk_size, seq_idx, out_tol, grad_tol, gen):
    # The reference runs on fp32 copies of the (exactly widened) inputs: for bf16 inputs its own gradient of D
    # would otherwise be accumulated in bf16, one rounding per token (it calls D.float() inside its loop).
    ref_ins = {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in ins.items()}
    ref_y, ref_s = ssd_reference(**ref_ins, seq_idx=seq_idx)
    y, s = ssd_chunked(**ins, chunk_size=chunk_size, seq_idx=seq_idx)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert_close_scaled(y, ref_y, out_tol, "y")
    assert_close_scaled(s, ref_s, out_tol, "final_state")
    names = [k for k in SSD_ARGS if ins[k] is not None]
    leaves = [ins[k] for k in names]
    cot = [torch.randn(ref_y.shape, generator=gen), torch.randn(ref_s.shape, generator=gen)]
    g_ref = grads_of([ref_y, ref_s], cot, [ref_ins[k] for k in names])
    g_fast = grads_of([y, s], cot, leaves)
    for name, gf, gr in zip(names, g_fast, g_ref):
        assert gf.dtype == ins[name].dtype
        assert_close_scaled(gf, gr, grad_tol, f"grad {name}")


TOLS = {  # dtype -> (output tol, gradient tol)
    torch.float64: (2e-5, 2e-5),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (1e-4, 2e-2),
}


@st.composite
def ssd_cases(draw):
    b = draw(st.integers(1, 2))
    h = draw(st.sampled_from([2, 4]))
    g = draw(st.sampled_from([d for d in (1, 2, 4) if h % d == 0]))
    p = draw(st.sampled_from([4, 8]))
    n = draw(st.sampled_from([4, 8, 16]))
    t = draw(st.integers(1, 50))
    chunk = draw(st.sampled_from([4, 8, 16, 64]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    with_D = draw(st.booleans())
    with_state = draw(st.booleans())
    seq_idx = None
    if draw(st.booleans()) and t > 1:
        rows = []
        for _ in range(b):
            cuts = draw(st.sets(st.integers(1, t - 1), max_size=5))
            if draw(st.booleans()):  # also cut exactly at every chunk boundary
                cuts |= set(range(chunk, t, chunk))
            rows.append(seq_idx_from_boundaries(t, cuts))
        seq_idx = torch.stack(rows)
    seed = draw(st.integers(0, 2**31 - 1))
    return b, t, h, p, g, n, chunk, dtype, with_D, with_state, seq_idx, seed


@HYP
@given(ssd_cases())
def test_ssd_chunked_matches_reference_property(case):
    b, t, h, p, g, n, chunk, dtype, with_D, with_state, seq_idx, seed = case
    gen = make_gen(seed)
    ins = make_ssd_inputs(gen, b, t, h, p, g, n, dtype, with_D, with_state)
    out_tol, grad_tol = TOLS[dtype]
    check_ssd_against_reference(ins, chunk, seq_idx, out_tol, grad_tol, gen)


# Explicit packed layouts (t = 20 unless said): boundaries inside chunks, exactly on chunk boundaries,
# single-token documents, a row holding a single document, and a boundary at the last token.
PACKINGS = {
    "inside_chunks": [[0] * 3 + [1] * 6 + [2] * 11, [0] * 10 + [1] * 10],
    "at_chunk_boundaries": [[0] * 4 + [1] * 4 + [2] * 8 + [3] * 4, [0] * 8 + [1] * 12],
    "single_doc_row": [[0] * 20, [5] * 5 + [6] * 1 + [7] * 14],
    "one_token_docs": [[0, 1, 2, 3, 4] + [5] * 14 + [6], list(range(20))],
    "nonzero_start_ids": [[7] * 9 + [8] * 11, [3] * 4 + [9] * 16],
}


@pytest.mark.parametrize("packing", sorted(PACKINGS))
@pytest.mark.parametrize("chunk", [4, 8, 16])
@pytest.mark.parametrize("with_state", [False, True])
def test_ssd_chunked_packed_layouts(packing, chunk, with_state):
    seq_idx = torch.tensor(PACKINGS[packing])
    gen = make_gen(1000 + chunk)
    ins = make_ssd_inputs(gen, 2, seq_idx.shape[1], 4, 4, 2, 8, with_state=with_state)
    check_ssd_against_reference(ins, chunk, seq_idx, 2e-5, 2e-5, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    ("b", "t", "h", "p", "g", "n", "chunk"),
    [
        (1, 1, 2, 4, 1, 4, 4),  # a single token
        (2, 13, 4, 4, 2, 8, 4),  # t not divisible by the chunk size
        (1, 16, 2, 8, 2, 4, 8),  # t divisible, one group per head
        (2, 37, 4, 4, 1, 16, 16),
        (1, 70, 4, 4, 4, 8, 64),  # two chunks of 64, the second mostly padding
        (1, 9, 2, 4, 1, 4, 64),  # shorter than one chunk
    ],
)
def test_ssd_chunked_shapes_and_dtypes(dtype, b, t, h, p, g, n, chunk):
    gen = make_gen(b * 1000 + t)
    ins = make_ssd_inputs(gen, b, t, h, p, g, n, dtype)
    out_tol, grad_tol = TOLS[dtype]
    check_ssd_against_reference(ins, chunk, None, out_tol, grad_tol, gen)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ssd_reference_and_chunked_match_float64_oracle(packed, dtype):
    gen = make_gen(7)
    t = 19
    ins = make_ssd_inputs(gen, 2, t, 4, 4, 2, 4, dtype)
    seq_idx = torch.tensor([[0] * 5 + [1] * 8 + [2] * 6, [0] * 19]) if packed else None
    want_y, want_s = ssd_oracle_f64(**ins, seq_idx=seq_idx)
    ref_y, ref_s = ssd_reference(**ins, seq_idx=seq_idx)
    y, s = ssd_chunked(**ins, chunk_size=8, seq_idx=seq_idx)
    for name, got, want in [
        ("ref y", ref_y, want_y),
        ("ref state", ref_s, want_s),
        ("y", y, want_y),
        ("state", s, want_s),
    ]:
        assert got.dtype == torch.float32
        assert_close_scaled(got, want, 1e-5, name)


def test_ssd_seq_idx_resets_state():
    """Sanity of the oracle semantics the other tests rely on: a new document ignores everything before it."""
    gen = make_gen(3)
    ins = make_ssd_inputs(gen, 1, 12, 2, 4, 1, 4)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    y_packed, _ = ssd_chunked(**ins, chunk_size=4, seq_idx=seq_idx)
    y_full, _ = ssd_chunked(**ins, chunk_size=4)
    # The packed output of the second document differs from the unpacked one (state was dropped) ...
    assert (y_packed[:, 5:] - y_full[:, 5:]).abs().max() > 1e-3
    # ... and equals a fresh run over that document alone.
    sub = {k: (v[:, 5:] if k not in ("A", "D", "initial_state") else v) for k, v in ins.items()}
    sub["initial_state"] = None
    y_alone, _ = ssd_chunked(**sub, chunk_size=4)
    assert_close_scaled(y_packed[:, 5:], y_alone, 2e-5, "second document")


@pytest.mark.parametrize(("g", "with_D", "with_state"), [(1, True, True), (2, False, True), (2, True, False)])
def test_ssd_step_token_by_token_matches_reference(g, with_D, with_state):
    gen = make_gen(11)
    b, t, h, p, n = 2, 11, 4, 4, 8
    ins = make_ssd_inputs(gen, b, t, h, p, g, n, with_D=with_D, with_state=with_state)
    ins = {k: (v.detach() if v is not None else None) for k, v in ins.items()}
    ref_y, ref_s = ssd_reference(**ins)
    state = ins["initial_state"].clone() if with_state else torch.zeros(b, h, p, n)
    ys = []
    for i in range(t):
        y = ssd_step(state, ins["x"][:, i], ins["dt"][:, i], ins["A"], ins["B"][:, i], ins["C"][:, i], ins["D"])
        assert y.dtype == torch.float32
        ys.append(y)
    assert_close_scaled(torch.stack(ys, dim=1), ref_y, 1e-5, "step outputs")
    assert_close_scaled(state, ref_s, 1e-5, "step state")
    # Prefill with the chunked scan, then decode with ssd_step: same as the reference over the whole sequence.
    split = 6
    pre = {k: (v[:, :split] if k not in ("A", "D", "initial_state") else v) for k, v in ins.items()}
    y_pre, state = ssd_chunked(**pre, chunk_size=4)
    tail = [
        ssd_step(state, ins["x"][:, i], ins["dt"][:, i], ins["A"], ins["B"][:, i], ins["C"][:, i], ins["D"])
        for i in range(split, t)
    ]
    assert_close_scaled(torch.cat([y_pre, torch.stack(tail, dim=1)], dim=1), ref_y, 2e-5, "prefill + decode")
    assert_close_scaled(state, ref_s, 2e-5, "prefill + decode state")


DT_LIMITS = {"none": (0.0, math.inf), "finite": (0.05, 0.5)}


def make_raw_dt(gen, b, t, h):
    """dt before dt_bias and softplus, as in_proj leaves it, with dt_bias (h,): one value above softplus's
    threshold of 20 (where it is the identity), the rest spread over both sides of a finite limit."""
    dt = 2.0 * torch.randn(b, t, h, generator=gen)
    dt[0, 1, 0] = 25.0
    dt_bias = torch.randn(h, generator=gen) - 1.0
    return dt.requires_grad_(), dt_bias.requires_grad_()


@pytest.mark.parametrize("limit", sorted(DT_LIMITS))
@pytest.mark.parametrize("packed", [False, True])
def test_ssd_time_step_as_the_reference_kernels(limit, packed):
    """dt_bias, dt_softplus and dt_limit as state-spaces/mamba's `mamba_chunk_scan_combined` takes them: both twins
    equal the float64 oracle run on clamp(softplus(dt + dt_bias), dt_limit), their gradients agree, and the
    gradient of dt (and so of dt_bias) is 0 wherever the clamp holds dt at a bound."""
    gen = make_gen(21)
    b, t, h = 2, 19, 4
    ins = make_ssd_inputs(gen, b, t, h, 4, 2, 4)
    ins["dt"], dt_bias = make_raw_dt(gen, b, t, h)
    kw = dict(dt_bias=dt_bias, dt_softplus=True, dt_limit=DT_LIMITS[limit])
    seq_idx = torch.tensor([[0] * 5 + [1] * 8 + [2] * 6, [0] * 19]) if packed else None
    low, high = DT_LIMITS[limit]
    softplus64 = F.softplus(ins["dt"].detach().double() + dt_bias.detach().double())
    assert softplus64.max() > 20.0
    clamped = (softplus64 < low) | (softplus64 > high)
    assert clamped.any() == (limit == "finite")
    dt64 = softplus64.clamp(low, high)
    want_y, want_s = ssd_oracle_f64(**(ins | {"dt": dt64}), seq_idx=seq_idx)
    ref_y, ref_s = ssd_reference(**ins, seq_idx=seq_idx, **kw)
    y, s = ssd_chunked(**ins, chunk_size=8, seq_idx=seq_idx, **kw)
    for name, got, want in [
        ("ref y", ref_y, want_y),
        ("ref state", ref_s, want_s),
        ("y", y, want_y),
        ("state", s, want_s),
    ]:
        assert_close_scaled(got, want, 1e-5, name)
    names = [k for k in SSD_ARGS if ins[k] is not None]
    leaves = [ins[k] for k in names] + [dt_bias]
    cot = [torch.randn(y.shape, generator=gen), torch.randn(s.shape, generator=gen)]
    g_ref = grads_of([ref_y, ref_s], cot, leaves)
    g_fast = grads_of([y, s], cot, leaves)
    for name, gf, gr in zip(names + ["dt_bias"], g_fast, g_ref):
        assert_close_scaled(gf, gr, 2e-5, f"grad {name}")
    for g in (g_fast[names.index("dt")], g_ref[names.index("dt")]):
        assert (g[clamped] == 0).all() and (g[~clamped] != 0).all()


@pytest.mark.parametrize("limit", sorted(DT_LIMITS))
def test_ssd_step_clamps_dt_like_the_scan(limit):
    """Prefill with the chunked scan, decode with ssd_step, the time step given raw: the whole sequence equals
    the reference scan (a decode continues exactly the scan of a full forward, clamp included)."""
    gen = make_gen(22)
    b, t, h, p, n, split = 2, 11, 4, 4, 8, 6
    ins = {k: (v.detach() if v is not None else None) for k, v in make_ssd_inputs(gen, b, t, h, p, 2, n).items()}
    dt, dt_bias = (v.detach() for v in make_raw_dt(gen, b, t, h))
    kw = dict(dt_bias=dt_bias, dt_softplus=True, dt_limit=DT_LIMITS[limit])
    ref_y, ref_s = ssd_reference(**(ins | {"dt": dt}), **kw)
    pre = {k: (v[:, :split] if k not in ("A", "D", "initial_state") else v) for k, v in (ins | {"dt": dt}).items()}
    y_pre, state = ssd_chunked(**pre, chunk_size=4, **kw)
    tail = [
        ssd_step(state, ins["x"][:, i], dt[:, i], ins["A"], ins["B"][:, i], ins["C"][:, i], ins["D"], **kw)
        for i in range(split, t)
    ]
    assert_close_scaled(torch.cat([y_pre, torch.stack(tail, dim=1)], dim=1), ref_y, 2e-5, "prefill + decode")
    assert_close_scaled(state, ref_s, 2e-5, "prefill + decode state")


def test_ssd_dt_defaults_take_dt_as_given_and_bad_limits_are_errors():
    dt = torch.tensor([[0.0, 1e-3, 0.5, 30.0]])
    assert torch.equal(ssd_dt(dt), dt)
    assert torch.equal(ssd_dt(dt, dt_limit=(1e-2, 1.0)), torch.tensor([[1e-2, 1e-2, 0.5, 1.0]]))
    assert ssd_dt(dt, dt_softplus=True)[0, 3] == 30.0  # softplus is the identity above 20, as in the kernel
    gen = make_gen(0)
    ins = make_ssd_inputs(gen, 1, 5, 4, 4, 2, 4, with_state=False)
    for bad in [(0.5, 0.1), (-1.0, 1.0)]:
        with pytest.raises(ValueError, match="dt_limit"):
            ssd_chunked(**ins, chunk_size=4, dt_limit=bad)
        with pytest.raises(ValueError, match="dt_limit"):
            ssd_reference(**ins, dt_limit=bad)
        with pytest.raises(ValueError, match="dt_limit"):
            ssd_step(
                torch.zeros(1, 4, 4, 4),
                ins["x"][:, 0],
                ins["dt"][:, 0],
                ins["A"],
                ins["B"][:, 0],
                ins["C"][:, 0],
                dt_limit=bad,
            )
    with pytest.raises(ValueError, match="dt_bias"):
        ssd_chunked(**ins, chunk_size=4, dt_bias=torch.zeros(3))


@st.composite
def packing_cases(draw):
    lengths = draw(st.lists(st.integers(1, 18), min_size=1, max_size=5))
    h = draw(st.sampled_from([2, 4]))
    g = draw(st.sampled_from([1, 2]))
    chunk = draw(st.sampled_from([4, 8, 16, 64]))
    with_state = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return lengths, h, g, chunk, with_state, seed


@HYP
@given(packing_cases())
def test_ssd_packed_documents_equal_separate_runs(case):
    lengths, h, g, chunk, with_state, seed = case
    gen = make_gen(seed)
    t = sum(lengths)
    ins = make_ssd_inputs(gen, 1, t, h, 4, g, 4, with_state=with_state)
    ins = {k: (v.detach() if v is not None else None) for k, v in ins.items()}
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    y_packed, s_packed = ssd_chunked(**ins, chunk_size=chunk, seq_idx=seq_idx)
    y_ref_packed, s_ref_packed = ssd_reference(**ins, seq_idx=seq_idx)
    start = 0
    for j, length in enumerate(lengths):
        doc = {k: (v[:, start : start + length] if k not in ("A", "D", "initial_state") else v) for k, v in ins.items()}
        if j > 0:
            doc["initial_state"] = None  # the initial state belongs to the first document only
        y_doc, s_doc = ssd_reference(**doc)
        y_doc_fast, _ = ssd_chunked(**doc, chunk_size=chunk)
        assert_close_scaled(y_packed[:, start : start + length], y_doc, 2e-5, f"doc {j} (chunked, packed)")
        assert_close_scaled(y_ref_packed[:, start : start + length], y_doc, 2e-5, f"doc {j} (reference, packed)")
        assert_close_scaled(y_doc_fast, y_doc, 2e-5, f"doc {j} (chunked, alone)")
        start += length
    assert_close_scaled(s_packed, s_doc, 2e-5, "final state = last document's")
    assert_close_scaled(s_ref_packed, s_doc, 2e-5, "reference final state = last document's")


@pytest.mark.parametrize("packed", [False, True])
def test_ssd_chunked_under_autocast_stays_fp32(packed):
    """Inside a bf16 autocast region (the trainer's autocast-bf16 precision) the scan still computes in fp32:
    its outputs and gradients equal the fp32 reference."""
    gen = make_gen(5)
    ins = make_ssd_inputs(gen, 2, 37, 4, 8, 2, 8)
    seq_idx = torch.stack([seq_idx_from_boundaries(37, [5, 20]), seq_idx_from_boundaries(37, [])]) if packed else None
    ref_y, ref_s = ssd_reference(**ins, seq_idx=seq_idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = ssd_chunked(**ins, chunk_size=8, seq_idx=seq_idx)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert_close_scaled(y, ref_y, 2e-5, "y")
    assert_close_scaled(s, ref_s, 2e-5, "final_state")
    leaves = [ins[k] for k in SSD_ARGS]
    cot = [torch.randn(ref_y.shape, generator=gen), torch.randn(ref_s.shape, generator=gen)]
    for name, gf, gr in zip(SSD_ARGS, grads_of([y, s], cot, leaves), grads_of([ref_y, ref_s], cot, leaves)):
        assert_close_scaled(gf, gr, 2e-5, f"grad {name}")


def test_ssd_rejects_bad_shapes():
    gen = make_gen(0)
    ins = make_ssd_inputs(gen, 1, 5, 4, 4, 3, 4, with_state=False)  # 3 groups do not divide 4 heads
    with pytest.raises(ValueError):
        ssd_chunked(**ins, chunk_size=4)
    ins = make_ssd_inputs(gen, 1, 5, 4, 4, 2, 4, with_state=False)
    with pytest.raises(ValueError):
        ssd_chunked(**ins, chunk_size=4, seq_idx=torch.zeros(1, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- causal conv1d


CONV_SEQ_IDX = [[0] * 3 + [1] + [2] * 9 + [3] * 6, [0] * 19]  # a 1-token document, shorter than the kernel


def make_conv_inputs(gen, b, t, d, k, dtype, with_bias, with_state):
    x = torch.randn(b, t, d, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(d, k, generator=gen) / math.sqrt(k)).to(dtype).requires_grad_()
    bias = torch.randn(d, generator=gen).to(dtype).requires_grad_() if with_bias else None
    s0 = torch.randn(b, k - 1, d, generator=gen).to(dtype).requires_grad_() if with_state else None
    return x, w, bias, s0


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d_matches_reference(k, with_bias, packed, with_state, dtype):
    gen = make_gen(17 * k)
    b, t, d = 2, 19, 6
    x, w, bias, s0 = make_conv_inputs(gen, b, t, d, k, dtype, with_bias, with_state)
    seq_idx = torch.tensor(CONV_SEQ_IDX) if packed else None
    ref = causal_conv1d_reference(x, w, bias, seq_idx=seq_idx, initial_state=s0)
    out = causal_conv1d(x, w, bias, seq_idx=seq_idx, initial_state=s0)
    assert out.dtype == torch.float32 and out.shape == (b, t, d)
    assert_close_scaled(out, ref, 1e-5, "conv output")
    leaves = [v for v in (x, w, bias, s0) if v is not None]
    names = [n for n, v in zip(("x", "weight", "bias", "initial_state"), (x, w, bias, s0)) if v is not None]
    cot = [torch.randn(ref.shape, generator=gen)]
    g_ref = grads_of([ref], cot, leaves)
    g_fast = grads_of([out], cot, leaves)
    grad_tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, gf, gr in zip(names, g_fast, g_ref):
        assert_close_scaled(gf, gr, grad_tol, f"grad {name}")


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_causal_conv1d_packed_equals_separate_documents(k, with_state):
    gen = make_gen(5 + k)
    lengths = [1, 3, 7, 2]
    t = sum(lengths)
    x, w, bias, s0 = make_conv_inputs(gen, 1, t, 5, k, torch.float32, True, with_state)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    packed = causal_conv1d(x, w, bias, seq_idx=seq_idx, initial_state=s0)
    start = 0
    for j, length in enumerate(lengths):
        alone = causal_conv1d_reference(x[:, start : start + length], w, bias, initial_state=s0 if j == 0 else None)
        assert_close_scaled(packed[:, start : start + length], alone, 1e-5, f"doc {j}")
        start += length


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_causal_conv1d_step_token_by_token(k, with_bias, with_state):
    gen = make_gen(23 + k)
    b, t, d = 2, 9, 5
    x, w, bias, s0 = (
        v.detach() if v is not None else None
        for v in make_conv_inputs(gen, b, t, d, k, torch.float32, with_bias, with_state)
    )
    full = causal_conv1d(x, w, bias, initial_state=s0)
    conv_state = s0.clone() if with_state else torch.zeros(b, k - 1, d)
    outs = [causal_conv1d_step(conv_state, x[:, i], w, bias) for i in range(t)]
    assert_close_scaled(torch.stack(outs, dim=1), full, 1e-5, "step outputs")
    # The state holds the last k-1 inputs.
    torch.testing.assert_close(conv_state, x[:, t - (k - 1) :], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- MoE experts


def make_moe_inputs(gen, t, e, k, d, i, empty=(), dtype=torch.float32):
    x = torch.randn(t, d, generator=gen)
    w_up = torch.randn(e, i, d, generator=gen) / math.sqrt(d)
    w_down = torch.randn(e, d, i, generator=gen) / math.sqrt(i)
    scores = torch.randn(t, e, generator=gen)
    if empty:
        scores[:, list(empty)] = -math.inf
    topk_idx = scores.topk(k, dim=-1).indices
    topk_w = torch.rand(t, k, generator=gen) + 0.1
    leaves = [v.to(dtype).requires_grad_() for v in (x, w_up, w_down, topk_w)]
    return leaves[0], leaves[1], leaves[2], topk_idx, leaves[3]


MOE_CASES = [  # (tokens, experts, top-k, width d, hidden i, experts forced to receive no token)
    (1, 4, 1, 8, 16, ()),
    (5, 8, 2, 8, 12, (0, 7)),
    (16, 4, 2, 16, 8, ()),
    (7, 6, 3, 4, 8, (2,)),
    (24, 8, 4, 8, 16, (3, 4)),
    (3, 16, 2, 4, 4, ()),  # most experts idle
]


def check_moe(x, w_up, w_down, topk_idx, topk_w, ref_inputs, out_tol, grad_tol, empty, gen, backend=None):
    ref = experts_reference(ref_inputs[0], ref_inputs[1], ref_inputs[2], topk_idx, ref_inputs[3])
    out = experts_grouped(x, w_up, w_down, topk_idx, topk_w, backend=backend)
    assert out.dtype == x.dtype
    assert_close_scaled(out, ref, out_tol, "experts output")
    cot = [torch.randn(ref.shape, generator=gen)]
    g_ref = grads_of([ref], cot, list(ref_inputs))
    g_fast = grads_of([out], cot, [x, w_up, w_down, topk_w])
    for name, gf, gr, leaf in zip(("x", "w_up", "w_down", "topk_w"), g_fast, g_ref, (x, w_up, w_down, topk_w)):
        assert gf.dtype == leaf.dtype
        assert_close_scaled(gf, gr, grad_tol, f"grad {name}")
    counts = torch.bincount(topk_idx.reshape(-1), minlength=w_up.shape[0])
    assert all(counts[e_] == 0 for e_ in empty)
    idle = counts == 0
    if idle.any():  # experts without tokens get exactly zero gradient
        assert g_fast[1][idle].abs().max() == 0 and g_fast[2][idle].abs().max() == 0


@pytest.mark.parametrize(("t", "e", "k", "d", "i", "empty"), MOE_CASES)
def test_experts_grouped_matches_reference_fp32(t, e, k, d, i, empty):
    gen = make_gen(t * 100 + e)
    x, w_up, w_down, topk_idx, topk_w = make_moe_inputs(gen, t, e, k, d, i, empty)
    assert experts_backend(x) == "segments"
    check_moe(x, w_up, w_down, topk_idx, topk_w, (x, w_up, w_down, topk_w), 1e-5, 1e-5, empty, gen)


@pytest.mark.parametrize(("t", "e", "k", "d", "i", "empty"), MOE_CASES)
def test_experts_grouped_mm_backend_matches_reference_fp32(t, e, k, d, i, empty):
    """The loop-free path a GPU takes (torch._grouped_mm, counts by scatter-add, the combine's backward in one
    block), forced on this CPU, where torch runs _grouped_mm too."""
    gen = make_gen(t * 100 + e + 5)
    x, w_up, w_down, topk_idx, topk_w = make_moe_inputs(gen, t, e, k, d, i, empty)
    check_moe(x, w_up, w_down, topk_idx, topk_w, (x, w_up, w_down, topk_w), 1e-5, 1e-5, empty, gen, "grouped_mm")


def test_experts_grouped_mm_backend_has_no_loop_over_experts_or_blocks(monkeypatch):
    """On the grouped_mm path nothing walks experts or row blocks on the host: no per-segment kernel, no counts read
    back, the combine's backward in one block whatever COMBINE_BLOCK_ROWS says."""
    from hybridmoe.kernels import moe

    def forbidden(*args, **kwargs):
        raise AssertionError("the segments path ran")

    monkeypatch.setattr(moe._SegmentExperts, "apply", forbidden)
    monkeypatch.setattr(moe, "COMBINE_BLOCK_ROWS", 5)
    monkeypatch.setattr(torch, "bincount", forbidden)
    index_selects = []
    real_index_select = torch.Tensor.index_select
    monkeypatch.setattr(
        torch.Tensor, "index_select", lambda *a, **kw: index_selects.append(1) or real_index_select(*a, **kw)
    )
    gen = make_gen(9)
    x, w_up, w_down, topk_idx, topk_w = make_moe_inputs(gen, 24, 8, 4, 8, 16, ())
    out = experts_grouped(x, w_up, w_down, topk_idx, topk_w, backend="grouped_mm")
    before = len(index_selects)
    out.sum().backward()
    assert len(index_selects) - before == 1  # the combine's backward gathers all 96 copies at once


def test_experts_reject_unknown_backend_and_unaligned_grouped_mm():
    gen = make_gen(10)
    x, w_up, w_down, topk_idx, topk_w = make_moe_inputs(gen, 4, 4, 2, 8, 6)
    with pytest.raises(ValueError, match="unknown backend"):
        experts_grouped(x, w_up, w_down, topk_idx, topk_w, backend="triton")
    with pytest.raises(ValueError, match="multiples of 16 bytes"):  # i = 6 fp32 values: 24-byte rows
        experts_grouped(x, w_up, w_down, topk_idx, topk_w, backend="grouped_mm")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_experts_and_loss_never_wait_for_the_gpu():
    """The loop-free experts (bf16, grouped_mm) and the fused loss run forward and backward with CUDA's sync
    debug mode set to raise on any host-device synchronization."""
    gen = make_gen(13)
    x, w_up, w_down, topk_idx, topk_w = make_moe_inputs(gen, 64, 8, 2, 64, 32, (), dtype=torch.bfloat16)
    leaves = [v.detach().cuda().requires_grad_() for v in (x, w_up, w_down, topk_w)]
    idx = topk_idx.cuda()
    hidden = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 512, (64,), device="cuda")
    labels[::7] = IGNORE_INDEX
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = experts_grouped(leaves[0], leaves[1], leaves[2], idx, leaves[3], backend="grouped_mm")
        loss = linear_cross_entropy(hidden, weight, labels, logits_dtype=torch.bfloat16)
        (out.float().square().sum() + loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = experts_reference(*(v.detach().float() for v in leaves[:3]), idx, leaves[3].detach().float())
    assert_close_scaled(out.float(), ref, 2e-2, "experts output on CUDA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_combine_backward_in_row_blocks_is_exact(monkeypatch, dtype):
    """The combine's backward makes its fp32 temporaries a block of token copies at a time: any block size gives
    the same gradients, bit for bit."""
    from hybridmoe.kernels import moe

    gen = make_gen(7)
    x, w_up, w_down, topk_idx, topk_w = make_moe_inputs(gen, 24, 8, 4, 8, 16, ())
    leaves = [x.to(dtype), w_up.to(dtype), w_down.to(dtype), topk_w]
    cot = [torch.randn(24, 8, generator=gen)]

    def grads():
        inputs = [t.detach().requires_grad_() for t in leaves]
        out = experts_grouped(inputs[0], inputs[1], inputs[2], topk_idx, inputs[3])
        return grads_of([out.float()], cot, inputs)

    whole = grads()  # 96 copies: one block
    monkeypatch.setattr(moe, "COMBINE_BLOCK_ROWS", 5)
    for name, a, b in zip(("x", "w_up", "w_down", "topk_w"), whole, grads()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("widen", [True, False])
@pytest.mark.parametrize(("t", "e", "k", "d", "i", "empty"), MOE_CASES[1:4])
def test_experts_grouped_bf16_against_fp32_reference(monkeypatch, widen, t, e, k, d, i, empty):
    monkeypatch.setattr(linear_mod, "_WIDEN", widen)  # both the fp32-widened and the native bf16 matmuls
    gen = make_gen(t * 100 + e + 1)
    x, w_up, w_down, topk_idx, topk_w = make_moe_inputs(gen, t, e, k, d, i, empty, dtype=torch.bfloat16)
    ref_inputs = tuple(v.detach().float().requires_grad_() for v in (x, w_up, w_down, topk_w))
    check_moe(x, w_up, w_down, topk_idx, topk_w, ref_inputs, 2e-2, 3e-2, empty, gen)


# Gated activations with a fused gate_up weight (e, 2i, d), optionally with biases (GPT-OSS). In fp32, limit=0.75
# makes the clamps of clamped_swiglu bite on a good share of the entries, so their gradient masks are exercised too.
# In bf16 the saved pre-activations are rounded, which moves entries near a clamp bound across it (a gradient of 0
# against one of O(1)), so the bf16 check uses GPT-OSS's own limit of 7, where the clamps almost never bite.
GATED = {
    "silu_gated": ("silu_gated", False),
    "clamped_swiglu_biases": (clamped_swiglu(alpha=1.702, limit=0.75), True),
}
GATED_BF16 = GATED | {"clamped_swiglu_biases": (clamped_swiglu(alpha=1.702, limit=7.0), True)}


def make_gated_moe_inputs(gen, t, e, k, d, i, empty, with_bias, dtype=torch.float32):
    x, w_up, _, topk_idx, topk_w = make_moe_inputs(gen, t, e, k, d, 2 * i, empty)  # w_up (e, 2i, d)
    w_down = torch.randn(e, d, i, generator=gen) / math.sqrt(i)
    tensors = [x.detach(), w_up.detach(), w_down, topk_w.detach()]
    if with_bias:
        tensors += [0.3 * torch.randn(e, 2 * i, generator=gen), 0.3 * torch.randn(e, d, generator=gen)]
    return [v.to(dtype).requires_grad_() for v in tensors], topk_idx


def check_gated_moe(leaves, ref_leaves, topk_idx, activation, out_tol, grad_tol, gen):
    names = ["x", "w_up", "w_down", "topk_w", "b_up", "b_down"][: len(leaves)]

    def run(fn, v):
        biases = dict(b_up_EU=v[4], b_down_ED=v[5]) if len(v) == 6 else {}
        return fn(v[0], v[1], v[2], topk_idx, v[3], activation=activation, **biases)

    ref = run(experts_reference, ref_leaves)
    out = run(experts_grouped, leaves)
    assert out.dtype == leaves[0].dtype
    assert_close_scaled(out, ref, out_tol, "experts output")
    cot = [torch.randn(ref.shape, generator=gen)]
    for name, gf, gr, leaf in zip(names, grads_of([out], cot, leaves), grads_of([ref], cot, ref_leaves), leaves):
        assert gf.dtype == leaf.dtype
        assert_close_scaled(gf, gr, grad_tol, f"grad {name}")


@pytest.mark.parametrize("gated", list(GATED))
@pytest.mark.parametrize(("t", "e", "k", "d", "i", "empty"), MOE_CASES)
def test_gated_experts_grouped_matches_reference_fp32(gated, t, e, k, d, i, empty):
    activation, with_bias = GATED[gated]
    gen = make_gen(t * 100 + e + 2)
    leaves, topk_idx = make_gated_moe_inputs(gen, t, e, k, d, i, empty, with_bias)
    check_gated_moe(leaves, leaves, topk_idx, activation, 1e-5, 1e-5, gen)


@pytest.mark.parametrize("widen", [True, False])
@pytest.mark.parametrize("gated", list(GATED))
@pytest.mark.parametrize(("t", "e", "k", "d", "i", "empty"), MOE_CASES[1:4])
def test_gated_experts_grouped_bf16_against_fp32_reference(monkeypatch, widen, gated, t, e, k, d, i, empty):
    monkeypatch.setattr(linear_mod, "_WIDEN", widen)
    activation, with_bias = GATED_BF16[gated]
    gen = make_gen(t * 100 + e + 3)
    leaves, topk_idx = make_gated_moe_inputs(gen, t, e, k, d, i, empty, with_bias, dtype=torch.bfloat16)
    ref_leaves = [v.detach().float().requires_grad_() for v in leaves]
    check_gated_moe(leaves, ref_leaves, topk_idx, activation, 2e-2, 3e-2, gen)


def test_gated_experts_accept_transposed_weight_views():
    """GPT-OSS stores its expert weights as (e, in, out): the kernel takes the transposed views as they are."""
    gen = make_gen(11)
    leaves, topk_idx = make_gated_moe_inputs(gen, 9, 4, 2, 8, 6, (), True)
    x, w_up, w_down, topk_w, b_up, b_down = leaves
    w_up_t = w_up.detach().transpose(1, 2).contiguous().requires_grad_()  # stored (e, d, 2i)
    w_down_t = w_down.detach().transpose(1, 2).contiguous().requires_grad_()  # stored (e, i, d)
    act = GATED["clamped_swiglu_biases"][0]
    ref = experts_reference(x, w_up, w_down, topk_idx, topk_w, activation=act, b_up_EU=b_up, b_down_ED=b_down)
    out = experts_grouped(
        x, w_up_t.transpose(1, 2), w_down_t.transpose(1, 2), topk_idx, topk_w, activation=act, b_up_EU=b_up,
        b_down_ED=b_down,
    )  # fmt: skip
    assert_close_scaled(out, ref, 1e-5, "experts output")
    cot = [torch.randn(ref.shape, generator=gen)]
    g_ref = grads_of([ref], cot, [w_up, w_down])
    g_fast = grads_of([out], cot, [w_up_t, w_down_t])
    assert_close_scaled(g_fast[0], g_ref[0].transpose(1, 2), 1e-5, "grad w_up")
    assert_close_scaled(g_fast[1], g_ref[1].transpose(1, 2), 1e-5, "grad w_down")


def test_experts_reject_mismatched_gated_shapes():
    gen = make_gen(12)
    x, w_up, w_down, topk_idx, topk_w = make_moe_inputs(gen, 4, 4, 2, 8, 6)
    with pytest.raises(ValueError, match="does not fit"):
        experts_grouped(x, w_up, w_down, topk_idx, topk_w, activation="silu_gated")  # w_up is (e, i, d), not 2i
    with pytest.raises(ValueError, match="unknown activation"):
        experts_grouped(x, w_up, w_down, topk_idx, topk_w, activation="gelu")


# ---------------------------------------------------------------------------------------------- attention


def make_attn_inputs(gen, b, h, kv, t, s, d, dtype=torch.float32):
    q = torch.randn(b, h, t, d, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(b, kv, s, d, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(b, kv, s, d, generator=gen).to(dtype).requires_grad_()
    return q, k, v


DOCS_7 = [[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1]]
LEFT_PAD_7 = [[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]]  # row 1 fully padded
ATTN_CASES = {  # name -> (b, h, kv, t, s, d, q_offset, document_ids, key_valid, block_size)
    "causal": (2, 2, 2, 7, 7, 8, 0, None, None, 1024),
    "causal_gqa": (2, 4, 2, 7, 7, 8, 0, None, None, 1024),
    "causal_mqa": (1, 4, 1, 7, 7, 4, 0, None, None, 1024),
    "documents": (2, 4, 2, 7, 7, 8, 0, DOCS_7, None, 1024),
    "documents_blocked": (2, 4, 2, 7, 7, 8, 0, DOCS_7, None, 3),
    "left_padding": (2, 2, 2, 7, 7, 8, 0, None, LEFT_PAD_7, 1024),
    "left_padding_gqa_blocked": (2, 4, 2, 7, 7, 8, 0, None, LEFT_PAD_7, 2),
    "documents_and_padding": (2, 4, 2, 7, 7, 8, 0, DOCS_7, [[0, 1, 1, 1, 1, 1, 1], [1] * 7], 4),
    "offset_after_cache": (2, 4, 2, 3, 7, 8, 4, None, None, 1024),
    "offset_after_cache_blocked": (2, 4, 2, 3, 7, 8, 4, None, None, 2),
    "offset_documents_padding": (2, 4, 2, 3, 7, 8, 4, DOCS_7, [[0, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]], 2),
    "decode": (2, 4, 2, 1, 7, 8, 6, None, None, 1024),
    "decode_documents": (2, 4, 2, 1, 7, 8, 6, DOCS_7, None, 1024),
    "decode_padding": (2, 4, 2, 1, 7, 8, 6, None, LEFT_PAD_7, 1024),
    "queries_shorter_than_keys_no_offset": (1, 2, 2, 3, 7, 4, 0, None, None, 2),
    # A single query not at the end of the keys (the contract: key j is seen only when j <= q_offset).
    "single_query_mid_keys": (2, 2, 2, 1, 7, 4, 2, None, None, 1024),
    "single_query_first_position": (1, 2, 1, 1, 5, 4, 0, None, None, 1024),
}


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_matches_reference(case):
    b, h, kv, t, s, d, q_offset, docs, valid, block = ATTN_CASES[case]
    gen = make_gen(len(case))
    q, k, v = make_attn_inputs(gen, b, h, kv, t, s, d)
    document_ids = torch.tensor(docs) if docs is not None else None
    key_valid = torch.tensor(valid, dtype=torch.bool) if valid is not None else None
    kw = {"q_offset": q_offset, "document_ids": document_ids, "key_valid": key_valid}
    ref = attention_reference(q, k, v, **kw)
    out = attention(q, k, v, block_size=block, **kw)
    assert out.dtype == q.dtype and out.shape == (b, h, t, d)
    assert not torch.isnan(out).any(), "attention produced NaN"
    assert_close_scaled(out, ref, 1e-5, "attention output")
    cot = [torch.randn(ref.shape, generator=gen)]
    g_ref = grads_of([ref], cot, [q, k, v])
    g_fast = grads_of([out], cot, [q, k, v])
    for name, gf, gr in zip("qkv", g_fast, g_ref):
        assert not torch.isnan(gf).any(), f"grad {name} has NaN"
        assert_close_scaled(gf, gr, 1e-5, f"grad {name}")


def test_attention_fully_padded_row_is_finite_and_sees_itself():
    gen = make_gen(99)
    q, k, v = make_attn_inputs(gen, 1, 2, 2, 5, 5, 4)
    key_valid = torch.zeros(1, 5, dtype=torch.bool)
    out = attention(q, k, v, key_valid=key_valid, block_size=2)
    assert torch.isfinite(out).all()
    # Each padding query sees only its own key, so its output is its own value.
    assert_close_scaled(out, v.detach(), 1e-6, "padded rows")


@pytest.mark.parametrize("case", ["causal_gqa", "documents_blocked", "offset_after_cache", "decode"])
def test_attention_bf16(case):
    b, h, kv, t, s, d, q_offset, docs, valid, block = ATTN_CASES[case]
    gen = make_gen(5)
    q, k, v = make_attn_inputs(gen, b, h, kv, t, s, d, dtype=torch.bfloat16)
    document_ids = torch.tensor(docs) if docs is not None else None
    ref = attention_reference(q.float(), k.float(), v.float(), q_offset=q_offset, document_ids=document_ids)
    out = attention(q, k, v, q_offset=q_offset, document_ids=document_ids, block_size=block)
    assert out.dtype == torch.bfloat16
    assert_close_scaled(out, ref, 2e-2, "bf16 attention")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,kv,prefix", [(4, 2, 23), (4, 4, 1), (4, 1, 40)])
def test_attention_chunk_after_cached_keys_merges_prefix(h, kv, prefix, dtype):
    # Chunked prefill at inference: queries after `prefix` cached keys, the keys read as views of a longer cache.
    gen = make_gen(h * 100 + kv + prefix)
    b, t, d = 2, 9, 8
    q = torch.randn(b, t, h, d, generator=gen).to(dtype).transpose(1, 2)
    cache = torch.randn(2, b, kv, prefix + t + 5, d, generator=gen).to(dtype)
    k, v = cache[0, :, :, : prefix + t], cache[1, :, :, : prefix + t]
    ref = attention_reference(q.float(), k.float(), v.float(), q_offset=prefix)
    with torch.no_grad():
        merged = attention_after_prefix(q, k, v, prefix)
        out = attention(q, k, v, q_offset=prefix)
    assert merged.dtype == dtype and merged.shape == (b, h, t, d)
    assert_close_scaled(merged, ref, 1e-5 if dtype == torch.float32 else 2e-2, "merged prefix attention")
    assert torch.equal(out, merged), "the no-grad path after cached keys should take the merge"


# ---------------------------------------------------------------------------------------------- loss


def make_labels(gen, n, v, pattern):
    labels = torch.randint(0, v, (n,), generator=gen)
    if pattern == "some":
        labels[::3] = IGNORE_INDEX
    elif pattern == "all":
        labels[:] = IGNORE_INDEX
    elif pattern == "first_last":
        labels[0] = IGNORE_INDEX
        labels[-1] = IGNORE_INDEX
    return labels


LOSS_CASES = [  # (rows, vocab, width, chunk_size, ignored rows)
    (7, 11, 8, 3, "some"),
    (7, 11, 8, 1000, "some"),
    (8, 16, 4, 8, "none"),
    (9, 13, 6, 4, "first_last"),
    (5, 9, 6, 2, "all"),
    (1, 5, 4, 1, "none"),
    (12, 10, 8, 1, "some"),
]


@pytest.fixture(params=["rows-with-a-loss", "every-row"])
def row_selection(request, monkeypatch):
    """The CPU's default (rows without a loss left out before the head) and the kernel's own masking of them (what a
    GPU runs)."""
    if request.param == "every-row":
        monkeypatch.setattr(loss_mod, "_rows_with_a_loss", lambda hidden, labels, weights: (hidden, labels, weights))
    return request.param


@pytest.mark.parametrize(("n", "v", "d", "chunk", "pattern"), LOSS_CASES)
def test_linear_cross_entropy_fp32(n, v, d, chunk, pattern, row_selection):
    gen = make_gen(n * 31 + chunk)
    hidden = torch.randn(n, d, generator=gen).requires_grad_()
    weight = torch.randn(v, d, generator=gen).requires_grad_()
    labels = make_labels(gen, n, v, pattern)
    ref = linear_cross_entropy_reference(hidden, weight, labels)
    out = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    assert out.dtype == torch.float32 and out.shape == ()
    assert_close_scaled(out, ref, 1e-5, "loss")
    if pattern == "all":
        assert out.item() == 0.0
    # A non-unit upstream gradient checks that backward scales the precomputed gradients.
    g_ref = torch.autograd.grad(ref * 2.5, [hidden, weight])
    g_fast = torch.autograd.grad(out * 2.5, [hidden, weight])
    for name, gf, gr in zip(("hidden", "weight"), g_fast, g_ref):
        assert_close_scaled(gf, gr, 1e-5, f"grad {name}")
    if pattern in ("some", "all", "first_last"):
        assert g_fast[0][labels == IGNORE_INDEX].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("widen", [True, False])
@pytest.mark.parametrize(("n", "v", "d", "chunk", "pattern"), LOSS_CASES[:4])
def test_linear_cross_entropy_bf16(monkeypatch, widen, n, v, d, chunk, pattern):
    monkeypatch.setattr(linear_mod, "_WIDEN", widen)
    gen = make_gen(n * 37 + chunk)
    hidden = torch.randn(n, d, generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(v, d, generator=gen).bfloat16().requires_grad_()
    labels = make_labels(gen, n, v, pattern)
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = linear_cross_entropy_reference(h32, w32, labels)
    out = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    assert out.dtype == torch.float32
    assert_close_scaled(out, ref, 1e-5 if widen else 2e-2, "bf16 loss")
    g_ref = torch.autograd.grad(ref, [h32, w32])
    g_fast = torch.autograd.grad(out, [hidden, weight])
    for name, gf, gr in zip(("hidden", "weight"), g_fast, g_ref):
        assert gf.dtype == torch.bfloat16
        assert_close_scaled(gf, gr, 2e-2, f"grad {name}")


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize(("dtype", "logits_dtype"), [(torch.float32, None), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("pattern", ["some", "none"])
def test_linear_cross_entropy_one_chunk_equals_chunks(dtype, logits_dtype, pattern, frozen):
    """One chunk over all rows (a GPU's default at fine-tuning shapes) gives the loss and both gradients of the
    chunked path (a CPU's) and of the reference."""
    n, v, d = 23, 40, 16
    gen = make_gen(n + (pattern == "some") + 2 * frozen)
    h0, w0 = torch.randn(n, d, generator=gen).to(dtype), torch.randn(v, d, generator=gen).to(dtype)
    labels = make_labels(gen, n, v, pattern)

    def run(chunk):
        hidden, weight = h0.clone().requires_grad_(), w0.clone().requires_grad_(not frozen)
        out = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk, logits_dtype=logits_dtype)
        leaves = [hidden] if frozen else [hidden, weight]
        return out, torch.autograd.grad(out * 1.5, leaves)

    one, g_one = run(n)
    chunked, g_chunked = run(5)
    assert_close_scaled(one, chunked, 1e-6, "loss, one chunk vs chunks")
    for gi, gc in zip(g_one, g_chunked):
        assert gi.dtype == dtype
        assert_close_scaled(gi, gc, 1e-6 if dtype == torch.float32 else 1e-2, "grad, one chunk vs chunks")
    h32, w32 = h0.float().requires_grad_(), w0.float().requires_grad_()
    ref = linear_cross_entropy_reference(h32, w32, labels)
    assert_close_scaled(one, ref, 1e-5 if dtype == torch.float32 else 2e-2, "loss vs reference")
    for gi, gr in zip(g_one, torch.autograd.grad(ref * 1.5, [h32, w32])):
        assert_close_scaled(gi, gr, 1e-5 if dtype == torch.float32 else 3e-2, "grad vs reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "v", "d", "chunk", "pattern"), [LOSS_CASES[0], LOSS_CASES[1], LOSS_CASES[3]])
def test_linear_cross_entropy_weighted(dtype, n, v, d, chunk, pattern, row_selection):
    """Per-row weights (SFT's loss normalizations): the weighted sum of the rows' losses and its gradients, as the
    reference twin gives them; a zero weight, like an ignored row, gives its row no gradient."""
    gen = make_gen(n * 43 + chunk)
    h0, w0 = torch.randn(n, d, generator=gen).to(dtype), torch.randn(v, d, generator=gen).to(dtype)
    labels = make_labels(gen, n, v, pattern)
    weights = torch.rand(n, generator=gen) * 3
    weights[1] = 0.0
    hidden, weight = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    out = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk, weights=weights)
    h32, w32 = h0.float().requires_grad_(), w0.float().requires_grad_()
    ref = linear_cross_entropy_reference(h32, w32, labels, weights=weights)
    unweighted = linear_cross_entropy_reference(h32, w32, labels)
    assert (ref - unweighted).abs() > 1e-3  # the weights change the loss: the comparison below can fail
    assert_close_scaled(out, ref, 1e-5 if dtype == torch.float32 else 2e-2, "weighted loss")
    g_fast = torch.autograd.grad(out * 1.5, [hidden, weight])
    g_ref = torch.autograd.grad(ref * 1.5, [h32, w32])
    for name, gf, gr in zip(("hidden", "weight"), g_fast, g_ref):
        assert gf.dtype == dtype
        assert_close_scaled(gf, gr, 1e-5 if dtype == torch.float32 else 3e-2, f"weighted grad {name}")
    assert g_fast[0][1].abs().max() == 0
    with pytest.raises(ValueError, match="weights of shape"):
        linear_cross_entropy(hidden, weight, labels, weights=weights[:-1])


def test_linear_cross_entropy_chunk_size_by_device():
    """A CPU keeps its cache-sized chunks; a GPU takes as many rows as GPU_LOGITS_BUDGET of fp32 logits allows."""
    cpu = torch.empty(0)
    assert default_chunk_size(cpu, 32768) == 2048 and default_chunk_size(cpu, 2**20) == 256
    gpu_like = torch.empty(0, device="meta")
    assert default_chunk_size(gpu_like, 32768) == 2048  # four chunks for 4 x 2048 tokens (CPU: also 2048)
    assert default_chunk_size(gpu_like, 256) == 2**18  # no 2048-row cap: one chunk for any batch at a small vocab
    assert default_chunk_size(gpu_like, 2**31) == 1


def test_linear_cross_entropy_frozen_weight_and_bad_shapes():
    gen = make_gen(2)
    hidden = torch.randn(6, 4, generator=gen).requires_grad_()
    weight = torch.randn(7, 4, generator=gen)  # no gradient wanted
    labels = make_labels(gen, 6, 7, "some")
    out = linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    (g,) = torch.autograd.grad(out, [hidden])
    h2 = hidden.detach().requires_grad_()
    (g_ref,) = torch.autograd.grad(linear_cross_entropy_reference(h2, weight, labels), [h2])
    assert_close_scaled(g, g_ref, 1e-5, "grad hidden (frozen weight)")
    with pytest.raises(ValueError):
        linear_cross_entropy(hidden, weight, labels[:5])


# ---------------------------------------------------------------------------------------------- linear


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(20, 8), (2, 13, 8)])  # >= WIDEN_MIN_ROWS rows: the widened path
def test_widened_linear_bf16_matches_fp32(monkeypatch, with_bias, shape):
    monkeypatch.setattr(linear_mod, "_WIDEN", True)
    gen = make_gen(41)
    x = torch.randn(*shape, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(6, shape[-1], generator=gen).bfloat16().requires_grad_()
    b = torch.randn(6, generator=gen).bfloat16().requires_grad_() if with_bias else None
    leaves = [v for v in (x, w, b) if v is not None]
    leaves32 = [v.detach().float().requires_grad_() for v in leaves]
    out = linear_mod.linear(x, w, b)
    ref = F.linear(leaves32[0], leaves32[1], leaves32[2] if with_bias else None)
    assert out.dtype == torch.bfloat16
    # The widened matmul is the fp32 result rounded once to bf16: within half a bf16 ulp of fp32.
    torch.testing.assert_close(out.float(), ref.detach(), rtol=2**-8, atol=1e-6)
    cot = torch.randn(ref.shape, generator=gen).bfloat16().float()  # out is bf16: its gradient is bf16 too
    g_fast = torch.autograd.grad((out.float() * cot).sum(), leaves)
    g_ref = torch.autograd.grad((ref * cot).sum(), leaves32)
    for gf, gr, leaf in zip(g_fast, g_ref, leaves):
        assert gf.dtype == leaf.dtype
        torch.testing.assert_close(gf.float(), gr, rtol=2**-8, atol=1e-5)


def _spy_widened(monkeypatch):
    calls = []
    original = linear_mod._WidenedLinear.apply

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(linear_mod._WidenedLinear, "apply", spy)
    return calls


@pytest.mark.parametrize(
    ("widen", "dtype", "expect_widened"),
    [
        (True, torch.bfloat16, True),
        (True, torch.float16, True),
        (True, torch.float32, False),
        (False, torch.bfloat16, False),
        (False, torch.float32, False),
    ],
)
def test_widened_linear_used_only_when_matmul_dtype_says_so(monkeypatch, widen, dtype, expect_widened):
    monkeypatch.setattr(linear_mod, "_WIDEN", widen)
    calls = _spy_widened(monkeypatch)
    gen = make_gen(3)
    x = torch.randn(linear_mod.WIDEN_MIN_ROWS, 8, generator=gen).to(dtype)
    w = torch.randn(3, 8, generator=gen).to(dtype)
    assert (linear_mod.matmul_dtype(x) == torch.float32) == (widen or dtype == torch.float32)
    assert (linear_mod.matmul_dtype(x) != x.dtype) == expect_widened
    out = linear_mod.linear(x, w)
    assert out.dtype == dtype
    assert len(calls) == int(expect_widened)
    torch.testing.assert_close(out.float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=1e-2)
    # nn.Linear subclass goes through the same switch.
    layer = linear_mod.Linear(8, 3).to(dtype)
    layer(x)
    assert len(calls) == 2 * int(expect_widened)
    # A few rows (a decode step) stay native whatever the setting: bound by reading the weight.
    linear_mod.linear(x[: linear_mod.WIDEN_MIN_ROWS - 1], w)
    assert len(calls) == 2 * int(expect_widened)


@pytest.mark.parametrize(("env", "expected"), [("fp32", True), ("native", False)])
def test_bf16_matmul_env_override(monkeypatch, env, expected):
    monkeypatch.setattr(linear_mod, "_WIDEN", None)
    monkeypatch.setenv("HYBRIDMOE_BF16_MATMUL", env)
    assert linear_mod.widen_bf16_on_cpu() is expected
    x = torch.zeros(2, 2, dtype=torch.bfloat16)
    assert linear_mod.matmul_dtype(x) == (torch.float32 if expected else torch.bfloat16)


def test_bf16_matmul_env_rejects_unknown_value(monkeypatch):
    monkeypatch.setattr(linear_mod, "_WIDEN", None)
    monkeypatch.setenv("HYBRIDMOE_BF16_MATMUL", "fast")
    with pytest.raises(ValueError):
        linear_mod.widen_bf16_on_cpu()


# ---------------------------------------------------------------------------------------------- activations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_squared_forms_agree_exactly(dtype):
    """The autograd op (dense MLP, shared expert), the pre-activation backward (routed experts) and the reference
    compute relu(u) * relu(u) and dh * relu(u) * 2 in the same order: equal, not merely close (the model's numerics
    did not move when they became one)."""
    gen = make_gen(8)
    u = torch.randn(3, 5, 7, generator=gen)
    u[0, 0, :3] = torch.tensor([0.0, -0.0, 1e-3])  # the kink and tiny values
    u = u.to(dtype).requires_grad_()
    u_ref = u.detach().clone().requires_grad_()
    out, ref = relu_squared(u), relu_squared_reference(u_ref)
    assert out.dtype == dtype and torch.equal(out, ref)
    assert out[u.detach() <= 0].abs().max() == 0
    cot = torch.randn(out.shape, generator=gen).to(dtype)
    (g,) = torch.autograd.grad(out, [u], cot)
    (g_ref,) = torch.autograd.grad(ref, [u_ref], cot)
    assert g.dtype == dtype and torch.equal(g, g_ref)
    assert g[u.detach() <= 0].abs().max() == 0
    dh = cot.clone()
    du = relu_squared_backward(u.detach(), dh)
    assert du.data_ptr() == dh.data_ptr() and torch.equal(du, g_ref)  # written into dh, as the experts kernel wants


def test_experts_relu2_is_the_activations_module():
    act = ACTIVATIONS["relu2"]
    assert (act.forward, act.backward, act.reference) == (relu_squared, relu_squared_backward, relu_squared_reference)
