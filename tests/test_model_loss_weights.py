"""Per-token loss weights (`loss_weights`, what SFT's loss normalizations use): the LM loss and every MTP depth
against a plain per-token cross-entropy twin, values and gradients, through both loss paths (chunked fused and
from logits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.kernels.loss import IGNORE_INDEX


def _inputs(seed=0, b=2, t=40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (b, t), generator=g)
    labels = ids.clone()
    labels[torch.rand(b, t, generator=g) < 0.3] = IGNORE_INDEX
    docs = torch.cat([torch.zeros(b, 15), torch.ones(b, 17), torch.full((b, t - 32), 2)], 1).long()
    # per-document weights, as a per-conversation normalization gives (and 0 on the padding-like last one)
    weights = torch.tensor([0.5, 0.25, 0.0])[docs] * (labels != IGNORE_INDEX)
    return ids, labels, docs, weights


def _twin_loss(h, head, labels, shift, weights, docs=None):
    """sum_j w_j * CE_j with the logits formed in full and cross-entropy per token."""
    y = torch.full_like(labels, IGNORE_INDEX)
    y[:, :-shift] = labels[:, shift:]
    w = torch.zeros_like(weights)
    w[:, :-shift] = weights[:, shift:]
    if docs is not None:
        same = torch.zeros_like(docs, dtype=torch.bool)
        same[:, :-shift] = docs[:, shift:] == docs[:, :-shift]
        y = torch.where(same, y, IGNORE_INDEX)
    ce = F.cross_entropy(head(h).float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return (ce * w.flatten()).sum()


@pytest.mark.parametrize("return_logits", [False, True])
def test_weighted_losses_match_a_per_token_twin(return_logits):
    torch.manual_seed(0)
    model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug", router_aux_loss_coef=0.0))
    model.train()
    ids, labels, docs, weights = _inputs()
    out = model(ids, labels=labels, document_ids=docs, loss_weights=weights, return_logits=return_logits)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    lm = _twin_loss(out.hidden_states, model.lm_head, labels, 1, weights)
    depths = [_twin_loss(h, model.lm_head, labels, k + 2, weights, docs) for k, h in enumerate(out.mtp_hidden_states)]
    torch.testing.assert_close(out.lm_loss, lm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mtp_loss, torch.stack(depths).mean(), rtol=1e-5, atol=1e-6)

    again = model(ids, document_ids=docs, return_logits=False)  # the same forward, the twin's loss
    lm = _twin_loss(again.hidden_states, model.lm_head, labels, 1, weights)
    mtp_ctx_hidden = model.forward_mtp(again.hidden_states, ids, model._context(ids, None, docs, None, None))
    depths = [_twin_loss(h, model.lm_head, labels, k + 2, weights, docs) for k, h in enumerate(mtp_ctx_hidden)]
    (lm + model.config.mtp_loss_weight * torch.stack(depths).mean()).backward()
    for name, g in grads.items():
        torch.testing.assert_close(g, model.get_parameter(name).grad, rtol=1e-4, atol=1e-6, msg=name)


def test_uniform_weights_give_the_token_mean():
    """Weights 1/N on the N targets reproduce the unweighted LM loss (a token mean)."""
    torch.manual_seed(0)
    model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug", num_nextn_predict_layers=0)).eval()
    ids, labels, _, _ = _inputs(1)
    targets = labels != IGNORE_INDEX
    targets[:, 0] = False  # nothing predicts the first label
    weights = targets.float() / targets.sum()
    with torch.no_grad():
        plain = model(ids, labels=labels, return_logits=False).lm_loss
        weighted = model(ids, labels=labels, return_logits=False, loss_weights=weights).lm_loss
    torch.testing.assert_close(weighted, plain, rtol=1e-6, atol=1e-6)


def test_loss_weights_of_the_wrong_shape_are_refused():
    model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug"))
    ids, labels, _, weights = _inputs()
    with pytest.raises(ValueError, match="loss_weights must be floats of shape"):
        model(ids, labels=labels, loss_weights=weights[:, :-1])
    with pytest.raises(ValueError, match="loss_weights must be floats"):
        model(ids, labels=labels, loss_weights=(weights > 0).long())
