"""The continuous-batching engine (`hybridmoe.serve.engine`).

The reference is `model.generate` on each prompt alone: with many concurrent requests of different lengths,
requests joining mid-flight, prompts prefilled in chunks and slots reused, greedy tokens must be the same. Also:
sampling params (stop ids and strings, max_tokens, seeds), logprobs and prompt logprobs against log_softmax of a full
forward, cancellation and admission errors. Models: the `debug` preset without MTP, random weights.
"""

from __future__ import annotations

import functools

import pytest
import torch

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.cache import MambaState
from hybridmoe.serve import AdmissionError, Engine, SamplingParams
from hybridmoe.serve import engine as engine_module
from hybridmoe.serve.engine import SlotPool
from hybridmoe.serve.sampling import SamplingError, batchable, sample, sample_rows, token_logprob

VOCAB = 512


@functools.cache
def model() -> HybridMoEForCausalLM:
    cfg = HybridMoEConfig.from_preset("debug", num_nextn_predict_layers=0)
    torch.manual_seed(0)
    return HybridMoEForCausalLM(cfg).eval()


def prompts_for(lengths, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def greedy(max_tokens, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


@functools.cache
def reference(prompt: tuple[int, ...], n: int) -> list[int]:
    """Greedy continuation of one prompt alone through model.generate."""
    return model().generate(torch.tensor([prompt]), max_new_tokens=n)[0, len(prompt) :].tolist()


def test_continuous_batching_equals_each_prompt_alone():
    lengths, max_tokens = [1, 5, 40, 17, 9, 33, 3], [10, 3, 8, 12, 1, 6, 9]
    prompts = prompts_for(lengths)
    # 3 slots for 7 requests: requests queue, join as others finish, and reuse freed slots; chunks of 8 tokens.
    engine = Engine(model(), max_num_seqs=3, max_model_len=64, prefill_chunk=8)
    results = engine.generate(prompts, [greedy(n) for n in max_tokens])
    for p, n, r in zip(prompts, max_tokens, results):
        assert r.token_ids == reference(tuple(p), n), f"prompt of {len(p)} tokens"
        assert r.finish_reason == "length" and len(r.token_ids) == n
    assert engine.num_free_slots == 3 and not engine.has_unfinished()


def test_consecutive_slots_decode_in_place_and_others_through_copies(monkeypatch):
    """A decode batch of consecutive slots reads the pool's rows as views (the forward updates them in place, nothing
    is gathered or scattered); other batches gather copies and write them back. The engine decodes slots 0..k-1 in
    order (next test); decoding them highest first instead, the batching test above goes through gathered batches,
    and its tokens still equal each prompt's alone."""
    engine = Engine(model(), max_num_seqs=4, max_model_len=32)
    pool_ssm = next(s.ssm for s in engine.pool.cache.layers if isinstance(s, MambaState))
    for slots, in_place in (([0, 1, 2], True), ([2, 3], True), ([0, 2], False), ([1, 0], False)):
        batch, _ = engine.pool.decode_batch(slots)
        ssm = next(s.ssm for s in batch.layers if isinstance(s, MambaState))
        shares = ssm.untyped_storage().data_ptr() == pool_ssm.untyped_storage().data_ptr()
        assert shares == in_place and isinstance(batch.rows, slice) == in_place, slots
    kinds = []
    decode_batch = SlotPool.decode_batch

    def spy(self, slots):
        batch, mask = decode_batch(self, slots)
        kinds.append(isinstance(batch.rows, slice))
        return batch, mask

    def highest_slot_first(self):  # never consecutive ascending: every batch of several rows is gathered
        return sorted((r for r in self._running if not r.prefilling), key=lambda r: -r.slot)

    monkeypatch.setattr(SlotPool, "decode_batch", spy)
    monkeypatch.setattr(Engine, "_decoding_in_front", highest_slot_first)
    test_continuous_batching_equals_each_prompt_alone()
    assert True in kinds and False in kinds


def test_decoding_requests_hold_the_lowest_slots(monkeypatch):
    """Requests finishing out of order, prompts prefilled over several steps: after every step the occupied slots
    are 0..n-1 (a finished request's slot refilled from the highest one, its cache with it), every decode batch is
    slots 0..k-1 (a request done with its prefill swaps slots with one still prefilling below it), both moves happen,
    and the tokens equal each prompt's alone (greedy; the moved requests go on from their copied caches)."""
    calls = {"decode_batch": [], "move": 0, "swap": 0}
    decode_batch, move, swap = SlotPool.decode_batch, SlotPool.move, SlotPool.swap

    def spy_batch(self, slots):
        calls["decode_batch"].append(list(slots))
        return decode_batch(self, slots)

    def spy_move(self, src, dst):
        calls["move"] += 1
        return move(self, src, dst)

    def spy_swap(self, a, b):
        calls["swap"] += 1
        return swap(self, a, b)

    monkeypatch.setattr(SlotPool, "decode_batch", spy_batch)
    monkeypatch.setattr(SlotPool, "move", spy_move)
    monkeypatch.setattr(SlotPool, "swap", spy_swap)
    prompts = prompts_for([6, 11, 3, 9, 14, 5, 12, 7], seed=4)
    max_tokens = [3, 12, 5, 9, 2, 7, 4, 6]
    engine = Engine(model(), max_num_seqs=4, max_model_len=64, prefill_chunk=4)
    ids = [engine.add_request(p, greedy(n)) for p, n in zip(prompts, max_tokens)]
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
        occupied = sorted(r.slot for r in engine._running)
        assert occupied == list(range(len(occupied))), occupied
    assert all(slots == list(range(len(slots))) for slots in calls["decode_batch"]), calls["decode_batch"]
    assert calls["move"] > 0 and calls["swap"] > 0, calls
    for rid, p, n in zip(ids, prompts, max_tokens):
        assert got[rid] == reference(tuple(p), n)


def test_requests_joining_mid_flight():
    prompts = prompts_for([12, 4, 25, 7], seed=2)
    engine = Engine(model(), max_num_seqs=4, max_model_len=64, prefill_chunk=16)
    got: dict[str, list[int]] = {}
    ids = [engine.add_request(prompts[0], greedy(10)), engine.add_request(prompts[1], greedy(10))]
    batch_sizes = []
    for step in range(30):
        if step == 4:  # two more arrive while the first two are decoding
            ids += [engine.add_request(prompts[2], greedy(6)), engine.add_request(prompts[3], greedy(8))]
        outs = engine.step()
        batch_sizes.append(sum(1 for o in outs if o.new_token_ids))
        for o in outs:
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
        if not engine.has_unfinished():
            break
    assert max(batch_sizes) >= 3  # rows of different lengths decoded together
    for rid, p, n in zip(ids, prompts, [10, 10, 6, 8]):
        assert got[rid] == reference(tuple(p), n)


def test_chunked_prefill_equals_unchunked():
    prompts = prompts_for([37, 50, 6], seed=3)
    params = greedy(8, logprobs=2)
    runs = [
        Engine(model(), max_num_seqs=2, max_model_len=64, prefill_chunk=c).generate(prompts, params) for c in (5, 64)
    ]
    for chunked, whole in zip(*runs):
        assert chunked.token_ids == whole.token_ids
        a = torch.tensor([lp.logprob for lp in chunked.logprobs])
        b = torch.tensor([lp.logprob for lp in whole.logprobs])
        assert (a - b).abs().max() <= 1e-4


@torch.no_grad()
def test_logprobs_equal_log_softmax_of_the_model_logits():
    prompt = prompts_for([11], seed=4)[0]
    engine = Engine(model(), max_num_seqs=2, max_model_len=64)
    (r,) = engine.generate([prompt], SamplingParams(temperature=0.8, max_tokens=6, seed=3, logprobs=3))
    full = torch.tensor([prompt + r.token_ids])
    logp = torch.log_softmax(model()(full).logits[0].float(), -1)
    for i, (tok, lp) in enumerate(zip(r.token_ids, r.logprobs)):
        row = logp[len(prompt) - 1 + i]
        assert lp.token_id == tok
        assert abs(lp.logprob - row[tok].item()) <= 1e-4
        values, top_ids = row.topk(3)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        assert max(abs(v - w) for (_, v), w in zip(lp.top, values.tolist())) <= 1e-4


@torch.no_grad()
def test_processed_logprobs_are_those_of_the_sampling_distribution():
    # vLLM's processed_logprobs: after temperature (and top-k), what an RL trainer at that temperature compares with
    prompt = prompts_for([11], seed=4)[0]
    engine = Engine(model(), max_num_seqs=2, max_model_len=64)
    for top_k in (None, 5):
        params = SamplingParams(temperature=0.6, top_k=top_k, max_tokens=6, seed=3, logprobs=2,
                                logprobs_mode="processed_logprobs")  # fmt: skip
        (r,) = engine.generate([prompt], params)
        logits = model()(torch.tensor([prompt + r.token_ids])).logits[0].float() / 0.6
        if top_k:
            kth = logits.topk(top_k, -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -torch.inf)
        logp = torch.log_softmax(logits, -1)
        raw = torch.log_softmax(model()(torch.tensor([prompt + r.token_ids])).logits[0].float(), -1)
        for i, (tok, lp) in enumerate(zip(r.token_ids, r.logprobs)):
            row = logp[len(prompt) - 1 + i]
            assert abs(lp.logprob - row[tok].item()) <= 1e-4
            assert abs(lp.logprob - raw[len(prompt) - 1 + i, tok].item()) > 1e-3  # not the raw one
            assert [t for t, _ in lp.top] == row.topk(2).indices.tolist()
    with pytest.raises(ValueError, match="logprobs_mode must be one of raw_logprobs, processed_logprobs"):
        SamplingParams(logprobs_mode="processed")


@torch.no_grad()
def test_prompt_logprobs_equal_a_full_forward():
    # Prompts over several prefill chunks of 8 (and a 1-token one), next to a request without prompt logprobs;
    # max_tokens=0 scores the prompt and generates nothing.
    prompts = prompts_for([29, 40, 1, 17], seed=10)
    prompt_only = SamplingParams(max_tokens=0, prompt_logprobs=0)
    params = [greedy(3, prompt_logprobs=2), prompt_only, greedy(2, prompt_logprobs=1), greedy(4)]
    engine = Engine(model(), max_num_seqs=2, max_model_len=64, prefill_chunk=8)
    results = engine.generate(prompts, params)
    for p, sp, r in zip(prompts, params, results):
        if sp.prompt_logprobs is None:
            assert r.prompt_logprobs is None
            continue
        logp = torch.log_softmax(model()(torch.tensor([p])).logits[0].float(), -1)  # (t, v): row i scores token i+1
        assert len(r.prompt_logprobs) == len(p) and r.prompt_logprobs[0] is None
        lps = r.prompt_logprobs[1:]
        assert [lp.token_id for lp in lps] == p[1:]
        expected = logp[torch.arange(len(p) - 1), p[1:]]
        assert torch.allclose(torch.tensor([lp.logprob for lp in lps]), expected, atol=1e-5, rtol=0)
        values, top_ids = logp[:-1].topk(max(sp.prompt_logprobs, 1), dim=-1)
        for lp, v, i in zip(lps, values[:, : sp.prompt_logprobs], top_ids[:, : sp.prompt_logprobs]):
            assert [t for t, _ in lp.top] == i.tolist()
            assert torch.allclose(torch.tensor([w for _, w in lp.top]), v, atol=1e-5, rtol=0)
    assert results[1].token_ids == [] and results[1].finish_reason == "length"
    for p, sp, r in zip(prompts, params, results):  # scoring the prompt leaves generation as it was
        assert r.token_ids == reference(tuple(p), sp.max_tokens)


def test_prompt_logprobs_arrive_on_the_first_output():
    prompt = prompts_for([20], seed=11)[0]
    engine = Engine(model(), max_num_seqs=1, max_model_len=64, prefill_chunk=8)
    engine.add_request(prompt, greedy(3, prompt_logprobs=0))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.prompt_logprobs is not None for o in outs] == [True, False, False]
    assert len(outs[0].prompt_logprobs) == 20 and outs[0].new_token_ids
    # A prompt-only request: one output, finished, nothing generated.
    engine.add_request(prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert len(outs) == 1 and outs[0].finished and outs[0].finish_reason == "length"
    assert outs[0].new_token_ids == [] and outs[0].num_generated_tokens == 0 and len(outs[0].prompt_logprobs) == 20


def test_stop_token_ids_and_eos():
    prompt = prompts_for([9], seed=5)[0]
    ref = reference(tuple(prompt), 12)
    stop = ref[4]
    cut = ref.index(stop) + 1
    engine = Engine(model(), max_num_seqs=2, max_model_len=64, eos_token_id=None)
    (r,) = engine.generate([prompt], greedy(12, stop_token_ids=[stop]))
    assert r.token_ids == ref[:cut] and r.finish_reason == "stop" and r.stop_reason == stop
    # The model's eos ends a request unless ignore_eos.
    eos_engine = Engine(model(), max_num_seqs=2, max_model_len=64, eos_token_id=stop)
    (r,) = eos_engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12))
    assert r.token_ids == ref[:cut] and r.finish_reason == "stop"
    (r,) = eos_engine.generate([prompt], greedy(12))
    assert r.token_ids == ref and r.finish_reason == "length"


