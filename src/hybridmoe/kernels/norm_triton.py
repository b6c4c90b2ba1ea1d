"""Triton kernels for the gated RMSNorm of `norm.py` (twin: `gated_rms_norm_reference`), forward and backward.

One program normalizes one group of one row in the forward; the backward gives each program a block of rows of one
group and writes its partial weight gradient, summed afterwards, as state-spaces/mamba's
`mamba_ssm/ops/triton/layernorm_gated.py` does. With h = y * silu(z), x = h * rstd, rstd = 1 / sqrt(mean(h^2) + eps)
over the group, and out = w * x:
    dw = sum over rows of dout * x
    dh = rstd * (dout * w - x * mean(dout * w * x))
    dy = dh * silu(z),  dz = dh * y * sigmoid(z) * (1 + z * (1 - sigmoid(z)))
Everything is computed in fp32; y, z, weight and dout may come in any float dtype and their gradients go back in it.

Imported only on CUDA (by `norm.gated_rms_norm`) and by the tests, which run the kernels on CPU tensors under
`TRITON_INTERPRET=1` (set before this module is first imported: `triton.jit` reads it at decoration time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_rms_norm_fwd(
    Y, Z, W, OUT, RSTD, stride_y, stride_z, stride_out, n_groups, group_size, eps, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < group_size
    offs = grp * group_size + cols
    y = tl.load(Y + row * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(Z + row * stride_z + offs, mask=mask, other=0.0).to(tl.float32)
    h = y * z * tl.sigmoid(z)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / group_size + eps)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_out + offs, (w * (h * rstd)).to(OUT.dtype.element_ty), mask=mask)
    tl.store(RSTD + row * n_groups + grp, rstd)


@triton.jit
def _gated_rms_norm_bwd(
    Y, Z, W, DOUT, RSTD, DY, DZ, DW, stride_y, stride_z, stride_dout, stride_dy, stride_dz,
    n_rows, n_groups, group_size, rows_per_program, BLOCK: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    grp = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < group_size
    offs = grp * group_size + cols
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = block.to(tl.int64) * rows_per_program
    for i in range(0, tl.minimum(rows_per_program, n_rows - row_start)):
        row = row_start + i
        y = tl.load(Y + row * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(Z + row * stride_z + offs, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + row * stride_dout + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row * n_groups + grp)
        sig = tl.sigmoid(z)
        silu = z * sig
        x = y * silu * rstd
        dw += dout * x
        dx = dout * w
        dh = (dx - x * (tl.sum(dx * x, axis=0) / group_size)) * rstd
        tl.store(DY + row * stride_dy + offs, (dh * silu).to(DY.dtype.element_ty), mask=mask)
        dz = dh * y * sig * (1.0 + z * (1.0 - sig))
        tl.store(DZ + row * stride_dz + offs, dz.to(DZ.dtype.element_ty), mask=mask)
    tl.store(DW + block * n_groups * group_size + offs, dw, mask=mask)


def _rows(x):
    """(..., size) -> (rows, size) with unit stride along size (a view where the layout allows)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch_config(group_size: int):
    block = triton.next_power_of_2(group_size)
    if block > 65536:
        raise ValueError(f"gated_rms_norm_triton: group_size {group_size} is above the kernel's 65536 channels")
    return block, min(max(block // 256, 1), 16)


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, weight, group_size, eps, out_dtype):
        shape = y.shape
        y2, z2 = _rows(y), _rows(z)
        n_rows, size = y2.shape
        n_groups = size // group_size
        out = torch.empty((n_rows, size), dtype=out_dtype, device=y.device)
        rstd = torch.empty((n_rows, n_groups), dtype=torch.float32, device=y.device)
        weight = weight.contiguous()
        block, warps = _launch_config(group_size)
        if n_rows:
            _gated_rms_norm_fwd[(n_rows, n_groups)](
                y2, z2, weight, out, rstd, y2.stride(0), z2.stride(0), out.stride(0), n_groups, group_size, eps,
                BLOCK=block, num_warps=warps,
            )  # fmt: skip
        ctx.save_for_backward(y2, z2, weight, rstd)
        ctx.shape, ctx.group_size = shape, group_size
        return out.view(shape)

    @staticmethod
    def backward(ctx, dout):
        y2, z2, weight, rstd = ctx.saved_tensors
        group_size = ctx.group_size
        n_rows, size = y2.shape
        n_groups = size // group_size
        dout = _rows(dout)
        dy, dz = torch.empty_like(y2), torch.empty_like(z2)
        if y2.is_cuda:  # a few programs per SM over all groups, each summing its rows' weight gradient
            target = 4 * torch.cuda.get_device_properties(y2.device).multi_processor_count
        else:
            target = 4
        n_blocks = max(1, min(n_rows, target // n_groups))
        rows_per_program = triton.cdiv(max(n_rows, 1), n_blocks)
        dw_partial = torch.zeros((n_blocks, size), dtype=torch.float32, device=y2.device)
        block, warps = _launch_config(group_size)
        if n_rows:
            _gated_rms_norm_bwd[(n_blocks, n_groups)](
                y2, z2, weight, dout, rstd, dy, dz, dw_partial, y2.stride(0), z2.stride(0), dout.stride(0),
                dy.stride(0), dz.stride(0), n_rows, n_groups, group_size, rows_per_program, BLOCK=block,
                num_warps=warps,
            )  # fmt: skip
        dw = dw_partial.sum(0).to(weight.dtype)
        return dy.view(ctx.shape), dz.view(ctx.shape), dw, None, None, None


def gated_rms_norm_triton(y, z, weight, group_size: int, eps: float, out_dtype: torch.dtype = torch.float32):
    """The fused kernel with autograd: same contract as `norm.gated_rms_norm_reference`, result in `out_dtype`.
    y and z (..., size) may differ in dtype (the scan gives y in fp32 or the model dtype, z is the model dtype)."""
    size = y.shape[-1]
    if z.shape != y.shape or weight.shape != (size,):
        raise ValueError(
            f"gated_rms_norm: y {tuple(y.shape)} and z {tuple(z.shape)} must have one shape (..., size), "
            f"weight {tuple(weight.shape)} must be (size,)"
        )
    if group_size < 1 or size % group_size:
        raise ValueError(f"gated_rms_norm: group_size {group_size} must divide the normalized size {size}")
    return _GatedRMSNorm.apply(y, z, weight, group_size, float(eps), out_dtype)
