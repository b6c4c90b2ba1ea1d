"""The chat layer: OpenAI-style messages -> prompt ids, and generated text -> reasoning, answer and tool calls.

Pure functions and small classes over a transformers tokenizer; no engine, no HTTP. The format is Nemotron 3's,
written by `hybridmoe.data.tokenizer.CHAT_TEMPLATE` (whose docstring spells it out and cites NVIDIA's templates):

- Rendering (`render_chat`). Messages and tools are checked first (`hybridmoe.data.messages`: a bad field is a
  ValueError naming it; tool-call arguments sent as JSON strings are decoded into objects, as vLLM does). A
  template that knows about tools (its source mentions `tools`: ours, NVIDIA's, Qwen's) then renders them itself,
  with `enable_thinking`, so `render_chat` writes exactly what `tokenizer.apply_chat_template(messages,
  tools=..., enable_thinking=...)` writes. Tokenizers saved before the format was adopted carry plain ChatML
  (`hybridmoe.data.tokenizer.PLAIN_CHAT_TEMPLATE`), which reads only `role` and `content`; for those the messages
  are first lowered to text, as they always were:
    * tool definitions go at the end of the system turn, one JSON object a line inside `<tools>...</tools>`, with
      a line saying how to call them;
    * an assistant turn is `<think>\\n{reasoning}\\n</think>\\n{answer}` followed by its calls, each
      `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`; reasoning of turns before the last user
      turn is dropped (rendered as an empty `<think></think>`), and kept inside the current tool loop;
    * consecutive `tool` messages go back inside one user turn, each as `<tool_response>\\n...\\n</tool_response>`.
- Reasoning on/off. A template with an `enable_thinking` switch gets it; otherwise (and when the tokenizer has a
  `<think>` token) the generation prompt is followed by `<think>\\n` (on) or `<think></think>` (off).
  `ChatPrompt.reasoning` says whether generation starts inside a thinking block, which is where parsing starts.
- Reasoning budget (`ReasoningBudget`): a logits processor for `SamplingParams.logits_processors` that forces
  `</think>` once N tokens were generated without one; the model then writes its answer in the same request.
- Parsing (`ChatOutputParser`): text deltas in, `ChatDelta(reasoning_content, content, tool_calls)` out, holding
  back only what could still be the start of a tag. A tool call is reported whole once `</tool_call>` arrives;
  both Nemotron's `<function=NAME><parameter=ARG>VALUE</parameter></function>` form (what the template writes;
  a value is read as JSON when it parses, unless the request's tools declare that parameter a string) and the
  JSON form above are read. Leading and trailing whitespace of each section is dropped, so the streamed deltas
  concatenate to exactly what `parse_chat_output` returns for the whole text.
- `IncrementalDetokenizer`: token ids in, text deltas out (never half a UTF-8 character), with stop strings cut
  off and text that might begin a stop string held back (OpenAI leaves stop strings out of the output).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

import torch

from ..data.messages import THINK_END, THINK_START, template_messages
from ..data.tokenizer import token_id

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"

_TOOLS_INSTRUCTION = (
    "You can call the functions below. To call one, write a JSON object with its name and arguments inside "
    "<tool_call></tool_call> tags:\n"
    '<tool_call>\n{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call>'
)


# ---------------------------------------------------------------------------------------------- rendering


@dataclass
class ChatPrompt:
    text: str
    token_ids: list[int]
    reasoning: bool  # generation starts inside a <think> block


def render_chat(
    tokenizer,
    messages: list[dict],
    tools: list[dict] | None = None,
    reasoning: bool = True,
    add_generation_prompt: bool = True,
) -> ChatPrompt:
    """Render OpenAI-style `messages` (and `tools`) with the tokenizer's chat template; see the module docstring.
    Raises ValueError naming the bad message or tool."""
    messages, tools = template_messages(messages, tools)
    source = _template_source(tokenizer)
    has_think = token_id(tokenizer, THINK_START) is not None
    kwargs = dict(add_generation_prompt=add_generation_prompt, tokenize=False)
    if "enable_thinking" in source:
        kwargs["enable_thinking"] = reasoning
    if "tools" in source:
        text = tokenizer.apply_chat_template(messages, tools=tools or None, **kwargs)
    else:
        text = tokenizer.apply_chat_template(_plain_messages(messages, tools, has_think), **kwargs)
    if add_generation_prompt and has_think and "enable_thinking" not in source:
        text += f"{THINK_START}\n" if reasoning else f"{THINK_START}{THINK_END}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ChatPrompt(text, ids, reasoning=add_generation_prompt and text.rfind(THINK_START) > text.rfind(THINK_END))


def _template_source(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ValueError("the tokenizer has no chat template; save one with the tokenizer (tokenizer.chat_template)")
    return json.dumps(template) if isinstance(template, dict) else template


def _plain_messages(messages: list[dict], tools: list[dict], has_think: bool) -> list[dict]:
    """Lower checked messages to {role, content} turns for a template that reads only those (module docstring)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    out: list[dict] = []
    tool_turn = False  # the previous turn is a user turn of tool responses
    for i, m in enumerate(messages):
        role = "system" if m["role"] == "developer" else m["role"]
        if role == "tool":
            block = f"{TOOL_RESPONSE_START}\n{m['content']}\n{TOOL_RESPONSE_END}"
            if tool_turn:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            tool_turn = True
            continue
        tool_turn = False
        content = m["content"]
        if role == "assistant":
            content = _assistant_text(m, keep_reasoning=i > last_user, has_think=has_think)
        out.append({"role": role, "content": content})
    if tools:
        block = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        block = f"{_TOOLS_INSTRUCTION}\n<tools>\n{block}\n</tools>"
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _assistant_text(message: dict, keep_reasoning: bool, has_think: bool) -> str:
    reasoning = (message.get("reasoning_content") or "").strip()
    head = ""
    if has_think:
        head = f"{THINK_START}\n{reasoning}\n{THINK_END}\n" if reasoning and keep_reasoning else THINK_START + THINK_END
    calls = []
    for call in message.get("tool_calls") or []:  # arguments decoded by template_messages
        fn = call["function"]
        body = json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
        calls.append(f"{TOOL_CALL_START}\n{body}\n{TOOL_CALL_END}")
    text = message["content"]
    if calls:
        text = "\n".join(([text] if text else []) + calls)
    return head + text


