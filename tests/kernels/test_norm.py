"""The gated RMSNorm's Triton kernel (`hybridmoe.kernels.norm_triton`) against its PyTorch twin
(`norm.gated_rms_norm_reference`): output and the gradients of y, z and the weight.

Without a GPU the kernels run on CPU tensors in Triton's interpreter, which must be switched on (TRITON_INTERPRET=1)
before triton is first imported: its own library functions (`tl.sigmoid`, ...) are decorated then. So the
`test_interpreted_*` cases run in a fresh process started by `test_triton_kernels_in_a_fresh_interpreter_process`
(or directly, when pytest itself runs with TRITON_INTERPRET=1). Skipped where triton is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from test_kernels import assert_close_scaled, grads_of, interpreter_loops_work

from hybridmoe.kernels.norm import gated_rms_norm, gated_rms_norm_reference

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
in_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs in the fresh TRITON_INTERPRET=1 process of test_triton_kernels_in_a_fresh_interpreter_process",
)


@needs_triton
@interpreter_loops_work
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this process is that interpreter process")
def test_triton_kernels_in_a_fresh_interpreter_process():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", __file__]
    cmd += ["-k", "test_interpreted_"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 0 and " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-6000:]


@pytest.fixture(scope="module")
def interpreted():
    """`norm_triton`, whose kernels run on CPU tensors in this TRITON_INTERPRET=1 process."""
    from hybridmoe.kernels import norm_triton

    return norm_triton


def _inputs(shape, y_dtype, z_dtype, w_dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = (torch.randn(shape, generator=gen) * 3).to(device, y_dtype).requires_grad_()
    z = (torch.randn(shape, generator=gen) * 2).to(device, z_dtype).requires_grad_()
    w = (1 + torch.randn(shape[-1], generator=gen) / 4).to(device, w_dtype).requires_grad_()
    return y, z, w


def check_against_reference(norm_fn, y, z, w, group_size, out_dtype, tol, grad_tol):
    eps = 1e-5
    out = norm_fn(y, z, w, group_size, eps, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == y.shape
    # the twin on fp32 copies: for bf16 inputs, its gradients would otherwise be rounded inside autograd's casts
    ref_in = [t.detach().float().requires_grad_() for t in (y, z, w)]
    ref = gated_rms_norm_reference(*ref_in, group_size, eps)
    assert_close_scaled(out, ref.to(out_dtype), tol, "out")
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(ref.device)
    got = grads_of([out], [cot.to(out_dtype)], [y, z, w])
    want = grads_of([ref], [cot.to(out_dtype).float()], ref_in)
    for name, g, r, t in zip(("dy", "dz", "dweight"), got, want, (y, z, w)):
        assert g.dtype == t.dtype, f"{name}: dtype {g.dtype}, expected {t.dtype}"
        assert_close_scaled(g, r, grad_tol, name)


# group sizes: the presets' (64 in `debug`; 256 to 1024 in the larger ones) are powers of 2; the kernel takes any
CASES = [
    pytest.param((2, 3, 24), 12, id="groups-of-12"),
    pytest.param((5, 64), 16, id="2d-groups-of-16"),
    pytest.param((1, 7, 40), 40, id="one-group-of-40"),
    pytest.param((2, 2, 128), 64, id="debug-preset"),
]


@in_interpreter
@pytest.mark.parametrize("shape,group_size", CASES)
@pytest.mark.parametrize(
    "y_dtype,z_dtype,out_dtype,tol,grad_tol",
    [
        pytest.param(torch.float32, torch.float32, torch.float32, 2e-6, 2e-6, id="fp32"),
        pytest.param(torch.bfloat16, torch.bfloat16, torch.bfloat16, 1e-2, 1e-2, id="bf16"),
        pytest.param(torch.float32, torch.bfloat16, torch.float32, 2e-6, 1e-2, id="fp32-scan-bf16-gate"),
    ],
)
def test_interpreted_gated_rms_norm_matches_twin(
    interpreted, shape, group_size, y_dtype, z_dtype, out_dtype, tol, grad_tol
):
    y, z, w = _inputs(shape, y_dtype, z_dtype)
    check_against_reference(interpreted.gated_rms_norm_triton, y, z, w, group_size, out_dtype, tol, grad_tol)


@in_interpreter
def test_interpreted_gated_rms_norm_strided_gate_and_bf16_weight(interpreted):
    """The gate as the model passes it: a column slice of the input projection (rows not contiguous)."""
    gen = torch.Generator().manual_seed(2)
    proj = torch.randn(2, 3, 24 + 10, generator=gen).to(torch.bfloat16).requires_grad_()
    z = proj[..., 5:29]
    assert not z.is_contiguous()
    y, _, w = _inputs((2, 3, 24), torch.float32, torch.bfloat16, w_dtype=torch.bfloat16)
    check_against_reference(interpreted.gated_rms_norm_triton, y, z, w, 8, torch.float32, 2e-6, 1e-2)


@in_interpreter
def test_interpreted_gated_rms_norm_rejects_bad_shapes(interpreted):
    y, z, w = _inputs((2, 24), torch.float32, torch.float32)
    with pytest.raises(ValueError, match="group_size 5 must divide"):
        interpreted.gated_rms_norm_triton(y, z, w, 5, 1e-5)
    with pytest.raises(ValueError, match="weight"):
        interpreted.gated_rms_norm_triton(y, z, w[:12], 12, 1e-5)


def test_importing_and_running_hybridmoe_on_cpu_imports_no_gpu_library():
    code = (
        "import sys, torch, hybridmoe, hybridmoe.modeling as m\n"
        "n = m.GatedRMSNorm(8, 4, 1e-5)\n"
        "n(torch.randn(2, 8), torch.randn(2, 8), out_dtype=torch.bfloat16)\n"
        "from hybridmoe.kernels.ssd import causal_conv1d, ssd_chunked\n"
        "causal_conv1d(torch.randn(1, 4, 8), torch.randn(8, 4), activation='silu')\n"
        "ssd_chunked(torch.randn(1, 4, 2, 3), torch.rand(1, 4, 2), -torch.rand(2), torch.randn(1, 4, 1, 5),"
        " torch.randn(1, 4, 1, 5), chunk_size=2)\n"
        "print(sorted(k for k in ('triton', 'mamba_ssm', 'causal_conv1d') if k in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


COMPILE_FOR_H200 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hybridmoe.kernels import norm_triton
for kernel in (norm_triton._gated_rms_norm_fwd, norm_triton._gated_rms_norm_bwd):
    for dtype in ("fp32", "bf16"):
        sig = {}
        for name in kernel.arg_names:
            if name == "BLOCK":
                sig[name] = "constexpr"
            elif name in ("RSTD", "DW"):
                sig[name] = "*fp32"
            elif name.isupper():
                sig[name] = "*" + dtype
            else:
                sig[name] = "fp32" if name == "eps" else "i32"
        src = ASTSource(kernel, sig, constexprs={"BLOCK": 512})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 2})
        assert compiled.asm["cubin"], kernel
print("ok")
"""


@needs_triton
@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="no CUDA backend in triton")
def test_triton_gated_rms_norm_compiles_for_sm90():
    """The interpreter runs kernels as Python; this compiles them to an sm_90 (H100/H200) binary as a GPU would,
    which needs no GPU, in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, "-c", COMPILE_FOR_H200], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr[-3000:]


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm_on_cuda_runs_the_kernel(dtype):
    from hybridmoe.kernels import norm

    assert norm._triton_norm() is not None
    y, z, w = _inputs((3, 37, 512), dtype, dtype, device="cuda")
    for out_dtype in (torch.float32, dtype):
        check_against_reference(gated_rms_norm, y, z, w, 256, out_dtype, 1e-5 if dtype == torch.float32 else 1e-2,
                                1e-4 if dtype == torch.float32 else 1e-2)  # fmt: skip
