"""The model itself: packed documents, losses, multi-token prediction, causality, routing, the balancing loss,
initialization, weight-decay groups, input validation and bf16.

Every model is the `debug` preset (layers M * E M - E, hidden 64, vocab 512) or a variant of it; sequences are at
most 60 tokens. fp32 comparisons use max-abs-diff <= 1e-4 for logits and 1e-5 for losses unless stated.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.kernels.loss import IGNORE_INDEX
from hybridmoe.modeling import Experts, GatedRMSNorm, LatentMoE, Mamba2Mixer, RMSNorm, TopkRouter

# Tiny matmuls on a shared 2-core machine: intra-op threads only add contention (measured 100x slower with 2).

VOCAB = 512
ATOL = 1e-4


def config(**overrides) -> HybridMoEConfig:
    return HybridMoEConfig.from_preset("debug", **overrides)


@functools.cache
def _cached(seed: int = 0, **overrides) -> HybridMoEForCausalLM:
    torch.manual_seed(seed)
    return HybridMoEForCausalLM(config(**overrides))


def model(seed: int = 0, **overrides) -> HybridMoEForCausalLM:
    """A shared, read-only model (eval mode); build a fresh one for tests that train or mutate it."""
    m = _cached(seed, **overrides)
    m.eval()
    return m


def fresh(seed: int = 0, **overrides) -> HybridMoEForCausalLM:
    torch.manual_seed(seed)
    return HybridMoEForCausalLM(config(**overrides))


def ids_for(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def moe_layers(m: HybridMoEForCausalLM, mtp: bool = False) -> list[LatentMoE]:
    blocks = list(m.backbone.layers) + (list(m.mtp.layers) if mtp and m.mtp is not None else [])
    return [blk.mixer for blk in blocks if blk.symbol == "E"]


# ---------------------------------------------------------------------------------------------- packed documents

# Row 0: boundaries at 5, 16, 17, 19, 29, 48 (16 and 48 on 16-token chunk boundaries; documents of 1 and 2 tokens,
# shorter than the conv window; a 19-token document covering a whole chunk). Ids repeat on purpose: a document is a
# contiguous run of one id. Row 1: three documents, boundaries at 16 and 46.
PACKED_ROWS = [([5, 11, 1, 2, 10, 19, 12], [0, 1, 0, 1, 0, 1, 0]), ([16, 30, 14], [5, 9, 2])]
PACKED_LEN = 60


def _packed_batch(seed=2):
    ids = ids_for(len(PACKED_ROWS), PACKED_LEN, seed=seed)
    doc = torch.empty_like(ids)
    spans = []
    for r, (lengths, labels) in enumerate(PACKED_ROWS):
        assert sum(lengths) == PACKED_LEN
        start, row = 0, []
        for n, lab in zip(lengths, labels):
            doc[r, start : start + n] = lab
            row.append((start, start + n))
            start += n
        spans.append(row)
    return ids, doc, spans


@pytest.mark.parametrize(
    "pattern,chunk_size",
    [
        ("MM", 16),  # Mamba only: neither the conv window nor the SSM state may cross a boundary
        ("**", 16),  # attention only: block-diagonal causal mask
        ("M*EM-E", 16),  # every layer kind
        ("M*EM-E", 5),  # boundaries now mostly inside chunks (5 on a chunk boundary)
    ],
)
@torch.no_grad()
def test_packed_documents_match_separate_forwards(pattern, chunk_size):
    m = model(hybrid_override_pattern=pattern, chunk_size=chunk_size, num_nextn_predict_layers=0)
    ids, doc, spans = _packed_batch()
    packed = m(ids, document_ids=doc).logits
    for r, row in enumerate(spans):
        for a, b in row:
            alone = m(ids[r : r + 1, a:b]).logits[0]
            d = max_diff(packed[r, a:b], alone)
            assert d <= ATOL, f"row {r} document [{a}, {b}) pattern {pattern} chunk {chunk_size}: max diff {d}"
    # and packing really matters: without document_ids the later documents see the earlier ones
    unpacked = m(ids).logits
    assert max_diff(unpacked[0, 5:16], packed[0, 5:16]) > 1e-3


@torch.no_grad()
def test_document_ids_are_runs_not_labels():
    """Two separated runs with the same id are two documents (ids need only change at document starts)."""
    m = model(num_nextn_predict_layers=0)
    ids = ids_for(1, 30, seed=3)
    a = m(ids, document_ids=torch.tensor([[4] * 10 + [8] * 10 + [4] * 10])).logits
    b = m(ids, document_ids=torch.tensor([[0] * 10 + [1] * 10 + [2] * 10])).logits
    assert max_diff(a, b) <= 1e-6


def _packed_labels(ids, spans):
    """Labels are unshifted; a document's first token must not be the target of the previous document's last
    token, so it is ignored (the same convention a lone document has: its first token is never a target)."""
    labels = ids.clone()
    for r, row in enumerate(spans):
        for a, _ in row[1:]:
            labels[r, a] = IGNORE_INDEX
    return labels


@pytest.mark.parametrize("return_logits", [True, False])
@torch.no_grad()
def test_packed_loss_is_token_weighted_average_of_document_losses(return_logits):
    m = model(num_nextn_predict_layers=0)
    ids, doc, spans = _packed_batch(seed=4)
    labels = _packed_labels(ids, spans)
    out = m(ids, labels=labels, document_ids=doc, return_logits=return_logits)
    total, count = 0.0, 0
    for r, row in enumerate(spans):
        for a, b in row:
            piece = ids[r : r + 1, a:b]
            loss = m(piece, labels=piece).lm_loss
            total += loss.item() * (b - a - 1)
            count += b - a - 1
    assert abs(out.lm_loss.item() - total / count) <= 1e-5
    assert out.loss.item() == out.lm_loss.item()


@torch.no_grad()
def test_packed_mtp_loss_is_token_weighted_average_of_document_mtp_losses():
    """With packing, MTP depth k at position i predicts token i+k+2; a target in the next document must be ignored
    just as a lone document has no target there. The first token of each document is already ignored for the
    main loss (see `_packed_labels`), but depth k would also need the next k+1 tokens ignored, which a single
    label tensor cannot express without breaking the main loss: the model itself has to drop those targets."""
    m = model()  # debug preset: one MTP layer, two depths
    ids, doc, spans = _packed_batch(seed=4)
    labels = _packed_labels(ids, spans)
    out = m(ids, labels=labels, document_ids=doc)
    sums, counts = [0.0, 0.0], [0, 0]
    for r, row in enumerate(spans):
        for a, b in row:
            if b - a < 3:  # no MTP target inside a document this short
                continue
            piece = ids[r : r + 1, a:b]
            alone = m(piece, labels=piece)
            for k, h in enumerate(alone.mtp_hidden_states):
                n = b - a - (k + 2)
                if n > 0:
                    logits = m.lm_head(h[0, :n]).float()
                    sums[k] += F.cross_entropy(logits, piece[0, k + 2 :], reduction="sum").item()
                    counts[k] += n
    expected = sum(s / c for s, c in zip(sums, counts)) / 2
    assert abs(out.mtp_loss.item() - expected) <= 1e-5, (
        f"packed MTP loss {out.mtp_loss.item():.6f} != per-document {expected:.6f}: "
        "targets across document boundaries are trained on"
    )


# ---------------------------------------------------------------------------------------------- losses and logits


def _loss_and_grads(m, ids, labels, **kwargs):
    m.zero_grad(set_to_none=True)
    out = m(ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    return out, grads


def test_return_logits_false_gives_the_same_loss_and_gradients():
    m = fresh(seed=5)  # with MTP (2 depths) and the balancing loss: every loss term
    m.train()
    ids = ids_for(2, 40, seed=5)
    labels = ids.clone()
    labels[0, :7] = IGNORE_INDEX
    labels[1, 20:23] = IGNORE_INDEX
    with_logits, g1 = _loss_and_grads(m, ids, labels)
    without, g2 = _loss_and_grads(m, ids, labels, return_logits=False)
    assert with_logits.logits is not None and without.logits is None
    assert abs(with_logits.loss.item() - without.loss.item()) <= 1e-5
    assert abs(with_logits.lm_loss.item() - without.lm_loss.item()) <= 1e-5
    assert set(g1) == set(g2) == {n for n, _ in m.named_parameters()}
    for name in g1:
        scale = g1[name].abs().max().item()
        assert scale > 0, f"{name} got no gradient"
        rel = (g1[name] - g2[name]).abs().max().item() / scale
        assert rel <= 1e-5, f"{name}: relative gradient difference {rel}"


def test_lm_loss_is_shifted_cross_entropy_of_the_logits():
    m = model(num_nextn_predict_layers=0)
    ids = ids_for(2, 24, seed=6)
    labels = ids.clone()
    labels[1, 5:9] = IGNORE_INDEX
    with torch.no_grad():
        out = m(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    assert abs(out.lm_loss.item() - expected.item()) <= 1e-5


@torch.no_grad()
def test_logits_to_keep():
    m = model(num_nextn_predict_layers=0)
    ids = ids_for(2, 30, seed=7)
    full = m(ids, labels=ids)
    for k in (1, 3, 30):
        out = m(ids, labels=ids, logits_to_keep=k)
        assert out.logits.shape == (2, k, VOCAB)
        assert max_diff(out.logits, full.logits[:, -k:]) <= 1e-5
        assert abs(out.loss.item() - full.loss.item()) <= 1e-5  # the loss still covers every position
    assert m(ids, logits_to_keep=0).logits.shape == (2, 30, VOCAB)


# ---------------------------------------------------------------------------------------------- MTP


def test_mtp_loss_combines_and_matches_a_hand_computation():
    m = fresh(seed=8)
    c = m.config
    assert c.num_nextn_predict_layers == 1 and c.mtp_num_depths == 2
    ids = ids_for(2, 36, seed=8)
    labels = ids.clone()
    labels[0, 30:] = IGNORE_INDEX
    m.eval()
    with torch.no_grad():
        out = m(ids, labels=labels)
    assert torch.isfinite(out.mtp_loss) and out.mtp_loss.item() > 0
    assert out.aux_loss is None
    assert abs(out.loss.item() - (out.lm_loss.item() + c.mtp_loss_weight * out.mtp_loss.item())) <= 1e-5
    assert len(out.mtp_hidden_states) == 2
    depth_losses = []
    for k, h in enumerate(out.mtp_hidden_states):
        assert h.shape == (2, 36, c.hidden_size)
        logits = m.lm_head(h).float()[:, : 36 - (k + 2)]  # depth k at position i predicts token i+k+2
        depth_losses.append(F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, k + 2 :].reshape(-1)))
    assert abs(out.mtp_loss.item() - torch.stack(depth_losses).mean().item()) <= 1e-5

    m.train()
    out = m(ids, labels=labels)
    assert out.aux_loss is not None
    expected = out.lm_loss + c.mtp_loss_weight * out.mtp_loss + c.router_aux_loss_coef * out.aux_loss
    assert abs(out.loss.item() - expected.item()) <= 1e-5


def test_mtp_loss_reaches_mtp_layers_and_embeddings():
    m = fresh(seed=9)
    m.train()
    ids = ids_for(2, 40, seed=9)
    out = m(ids, labels=ids)
    out.mtp_loss.backward()
    mtp_params = [(n, p) for n, p in m.named_parameters() if n.startswith("mtp.layers.")]
    assert len(mtp_params) > 10
    for name, p in mtp_params:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, f"{name} got a zero gradient from the MTP loss"
    for name in ("backbone.embeddings.weight", "lm_head.weight", "backbone.layers.0.mixer.in_proj.weight"):
        p = m.get_parameter(name)
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_mtp_weight_zero_skips_mtp():
    m = fresh(seed=9, mtp_loss_weight=0.0)
    ids = ids_for(1, 20, seed=9)
    with torch.no_grad():
        out = m.eval()(ids, labels=ids)
    assert out.mtp_loss is None and out.loss.item() == out.lm_loss.item()


@pytest.mark.parametrize("t", [1, 2, 3])
def test_mtp_on_sequences_shorter_than_its_depths(t):
    """A 1- or 2-token sequence has no MTP target at depth 2; the forward must still work (loss 0 for no targets,
    as the main loss does when every label is ignored)."""
    m = model()
    assert m.config.mtp_num_depths == 2
    ids = ids_for(2, t, seed=40 + t)
    with torch.no_grad():
        out = m(ids, labels=ids)
    assert torch.isfinite(out.loss) and torch.isfinite(out.mtp_loss)
    assert [tuple(h.shape) for h in out.mtp_hidden_states] == [(2, t, m.config.hidden_size)] * 2
    if t == 1:
        assert out.lm_loss.item() == 0 and out.mtp_loss.item() == 0


@torch.no_grad()
def test_mtp_depth_k_at_position_i_sees_tokens_up_to_i_plus_k_plus_1_only():
    m = model(seed=10)
    T = 40
    ids = ids_for(1, T, seed=10)
    base = m(ids, labels=ids)
    for j in (6, 16, 17, 33):  # change one token, j, at a time
        changed = ids.clone()
        changed[0, j] = (changed[0, j] + 1 + j) % VOCAB
        out = m(changed, labels=changed)
        assert max_diff(out.hidden_states[:, :j], base.hidden_states[:, :j]) <= 1e-6
        for k, (h, h0) in enumerate(zip(out.mtp_hidden_states, base.mtp_hidden_states)):
            last_blind = j - k - 2  # depth k at position i must not see token j when j > i + k + 1
            if last_blind >= 0:
                d = max_diff(h[:, : last_blind + 1], h0[:, : last_blind + 1])
                assert d <= 1e-6, f"depth {k}: positions <= {last_blind} changed ({d}) with token {j}"
            # ... and does see it at position j - k - 1 (sanity: the test can detect a dependence)
            assert max_diff(h[:, j - k - 1], h0[:, j - k - 1]) > 1e-4, f"depth {k} ignores token {j}"


@pytest.mark.parametrize("i", [0, 7, 15, 16, 31])
@torch.no_grad()
def test_logits_at_position_i_do_not_depend_on_later_tokens(i):
    m = model(num_nextn_predict_layers=0)
    ids = ids_for(2, 48, seed=11)
    base = m(ids).logits
    changed = ids.clone()
    changed[:, i + 1 :] = ids_for(2, 48 - i - 1, seed=100 + i)
    out = m(changed).logits
    assert max_diff(out[:, : i + 1], base[:, : i + 1]) <= 1e-6
    assert max_diff(out[:, i + 1], base[:, i + 1]) > 1e-3  # the changed token itself matters


# ---------------------------------------------------------------------------------------------- balancing loss


def _hand_aux_loss(gate: TopkRouter, x_TD: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, E * sum_i f_i P_i averaged over sequences, from scratch."""
    E, K = gate.num_experts, gate.top_k
    s = torch.sigmoid(x_TD.double() @ gate.weight.double().T).view(b, t, E)
    chosen = (s + gate.e_score_correction_bias.double()).topk(K, dim=-1).indices  # n_group = 1
    onehot = F.one_hot(chosen, E).sum(2).double()  # (b, t, E)
    f = onehot.sum(1) / (t * K)
    P = (s / s.sum(-1, keepdim=True)).mean(1)
    return E * (f * P).sum(-1).mean()


