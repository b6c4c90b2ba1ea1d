"""The static-shape decode step (`hybridmoe.serve.graphs`) against its twin, the engine's eager decode.

Two engines over the same model run the same requests (mixed lengths, requests joining and finishing, slots reused,
batches padded to a bucket) with decode_mode "eager" and "static"; every decode step's logits must agree (fp32).
The compiled step (torch.compile, CPU inductor) must give the static step's logits and pool writes; CUDA graphs are
checked against the eager decode when a GPU is present. Models: the `debug` preset without MTP, random weights.
"""

from __future__ import annotations

import time

import pytest
import torch
from test_engine import greedy, model, prompts_for

from hybridmoe.cache import KVState, MambaState
from hybridmoe.kernels.attention import sdpa_backend
from hybridmoe.serve import AdmissionError, Engine, speculative
from hybridmoe.serve.graphs import StaticDecoder, StaticSequence, batch_buckets


def run_recording(engine: Engine, prompts, max_tokens, join_at=3):
    """Run the requests (the second half joining at step `join_at`); returns each step's decode (slots, logits)."""
    steps = []
    decode = engine._decode

    def recording(reqs):
        logits = decode(reqs)
        steps.append(([r.request_id for r in reqs], logits.clone()))
        return logits

    engine._decode = recording
    half = len(prompts) // 2
    for p, n in zip(prompts[:half], max_tokens[:half]):
        engine.add_request(p, greedy(n))
    step = 0
    while engine.has_unfinished() or step <= join_at:
        if step == join_at:
            for p, n in zip(prompts[half:], max_tokens[half:]):
                engine.add_request(p, greedy(n))
        engine.step()
        step += 1
    return steps


def test_static_decode_logits_equal_the_eager_decode():
    lengths, max_tokens = [6, 1, 13, 4, 9, 2], [7, 9, 4, 8, 5, 6]
    prompts = prompts_for(lengths, seed=3)
    kw = dict(max_num_seqs=4, max_model_len=32, prefill_chunk=5)
    eager = run_recording(Engine(model(), decode_mode="eager", **kw), prompts, max_tokens)
    engine = Engine(model(), decode_mode="static", **kw)
    engine._static = StaticDecoder(model(), engine.pool, "static", min_keys=4)  # key ranges 4, 8, 16, 32
    static = run_recording(engine, prompts, max_tokens)
    assert [ids for ids, _ in static] == [ids for ids, _ in eager]
    assert {len(ids) for ids, _ in eager} >= {1, 3, 4}  # padded buckets (3 -> 4) and a full one
    assert {keys for _, keys in engine._static._bucket} == {8, 16}  # rows of 4..15 tokens: two key ranges
    for (_, a), (_, b) in zip(eager, static):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def snapshot(pool) -> list[torch.Tensor]:
    out = []
    for state in pool.cache.layers:
        if isinstance(state, MambaState):
            out += [state.conv.clone(), state.ssm.clone()]
        elif isinstance(state, KVState):
            out += [state.key.clone(), state.value.clone()]
    return out


def restore(pool, tensors) -> None:
    it = iter(tensors)
    for state in pool.cache.layers:
        if isinstance(state, MambaState):
            state.conv.copy_(next(it)), state.ssm.copy_(next(it))
        elif isinstance(state, KVState):
            state.key.copy_(next(it)), state.value.copy_(next(it))


def prefilled_engine(lengths, num_slots=4) -> Engine:
    """A static-mode engine whose first len(lengths) slots hold prompts of those lengths."""
    engine = Engine(model(), max_num_seqs=num_slots, max_model_len=24, prefill_chunk=16, decode_mode="static")
    for p in prompts_for(lengths, seed=4):
        engine.add_request(p, greedy(8))
    while any(r.prefilling for r in engine._requests.values()) or engine.num_waiting:
        engine.step()
    return engine


def test_padding_rows_touch_only_the_scratch_slot():
    engine = prefilled_engine([5, 3, 8])
    pool = engine.pool
    slots = [0, 2]  # a batch of 2 rows; slots 1 and 3 stay out of it
    before = snapshot(pool)
    engine._static.decode(slots, [7, 9], [pool.lengths[s] for s in slots])
    engine._static.decode([1, 0, 2], [1, 2, 3], [pool.lengths[s] for s in [1, 0, 2]])  # bucket 4: one padding row
    after = snapshot(pool)
    for b, a in zip(before, after):
        assert torch.equal(b[3], a[3]), "a slot outside the batch changed"
    assert pool.scratch == 4 and pool.num_free == 1 and 4 not in pool._free


def static_step_then_undo():
    """An engine with three prefilled slots, the static step's logits and pool for one decode batch of them, and the
    pool put back as it was before that step (for another decoder to take the same step)."""
    engine = prefilled_engine([5, 3, 8])
    pool = engine.pool
    slots, tokens = [2, 0, 1], [11, 5, 300]
    lengths = [pool.lengths[s] for s in slots]
    before = snapshot(pool)
    want = engine._static.decode(slots, tokens, lengths)
    want_pool = snapshot(pool)
    restore(pool, before)
    return engine, (slots, tokens, lengths), want, want_pool


def test_gathered_experts_equal_the_engine_experts():
    engine, batch, want, _ = static_step_then_undo()
    pool = engine.pool
    gathered = StaticDecoder(engine.model, pool, mode="static")
    assert not gathered.gather_experts and gathered.key_buckets == [24]
    gathered.gather_experts = True  # what the compiled and captured steps run unless torch._grouped_mm does
    torch.testing.assert_close(gathered.decode(*batch), want, rtol=1e-5, atol=1e-5)


