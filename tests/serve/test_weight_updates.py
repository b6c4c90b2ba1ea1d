"""Weight updates of a running engine and server (asynchronous RL's side of serving): `Engine.load_weights`, the
versions requests report, `POST /v1/weights` and who may call it, and `/v1/completions`' `return_token_ids`.

The "new" weights are a second debug-preset model with another seed: its greedy output differs from the first's,
so an update is visible as the served output becoming exactly the new model's own.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from test_server import MODEL, make_checkpoint, make_serving

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.checkpoint import checkpoint_tensors
from hybridmoe.serve import Engine, SamplingParams
from hybridmoe.serve.server import ServerThread

KEY = "test-key"
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def new_weights(checkpoint, tmp_path_factory):
    """A directory with model.safetensors of the same config, other values (what a trainer publishes)."""
    path = tmp_path_factory.mktemp("v1")
    torch.manual_seed(1)
    HybridMoEForCausalLM(HybridMoEConfig.from_pretrained(checkpoint)).save_pretrained(path)
    return str(path)


def engine_of(path: str, **kw) -> Engine:
    return Engine(HybridMoEForCausalLM.from_pretrained(path), max_num_seqs=4, max_model_len=128, **kw)


def greedy(engine: Engine, prompt=(5, 6, 7)) -> list[int]:
    return engine.generate([list(prompt)], GREEDY)[0].token_ids


# ------------------------------------------------------------------------------------------------ engine
def test_load_weights_gives_the_new_models_output(checkpoint, new_weights):
    engine, reference = engine_of(checkpoint), engine_of(new_weights)
    assert greedy(engine) != greedy(reference)  # else the test could not tell
    new = HybridMoEForCausalLM.from_pretrained(new_weights)
    engine.load_weights(checkpoint_tensors(new), version=3)  # the checkpoint's layout (one tensor per expert)
    assert engine.weight_version == 3 and greedy(engine) == greedy(reference)
    assert engine.generate([[5, 6, 7]], GREEDY)[0].weight_version == 3
    engine.load_weights(HybridMoEForCausalLM.from_pretrained(checkpoint).state_dict(), version=4)  # module layout
    assert greedy(engine) == greedy(engine_of(checkpoint))


def test_a_request_in_flight_keeps_its_oldest_version(checkpoint, new_weights):
    engine = engine_of(checkpoint)
    early = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for _ in range(3):  # prefilled and decoding under version 0
        engine.step()
    engine.load_weights(checkpoint_tensors(HybridMoEForCausalLM.from_pretrained(new_weights)), version=1)
    late = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    versions = {}
    while engine.has_unfinished():
        for out in engine.step():
            versions.setdefault(out.request_id, set()).add(out.weight_version)
    assert versions == {early: {0}, late: {1}}


def test_bad_weights_are_refused_and_change_nothing(checkpoint):
    engine = engine_of(checkpoint)
    before = greedy(engine)
    good = {k: v.clone() for k, v in checkpoint_tensors(engine.model).items()}
    name = next(k for k in good if k.endswith("mixer.in_proj.weight"))
    cases = [
        ({k: v for k, v in good.items() if k != name}, r"1 tensor\(s\) missing"),
        (good | {"extra.weight": torch.zeros(2)}, r"1 unexpected tensor\(s\)"),
        (good | {name: good[name][:, :-1]}, "has shape"),
        (good | {name: torch.full_like(good[name], float("nan"))}, "NaN or infinite"),
        (good | {name: good[name].long()}, "dtype"),
    ]
    for state_dict, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.load_weights(state_dict, version=1)
    with pytest.raises(ValueError, match="versions must increase"):
        engine.load_weights(good, version=0)
    assert engine.weight_version == 0 and greedy(engine) == before


# ------------------------------------------------------------------------------------------------ server
@pytest.fixture(scope="module")
def keyed(checkpoint):
    server = ServerThread(make_serving(checkpoint, max_model_len=256), api_key=KEY)
    yield server
    server.stop(grace_s=1)


def post(server, path, body, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def complete(server, prompt, **kw):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **kw}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


def test_return_token_ids_and_weight_version(keyed):
    tok = keyed.server.serving.tokenizer
    prompts = [[5, 6, 7], tok("The quick brown fox", add_special_tokens=False)["input_ids"]]
    r = complete(keyed, prompts, logprobs=0, return_token_ids=True, ignore_eos=False, max_tokens=12)
    version = keyed.server.serving.engine.weight_version
    for choice in r["choices"]:
        assert choice["prompt_token_ids"] == prompts[choice["index"]] and choice["weight_version"] == version
        ids, lps = choice["token_ids"], choice["logprobs"]["token_logprobs"]
        assert 1 <= len(ids) == len(lps) <= 12 and all(lp <= 0 for lp in lps)
        if choice["finish_reason"] == "stop":  # the end token is listed (a trainer learns to stop), not in the text
            assert ids[-1] in keyed.server.serving.engine.eos_token_ids and choice["text"] == tok.decode(ids[:-1])
        else:
            assert len(ids) == 12 and choice["text"] == tok.decode(ids)
    # Streamed: the chunks' token ids add up to the same, the prompt's ids come once.
    with httpx.stream("POST", keyed.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"model": MODEL, "prompt": prompts[1], "max_tokens": 12, "temperature": 0, "stream": True,
                            "return_token_ids": True}) as s:  # fmt: skip
        chunks = [line[6:] for line in s.iter_lines() if line.startswith("data: {")]
    chunks = [json.loads(c)["choices"][0] for c in chunks]
    assert sum(1 for c in chunks if "prompt_token_ids" in c) == 1
    assert [t for c in chunks for t in c["token_ids"]] == r["choices"][1]["token_ids"]
    chat = post(keyed, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 4})  # fmt: skip
    assert chat.json()["choices"][0]["weight_version"] == version


def test_weight_update_endpoint(keyed, new_weights, checkpoint, tmp_path):
    before = complete(keyed, [5, 6, 7])["choices"][0]["text"]
    assert post(keyed, "/v1/weights", {"path": new_weights, "version": 1}, key="wrong").status_code == 401
    assert post(keyed, "/v1/weights", {"path": new_weights, "version": 1}, key=None).status_code == 401

    def refused(body, status, code):
        r = post(keyed, "/v1/weights", body)
        assert r.status_code == status and r.json()["error"]["code"] == code, r.text
        return r.json()["error"]["message"]

    assert "does not exist" in refused({"path": str(tmp_path / "nope"), "version": 1}, 400, "invalid_weights")
    (tmp_path / "file").write_text("x")
    assert "not a directory" in refused({"path": str(tmp_path / "file"), "version": 1}, 400, "invalid_weights")
    assert "neither model.safetensors" in refused({"path": str(tmp_path), "version": 1}, 400, "invalid_weights")
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    assert "not a readable safetensors" in refused({"path": str(tmp_path), "version": 1}, 400, "invalid_weights")
    other = tmp_path / "other"
    config = HybridMoEConfig.from_pretrained(checkpoint)
    config.hidden_size *= 2
    HybridMoEForCausalLM(config).save_pretrained(other)
    assert "has shape" in refused({"path": str(other), "version": 1}, 400, "invalid_weights")
    refused({"path": new_weights, "version": -1}, 400, None)
    assert complete(keyed, [5, 6, 7])["choices"][0]["text"] == before  # nothing was loaded

    ok = post(keyed, "/v1/weights", {"path": new_weights, "version": 1})
    assert ok.status_code == 200 and ok.json()["weight_version"] == 1
    after = complete(keyed, [5, 6, 7])
    expected = greedy(engine_of(new_weights), [5, 6, 7])
    assert after["choices"][0]["weight_version"] == 1
    assert complete(keyed, [5, 6, 7], return_token_ids=True)["choices"][0]["token_ids"] == expected
    assert "versions must increase" in refused({"path": new_weights, "version": 1}, 409, "stale_weight_version")
    assert httpx.get(keyed.url + "/v1/weights", headers={"Authorization": f"Bearer {KEY}"}).json() == {
        "weight_version": 1
    }


def test_a_server_without_a_key_refuses_weight_updates(checkpoint, new_weights):
    server = ServerThread(make_serving(checkpoint, max_model_len=256))
    try:
        r = post(server, "/v1/weights", {"path": new_weights, "version": 1}, key=None)
        assert r.status_code == 403 and "API key" in r.json()["error"]["message"]
        assert server.server.serving.engine.weight_version == 0
    finally:
        server.stop(grace_s=1)
