"""Decoding over the hybrid cache and `generate`.

The reference for every decoding path is one full forward over the whole sequence without a cache: prefill +
one-token steps, chunked prefill, a cache that has to grow, and left-padded batches must all reproduce its logits
(fp32, max-abs-diff <= 1e-4). Sampling is checked against greedy decoding and, for `sample_next_token`, against the
distribution it is supposed to draw from, which the serving engine shares (`sampling_distribution`).

Models are the `debug` preset (layers M * E M - E: Mamba-2, attention, LatentMoE and a dense MLP) without MTP.
"""

from __future__ import annotations

import functools

import pytest
import torch

from hybridmoe import HybridCache, HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.cache import KVState
from hybridmoe.generation import generate, sample_from, sample_next_token, sampling_distribution
from hybridmoe.serve.sampling import SamplingParams, sampling_probs

# Tiny matmuls on a shared 2-core machine: intra-op threads only add contention (measured 100x slower with 2).

ATOL = 1e-4
VOCAB = 512


@functools.cache
def _model(chunk_size: int = 16, seed: int = 0) -> HybridMoEForCausalLM:
    cfg = HybridMoEConfig.from_preset("debug", num_nextn_predict_layers=0, chunk_size=chunk_size)
    torch.manual_seed(seed)
    return HybridMoEForCausalLM(cfg).eval()


def model_for(chunk_size: int = 16) -> HybridMoEForCausalLM:
    m = _model(chunk_size)
    m.eval()
    return m


def ids_for(b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def test_debug_model_has_every_layer_kind():
    assert set(model_for().config.hybrid_override_pattern) == {"M", "*", "E", "-"}


# ---------------------------------------------------------------------------------------------- cache vs full


@pytest.mark.parametrize(
    "chunk_size,prompt_len,total_len",
    [
        (16, 32, 44),  # prompt a multiple of the chunk size
        (16, 13, 40),  # prompt shorter than one chunk, not a multiple
        (6, 20, 37),  # chunk size that divides neither the prompt nor the total
    ],
)
@torch.no_grad()
def test_prefill_then_single_token_steps_match_full_forward(chunk_size, prompt_len, total_len):
    model = model_for(chunk_size)
    ids = ids_for(2, total_len, seed=chunk_size + prompt_len)
    full = model(ids).logits
    cache = model.new_cache(2, capacity=total_len)
    out = model(ids[:, :prompt_len], cache=cache)
    assert out.cache is cache
    assert cache.seq_len == prompt_len
    assert max_diff(out.logits, full[:, :prompt_len]) <= ATOL
    for i in range(prompt_len, total_len):
        out = model(ids[:, i : i + 1], cache=cache)
        assert out.logits.shape == (2, 1, VOCAB)
        d = max_diff(out.logits[:, 0], full[:, i])
        assert d <= ATOL, f"decode step at position {i}: max diff {d}"
    assert cache.seq_len == total_len


@pytest.mark.parametrize(
    "chunks",
    [
        [2, 11, 1, 3, 16, 7],  # first chunk shorter than the conv window; a 1-token chunk mid-way (decode path)
        [16, 16, 8],  # chunks aligned with the SSD chunk size
        [1, 1, 38],  # two decode steps after a 1-token prefill, then a long chunk
    ],
)
@torch.no_grad()
def test_chunked_prefill_matches_full_forward(chunks):
    model = model_for(16)
    total = sum(chunks)
    ids = ids_for(2, total, seed=total + len(chunks))
    full = model(ids).logits
    cache = model.new_cache(2, capacity=total)
    pieces = []
    start = 0
    for n in chunks:
        out = model(ids[:, start : start + n], cache=cache)
        pieces.append(out.logits)
        start += n
        assert cache.seq_len == start
    d = max_diff(torch.cat(pieces, dim=1), full)
    assert d <= ATOL, f"chunked prefill {chunks}: max diff {d}"


@torch.no_grad()
def test_chunked_prefill_with_non_dividing_chunk_size():
    model = model_for(6)
    ids = ids_for(1, 29, seed=3)
    full = model(ids).logits
    cache = model.new_cache(1, capacity=29)
    outs = [model(ids[:, a:b], cache=cache).logits for a, b in [(0, 5), (5, 17), (17, 18), (18, 29)]]
    assert max_diff(torch.cat(outs, 1), full) <= ATOL


@torch.no_grad()
def test_kv_cache_grows_when_capacity_is_exceeded():
    model = model_for(16)
    ids = ids_for(2, 30, seed=4)
    full = model(ids).logits
    cache = model.new_cache(2, capacity=2)
    kv = [s for s in cache.layers if isinstance(s, KVState)]
    assert kv and all(s.key.shape[2] == 2 for s in kv)
    out = model(ids[:, :9], cache=cache)  # 9 > 2: grows in the prefill
    assert all(s.key.shape[2] >= 9 for s in kv)
    logits = [out.logits]
    for i in range(9, 30):  # and again while decoding
        logits.append(model(ids[:, i : i + 1], cache=cache).logits)
    assert all(s.key.shape[2] >= 30 and s.value.shape == s.key.shape for s in kv)
    assert max_diff(torch.cat(logits, 1), full) <= ATOL


@torch.no_grad()
def test_generate_equals_manual_greedy_loop():
    model = model_for(16)
    ids = ids_for(2, 11, seed=5)
    out = model.generate(ids, max_new_tokens=12)
    seq = ids
    for _ in range(12):
        nxt = model(seq).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(out, seq)
    assert torch.equal(generate(model, ids, max_new_tokens=12), seq)


# ---------------------------------------------------------------------------------------------- left padding

PROMPT_LENS = (5, 17, 11)
PAD_TOKEN = 37  # arbitrary: padding must not matter whatever token it holds


def _left_padded_batch(seed=6):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in PROMPT_LENS]
    t = max(PROMPT_LENS)
    ids = torch.full((len(prompts), t), PAD_TOKEN)
    mask = torch.zeros(len(prompts), t, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, t - len(p) :] = p
        mask[r, t - len(p) :] = 1
    return prompts, ids, mask


