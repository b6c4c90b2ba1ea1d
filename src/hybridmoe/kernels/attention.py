"""Causal grouped-query attention without positional encoding, with packed-document and padding masks.

Faithful to transformers' `NemotronHAttention` (softmax scale 1/sqrt(head_dim), no RoPE, GQA). The fast path is
`torch.nn.functional.scaled_dot_product_attention`. A chunk of queries that follows cached keys (chunked prefill,
no other mask) is two flash-attention calls, the prefix seen whole and the chunk's own keys causally, merged by
their log-sum-exp (`attention_after_prefix`), so its working set does not grow with the number of cached keys. When
a mask is needed (packed documents, left padding) it is built per block of queries, so memory stays O(block x keys)
instead of O(queries x keys). The twin is `attention_reference`: repeat the KV heads, softmax(QK^T + mask) V in fp32.

Legend: b batch, h query heads, kv key/value heads, t queries, s keys, d head dim.
Masks: a query at absolute position `q_offset + i` sees key j when j <= q_offset + i, both lie in the same document
(`document_ids`, one id per key position) and the key is not padding (`key_valid`). A padding query (which sees
nothing) is allowed to see itself so that no row is empty; its output is never used.

SDPA backends on CUDA (`sdpa_backend`, chosen per phase by the inference engine): PyTorch may dispatch SDPA to cuDNN,
which builds an execution plan for every new shape; a decode step's key length changes every token, so the plan is
rebuilt every token. Prefill takes flash attention (then memory-efficient, then math); decode, whose mask rules flash
out, takes memory-efficient (then math). Neither phase takes cuDNN. On the CPU nothing changes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def attention_mask_block(t0, t1, s, q_offset, document_ids, key_valid, device):
    """Boolean mask (b or 1, 1, t1-t0, s) for queries t0..t1-1."""
    pos_q = torch.arange(t0, t1, device=device) + q_offset
    pos_k = torch.arange(s, device=device)
    allowed = (pos_k[None, :] <= pos_q[:, None])[None, None]  # (1,1,t,s)
    if document_ids is not None:
        doc_q = document_ids[:, q_offset + t0 : q_offset + t1]
        allowed = allowed & (doc_q[:, None, :, None] == document_ids[:, None, None, :s])
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :s].bool()
        allowed = allowed | (pos_k[None, :] == pos_q[:, None])[None, None]
    return allowed


def attention_reference(q, k, v, q_offset=0, document_ids=None, key_valid=None):
    """q (b,h,t,d), k/v (b,kv,s,d). document_ids / key_valid (b,s) cover all key positions."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    t, s = q.shape[2], k.shape[2]
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    allowed = attention_mask_block(0, t, s, q_offset, document_ids, key_valid, q.device)
    scores = scores.masked_fill(~allowed, -torch.inf)
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def attention(q, k, v, q_offset=0, document_ids=None, key_valid=None, block_size=1024):
    """Fast path; same contract as `attention_reference`."""
    t, s = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if document_ids is None and key_valid is None:
        if q_offset == 0 and t == s:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if t == 1 and q_offset == s - 1:  # one new token sees every cached key
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        if q_offset + t == s and _can_merge_prefix(q, k, v):
            return attention_after_prefix(q, k, v, q_offset)
    out = torch.empty_like(q)
    for t0 in range(0, t, block_size):
        t1 = min(t, t0 + block_size)
        mask = attention_mask_block(t0, t1, s, q_offset, document_ids, key_valid, q.device)
        out[:, :, t0:t1] = F.scaled_dot_product_attention(q[:, :, t0:t1], k, v, attn_mask=mask, enable_gqa=gqa)
    return out


def _can_merge_prefix(q, k, v):
    # The CPU flash kernel returns the log-sum-exp the merge needs; its backward ignores a gradient of that
    # log-sum-exp, so the merged path is for inference only.
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return q.device.type == "cpu" and not grad


def attention_after_prefix(q, k, v, q_offset):
    """Queries at positions q_offset..q_offset+t-1 over keys 0..q_offset+t-1 (s = q_offset + t), no other mask.

    Every query sees the whole prefix 0..q_offset-1, so the query heads of one KV group are stacked as extra rows of
    one unmasked flash call (no copy of the cached keys); the chunk's own t keys are a square causal call. The two
    partial softmaxes are merged with their log-sum-exps: out = sum_i exp(lse_i - lse) out_i, lse = logaddexp(lse_i).
    """
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    b, h, t, d = q.shape
    kv = k.shape[1]
    rep = h // kv
    scale = d**-0.5
    o1, l1 = flash(q.reshape(b, kv, rep * t, d), k[:, :, :q_offset], v[:, :, :q_offset], scale=scale)
    o1, l1 = o1.reshape(b, h, t, d), l1.reshape(b, h, t)
    k2, v2 = k[:, :, q_offset:], v[:, :, q_offset:]
    if rep > 1:
        k2, v2 = k2.repeat_interleave(rep, dim=1), v2.repeat_interleave(rep, dim=1)
    o2, l2 = flash(q, k2, v2, is_causal=True, scale=scale)
    lse = torch.logaddexp(l1, l2)
    w1, w2 = (l1 - lse).exp().unsqueeze(-1), (l2 - lse).exp().unsqueeze(-1)
    return (o1.float() * w1 + o2.float() * w2).to(q.dtype)


def sdpa_backend(phase: str, device: torch.device | str):
    """A context manager that pins the SDPA backends of `phase` ("prefill" or "decode") on a CUDA device (see the
    module docstring); on any other device it does nothing."""
    if phase not in ("prefill", "decode"):
        raise ValueError(f"sdpa_backend phase must be 'prefill' or 'decode', got {phase!r}")
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if phase == "prefill":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