@pytest.mark.parametrize("pattern", ["M*E", "M*EM-E"])  # one MoE layer; two (the loss is their mean)
def test_aux_loss_matches_hand_computation_in_training(pattern):
    # without MTP: its MoE layer also adds one aux term per depth (checked below in the MTP variant)
    m = fresh(seed=12, router_aux_loss_coef=0.01, hybrid_override_pattern=pattern, num_nextn_predict_layers=0)
    m.train()
    ids = ids_for(3, 24, seed=12)
    captured = {}
    hooks = [
        layer.gate.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, args[0].detach()))
        for i, layer in enumerate(moe_layers(m))
    ]
    try:
        out = m(ids, labels=ids)
    finally:
        for h in hooks:
            h.remove()
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss) and out.aux_loss.item() > 0
    hand = [_hand_aux_loss(layer.gate, captured[i], 3, 24) for i, layer in enumerate(moe_layers(m))]
    assert len(hand) == pattern.count("E")
    assert abs(out.aux_loss.item() - torch.stack(hand).mean().item()) <= 1e-6
    expected_total = out.lm_loss + 0.01 * out.aux_loss
    assert abs(out.loss.item() - expected_total.item()) <= 1e-5
    # the balancing loss trains the router
    out.aux_loss.backward()
    assert moe_layers(m)[0].gate.weight.grad.abs().max() > 0