@torch.no_grad()
def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = model_for(16)
    prompts, ids, mask = _left_padded_batch()
    new = 26
    batched = model.generate(ids, max_new_tokens=new, attention_mask=mask)
    assert batched.shape == (3, ids.shape[1] + new)
    assert torch.equal(batched[:, : ids.shape[1]], ids)
    for r, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=new)
        assert torch.equal(batched[r, ids.shape[1] :], alone[0, len(p) :]), f"row {r} (prompt length {len(p)})"


@torch.no_grad()
def test_left_padded_batch_logits_match_single_sequences_at_every_step():
    model = model_for(16)
    prompts, ids, mask = _left_padded_batch(seed=7)
    steps = 24
    # The continuation each prompt generates alone; the batch is teacher-forced with the same tokens.
    singles = []
    for p in prompts:
        cache = model.new_cache(1, capacity=8)  # also grows
        logits = [model(p[None], cache=cache).logits[0, -1]]
        for _ in range(steps):
            nxt = logits[-1].argmax()[None, None]
            logits.append(model(nxt, cache=cache).logits[0, -1])
        singles.append(torch.stack(logits))  # (steps + 1, v)
    cache = model.new_cache(3, capacity=ids.shape[1] + steps)
    out = model(ids, cache=cache, attention_mask=mask)
    batch_logits = [out.logits[:, -1]]
    for s in range(steps):
        nxt = torch.stack([single[s].argmax() for single in singles])[:, None]
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        batch_logits.append(model(nxt, cache=cache, attention_mask=mask).logits[:, -1])
    batch_logits = torch.stack(batch_logits, dim=1)  # (3, steps + 1, v)
    for r in range(3):
        d = max_diff(batch_logits[r], singles[r])
        assert d <= ATOL, f"row {r} (prompt length {PROMPT_LENS[r]}): max diff {d}"


@torch.no_grad()
def test_left_padded_prefill_logits_match_on_real_positions():
    model = model_for(6)  # chunk size 6: the padding/prompt boundary falls inside chunks
    prompts, ids, mask = _left_padded_batch(seed=8)
    out = model(ids, attention_mask=mask).logits
    for r, p in enumerate(prompts):
        alone = model(p[None]).logits[0]
        assert max_diff(out[r, ids.shape[1] - len(p) :], alone) <= ATOL


# ---------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def test_top_k_1_sampling_equals_greedy():
    model = model_for(16)
    ids = ids_for(2, 9, seed=9)
    greedy = model.generate(ids, max_new_tokens=16)
    g = torch.Generator().manual_seed(0)
    sampled = model.generate(ids, max_new_tokens=16, do_sample=True, top_k=1, temperature=3.0, generator=g)
    assert torch.equal(sampled, greedy)


@torch.no_grad()
def test_tiny_top_p_equals_greedy():
    model = model_for(16)
    ids = ids_for(2, 9, seed=10)
    greedy = model.generate(ids, max_new_tokens=16)
    g = torch.Generator().manual_seed(0)
    sampled = model.generate(ids, max_new_tokens=16, do_sample=True, top_p=1e-6, temperature=2.0, generator=g)
    assert torch.equal(sampled, greedy)


