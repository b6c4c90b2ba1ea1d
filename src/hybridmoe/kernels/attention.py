"""Causal grouped-query attention without positional encoding, with packed-document and padding masks.

Faithful to transformers' `NemotronHAttention` (softmax scale 1/sqrt(head_dim), no RoPE, GQA). The fast path is
`torch.nn.functional.scaled_dot_product_attention`; when a mask is needed (packed documents, left padding, a query
block that starts after cached keys) it is built per block of queries, so memory stays O(block x keys) instead of
O(queries x keys). The twin is `attention_reference`: repeat the KV heads, softmax(QK^T + mask) V in fp32.

Legend: b batch, h query heads, kv key/value heads, t queries, s keys, d head dim.
Masks: a query at absolute position `q_offset + i` sees key j when j <= q_offset + i, both lie in the same document
(`document_ids`, one id per key position) and the key is not padding (`key_valid`). A padding query (which sees
nothing) is allowed to see itself so that no row is empty; its output is never used.
"""

from __future__ import annotations

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
    out = torch.empty_like(q)
    for t0 in range(0, t, block_size):
        t1 = min(t, t0 + block_size)
        mask = attention_mask_block(t0, t1, s, q_offset, document_ids, key_valid, q.device)
        out[:, :, t0:t1] = F.scaled_dot_product_attention(q[:, :, t0:t1], k, v, attn_mask=mask, enable_gqa=gqa)
    return out
