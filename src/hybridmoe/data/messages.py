"""OpenAI-style chat messages: checked, and turned into what the chat template reads.

One home for what a conversation may hold, shared by the server (`hybridmoe.serve.chat.render_chat`, where a
MessageError is a 400 naming the field) and SFT data (`hybridmoe.data.sft`, where it is a bad record of reason
`MessageError.reason`). The fields are OpenAI's Chat Completions messages, with `reasoning_content` as vLLM and
the Hugging Face chat templates name an assistant's reasoning:

- role: system, developer, user, assistant or tool;
- content: a string, null, or a list of `{"type": "text", "text": ...}` parts (joined into one string);
- reasoning_content (or `reasoning`): a string;
- tool_calls: a list of `{"function": {"name": ..., "arguments": ...}}`, the arguments an object or a JSON string
  encoding one. The chat template writes one `<parameter=...>` per key, so `template_messages` decodes the strings
  first (vLLM does the same before templating);
- weight: on an assistant message, 0 or 1 (OpenAI's fine-tuning format): 0 keeps the message in the conversation
  but out of the SFT loss (a failed tool call before the one that works, say); the server ignores a valid one;
- tools: a list of `{"type": "function", "function": {"name": ..., "parameters": {...}}}`.
"""

from __future__ import annotations

import json

ROLES = ("system", "developer", "user", "assistant", "tool")
THINK_START, THINK_END = "<think>", "</think>"


class MessageError(ValueError):
    """A message or tool that cannot be rendered; `reason` is unknown_role, bad_message, bad_tool_call or
    bad_tools (the bad-record reasons of SFT data)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def message_text(content, where: str = "content") -> str:
    """A message's content as text: a string, None, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise MessageError(f"{where}: only text content parts are supported", "bad_message")
            parts.append(part["text"])
        return "".join(parts)
    raise MessageError(f"{where} must be a string or a list of text parts", "bad_message")


def check_message(message, i: int) -> dict:
    """A copy of `message` as the chat template reads it (content as text, `reasoning` as `reasoning_content`,
    tool-call arguments as objects), or MessageError naming the field that is wrong."""
    if not isinstance(message, dict):
        raise MessageError(f"messages[{i}] must be an object with a role among {', '.join(ROLES)}", "bad_message")
    if message.get("role") not in ROLES:
        raise MessageError(
            f"messages[{i}].role must be one of {', '.join(ROLES)}, got {str(message.get('role'))[:40]!r}",
            "unknown_role",
        )
    out = dict(message)
    out["content"] = message_text(message.get("content"), f"messages[{i}].content")
    for key in ("reasoning_content", "reasoning", "name", "tool_call_id"):
        if not isinstance(message.get(key), (str, type(None))):
            raise MessageError(f"messages[{i}].{key} must be a string", "bad_message")
    weight = message.get("weight", 1)
    if "weight" in message and (message["role"] != "assistant" or type(weight) is not int or weight not in (0, 1)):
        raise MessageError(
            f"messages[{i}].weight must be 0 or 1, on an assistant message (0: not a loss target), got "
            f"{str(weight)[:20]!r} on a message of role {message['role']}", "bad_message",
        )  # fmt: skip
    if out.get("reasoning_content") is None and message.get("reasoning") is not None:
        out["reasoning_content"] = message["reasoning"]
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise MessageError(f"messages[{i}].tool_calls must be a list of tool calls", "bad_tool_call")
        out["tool_calls"] = [_checked_call(call, f"messages[{i}].tool_calls[{j}]") for j, call in enumerate(calls)]
    return out


def _checked_call(call, where: str) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise MessageError(f'{where} must be {{"function": {{"name": ..., "arguments": ...}}}}', "bad_tool_call")
    arguments = fn.get("arguments")
    if arguments is None:
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            raise MessageError(f"{where}.function.arguments is not valid JSON", "bad_tool_call") from None
    if not isinstance(arguments, dict):
        raise MessageError(
            f"{where}.function.arguments must be a JSON object (name -> value), got {type(arguments).__name__}",
            "bad_tool_call",
        )
    return {**call, "function": {**fn, "arguments": arguments}}


def check_tool(tool, i: int) -> dict:
    """`{"type": "function", "function": {...}}` with a non-empty name, or MessageError."""
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not (isinstance(tool, dict) and tool.get("type", "function") == "function" and isinstance(fn, dict)):
        raise MessageError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., ...}}}}', "bad_tools")
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise MessageError(f"tools[{i}].function.name must be a non-empty string", "bad_tools")
    if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
        raise MessageError(f"tools[{i}].function.parameters must be a JSON schema object", "bad_tools")
    return {"type": "function", "function": fn}


def template_messages(messages, tools=None) -> tuple[list[dict], list[dict]]:
    """Check every message and tool (module docstring); returns the copies the chat template reads."""
    if not isinstance(messages, list) or not messages:
        raise MessageError("messages must be a non-empty list of messages", "bad_message")
    if tools is not None and not isinstance(tools, list):
        raise MessageError("tools must be a list of function definitions", "bad_tools")
    return [check_message(m, i) for i, m in enumerate(messages)], [check_tool(t, i) for i, t in enumerate(tools or [])]


def split_reasoning(message: dict) -> tuple[str, str]:
    """(reasoning, answer) of a checked assistant message as the chat template reads them: `reasoning_content`,
    else reasoning written inline as `<think>...</think>answer`; both stripped of surrounding whitespace."""
    reasoning, content = message.get("reasoning_content") or "", message.get("content") or ""
    if not reasoning.strip() and THINK_END in content:
        reasoning, content = content.split(THINK_END)[0].replace(THINK_START, ""), content.split(THINK_END)[-1]
    return reasoning.strip(), content.strip()