def test_aux_loss_absent_in_eval_and_with_zero_coefficient():
    m = fresh(seed=12, router_aux_loss_coef=0.01)
    ids = ids_for(1, 16, seed=12)
    with torch.no_grad():
        assert m.eval()(ids, labels=ids).aux_loss is None
    m0 = fresh(seed=12, router_aux_loss_coef=0.0).train()
    out = m0(ids, labels=ids)
    assert out.aux_loss is None
    assert abs(out.loss.item() - (out.lm_loss + 0.3 * out.mtp_loss).item()) <= 1e-6


def test_tokens_per_expert_counts_top_k_per_token_in_training_only():
    m = fresh(seed=13)
    K = m.config.num_experts_per_tok
    layers = moe_layers(m)
    mtp_layers = [layer for layer in moe_layers(m, mtp=True) if layer not in layers]
    assert len(layers) == 2 and len(mtp_layers) == 1
    for layer in layers + mtp_layers:
        assert (layer.tokens_per_expert == 0).all()
    ids = ids_for(2, 20, seed=13)
    m.train()
    with torch.no_grad():
        m(ids)  # no labels: MTP does not run
        for layer in layers:
            assert layer.tokens_per_expert.sum().item() == K * 40
            assert layer.tokens_per_expert.max().item() <= 40  # top-k experts are distinct
        assert (mtp_layers[0].tokens_per_expert == 0).all()
        m(ids, labels=ids)  # accumulates; MTP layer serves two depths
        for layer in layers:
            assert layer.tokens_per_expert.sum().item() == 2 * K * 40
        assert mtp_layers[0].tokens_per_expert.sum().item() == 2 * K * 40
        before = [layer.tokens_per_expert.clone() for layer in layers + mtp_layers]
        m.eval()
        m(ids, labels=ids)
        for layer, b in zip(layers + mtp_layers, before):
            assert torch.equal(layer.tokens_per_expert, b)


