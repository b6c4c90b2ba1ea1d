"""Cross-entropy of the LM head without materializing [tokens x vocab] logits.

`linear_cross_entropy(h, W, labels)` equals `F.cross_entropy(h @ W^T, labels, reduction="sum", ignore_index=-100)`
(the twin `linear_cross_entropy_reference`); with `weights` (one per row) it is the weighted sum of the rows' losses,
what SFT's per-token and per-conversation normalizations need, in the same single pass. It walks the tokens in
chunks; for each chunk it forms the logits in fp32, takes the log-sum-exp and, when gradients are wanted, the
gradients of h and W right away (softmax - onehot), so nothing of size [tokens x vocab] outlives a chunk and backward
is only a scaling. The fused "linear + cross-entropy" idea is that of Liger-Kernel / Apple's cut-cross-entropy; this
is a plain PyTorch version of it.

Chunk size by device (`default_chunk_size`): on a CPU, chunks sized for the caches (256..2048 rows, 256 MB of fp32
logits at most); on a GPU, where every chunk costs a few dozen kernel launches from the host, as many rows as fit in
`GPU_LOGITS_BUDGET` bytes of fp32 logits: 2048 rows at vocab 32768, four chunks for a 4 x 2048-token batch. The budget
trades host time (a few dozen launches a chunk) against the peak memory at the end of the forward (about 1.5x the
budget); a chunk size of at least the number of rows makes one chunk. On a GPU nothing waits for the device (no
per-chunk check read back); on a CPU rows without a loss are left out before the head when they are many (SFT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import matmul_dtype

IGNORE_INDEX = -100
# Bytes of one chunk's fp32 logits on a GPU; the chunk's transients peak at about 1.5x this (bf16 logits and
# gradients next to the fp32 ones).
GPU_LOGITS_BUDGET = 2**28


def default_chunk_size(hidden: torch.Tensor, vocab: int) -> int:
    """Rows per chunk: on a CPU as many as keep one chunk's fp32 logits within 256 MB (256..2048); elsewhere (a GPU)
    as many as fit in GPU_LOGITS_BUDGET bytes of fp32 logits."""
    if hidden.device.type == "cpu":
        return max(256, min(2048, 2**26 // vocab))
    return max(1, GPU_LOGITS_BUDGET // (4 * vocab))


def linear_cross_entropy_reference(hidden, weight, labels, weights=None):
    logits = (hidden @ weight.T).float()
    if weights is None:
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return weighted_cross_entropy(logits, labels, weights)


def weighted_cross_entropy(logits, labels, weights):
    """From formed logits (n, v): the sum over rows with a label (-100: none) of each row's cross-entropy (fp32)
    times its weight (n,)."""
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return (ce * weights.float()).sum()


def linear_cross_entropy(
    hidden,
    weight,
    labels,
    chunk_size: int | None = None,
    logits_dtype: torch.dtype | None = None,
    weights: torch.Tensor | None = None,
):
    """hidden (n,d), weight (v,d), labels (n,) with -100 for ignored rows. Returns the summed loss (fp32).
    weights (n,): each row's loss is multiplied by its weight (computed in fp32; no gradient flows to the weights).
    chunk_size: rows per chunk; by default `default_chunk_size` (by device); hidden.shape[0] or more: one chunk.
    logits_dtype: round each chunk's logits, and the gradient with respect to them, to this dtype, as a model whose
    LM head outputs logits in that dtype before an fp32 loss does (transformers' bf16 models); None keeps them fp32."""
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"linear_cross_entropy: {hidden.shape[0]} rows of hidden but {labels.shape[0]} labels")
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(
            f"linear_cross_entropy: weights of shape {tuple(weights.shape)}; give one per row, {tuple(labels.shape)}"
        )
    if hidden.device.type == "cpu" and not torch.compiler.is_compiling():  # compiled: no count read back
        hidden, labels, weights = _rows_with_a_loss(hidden, labels, weights)
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden, weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_size, logits_dtype, weights)


def _rows_with_a_loss(hidden, labels, weights):
    """On a CPU, when at least an eighth of the rows have no loss (ignored or weighted 0: an SFT batch's prompts,
    often most rows), only the others go through the head: each row costs a [vocab x hidden] product in forward and
    two in backward, a row copy costs next to nothing, and reading the count back costs nothing on a CPU. The
    dropped rows get a zero gradient (index_select's backward). Batches with few such rows (pretraining) pass as
    they are."""
    keep = labels != IGNORE_INDEX
    if weights is not None:
        keep &= weights != 0
    if int(keep.sum()) > labels.shape[0] * 7 // 8:
        return hidden, labels, weights
    rows = keep.nonzero().squeeze(1)
    return hidden.index_select(0, rows), labels[rows], weights[rows] if weights is not None else None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, logits_dtype=None, weights=None):
        cdt = torch.float32 if matmul_dtype(hidden) == torch.float32 else hidden.dtype
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(cdt)
        n = hidden.shape[0]
        one_chunk = chunk_size >= n
        # one chunk: its gradients are the results (no full-size buffers to copy into)
        grad_h = None if one_chunk or not want_h else torch.empty(hidden.shape, dtype=torch.float32, device=w.device)
        grad_w = None if one_chunk or not want_w else torch.zeros(weight.shape, dtype=torch.float32, device=w.device)
        # on a CPU, all-valid chunks skip the masking pass; elsewhere asking would make the host wait for the device
        check_valid = hidden.device.type == "cpu" and not torch.compiler.is_compiling()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, max(n, 1), chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows].to(cdt)
            y = labels[rows]
            logits = h @ w.T  # (c,v)
            logits = logits.float() if logits_dtype is None else logits.to(logits_dtype).float()
            valid = y != IGNORE_INDEX
            safe_y = torch.where(valid, y, 0)
            # each row's factor: 1 for a target, 0 for an ignored row, or the target's weight
            scale = valid if weights is None else torch.where(valid, weights[rows].float(), 0.0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_y[:, None]).squeeze(1)
            total += ((lse - picked) * scale).sum()
            if want_h or want_w:
                # d loss / d logits = softmax - onehot (zero for ignored rows), formed in place over the logits
                g = logits.sub_(lse[:, None]).exp_()
                g.scatter_add_(1, safe_y[:, None], -torch.ones_like(picked)[:, None])
                if weights is not None or not check_valid or not bool(valid.all()):
                    g.mul_(scale[:, None])
                g = g.to(cdt) if logits_dtype is None else g.to(logits_dtype).to(cdt)
                if want_h and one_chunk:
                    grad_h = (g @ w).float()
                elif want_h:
                    grad_h[rows] = (g @ w).float()
                if want_w and one_chunk:
                    grad_w = (g.T @ h).float()
                elif want_w:
                    grad_w += (g.T @ h).float()
                del g
            del logits  # before the next chunk's logits exist: one [rows x vocab] buffer at a time
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_out).to(ctx.dtypes[0]) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.dtypes[1]) if grad_w is not None else None
        return gh, gw, None, None, None, None