def test_compiled_step_equals_the_static_step():
    engine, batch, want, want_pool = static_step_then_undo()
    pool = engine.pool
    compiled = StaticDecoder(engine.model, pool, mode="compile")
    t0 = time.perf_counter()
    got = compiled.decode(*batch)
    print(f"compile + first step: {time.perf_counter() - t0:.1f} s")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(snapshot(pool), want_pool):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_decode_mode_and_buckets():
    assert batch_buckets(1) == [1] and batch_buckets(8) == [1, 2, 4, 8] and batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(4096, 256) == [256, 512, 1024, 2048, 4096] and batch_buckets(100, 256) == [100]
    with pytest.raises(ValueError, match="decode_mode must be one of"):
        Engine(model(), max_num_seqs=2, max_model_len=16, decode_mode="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA model"):
            Engine(model(), max_num_seqs=2, max_model_len=16, decode_mode="graphs")
        assert Engine(model(), max_num_seqs=2, max_model_len=16).decode_mode == "eager"  # the CPU default
    with pytest.raises(ValueError, match="phase must be"):
        sdpa_backend("train", "cpu")


def test_static_mode_fits_the_scratch_slot_in_max_cache_bytes():
    per_slot = Engine(model(), max_num_seqs=1, max_model_len=32).cache_bytes
    fitted = Engine(model(), max_num_seqs=4, max_model_len=32, max_cache_bytes=3 * per_slot, decode_mode="static")
    assert fitted.max_num_seqs == 2 and fitted.cache_bytes <= 3 * per_slot
    with pytest.raises(AdmissionError, match="lower max_model_len or raise max_cache_bytes"):
        Engine(model(), max_num_seqs=4, max_model_len=32, max_cache_bytes=per_slot, decode_mode="static")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["graphs", "compile"])
def test_cuda_graph_decode_equals_the_eager_decode(mode):
    cuda_model = model().to("cuda")
    try:
        lengths, max_tokens = [6, 1, 13, 4, 9, 2], [7, 9, 4, 8, 5, 6]
        prompts = prompts_for(lengths, seed=3)
        kw = dict(max_num_seqs=4, max_model_len=32, prefill_chunk=5)
        eager = run_recording(Engine(cuda_model, decode_mode="eager", **kw), prompts, max_tokens)
        graphs = run_recording(Engine(cuda_model, decode_mode=mode, **kw), prompts, max_tokens)
        assert [ids for ids, _ in graphs] == [ids for ids, _ in eager]
        for (_, a), (_, b) in zip(eager, graphs):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    finally:
        model().to("cpu")


def mtp_model():
    from test_speculative import model as spec_model

    return spec_model(512)


@torch.no_grad()
def test_static_sequence_equals_the_eager_forwards():
    """Verification-sized main forwards and MTP forwards at several starts: logits, hidden states and the cache
    (Mamba states, the written KV) as the model's own cached forwards give them."""
    m = mtp_model()
    prompt = prompts_for([11], seed=7)[0]
    caches = [m.new_cache(1, capacity=24, include_mtp=True) for _ in range(2)]
    for cache in caches:
        m(torch.tensor([prompt]), cache=cache)
    eager, static = caches
    runner = StaticSequence(m, static, "static")
    for ids in ([5, 6, 7], [8], [9, 10]):  # a verification of 3, a single token, a replay of 2
        out = m(torch.tensor([ids]), cache=eager)
        logits, hidden = runner.main(ids)
        assert static.seq_len == eager.seq_len
        torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden, out.hidden_states, rtol=1e-5, atol=1e-5)
    for a, b in zip(eager.layers, static.layers):
        if isinstance(a, MambaState):
            torch.testing.assert_close(b.ssm, a.ssm, rtol=1e-5, atol=1e-5)
        elif isinstance(a, KVState):
            n = eager.seq_len
            torch.testing.assert_close(b.key[:, :, :n], a.key[:, :, :n], rtol=1e-5, atol=1e-5)
    h = torch.randn(1, 3, m.config.hidden_size, generator=torch.Generator().manual_seed(0))
    mtp_eager, mtp_static = speculative._MTP(m, eager), speculative._MTP(m, static, runner)
    for start, n in [(0, 3), (3, 1), (4, 2)]:
        mtp_eager.length = mtp_static.length = start
        want = mtp_eager.commit(h[:, :n], [1, 2, 3][:n])
        got = mtp_static.commit(h[:, :n], [1, 2, 3][:n])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceed the cache's capacity"):
        runner.main([1] * (24 - static.seq_len + 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_speculative_graphs_equal_eager_on_cuda():
    m = mtp_model().to("cuda")
    try:
        for n in (1, 9, 30):
            prompt = prompts_for([n], seed=n)[0]
            a = speculative.speculative_generate(m, prompt, greedy(16), num_draft_tokens=3, decode_mode="eager")
            b = speculative.speculative_generate(m, prompt, greedy(16), num_draft_tokens=3, decode_mode="graphs")
            assert a.token_ids == b.token_ids
    finally:
        mtp_model().to("cpu")


def test_cli_passes_the_decode_mode():
    from hybridmoe.cli import _engine_kwargs, build_parser

    args = build_parser().parse_args(["serve", "some/checkpoint", "--decode-mode", "static"])
    assert _engine_kwargs(args)["decode_mode"] == "static"
    assert _engine_kwargs(build_parser().parse_args(["serve", "some/checkpoint"]))["decode_mode"] is None