def test_tokens_per_expert_counts_exactly_in_a_bf16_model():
    """The counts feed the aux-loss-free bias update; a bf16 buffer cannot hold integers above 256 exactly."""
    m = fresh(seed=14, num_nextn_predict_layers=0).to(torch.bfloat16).train()
    K = m.config.num_experts_per_tok
    ids = ids_for(4, 80, seed=14)
    with torch.no_grad():
        for _ in range(5):
            m(ids)
    for layer in moe_layers(m):
        assert layer.tokens_per_expert.sum().item() == 5 * K * 320, (
            f"tokens_per_expert is {layer.tokens_per_expert.dtype} and lost counts: "
            f"{layer.tokens_per_expert.sum().item()} != {5 * K * 320}"
        )


# ---------------------------------------------------------------------------------------------- router


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_group_limited_selection_on_a_hand_built_example(norm_topk_prob):
    cfg = config(
        hidden_size=8,
        moe_latent_size=None,
        n_routed_experts=8,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
        routed_scaling_factor=2.5,
        norm_topk_prob=norm_topk_prob,
    )
    router = TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(8))  # router logits = x
        router.e_score_correction_bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 0, 1.2]))
    x = torch.tensor(
        [
            [3.0, -4.0, 1.0, 0.9, 0.5, 0.4, -3.0, -2.5],
            [0.2, 0.1, -1.0, -1.0, 2.0, 1.8, -1.0, -1.5],
        ]
    )
    # Groups {0,1} {2,3} {4,5} {6,7}, each scored by the sum of its top-2 *biased* scores.
    # Token 0: s = [.953 .018 .731 .711 .622 .599 .047 .076], biased s7 = 1.276; group scores
    #   [.971, 1.442, 1.221, 1.323] -> keep groups 1 and 3 (group 0 holds the best expert but loses: top-2 sum, not
    #   max); top-3 of the biased scores in them: 7, 2, 3.
    # Token 1: s = [.550 .525 .269 .269 .881 .858 .269 .182], biased s7 = 1.382; group scores
    #   [1.075, .538, 1.739, 1.651] -> groups 2 and 3; top-3: 7, 4, 5.
    expected_idx = [[2, 3, 7], [4, 5, 7]]
    scores, weights, idx = router(x)
    s = torch.sigmoid(x)
    assert torch.allclose(scores, s, atol=1e-7)  # scores are unbiased
    order = idx.sort(dim=-1)
    assert order.values.tolist() == expected_idx
    got_w = weights.gather(1, order.indices)
    for row, chosen in enumerate(expected_idx):
        w = s[row, chosen]  # the unbiased scores weight the experts (bias is for selection only)
        if norm_topk_prob:
            w = w / w.sum()
        assert torch.allclose(got_w[row], 2.5 * w, atol=1e-6), (got_w[row], 2.5 * w)
    if norm_topk_prob:
        assert torch.allclose(weights.sum(-1), torch.full((2,), 2.5), atol=1e-6)


