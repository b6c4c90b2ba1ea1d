"""The terminal front ends: `hybridmoe generate` (one prompt, streamed) and `hybridmoe chat` (an interactive loop).

Both drive an Engine directly (no server) through the chat layer: `render_chat` for the prompt,
`IncrementalDetokenizer` + `ChatOutputParser` for the streamed text. Reasoning is shown dimmed on a terminal and
between `<think>` / `</think>` lines otherwise (pipes, tests); a timing line goes to stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import TextIO

from .chat import THINK_END, ChatDelta, ChatOutputParser, IncrementalDetokenizer, ReasoningBudget, render_chat
from .engine import Engine, RequestOutput
from .sampling import SamplingParams

CHAT_HELP = "commands: /exit (or Ctrl-D) quit, /think [on|off] toggle reasoning, /reset forget the conversation"


def stream_request(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> Iterator[RequestOutput]:
    """The outputs of one request, stepping the engine; leaving early (Ctrl-C) cancels it."""
    request_id = engine.add_request(prompt_ids, params)
    finished = False
    try:
        while not finished:
            for out in engine.step():
                if out.request_id == request_id:
                    finished = out.finished
                    yield out
    finally:
        if not finished and engine.cancel(request_id):
            engine.step()  # frees the slot


class _Printer:
    """Writes reasoning and answer deltas as they come: reasoning dimmed on a terminal, else inside think tags."""

    def __init__(self, out: TextIO):
        self.out, self.tty = out, out.isatty()
        self.section: str | None = None

    def write(self, delta: ChatDelta) -> None:
        if delta.reasoning_content:
            self._enter("reasoning")
            self.out.write(delta.reasoning_content)
        if delta.content:
            self._enter("content")
            self.out.write(delta.content)
        for call in delta.tool_calls:
            self._enter("content")
            self.out.write(f"\n[tool call] {call.name}({call.arguments})\n")
        self.out.flush()

    def close(self) -> None:
        self._enter(None)
        self.out.write("\n")
        self.out.flush()

    def _enter(self, section: str | None) -> None:
        if section == self.section:
            return
        if self.section == "reasoning":
            self.out.write("\x1b[0m\n" if self.tty else f"\n{THINK_END}\n")
        if section == "reasoning":
            self.out.write("\x1b[2m" if self.tty else "<think>\n")
        self.section = section


def _stream_chat(
    engine, tokenizer, messages, params, reasoning, budget, out: TextIO
) -> tuple[ChatDelta, RequestOutput]:
    prompt = render_chat(tokenizer, messages, reasoning=reasoning)
    end_id = tokenizer.get_vocab().get(THINK_END)
    if prompt.reasoning and budget is not None and end_id is not None:
        params.logits_processors = [ReasoningBudget(budget, end_id)]
    detok = IncrementalDetokenizer(tokenizer, stop=params.stop)
    parser, printer, message = ChatOutputParser(prompt.reasoning), _Printer(out), ChatDelta()
    last = None
    for last in stream_request(engine, prompt.token_ids, params):
        text = detok.add(_visible(last))
        delta = parser.feed(text + (detok.finish() if last.finished else ""))
        if last.finished:
            delta += parser.finish()
        printer.write(delta)
        message += delta
    printer.close()
    return message, last


def _visible(out: RequestOutput) -> list[int]:
    """New tokens without the stop token that ended the request."""
    if out.finished and out.finish_reason == "stop" and isinstance(out.stop_reason, int) and out.new_token_ids:
        return out.new_token_ids[:-1]
    return out.new_token_ids


def _report(last: RequestOutput | None, t0: float) -> None:
    if last is not None:
        dt = time.perf_counter() - t0
        print(f"[{last.num_generated_tokens} tokens in {dt:.2f} s, {last.num_generated_tokens / dt:.1f} tokens/s; "
              f"finish: {last.finish_reason}]", file=sys.stderr, flush=True)  # fmt: skip


def generate(
    engine: Engine,
    tokenizer,
    prompt: str,
    params: SamplingParams,
    chat: bool = False,
    reasoning: bool = True,
    reasoning_budget: int | None = None,
    out: TextIO | None = None,
) -> str:
    """Stream the continuation of `prompt` (or, with `chat`, the assistant's reply to it as a user message) to
    `out`; returns the text (the answer, for chat)."""
    out = out or sys.stdout
    t0 = time.perf_counter()
    if chat:
        message, last = _stream_chat(
            engine, tokenizer, [{"role": "user", "content": prompt}], params, reasoning, reasoning_budget, out
        )
        _report(last, t0)
        return message.content
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, stop=params.stop)
    last = None
    for last in stream_request(engine, ids, params):
        out.write(detok.add(_visible(last)) + (detok.finish() if last.finished else ""))
        out.flush()
    out.write("\n")
    _report(last, t0)
    return detok.text


def chat_loop(
    engine: Engine,
    tokenizer,
    params: SamplingParams,
    system: str | None = None,
    reasoning: bool = True,
    reasoning_budget: int | None = None,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
) -> None:
    """Read user turns from `stdin` until /exit or end of input; stream each reply."""
    from .engine import AdmissionError

    stdin, out = stdin or sys.stdin, out or sys.stdout
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    out.write(f"{CHAT_HELP}\nreasoning {'on' if reasoning else 'off'}\n")
    while True:
        out.write("> ")
        out.flush()
        line = stdin.readline()
        if not line:
            out.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line.startswith("/think"):
            arg = line.removeprefix("/think").strip()
            reasoning = {"on": True, "off": False}.get(arg, not reasoning)
            out.write(f"reasoning {'on' if reasoning else 'off'}\n")
            continue
        if line == "/reset":
            history = history[:1] if system else []
            out.write("conversation cleared\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line}; {CHAT_HELP}\n")
            continue
        messages = history + [{"role": "user", "content": line}]
        t0 = time.perf_counter()
        turn = SamplingParams(**{k: v for k, v in vars(params).items() if k != "logits_processors"})
        try:
            message, last = _stream_chat(engine, tokenizer, messages, turn, reasoning, reasoning_budget, out)
        except AdmissionError as e:
            out.write(f"error: {e}\n")
            continue
        except KeyboardInterrupt:
            out.write("\n[interrupted]\n")
            continue
        _report(last, t0)
        reply = {"role": "assistant", "content": message.content}
        if message.reasoning_content:
            reply["reasoning_content"] = message.reasoning_content
        history = messages + [reply]


def generate_speculative(
    engine: Engine, tokenizer, prompt: str, params: SamplingParams, num_draft_tokens: int, chat: bool = False,
    out: TextIO | None = None,
) -> str:  # fmt: skip
    """`generate` with MTP speculative decoding (`serve.speculative`, one request, not streamed): drafts
    `num_draft_tokens` tokens per verification forward; reports the acceptance rate. The reply of a chat prompt is
    printed as generated, reasoning included."""
    from .speculative import speculative_generate

    out = out or sys.stdout
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t0 = time.perf_counter()
    result = speculative_generate(
        engine.model, ids, params, num_draft_tokens=num_draft_tokens, eos_token_id=sorted(engine.eos_token_ids)
    )
    dt = time.perf_counter() - t0
    shown = result.token_ids[:-1] if result.finish_reason == "stop" else result.token_ids  # not the stop token
    text = tokenizer.decode(shown)
    out.write(text + "\n")
    out.flush()
    s = result.stats
    print(f"[{len(result.token_ids)} tokens in {dt:.2f} s, {len(result.token_ids) / dt:.1f} tokens/s; "
          f"{num_draft_tokens} drafts per step, acceptance {s.acceptance_rate:.1%}, "
          f"{s.mean_accepted_length:.2f} tokens per verification; finish: {result.finish_reason}]",
          file=sys.stderr, flush=True)  # fmt: skip
    return text