def test_stop_strings():
    prompt = prompts_for([7], seed=6)[0]
    ref = reference(tuple(prompt), 12)
    engine = Engine(model(), max_num_seqs=2, max_model_len=64, detokenize=lambda ids: "".join(f"<{i}>" for i in ids))
    stop = f"<{ref[3]}><{ref[4]}>"
    text = "".join(f"<{i}>" for i in ref)
    expected = next(n for n in range(1, 13) if stop in "".join(f"<{i}>" for i in ref[:n]))
    assert stop in text
    (r,) = engine.generate([prompt], greedy(12, stop=[stop, "<never>"]))
    assert r.token_ids == ref[:expected] and r.finish_reason == "stop" and r.stop_reason == stop
    with pytest.raises(ValueError, match="detokenize"):
        Engine(model(), max_num_seqs=1, max_model_len=64).add_request(prompt, greedy(4, stop=["x"]))


def test_max_tokens_and_step_outputs():
    prompt = prompts_for([5], seed=7)[0]
    engine = Engine(model(), max_num_seqs=1, max_model_len=64)
    rid = engine.add_request(prompt, greedy(3))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.new_token_ids for o in outs] == [[t] for t in reference(tuple(prompt), 3)]
    assert [o.finished for o in outs] == [False, False, True]
    assert outs[-1].finish_reason == "length" and outs[-1].num_generated_tokens == 3 and outs[-1].request_id == rid