def test_router_stays_fp32_and_ignores_bias_for_weights_with_one_group():
    cfg = config()
    router = TopkRouter(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_(0, 0.1)
    x = torch.randn(5, cfg.hidden_size)
    _, w0, i0 = router(x)
    with torch.no_grad():
        router.e_score_correction_bias[3] = 10.0  # expert 3 now always selected
    scores, w1, i1 = router(x)
    assert (i1 == 3).any(-1).all()
    picked = scores.gather(1, i1)
    assert torch.allclose(w1, cfg.routed_scaling_factor * picked / picked.sum(-1, keepdim=True), atol=1e-6)
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.float32 and router.e_score_correction_bias.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- init


def test_meta_construction_then_to_empty_and_init_weights():
    cfg = config(use_bias=True, mlp_bias=True)
    m = HybridMoEForCausalLM(cfg, device="meta")
    assert all(p.is_meta for p in m.parameters())
    assert all(b.is_meta for b in m.buffers())
    with torch.device("meta"):  # torch's default device, as transformers models take it
        shapes_only = HybridMoEForCausalLM(cfg)
    assert all(t.is_meta for t in [*shapes_only.parameters(), *shapes_only.buffers()])
    m.to_empty(device="cpu")
    m.init_weights()
    for name, p in m.named_parameters():
        assert p.device.type == "cpu" and torch.isfinite(p).all(), name
    for name, b in m.named_buffers():
        assert torch.isfinite(b).all() and (b == 0).all(), name  # router bias and expert counts start at 0
    with torch.no_grad():
        out = m(ids_for(1, 12), labels=ids_for(1, 12))
    assert torch.isfinite(out.loss)


def _std_ok(t: torch.Tensor, std: float, rel: float = 0.1) -> bool:
    return abs(t.float().std().item() - std) <= rel * std and abs(t.float().mean().item()) <= 0.1 * std


def test_init_statistics():
    cfg = config(use_bias=True, mlp_bias=True)
    m = HybridMoEForCausalLM(cfg, device="meta")
    m.to_empty(device="cpu")
    m.init_weights(generator=torch.Generator().manual_seed(0))
    std = cfg.initializer_range
    out_std = std / math.sqrt(cfg.num_hidden_layers)
    writers = ("o_proj", "out_proj", "down_proj", "fc2_latent_proj")
    n_linear = n_writer = 0
    for name, mod in m.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, torch.nn.Linear):
            expected = out_std if leaf in writers else std
            n_writer += leaf in writers
            n_linear += 1
            assert _std_ok(mod.weight, expected), f"{name}.weight std {mod.weight.std():.4f}, want {expected:.4f}"
            if mod.bias is not None:
                assert (mod.bias == 0).all(), name
        elif isinstance(mod, torch.nn.Embedding):
            assert _std_ok(mod.weight, std), name
        elif isinstance(mod, (RMSNorm, GatedRMSNorm)):
            assert (mod.weight == 1).all(), name
        elif isinstance(mod, TopkRouter):
            assert _std_ok(mod.weight, std), name
        elif isinstance(mod, Experts):
            assert _std_ok(mod.up_proj, std), name
            assert _std_ok(mod.down_proj, out_std), f"{name}.down_proj std {mod.down_proj.std():.4f}"
        elif isinstance(mod, Mamba2Mixer):
            assert (mod.A_log >= 0).all() and (mod.A_log <= math.log(16) + 1e-6).all(), name
            assert (mod.D == 1).all(), name
            dt = F.softplus(mod.dt_bias)
            assert (dt >= cfg.time_step_min * (1 - 1e-4)).all() and (dt <= cfg.time_step_max * (1 + 1e-4)).all()
            assert dt.max() / dt.min() > 2  # log-uniform, not constant
    assert n_linear > 20 and n_writer >= 10
    # the specific residual writers the recipe names, including the MTP layer's
    for name in (
        "backbone.layers.1.mixer.o_proj",
        "backbone.layers.0.mixer.out_proj",
        "backbone.layers.4.mixer.down_proj",
        "backbone.layers.2.mixer.shared_experts.down_proj",
        "backbone.layers.2.mixer.fc2_latent_proj",
    ):
        w = m.get_submodule(name).weight
        assert _std_ok(w, out_std), f"{name} std {w.std():.4f}, want {out_std:.4f}"
    assert _std_ok(m.get_submodule("backbone.layers.1.mixer.q_proj").weight, std)
    assert _std_ok(m.lm_head.weight, std)


