"""MTP speculative decoding (`hybridmoe.serve.speculative`).

Greedy: the tokens equal plain greedy decoding (`model.generate`) for several prompts and draft lengths, with the
MTP head's own drafts (mostly rejected on random weights) and with oracle drafts corrupted at chosen places (every
acceptance count 0..k, full acceptance included). Rollback: restoring the Mamba snapshot and replaying the accepted
prefix gives the cache a plain forward of that prefix gives. Sampling: the rejection step returns tokens
distributed as the target (many draws of `verify_drafts`), and whole speculative generations on a 4-token
vocabulary match the exact distribution of 3-token continuations computed by enumeration.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.cache import MambaState
from hybridmoe.modeling import ForwardContext
from hybridmoe.serve import SamplingParams, speculative
from hybridmoe.serve.speculative import rollback, speculative_generate, verify_drafts


@functools.cache
def model(vocab_size: int = 512, pattern: str | None = None, mtp_pattern: str | None = None) -> HybridMoEForCausalLM:
    overrides = dict(vocab_size=vocab_size, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if pattern:
        overrides.update(hybrid_override_pattern=pattern, mtp_hybrid_override_pattern=mtp_pattern)
    cfg = HybridMoEConfig.from_preset("debug", **overrides)  # debug: 1 MTP layer ("*E"), 2 depths
    torch.manual_seed(0)
    return HybridMoEForCausalLM(cfg).eval()


def prompt_for(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@torch.no_grad()
def plain_greedy(m, prompt, n) -> list[int]:
    return m.generate(torch.tensor([prompt]), max_new_tokens=n)[0, len(prompt) :].tolist()


@pytest.mark.parametrize("vocab,k", [(512, 1), (512, 3), (8, 2), (4, 4)])
def test_greedy_equals_plain_greedy(vocab, k):
    m = model(vocab)
    for seed, n in [(1, 1), (2, 9), (3, 30)]:
        prompt = prompt_for(n, vocab, seed)
        out = speculative_generate(m, prompt, greedy(16), num_draft_tokens=k)
        assert out.token_ids == plain_greedy(m, prompt, 16), f"prompt of {n} tokens, k={k}"
        assert out.finish_reason == "length"
        s = out.stats
        assert s.num_drafted == k * s.num_verify_steps and 0 <= s.acceptance_rate <= 1


@pytest.mark.parametrize("decode_mode", ["eager", "static"])
def test_oracle_drafts_exercise_every_acceptance_count(monkeypatch, decode_mode):
    """Drafts are the true greedy continuation with one token corrupted at a varying place (or none), so every
    acceptance count 0..k and the replay after each occur; the output must still be the plain greedy one, with the
    model's forwards eager or in static shapes (`serve.graphs.StaticSequence`)."""
    m, k, n_new = model(512), 3, 24
    prompt = prompt_for(10, 512, 4)
    ref = plain_greedy(m, prompt, n_new + k + 1)
    seen = []
    real_draft = speculative._draft

    def oracle(mtp, mtp_x, mtp_logits, k, params, generator):
        ids, probs = real_draft(mtp, mtp_x, mtp_logits, k, params, generator)  # keep the MTP path exercised
        done = mtp.length - len(prompt) + 1  # tokens generated so far: the MTP has one position per processed token
        ids = ref[done : done + k]
        bad = len(seen) % (k + 1)  # corrupt draft `bad` (none when bad == k)
        if bad < k:
            ids[bad] = (ids[bad] + 1) % 512
        seen.append(bad)
        return ids, [torch.nn.functional.one_hot(torch.tensor(i), 512).float() for i in ids]

    monkeypatch.setattr(speculative, "_draft", oracle)
    out = speculative_generate(m, prompt, greedy(n_new), num_draft_tokens=k, decode_mode=decode_mode)
    assert out.token_ids == ref[:n_new]
    assert set(seen) == set(range(k + 1))
    assert out.stats.num_accepted > 0 and out.stats.num_replays > 0
    assert out.stats.mean_accepted_length > 2


