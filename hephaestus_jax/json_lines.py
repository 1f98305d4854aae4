"""JSON-lines files, the one reader: a local or gs:// file, gzip detected from its content, read one line at a time;
each non-blank line a JSON object. A bad line (unreadable, not UTF-8, not JSON, not an object) raises an error
naming `path:line`, or with skip_bad_records is counted in a ReadStats and skipped (the first few logged). Also
reading a whole local JSON file of an expected type, and writing one atomically (reports and run state)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import IO, Any

from hephaestus_jax.errors import InputError

logger = logging.getLogger(__name__)

MAX_LOGGED_SKIPS = 20  # Bad lines logged (and kept as examples) per read; the rest are only counted.
_GZIP_MAGIC = b"\x1f\x8b"


class BadLine(InputError, ValueError):
    """A line of a JSON-lines file that cannot be read, decoded or used; str() is "path:line: problem"."""

    def __init__(self, where: str, problem: str):
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        return (type(self), (self.where, self.problem))


@dataclasses.dataclass
class ReadStats:
    """Counters of a read: blank lines, and bad lines skipped (never dropped silently: counted, the first
    MAX_LOGGED_SKIPS logged and kept as examples)."""

    blank_lines: int = 0
    bad_records: int = 0
    bad_record_examples: list[str] = dataclasses.field(default_factory=list)

    def skip_or_raise(self, error: Exception, skip: bool) -> None:
        """The bad-line rule of every reader: raise `error`, or with `skip` count it and go on."""
        if not skip:
            raise error
        self.bad_records += 1
        if self.bad_records <= MAX_LOGGED_SKIPS:
            self.bad_record_examples.append(str(error))
            logger.warning("skipping bad record: %s", error)
        if self.bad_records == MAX_LOGGED_SKIPS:
            logger.warning("further bad records are counted, not logged")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Line:
    """One non-blank line: its file, 1-based number, text (without the line ending) and, from read_json_lines,
    the JSON object it holds."""

    path: str
    number: int
    text: str
    value: Any = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.number}"


def open_binary(path: str) -> IO[bytes]:
    """A local file, or a URL such as gs://bucket/file through etils, opened for binary reading."""
    if "://" in path:
        from etils import epath  # Only for URLs: etils' gs:// backend imports TensorFlow.

        return epath.Path(path).open("rb")
    return open(path, "rb")


_JSON_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
               (dict, "object"))  # bool before int: True is an int.


def json_type(value: Any) -> str:
    """The JSON-schema type name of a decoded JSON value (a Python type name for anything else)."""
    if value is None:
        return "null"
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)), type(value).__name__)


def read_lines(path: str | os.PathLike[str], *, skip_bad_records: bool = False, stats: ReadStats | None = None,
               opener: Callable[[str], IO[bytes]] = open_binary,
               error: Callable[[str, str], ValueError] = BadLine) -> Iterator[Line]:
    """The non-blank lines of a text file (gzip detected from its content), decoded as UTF-8.

    A line that is not UTF-8 raises `error(where, problem)` (where = "path:line"), or with skip_bad_records is
    counted in `stats` and skipped; blank lines are counted there too. Unreadable input (a truncated gzip stream)
    always raises. `opener` opens the file for binary reading.
    """
    path = os.fspath(path)
    stats = stats if stats is not None else ReadStats()
    with opener(path) as raw:
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        offset_meaning = "of the decompressed stream" if compressed else "of the file"
        number = offset = 0
        while True:
            try:
                data = stream.readline()
            except (OSError, EOFError) as err:  # a corrupt or truncated gzip stream
                raise error(f"{path}:{number + 1}", f"cannot read the file: {err}") from None
            if not data:
                return
            number += 1
            line_offset, offset = offset, offset + len(data)
            try:
                text = data.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                problem = (f"invalid UTF-8: byte 0x{data[err.start]:02x} at byte offset {line_offset + err.start} "
                           f"{offset_meaning}")
                stats.skip_or_raise(error(f"{path}:{number}", problem), skip_bad_records)
                continue
            if text.strip():
                yield Line(path, number, text)
            else:
                stats.blank_lines += 1


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_object(text: str, where: str, *, allow_nan: bool = True,
                  error: Callable[[str, str], ValueError] = BadLine) -> dict[str, Any]:
    """The JSON object on one line; `error(where, problem)` when it is not JSON (nor NaN or Infinity, unless
    allow_nan) or not an object."""
    try:
        value = json.loads(text) if allow_nan else json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise error(where, f"invalid JSON: {err.msg} at column {err.colno}") from None
    except ValueError as err:
        raise error(where, f"invalid JSON: {err}") from None
    if not isinstance(value, dict):
        raise error(where, f"expected a JSON object, got {json_type(value)}")
    return value


def read_json_lines(path: str | os.PathLike[str], *, skip_bad_records: bool = False, stats: ReadStats | None = None,
                    opener: Callable[[str], IO[bytes]] = open_binary,
                    error: Callable[[str, str], ValueError] = BadLine, allow_nan: bool = True) -> Iterator[Line]:
    """The lines of a JSON-lines file, each with the JSON object it holds (`Line.value`).

    As read_lines, and a line that decode_object rejects is a bad line: raised as `error("path:line", problem)`,
    or with skip_bad_records counted in `stats` and skipped.
    """
    stats = stats if stats is not None else ReadStats()
    for line in read_lines(path, skip_bad_records=skip_bad_records, stats=stats, opener=opener, error=error):
        try:
            value = decode_object(line.text, line.where, allow_nan=allow_nan, error=error)
        except ValueError as err:
            stats.skip_or_raise(err, skip_bad_records)
            continue
        yield dataclasses.replace(line, value=value)


def read_json(path: str, expected: type, what: str) -> Any:
    """A local JSON file's value, which must be an instance of `expected` (ValueError "path: expected <what>"), or
    ValueError naming `path:line` when it is not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(value, expected):
        raise ValueError(f"{path}: expected {what}")
    return value


def write_json(path: str, value: Any) -> None:
    """Write `value` as indented JSON, atomically: a stopped run never leaves a half-written file."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(f"{path}.tmp", "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    os.replace(f"{path}.tmp", path)
