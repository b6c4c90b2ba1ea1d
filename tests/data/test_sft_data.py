"""SFT data (`hybridmoe.data.sft`): assistant-only masks in the Nemotron 3 chat format (tools, reasoning, tool
loops), one sample per user turn, reasoning control, JSON lines and Parquet input, bad conversations counted by
reason with where they are, blends, packing (a property test), and the same samples as the implementation before
the chat format for plain conversations under other templates (a reference twin kept here)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from test_finetune import CHATS, _write_chats

from hybridmoe.data.messages import MessageError, template_messages
from hybridmoe.data.sft import (
    IGNORE_INDEX,
    Conversation,
    load_sft_samples,
    pack,
    read_conversations,
    tokenize_conversation,
    user_turn_samples,
)
from hybridmoe.data.sources import TooManyBadRecords
from hybridmoe.data.tokenizer import PLAIN_CHAT_TEMPLATE, load_tokenizer, train_tokenizer

WORDS = ["the", "weather", "in", "Paris", "is", "sunny", "what", "think", "need", "a", "tool", "answer", "blue"]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_LOOP = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "I need a tool.", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "c2", "content": "20 C"},
    {"role": "assistant", "content": "It is sunny.", "reasoning_content": "The tool says sunny."},
]  # fmt: skip
TWO_TURNS = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue.", "reasoning_content": "Any colour will do."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green.", "reasoning_content": "Not blue this time."},
]
PLAIN = [
    [{"role": "user", "content": "What is the weather?"}, {"role": "assistant", "content": "It is sunny."}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green."},
    ],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there, friend."}],
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(300)))
    train_tokenizer([root / "corpus.txt"], root / "tok", vocab_size=400, min_frequency=1, show_progress=False)
    return load_tokenizer(root / "tok")


@pytest.fixture
def template(tok):
    """Set the tokenizer's chat template for one test."""
    saved = tok.chat_template

    def use(text):
        tok.chat_template = text

    yield use
    tok.chat_template = saved


def write_jsonl(path, conversations, tools=None):
    with open(path, "w") as fh:
        for messages in conversations:
            fh.write(json.dumps({"messages": messages} | ({"tools": tools} if tools else {})) + "\n")
    return path


def learned(tok, conv: Conversation) -> list[str]:
    """The text of each run of loss tokens."""
    runs, run = [], []
    for t, m in zip(conv.input_ids + [None], conv.assistant_mask + [False]):
        if m:
            run.append(t)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs


