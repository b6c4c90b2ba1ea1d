r"""Training and loading the tokenizer: byte-level BPE with Hugging Face `tokenizers`, saved as a transformers
tokenizer directory.

Faithful to GPT-2's byte-level BPE (ByteLevel pre-tokenizer and decoder; the trainer starts from all 256 byte
symbols, so every byte sequence is encodable and decoding restores text exactly; no normalizer, so nothing is
rewritten). Special tokens: `<s>` (bos), `</s>` (eos, also the end-of-document separator of the token shards),
`<pad>`, and the chat tokens of CHAT_TOKENS, each one id that is never split.

The chat template (CHAT_TEMPLATE, saved with every tokenizer) writes the Nemotron 3 chat format, as published with
NVIDIA's Nemotron 3 Nano and Super checkpoints on the Hugging Face Hub (`chat_template.jinja` of
nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 and nvidia/NVIDIA-Nemotron-3-Super-120B-A12B), written anew here:

- every turn is `<|im_start|>{role}\n{content}<|im_end|>\n` (ChatML); `developer` is written as `system`;
- an assistant turn is `<think>\n{reasoning}\n</think>\n{answer}`, or `<think></think>{answer}` without reasoning.
  Reasoning of assistant turns before the last user message is dropped (`truncate_history_thinking`, default
  true), so it is kept inside the current tool loop; reasoning and answer are stripped of surrounding whitespace.
  Reasoning may come as `reasoning_content` or inline in the content as `<think>...</think>answer`;
- tool calls follow the answer on their own lines, each `<tool_call>\n<function=NAME>\n<parameter=ARG>\nVALUE\n
  </parameter>\n</function>\n</tool_call>\n`; string values are written as they are, others as JSON. The
  arguments must be an object (a dict): OpenAI's JSON strings are decoded before rendering
  (`hybridmoe.data.messages.template_messages`; the template cannot parse JSON and says so);
- consecutive `tool` messages go back inside one user turn, each `<tool_response>\n...\n</tool_response>\n`;
- tool definitions (`tools=`) are described in XML at the end of the system turn, after a `# Tools` heading, with
  a reminder of the call format; a system turn is created when there is none (and only then);
- the generation prompt is `<|im_start|>assistant\n<think>\n` with `enable_thinking` (the default) and
  `<|im_start|>assistant\n<think></think>` without;
- `reasoning_budget=N` (optional) appends `\n\n{thinking token budget: N}` to the last user message, the hint
  Nemotron 3 models are trained to follow; hybridmoe's server enforces budgets by forcing `</think>` instead.

PLAIN_CHAT_TEMPLATE is the plain ChatML template that tokenizers written before the format was adopted carry; the
chat layer (`hybridmoe.serve.chat`) still renders for it by lowering messages to text.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..utils import atomic_write
from .sources import (
    BAD_RECORDS_FILE,
    BadRecordLog,
    bad_records_summary,
    check_bad_fraction,
    check_max_bad_fraction,
    empty_counts,
    expand_inputs,
    iter_documents,
)

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
CHAT_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN) + CHAT_TOKENS

# The plain ChatML template of tokenizers written before CHAT_TEMPLATE: it reads only `role` and `content`.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The Nemotron 3 chat format (module docstring). Every tag trims the whitespace around it, so only the quoted
# strings are written.
CHAT_TEMPLATE = r"""{#- hybridmoe: the Nemotron 3 chat format. Variables: messages, tools, add_generation_prompt,
    enable_thinking (default true), truncate_history_thinking (default true), reasoning_budget (optional). -#}
{%- macro as_text(value) -%}
    {%- if value is string -%}{{- value -}}{%- else -%}{{- value | tojson -}}{%- endif -%}
{%- endmacro -%}
{%- macro content_text(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content if part is mapping and part.type == 'text' -%}{{- part.text -}}{%- endfor -%}
    {%- elif content is not none -%}
        {{- content | string -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro other_keys(obj, handled) -%}
    {%- if obj is mapping -%}
        {%- for key, value in obj | items if key not in handled -%}
            {{- '\n<' ~ key ~ '>' ~ as_text(value) ~ '</' ~ key ~ '>' -}}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set enable_thinking = enable_thinking if enable_thinking is defined else true -%}
{%- set truncate_history_thinking = truncate_history_thinking if truncate_history_thinking is defined else true -%}
{%- set tools = tools if tools is iterable and tools is not string and tools else [] -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for message in messages -%}
    {%- if message.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- set has_system = messages | length > 0 and messages[0].role in ['system', 'developer'] -%}
{%- if has_system or tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- set system = content_text(messages[0].content) if has_system else '' -%}
    {{- system -}}
    {%- if tools -%}
        {%- if system -%}{{- '\n\n' -}}{%- endif -%}
        {{- '# Tools\n\nYou have access to the following functions:\n\n<tools>' -}}
        {%- for tool in tools -%}
            {%- set fn = tool.function if tool is mapping and tool.function is mapping else tool -%}
            {{- '\n<function>\n<name>' ~ fn.name ~ '</name>' -}}
            {%- if fn.description is string -%}
                {{- '\n<description>' ~ (fn.description | trim) ~ '</description>' -}}
            {%- endif -%}
            {{- '\n<parameters>' -}}
            {%- set params = fn.parameters if fn.parameters is mapping else {} -%}
            {%- if params.properties is mapping -%}
                {%- for name, spec in params.properties | items -%}
                    {{- '\n<parameter>\n<name>' ~ name ~ '</name>' -}}
                    {%- if spec is mapping -%}
                        {%- if spec.type is defined -%}{{- '\n<type>' ~ as_text(spec.type) ~ '</type>' -}}{%- endif -%}
                        {%- if spec.description is string -%}
                            {{- '\n<description>' ~ (spec.description | trim) ~ '</description>' -}}
                        {%- endif -%}
                        {%- if spec.enum is defined -%}
                            {{- '\n<enum>' ~ (spec.enum | tojson) ~ '</enum>' -}}
                        {%- endif -%}
                        {{- other_keys(spec, ['name', 'type', 'description', 'enum']) -}}
                    {%- endif -%}
                    {{- '\n</parameter>' -}}
                {%- endfor -%}
            {%- endif -%}
            {{- other_keys(params, ['type', 'properties', 'required']) -}}
            {%- if params.required is defined -%}
                {{- '\n<required>' ~ (params.required | tojson) ~ '</required>' -}}
            {%- endif -%}
            {{- '\n</parameters>' -}}
            {{- other_keys(fn, ['type', 'name', 'description', 'parameters']) -}}
            {{- '\n</function>' -}}
        {%- endfor -%}
        {{- '\n</tools>\n\nTo call functions, end your reply with one block per call, in this format:\n\n'
            '<tool_call>\n<function=function_name>\n<parameter=parameter_name>\nvalue, on as many lines as it needs\n'
            '</parameter>\n</function>\n</tool_call>\n\nGive every required parameter. Write any explanation before '
            'the calls, never after them. When no function helps, answer directly.' -}}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- set role = 'system' if message.role == 'developer' else message.role -%}
    {%- if loop.first and has_system -%}
    {%- elif role == 'assistant' -%}
        {%- set content = content_text(message.content) -%}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' -%}
        {%- if not (reasoning | trim) and '</think>' in content -%}
            {%- set reasoning = content.split('</think>')[0].replace('<think>', '') -%}
            {%- set content = content.split('</think>')[-1] -%}
        {%- endif -%}
        {%- set reasoning = reasoning | trim -%}
        {%- if reasoning and (loop.index0 > ns.last_user or not truncate_history_thinking) -%}
            {%- set body = '<think>\n' ~ reasoning ~ '\n</think>\n' ~ (content | trim) -%}
        {%- else -%}
            {%- set body = '<think></think>' ~ (content | trim) -%}
        {%- endif -%}
        {{- '<|im_start|>assistant\n' ~ (body | trim) -}}
        {%- if message.tool_calls is iterable and message.tool_calls is not string and message.tool_calls -%}
            {{- '\n' -}}
            {%- for call in message.tool_calls -%}
                {%- set fn = call.function if call is mapping and call.function is mapping else call -%}
                {%- set arguments = fn.arguments if fn.arguments is defined and fn.arguments is not none else {} -%}
                {%- if arguments is not mapping -%}
                    {{- raise_exception('tool call arguments must be an object (a dict); decode a JSON string '
                                        'first, as hybridmoe.data.messages.template_messages does') -}}
                {%- endif -%}
                {{- '<tool_call>\n<function=' ~ fn.name ~ '>\n' -}}
                {%- for name, value in arguments | items -%}
                    {{- '<parameter=' ~ name ~ '>\n' ~ as_text(value) ~ '\n</parameter>\n' -}}
                {%- endfor -%}
                {{- '</function>\n</tool_call>\n' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|im_end|>\n' -}}
    {%- elif role == 'tool' -%}
        {%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user\n' -}}{%- endif -%}
        {{- '<tool_response>\n' ~ content_text(message.content) ~ '\n</tool_response>\n' -}}
        {%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
    {%- else -%}
        {{- '<|im_start|>' ~ role ~ '\n' ~ content_text(message.content) -}}
        {%- if loop.index0 == ns.last_user and enable_thinking and reasoning_budget is defined
              and reasoning_budget is not none -%}
            {{- '\n\n{thinking token budget: ' ~ reasoning_budget ~ '}' -}}
        {%- endif -%}
        {{- '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n<think>\n' if enable_thinking else '<|im_start|>assistant\n<think></think>' -}}
{%- endif -%}
"""

_BYTE_ALPHABET_SIZE = 256


@dataclass
class TokenizerReport:
    """What train_tokenizer did: where it saved, the vocabulary size, documents used and bad records per reason
    (all of them listed in `bad_records_path`, the first few of each reason in `bad_examples`)."""

    path: str
    vocab_size: int
    documents: int
    bad_records: dict[str, int] = field(default_factory=empty_counts)
    bad_records_path: str = ""
    bad_examples: dict[str, list[dict]] = field(default_factory=dict)
    max_bad_fraction: float = 0.01

    def summary(self) -> str:
        records = self.documents + sum(self.bad_records.values())
        bad = bad_records_summary(
            self.bad_records, self.bad_examples, records, self.bad_records_path, self.max_bad_fraction
        )
        return f"{self.path}: vocab {self.vocab_size}, trained on {self.documents:,} documents\n{bad}"


def _documents(files: list[str], field: str, report: TokenizerReport, log: BadRecordLog) -> Iterator[str]:
    for path in files:
        for text in log.documents(iter_documents(path, field)):
            report.documents += 1
            yield text


def train_tokenizer(
    inputs: Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    vocab_size: int = 8192,
    field: str = "text",
    min_frequency: int = 2,
    show_progress: bool = True,
    *,
    extensions: Iterable[str] | None = None,
    max_bad_fraction: float = 0.01,
) -> TokenizerReport:
    """Train a byte-level BPE tokenizer on the documents of `inputs` and save it as a transformers directory.

    Documents are streamed (the trainer keeps word counts, not text), so inputs may be larger than memory. Bad
    records are skipped and listed in `output_dir/bad_records.jsonl`; when more than `max_bad_fraction` of all
    records are bad, the tokenizer is still saved, then TooManyBadRecords (a ValueError carrying the report) is
    raised.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    minimum = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {minimum}")
    check_max_bad_fraction(max_bad_fraction)
    files = expand_inputs(inputs, extensions)
    path = os.path.abspath(output_dir)
    bad_path = os.path.join(path, BAD_RECORDS_FILE)
    report = TokenizerReport(path, 0, 0, bad_records_path=bad_path, max_bad_fraction=max_bad_fraction)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    with BadRecordLog() as log:
        tok.train_from_iterator(_documents(files, field, report, log), trainer=trainer)
        log.save(report.bad_records_path)
    report.bad_records, report.bad_examples = log.counts, log.examples
    bad = log.total
    if report.documents == 0:
        raise ValueError(
            f"no documents to train on in {files} ({bad:,} bad records: {report.bad_records}, listed in "
            f"{report.bad_records_path})"
        )

    _save_atomically(_hf_tokenizer(tok), output_dir)
    report.vocab_size = tok.get_vocab_size()
    check_bad_fraction(bad, report.documents + bad, max_bad_fraction, report.bad_records_path, report)
    return report


def _hf_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # transformers 5 name of `additional_special_tokens` (which it still accepts and converts).
        extra_special_tokens=list(CHAT_TOKENS),
        chat_template=CHAT_TEMPLATE,
        # Decoding must give back the exact text; the default clean-up rewrites " ." as ".".
        clean_up_tokenization_spaces=False,
    )


def _save_atomically(hf_tokenizer, output_dir: str | os.PathLike) -> None:
    """save_pretrained into a scratch folder, then move each file into place with an atomic write."""
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".save-") as scratch:
        hf_tokenizer.save_pretrained(scratch)
        for name in sorted(os.listdir(scratch)):
            src = os.path.join(scratch, name)
            atomic_write(os.path.join(output_dir, name), functools.partial(shutil.copyfile, src))


# A directory with none of these has no tokenizer transformers could load (the fast serialization, the config that
# names the class, or the vocabulary files of the common slow tokenizers).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
)


def load_tokenizer(path: str | os.PathLike):
    """Load a Hugging Face tokenizer directory (ours or any other) and check it has the eos token we need."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(
            f"tokenizer {path}: not a directory; pass a directory saved by `hybridmoe tokenizer train` "
            "or by a transformers tokenizer's save_pretrained"
        )
    if not any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise ValueError(
            f"tokenizer {path}: the directory holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); train one "
            "with `hybridmoe tokenizer train` or pass a directory a transformers tokenizer was saved to"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"tokenizer {path}: cannot load it with transformers.AutoTokenizer ({e})") from e
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {path} has no eos token, which marks the end of each document; set one with "
            '`tokenizer.eos_token = "..."; tokenizer.save_pretrained(path)` or add "eos_token" to '
            "tokenizer_config.json"
        )
    return tokenizer


def token_id(tokenizer, token: str) -> int | None:
    """The id of `token` when the vocabulary has it as one token, else None. Cheaper than `token in
    tokenizer.get_vocab()`, which builds the whole vocabulary dict on every call (~2 ms for 8k tokens)."""
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or (i == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return i


def vocab_size_of(tokenizer) -> int:
    """One more than the largest token id (added tokens included)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the token ids: the full fast-tokenizer definition, else the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    text += f"\neos={tokenizer.eos_token_id}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
