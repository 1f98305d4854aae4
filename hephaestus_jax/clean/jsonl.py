"""Streaming JSONL input/output shared by the corpus-cleaning stages.

A corpus is one or more JSON-lines files (``.gz`` compressed or not), one JSON object per line.
:func:`read_documents` streams them line by line as :class:`Document` values; nothing but the
current line is held.  :class:`JsonlWriter` writes lines to a temporary file that is renamed into
place only when writing finished without error, so a crashed run never leaves a half-written
output under the final name.

Where a document's text lives is described by *field paths* (:class:`TextSelector`):

* ``text`` — the top-level key ``text``;
* ``meta.body`` — key ``body`` inside the object under ``meta``;
* ``messages.*.content`` — ``content`` of every element of the list ``messages``;
* ``turns.0.content`` — ``content`` of the first element of ``turns``.

Keys containing ``.`` cannot be addressed; records whose text is spread over structures these
paths cannot express should be rendered to a ``text`` field first.  Several paths are joined with
a newline, in the order given.  A path must yield at least one string.  Below a ``*``, elements in
which the rest of the path is absent or ``null`` are skipped (a tool-call message with
``"content": null``); everywhere else an absent field, ``null`` or a non-string is a bad record.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any

from hephaestus_jax import json_lines
from hephaestus_jax.errors import InputError

_WILDCARD = "*"


class RecordError(InputError, ValueError):
    """A malformed input line; the message reads ``file:line: what is wrong`` (its one argument, so that Beam can
    re-raise it with the step's name appended)."""

    @classmethod
    def at(cls, where: str, problem: str) -> RecordError:
        return cls(f"{where}: {problem}")


class _FieldError(ValueError):
    """A field path could not be resolved in one record (wrapped into a RecordError)."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One input record: where it came from, its raw line, parsed object and selected text."""

    source: str
    line: int
    raw: str
    record: dict[str, Any]
    text: str
    id: str

    @property
    def location(self) -> str:
        """``file:line`` of the record (1-based line number)."""
        return f"{self.source}:{self.line}"


@dataclasses.dataclass(frozen=True)
class Decision:
    """A cleaning stage's verdict on one document; ``details`` is JSON-serialisable."""

    document: Document
    keep: bool
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ReadStats(json_lines.ReadStats):
    """Counters filled in while reading: documents read, blank lines, bad records (counted, never dropped
    silently)."""

    documents: int = 0


def _parse_path(spec: str) -> tuple[str, ...]:
    parts = tuple(spec.split("."))
    if not spec or any(not part for part in parts):
        raise ValueError(f"invalid field path {spec!r}: use keys separated by '.', e.g. 'messages.*.content'")
    return parts


def _child(value: Any, part: str, walked: str) -> Any:
    """``value[part]`` for a dict key or a list index; KeyError when absent."""
    if isinstance(value, dict):
        return value[part]
    if isinstance(value, list) and part.lstrip("-").isdigit():
        try:
            return value[int(part)]
        except IndexError:
            raise KeyError(part) from None
    raise _FieldError(f"field {walked!r} is {type(value).__name__}, cannot take {part!r} from it")


def _strings_at(value: Any, parts: tuple[str, ...], walked: str, under_wildcard: bool) -> Iterator[str]:
    """Every string at ``parts`` below ``value`` (see the module docstring for the rules)."""
    if not parts:
        if isinstance(value, str):
            yield value
        elif value is None and under_wildcard:
            return
        else:
            raise _FieldError(f"field {walked!r} must be a string, got {type(value).__name__}")
        return
    head, rest = parts[0], parts[1:]
    here = f"{walked}.{head}" if walked else head
    if head == _WILDCARD:
        if not isinstance(value, list):
            raise _FieldError(f"field {walked!r} must be a list for '*', got {type(value).__name__}")
        for element in value:
            yield from _strings_at(element, rest, here, under_wildcard=True)
        return
    try:
        child = _child(value, head, walked)
    except KeyError:
        if under_wildcard:
            return
        raise _FieldError(f"field {here!r} is missing") from None
    if child is None and under_wildcard:
        return
    yield from _strings_at(child, rest, here, under_wildcard)


class TextSelector:
    """Extracts a document's text from a record by one or more field paths, joined by newlines."""

    def __init__(self, fields: Sequence[str] = ("text",)) -> None:
        if not fields:
            raise ValueError("at least one text field is required")
        self.fields = tuple(fields)
        self._paths = [_parse_path(spec) for spec in self.fields]

    def __call__(self, record: dict[str, Any]) -> str:
        """The selected text; raises ValueError naming the field when a path does not resolve."""
        pieces: list[str] = []
        for spec, path in zip(self.fields, self._paths):
            found = list(_strings_at(record, path, "", under_wildcard=False))
            if not found:
                raise _FieldError(f"no string found at field path {spec!r}")
            pieces.extend(found)
        return "\n".join(pieces)


def _scalar_id(record: dict[str, Any], path: tuple[str, ...], spec: str) -> str:
    value: Any = record
    walked = ""
    for part in path:
        try:
            value = _child(value, part, walked)
        except KeyError:
            raise _FieldError(f"id field {spec!r} is missing") from None
        walked = f"{walked}.{part}" if walked else part
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _FieldError(f"id field {spec!r} must be a string or an integer, got {type(value).__name__}")
    return str(value)


def read_documents(
    paths: Iterable[str | os.PathLike[str]],
    selector: TextSelector,
    *,
    id_field: str | None = None,
    skip_bad_records: bool = False,
    stats: ReadStats | None = None,
    opener: Callable[[str], IO[bytes]] = json_lines.open_binary,
) -> Iterator[Document]:
    """Streams the documents of ``paths`` in order, one line at a time.

    A document's id is its ``id_field`` value (a field path) when given, else ``file:line``.
    Bad records raise :class:`RecordError` unless ``skip_bad_records``; then they are counted in
    ``stats`` (pass a :class:`ReadStats` to see the counts).
    """
    stats = stats if stats is not None else ReadStats()
    id_path = _parse_path(id_field) if id_field else None
    for path in paths:
        for line in json_lines.read_json_lines(path, skip_bad_records=skip_bad_records, stats=stats, opener=opener,
                                               error=RecordError.at):
            try:
                text = selector(line.value)
                doc_id = _scalar_id(line.value, id_path, id_field) if id_path else line.where
            except _FieldError as error:
                stats.skip_or_raise(RecordError.at(line.where, str(error)), skip_bad_records)
                continue
            stats.documents += 1
            yield Document(source=line.path, line=line.number, raw=line.text, record=line.value, text=text, id=doc_id)


class JsonlWriter:
    """Writes JSON lines to ``path`` (gzip when it ends in ``.gz``), atomically on success.

    Use as a context manager; lines go to ``<path>.tmp`` which is renamed to ``path`` on a clean
    exit and deleted if the block raised.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._tmp_path = f"{self.path}.tmp"
        self._handle: IO[str] | None = None
        self.lines_written = 0

    def __enter__(self) -> JsonlWriter:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        if self.path.endswith(".gz"):
            self._handle = gzip.open(self._tmp_path, "wt", encoding="utf-8")
        else:
            self._handle = open(self._tmp_path, "w", encoding="utf-8")
        return self

    def write_raw(self, line: str) -> None:
        """Writes one already-serialised JSON line (without its newline)."""
        assert self._handle is not None, "JsonlWriter used outside its `with` block"
        self._handle.write(line)
        self._handle.write("\n")
        self.lines_written += 1

    def write(self, record: dict[str, Any]) -> None:
        """Serialises and writes one record."""
        self.write_raw(json.dumps(record, ensure_ascii=False))

    def __exit__(self, exc_type, exc, traceback) -> None:
        assert self._handle is not None
        self._handle.close()
        if exc_type is None:
            os.replace(self._tmp_path, self.path)
        else:
            os.remove(self._tmp_path)
