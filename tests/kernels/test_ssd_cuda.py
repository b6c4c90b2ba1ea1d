"""The SSD scan and the causal conv on their CUDA libraries (`hybridmoe.kernels.ssd_cuda`: state-spaces/mamba's
Triton scan, Dao-AILab's causal-conv1d) against their twins (`ssd_reference`, `causal_conv1d_reference`), through
the dispatch in `ssd_chunked` / `causal_conv1d`. These run where a GPU and the `[gpu]` extra are present.

One test runs mamba_ssm's Triton scan on CPU tensors in Triton's interpreter (where mamba_ssm is installed, e.g.
`MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation mamba-ssm`, which skips its CUDA
extension): in a subprocess with TRITON_INTERPRET=1 and four stand-ins for what the library asks of a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_kernels import assert_close_scaled, grads_of, interpreter_loops_work

from hybridmoe.kernels import ssd_cuda
from hybridmoe.kernels.ssd import causal_conv1d, causal_conv1d_reference, ssd_chunked, ssd_reference

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_mamba = pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="mamba_ssm is not installed")
needs_conv = pytest.mark.skipif(
    importlib.util.find_spec("causal_conv1d") is None, reason="causal_conv1d is not installed"
)

SSD_ARGS = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")


def ssd_case(dtype, device, b=2, t=45, h=4, p=16, g=2, n=16, first_doc=7, seed=0):
    """Inputs of a scan with every option: packed documents whose ids do not start at 0 (one boundary inside a
    chunk, one at a chunk edge), an initial state, dt_bias, softplus and a finite dt_limit."""
    gen = torch.Generator().manual_seed(seed)
    ins = {
        "x": torch.randn(b, t, h, p, generator=gen),
        "dt": torch.randn(b, t, h, generator=gen) - 1,
        "A": -torch.rand(h, generator=gen) - 0.5,
        "B": torch.randn(b, t, g, n, generator=gen) / 2,
        "C": torch.randn(b, t, g, n, generator=gen) / 2,
        "D": torch.randn(h, generator=gen),
        "dt_bias": torch.randn(h, generator=gen) / 2,
        "initial_state": torch.randn(b, h, p, n, generator=gen) / 4,
    }
    ins = {k: v.to(device, dtype if k in ("x", "B", "C", "dt") else torch.float32) for k, v in ins.items()}
    ins = {k: v.requires_grad_() for k, v in ins.items()}
    seq_idx = torch.full((b, t), first_doc, dtype=torch.long)
    seq_idx[0, 10:] += 1
    seq_idx[0, 32:] += 1  # a boundary at a chunk edge (chunk 16)
    seq_idx[1, 20:] += 3
    return ins, seq_idx.to(device), {"dt_softplus": True, "dt_limit": (0.01, 2.0)}


def check_ssd(scan, ins, seq_idx, kw, chunk_size, tol, grad_tol):
    """`scan(**ins, chunk_size, seq_idx, **kw)` against `ssd_reference` on fp32 copies: y, final state, gradients."""
    ref_ins = {k: v.detach().float().requires_grad_() for k, v in ins.items()}
    ref_y, ref_s = ssd_reference(**ref_ins, seq_idx=seq_idx, **kw)
    y, s = scan(**ins, chunk_size=chunk_size, seq_idx=seq_idx, **kw)
    assert s.dtype == torch.float32
    assert_close_scaled(y, ref_y, tol, "y")
    assert_close_scaled(s, ref_s, tol, "final_state")
    gen = torch.Generator().manual_seed(1)
    cot = [torch.randn(ref_y.shape, generator=gen).to(y.device), torch.randn(ref_s.shape, generator=gen).to(y.device)]
    got = grads_of([y.float(), s], cot, [ins[k] for k in SSD_ARGS])
    want = grads_of([ref_y, ref_s], cot, [ref_ins[k] for k in SSD_ARGS])
    for name, a, e in zip(SSD_ARGS, got, want):
        assert_close_scaled(a, e, grad_tol, f"d{name}")


@needs_cuda
@needs_mamba
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ssd_chunked_on_cuda_runs_mamba_scan(dtype):
    ins, seq_idx, kw = ssd_case(dtype, "cuda")
    assert ssd_cuda.ssd_fits(ins["x"], ins["B"], ins["C"])
    y, _ = ssd_chunked(**ins, chunk_size=16, seq_idx=seq_idx, **kw)
    assert y.dtype == dtype  # the kernel's output, not the PyTorch path's fp32
    check_ssd(ssd_chunked, ins, seq_idx, kw, 16, 2e-2, 3e-2)


@needs_cuda
def test_ssd_chunked_on_cuda_keeps_fp32_exact():
    """fp32 scans stay on the PyTorch path (mamba's Triton matmuls would take fp32 inputs as TF32)."""
    ins, seq_idx, kw = ssd_case(torch.float32, "cuda")
    assert not ssd_cuda.ssd_fits(ins["x"], ins["B"], ins["C"])
    check_ssd(ssd_chunked, ins, seq_idx, kw, 16, 1e-5, 1e-4)


def conv_case(dtype, device, b=2, t=19, d=24, k=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(d, k, generator=gen) / 2).to(device).requires_grad_()
    bias = torch.randn(d, generator=gen).to(device).requires_grad_()
    s0 = torch.randn(b, k - 1, d, generator=gen).to(device, dtype)
    seq_idx = torch.full((b, t), -3, dtype=torch.long)  # negative ids: the kernel's padding marker, here real ids
    seq_idx[0, 5:] = 2
    seq_idx[0, 6:] = 4  # a one-token document
    seq_idx[1, 11:] = 0
    return x, w, bias, s0, seq_idx.to(device)


def check_conv(x, w, bias, seq_idx, s0, tol, grad_tol):
    ref_in = [t.detach().float().requires_grad_() for t in (x, w, bias)]
    ref = torch.nn.functional.silu(causal_conv1d_reference(*ref_in, seq_idx=seq_idx, initial_state=s0))
    out = causal_conv1d(x, w, bias, seq_idx=seq_idx, initial_state=s0, activation="silu")
    assert_close_scaled(out, ref, tol, "out")
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
    for name, a, e in zip(("dx", "dweight", "dbias"), grads_of([out.float()], [cot], [x, w, bias]),
                          grads_of([ref], [cot], ref_in)):  # fmt: skip
        assert_close_scaled(a, e, grad_tol, name)
    return out


@needs_cuda
@needs_conv
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("packed,with_state", [(True, False), (False, True), (False, False)])
def test_causal_conv1d_on_cuda_runs_the_kernel(dtype, tol, packed, with_state):
    x, w, bias, s0, seq_idx = conv_case(dtype, "cuda")
    seq_idx, s0 = (seq_idx if packed else None), (s0 if with_state else None)
    assert ssd_cuda.conv_fits(x, w, bias, seq_idx, s0)
    out = check_conv(x, w, bias, seq_idx, s0, tol, tol)
    assert out.dtype == dtype  # the kernel's output, not the PyTorch path's fp32


@needs_cuda
@needs_conv
def test_causal_conv1d_on_cuda_falls_back_where_the_kernel_does_not_fit():
    """Documents and an initial state together, or channels not a multiple of 8: the PyTorch path (fp32 out)."""
    x, w, bias, s0, seq_idx = conv_case(torch.bfloat16, "cuda")
    assert not ssd_cuda.conv_fits(x, w, bias, seq_idx, s0)
    assert check_conv(x, w, bias, seq_idx, s0, 2e-2, 2e-2).dtype == torch.float32
    x, w, bias, s0, seq_idx = conv_case(torch.bfloat16, "cuda", d=20)
    assert not ssd_cuda.conv_fits(x, w, bias, seq_idx, None)
    assert check_conv(x, w, bias, seq_idx, None, 2e-2, 2e-2).dtype == torch.float32


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_on_cuda_matches_its_pytorch_path(monkeypatch, dtype):
    """The debug model on CUDA with packed documents: loss (and in fp32 the gradients) with the kernels against the
    same model with every kernel switched off (the PyTorch paths, as on CPU). In bf16 only the loss: a rounding
    difference may flip a token's expert choice, which moves that expert's gradient by a whole token's share."""
    from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
    from hybridmoe.kernels import norm
    from hybridmoe.presets import PRESETS

    torch.manual_seed(0)
    model = HybridMoEForCausalLM(HybridMoEConfig(**PRESETS["debug"])).to("cuda", dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 48), device="cuda")
    docs = torch.tensor([[0] * 20 + [1] * 28, [5] * 48], device="cuda")

    def run():
        model.zero_grad()
        out = model(ids, labels=ids, document_ids=docs)
        out.loss.backward()
        return out.loss.float(), [p.grad.float().clone() for p in model.parameters() if p.grad is not None]

    loss, grads = run()
    monkeypatch.setattr(ssd_cuda, "ssd_fits", lambda *a: False)
    monkeypatch.setattr(ssd_cuda, "conv_fits", lambda *a: False)
    monkeypatch.setattr(norm, "_triton_norm", lambda: None)
    ref_loss, ref_grads = run()
    assert_close_scaled(loss, ref_loss, 1e-5 if dtype == torch.float32 else 2e-2, "loss")
    if dtype == torch.float32:
        assert len(grads) == len(ref_grads)
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            assert_close_scaled(g, r, 1e-4, f"grad {i}")