def test_init_is_reproducible():
    a = fresh(seed=21)
    b = fresh(seed=21)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    c = fresh(seed=22)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    # an explicit generator makes init independent of the global RNG
    a.init_weights(generator=torch.Generator().manual_seed(3))
    torch.manual_seed(999)
    b.init_weights(generator=torch.Generator().manual_seed(3))
    for name, pa in a.state_dict().items():
        assert torch.equal(pa, b.state_dict()[name]), name


def test_no_weight_decay_parameter_names():
    m = HybridMoEForCausalLM(config(use_bias=True, mlp_bias=True), device="meta")
    names = m.no_weight_decay_parameter_names()
    all_params = dict(m.named_parameters())
    modules = dict(m.named_modules())
    expected = set()
    for name in all_params:
        owner, leaf = name.rsplit(".", 1)
        if leaf in ("A_log", "D", "dt_bias", "bias") or isinstance(modules[owner], (RMSNorm, GatedRMSNorm)):
            expected.add(name)
    assert names == expected
    # spot checks, both ways
    for must in (
        "backbone.layers.0.mixer.A_log",
        "backbone.layers.0.mixer.D",
        "backbone.layers.0.mixer.dt_bias",
        "backbone.layers.0.mixer.conv1d.bias",
        "backbone.layers.0.mixer.in_proj.bias",
        "backbone.layers.0.mixer.norm.weight",
        "backbone.layers.0.norm.weight",
        "backbone.norm_f.weight",
        "backbone.layers.4.mixer.up_proj.bias",
        "mtp.layers.0.enorm.weight",
        "mtp.layers.0.hnorm.weight",
        "mtp.layers.1.final_layernorm.weight",
    ):
        assert must in names, must
    for must_not in (
        "backbone.embeddings.weight",
        "lm_head.weight",
        "backbone.layers.0.mixer.in_proj.weight",
        "backbone.layers.0.mixer.conv1d.weight",
        "backbone.layers.1.mixer.q_proj.weight",
        "backbone.layers.2.mixer.gate.weight",
        "backbone.layers.2.mixer.experts.up_proj",
        "mtp.layers.0.eh_proj.weight",
    ):
        assert must_not in all_params and must_not not in names, must_not
    assert not any(n.endswith("_proj.weight") for n in names)


