"""Mamba-2 state-space duality (SSD): the selective scan, its decode step, and the causal depthwise conv.

Faithful to "Transformers are SSMs" (Dao & Gu, 2024, arXiv 2405.21060): the recurrence of eq. (2) with a scalar
decay per head, `h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T`, `y_t = C_t h_t + D x_t`, and its chunked form
(Listing 1, `ssd_minimal`): intra-chunk quadratic term, per-chunk states, inter-chunk recurrence, state-to-output
term. Packed documents (`seq_idx`, one id per token, each document a contiguous run) never share state: the carried
state is dropped where the id changes, as in state-spaces/mamba's `seq_idx` argument.

The time step is handled as state-spaces/mamba's kernels handle it (`mamba_chunk_scan_combined(..., dt_bias,
dt_softplus, dt_limit)`, whose `_chunk_cumsum_fwd` computes, in fp32, `dt = softplus(dt + dt_bias)` (the identity
above 20) and then clamps it to `dt_limit = (low, high)`; padding steps get dt = 0). Every scan here takes the same
three arguments; their defaults take dt as given (already positive) and clamp it to (0, inf), as the reference does.
One deliberate difference: the reference's decode step (`selective_state_update`) has no `dt_limit`, so with a
finite limit its cached decode departs from its own full forward; `ssd_step` takes the limit too, and a decode
continues exactly the scan that a prefill or training step computes. With (0, inf), the limit of every published
Nemotron-H config, the two agree.

Twins: `ssd_reference` (one token at a time, the definition) and `ssd_chunked` (the fast path);
`causal_conv1d_reference` (a loop over taps) and `causal_conv1d` (F.conv1d, or shifted sums when documents
are packed). Everything runs in fp32 inside, whatever the input dtype; the outputs are fp32, except where
`ssd_chunked` and `causal_conv1d` hand CUDA tensors to the fused kernels of `ssd_cuda.py` (outputs in the input's
dtype there).

Legend: b batch, t time, h heads, p head dim, g B/C groups, n state size, c chunks, l/s positions in a chunk,
k conv taps, d channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NO_DT_LIMIT = (0.0, math.inf)


def ssd_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=NO_DT_LIMIT):
    """The time step the scans use, as state-spaces/mamba's `_chunk_cumsum_fwd` computes it: fp32, plus `dt_bias`
    (h,), softplus when `dt_softplus` (F.softplus is the identity above 20, as the kernel's `dt <= 20.0` test),
    clamped to `dt_limit` (outside it the gradient is 0, as the kernel's `clamp_mask`). dt (..., h)."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(dt_limit[0], dt_limit[1])


def _check_dt_limit(dt_limit):
    low, high = dt_limit
    if not 0.0 <= low <= high:
        raise ValueError(f"ssd: dt_limit must be (low, high) with 0 <= low <= high, got {tuple(dt_limit)}")


def _check_scan_inputs(x, dt, A, B, C, seq_idx, dt_bias, dt_limit):
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if dt.shape != (b, t, h) or A.shape != (h,) or B.shape != (b, t, g, n) or C.shape != (b, t, g, n):
        raise ValueError(
            f"ssd: shapes disagree: x {tuple(x.shape)} (b,t,h,p), dt {tuple(dt.shape)} (b,t,h), A {tuple(A.shape)} "
            f"(h,), B {tuple(B.shape)} and C {tuple(C.shape)} (b,t,g,n)"
        )
    if h % g:
        raise ValueError(f"ssd: {g} B/C groups do not divide {h} heads")
    if seq_idx is not None and seq_idx.shape != (b, t):
        raise ValueError(f"ssd: seq_idx has shape {tuple(seq_idx.shape)}, expected (batch, time) = {(b, t)}")
    if dt_bias is not None and dt_bias.shape != (h,):
        raise ValueError(f"ssd: dt_bias has shape {tuple(dt_bias.shape)}, expected (heads,) = {(h,)}")
    _check_dt_limit(dt_limit)


def ssd_reference(
    x, dt, A, B, C, D=None, initial_state=None, seq_idx=None, dt_bias=None, dt_softplus=False, dt_limit=NO_DT_LIMIT
):
    """The recurrence itself, one step per token. x (b,t,h,p), dt (b,t,h), A (h,) negative, B/C (b,t,g,n), D (h,),
    initial_state (b,h,p,n), seq_idx (b,t); dt_bias (h,), dt_softplus and dt_limit as in the module docstring (the
    defaults take dt as already positive). Returns y (b,t,h,p) and the final state.

    The time step is written out as the reference kernel's lines, not through `ssd_dt`, so the twins check it."""
    _check_scan_inputs(x, dt, A, B, C, seq_idx, dt_bias, dt_limit)
    b, t, h, p = x.shape
    rep = h // B.shape[2]
    x, dt, A = x.float(), dt.float(), A.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:  # tl.where(dt <= 20.0, softplus(dt), dt), softplus(dt) = log(exp(dt) + 1)
        dt = torch.where(dt <= 20.0, torch.log1p(torch.exp(dt.clamp(max=20.0))), dt)
    low, high = dt_limit  # tl.minimum(tl.maximum(dt, dt_min), dt_max), no gradient where it clamps
    dt = torch.where(dt < low, torch.full_like(dt, low), dt)
    dt = torch.where(dt > high, torch.full_like(dt, high), dt)
    D = D.float() if D is not None else None
    B_h = B.float().repeat_interleave(rep, dim=2)  # (b,t,h,n)
    C_h = C.float().repeat_interleave(rep, dim=2)
    state = (
        initial_state.float().clone() if initial_state is not None else x.new_zeros(b, h, p, B.shape[-1])
    )  # (b,h,p,n)
    ys = []
    for i in range(t):
        if seq_idx is not None and i > 0:
            keep = (seq_idx[:, i] == seq_idx[:, i - 1]).float()  # (b,)
            state = state * keep[:, None, None, None]
        decay = torch.exp(dt[:, i] * A)  # (b,h)
        state = state * decay[..., None, None] + (dt[:, i, :, None] * x[:, i])[..., None] * B_h[:, i, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", state, C_h[:, i])
        if D is not None:
            y = y + D[:, None] * x[:, i]
        ys.append(y)
    return torch.stack(ys, dim=1), state


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Stable segment sum: out[..., i, j] = sum_{j < m <= i} x[..., m] for j <= i, -inf above the diagonal.
    Computed by cumulative sums over a masked copy, not as a difference of two cumsums (which loses precision)."""
    L = x.size(-1)
    x = x[..., None].expand(*x.shape, L)  # (..., i=L, j=L) holding x[..., i]
    strictly_lower = torch.tril(torch.ones(L, L, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~strictly_lower, 0.0)
    out = torch.cumsum(x, dim=-2)
    lower = torch.tril(torch.ones(L, L, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~lower, -torch.inf)


def ssd_chunked(
    x, dt, A, B, C, D=None, chunk_size=128, initial_state=None, seq_idx=None,
    dt_bias=None, dt_softplus=False, dt_limit=NO_DT_LIMIT,
):  # fmt: skip
    """Chunked SSD scan (Mamba-2 paper, Listing 1) with packed-document support. Same contract as
    `ssd_reference` (the time step through `ssd_dt`); returns y (b,t,h,p) fp32 and the final state (b,h,p,n) fp32.

    Work is laid out per B/C group (b,g,r,c,l,p), with r = h/g heads per group, so every contraction is a plain
    batched matmul. As in state-spaces/mamba's Triton kernels, the decay between positions s <= l of a chunk is
    exp(cumsum_l - cumsum_s) of the chunk-local cumulative log decay. The scan runs in fp32 even under autocast.

    On CUDA, bf16/fp16 inputs run state-spaces/mamba's fused Triton scan when mamba_ssm is installed (`ssd_cuda.py`);
    it accumulates in fp32 and returns y in x's dtype."""
    _check_scan_inputs(x, dt, A, B, C, seq_idx, dt_bias, dt_limit)
    if x.is_cuda:
        from . import ssd_cuda

        if ssd_cuda.ssd_fits(x, B, C):
            return ssd_cuda.ssd_scan_cuda(
                x, dt, A, B, C, D, chunk_size, initial_state, seq_idx, dt_bias, dt_softplus, dt_limit
            )
    with torch.autocast(x.device.type, enabled=False):
        dt = ssd_dt(dt, dt_bias, dt_softplus, dt_limit)
        return _ssd_chunked(x, dt, A, B, C, D, chunk_size, initial_state, seq_idx)


def _ssd_chunked(x, dt, A, B, C, D, chunk_size, initial_state, seq_idx):
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    L = chunk_size
    pad = (-t) % L
    c = (t + pad) // L
    x32, dt32, B32, C32 = x.float(), dt.float(), B.float(), C.float()
    if pad:
        # Padding steps carry no input (x = 0) and no decay (dt = 0), so the final state is unchanged.
        x32 = F.pad(x32, (0, 0, 0, 0, 0, pad))
        dt32 = F.pad(dt32, (0, 0, 0, pad))
        B32 = F.pad(B32, (0, 0, 0, 0, 0, pad))
        C32 = F.pad(C32, (0, 0, 0, 0, 0, pad))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    dt_g = dt32.view(b, c, L, g, r).permute(0, 3, 4, 1, 2)  # (b,g,r,c,l)
    A_cs = torch.cumsum(dt_g * A.float().view(g, r, 1, 1), dim=-1)  # chunk-local cumulative log decay
    xdt = x32.view(b, c, L, g, r, p).permute(0, 3, 4, 1, 2, 5) * dt_g[..., None]  # (b,g,r,c,l,p)
    Bg = B32.view(b, c, L, g, n).permute(0, 3, 1, 2, 4)  # (b,g,c,l,n)
    Cg = C32.view(b, c, L, g, n).permute(0, 3, 1, 2, 4)
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    if seq_idx is not None:
        sid = seq_idx.view(b, 1, 1, c, L)
        same_doc = sid[..., :, None] == sid[..., None, :]  # (b,1,1,c,l,s)
        visible = same_doc & causal
    else:
        visible = causal

    # 1. Intra-chunk (diagonal blocks): y_l = sum_{s<=l} (C_l . B_s) exp(A_cs_l - A_cs_s) xdt_s
    y = _IntraChunk.apply(A_cs, Cg, Bg, xdt, ~visible)  # (b,g,r,c,l,p)

    # 2. Each chunk's own contribution to the state at its end: sum_s exp(A_cs_last - A_cs_s) xdt_s B_s^T
    decay_to_end = torch.exp(A_cs[..., -1:] - A_cs)  # (b,g,r,c,l)
    if seq_idx is not None:
        decay_to_end = decay_to_end * (sid == sid[..., -1:])
    chunk_states = torch.einsum("bgrclp,bgcln->bgrcpn", xdt * decay_to_end[..., None], Bg)

    # 3. Inter-chunk recurrence over chunk boundaries: S_c = exp(sum dtA over chunk c) S_{c-1} + chunk_states_c.
    if initial_state is None:
        init = chunk_states.new_zeros(b, g, r, 1, p, n)
    else:
        init = initial_state.float().view(b, g, r, 1, p, n)
    states = torch.cat([init, chunk_states], dim=3)  # (b,g,r,c+1,p,n)
    decay_chunks = torch.exp(segsum(F.pad(A_cs[..., -1], (1, 0))))  # (b,g,r,c+1,c+1) [to, from]
    if seq_idx is not None:
        # The state at the end of chunk z (z = -1: the initial state, in the first token's document) reaches
        # the end of chunk c only if both lie in the same document.
        end_doc = torch.cat([seq_idx[:, :1], seq_idx.view(b, c, L)[:, :, -1]], dim=1).view(b, 1, 1, c + 1)
        decay_chunks = decay_chunks * (end_doc[..., :, None] == end_doc[..., None, :])
    states = (decay_chunks @ states.view(b, g, r, c + 1, p * n)).view(b, g, r, c + 1, p, n)
    prev_states, final_state = states[:, :, :, :-1], states[:, :, :, -1]

    # 4. Off-diagonal blocks: the state entering chunk c, read out by C_l and decayed to position l.
    decay_from_start = torch.exp(A_cs)  # (b,g,r,c,l)
    if seq_idx is not None:
        decay_from_start = decay_from_start * (sid == end_doc[..., :-1, None])
    y_off = torch.einsum("bgcln,bgrcpn->bgrclp", Cg, prev_states)
    y = torch.addcmul(y, y_off, decay_from_start[..., None])

    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, c * L, h, p)[:, :t]
    if D is not None:
        y = torch.addcmul(y, x32[:, :t], D.float()[:, None])
    return y, final_state.reshape(b, h, p, n)


class _IntraChunk(torch.autograd.Function):
    """y = (exp(A_cs_l - A_cs_s) [s visible from l] * (C_l . B_s)) @ xdt, per chunk and head, with a hand-written
    backward that recomputes the (l, s) decay matrix instead of saving it. A_cs (b,g,r,c,l), C/B (b,g,c,l,n),
    xdt (b,g,r,c,l,p), hidden: bool, broadcastable to (b,g,r,c,l,s)."""

    @staticmethod
    def forward(ctx, A_cs, C, B, xdt, hidden):
        CB = (C @ B.transpose(-1, -2))[:, :, None]  # (b,g,1,c,l,s): one per group, shared by its r heads
        M = _decay_matrix(A_cs, hidden).mul_(CB)
        ctx.save_for_backward(A_cs, C, B, xdt, hidden, CB)
        return M @ xdt

    @staticmethod
    def backward(ctx, dy):
        A_cs, C, B, xdt, hidden, CB = ctx.saved_tensors
        E = _decay_matrix(A_cs, hidden)
        M = E * CB
        d_xdt = M.transpose(-1, -2) @ dy
        dM = dy @ xdt.transpose(-1, -2)  # (b,g,r,c,l,s)
        dCB = (dM * E).sum(2)  # (b,g,c,l,s)
        d_seg = dM.mul_(M)  # d/d(A_cs_l - A_cs_s) of exp(.) * CB
        d_A = d_seg.sum(-1) - d_seg.sum(-2)
        return d_A, dCB @ B, dCB.transpose(-1, -2) @ C, d_xdt, None


def _decay_matrix(A_cs, hidden):
    """exp(A_cs_l - A_cs_s), 0 where hidden (above the diagonal, or across documents)."""
    seg = A_cs[..., :, None] - A_cs[..., None, :]
    return seg.masked_fill_(hidden, -torch.inf).exp_()


def ssd_step(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, dt_limit=NO_DT_LIMIT):
    """One decode step of the recurrence, updating `state` (b,h,p,n, fp32) in place. x (b,h,p), dt (b,h), B/C
    (b,g,n); the time step through `ssd_dt`, clamped to `dt_limit` like the scans (see the module docstring).
    Returns y (b,h,p) fp32."""
    _check_dt_limit(dt_limit)
    rep = x.shape[1] // B.shape[1]
    x, dt = x.float(), ssd_dt(dt, dt_bias, dt_softplus, dt_limit)
    B_h = B.float().repeat_interleave(rep, dim=1)  # (b,h,n)
    C_h = C.float().repeat_interleave(rep, dim=1)
    decay = torch.exp(dt * A.float())  # (b,h)
    state.mul_(decay[..., None, None]).add_((dt[..., None] * x)[..., None] * B_h[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", state, C_h)
    if D is not None:
        y = y + D.float()[:, None] * x
    return y


# ---------------------------------------------------------------------------------------------- causal conv1d


def causal_conv1d_reference(x, weight, bias=None, seq_idx=None, initial_state=None):
    """Depthwise causal conv, written as its definition. x (b,t,d), weight (d,k), bias (d,), initial_state
    (b,k-1,d) = the inputs before x (zeros when None). A tap that reaches into another document contributes 0."""
    b, t, d = x.shape
    k = weight.shape[1]
    prev = initial_state if initial_state is not None else x.new_zeros(b, k - 1, d)
    xe = torch.cat([prev.to(x.dtype), x], dim=1)  # (b, k-1+t, d)
    if seq_idx is not None:
        se = torch.cat([seq_idx[:, :1].expand(b, k - 1), seq_idx], dim=1)
    out = []
    for i in range(t):
        acc = bias.float().expand(b, d).clone() if bias is not None else x.new_zeros(b, d, dtype=torch.float32)
        for j in range(k):  # tap j looks back k-1-j steps
            src = i + j
            term = xe[:, src].float() * weight[:, j].float()
            if seq_idx is not None:
                term = term * (se[:, src] == seq_idx[:, i]).float()[:, None]
            acc = acc + term
        out.append(acc)
    return torch.stack(out, dim=1)


def causal_conv1d(x, weight, bias=None, seq_idx=None, initial_state=None, activation=None):
    """Fast depthwise causal conv; same contract as `causal_conv1d_reference`, output fp32 (b,t,d), with the
    SiLU applied when activation="silu". A sum of k shifted copies (masked where the source lies in another
    document) with a hand-written backward; on CPU several times faster than F.conv1d's depthwise backward.

    On CUDA, Dao-AILab's causal-conv1d kernel runs when installed and the call fits it (`ssd_cuda.conv_fits`); it
    accumulates in fp32 and returns x's dtype."""
    b, t, d = x.shape
    k = weight.shape[1]
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    if x.is_cuda:
        from . import ssd_cuda

        if ssd_cuda.conv_fits(x, weight, bias, seq_idx, initial_state):
            return ssd_cuda.causal_conv1d_cuda_fn(x, weight, bias, seq_idx, initial_state, activation)
    prev = initial_state if initial_state is not None else x.new_zeros(b, k - 1, d)
    xe = torch.cat([prev.to(x.dtype), x], dim=1)  # (b, k-1+t, d)
    masks = None
    if seq_idx is not None:
        se = torch.cat([seq_idx[:, :1].expand(b, k - 1), seq_idx], dim=1)
        masks = torch.stack([se[:, j : j + t] == seq_idx for j in range(k - 1)])[..., None]  # (k-1,b,t,1)
    return _CausalConv.apply(xe, weight, bias, masks, activation == "silu")


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xe, weight, bias, masks, silu):
        k = weight.shape[1]
        t = xe.shape[1] - (k - 1)
        w = weight.float()
        xf = xe.float()
        out = xf[:, k - 1 :] * w[:, k - 1]
        if bias is not None:
            out += bias.float()
        for j in range(k - 1):
            tap = xf[:, j : j + t]
            out.addcmul_(tap * masks[j] if masks is not None else tap, w[:, j])
        ctx.save_for_backward(xe, weight, masks, out if silu else None)
        ctx.has_bias, ctx.silu = bias is not None, silu
        return F.silu(out) if silu else out

    @staticmethod
    def backward(ctx, g):
        xe, weight, masks, pre = ctx.saved_tensors
        k = weight.shape[1]
        t = g.shape[1]
        w = weight.float()
        g = g.float()
        if ctx.silu:
            g = torch.ops.aten.silu_backward(g, pre)
        xf = xe.float()
        gxe = torch.zeros(xe.shape, dtype=torch.float32, device=g.device)
        gw = torch.empty(weight.shape, dtype=torch.float32, device=g.device)
        for j in range(k):
            gj = g * masks[j] if (masks is not None and j < k - 1) else g
            gxe[:, j : j + t].addcmul_(gj, w[:, j])
            gw[:, j] = (gj * xf[:, j : j + t]).sum((0, 1))
        gb = g.sum((0, 1)).to(weight.dtype) if ctx.has_bias else None
        return gxe.to(xe.dtype), gw.to(weight.dtype), gb, None, None


def conv_window(prev, x, size):
    """The last `size` inputs of [prev (zeros when None), x] along time: the conv state after x. (b,size,d)"""
    b, t, d = x.shape
    if prev is None:
        prev = x.new_zeros(b, size, d)
    return torch.cat([prev, x.to(prev.dtype)], dim=1)[:, t:]


def causal_conv1d_step(conv_state, x, weight, bias=None):
    """One decode step. conv_state (b,k-1,d) holds the previous inputs and is updated in place; x (b,d).
    Returns the conv output (b,d) fp32 (before the activation)."""
    window = torch.cat([conv_state, x[:, None].to(conv_state.dtype)], dim=1)  # (b,k,d)
    conv_state.copy_(window[:, 1:])
    out = torch.einsum("bkd,dk->bd", window.float(), weight.float())
    if bias is not None:
        out = out + bias.float()
    return out