@torch.no_grad()
def test_fixed_generator_seed_reproduces_samples():
    model = model_for(16)
    ids = ids_for(2, 9, seed=11)

    def run(seed):
        return model.generate(
            ids, max_new_tokens=20, do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(seed)
        )

    a, b, c = run(123), run(123), run(124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # 40 draws from a near-flat 512-way distribution: a collision is impossible
    assert not torch.equal(a, model.generate(ids, max_new_tokens=20))


def _expected_with_eos(reference: torch.Tensor, prompt_len: int, eos: set[int], pad: int) -> torch.Tensor:
    """What generate must return given the eos-free greedy output `reference`: each row's tokens up to and
    including its first eos, then `pad`; cut after the step at which every row has finished."""
    rows = reference.clone()
    finish = []
    for r in range(rows.shape[0]):
        hits = [j for j in range(prompt_len, rows.shape[1]) if int(rows[r, j]) in eos]
        if hits:
            rows[r, hits[0] + 1 :] = pad
            finish.append(hits[0])
        else:
            finish.append(None)
    if all(f is not None for f in finish):
        rows = rows[:, : max(finish) + 1]
    return rows


@torch.no_grad()
def test_eos_pads_finished_rows_and_continues_the_others():
    model = model_for(16)
    ids = ids_for(2, 7, seed=12)
    new = 24
    reference = model.generate(ids, max_new_tokens=new)
    eos = int(reference[0, 7 + 3])  # row 0 emits it at its 4th new token (or earlier)
    assert eos not in reference[1, 7:].tolist(), "pick another seed: row 1 must not finish"
    out = model.generate(ids, max_new_tokens=new, eos_token_id=eos, pad_token_id=VOCAB - 1)
    expected = _expected_with_eos(reference, 7, {eos}, VOCAB - 1)
    assert out.shape == (2, 7 + new)  # row 1 never finishes: full length
    assert torch.equal(out, expected)
    assert (out[0, 7 + 4 :] == VOCAB - 1).all()


@torch.no_grad()
def test_eos_list_stops_early_when_every_row_finished():
    model = model_for(16)
    ids = ids_for(2, 7, seed=13)
    new = 24
    reference = model.generate(ids, max_new_tokens=new)
    eos = [int(reference[0, 7 + 2]), int(reference[1, 7 + 5])]
    out = model.generate(ids, max_new_tokens=new, eos_token_id=eos)  # pad_token_id from the config (0)
    expected = _expected_with_eos(reference, 7, set(eos), model.config.pad_token_id)
    assert out.shape[1] <= 7 + 6 < 7 + new
    assert torch.equal(out, expected)
    # the same with the eos ids given one at a time where only one is needed
    out_int = model.generate(ids[:1], max_new_tokens=new, eos_token_id=eos[0])
    assert torch.equal(out_int, _expected_with_eos(reference[:1], 7, {eos[0]}, 0))


@torch.no_grad()
def test_eos_with_sampling_pads_after_eos():
    model = model_for(16)
    ids = ids_for(3, 5, seed=14)
    g = torch.Generator().manual_seed(3)
    sampled = model.generate(ids, max_new_tokens=30, do_sample=True, temperature=1.0, generator=g)
    eos = int(sampled[1, 5 + 1])
    g = torch.Generator().manual_seed(3)
    out = model.generate(ids, max_new_tokens=30, do_sample=True, temperature=1.0, generator=g, eos_token_id=[eos])
    for r in range(3):
        row = out[r, 5:].tolist()
        if eos in row:
            first = row.index(eos)
            assert all(tok == 0 for tok in row[first + 1 :]), f"row {r} not padded after eos: {row}"
    assert eos in out[1, 5:].tolist()


@torch.no_grad()
def test_max_new_tokens_zero_returns_the_prompt():
    model = model_for(16)
    ids = ids_for(2, 6, seed=15)
    out = model.generate(ids, max_new_tokens=0)
    assert torch.equal(out, ids)
    prompts, pids, mask = _left_padded_batch()
    assert torch.equal(model.generate(pids, max_new_tokens=0, attention_mask=mask), pids)


def test_generate_restores_training_mode():
    model = model_for(16)
    model.train()
    try:
        a = model.generate(ids_for(1, 4, seed=16), max_new_tokens=3)
        assert model.training
    finally:
        model.eval()
    assert torch.equal(a, model.generate(ids_for(1, 4, seed=16), max_new_tokens=3))


# ---------------------------------------------------------------------------------------------- bad input


def test_generate_rejects_right_padding():
    model = model_for(16)
    ids = ids_for(2, 6, seed=17)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, -2:] = 0
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, max_new_tokens=2, attention_mask=mask)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 2] = 0  # a hole in the middle
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, max_new_tokens=2, attention_mask=mask)