def test_seeded_sampling_is_reproducible_in_any_batch():
    prompts = prompts_for([6, 13, 20], seed=8)
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, max_tokens=10, seed=123, ignore_eos=True)
    alone = Engine(model(), max_num_seqs=1, max_model_len=64).generate([prompts[1]], params)[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=7, ignore_eos=True)
    batched = Engine(model(), max_num_seqs=3, max_model_len=64).generate(prompts, [others, params, others])
    assert batched[1].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, max_tokens=10, seed=124, ignore_eos=True)
    assert Engine(model(), max_num_seqs=1, max_model_len=64).generate([prompts[1]], other_seed)[0].token_ids != alone


def test_cancel_frees_the_slot():
    a, b, c = prompts_for([10, 8, 4], seed=9)
    engine = Engine(model(), max_num_seqs=1, max_model_len=64)
    ra = engine.add_request(a, greedy(20))
    rb = engine.add_request(b, greedy(5))
    rc = engine.add_request(c, greedy(5))
    engine.step()
    engine.step()
    assert engine.num_free_slots == 0 and engine.num_waiting == 2
    assert engine.cancel(ra) and engine.cancel(rc)  # one running, one waiting
    assert not engine.cancel("no-such-request")
    outs = {o.request_id: o for o in engine.step()}
    assert outs[ra].finished and outs[ra].finish_reason == "cancelled"
    assert outs[rc].finished and outs[rc].finish_reason == "cancelled"
    got = outs[rb].new_token_ids if rb in outs else []  # b took the slot in the same step
    while engine.has_unfinished():
        got += [t for o in engine.step() if o.request_id == rb for t in o.new_token_ids]
    assert got == reference(tuple(b), 5)  # the freed slot served b from a clean state
    assert engine.num_free_slots == 1 and not engine.cancel(rb)


