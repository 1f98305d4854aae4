"""Benchmark decontamination: drop training documents sharing any n-gram with evaluation sets.

Tokens (:func:`word_tokens`): Unicode NFKC, case folded, then every maximal run of word characters
(regex ``\\w+``: letters, digits, underscore); punctuation and whitespace only separate tokens.
So ``"Find the AREA, of a triangle"`` and ``"find the area of a triangle"`` have the same tokens.
A document is contaminated when any ``n`` consecutive tokens of it (default 13) equal ``n``
consecutive tokens of a protected eval text.  Matching is exact (no hashing shortcuts): every
protected n-gram is stored as its sequence of eval-vocabulary ids.

What is protected (each piece on its own; n-grams never span two pieces):

* **BFCL records** (a JSON line with a ``question`` key): in ``question`` — a string (BFCL v1) or
  a list of turns, each a list of ``{role, content}`` messages (or a bare message) — the
  ``content`` of every message whose role is ``user`` or ``system``; in ``function`` (a list of
  function docs, or one) the ``description`` of each function and, recursively through
  ``parameters`` / ``properties`` / ``items``, every ``description`` of its parameters.  Names,
  types, enums, defaults and assistant/tool messages are not taken.  The item id is the record's
  ``id`` (else ``file:line``).
* **Plain JSONL records**: the text selected by the eval text fields (default ``text``, see
  :class:`~hephaestus_jax.clean.jsonl.TextSelector`); id as for BFCL.
* **Text files** (``.txt``): every non-blank line is one item, id ``file:line``.

Pieces with fewer than ``n`` tokens cannot be protected by n-gram matching; they are counted in
:class:`IndexStats` (``short_pieces``) so that the report shows it — lower ``n`` to cover them.

Memory: the eval vocabulary and one ``n × 4``-byte key per distinct eval n-gram; training
documents are scanned one at a time and stop at their first match.
"""

from __future__ import annotations

import dataclasses
import os
import re
import unicodedata
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

from hephaestus_jax.clean.jsonl import Decision, Document, ReadStats, RecordError, TextSelector
from hephaestus_jax.json_lines import read_json_lines, read_lines

DEFAULT_NGRAM = 13
_WORD = re.compile(r"\w+")
_PROTECTED_ROLES = ("user", "system")
_UNKNOWN_TOKEN = -1  # id of a token absent from every eval text: no protected n-gram contains it
_ID_BYTES = array("i").itemsize

EvalFormat = Literal["auto", "bfcl", "jsonl", "text"]


def word_tokens(text: str) -> list[str]:
    """Normalised word tokens of ``text`` (see the module docstring)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def _message_contents(turn: Any, where: str) -> Iterator[str]:
    messages = [turn] if isinstance(turn, dict) else turn
    if not isinstance(messages, list):
        raise ValueError(f"{where} must be a list of messages or a message, got {type(turn).__name__}")
    for message in messages:
        if not isinstance(message, dict):
            raise ValueError(f"{where} holds a {type(message).__name__}, expected a {{role, content}} message")
        if message.get("role") in _PROTECTED_ROLES:
            content = message.get("content")
            if content is None:
                continue
            if not isinstance(content, str):
                raise ValueError(f"{where}: message content must be a string, got {type(content).__name__}")
            yield content


def _schema_descriptions(schema: Any) -> Iterator[str]:
    if isinstance(schema, list):
        for element in schema:
            yield from _schema_descriptions(element)
        return
    if not isinstance(schema, dict):
        return
    if isinstance(schema.get("description"), str):
        yield schema["description"]
    properties = schema.get("properties")
    if isinstance(properties, dict):
        for child in properties.values():
            yield from _schema_descriptions(child)
    if "items" in schema:
        yield from _schema_descriptions(schema["items"])


def bfcl_protected_texts(record: dict[str, Any]) -> list[str]:
    """The texts of one BFCL record that decontamination protects (see the module docstring)."""
    question = record.get("question")
    texts: list[str] = []
    if isinstance(question, str):
        texts.append(question)
    elif isinstance(question, list):
        for turn_index, turn in enumerate(question):
            texts.extend(_message_contents(turn, f"question[{turn_index}]"))
    else:
        raise ValueError(f"'question' must be a string or a list of turns, got {type(question).__name__}")
    functions = record.get("function") or []
    functions = [functions] if isinstance(functions, dict) else functions
    if not isinstance(functions, list):
        raise ValueError(f"'function' must be a list of function docs, got {type(functions).__name__}")
    for function in functions:
        if not isinstance(function, dict):
            raise ValueError(f"'function' entries must be objects, got {type(function).__name__}")
        if isinstance(function.get("description"), str):
            texts.append(function["description"])
        texts.extend(_schema_descriptions(function.get("parameters")))
    return texts


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One evaluation example: its id and ``file:line``."""

    id: str
    location: str


@dataclasses.dataclass
class IndexStats:
    """What the eval index holds."""

    items: int = 0
    pieces: int = 0
    short_pieces: int = 0
    distinct_ngrams: int = 0


