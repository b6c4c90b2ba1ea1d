"""The chat layer (`hybridmoe.serve.chat`): rendering with the tokenizer's template (tools, reasoning on/off),
parsing reasoning and tool calls (whole and streamed in arbitrary pieces, which must agree), incremental
detokenizing with stop strings, and the reasoning budget through the engine.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.data.tokenizer import load_tokenizer, train_tokenizer, vocab_size_of
from hybridmoe.serve import (
    ChatOutputParser,
    Engine,
    IncrementalDetokenizer,
    ReasoningBudget,
    SamplingParams,
    parse_chat_output,
    render_chat,
)
from hybridmoe.serve.chat import parse_tool_call

TEXT = "The weather in Paris is sunny; café, naïve, 東京 🙂. Call get_weather with a city and read the answer.\n"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    (path / "corpus.txt").write_text(TEXT * 50)
    train_tokenizer([str(path / "corpus.txt")], path / "tok", vocab_size=320, show_progress=False)
    return load_tokenizer(path / "tok")


def pieces(text: str, seed: int) -> list[str]:
    """`text` cut at random points (pieces of 0 to 6 characters)."""
    rng, out, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.randint(0, 6)
        out.append(text[i : i + n])
        i += n
    return out


def streamed(text: str, reasoning: bool, parse_tools: bool = True, seed: int = 0):
    parser = ChatOutputParser(reasoning, parse_tools)
    deltas = [parser.feed(p) for p in pieces(text, seed)] + [parser.finish()]
    reasoning_text = "".join(d.reasoning_content for d in deltas)
    content = "".join(d.content for d in deltas)
    calls = [(c.name, c.arguments, c.index) for d in deltas for c in d.tool_calls]
    return reasoning_text, content, calls


# ------------------------------------------------------------------------------------------------ parsing
CASES = [
    # (generated text, prompt opened <think>, reasoning, content, [(name, arguments)])
    ("Let me think.\nDone.\n</think>\n\nThe answer is 4.", True, "Let me think.\nDone.", "The answer is 4.", []),
    ("The answer is 4.", False, "", "The answer is 4.", []),
    ("<think>\nsneaky\n</think>\nok", False, "sneaky", "ok", []),  # a model that thinks when told not to
    ("still thinking when the tokens ran out", True, "still thinking when the tokens ran out", "", []),
    (
        'Need the weather.</think>\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
        '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        True,
        "Need the weather.",
        "Checking.",
        [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")],
    ),
    (  # Nemotron's XML-style call; values read as JSON when they parse
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
        "</parameter>\n</function>\n</tool_call>",
        False,
        "",
        "",
        [("get_weather", '{"city": "Paris", "days": 3}')],
    ),
    ("<tool_call>\nnot a call\n</tool_call> after", False, "", "<tool_call>\nnot a call\n</tool_call>after", []),
    ('a <tool_call>{"name": "f", "arguments": {"x": 1}}', False, "", "a", [("f", '{"x": 1}')]),  # cut off: kept
    ("a < b and a <tool b", False, "", "a < b and a <tool b", []),  # tag-like text that is not a tag
]


@pytest.mark.parametrize("text,opened,reasoning,content,calls", CASES)
def test_parse_whole_and_streamed(text, opened, reasoning, content, calls):
    whole = parse_chat_output(text, reasoning=opened)
    assert whole.reasoning_content == reasoning and whole.content == content
    assert [(c.name, c.arguments) for c in whole.tool_calls] == calls
    assert [c.index for c in whole.tool_calls] == list(range(len(calls)))
    assert all(c.to_openai()["type"] == "function" and c.id.startswith("call_") for c in whole.tool_calls)
    assert len({c.id for c in whole.tool_calls}) == len(calls)
    for seed in range(20):  # any way of cutting the text into deltas gives the same result
        assert streamed(text, opened, seed=seed) == (reasoning, content, [(*c, i) for i, c in enumerate(calls)])
    one_by_one = ChatOutputParser(opened)
    deltas = [one_by_one.feed(ch) for ch in text] + [one_by_one.finish()]
    assert "".join(d.content for d in deltas) == content


def test_partial_tags_are_held_back_only_while_ambiguous():
    parser = ChatOutputParser(reasoning=True)
    assert parser.feed("I think </thi").reasoning_content == "I think"  # "</thi" may become </think>
    delta = parser.feed("nk>Hello <tool")
    assert delta.reasoning_content == "" and delta.content == "Hello"
    delta = parser.feed('_call>{"name": "f", "arguments": "{}"}')
    assert not delta  # inside a call: nothing until it closes
    delta = parser.feed("</tool_call>")
    assert [(c.name, c.arguments) for c in delta.tool_calls] == [("f", "{}")]


def test_tool_parsing_off_keeps_the_text():
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    out = parse_chat_output(text, parse_tools=False)
    assert out.content == text and not out.tool_calls
    assert parse_tool_call('{"name": "f", "parameters": {"a": [1, 2]}}') == ("f", '{"a": [1, 2]}')
    assert parse_tool_call('{"arguments": {}}') is None and parse_tool_call("{oops") is None


# ------------------------------------------------------------------------------------------------ detokenizing
def test_incremental_detokenizer_matches_decode_and_cuts_stop_strings(tok):
    ids = tok(TEXT * 2, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    out = [detok.add([i]) for i in ids] + [detok.finish()]
    assert "".join(out) == tok.decode(ids) == TEXT * 2
    assert "\ufffd" not in "".join(out)  # multi-byte characters come whole
    detok = IncrementalDetokenizer(tok, stop=["sunny", "never"])
    out = [detok.add([i]) for i in ids]
    assert detok.stopped and "".join(out) + detok.finish() == "The weather in Paris is "
    # Text that may start a stop string is held back until it is decided.
    detok = IncrementalDetokenizer(tok, stop=["Paris is rainy"])
    sent = "".join(detok.add([i]) for i in tok("The weather in Paris is sunny", add_special_tokens=False)["input_ids"])
    assert not sent.endswith("Paris is") and sent + detok.finish() == "The weather in Paris is sunny"
    with_special = IncrementalDetokenizer(tok)
    think = tok.convert_tokens_to_ids(["<think>", "</think>"])
    assert with_special.add(think) + with_special.finish() == "<think></think>"


# ------------------------------------------------------------------------------------------------ rendering
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!", "reasoning_content": "old thoughts"},
    {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
    {"role": "assistant", "content": None, "reasoning_content": "need a tool",
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "20 C"},
]  # fmt: skip


def test_render_with_our_template(tok):
    on = render_chat(tok, CONVERSATION, tools=TOOLS, reasoning=True)
    assert on.reasoning and on.text.endswith("<|im_start|>assistant\n<think>\n")
    assert on.token_ids == tok(on.text, add_special_tokens=False)["input_ids"]
    system = on.text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n") and "<tools>\n" in system
    assert json.dumps(TOOLS[0]) in system
    assert "old thoughts" not in on.text and "<think></think>Hello!" in on.text  # before the last user turn
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert f"<think>\nneed a tool\n</think>\n{call}<|im_end|>" in on.text  # inside the tool loop: kept
    assert "user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n20 C\n</tool_response><|im_end|>" in (
        on.text
    )
    assert "user\nWeather in Paris?<|im_end|>" in on.text
    off = render_chat(tok, CONVERSATION[:2], reasoning=False)
    assert not off.reasoning and off.text.endswith("<|im_start|>assistant\n<think></think>")
    assert "<tools>" not in off.text
    no_system = render_chat(tok, CONVERSATION[1:2], tools=TOOLS)
    assert no_system.text.startswith("<|im_start|>system\n") and "get_weather" in no_system.text
    for bad in ([], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": [{"type": "image_url"}]}]):
        with pytest.raises(ValueError):
            render_chat(tok, bad)
    with pytest.raises(ValueError, match="tools"):
        render_chat(tok, CONVERSATION[1:2], tools=[{"type": "function", "function": {}}])


def test_a_template_that_knows_tools_gets_them(tok):
    template = (
        "{%- if tools %}TOOLS={{ tools | map(attribute='function') | map(attribute='name') | join(',') }}\n{% endif %}"
        "{%- for m in messages %}[{{ m.role }}]{{ m.content }}"
        "{%- for c in m.tool_calls or [] %}<call {{ c.function.name }}>{% endfor %}\n{% endfor %}"
        "{%- if add_generation_prompt %}[assistant]{% if enable_thinking %}<think>\n{% else %}<think></think>"
        "{% endif %}{% endif %}"
    )
    saved, tok.chat_template = tok.chat_template, template
    try:
        on = render_chat(tok, CONVERSATION[3:5], tools=TOOLS, reasoning=True)
        assert on.text.startswith("TOOLS=get_weather\n") and "<call get_weather>" in on.text
        assert on.reasoning and on.text.endswith("[assistant]<think>\n")  # the template's own switch, once
        off = render_chat(tok, CONVERSATION[3:4], reasoning=False)
        assert not off.reasoning and off.text.endswith("[assistant]<think></think>")
    finally:
        tok.chat_template = saved


# ------------------------------------------------------------------------------------------------ budget
def test_reasoning_budget_forces_the_end_of_thinking(tok):
    end = tok.convert_tokens_to_ids("</think>")
    logits = torch.zeros(400)
    budget = ReasoningBudget(2, end)
    assert budget([100], logits) is logits
    forced = budget([100, 101], logits)
    assert forced.argmax() == end and torch.isinf(forced).sum() == 399
    assert budget([100, 101, end, 102], logits) is logits  # closed: no more forcing
    with pytest.raises(ValueError):
        ReasoningBudget(-1, end)

    torch.manual_seed(0)
    config = HybridMoEConfig.from_preset("debug", num_nextn_predict_layers=0, vocab_size=vocab_size_of(tok))
    engine = Engine(HybridMoEForCausalLM(config).eval(), max_num_seqs=2, max_model_len=128, eos_token_id=None)
    prompt = render_chat(tok, [{"role": "user", "content": "Weather in Paris?"}], reasoning=True)
    free = SamplingParams(temperature=0, max_tokens=10)
    capped = SamplingParams(temperature=0, max_tokens=10, logits_processors=[ReasoningBudget(4, end)])
    free_out, capped_out = (r.token_ids for r in engine.generate([prompt.token_ids] * 2, [free, capped]))
    assert end not in free_out[:4]  # the model itself would not have stopped thinking yet
    assert capped_out[:4] == free_out[:4] and capped_out[4] == end and len(capped_out) == 10  # then it answers
    parsed = parse_chat_output(tok.decode(capped_out), reasoning=True)
    assert parsed.reasoning_content == tok.decode(capped_out[:4]).strip()