def test_generate_rejects_an_all_padding_row():
    model = model_for(16)
    ids = ids_for(2, 6, seed=18)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0] = 0
    with pytest.raises(ValueError, match="all padding"):
        model.generate(ids, max_new_tokens=2, attention_mask=mask)


def test_generate_rejects_mask_shape_mismatch():
    model = model_for(16)
    ids = ids_for(2, 6, seed=19)
    for bad in (torch.ones(2, 5), torch.ones(1, 6), torch.ones(2, 7), torch.ones(12)):
        with pytest.raises(ValueError, match=r"attention_mask shape .* differs from input_ids"):
            model.generate(ids, max_new_tokens=2, attention_mask=bad)


def test_generate_rejects_bad_shapes_and_counts():
    model = model_for(16)
    with pytest.raises(ValueError, match="batch, time"):
        model.generate(ids_for(1, 6)[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids_for(1, 6), max_new_tokens=-1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(torch.tensor([[1, 2, VOCAB]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids_for(1, 6), max_new_tokens=2, do_sample=True, temperature=0.0)


def test_cache_is_sized_per_batch():
    model = model_for(16)
    cache = model.new_cache(3, capacity=5)
    assert isinstance(cache, HybridCache)
    assert cache.batch_size == 3 and cache.seq_len == 0
    with pytest.raises(ValueError, match="cache holds 3 sequences"):
        model(ids_for(2, 4), cache=cache)


# ---------------------------------------------------------------------------------------------- sample_next_token


def _frequencies(logits_row: torch.Tensor, n: int = 20000, seed: int = 0, **kwargs) -> torch.Tensor:
    logits = logits_row[None].expand(n, -1).contiguous()
    g = torch.Generator().manual_seed(seed)
    draws = sample_next_token(logits, do_sample=True, generator=g, **kwargs)
    assert draws.shape == (n,)
    return torch.bincount(draws, minlength=logits_row.numel()).float() / n


# 20000 draws: the standard error of a frequency is <= 0.0036, so 0.02 is > 5 sigma.
FREQ_TOL = 0.02


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 1.0, 2.0, 4.0]])
    assert sample_next_token(logits).tolist() == [1, 0]
    # temperature is irrelevant without sampling, even 0
    assert sample_next_token(logits, temperature=0.0).tolist() == [1, 0]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_temperature_scales_the_distribution(temperature):
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    freq = _frequencies(logits, temperature=temperature)
    expected = (logits / temperature).softmax(-1)
    assert (freq - expected).abs().max() <= FREQ_TOL, (freq, expected)


def test_top_k_keeps_only_the_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0, 4.5])
    freq = _frequencies(logits, top_k=3)
    assert freq[[0, 2, 4]].sum() == 0
    kept = torch.tensor([1, 3, 5])
    expected = torch.zeros(6)
    expected[kept] = logits[kept].softmax(-1)
    assert (freq - expected).abs().max() <= FREQ_TOL
    # top_k larger than the vocabulary keeps everything
    assert (_frequencies(logits, top_k=100) - logits.softmax(-1)).abs().max() <= FREQ_TOL


