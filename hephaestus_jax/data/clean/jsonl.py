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
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any

from hephaestus_jax.errors import InputError

logger = logging.getLogger(__name__)

_WILDCARD = "*"
_MAX_BAD_RECORD_EXAMPLES = 10


class RecordError(InputError, ValueError):
    """A malformed input line; the message reads ``file:line: what is wrong``."""


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
class ReadStats:
    """Counters filled in while reading; bad records are counted here, never dropped silently."""

    documents: int = 0
    blank_lines: int = 0
    bad_records: int = 0
    bad_record_examples: list[str] = dataclasses.field(default_factory=list)

    def record_bad(self, message: str) -> None:
        self.bad_records += 1
        if len(self.bad_record_examples) < _MAX_BAD_RECORD_EXAMPLES:
            self.bad_record_examples.append(message)
            logger.warning("skipping bad record: %s", message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def _parse_line(raw_bytes: bytes) -> tuple[str, dict[str, Any]] | None:
    """``(line without newline, object)``, or None for a blank line; ValueError says what is wrong."""
    try:
        raw = raw_bytes.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8: {error}") from None
    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    return raw, record


def open_binary(path: str | os.PathLike[str]) -> IO[bytes]:
    """Opens ``path`` for binary reading, decompressing when the name ends in ``.gz``."""
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def iter_json_lines(
    path: str | os.PathLike[str],
    *,
    skip_bad_records: bool = False,
    stats: ReadStats | None = None,
    opener: Callable[[str], IO[bytes]] = open_binary,
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """Streams ``(line_number, raw_line, object)`` for each non-blank line of a JSONL file.

    A line that is not UTF-8 or not a JSON object raises :class:`RecordError` (``file:line: ...``),
    or with ``skip_bad_records`` is counted in ``stats`` and skipped.  Blank lines are counted too.
    ``opener`` opens the file for binary reading, decompressed (default :func:`open_binary`).
    """
    stats = stats if stats is not None else ReadStats()
    source = os.fspath(path)
    line_number = 0
    with opener(source) as handle:
        while True:
            try:
                raw_bytes = handle.readline()
            except (EOFError, OSError) as error:  # truncated or corrupt gzip stream
                raise RecordError(f"{source}:{line_number + 1}: unreadable input: {error}") from error
            if not raw_bytes:
                return
            line_number += 1
            try:
                parsed = _parse_line(raw_bytes)
            except ValueError as error:
                message = f"{source}:{line_number}: {error}"
                if not skip_bad_records:
                    raise RecordError(message) from None
                stats.record_bad(message)
                continue
            if parsed is None:
                stats.blank_lines += 1
                continue
            raw, record = parsed
            yield line_number, raw, record


def read_documents(
    paths: Iterable[str | os.PathLike[str]],
    selector: TextSelector,
    *,
    id_field: str | None = None,
    skip_bad_records: bool = False,
    stats: ReadStats | None = None,
    opener: Callable[[str], IO[bytes]] = open_binary,
) -> Iterator[Document]:
    """Streams the documents of ``paths`` in order, one line at a time.

    A document's id is its ``id_field`` value (a field path) when given, else ``file:line``.
    Bad records raise :class:`RecordError` unless ``skip_bad_records``; then they are counted in
    ``stats`` (pass a :class:`ReadStats` to see the counts).
    """
    stats = stats if stats is not None else ReadStats()
    id_path = _parse_path(id_field) if id_field else None
    for path in paths:
        source = os.fspath(path)
        for line_number, raw, record in iter_json_lines(source, skip_bad_records=skip_bad_records, stats=stats,
                                                        opener=opener):
            try:
                text = selector(record)
                doc_id = _scalar_id(record, id_path, id_field) if id_path else f"{source}:{line_number}"
            except _FieldError as error:
                message = f"{source}:{line_number}: {error}"
                if not skip_bad_records:
                    raise RecordError(message) from error
                stats.record_bad(message)
                continue
            stats.documents += 1
            yield Document(source=source, line=line_number, raw=raw, record=record, text=text, id=doc_id)


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