@torch.no_grad()
@torch.no_grad()
def test_drafts_run_the_mtp_layer_training_runs():
    """The first commit pairs each prompt position's hidden state with the token after it: training's depth 0 of
    `forward_mtp` over the same tokens (one `Block.mtp_input`, full causal attention instead of the MTP KV cache)."""
    m = model(512)
    tokens = prompt_for(13, 512, 6)
    ids = torch.tensor([tokens])
    h = m(ids).hidden_states
    depth0 = m.forward_mtp(h, ids, ForwardContext())[0]
    expected = m.lm_head(depth0[:, :-1]).float()  # the last position has no next token
    cache = m.new_cache(1, capacity=len(tokens) + 2, include_mtp=True)
    out = m(ids[:, :-1], cache=cache)
    _, logits = speculative._MTP(m, cache).commit(out.hidden_states, tokens[1:])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_rollback_restores_the_state_of_the_accepted_prefix():
    m = model(512)
    prompt, verify = prompt_for(13, 512, 5), prompt_for(4, 512, 6)  # pending token + 3 drafts
    for accepted in range(4):
        cache = m.new_cache(1, capacity=32)
        m(torch.tensor([prompt]), cache=cache)
        snapshot = speculative._save_mamba(cache, range(m.config.num_hidden_layers))
        m(torch.tensor([verify]), cache=cache)  # the verification forward moves every state past the drafts
        rollback(m, cache, snapshot, len(prompt), verify[: accepted + 1])
        ref = m.new_cache(1, capacity=32)
        m(torch.tensor([prompt + verify[: accepted + 1]]), cache=ref)
        assert cache.seq_len == ref.seq_len == len(prompt) + accepted + 1
        for a, b in zip(cache.layers, ref.layers):
            if isinstance(a, MambaState):
                assert (a.conv - b.conv).abs().max() <= 1e-5 and (a.ssm - b.ssm).abs().max() <= 1e-5
        nxt = torch.tensor([[7]])
        assert (m(nxt, cache=cache).logits - m(nxt, cache=ref).logits).abs().max() <= 1e-4


def test_rejection_sampling_returns_target_distributed_tokens():
    g = torch.Generator().manual_seed(0)
    target = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0], [0.1, 0.1, 0.2, 0.2, 0.4], [0.2] * 5])
    draft = torch.tensor([[0.1, 0.1, 0.1, 0.2, 0.5], [0.6, 0.1, 0.1, 0.1, 0.1]])  # far from the target
    n = 6000
    first, second = torch.zeros(5), torch.zeros(5)
    accepted = 0
    for _ in range(n):
        d = [int(torch.multinomial(draft[i], 1, generator=g)) for i in range(2)]
        out = verify_drafts(target, draft, d, greedy=False, generator=g)
        first[out[0]] += 1
        if len(out) > 1:  # the first draft was kept: the next token is a fresh speculative step at position 1
            second[out[1]] += 1
            accepted += 1
    tv = lambda counts, p: 0.5 * (counts / counts.sum() - p).abs().sum().item()  # noqa: E731
    assert tv(first, target[0]) < 0.025, first
    assert tv(second, target[1]) < 0.04, second
    assert first[4] == 0  # never a token the target gives probability 0
    assert 0.1 < accepted / n < 0.9


@torch.no_grad()
def test_speculative_sampling_matches_the_exact_distribution():
    """3 tokens after a prompt, vocabulary of 4: the frequencies of speculative generations (2 drafts) against the
    exact probability of each of the 64 continuations under plain sampling at temperature 0.5."""
    m, V, T, temperature = model(4, "M*", "*-"), 4, 3, 0.5
    prompt = [1, 3, 0]
    seqs = torch.tensor(list(itertools.product(range(V), repeat=T)))
    full = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], dim=1)
    logp = torch.log_softmax(m(full).logits / temperature, -1)
    exact = sum(logp[torch.arange(len(seqs)), len(prompt) - 1 + i, seqs[:, i]] for i in range(T)).exp()
    n = 600
    counts = torch.zeros(V**T)
    drafted = accepted = 0
    for seed in range(n):
        params = SamplingParams(temperature=temperature, max_tokens=T, ignore_eos=True, seed=seed)
        out = speculative_generate(m, prompt, params, num_draft_tokens=2)
        counts[sum(t * V ** (T - 1 - i) for i, t in enumerate(out.token_ids))] += 1
        drafted, accepted = drafted + out.stats.num_drafted, accepted + out.stats.num_accepted
    freq = (counts / n).view(V, V, V)
    exact = exact.view(V, V, V)
    assert 0.5 * (freq - exact).abs().sum() < 0.12  # 64 cells from 600 draws
    for pos in range(T):  # each token's marginal: every cell within 4 standard errors
        dims = [d for d in range(T) if d != pos]
        f, p = freq.sum(dims), exact.sum(dims)
        z = (f - p).abs() / (p * (1 - p) / n).sqrt()
        assert z.max() < 4, f"token {pos}: frequencies {f.tolist()} vs exact {p.tolist()}"
    assert 0.05 < accepted / drafted < 0.95  # both acceptances and rejections were sampled


def test_errors():
    with pytest.raises(ValueError, match="MTP"):
        m = HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug", num_nextn_predict_layers=0))
        speculative_generate(m, [1, 2], greedy(2))
    with pytest.raises(ValueError, match="num_draft_tokens"):
        speculative_generate(model(512), [1, 2], greedy(2), num_draft_tokens=0)


def test_stops_inside_an_accepted_run():
    m = model(4)
    prompt = prompt_for(6, 4, 7)
    ref = plain_greedy(m, prompt, 20)
    stop = ref[5]
    out = speculative_generate(m, prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop]), 3)
    assert out.token_ids == ref[: ref.index(stop) + 1] and out.finish_reason == "stop"