def segments(sample: dict) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of each conversation packed in a sample, padding left out."""
    out = []
    for d in sample["document_ids"].unique().tolist():
        where = sample["document_ids"] == d
        ids, labels = sample["input_ids"][where].tolist(), sample["labels"][where].tolist()
        if any(ids) or any(x != IGNORE_INDEX for x in labels):
            out.append((ids, labels))
    return out


def packed_texts(tok, samples) -> list[tuple[str, str]]:
    """(text, learned text) of every packed conversation."""
    out = []
    for s in samples:
        for ids, labels in segments(s):
            out.append((tok.decode(ids), tok.decode([x for x in labels if x != IGNORE_INDEX])))
    return out


# ------------------------------------------------------------------------------------------------ masks
def test_masks_cover_the_answers_not_the_prompts_in_a_tool_loop(tok):
    messages, tools = template_messages(TOOL_LOOP, TOOLS)  # the JSON-string arguments decoded
    conv = tokenize_conversation(tok, messages, tools=tools)
    assert tok.decode(conv.input_ids) == tok.apply_chat_template(messages, tools=tools, tokenize=False)
    call = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n"
    assert learned(tok, conv) == [
        f"I need a tool.\n</think>\n{call}<|im_end|>\n",  # the prompt's <think>\n is not a target
        "The tool says sunny.\n</think>\nIt is sunny.<|im_end|>\n",
    ]
    # Without reasoning the prompt ends with the empty block, which is not a target either.
    plain = tokenize_conversation(tok, PLAIN[1])
    assert learned(tok, plain) == ["Blue.<|im_end|>\n", "Green.<|im_end|>\n"]
    assert "<think></think>Blue." in tok.decode(plain.input_ids)


def test_weight_0_keeps_a_message_in_the_conversation_and_out_of_the_loss(tok, tmp_path):
    failed = {"role": "assistant", "reasoning_content": "I guess the city.", "weight": 0,
              "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Pars"}}}]}  # fmt: skip
    error = {"role": "tool", "content": "error: no city Pars"}
    messages = TOOL_LOOP[:2] + [failed, error] + TOOL_LOOP[2:]  # a failed call, then the loop as before
    checked, tools = template_messages(messages, TOOLS)
    assert user_turn_samples(checked) == [(8, [4, 7])]
    conv = tokenize_conversation(tok, checked, tools=tools)
    assert "Pars" in tok.decode(conv.input_ids) and not any("Pars" in t for t in learned(tok, conv))
    plain = tokenize_conversation(tok, *template_messages(TOOL_LOOP, TOOLS)[:1], tools=tools)
    assert learned(tok, conv) == learned(tok, plain)  # the same targets as without the failed call
    samples, _ = load_sft_samples(write_jsonl(tmp_path / "w.jsonl", [messages], TOOLS), tok, 1024)
    ((_, text_learned),) = packed_texts(tok, samples)
    assert "Pars" not in text_learned and "Paris" in text_learned

    # weight is 0 or 1, on assistant messages only; a conversation with nothing of weight 1 has nothing to learn
    for bad, got in (
        ({**failed, "weight": 0.5}, "'0.5' on a message of role assistant"),
        ({**error, "weight": 0}, "'0' on a message of role tool"),
    ):
        with pytest.raises(MessageError, match=re.escape(f"messages[2].weight must be 0 or 1, on an assistant message "
                                                         f"(0: not a loss target), got {got}")):  # fmt: skip
            template_messages(TOOL_LOOP[:2] + [bad, error], TOOLS)
    only_failed = write_jsonl(tmp_path / "f.jsonl", [TOOL_LOOP, TOOL_LOOP[:2] + [failed, error]], TOOLS)
    _, report = load_sft_samples(only_failed, tok, 1024, max_bad_fraction=1.0)
    assert report.bad_records["no_assistant"] == 1 and report.conversations == 1


def test_inline_reasoning_reads_like_reasoning_content(tok, tmp_path):
    inline = [TWO_TURNS[0], {"role": "assistant", "content": "<think>\nAny colour will do.\n</think>\nBlue."}]
    a, _ = load_sft_samples(write_jsonl(tmp_path / "a.jsonl", [inline]), tok, 64)
    b, _ = load_sft_samples(write_jsonl(tmp_path / "b.jsonl", [TWO_TURNS[:2]]), tok, 64)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


# ------------------------------------------------------------------------------------------------ user turns
def test_one_sample_per_user_turn_when_history_reasoning_would_be_dropped(tok, tmp_path):
    assert user_turn_samples(TWO_TURNS) == [(2, [1]), (4, [3])]
    assert user_turn_samples(TOOL_LOOP) == [(6, [2, 5])]  # one user turn: the tool loop keeps its reasoning
    assert user_turn_samples(PLAIN[1]) == [(5, [2, 4])]  # no reasoning: one sample, every answer learned
    last_only = [TWO_TURNS[0], {"role": "assistant", "content": "Blue."}, *TWO_TURNS[2:]]
    assert user_turn_samples(last_only) == [(4, [1, 3])]
    unanswered = [*TWO_TURNS, {"role": "user", "content": "And?"}]
    assert user_turn_samples(unanswered) == [(2, [1]), (4, [3])]

    samples, report = load_sft_samples(write_jsonl(tmp_path / "c.jsonl", [TWO_TURNS]), tok, 96)
    assert report.records == 1 and report.conversations == 2
    texts = sorted(packed_texts(tok, samples), key=lambda t: len(t[0]))
    first, second = texts
    assert first[0].endswith("<think>\nAny colour will do.\n</think>\nBlue.<|im_end|>\n") and "Another" not in first[0]
    assert first[1] == "Any colour will do.\n</think>\nBlue.<|im_end|>\n"
    # The second sample renders the first answer as history (reasoning dropped) and learns only the second one.
    assert "<think></think>Blue.<|im_end|>" in second[0] and "Any colour" not in second[0]
    assert second[1] == "Not blue this time.\n</think>\nGreen.<|im_end|>\n"


# ------------------------------------------------------------------------------------------------ reasoning control
def _reasoning_chats(n):
    long = " ".join(["the weather in Paris is sunny"] * 6)
    return [
        [{"role": "user", "content": f"question {i}"},
         {"role": "assistant", "content": f"answer {i}", "reasoning_content": f"think {i} {long}"}]
        for i in range(n)
    ]  # fmt: skip


def test_reasoning_control_strips_and_truncates_shares_of_the_samples(tok, tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", _reasoning_chats(40) + PLAIN)
    kw = dict(reasoning_off_fraction=0.25, reasoning_truncate_fraction=0.1, reasoning_truncate_tokens=3)
    samples, report = load_sft_samples(path, tok, 256, **kw)
    assert (report.reasoning_samples, report.reasoning_off, report.reasoning_truncated) == (40, 10, 4)
    kinds = Counter()
    for text, target in packed_texts(tok, samples):
        if "question" not in text:
            continue
        answer = text[text.index("answer") :]
        if "<think></think>answer" in text:  # reasoning off: the prompt ends with the empty block
            kinds["off"] += 1
            assert target == answer
        elif "the weather in Paris is sunny the weather" not in text:  # cut to 3 tokens, then </think>, the answer
            kinds["truncated"] += 1
            reasoning = target.split("\n</think>\n")[0]
            assert len(tok(reasoning, add_special_tokens=False)["input_ids"]) <= 3 and target.endswith(answer)
            assert "<think>\n" + reasoning in text  # the thinking prompt, then the cut reasoning
        else:
            kinds["full"] += 1
            assert target.startswith("think ") and target.endswith(answer)
    assert kinds == {"off": 10, "truncated": 4, "full": 26}
    again, _ = load_sft_samples(path, tok, 256, **kw)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(samples, again) for k in x)  # deterministic by seed
    other, _ = load_sft_samples(path, tok, 256, seed=1, **kw)
    assert {t for t in packed_texts(tok, other) if "<think></think>answer" in t[0]} != {
        t for t in packed_texts(tok, samples) if "<think></think>answer" in t[0]
    }
    with pytest.raises(ValueError, match="at most 1"):
        load_sft_samples(path, tok, 256, reasoning_off_fraction=0.7, reasoning_truncate_fraction=0.5)
    with pytest.raises(ValueError, match="reasoning_truncate_tokens"):
        load_sft_samples(path, tok, 256, reasoning_truncate_tokens=0)


# ------------------------------------------------------------------------------------------------ input formats
def test_parquet_gives_the_same_samples_as_json_lines(tok, tmp_path):
    chats = [TOOL_LOOP, TWO_TURNS, *PLAIN]
    jsonl = write_jsonl(tmp_path / "chats.jsonl", chats, tools=TOOLS)
    expected, _ = load_sft_samples(jsonl, tok, 1024)
    # messages as a list of structs (a struct has every field, so absent ones are null) and tools as JSON text
    structs = pa.table({"messages": chats, "tools": [json.dumps(TOOLS)] * len(chats), "domain": ["chat"] * 5})
    pq.write_table(structs, tmp_path / "structs.parquet")
    # messages as JSON text, and one row that is not JSON
    text = pa.table({"messages": [json.dumps(c) for c in chats] + ["[{oops"], "tools": [json.dumps(TOOLS)] * 6})
    pq.write_table(text, tmp_path / "text.parquet", row_group_size=2)
    for name in ("structs.parquet", "text.parquet"):
        samples, report = load_sft_samples(tmp_path / name, tok, 1024, max_bad_fraction=0.5)
        assert len(samples) == len(expected)
        assert all(torch.equal(x[k], y[k]) for x, y in zip(samples, expected) for k in x), name
    assert report.bad_records["invalid_json"] == 1 and report.bad_examples["invalid_json"][0]["row"] == 5
    pq.write_table(pa.table({"text": ["hi"]}), tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match="no column 'messages'"):
        load_sft_samples(tmp_path / "wrong.parquet", tok, 1024)


# ------------------------------------------------------------------------------------------------ bad records
def test_bad_conversations_are_counted_by_reason_with_their_lines(tok, tmp_path, template):
    good = {"messages": PLAIN[0]}
    lines = [
        json.dumps(good),  # 1
        "{not json",  # 2: invalid_json
        "",  # 3: blank, skipped
        json.dumps({"messages": [{"role": "robot", "content": "hi"}, PLAIN[0][1]]}),  # 4: unknown_role
        json.dumps({"messages": PLAIN[0][:1]}),  # 5: no_assistant
        json.dumps({"messages": [PLAIN[0][0], {"role": "assistant", "tool_calls": [{"function": {"name": "f",
                    "arguments": "[1, 2]"}}]}]}),  # 6: bad_tool_call (arguments must be an object)
        json.dumps({"messages": [PLAIN[0][0], {"role": "assistant", "content": 5}]}),  # 7: bad_message
        json.dumps({"messages": []}),  # 8: not_a_conversation
        json.dumps({"messages": PLAIN[0], "tools": [{"type": "function", "function": {}}]}),  # 9: bad_tools
        json.dumps({"messages": [PLAIN[0][0], {"role": "assistant", "content": "sunny " * 200}]}),  # 10: too_long
        json.dumps(good),  # 11
    ]  # fmt: skip
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"messages": "\xff"}\n')  # 12: invalid_utf8
    bad_path = tmp_path / "bad_records.jsonl"
    samples, report = load_sft_samples(path, tok, 96, drop_long=True, max_bad_fraction=1.0, bad_records_path=bad_path)
    assert report.records == 11 and report.conversations == 2 and len(samples) == 1
    expected = {
        "invalid_json": [2], "unknown_role": [4], "no_assistant": [5], "bad_tool_call": [6], "bad_message": [7],
        "not_a_conversation": [8], "bad_tools": [9], "too_long": [10], "invalid_utf8": [12],
    }  # fmt: skip
    assert {r: n for r, n in report.bad_records.items() if n} == {r: 1 for r in expected}
    listed = [json.loads(x) for x in bad_path.read_text().splitlines()]
    assert {e["reason"]: [e["line"]] for e in listed} == expected
    assert all(e["file"] == str(path) for e in listed)
    assert "bad records: 9; 8 of 11 conversations" in report.summary() and "mixed.jsonl:6" in report.summary()

    with pytest.raises(TooManyBadRecords) as e:  # 9 of 11 is above the default 1%
        load_sft_samples(path, tok, 96, drop_long=True, bad_records_path=bad_path)
    assert e.value.report.bad_records["invalid_json"] == 1 and "max_bad_fraction" in str(e.value)
    with pytest.raises(ValueError, match=r"mixed.jsonl:10: the conversation has \d+ tokens, more than seq_len=96"):
        load_sft_samples(path, tok, 96, max_bad_fraction=1.0)

    # Conversations left out as too long were asked for (drop_long): listed, but not counted against the limit.
    long = write_jsonl(
        tmp_path / "long.jsonl", [PLAIN[0]] + [[PLAIN[0][0], {"role": "assistant", "content": "sunny " * 200}]] * 3
    )
    _, report = load_sft_samples(long, tok, 96, drop_long=True, bad_records_path=bad_path)
    assert report.bad_records["too_long"] == 3 and report.conversations == 1

    # A template that rewrites earlier turns when later ones come (here: it counts the messages) cannot be masked.
    template("{{ messages | length }}" + PLAIN_CHAT_TEMPLATE)
    two = write_jsonl(tmp_path / "two.jsonl", [PLAIN[1], PLAIN[0]])
    _, report = load_sft_samples(two, tok, 96, max_bad_fraction=1.0)
    assert report.bad_records["not_renderable"] == 1 and report.bad_examples["not_renderable"][0]["line"] == 1
    assert report.conversations == 1


# ------------------------------------------------------------------------------------------------ blends
def test_blends_draw_conversations_by_weight(tok, tmp_path):
    alpha = [[{"role": "user", "content": f"alpha {i}"}, {"role": "assistant", "content": "blue"}] for i in range(10)]
    beta = [[{"role": "user", "content": f"beta {i}"}, {"role": "assistant", "content": "green"}] for i in range(5)]
    a, b = write_jsonl(tmp_path / "a.jsonl", alpha), write_jsonl(tmp_path / "b.jsonl", beta)
    unused = write_jsonl(tmp_path / "unused.jsonl", [[{"role": "user", "content": "never"}, PLAIN[0][1]]])
    blend = {str(a): 1.0, str(b): 3.0, str(unused): 0}
    samples, report = load_sft_samples(blend, tok, 64)
    # 15 conversations in all: a quarter from a (3.75 -> 4), three quarters from b (11.25 -> 11: each twice, one more)
    assert [(d["path"], d["conversations"], d["drawn"]) for d in report.datasets] == [(str(a), 10, 4), (str(b), 5, 11)]
    drawn = Counter(text.split("user\n")[1].split("<|im_end|>")[0] for text, _ in packed_texts(tok, samples))
    assert sorted(v for k, v in drawn.items() if k.startswith("alpha")) == [1, 1, 1, 1]
    assert sorted(v for k, v in drawn.items() if k.startswith("beta")) == [2, 2, 2, 2, 3] and "never" not in drawn
    again, _ = load_sft_samples(blend, tok, 64)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(samples, again) for k in x)
    with pytest.raises(ValueError, match="weight"):
        load_sft_samples({str(a): -1}, tok, 64)


# ------------------------------------------------------------------------------------------------ packing
@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=25),
    seq_len=st.integers(40, 90),
    seed=st.integers(0, 3),
    data=st.data(),
)
def test_packing_keeps_every_conversation_once_and_whole(lengths, seq_len, seed, data):
    convs = []
    for n, length in enumerate(lengths):
        ids = [1000 + n] + data.draw(st.lists(st.integers(1, 999), min_size=length - 1, max_size=length - 1))
        mask = data.draw(st.lists(st.booleans(), min_size=length, max_size=length))
        convs.append(Conversation(ids, mask, n + 1))
    samples, report = pack(convs, seq_len, seed=seed)
    assert report.conversations == len(convs) and report.tokens == sum(lengths)
    assert report.tokens + report.padding == seq_len * len(samples)
    seen = []
    for s in samples:
        assert all(v.shape == (seq_len,) for v in s.values())
        docs, pos = s["document_ids"], s["position_ids"]
        assert docs[0] == 0 and (torch.diff(docs) >= 0).all() and (torch.diff(docs) <= 1).all()
        for d in docs.unique().tolist():
            where = docs == d
            assert torch.equal(pos[where], torch.arange(int(where.sum())))  # positions restart per conversation
            ids, labels = s["input_ids"][where].tolist(), s["labels"][where].tolist()
            match = [c for c in convs if c.input_ids == ids]
            if not match:  # the padding at the end: its own id, no targets
                assert d == docs.max() and not any(ids) and set(labels) == {IGNORE_INDEX}
                continue
            seen.append(ids)
            c = match[0]
            assert labels == [IGNORE_INDEX] + [t if m else IGNORE_INDEX for t, m in zip(ids[1:], c.assistant_mask[1:])]
    assert sorted(seen) == sorted(c.input_ids for c in convs)  # every conversation exactly once
    assert report.loss_tokens == sum(sum(c.assistant_mask[1:]) for c in convs)


# ------------------------------------------------------------------------------------------------ the previous twin
def _reference_samples(path, tokenizer, seq_len, seed=0):
    """load_sft_samples as it was before the Nemotron chat format (read, tokenize_conversation, pack), kept as the
    reference for plain conversations under templates other than ours."""

    def render(msgs, prompt=False):
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=prompt)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    convs = []
    with open(path) as fh:
        for line in fh:
            messages = json.loads(line)["messages"]
            ids = render(messages)
            mask = [False] * len(ids)
            for i, m in enumerate(messages):
                if m["role"] == "assistant":
                    start = len(render(messages[:i], prompt=True)) if i else 0
                    for j in range(start, len(render(messages[: i + 1]))):
                        mask[j] = True
            convs.append((ids, mask))
    bins, free = [], []
    for ids, mask in sorted(convs, key=lambda c: -len(c[0])):
        b = next((b for b, room in enumerate(free) if len(ids) <= room), None)
        if b is None:
            bins.append([(ids, mask)])
            free.append(seq_len - len(ids))
        else:
            bins[b].append((ids, mask))
            free[b] -= len(ids)
    random.Random(seed).shuffle(bins)
    samples = []
    for convs in bins:
        ids = [t for c, _ in convs for t in c]
        labels = [IGNORE_INDEX if j == 0 or not m[j] else c[j] for c, m in convs for j in range(len(c))]
        pos = [j for c, _ in convs for j in range(len(c))]
        docs = [d for d, (c, _) in enumerate(convs) for _ in c]
        pad = seq_len - len(ids)
        samples.append({"input_ids": torch.tensor(ids + [0] * pad), "labels": torch.tensor(labels + [-100] * pad),
                        "position_ids": torch.tensor(pos + list(range(pad))),
                        "document_ids": torch.tensor(docs + [len(convs)] * pad)})  # fmt: skip
    return samples


QWEN_STYLE = (  # a Qwen2.5-like template: it renders tools itself, and has no reasoning switch
    "{%- if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN3_STYLE = (  # a Qwen3-like switch: only the generation prompt changes with enable_thinking
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.mark.parametrize("name", ["plain ChatML", "qwen-style", "qwen3-style"])
def test_plain_conversations_under_other_templates_give_the_samples_they_gave_before(tok, tmp_path, template, name):
    template({"plain ChatML": PLAIN_CHAT_TEMPLATE, "qwen-style": QWEN_STYLE, "qwen3-style": QWEN3_STYLE}[name])
    path = write_jsonl(tmp_path / "plain.jsonl", PLAIN * 3)
    for seq_len, seed in ((128, 0), (256, 3)):
        samples, report = load_sft_samples(path, tok, seq_len, seed=seed)
        reference = _reference_samples(path, tok, seq_len, seed)
        assert len(samples) == len(reference) == report.samples
        for x, y in zip(samples, reference):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ------------------------------------------------------------------------------------------------ plain chats
@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    """A tokenizer with the plain ChatML template, trained on CHATS."""
    root = tmp_path_factory.mktemp("plain-tok")
    text = root / "corpus.txt"
    text.write_text("\n".join([m["content"] for chat in CHATS for m in chat] * 20))
    train_tokenizer([text], root / "tok", vocab_size=400, min_frequency=1, show_progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(root / "tok")
    tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok


def test_assistant_mask_covers_exactly_the_assistant_turns(plain_tok):
    tok = plain_tok
    conv = tokenize_conversation(tok, CHATS[1])
    learned = tok.decode([t for t, m in zip(conv.input_ids, conv.assistant_mask) if m])
    assert "Blue." in learned and "Green." in learned
    assert "colour" not in learned and "briefly" not in learned and "Another" not in learned
    # the masked spans are the assistant turns as the template renders them (content plus the end-of-turn token)
    assert 0 < sum(conv.assistant_mask) < len(conv.input_ids) / 2


def test_pack_keeps_conversations_apart(plain_tok):
    tok = plain_tok
    convs = [tokenize_conversation(tok, c, i + 1) for i, c in enumerate(CHATS)]
    longest = max(len(c.input_ids) for c in convs)
    samples, report = pack(convs, seq_len=longest + 8)
    assert report.conversations == 3 and report.tokens == sum(len(c.input_ids) for c in convs)
    seen = 0
    for s in samples:
        docs, pos, labels = s["document_ids"], s["position_ids"], s["labels"]
        starts = torch.nonzero(torch.diff(docs, prepend=docs[:1] - 1)).flatten()
        assert (pos[starts] == 0).all()  # positions restart in every conversation (and the padding)
        assert (labels[starts] == IGNORE_INDEX).all()  # no target across a boundary
        seen += int((labels != IGNORE_INDEX).sum())
    assert seen == report.loss_tokens == sum(sum(c.assistant_mask) - c.assistant_mask[0] for c in convs)
    with pytest.raises(ValueError, match="more than seq_len"):
        pack(convs, seq_len=longest - 1)
    _, dropped = pack(convs, seq_len=longest - 1, drop_long=True)
    assert dropped.dropped_long and "dropped" in dropped.summary()


def test_bad_conversation_files_fail_clearly(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match="no assistant message"):
        read_conversations(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        read_conversations(bad)
    bad.write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match="role"):
        read_conversations(bad)


def test_sft_samples_loader_counts(tmp_path, plain_tok):
    data = tmp_path / "chats.jsonl"
    _write_chats(data, CHATS)
    tok = plain_tok
    samples, report = load_sft_samples(data, tok, seq_len=128)
    assert report.conversations == 3 and report.samples == len(samples) >= 1
    assert all(s["input_ids"].shape == (128,) for s in samples)
