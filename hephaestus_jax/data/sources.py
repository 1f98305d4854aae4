"""Where documents come from: file patterns over raw Forge JSONL(.gz) files or prepared ArrayRecord shards.

Two views of the same files:
- random access (`DocumentSource`: `len()` and `[i]` -> Example), used by the training lanes and eval iterators;
- sequential per file (`iter_file_examples`), used by seqio's tf.data pipeline.
Document i of a file list is the i-th record of the files in the given order, in both views.

Raw JSONL is convenient for small data: its records are parsed into memory on first access and rendered
(tokenized) when read. For large corpora run tools/prepare_data.py once and read the prepared shards.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
import threading
from collections.abc import Iterator, Sequence

import tensorflow as tf
from etils import epath

from hephaestus_jax.config import ConfigError
from hephaestus_jax.data import forge
from hephaestus_jax.data.chat_format import ChatRenderer, render_document, rendering_identity
from hephaestus_jax.data.example import DocumentSource, Example
from hephaestus_jax.data.records import RecordFormatError, decode_example

PREPARED_SUFFIX = ".arrayrecord"
STATS_FILE = "stats.json"
"""Beside the component directories of prepared data: counts, and the rendering the shards were made with."""
RAW_SUFFIXES = (".jsonl", ".jsonl.gz")
ARRAY_RECORD_WRITER_OPTIONS = "group_size:1"
"""Writer options for prepared shards: one record per chunk group, as random access requires."""
_READ_CHUNK = 256


class ExampleList:
    """A `DocumentSource` over examples held in memory (synthetic data, tests, benchmarks)."""

    def __init__(self, examples: Sequence[Example]):
        self._examples = list(examples)

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> Example:
        return self._examples[index]


class MissingDataError(FileNotFoundError, ConfigError):
    """A data file pattern matches no file: a configuration error (the CLIs exit 2 before compiling)."""


def expand_patterns(patterns: Sequence[str]) -> list[str]:
    """Files matching the glob patterns (local paths or gs:// URLs), sorted within each pattern, in pattern order.

    Raises MissingDataError (a FileNotFoundError and a ConfigError) naming every pattern that matches no file.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[str] = []
    empty = []
    for pattern in patterns:
        matches = sorted(tf.io.gfile.glob(pattern))
        if not matches:
            empty.append(pattern)
        files.extend(path for path in matches if path not in files)
    if empty:
        raise MissingDataError(f"no file matches the pattern(s): {', '.join(empty)} (ForgeFiles.data_dir and "
                               "ForgeFiles.pattern say where the data is)")
    return files


def file_kind(path: str) -> str:
    """'prepared' for ArrayRecord shards, 'raw' for Forge JSONL(.gz); anything else raises, naming the file."""
    if path.endswith(PREPARED_SUFFIX):
        return "prepared"
    if path.endswith(RAW_SUFFIXES):
        return "raw"
    raise ValueError(f"{path}: unknown data file type; expected *{PREPARED_SUFFIX} or one of {', '.join(RAW_SUFFIXES)}")


class RawDocuments:
    """Random access to the records of Forge JSONL(.gz) files, rendered with `renderer` when read.

    The records (not their tokens) are parsed into memory on first use; bad lines raise with their path:line,
    or are skipped and counted (`num_skipped`) with `skip_bad_records`.
    """

    def __init__(
        self, paths: Sequence[str], component: str, renderer: ChatRenderer, *, skip_bad_records: bool = False
    ):
        self.paths = list(paths)
        self.component = component
        self.renderer = renderer
        self.skip_bad_records = skip_bad_records
        self.num_skipped = 0
        self._records: list[forge.Record] | None = None
        self._lock = threading.Lock()

    def _loaded(self) -> list[forge.Record]:
        with self._lock:
            if self._records is None:
                records: list[forge.Record] = []
                for path in self.paths:
                    reader = forge.read_records(path, self.component, skip_bad_records=self.skip_bad_records)
                    records.extend(reader)
                    self.num_skipped += reader.num_skipped
                self._records = records
            return self._records

    def __len__(self) -> int:
        return len(self._loaded())

    def __getitem__(self, index: int) -> Example:
        return render_document(self._loaded()[index], self.renderer)


class PreparedDocuments:
    """Random access to prepared ArrayRecord shards (grain's `ArrayRecordDataSource`); a bad record raises naming
    its shard and index within the shard."""

    def __init__(self, paths: Sequence[str]):
        import grain

        self.paths = list(paths)
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < len(self._source):
            raise IndexError(f"document {index} is out of range for {len(self._source)} prepared documents")
        data = self._source[index]
        try:
            return decode_example(data, f"prepared document {index}")
        except RecordFormatError as err:
            raise RecordFormatError(f"{self._origin(index)}: {err}") from None

    def _origin(self, index: int) -> str:
        """"shard#i" for a global document index (computed only to name a bad record)."""
        from array_record.python.array_record_module import ArrayRecordReader

        ends = []
        total = 0
        for path in self.paths:
            reader = ArrayRecordReader(path)
            total += reader.num_records()
            reader.close()
            ends.append(total)
        shard = bisect.bisect_right(ends, index)
        return f"{self.paths[shard]}#{index - (ends[shard - 1] if shard else 0)}"


def open_documents(
    paths: Sequence[str], component: str, renderer: ChatRenderer, *, skip_bad_records: bool = False
) -> DocumentSource:
    """The random-access view of `paths`: all prepared shards (rendered as `renderer` renders, else a
    ConfigError) or all raw JSONL files, rendered with `renderer` (a mix raises)."""
    if not paths:
        raise ValueError(f"no files given for component {component!r}")
    kinds = {file_kind(path) for path in paths}
    if len(kinds) > 1:
        raise ValueError(f"files for {component!r} mix prepared shards and raw JSONL: {', '.join(paths)}")
    if kinds == {"prepared"}:
        check_prepared(paths, renderer)
        return PreparedDocuments(paths)
    return RawDocuments(paths, component, renderer, skip_bad_records=skip_bad_records)


RENDERING_KEYS = ("tokenizer", "prefix_ids", "eos_id", "chat_format", "chat_template")
"""The fields of `rendering_identity` that decide the tokens (the tokenizer's path does not)."""


def check_prepared(paths: Sequence[str], renderer: ChatRenderer) -> None:
    """ConfigError, naming both, when prepared shards were rendered with another tokenizer or chat format than
    `renderer` (their `stats.json`, two levels above each shard, records it: data/prepare.py)."""
    expected = rendering_identity(renderer)
    for root in sorted({os.path.dirname(os.path.dirname(path)) for path in paths}):
        recorded = _recorded_rendering(root)
        if recorded is None:
            raise ConfigError(f"{root}/{STATS_FILE} does not record the tokenizer and chat format its shards were "
                              "rendered with; prepare the data again with tools/prepare_data.py")
        differ = sorted(key for key in RENDERING_KEYS if recorded.get(key) != expected[key])
        if differ:
            raise ConfigError(f"{root}: the shards were rendered with {_rendering_text(recorded)}, but this run "
                              f"renders with {_rendering_text(expected)} (they differ in {', '.join(differ)}); bind "
                              "DataConfig.tokenizer_path / DataConfig.chat_format to match, or prepare the data again")


@functools.lru_cache(maxsize=64)
def _recorded_rendering(root: str) -> dict | None:
    path = epath.Path(root) / STATS_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("rendering")
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def _rendering_text(identity: dict) -> str:
    template = f" {identity['chat_template']}" if identity.get("chat_template") else ""
    return (f"the tokenizer {identity.get('tokenizer_path') or '?'} ({str(identity.get('tokenizer'))[:12]}) and "
            f"the chat format {identity.get('chat_format')}{template}")


def iter_file_examples(
    path: str, component: str, renderer: ChatRenderer, *, skip_bad_records: bool = False
) -> Iterator[Example]:
    """The documents of one file in order, read sequentially (the tf.data view)."""
    if file_kind(path) == "prepared":
        check_prepared([path], renderer)
        from array_record.python.array_record_module import ArrayRecordReader

        reader = ArrayRecordReader(path)
        try:
            total = reader.num_records()
            for start in range(0, total, _READ_CHUNK):
                for offset, data in enumerate(reader.read(start, min(start + _READ_CHUNK, total))):
                    yield decode_example(data, f"{path}#{start + offset}")
        finally:
            reader.close()
        return
    for record in forge.read_records(path, component, skip_bad_records=skip_bad_records):
        yield render_document(record, renderer)