# ---------------------------------------------------------------------------------------------- reasoning budget


class ReasoningBudget:
    """A logits processor (`SamplingParams.logits_processors`) for a request whose prompt opened `<think>`: once
    `budget` tokens were generated without `</think>`, the next token is `</think>`; after that it does nothing.
    One instance per request (it remembers how far it has looked)."""

    def __init__(self, budget: int, end_token_id: int):
        if budget < 0:
            raise ValueError(f"the reasoning budget must be >= 0 tokens, got {budget}")
        self.budget, self.end_token_id = budget, end_token_id
        self._seen = 0
        self._closed = False

    def __call__(self, output_token_ids: list[int], logits_v: torch.Tensor) -> torch.Tensor:
        if not self._closed:
            self._closed = self.end_token_id in output_token_ids[self._seen :]
            self._seen = len(output_token_ids)
        if self._closed or len(output_token_ids) < self.budget:
            return logits_v
        forced = torch.full_like(logits_v, -torch.inf)
        forced[self.end_token_id] = 0.0
        return forced


# ---------------------------------------------------------------------------------------------- detokenizing


class IncrementalDetokenizer:
    """Token ids in, new text out. Each call decodes a window starting one call back (so tokenizers whose decoding
    depends on the previous token stay right) and keeps the text back while it ends in an incomplete character.
    With `stop` strings, text is cut before the first one and the last len(longest stop) - 1 characters are held
    until `finish`, so a stop string is never half sent."""

    def __init__(self, tokenizer, skip_special_tokens: bool = False, stop: list[str] | None = None):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.stop = list(stop or [])
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""  # everything decoded so far (cut at a stop string)
        self.stopped = False  # a stop string was found
        self._prefix = self._read = 0  # token offsets: decoded context window start, end of what is in `text`
        self._sent = 0  # characters of `text` already returned

    def add(self, token_ids: list[int]) -> str:
        self.token_ids.extend(token_ids)
        if not self.stopped:
            seen = self._decode(self.token_ids[self._prefix : self._read])
            now = self._decode(self.token_ids[self._prefix :])
            if len(now) > len(seen) and not now.endswith("\ufffd"):
                self.text += now[len(seen) :]
                self._prefix, self._read = self._read, len(self.token_ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text (a trailing incomplete character decodes as U+FFFD)."""
        if not self.stopped and self._read < len(self.token_ids):
            seen = self._decode(self.token_ids[self._prefix : self._read])
            self.text += self._decode(self.token_ids[self._prefix :])[len(seen) :]
            self._read = len(self.token_ids)
        return self._release(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def _release(self, final: bool) -> str:
        if not self.stopped and self.stop:
            # A stop string cannot start before `_sent`: held-back text always covers a stop string's length.
            hits = [i for i in (self.text.find(s, self._sent) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
        end = len(self.text) if final or self.stopped else max(self._sent, len(self.text) - self._hold)
        out, self._sent = self.text[self._sent : end], end
        return out


# ---------------------------------------------------------------------------------------------- parsing


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON string, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    index: int = 0  # position among the calls of the message

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ChatDelta:
    reasoning_content: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning_content or self.content or self.tool_calls)

    def __iadd__(self, other: ChatDelta) -> ChatDelta:
        self.reasoning_content += other.reasoning_content
        self.content += other.content
        self.tool_calls += other.tool_calls
        return self


class ChatOutputParser:
    """Streaming parser of an assistant turn: `feed(text)` returns what is now certain, `finish()` the rest.

    reasoning: the prompt opened `<think>` (ChatPrompt.reasoning), so the text starts as reasoning until `</think>`.
    A `<think>` before any answer text starts reasoning too (a model that thinks when told not to).
    parse_tools: read `<tool_call>` blocks (False for tool_choice "none": they stay in the content as text).
    tools: the request's tool definitions; a parameter they declare `"type": "string"` keeps its text as written
    (otherwise a value that parses as JSON, like `3` or `true`, is read as JSON).
    A block that is not a valid call also stays in the content, tags included, so nothing the model wrote is lost."""

    def __init__(self, reasoning: bool = False, parse_tools: bool = True, tools: list[dict] | None = None):
        self._state = "reasoning" if reasoning else "content"
        self.parse_tools = parse_tools
        self._string_params = string_parameters(tools)
        self._buf = ""  # text not yet assigned to a section
        self._fresh = True  # at the start of a section: leading whitespace is dropped
        self._trailing = ""  # whitespace at the end of the section so far, sent only if more text follows
        self._any_content = False
        self._num_calls = 0

    def feed(self, text: str) -> ChatDelta:
        self._buf += text
        out = ChatDelta()
        while True:
            if self._state == "tool":
                end = self._buf.find(TOOL_CALL_END)
                if end < 0:
                    return out
                self._end_tool_call(self._buf[:end], out, closed=True)
                self._buf = self._buf[end + len(TOOL_CALL_END) :]
                continue
            markers = self._markers()
            hits = [(i, m) for m in markers if (i := self._buf.find(m)) >= 0]
            if not hits:
                keep = _partial_marker_len(self._buf, markers)
                self._emit(self._buf[: len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep :]
                return out
            i, marker = min(hits)
            self._emit(self._buf[:i], out)
            self._buf = self._buf[i + len(marker) :]
            self._state = {THINK_END: "content", THINK_START: "reasoning", TOOL_CALL_START: "tool"}[marker]
            self._fresh, self._trailing = True, ""

    def finish(self) -> ChatDelta:
        out = ChatDelta()
        if self._state == "tool":  # an unclosed call (the output was cut): keep it if it parses
            self._end_tool_call(self._buf, out, closed=False)
        else:
            self._emit(self._buf, out)
        self._buf = ""
        return out

    def _markers(self) -> tuple[str, ...]:
        if self._state == "reasoning":
            return (THINK_END,)
        markers = (TOOL_CALL_START,) if self.parse_tools else ()
        return markers if self._any_content else (*markers, THINK_START)

    def _emit(self, text: str, out: ChatDelta) -> None:
        if self._fresh:
            text = text.lstrip()
            if not text:
                return
            self._fresh = False
        text = self._trailing + text
        body = text.rstrip()
        self._trailing = text[len(body) :]
        if self._state == "reasoning":
            out.reasoning_content += body
        else:
            out.content += body
            self._any_content = self._any_content or bool(body)

    def _end_tool_call(self, body: str, out: ChatDelta, closed: bool) -> None:
        self._state = "content"
        self._fresh, self._trailing = True, ""
        parsed = parse_tool_call(body, self._string_params)
        if parsed is None:
            self._emit(TOOL_CALL_START + body + (TOOL_CALL_END if closed else ""), out)
            self._fresh, self._trailing = True, ""
            return
        out.tool_calls.append(ToolCall(parsed[0], parsed[1], index=self._num_calls))
        self._num_calls += 1


def _partial_marker_len(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper prefix of a marker (it may become the marker)."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


_FUNCTION = re.compile(r"<function=([^>\s]+)>(.*?)</function>", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\s]+)>(.*?)</parameter>", re.S)


def string_parameters(tools: list[dict] | None) -> dict[str, set[str]]:
    """{function name: names of its parameters whose JSON schema type is "string"} of well-formed tool definitions
    (others are skipped: the request's tools were checked when the prompt was rendered)."""
    out: dict[str, set[str]] = {}
    for tool in tools or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        props = (fn.get("parameters") or {}) if isinstance(fn, dict) else None
        props = props.get("properties") if isinstance(props, dict) else None
        if isinstance(props, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = {k for k, v in props.items() if isinstance(v, dict) and v.get("type") == "string"}
    return out


def parse_tool_call(body: str, string_params: dict[str, set[str]] | None = None) -> tuple[str, str] | None:
    """(name, arguments as a JSON string) of one `<tool_call>` body, or None when it is not a call. Reads
    `{"name": ..., "arguments": {...}}` ("parameters" accepted too) and Nemotron's
    `<function=NAME><parameter=ARG>VALUE</parameter>...</function>` (values read as JSON when they parse, except
    the parameters `string_params` (`string_parameters(tools)`) lists for the function, kept as text)."""
    body = body.strip()
    if body.startswith("{"):
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return None
        arguments = obj.get("arguments", obj.get("parameters", {}))
        return obj["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    m = _FUNCTION.fullmatch(body)
    if m is None:
        return None
    arguments = {}
    as_text = (string_params or {}).get(m.group(1), set())
    for name, value in _PARAMETER.findall(m.group(2)):
        value = value.removeprefix("\n").removesuffix("\n")
        try:
            arguments[name] = value if name in as_text else json.loads(value)
        except (ValueError, RecursionError):  # not JSON (ValueError: also a 5000-digit number)
            arguments[name] = value
    return m.group(1), json.dumps(arguments, ensure_ascii=False)


def parse_chat_output(
    text: str, reasoning: bool = False, parse_tools: bool = True, tools: list[dict] | None = None
) -> ChatDelta:
    """The whole assistant output at once: reasoning_content, content and tool_calls."""
    parser = ChatOutputParser(reasoning, parse_tools, tools)
    out = parser.feed(text)
    out += parser.finish()
    return out