class EvalNgramIndex:
    """Exact n-gram index of protected eval texts; :meth:`first_match` scans a training text."""

    def __init__(self, n: int = DEFAULT_NGRAM) -> None:
        if n < 1:
            raise ValueError(f"n-gram length must be >= 1, got {n}")
        self.n = n
        self.items: list[EvalItem] = []
        self.stats = IndexStats()
        self._vocab: dict[str, int] = {}
        self._ngram_to_item: dict[bytes, int] = {}

    def add(self, item: EvalItem, texts: Iterable[str]) -> None:
        """Protects every n-gram of each text piece of ``item``."""
        item_index = len(self.items)
        self.items.append(item)
        self.stats.items += 1
        width = self.n * _ID_BYTES
        for text in texts:
            self.stats.pieces += 1
            tokens = word_tokens(text)
            if len(tokens) < self.n:
                self.stats.short_pieces += 1
                continue
            keys = array("i", (self._vocab.setdefault(t, len(self._vocab)) for t in tokens)).tobytes()
            for start in range(0, len(keys) - width + 1, _ID_BYTES):
                self._ngram_to_item.setdefault(keys[start:start + width], item_index)
        self.stats.distinct_ngrams = len(self._ngram_to_item)

    def first_match(self, text: str) -> tuple[EvalItem, str] | None:
        """The eval item and the (normalised, space-joined) n-gram of the first overlap, or None."""
        tokens = word_tokens(text)
        if len(tokens) < self.n:
            return None
        keys = array("i", (self._vocab.get(t, _UNKNOWN_TOKEN) for t in tokens)).tobytes()
        width = self.n * _ID_BYTES
        for start in range(0, len(keys) - width + 1, _ID_BYTES):
            item_index = self._ngram_to_item.get(keys[start:start + width])
            if item_index is not None:
                position = start // _ID_BYTES
                return self.items[item_index], " ".join(tokens[position:position + self.n])
        return None


_JSON_SUFFIXES = (".json", ".jsonl")


def _detect_format(path: str, fmt: EvalFormat) -> Literal["json", "text"]:
    """``text`` or ``json``; with ``auto`` from the name (``.txt``, ``.json``, ``.jsonl``, each optionally ``.gz``)."""
    name = path.removesuffix(".gz")
    if fmt == "text" or (fmt == "auto" and name.endswith(".txt")):
        return "text"
    if fmt == "auto" and not name.endswith(_JSON_SUFFIXES):
        raise ValueError(f"{path}: unknown eval file format; name it .json, .jsonl or .txt (optionally .gz) "
                         "or pass an eval format (bfcl, jsonl, text)")
    return "json"


def iter_eval_items(
    path: str | os.PathLike[str],
    *,
    fmt: EvalFormat = "auto",
    selector: TextSelector = TextSelector(),
    skip_bad_records: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[tuple[EvalItem, list[str]]]:
    """Streams ``(item, protected texts)`` of one eval file.

    ``fmt``: ``text`` (one item per non-blank line; the default for ``.txt``/``.txt.gz``),
    ``bfcl`` (every JSON line must be a BFCL record), ``jsonl`` (every JSON line is read with
    ``selector``) or ``auto`` (JSON lines: BFCL when the record has ``question``, else ``selector``).
    """
    source = os.fspath(path)
    stats = stats if stats is not None else ReadStats()
    if _detect_format(source, fmt) == "text":
        for line in read_lines(source, skip_bad_records=skip_bad_records, stats=stats, error=RecordError.at):
            stats.documents += 1
            yield EvalItem(line.where, line.where), [line.text.strip()]
        return
    for line in read_json_lines(source, skip_bad_records=skip_bad_records, stats=stats, error=RecordError.at):
        location, record = line.where, line.value
        try:
            is_bfcl = fmt == "bfcl" or (fmt == "auto" and "question" in record)
            texts = bfcl_protected_texts(record) if is_bfcl else [selector(record)]
        except ValueError as error:
            stats.skip_or_raise(RecordError.at(location, str(error)), skip_bad_records)
            continue
        stats.documents += 1
        yield EvalItem(str(record.get("id", location)), location), texts


def build_eval_index(
    paths: Sequence[str | os.PathLike[str]],
    *,
    n: int = DEFAULT_NGRAM,
    fmt: EvalFormat = "auto",
    selector: TextSelector = TextSelector(),
    skip_bad_records: bool = False,
    stats: ReadStats | None = None,
) -> EvalNgramIndex:
    """Indexes the protected n-grams of every eval file in ``paths``."""
    index = EvalNgramIndex(n)
    for path in paths:
        for item, texts in iter_eval_items(path, fmt=fmt, selector=selector,
                                           skip_bad_records=skip_bad_records, stats=stats):
            index.add(item, texts)
    return index


def decontaminate(documents: Iterable[Document], index: EvalNgramIndex) -> Iterator[Decision]:
    """Streams one :class:`Decision` per document; removed ones name the eval item and the n-gram."""
    for document in documents:
        details = contamination(index, document.text)
        yield Decision(document, keep=details is None, details=details or {})


def contamination(index: EvalNgramIndex, text: str) -> dict[str, Any] | None:
    """Removal details (eval item, its location, the shared n-gram) of a contaminated text, else None."""
    match = index.first_match(text)
    if match is None:
        return None
    item, ngram = match
    return {"eval_item": item.id, "eval_location": item.location, "ngram": ngram}
