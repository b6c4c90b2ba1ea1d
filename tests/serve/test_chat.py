"""The chat layer (`hybridmoe.serve.chat`): rendering in the Nemotron 3 chat format (the exact bytes, the same as
the tokenizer's apply_chat_template; tools, reasoning on/off, the plain ChatML of older tokenizers), parsing
reasoning and tool calls (whole and streamed in arbitrary pieces, which must agree; render -> parse round trips),
incremental detokenizing with stop strings, and the reasoning budget through the engine.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.exceptions import TemplateError

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.data.messages import template_messages
from hybridmoe.data.tokenizer import PLAIN_CHAT_TEMPLATE, load_tokenizer, train_tokenizer, vocab_size_of
from hybridmoe.serve import (
    ChatOutputParser,
    Engine,
    IncrementalDetokenizer,
    ReasoningBudget,
    SamplingParams,
    parse_chat_output,
    render_chat,
)
from hybridmoe.serve.chat import parse_tool_call, string_parameters

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


def streamed(text: str, reasoning: bool, parse_tools: bool = True, seed: int = 0, tools=None):
    parser = ChatOutputParser(reasoning, parse_tools, tools)
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
    assert on.text == (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
        "<function>\n<name>get_weather</name>\n<parameters>\n</parameters>\n</function>\n</tools>\n\n"
        "To call functions, end your reply with one block per call, in this format:\n\n<tool_call>\n"
        "<function=function_name>\n<parameter=parameter_name>\nvalue, on as many lines as it needs\n</parameter>\n"
        "</function>\n</tool_call>\n\nGive every required parameter. Write any explanation before the calls, never "
        "after them. When no function helps, answer directly.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>Hello!<|im_end|>\n"  # before the last user turn: reasoning dropped
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nneed a tool\n</think>\n"  # inside the tool loop: kept
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n"
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n20 C\n</tool_response>\n"
        "<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert on.reasoning and on.token_ids == tok(on.text, add_special_tokens=False)["input_ids"]
    # The same bytes as the tokenizer's own apply_chat_template, once the arguments are objects.
    decoded, _ = template_messages(CONVERSATION)
    assert on.text == tok.apply_chat_template(decoded, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    with pytest.raises(TemplateError, match="decode a JSON string first"):
        tok.apply_chat_template(CONVERSATION, tokenize=False)
    off = render_chat(tok, CONVERSATION[:2], reasoning=False)
    assert off.text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" + (
        "<|im_start|>assistant\n<think></think>"
    )
    assert not off.reasoning and off.text == tok.apply_chat_template(
        CONVERSATION[:2], add_generation_prompt=True, enable_thinking=False, tokenize=False
    )
    no_system = render_chat(tok, [{"role": "user", "content": "Hi"}], tools=TOOLS)
    assert no_system.text.startswith("<|im_start|>system\n# Tools\n") and "<|im_start|>user\nHi" in no_system.text
    assert render_chat(tok, [{"role": "user", "content": "Hi"}]).text.startswith("<|im_start|>user\n")
    developer = render_chat(tok, [{"role": "developer", "content": "Be kind."}, {"role": "user", "content": "Hi"}])
    assert developer.text.startswith("<|im_start|>system\nBe kind.<|im_end|>\n")
    for bad in ([], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": [{"type": "image_url"}]}]):
        with pytest.raises(ValueError):
            render_chat(tok, bad)
    with pytest.raises(ValueError, match="tools"):
        render_chat(tok, CONVERSATION[1:2], tools=[{"type": "function", "function": {}}])
    bad_call = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]
    with pytest.raises(ValueError, match=r"tool_calls\[0\].function.arguments must be a JSON object"):
        render_chat(tok, bad_call)


def test_template_switches_and_tool_definitions(tok):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "reasoning_content": "r"},
               {"role": "user", "content": "And now?"}]  # fmt: skip
    kept = tok.apply_chat_template(history, truncate_history_thinking=False, tokenize=False)
    assert "<think>\nr\n</think>\nHello!" in kept
    assert "<think></think>Hello!" in tok.apply_chat_template(history, tokenize=False)
    budget = tok.apply_chat_template(history, add_generation_prompt=True, reasoning_budget=64, tokenize=False)
    assert budget.endswith("user\nAnd now?\n\n{thinking token budget: 64}<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert "Hi\n\n{thinking" not in budget  # only the last user message
    tools = [{"type": "function", "function": {
        "name": "search", "description": " Find pages. ", "strict": True,
        "parameters": {"type": "object", "required": ["q"], "additionalProperties": False, "properties": {
            "q": {"type": "string", "description": "the query"},
            "n": {"type": "integer", "enum": [1, 5], "minimum": 1}}},
    }}]  # fmt: skip
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], tools=tools, tokenize=False)
    assert (
        "<tools>\n<function>\n<name>search</name>\n<description>Find pages.</description>\n<parameters>\n<parameter>\n"
        "<name>q</name>\n<type>string</type>\n<description>the query</description>\n</parameter>\n<parameter>\n"
        "<name>n</name>\n<type>integer</type>\n<enum>[1, 5]</enum>\n<minimum>1</minimum>\n</parameter>\n"
        '<additionalProperties>false</additionalProperties>\n<required>["q"]</required>\n</parameters>\n'
        "<strict>true</strict>\n</function>\n</tools>"
    ) in text


def test_render_with_the_plain_chatml_of_older_tokenizers(tok):
    """Checkpoints whose tokenizer has the plain ChatML template get the messages lowered to text, as before."""
    saved, tok.chat_template = tok.chat_template, PLAIN_CHAT_TEMPLATE
    try:
        on = render_chat(tok, CONVERSATION, tools=TOOLS, reasoning=True)
        assert on.reasoning and on.text.endswith("<|im_start|>assistant\n<think>\n")
        system = on.text.split("<|im_end|>")[0]
        assert system.startswith("<|im_start|>system\nBe brief.\n\n") and json.dumps(TOOLS[0]) in system
        assert "old thoughts" not in on.text and "<think></think>Hello!" in on.text
        call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        assert f"<think>\nneed a tool\n</think>\n{call}<|im_end|>" in on.text
        assert "user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n20 C\n</tool_response><|im_end|>" in (
            on.text
        )
        off = render_chat(tok, CONVERSATION[:2], reasoning=False)
        assert not off.reasoning and off.text.endswith("<|im_start|>assistant\n<think></think>")
    finally:
        tok.chat_template = saved


# ------------------------------------------------------------------------------------------------ round trip
_TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "</parameter>", "</function>", "<|im_end|>")
_TEXT = st.text(st.sampled_from(list("ab c\n\t<>/=:{}\"'é東0-")), max_size=30).filter(
    lambda s: not any(tag in s for tag in _TAGS)
)
_NAME = st.text(st.sampled_from(list("abcxyz_")), min_size=1, max_size=6)
_NUMBER = st.integers(-(10**6), 10**6) | st.floats(allow_nan=False, allow_infinity=False, width=32)
_OBJECT = st.dictionaries(_NAME, _NUMBER | _TEXT | st.booleans() | st.none(), max_size=3)
ROUND_TRIP_TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "s": {"type": "string"}, "t": {"type": "string"}, "n": {"type": "number"}, "o": {"type": "object"}}}}}]  # fmt: skip
_ARGUMENTS = st.fixed_dictionaries({}, optional={"s": _TEXT, "t": _TEXT, "n": _NUMBER, "o": _OBJECT})
_CALL = st.tuples(st.just("f"), _ARGUMENTS) | st.tuples(_NAME, st.dictionaries(_NAME, _NUMBER | _OBJECT, max_size=2))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    reasoning=_TEXT, content=_TEXT, calls=st.lists(_CALL, max_size=3), as_string=st.booleans(), seed=st.integers(0, 9)
)
def test_render_then_parse_gives_the_message_back(tok, reasoning, content, calls, as_string, seed):
    """An assistant message rendered as the last turn, then its generated part (the tokens after the prompt, up
    to <|im_end|>) parsed: the same reasoning_content, content and tool calls (string arguments kept as text where
    the tools declare them strings)."""
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Go."}]
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": [
        {"type": "function", "function": {"name": n, "arguments": json.dumps(a) if as_string else a}}
        for n, a in calls
    ]}  # fmt: skip
    thinking = bool(reasoning.strip())
    prompt = render_chat(tok, history, tools=ROUND_TRIP_TOOLS, reasoning=thinking)
    full = render_chat(tok, [*history, message], tools=ROUND_TRIP_TOOLS, add_generation_prompt=False)
    assert full.token_ids[: len(prompt.token_ids)] == prompt.token_ids and prompt.reasoning == thinking
    generated = tok.decode(full.token_ids[len(prompt.token_ids) :])
    assert generated.endswith("<|im_end|>\n")
    generated = generated.removesuffix("<|im_end|>\n")
    expected = (reasoning.strip(), content.strip(), [(n, a) for n, a in calls])
    out = parse_chat_output(generated, reasoning=prompt.reasoning, tools=ROUND_TRIP_TOOLS)
    assert (out.reasoning_content, out.content, [(c.name, json.loads(c.arguments)) for c in out.tool_calls]) == expected
    parts = streamed(generated, prompt.reasoning, seed=seed, tools=ROUND_TRIP_TOOLS)
    assert (parts[0], parts[1], [(n, json.loads(a)) for n, a, _ in parts[2]]) == expected


def test_parsing_keeps_declared_strings_as_text():
    body = "<function=f>\n<parameter=s>\n3\n</parameter>\n<parameter=n>\n3\n</parameter>\n</function>"
    assert parse_tool_call(body) == ("f", '{"s": 3, "n": 3}')  # without tools: JSON where it parses
    assert parse_tool_call(body, string_parameters(ROUND_TRIP_TOOLS)) == ("f", '{"s": "3", "n": 3}')
    assert string_parameters([{"type": "function", "function": "oops"}, ROUND_TRIP_TOOLS[0]]) == {"f": {"s", "t"}}


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
