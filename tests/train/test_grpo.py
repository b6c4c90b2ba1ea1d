"""GRPO's arithmetic (`train.grpo`) on numbers worked out by hand, one test per recipe key."""

from __future__ import annotations

import math
import os

import pytest
import torch

from hybridmoe.train.config import RLRecipe
from hybridmoe.train.grpo import (
    PromptIterator,
    domain_counts,
    group_advantages,
    importance_weights,
    linear_token_logprobs,
    linear_token_logprobs_reference,
    pass_rate_filter,
    policy_loss,
)

# groups: 0 = [1, 0, 0, 0], 1 = [1, 1, 1, 1] (zero variance), 2 = [1, 0], 3 = [1] (alone), 4 = [0.5, 1, 0]
REWARDS = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0.5, 1, 0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 4, 4, 4])


def test_leave_one_out_advantages_without_std():  # rl.advantage_std_norm=false
    a = group_advantages(REWARDS, GROUPS, std_norm=False)
    # group 0: 1 - mean(0,0,0) = 1; 0 - mean(1,0,0) = -1/3. group 4: 0.5 - 0.5, 1 - 0.25, 0 - 0.75
    want = [1, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0, 1, -1, 0, 0, 0.75, -0.75]
    assert a.tolist() == pytest.approx(want, abs=1e-7)
    assert a[4:8].eq(0).all() and a[10] == 0  # zero-variance group and a group of one: exactly 0


def test_leave_one_out_std_normalization():  # rl.advantage_std_norm=true (eps 1e-6)
    a = group_advantages(REWARDS, GROUPS, std_norm=True)
    # group 0, sample 1: the others (1, 0, 0) have mean 1/3 and unbiased variance ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3;
    # sample 0: the others (0, 0, 0) have std 0, so its advantage is not divided (stays 1)
    s = math.sqrt(1 / 3)
    # group 4, sample 1: the others (0.5, 0) have mean 0.25 and unbiased std sqrt(2 * 0.25^2) = 0.353553
    # group 2: one other sample, std 0: undivided
    s4_1, s4_0, s4_2 = math.sqrt(2 * 0.25**2), math.sqrt(0.5), math.sqrt(2 * 0.25**2)  # others (1,0), (0.5,1)
    want = [1, -1 / 3 / (s + 1e-6), -1 / 3 / (s + 1e-6), -1 / 3 / (s + 1e-6), 0, 0, 0, 0, 1, -1, 0,
            0 / (s4_0 + 1e-6), 0.75 / (s4_1 + 1e-6), -0.75 / (s4_2 + 1e-6)]  # fmt: skip
    assert a.tolist() == pytest.approx(want, rel=1e-6)
    assert a[12] == pytest.approx(2.1213143, rel=1e-6)


def test_advantage_clip():  # rl.advantage_clip
    a = group_advantages(REWARDS, GROUPS, std_norm=True, clip=0.6)
    assert a[0] == 0.6 and a[9] == -0.6 and a[12] == 0.6 and a[1] == pytest.approx(-0.5773493, rel=1e-6)


def test_clipped_loss_asymmetric_and_global_normalization():  # rl.eps_low / rl.eps_high, token normalization
    # ratios 2 (A = +1: clipped at 1.28) and 0.5 (A = -1: clipped at 0.8), 1.1 (A = +1: inside); weights 1, 0.5, 1
    old = torch.log(torch.tensor([0.25, 0.25, 0.5]))
    logp = torch.log(torch.tensor([0.5, 0.125, 0.55])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0])
    w = torch.tensor([1.0, 0.5, 1.0])
    loss, stats = policy_loss(logp, old, adv, num_tokens=8, weights=w, eps_low=0.2, eps_high=0.28)
    # (1 * -1.28 + 0.5 * 0.8 + 1 * -1.1) / 8, the 8 loss tokens of the global batch
    assert float(loss.detach()) == pytest.approx((-1.28 + 0.4 - 1.1) / 8, rel=1e-6)
    assert stats["clip_fraction_sum"] == 2 and stats["kl"] == 0
    loss.backward()
    # clipped tokens get no gradient; the third: d/dlogp (-A w rho) / 8 = -1.1 / 8
    assert logp.grad.tolist() == pytest.approx([0, 0, -1.1 / 8], abs=1e-7)
    # symmetric clipping (eps_high 0.2) clips the first ratio at 1.2
    loss, _ = policy_loss(logp.detach(), old, adv, 8, w, eps_low=0.2, eps_high=0.2)
    assert float(loss) == pytest.approx((-1.2 + 0.4 - 1.1) / 8, rel=1e-6)


def test_one_step_per_batch_is_weighted_reinforce():
    """logp_old = logp detached: the ratio is 1 and the gradient is -w A / N per token."""
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv, w = torch.tensor([0.5, -2.0, 1.0]), torch.tensor([1.0, 2.0, 0.2])
    loss, _ = policy_loss(logp, logp.detach(), adv, num_tokens=4, weights=w)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-0.5 / 4, 4.0 / 4, -0.2 / 4])


