"""lm-evaluation-harness (`lm_eval`, https://github.com/EleutherAI/lm-evaluation-harness) against the server, as its
users run it, and the wire format its `local-completions` model relies on.

lm-eval scores a multiple-choice answer by sending context + continuation as token ids to `/v1/completions` with
`echo: true, max_tokens: 1, logprobs: 1` and summing `logprobs.token_logprobs[ctxlen:-1]`; a server that echoes the
prompt without its logprobs makes every answer score 0 and lm-eval silently picks the first. Here lm-eval runs a
tiny local task (JSON data and task YAML written to tmp_path; no downloads, and a guard refuses any connection off
loopback), and the loglikelihoods it recorded must equal the model's own on the same token ids within 1e-4;
its generate_until task must get the model's greedy continuation. The server is the debug preset of
tests/serve/test_server.py (random weights, a small BPE tokenizer).
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest
import torch
import yaml
from test_server import MODEL, make_checkpoint, make_serving

from hybridmoe import HybridMoEForCausalLM
from hybridmoe.serve.chat import render_chat
from hybridmoe.serve.server import ServerThread

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval[api] is in the test extra")

MC_DOCS = [  # answers not all first: a server that scores every choice 0 gets 1/4 here, not 4/4 or 0/4
    {"question": "The quick brown fox jumps over the", "choices": ["lazy dog", "weather", "Paris"], "gold": 0},
    {"question": "What is the weather in Paris today? It is", "choices": ["dog", "sunny and warm", "9"], "gold": 1},
    {"question": "Call the function with", "choices": ["café", "punctuation", 'the name "get_weather"'], "gold": 2},
    {"question": "Numbers 0 1 2 3", "choices": ["fox", "4 5 6", "unicode"], "gold": 1},
]
GEN_DOCS = [
    {"question": "The quick brown", "answer": "fox"},
    {"question": "What is the weather in", "answer": "Paris"},
    {"question": "Numbers 0 1 2", "answer": "3"},
]
MAX_GEN_TOKS = 8

TASKS = {  # lm-eval task configs (https://github.com/EleutherAI/lm-evaluation-harness/blob/main/docs/task_guide.md)
    "hybridmoe_mc": {
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "gold",
        "metric_list": [{"metric": "acc"}],
    },
    "hybridmoe_gen": {
        "output_type": "generate_until",
        "doc_to_text": "Q: {{question}}\nA:",
        "doc_to_target": "answer",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": MAX_GEN_TOKS, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    },
}


def write_task(directory, name: str, docs: list[dict]) -> None:
    """The task `name` over `docs` (a local JSON file) into `directory`, for TaskManager(include_path=directory)."""
    data = directory / f"{name}.json"
    data.write_text(json.dumps(docs))
    dataset_kwargs = {"data_files": {"test": str(data)}, "cache_dir": str(directory / "hf-cache")}
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": dataset_kwargs, "test_split": "test"}
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(config | TASKS[name], sort_keys=False))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def live(checkpoint):
    server = ServerThread(make_serving(checkpoint))
    yield server
    server.stop(grace_s=1)


@pytest.fixture(scope="module")
def model(checkpoint):
    return HybridMoEForCausalLM.from_pretrained(checkpoint).eval()


LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture
def offline(monkeypatch):
    """No Hugging Face Hub access; a connection or name lookup off loopback raises and is recorded (a library that
    catches the error and falls back would otherwise hide it): the test asserts the list stays empty."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    attempts = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def loopback_only(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            attempts.append(address)
            raise OSError(f"the test tried to reach {address}; it must run offline")
        return connect(self, address)

    def lookup_loopback_only(host, *args, **kwargs):
        if host not in LOOPBACK and host is not None:
            attempts.append(host)
            raise OSError(f"the test tried to look up {host}; it must run offline")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    monkeypatch.setattr(socket, "getaddrinfo", lookup_loopback_only)
    return attempts


@torch.no_grad()
def own_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(t - 1,) the model's logprob of each token after the first given the ones before it."""
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return logp[torch.arange(len(ids) - 1), ids[1:]]


def test_lm_eval_local_completions_gets_the_models_loglikelihoods(live, checkpoint, model, tmp_path, offline):
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    write_task(tmp_path, "hybridmoe_mc", MC_DOCS)
    write_task(tmp_path, "hybridmoe_gen", GEN_DOCS)
    model_args = (f"base_url={live.url}/v1/completions,model={MODEL},tokenizer={checkpoint},"
                  "tokenizer_backend=huggingface,max_length=512,max_retries=1")  # fmt: skip
    lm = get_model("local-completions").create_from_arg_string(model_args)
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)  # indexing lm-eval's own tasks takes ~20 s
    results = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=tasks,
                                      log_samples=True, bootstrap_iters=0)  # fmt: skip

    # Multiple choice: every (context, continuation) lm-eval scored, against the model on the same token ids.
    picks = []
    for sample in results["samples"]["hybridmoe_mc"]:
        own = []
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            context_ids, continuation_ids = lm._encode_pair(context, continuation)
            ids = context_ids + continuation_ids
            own.append(own_logprobs(model, ids)[len(context_ids) - 1 :].sum().item())
            received = resp[0][0]
            assert abs(received - own[-1]) <= 1e-4, (context, continuation, received, own[-1])
        picks.append(max(range(len(own)), key=own.__getitem__) == sample["doc"]["gold"])
    assert results["results"]["hybridmoe_mc"]["acc,none"] == sum(picks) / len(picks)

    # generate_until: the model's greedy continuation, ended by a stop token or the task's "\n".
    tokenizer = live.server.serving.tokenizer
    stop_ids = live.server.serving.engine.eos_token_ids
    texts = []
    for sample in results["samples"]["hybridmoe_gen"]:
        (context, gen_kwargs), (text,) = sample["arguments"][0], sample["resps"][0]
        ids = lm.tok_encode(context)
        new = model.generate(torch.tensor([ids]), max_new_tokens=MAX_GEN_TOKS)[0, len(ids) :].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in stop_ids), len(new))]
        expected = tokenizer.decode(new)
        for stop in [*gen_kwargs["until"], tokenizer.eos_token]:
            expected = expected.split(stop)[0]
        assert text == expected
        texts.append(text)
    assert any(texts)  # the comparison saw real text (fixed by the checkpoint's seed)
    assert offline == []  # nothing tried to leave the machine