# ---------------------------------------------------------------------------------------------- bad input


def _raises(match, *args, **kwargs):
    m = model(num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match=match):
        m(*args, **kwargs)


def test_ids_outside_the_vocabulary_raise():
    ids = ids_for(2, 8)
    for bad in (-1, VOCAB, VOCAB + 1000):
        x = ids.clone()
        x[1, 3] = bad
        _raises(rf"input_ids\[1, 3\] = {bad} is outside the vocabulary \[0, {VOCAB}\)", x)


def test_empty_and_wrongly_shaped_ids_raise():
    _raises("empty", torch.zeros(1, 0, dtype=torch.long))
    _raises("empty", torch.zeros(0, 5, dtype=torch.long))
    _raises(r"\(batch, time\).*input_ids\[None\]", ids_for(1, 8)[0])
    _raises(r"\(batch, time\)", ids_for(1, 8)[None])
    _raises("integer token ids", ids_for(1, 8).float())
    _raises("torch.Tensor", [[1, 2, 3]])


def test_integer_id_dtypes_are_handled():
    """int32 ids work like int64. The model accepts int16 and uint8 in its dtype check; they must then either
    work or be refused with a message about the dtype -- not crash in the embedding or blame an in-range id."""
    m = model(num_nextn_predict_layers=0)
    ids = ids_for(1, 10) % 200
    with torch.no_grad():
        ref = m(ids).logits
        assert max_diff(m(ids.int()).logits, ref) == 0
        for dtype in (torch.int16, torch.uint8):
            try:
                got = m(ids.to(dtype)).logits
            except ValueError as e:
                assert "dtype" in str(e) or str(dtype).split(".")[-1] in str(e), f"{dtype}: {e}"
            except Exception as e:
                pytest.fail(f"{dtype} ids: {type(e).__name__} instead of ValueError or a result: {e}")
            else:
                assert max_diff(got, ref) == 0


def test_bad_labels_raise():
    ids = ids_for(2, 8)
    _raises(r"labels shape \(2, 7\) differs from input_ids \(2, 8\)", ids, labels=ids[:, :7])
    _raises("labels shape", ids, labels=ids[:1])
    for bad in (-1, -5, VOCAB):
        labels = ids.clone()
        labels[0, 2] = bad
        _raises(rf"labels\[0, 2\] = {bad} is outside the vocabulary.*ignore index -100", ids, labels=labels)
    ok = ids.clone()
    ok[:, :3] = IGNORE_INDEX
    with torch.no_grad():
        assert torch.isfinite(model(num_nextn_predict_layers=0)(ids, labels=ok).loss)


def test_float_labels_raise_value_error():
    ids = ids_for(2, 8)
    _raises("labels", ids, labels=ids.float())


def test_bad_document_ids_raise():
    ids = ids_for(2, 8)
    _raises("document_ids must be integers of shape", ids, document_ids=torch.zeros(2, 7, dtype=torch.long))
    _raises("document_ids must be integers of shape", ids, document_ids=torch.zeros(1, 8, dtype=torch.long))
    _raises("document_ids must be integers of shape", ids, document_ids=torch.zeros(2, 8))
    m = model(num_nextn_predict_layers=0)
    cache = m.new_cache(2, 16)
    with torch.no_grad():
        m(ids, cache=cache)
    with pytest.raises(ValueError, match="cannot continue a cache"):
        m(ids[:, :2], cache=cache, document_ids=torch.zeros(2, 2, dtype=torch.long))


