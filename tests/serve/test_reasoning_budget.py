"""`reasoning_budget` end to end through `hybridmoe serve`, with a model that would think longer than any budget.

`KeepsThinking` is an Engine whose model never ends its thinking by itself: until `</think>` is in a request's
output, `</think>` and the end tokens get a logit bias of -inf (the first logits processor), so only the request's
reasoning budget (the processor after it) can close the thinking block. The server must then cut the reasoning at
exactly the budget, force `</think>`, and let the model write its answer in the same request; `reasoning_content`
holds the reasoning that was cut; the same holds streamed, with `chat_template_kwargs`, with the server's default
budget, and for every choice of n > 1. The engine records every request's output ids, so the checks are on tokens.
"""

from __future__ import annotations

import dataclasses

import openai
import pytest
import torch
from test_server import MODEL, USER, make_checkpoint

from hybridmoe import HybridMoEForCausalLM
from hybridmoe.data.tokenizer import load_tokenizer
from hybridmoe.serve import Engine
from hybridmoe.serve.chat import THINK_END
from hybridmoe.serve.server import OpenAIServing, ServerThread


class NoEndOfThinking:
    """Bans `banned` token ids until `think_end` is in the output; keeps the output list it is called with."""

    def __init__(self, think_end: int, banned: list[int]):
        self.think_end, self.banned = think_end, banned
        self.output_ids: list[int] = []

    def __call__(self, output_ids, logits):
        self.output_ids = output_ids  # the request's own list: it holds every token once the request ends
        if self.think_end in output_ids:
            return logits
        logits = logits.clone()
        logits[self.banned] = -torch.inf
        return logits


class KeepsThinking(Engine):
    """An Engine whose requests cannot end their thinking by themselves (module docstring); `outputs` holds each
    request's output ids in the order the requests were added."""

    def __init__(self, *args, think_end: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.think_end = think_end
        self.recorders: list[NoEndOfThinking] = []

    def add_request(self, prompt_token_ids, params=None, request_id=None):
        recorder = NoEndOfThinking(self.think_end, [self.think_end, *self.eos_token_ids])
        params = dataclasses.replace(params, logits_processors=[recorder, *params.logits_processors])
        request_id = super().add_request(prompt_token_ids, params, request_id)
        self.recorders.append(recorder)
        return request_id

    @property
    def outputs(self) -> list[list[int]]:
        return [r.output_ids for r in self.recorders]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("ckpt"))
    tok = load_tokenizer(checkpoint)
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    think_end = tok.convert_tokens_to_ids(THINK_END)
    engine = KeepsThinking(HybridMoEForCausalLM.from_pretrained(checkpoint), max_num_seqs=4, max_model_len=256,
                           prefill_chunk=64, eos_token_id=eos, detokenize=tok, think_end=think_end)  # fmt: skip
    server = ServerThread(OpenAIServing(engine, tok, MODEL))
    yield server
    server.stop(grace_s=1)


@pytest.fixture
def engine(live):
    engine = live.server.serving.engine
    engine.recorders.clear()
    live.server.serving.reasoning_budget = None
    yield engine
    live.server.serving.reasoning_budget = None


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=60)


def ask(client, stream: bool = False, **kw):
    """A chat completion as (reasoning_content, content, finish_reason) per choice, streamed chunks joined."""
    kw = dict(model=MODEL, messages=USER, temperature=0, max_tokens=40) | kw
    if not stream:
        return [(c.message.model_extra.get("reasoning_content") or "", c.message.content or "", c.finish_reason)
                for c in client.chat.completions.create(**kw).choices]  # fmt: skip
    choices = {}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            reasoning, content, finish = choices.get(c.index, ("", "", None))
            reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
            choices[c.index] = (reasoning, content + (c.delta.content or ""), c.finish_reason or finish)
    return [choices[i] for i in sorted(choices)]


def expected(live, ids: list[int], budget: int) -> tuple[str, str]:
    """What the server must answer for output `ids` under `budget`: the reasoning before the forced `</think>` at
    position `budget`, and the answer after it (the end token left out)."""
    tok = live.server.serving.tokenizer
    think_end = live.server.serving.think_end_id
    assert ids.index(think_end) == budget, "the thinking was not cut at exactly the budget"
    answer = ids[budget + 1 :]
    if answer and answer[-1] in live.server.serving.engine.eos_token_ids:
        answer = answer[:-1]
    return tok.decode(ids[:budget]).strip(), tok.decode(answer).strip()


def test_the_model_thinks_past_any_budget(client, engine, live):
    ((reasoning, content, finish),) = ask(client, max_tokens=30)
    (ids,) = engine.outputs
    assert len(ids) == 30 and live.server.serving.think_end_id not in ids and finish == "length"
    assert content == "" and reasoning == live.server.serving.tokenizer.decode(ids).strip()


@pytest.mark.parametrize("budget", [0, 1, 7])
def test_budget_cuts_the_reasoning_and_the_answer_follows(client, engine, live, budget):
    ((unlimited, _, _),) = ask(client, max_tokens=budget + 1)
    ((reasoning, content, finish),) = ask(client, extra_body={"reasoning_budget": budget})
    free, cut = engine.outputs
    assert cut[:budget] == free[:budget]  # the budget changes nothing before it
    assert (reasoning, content) == expected(live, cut, budget)
    assert len(cut) > budget + 1 and finish in ("stop", "length")  # the model went on to answer


def test_budget_from_chat_template_kwargs_and_the_server_default(client, engine, live):
    via_kwargs = ask(client, extra_body={"chat_template_kwargs": {"reasoning_budget": 5}})
    top_level = ask(client, extra_body={"reasoning_budget": 5, "chat_template_kwargs": {"reasoning_budget": 2}})
    live.server.serving.reasoning_budget = 5
    default = ask(client)
    overridden = ask(client, extra_body={"reasoning_budget": 2})
    ids = engine.outputs
    assert via_kwargs == top_level == default  # the request's top-level budget wins over chat_template_kwargs
    assert via_kwargs[0][:2] == expected(live, ids[0], 5) and overridden[0][:2] == expected(live, ids[3], 2)


def test_budget_is_the_same_streamed(client, engine, live):
    ((reasoning, content, finish),) = ask(client, stream=True, extra_body={"reasoning_budget": 6})
    assert (reasoning, content) == expected(live, engine.outputs[0], 6)
    assert [(reasoning, content, finish)] == ask(client, extra_body={"reasoning_budget": 6})


@pytest.mark.parametrize("stream", [False, True])
def test_every_choice_of_n_gets_its_own_budget(client, engine, live, stream):
    choices = ask(client, stream=stream, n=3, temperature=1.0, seed=7, extra_body={"reasoning_budget": 4})
    assert len(choices) == 3 == len(engine.outputs)
    for (reasoning, content, _), ids in zip(choices, engine.outputs):
        assert (reasoning, content) == expected(live, ids, 4)
    assert len({tuple(ids) for ids in engine.outputs}) > 1  # the choices are sampled apart (seed, seed + 1, ...)


def test_budget_does_nothing_without_reasoning(client, engine, live):
    off = {"reasoning_effort": "none", "reasoning_budget": 2}
    ((reasoning, content, _),) = ask(client, max_tokens=12, extra_body=off)
    (ids,) = engine.outputs
    assert reasoning == "" and live.server.serving.think_end_id not in ids and len(ids) == 12