def test_a_broken_install_warns_and_a_missing_one_does_not(recwarn):
    """An optional library that is installed but fails to import is reported (the PyTorch path then runs on CUDA);
    one that is not installed is the ordinary case, without a word."""
    assert ssd_cuda.optional_library_missing("hybridmoe_no_such_package", "x", ModuleNotFoundError("no")) is None
    assert not recwarn.list
    with pytest.warns(UserWarning, match=r"torch is installed but does not import \(ImportError: undefined symbol"):
        assert ssd_cuda.optional_library_missing("torch", "the scan", ImportError("undefined symbol")) is None


# ---------------------------------------------------------------------------------------------- CPU interpreter

INTERPRETER_SHIMS = """
import contextlib, sys, types
import torch
import triton.runtime.autotuner as autotuner
sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))  # its CUDA extension
torch.cuda.device = lambda index: contextlib.nullcontext()  # `with torch.cuda.device(x.device.index)`
torch.cuda.get_device_properties = lambda device: types.SimpleNamespace(multi_processor_count=4)
autotuner.Autotuner._bench = lambda self, *args, config, **meta: [1.0, 1.0, 1.0]  # no timing: the first config
"""


@needs_mamba
@interpreter_loops_work
def test_mamba_scan_wrapper_matches_twin_in_triton_interpreter():
    """`ssd_cuda.ssd_scan_cuda` on CPU tensors (fp32: the interpreter's matmuls are exact): documents whose ids do
    not start at 0 with an initial state, so a wrong id convention would show."""
    code = INTERPRETER_SHIMS + textwrap.dedent("""
        import torch
        from test_ssd_cuda import check_ssd, ssd_case
        from hybridmoe.kernels import ssd_cuda
        ins, seq_idx, kw = ssd_case(torch.float32, "cpu", t=21, p=8)
        assert ssd_cuda.mamba_chunk_scan() is not None

        def scan(x, dt, A, B, C, D, chunk_size, initial_state, seq_idx, dt_bias, dt_softplus, dt_limit):
            return ssd_cuda.ssd_scan_cuda(
                x, dt, A, B, C, D, chunk_size, initial_state, seq_idx, dt_bias, dt_softplus, dt_limit
            )

        check_ssd(scan, ins, seq_idx, kw, 8, 1e-5, 1e-4)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr[-3000:]