def test_admission_errors_name_the_numbers_and_the_fix():
    engine = Engine(model(), max_num_seqs=2, max_model_len=32)
    with pytest.raises(AdmissionError, match=r"30 tokens \+ max_tokens 5 = 35 exceeds .* max_model_len of 32"):
        engine.add_request([1] * 30, greedy(5))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], greedy(5))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([VOCAB], greedy(5))
    per_slot = engine.cache_bytes // 2
    with pytest.raises(AdmissionError, match="lower max_model_len or raise max_cache_bytes"):
        Engine(model(), max_num_seqs=4, max_model_len=32, max_cache_bytes=per_slot - 1)
    fitted = Engine(model(), max_num_seqs=4, max_model_len=32, max_cache_bytes=2 * per_slot + 1)
    assert fitted.max_num_seqs == 2 and fitted.cache_bytes <= 2 * per_slot + 1


def test_sampling_params_are_validated():
    bad_params = (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_tokens=0), dict(logprobs=-1),
                  dict(prompt_logprobs=-1), dict(max_tokens=-1, prompt_logprobs=0))  # fmt: skip
    for bad in bad_params:
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ["x"]


# ---------------------------------------------------------------------------------------------- shared work


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, logprobs=0),
        SamplingParams(temperature=0.7, logprobs=0, logprobs_mode="processed_logprobs"),
    ],
    ids=["greedy", "t1", "t0.7-raw", "t0.7-processed"],
)
def test_sample_rows_draws_what_sampling_row_by_row_draws(params):
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(5)) * 3
    batched, alone = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    tokens, logprobs = sample_rows(logits, params, batched)
    expected = [sample(row, params, alone) for row in logits]
    assert tokens == expected
    if params.logprobs is None:
        assert logprobs is None
    else:
        want = [token_logprob(row, t, 0, params).logprob for row, t in zip(logits, expected)]
        assert max(abs(a - b) for a, b in zip(logprobs, want)) <= 1e-6
    assert torch.equal(torch.rand(3, generator=batched), torch.rand(3, generator=alone))  # as many draws made