def test_kl_term_k3():  # rl.kl_coef
    logp = torch.tensor([math.log(0.25), math.log(0.5)], requires_grad=True)
    ref = torch.tensor([math.log(0.5), math.log(0.5)])  # log r = ref - logp = ln 2, 0
    adv = torch.zeros(2)
    loss, stats = policy_loss(logp, logp.detach(), adv, num_tokens=2, ref_logp=ref, kl_coef=0.1)
    k3 = 2 - math.log(2) - 1  # e^{ln 2} - ln 2 - 1
    assert stats["kl"] == pytest.approx(k3 / 2, rel=1e-6)
    assert float(loss.detach()) == pytest.approx(0.1 * k3 / 2, rel=1e-6)
    loss.backward()  # d/dlogp of exp(ref - logp) + logp: 1 - exp(ref - logp) = 1 - 2 = -1, times 0.1 / 2
    assert logp.grad.tolist() == pytest.approx([-0.05, 0.0], abs=1e-7)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp.detach(), adv, num_tokens=2, kl_coef=0.1)


def test_importance_weights_tis_mask_none():  # rl.importance, rl.tis_min / tis_max, rl.mask_threshold
    trainer = torch.tensor([-1.0, -1.0, -2.0])
    rollout = torch.tensor([-1.0, -3.0, 0.0])  # log(pi / mu) = 0, 2, -2
    seq = torch.tensor([0, 0, 1])
    w, st = importance_weights(trainer, rollout, seq, "tis", 0.2, 5.0)
    assert w.tolist() == pytest.approx([1.0, 5.0, 0.2])  # e^2 = 7.39 -> 5, e^-2 = 0.135 -> 0.2
    assert st["clipped"] == 2 and st["tokens"] == 3 and st["abs_diff_sum"] == 4 and st["abs_diff_max"] == 2
    # k3 of KL(mu || pi) per token: e^{-d} + d - 1 = 0, e^-2 + 1, e^2 - 3
    assert st["kl_sum"] == pytest.approx(math.exp(-2) + 1 + math.exp(2) - 3)
    w, st = importance_weights(trainer, rollout, seq, "tis", 0.1, 10.0)
    assert w.tolist() == pytest.approx([1.0, math.exp(2), math.exp(-2)], rel=1e-6) and st["clipped"] == 0
    # sequence 0: exp(mean(0, 2)) = e = 2.72; sequence 1: exp(2) = 7.39
    w, st = importance_weights(trainer, rollout, seq, "mask", mask_threshold=3.0)
    assert w.tolist() == [1.0, 1.0, 0.0] and st["masked_sequences"] == 1 and st["masked_tokens"] == 1
    w, st = importance_weights(trainer, rollout, seq, "mask", mask_threshold=2.0)
    assert w.tolist() == [0.0, 0.0, 0.0] and st["masked_sequences"] == 2
    w, _ = importance_weights(trainer, rollout, seq, "none")
    assert w.tolist() == [1.0, 1.0, 1.0]
    w, st = importance_weights(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long), "mask")
    assert w.numel() == 0 and st["tokens"] == 0
    with pytest.raises(ValueError, match="importance mode"):
        importance_weights(trainer, rollout, seq, "clip")


def test_token_logprobs_match_the_full_logits_twin():
    torch.manual_seed(0)
    h = torch.randn(7, 5, requires_grad=True)
    w = torch.randn(11, 5, requires_grad=True)
    y = torch.randint(0, 11, (7,))
    g = torch.randn(7)
    got = linear_token_logprobs(h, w, y, chunk_size=3)  # 3 chunks, the last one short
    (got * g).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = linear_token_logprobs_reference(h, w, y)
    (want * g).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)


def test_pass_rate_filter():  # rl.pass_rate_filter.drop_at
    pools = {"a": [1, 2, 3], "b": [7]}
    rates = {("a", 1): 1.0, ("a", 2): 0.5, ("a", 3): 1.0, ("b", 7): 0.0}
    kept, dropped = pass_rate_filter(pools, rates, drop_at=1.0)
    assert kept == {"a": [2], "b": [7]} and dropped == {"a": 2, "b": 0}
    with pytest.raises(ValueError, match="none of the 3 prompts of environment 'a' has a pass rate .* in rate < 0.5"):
        pass_rate_filter(pools, rates, drop_at=0.5)
    # rl.pass_rate_filter.drop_unsolved: 0 < rate < drop_at kept, so 'b' (never solved) has nothing left
    rates[("b", 8)] = 0.25
    kept, dropped = pass_rate_filter({"a": [1, 2, 3], "b": [7, 8]}, rates, drop_at=1.0, drop_unsolved=True)
    assert kept == {"a": [2], "b": [8]} and dropped == {"a": 2, "b": 1}
    with pytest.raises(ValueError, match=r"environment 'b' has a pass rate .* in 0 < rate < 1.0"):
        pass_rate_filter(pools, rates, drop_at=1.0, drop_unsolved=True)
    with pytest.raises(ValueError, match="no pass rate"):
        pass_rate_filter(pools, {("a", 1): 1.0}, drop_at=1.0)


