"""A checkpoint's own Jinja chat template, rendered exactly as transformers' `apply_chat_template` renders it, and
Forge conversations rendered through it (`TemplateRenderer`: tokens and loss masks).

Where a template comes from (`load_chat_template`), in transformers' order: `chat_template.jinja` beside the
tokenizer (what transformers >= 4.50 writes), else `chat_template` in `tokenizer_config.json` (a string, or a list
of named templates of which "default" is used). `tools/gguf_to_hf.py` writes a GGUF's `tokenizer.chat_template` to
`tokenizer_config.json`, so a converted GGUF brings its template too.

The environment is transformers' own (`transformers.utils.chat_template_utils`): a sandboxed Jinja environment with
`trim_blocks`/`lstrip_blocks` and loop controls, `tojson` that keeps key order and non-ASCII text (Jinja's own sorts
keys and escapes), `raise_exception`, and the `{% generation %}` block that marks assistant text. The template sees
`messages`, `tools` (None when there are none), `add_generation_prompt` and the tokenizer's special-token strings
(`bos_token`, `eos_token`, ...), as in transformers. One deliberate difference: `strftime_now` returns a fixed date
(`FIXED_DATE`), so that a rendering, and so the training data, never depends on the day it was made.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import seqio

from hephaestus_jax.data.chat_text import chatml_system_prompt, chatml_text, tool_result_text, tool_schema
from hephaestus_jax.data.example import Example
from hephaestus_jax.data.forge import Message, ToolDoc
from hephaestus_jax.data.hf_vocab import read_json_object, token_text
from hephaestus_jax.data.vocab import text_prefix_ids
from hephaestus_jax.errors import InputError

TEMPLATE_FILE = "chat_template.jinja"
FIXED_DATE = datetime.datetime(2024, 7, 26)
"""What `strftime_now` formats: the default `date_string` of Meta's Llama-3.1 template."""

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_SPECIAL_TOKEN_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(InputError, ValueError):
    """A template that cannot be loaded, or that fails (`raise_exception`, a Jinja error) on a conversation: bad
    input (the checkpoint's file), one line and exit 2 in a command."""


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the special-token strings it is rendered with.

    `origin` names where it came from (a file), for messages. `special_tokens` are the keyword arguments
    transformers passes from the tokenizer (`bos_token`, `eos_token`, `unk_token`, `pad_token`).
    """

    source: str
    origin: str
    special_tokens: Mapping[str, str] = field(default_factory=dict)

    @property
    def marks_generation(self) -> bool:
        """Whether the template marks assistant text with `{% generation %}` blocks."""
        return bool(_GENERATION_TAG.search(self.source))

    @property
    def renders_tools(self) -> bool:
        """Whether the template reads the `tools` variable (else tool schemas must go into a message)."""
        return "tools" in _variables(self.source)

    @property
    def renders_tool_calls(self) -> bool:
        """Whether the template renders assistant messages' `tool_calls` (else calls must be message text)."""
        return "tool_calls" in self.source

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None, *,
               add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of its `{% generation %}` blocks (empty without them).

        Raises ChatTemplateError naming the template when the template raises or fails."""
        rendered: list[str] = []
        spans: list[tuple[int, int]] = []
        try:
            template, tracker = _compiled(self.source)
            with tracker.tracking(rendered, spans):
                for block in template.generate(messages=list(messages), tools=list(tools) if tools else None,
                                               add_generation_prompt=add_generation_prompt, **self.special_tokens):
                    rendered.append(block)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"chat template {self.origin}: {e}") from None
        except Exception as e:  # jinja2.TemplateError and errors of the template's own expressions.
            raise ChatTemplateError(f"chat template {self.origin}: {type(e).__name__}: {e}") from None
        return "".join(rendered), spans


def load_chat_template(tokenizer_dir: str) -> ChatTemplate | None:
    """The chat template a tokenizer directory ships (see the module docstring), or None."""
    config_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    config = read_json_object(config_path)
    special_tokens = {name: text for name in _SPECIAL_TOKEN_FIELDS if (text := token_text(config.get(name)))}
    jinja_path = os.path.join(tokenizer_dir, TEMPLATE_FILE)
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return _checked(ChatTemplate(f.read(), jinja_path, special_tokens))
    source = config.get("chat_template")
    if isinstance(source, list):  # Named templates: [{"name": "default", "template": ...}, ...].
        named = {entry.get("name"): entry.get("template") for entry in source if isinstance(entry, dict)}
        source = named.get("default")
    if source is None:
        return None
    if not isinstance(source, str):
        raise ChatTemplateError(f"{config_path}: chat_template must be a string or a list of named templates")
    return _checked(ChatTemplate(source, f"{config_path} (chat_template)", special_tokens))


def _checked(template: ChatTemplate) -> ChatTemplate:
    """The template, compiled once here so that a syntax error names its file when it is loaded, not later."""
    try:
        _compiled(template.source)
    except ChatTemplateError as e:
        raise ChatTemplateError(f"chat template {template.origin}: {e}") from None
    return template


# ---- Forge chats through a template ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateRenderer:
    """Renders chats with the tokenizer's own Jinja template, as transformers' `apply_chat_template` does.

    Messages go to the template in the OpenAI/Hugging Face form: tool calls as `tool_calls` (`{"type": "function",
    "function": {"name", "arguments"}}`), tool results as `tool` messages with JSON text. A template that does not
    read `tools` gets them in the system message, and one that renders no `tool_calls` gets calls as message text,
    both in the Hermes convention of `chatml` (so SmolLM2's template renders a chat with tools exactly as `chatml`).

    Loss masks come from the rendering: the `{% generation %}` blocks where the template has them, else, for each
    assistant message, the text the conversation up to it adds to the conversation before it with a generation
    prompt, less trailing whitespace (what follows the end-of-turn token is never generated).
    """

    template: ChatTemplate
    vocab: seqio.Vocabulary
    name: str = "template"

    def conversation(self, messages: Sequence[Message], tools: Sequence[ToolDoc], *, train_on_all: bool) -> Example:
        chat, schemas = self._chat(messages, tools)
        text, spans = self.template.render(chat, schemas)
        ids, ends = self.vocab.encode_rendered(text)
        tokens = np.asarray(ids, np.int32)
        if train_on_all:
            mask = np.ones(len(ids), np.int32)
            if ids and ids[0] in text_prefix_ids(self.vocab):
                mask[0] = 0  # The tokenizer's BOS, as the fallbacks leave it.
            return Example(tokens, mask)
        if not self.template.marks_generation:
            spans = self._assistant_spans(chat, schemas, text, [m.role for m in messages])
        starts = np.concatenate([[0], ends[:-1]])
        mask = np.zeros(len(ids), np.int32)
        for start, end in spans:
            byte_start, byte_end = len(text[:start].encode("utf-8")), len(text[:end].encode("utf-8"))
            mask |= ((starts < byte_end) & (ends > byte_start)).astype(np.int32)
        return Example(tokens, mask)

    def prompt(self, messages: Sequence[Message], tools: Sequence[ToolDoc]) -> np.ndarray:
        chat, schemas = self._chat(messages, tools)
        text, _ = self.template.render(chat, schemas, add_generation_prompt=True)
        return np.asarray(self.vocab.encode_rendered(text)[0], np.int32)

    def _chat(self, messages: Sequence[Message], tools: Sequence[ToolDoc]) -> tuple[list[dict], list[dict] | None]:
        """The messages and tool schemas as the template receives them."""
        calls_as_text = not self.template.renders_tool_calls
        chat = []
        for message in messages:
            if message.role == "ipython":
                content = chatml_text(message) if calls_as_text else tool_result_text(message.content)
                chat.append({"role": "tool", "content": content})
            elif message.tool_calls and calls_as_text:
                chat.append({"role": message.role, "content": chatml_text(message)})
            elif message.tool_calls:
                chat.append({"role": message.role, "content": message.content, "tool_calls": [
                    {"type": "function", "function": {"name": call.name, "arguments": dict(call.arguments)}}
                    for call in message.tool_calls]})
            else:
                chat.append({"role": message.role, "content": message.content})
        if not tools or self.template.renders_tools:
            return chat, [tool_schema(tool) for tool in tools] or None
        has_system = bool(chat) and chat[0]["role"] == "system"
        system = {"role": "system", "content": chatml_system_prompt(chat[0]["content"] if has_system else "", tools)}
        return [system, *chat[1:]] if has_system else [system, *chat], None

    def _assistant_spans(self, chat: list[dict], schemas: list[dict] | None, text: str,
                         roles: Sequence[str]) -> list[tuple[int, int]]:
        """Character spans of the assistant messages, by rendering the conversation turn by turn."""
        offset = len(chat) - len(roles)  # An injected system message.
        spans = []
        for index, role in enumerate(roles):
            if role != "assistant":
                continue
            at = index + offset
            before, _ = self.template.render(chat[:at], schemas, add_generation_prompt=True)
            upto, _ = self.template.render(chat[: at + 1], schemas)
            if not (text.startswith(upto) and upto.startswith(before)):
                raise ChatTemplateError(
                    f"chat template {self.template.origin} renders the conversation before assistant message {index} "
                    "differently once it goes on, so the assistant tokens cannot be found by rendering turn by turn; "
                    "mark them with {% generation %} blocks in the template")
            spans.append((len(before), len(upto.rstrip())))
        return spans


# ---- transformers' Jinja environment -------------------------------------------------------------------------


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"raise_exception: {message}")


def _strftime_now(format: str) -> str:  # noqa: A002 (the template's argument name)
    return FIXED_DATE.strftime(format)


@functools.lru_cache(maxsize=16)
def _compiled(source: str) -> tuple[Any, Any]:
    """The compiled template and its generation tracker (one environment per template source)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: records the character span its body renders to."""

        tags = {"generation"}

        def __init__(self, environment: jinja2.Environment):
            super().__init__(environment)
            self.spans: list[tuple[int, int]] | None = None
            self.rendered: list[str] | None = None

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller: Any) -> str:
            text = caller()
            if self.spans is not None:
                start = len("".join(self.rendered))
                self.spans.append((start, start + len(text)))
            return text

        @contextlib.contextmanager
        def tracking(self, rendered: list[str], spans: list[tuple[int, int]]) -> Iterator[None]:
            """While active, each generation block records its span; `rendered` is the text yielded so far."""
            self.rendered, self.spans = rendered, spans
            try:
                yield
            finally:
                self.rendered = self.spans = None

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationTracker, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        template = environment.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"line {e.lineno}: {e.message}") from None
    return template, environment.extensions[GenerationTracker.identifier]


@functools.lru_cache(maxsize=16)
def _variables(source: str) -> frozenset[str]:
    import jinja2.meta

    template, _ = _compiled(source)
    return frozenset(jinja2.meta.find_undeclared_variables(template.environment.parse(source)))