def test_sample_rows_refuses_a_row_it_cannot_sample_and_draws_nothing():
    logits = torch.randn(3, VOCAB)
    logits[1] = float("nan")
    g = torch.Generator().manual_seed(2)
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0.9)):
        with pytest.raises(SamplingError):
            sample_rows(logits, params, g)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(2)))
    assert not batchable(SamplingParams(top_k=5)) and not batchable(SamplingParams(top_p=0.9))
    assert not batchable(SamplingParams(logprobs=2)) and batchable(SamplingParams(logprobs=0))


def test_batched_sampling_in_the_engine_equals_sampling_row_by_row(monkeypatch):
    """Decoded rows that share their params draw from the engine's generator in one batch: the same tokens and
    logprobs as row by row (the generator's draws come in the same order)."""
    prompts = prompts_for([5, 9, 14, 3], seed=12)
    params = [SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True, logprobs=0,
                             logprobs_mode="processed_logprobs")] * 4  # fmt: skip

    def run():
        out = Engine(model(), max_num_seqs=4, max_model_len=64, seed=7).generate(prompts, params)
        return [(r.token_ids, [lp.logprob for lp in r.logprobs]) for r in out]

    calls = []
    real = engine_module.sample_rows
    monkeypatch.setattr(engine_module, "sample_rows", lambda *a: calls.append(len(a[0])) or real(*a))
    batched = run()
    assert calls and max(calls) == 4  # the batch path ran
    monkeypatch.setattr(engine_module, "batchable", lambda p: False)
    alone = run()
    assert [t for t, _ in batched] == [t for t, _ in alone]
    assert max(abs(a - b) for (_, x), (_, y) in zip(batched, alone) for a, b in zip(x, y)) <= 1e-6


def test_requests_with_the_same_prompt_share_its_prefill(monkeypatch):
    """Requests with one prompt (a GRPO group's samples, n > 1) admitted together: the first prefills it, the others
    get a copy of its cache, with outputs equal to each prefilling its own. A request asking for prompt logprobs
    prefills itself; one that ends at its first token (max_tokens=1) frees its slot after the copies."""
    same, other = prompts_for([21, 6], seed=13)
    prompts = [same, same, other, same, same, same]
    params = [greedy(1), greedy(6), greedy(5), SamplingParams(temperature=1.0, max_tokens=7, seed=4, ignore_eos=True),
              greedy(3, prompt_logprobs=0), SamplingParams(temperature=0.9, max_tokens=5, ignore_eos=True)]  # fmt: skip
    chunks = []
    real = Engine._prefill_chunk

    def counting(self, req):
        chunks.append(req.request_id)
        return real(self, req)

    monkeypatch.setattr(Engine, "_prefill_chunk", counting)

    def run():
        chunks.clear()
        engine = Engine(model(), max_num_seqs=6, max_model_len=64, prefill_chunk=8, seed=3)
        out = engine.generate(prompts, params)
        assert engine.num_free_slots == 6
        return [(r.token_ids, r.finish_reason) for r in out], sorted(set(chunks))

    shared, prefilled = run()
    assert prefilled == ["req-0", "req-2", "req-4"]  # the leader, the other prompt, the prompt-logprobs request
    assert shared[0][0] == reference(tuple(same), 1) and shared[1][0] == reference(tuple(same), 6)
    monkeypatch.setattr(Engine, "_share_prompt", lambda self, leader: [])
    alone, prefilled = run()
    assert prefilled == [f"req-{i}" for i in range(6)]
    assert shared == alone