def test_bad_attention_mask_raises():
    ids = ids_for(2, 8)
    _raises(r"attention_mask must have shape .* \(2, 8\)", ids, attention_mask=torch.ones(2, 7))
    _raises("attention_mask must have shape", ids, attention_mask=torch.ones(8))
    m = model(num_nextn_predict_layers=0)
    cache = m.new_cache(2, 16)
    with torch.no_grad():
        m(ids, cache=cache)
    # with a cache the mask covers cached + new tokens
    with pytest.raises(ValueError, match=r"\(2, 9\)"):
        m(ids[:, :1], cache=cache, attention_mask=torch.ones(2, 1))
    assert cache.seq_len == 8  # a refused call does not advance the cache


def test_cache_batch_size_mismatch_raises():
    m = model(num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="cache holds 3 sequences but input_ids has batch size 2"):
        m(ids_for(2, 4), cache=m.new_cache(3, 8))


# ---------------------------------------------------------------------------------------------- bf16 and copies


def test_bf16_forward_backward_and_closeness_to_fp32():
    cfg = config()
    m32 = fresh(seed=30)
    m16 = HybridMoEForCausalLM(cfg, device="meta")
    m16.to_empty(device="cpu")
    m16.load_state_dict(m32.state_dict())
    m16.to(torch.bfloat16)
    assert m16.lm_head.weight.dtype == torch.bfloat16
    assert m16.backbone.layers[0].mixer.in_proj.weight.dtype == torch.bfloat16
    for layer in moe_layers(m16, mtp=True):
        assert layer.gate.weight.dtype == torch.float32
        assert layer.gate.e_score_correction_bias.dtype == torch.float32
    ids = ids_for(2, 32, seed=30)
    m16.train()
    out = m16(ids, labels=ids)
    assert torch.isfinite(out.loss) and torch.isfinite(out.mtp_loss) and torch.isfinite(out.aux_loss)
    out.loss.backward()
    for name, p in m16.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad.float()).all(), name
    m16.eval()
    m32.eval()
    with torch.no_grad():
        l16 = m16(ids).logits
        o32 = m32(ids, labels=ids)
        o16 = m16(ids, labels=ids)
    assert l16.dtype == torch.float32  # logits are returned in fp32
    # bf16 rounding moves logits by ~1% of their spread; a token whose routing flips between two experts of
    # near-equal score may move more, so the max is bounded loosely and the mean tightly.
    diff = (l16 - o32.logits).abs()
    assert diff.mean().item() <= 0.03 * o32.logits.std().item()
    assert diff.max().item() <= 0.1 * o32.logits.abs().max().item()
    assert F.cosine_similarity(l16.flatten(), o32.logits.flatten(), dim=0) > 0.999
    assert abs(o16.lm_loss.item() - o32.lm_loss.item()) <= 0.02


def test_model_can_be_deep_copied_after_a_training_forward():
    """EMA / model averaging copy the model; a training forward must not leave graph tensors on the modules."""
    import copy

    m = fresh(seed=31, num_nextn_predict_layers=0)
    m.train()
    ids = ids_for(1, 16, seed=31)
    m(ids, labels=ids).loss.backward()
    clone = copy.deepcopy(m)
    assert torch.equal(clone.lm_head.weight, m.lm_head.weight)


def test_aux_loss_includes_each_mtp_depth():
    """The MTP layer's MoE is balanced too: one aux term per backbone MoE layer and per MTP depth."""
    m = fresh(seed=13, router_aux_loss_coef=0.01)  # debug: 2 backbone MoE layers, 1 MTP layer run at 2 depths
    m.train()
    ids = ids_for(2, 20, seed=13)
    calls = []
    gates = [mod for mod in m.modules() if isinstance(mod, TopkRouter)]
    hooks = [g.register_forward_hook(lambda mod, args, out: calls.append((mod, args[0].detach()))) for g in gates]
    try:
        out = m(ids, labels=ids)
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == 2 + m.config.mtp_num_depths
    hand = torch.stack([_hand_aux_loss(g, x, 2, 20) for g, x in calls]).mean()
    assert abs(out.aux_loss.item() - hand.item()) <= 1e-6


def test_the_model_runs_without_importing_dtensor():
    """torch.distributed.tensor costs about a second of start-up (every serve worker, CLI command and benchmark
    process pays it); the model, the engine and the command line leave it to the distributed code."""
    code = (
        "import sys, torch, hybridmoe.cli, hybridmoe.serve\n"
        "from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM\n"
        "model = HybridMoEForCausalLM(HybridMoEConfig.from_preset('debug'))\n"
        "model(torch.randint(0, 100, (1, 8)), labels=torch.randint(0, 100, (1, 8))).loss.backward()\n"
        "print('torch.distributed.tensor' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