@pytest.mark.parametrize(
    "top_p,kept",
    [
        (0.45, [0]),  # the top token alone reaches 0.5 >= 0.45
        (0.6, [0, 1]),  # 0.5 < 0.6 <= 0.8
        (0.9, [0, 1, 2]),  # 0.8 < 0.9 <= 0.95
        (0.99, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    perm = torch.tensor([2, 0, 3, 1])  # unsorted vocabulary order
    logits = probs.log()[perm]
    freq = _frequencies(logits, top_p=top_p)
    expected = torch.zeros(4)
    kept_sorted = torch.tensor(kept)
    expected[kept_sorted] = probs[kept_sorted] / probs[kept_sorted].sum()
    expected_perm = expected[perm]
    assert (freq - expected_perm).abs().max() <= FREQ_TOL, (freq, expected_perm)
    # tokens outside the nucleus are never drawn
    assert freq[expected_perm == 0].sum() == 0


def test_temperature_is_applied_before_top_k_and_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    # at temperature 1, top_p=0.6 keeps two tokens; at temperature 100 the distribution is nearly flat and
    # top_p=0.6 needs three
    freq = _frequencies(logits, temperature=100.0, top_p=0.6)
    assert (freq[:3] > 0.25).all() and freq[3] == 0
    # top_k after temperature: the same two tokens survive, now near-equally likely
    freq = _frequencies(logits, temperature=100.0, top_k=2)
    assert abs(freq[0].item() - 0.5) <= FREQ_TOL and freq[2:].sum() == 0


def test_top_k_and_top_p_combine():
    logits = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]).log()
    # top_k=3 leaves (0.5, 0.3, 0.1)/0.9 = (0.556, 0.333, 0.111); top_p=0.8 then keeps the first two
    freq = _frequencies(logits, top_k=3, top_p=0.8)
    assert freq[2:].sum() == 0
    assert abs(freq[0].item() - 0.625) <= FREQ_TOL


def test_sampling_is_reproducible_with_a_generator():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    a = sample_next_token(logits, do_sample=True, generator=torch.Generator().manual_seed(7))
    b = sample_next_token(logits, do_sample=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert a.shape == (4,) and a.dtype == torch.int64


def test_sampling_distribution_is_exact():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    perm = torch.tensor([2, 0, 3, 1])  # unsorted vocabulary order
    logits = probs.log()[perm]
    torch.testing.assert_close(sampling_distribution(logits), probs[perm])
    # top_p=0.6 keeps (0.5, 0.3); top_k=3 then top_p=0.9 keeps (0.5, 0.3, 0.15)/0.95 -> the prefix reaching 0.9 is all 3
    expected = torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8
    torch.testing.assert_close(sampling_distribution(logits, top_p=0.6), expected[perm])
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    torch.testing.assert_close(sampling_distribution(logits, top_k=3, top_p=0.9), expected[perm])
    # temperature first: at T=2 the probabilities are sqrt(p) renormalized, and top_k=2 keeps the two largest
    expected = torch.tensor([0.5, 0.3, 0.0, 0.0]).sqrt()
    torch.testing.assert_close(sampling_distribution(logits, 2.0, top_k=2), (expected / expected.sum())[perm])


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, None, 1.0), (0.7, 5, 1.0), (1.3, None, 0.8), (0.9, 20, 0.5), (1.0, 0, 0.95)]
)
def test_generate_and_the_engine_sample_from_one_distribution(temperature, top_k, top_p):
    """`sample_next_token` (offline generate) and the serving engine's `sampling_probs` share one implementation of
    the filters: the same distribution bit for bit, so the same generator state draws the same tokens."""
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 3
    probs = sampling_probs(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.equal(probs, sampling_distribution(logits, temperature, top_k, top_p))
    drawn = sample_next_token(logits, True, temperature, top_k, top_p, generator=torch.Generator().manual_seed(5))
    assert torch.equal(drawn, sample_from(probs, generator=torch.Generator().manual_seed(5)))


def test_sample_from_draws_each_token_with_its_probability():
    """Inverse transform sampling against the exact probabilities: leading, inner and trailing zeros are never drawn,
    rows need not be normalized, and a batch of rows draws each row from its own distribution."""
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0, 6.0]])  # row 1 sums to 8
    g = torch.Generator().manual_seed(0)
    n = 20_000
    drawn = sample_from(probs.expand(n, 2, 6), g)
    assert drawn.shape == (n, 2) and drawn.dtype == torch.long
    for row in range(2):
        freq = torch.bincount(drawn[:, row], minlength=6) / n
        assert torch.all(freq[probs[row] == 0] == 0), freq
        assert (freq - probs[row] / probs[row].sum()).abs().max() < 0.015, freq
    assert int(sample_from(torch.tensor([0.0, 0.0, 1e-30, 0.0]), g)) == 2  # the only token allowed, however unlikely


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sampling_unsamplable_logits_raises(bad):
    logits = torch.zeros(2, 4)
    logits[1, 2] = bad
    with pytest.raises(ValueError, match="cannot sample"):
        sample_next_token(logits, do_sample=True)
    with pytest.raises(ValueError, match="cannot sample"):
        sample_next_token(torch.full((1, 4), -torch.inf), do_sample=True)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_nonpositive_temperature_with_sampling_raises(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample_next_token(torch.zeros(1, 4), do_sample=True, temperature=temperature)


@pytest.mark.parametrize("top_p", [0.0, -0.5])
def test_invalid_top_p_raises(top_p):
    with pytest.raises(ValueError, match="top_p"):
        sample_next_token(torch.zeros(1, 4), do_sample=True, top_p=top_p)