def test_domain_counts_largest_remainder():  # envs.ratios
    assert domain_counts({"a": 0.5, "b": 0.3, "c": 0.2}, 8) == {"a": 4, "b": 2, "c": 2}  # 4, 2.4, 1.6
    assert domain_counts({"b": 1, "a": 1, "c": 1}, 4) == {"a": 2, "b": 1, "c": 1}  # ties: by name
    assert domain_counts({"b": 1, "a": 3}, 6) == {"a": 5, "b": 1}  # 4.5, 1.5: the larger ratio wins the tie
    with pytest.raises(ValueError, match="get 0 of 4 prompts"):
        domain_counts({"a": 0.9, "b": 0.05, "c": 0.05}, 4)


def test_prompt_iterator_fixed_ratios_epochs_and_resume():
    it = PromptIterator({"a": [10, 11, 12], "b": [20, 21]}, {"a": 2, "b": 1}, prompts_per_step=3, seed=5)
    batches = [[next(it) for _ in range(3)] for _ in range(4)]
    for batch in batches:
        assert [env for env, _ in batch] == ["a", "b", "a"]  # 2 of a, 1 of b in every batch, interleaved
    a = [s for batch in batches for env, s in batch if env == "a"]
    assert sorted(a[:3]) == [10, 11, 12] and sorted(a[3:6]) == [10, 11, 12]  # whole epochs of the pool
    b = [s for batch in batches for env, s in batch if env == "b"]
    assert sorted(b[:2]) == [20, 21] and sorted(b[2:]) == [20, 21]
    again = PromptIterator({"a": [10, 11, 12], "b": [20, 21]}, {"a": 2, "b": 1}, prompts_per_step=3, seed=5)
    again.load_state_dict({"position": 7})
    assert [next(again) for _ in range(5)] == [p for batch in batches for p in batch][7:12]
    assert it.state_dict() == {"position": 12}


def test_rl_recipe_keys_and_checks():
    r = RLRecipe.from_dict({"model": {"init_from": "x"}, "envs": {"ratios": {"math": 1.0}}})
    r.validate()
    assert (r.rl.group_size, r.rl.eps_low, r.rl.eps_high, r.rl.importance, r.rl.tis_min, r.rl.tis_max) == (
        16, 0.2, 0.28, "tis", 0.2, 5.0)  # fmt: skip
    assert r.rl.kl_coef == 0 and r.rl.freeze_router and r.optim.schedule == "constant" and r.optim.lr == 3e-6
    bad = [
        ({"rl": {"group_size": 1}}, "leave-one-out"),
        ({"rl": {"importance": "clip"}}, "rl.importance"),
        ({"rl": {"max_staleness": 1}}, "synchronous rollouts are never stale"),
        ({"rl": {"tis_min": 2.0}}, "rl.tis_min"),
        ({"rl": {"pass_rate_filter": {"drop_at": 0}}}, "drop_at"),
        ({"envs": {"ratios": {}}}, "envs.ratios is empty"),
        ({"envs": {"ratios": {"math": -1}}}, "positive"),
    ]
    for change, message in bad:
        d = {"model": {"init_from": "x"}, "envs": {"ratios": {"math": 1.0}}}
        for section, values in change.items():
            d.setdefault(section, {}).update(values)
        with pytest.raises(ValueError, match=message):
            RLRecipe.from_dict(d).validate()
    with pytest.raises(ValueError, match="unknown key"):
        RLRecipe.from_dict({"rl": {"clip": 0.2}})


RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")


@pytest.mark.parametrize(
    "name, prompts, staleness, rollout",
    [("nano-30b-a3b", 128, 0, "sync"), ("super-120b-a12b", 256, 1, "async"), ("ultra-550b-a55b", 512, 1, "async")],
)
def test_published_rl_recipes(name, prompts, staleness, rollout):
    r = RLRecipe.from_yaml(os.path.join(RECIPES, f"{name}-rl.yaml"))
    r.validate()
    got = (r.rl.prompts_per_step, r.rl.group_size, r.rl.max_staleness, r.rl.rollout)
    assert got == (prompts, 16, staleness, rollout)
    assert r.optim.lr == 3e-6 and r.optim.schedule == "constant" and r.rl.freeze_router and r.rl.kl_coef == 0
    assert (r.rl.eps_low, r.rl.eps_high, r.rl.importance, r.rl.tis_min, r.rl.tis_max) == (0.2, 0.28, "tis", 0.2, 5.0)


def test_tiny_rl_recipe_starts_from_the_speedrun_sft():
    r = RLRecipe.from_yaml(os.path.join(RECIPES, "tiny-rl.yaml"), ["train.steps=3"])
    r.validate()
    assert r.model.init_from == "runs/speedrun/sft" and r.rl.rollout == "sync" and r.train.steps == 3