# ------------------------------------------------------------------------------------------------ the wire format
@pytest.fixture
def http(live):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        yield client


def completion(http, **body) -> dict:
    r = http.post("/v1/completions", json={"model": MODEL, "temperature": 0} | body)
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_returns_the_prompts_logprobs(http, live, model):
    tok = live.server.serving.tokenizer
    ids = tok("What is the weather in Paris today?", add_special_tokens=False)["input_ids"]
    r = completion(http, prompt=[ids], max_tokens=1, logprobs=2, echo=True)  # lm-eval's request
    (choice,) = r["choices"]
    lp = choice["logprobs"]
    n = len(ids) + 1
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    own = logp[torch.arange(len(ids) - 1), ids[1:]].tolist() + [logp[-1].max().item()]  # then the greedy token's
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1:]), torch.tensor(own), atol=1e-4, rtol=0)
    assert lp["tokens"][: len(ids)] == [tok.decode([t]) for t in ids]
    for token, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert top[token] == value and 2 <= len(top) <= 3  # the chosen token and the 2 most likely
    lengths = [len(t) for t in lp["tokens"]]
    assert lp["text_offset"] == [sum(lengths[:i]) for i in range(n)]
    assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": n}

    # max_tokens 0 (vLLM): the same prompt logprobs, nothing generated.
    r0 = completion(http, prompt=ids, max_tokens=0, logprobs=2, echo=True)
    (c0,) = r0["choices"]
    assert c0["text"] == tok.decode(ids) and c0["finish_reason"] == "length"
    assert {k: v[: len(ids)] for k, v in lp.items()} == c0["logprobs"]
    assert r0["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}

    # Streamed: the same text and logprobs, the prompt's in the first chunk.
    chunks = []
    body = {"model": MODEL, "prompt": ids, "max_tokens": 4, "logprobs": 2, "echo": True, "temperature": 0}
    with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:])["choices"][0])
    whole = completion(http, prompt=ids, max_tokens=4, logprobs=2, echo=True)["choices"][0]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    for key in whole["logprobs"]:
        assert [v for c in chunks for v in c["logprobs"][key]] == whole["logprobs"][key]
    assert len(chunks[0]["logprobs"]["tokens"]) >= len(ids)


def test_token_id_prompts_and_bad_requests(http, live):
    tok = live.server.serving.tokenizer
    a, b = (tok(t, add_special_tokens=False)["input_ids"] for t in ("The quick brown", "Numbers 0 1"))
    text = completion(http, prompt="The quick brown", max_tokens=3)["choices"][0]["text"]
    batch = completion(http, prompt=[a, b], max_tokens=3)["choices"]
    assert sorted(c["index"] for c in batch) == [0, 1] and batch[0]["text"] == text

    def error(body) -> dict:
        r = http.post("/v1/completions", json={"model": MODEL} | body)
        assert r.status_code == 400, r.text
        return r.json()["error"]

    assert error({"prompt": a, "max_tokens": 0})["param"] == "max_tokens"  # nothing to return without echo
    vocab = live.server.serving.engine.config.vocab_size
    assert "outside the vocabulary" in error({"prompt": [[*a, vocab]], "max_tokens": 1})["message"]
    assert "outside the vocabulary" in error({"prompt": [-1], "max_tokens": 1})["message"]
    assert error({"prompt": [a, []], "max_tokens": 1})["param"] == "prompt"


def test_tokenize_detokenize_and_tokenizer_info(http, live):
    serving = live.server.serving
    tok = serving.tokenizer
    text = "What is the weather in Paris today? café 東京"
    r = http.post("/tokenize", json={"model": MODEL, "prompt": text}).json()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert r == {"tokens": ids, "count": len(ids), "max_model_len": serving.engine.max_model_len}
    assert http.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()["token_strs"] == (
        tok.convert_ids_to_tokens(ids)
    )
    messages = [{"role": "user", "content": text}]
    chat = http.post("/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == render_chat(tok, messages).token_ids
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": text}

    for path, body, status, param in [
        ("/tokenize", {"model": MODEL}, 400, "prompt"),  # neither prompt nor messages
        ("/tokenize", {"prompt": "x", "messages": messages}, 400, "prompt"),
        ("/tokenize", {"messages": [{"role": "wizard"}]}, 400, "messages"),
        ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
        ("/detokenize", {"tokens": [len(tok)]}, 400, "tokens"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ]:
        r = http.post(path, json=body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (path, body, r.text)

    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token
    assert info["chat_template"] == tok.chat_template and info["tokenizer_class"] == type(tok).__name__
    assert "name_or_path" not in info and not any(k.endswith("_file") for k in info)  # no server paths

    # lm-eval's remote tokenizer (tokenizer_backend=remote) works over these routes.
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    assert check_remote_tokenizer_support(live.url + "/v1/completions")
    remote = RemoteTokenizer(live.url + "/v1/completions")
    assert remote.encode(text) == ids and remote.decode(ids) == text and remote.eos_token_id == tok.eos_token_id
