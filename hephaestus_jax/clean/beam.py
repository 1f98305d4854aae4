"""Corpus cleaning as one Apache Beam job: quality filter, dedup, decontamination, in any order.

The steps make the same decisions as the single-process stages because they call the same
functions (:func:`~hephaestus_jax.clean.quality.quality_verdict`,
:class:`~hephaestus_jax.clean.dedup.Fingerprinter` and the dedup keep rule,
:func:`~hephaestus_jax.clean.decontaminate.contamination`); only the plumbing differs:

* **quality**: the fastText model is loaded once per worker (``DoFn.setup``, copied from ``gs://``);
* **decontaminate**: the eval n-gram index is built once by the launcher and broadcast to every
  worker as a side input (it must fit a worker's memory: BFCL's is a few MB);
* **dedup**: fingerprint per document -> group by exact digest (the lowest id of a group stays) ->
  one element per (band, bucket key) -> group by bucket -> confirm candidate pairs inside a bucket
  by estimated Jaccard -> per removed id the best match -> join back with the documents by id.
  A worker holds one exact group, one bucket or one id's documents at a time, never the corpus;
  the ``dedup`` metrics distributions ``exact_group_size`` and ``bucket_size`` report the largest.

Input: JSONL(.gz) files or glob patterns (local or ``gs://``), read line by line with
:func:`~hephaestus_jax.clean.jsonl.read_documents`.  Output: the kept lines, unchanged, in
``num_shards`` files ``{stem}-SSSSS-of-NNNNN{suffix}`` next to ``output`` (``out/kept.jsonl.gz``
-> ``out/kept-00000-of-00008.jsonl.gz``); a document goes to shard ``blake2b(id) % num_shards`` and
every shard is sorted by id, so the output is a function of the input records and ids alone, not of
the runner, its parallelism or the input's sharding (gzip is written with a zero timestamp).  The
removal log (one line per removed document: id, location, step and the step's details) is written
the same way; the JSON report holds the read counts and, per step, what it kept and removed.
A writer sorts one shard in memory: choose ``num_shards`` so that a shard fits a worker.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from hephaestus_jax.clean.decontaminate import EvalNgramIndex, contamination
from hephaestus_jax.clean.dedup import (
    DedupConfig, Fingerprint, Fingerprinter, best_match, confirmed_pairs, exact_group_removals, near_details,
)
from hephaestus_jax.clean.jsonl import ReadStats, TextSelector, read_documents
from hephaestus_jax.clean.quality import QualityClassifier, quality_verdict
from hephaestus_jax.data.sources import expand_patterns
from hephaestus_jax.json_lines import MAX_LOGGED_SKIPS

Row = tuple[str, str, str, str]  # (document id, file:line, raw JSON line, selected text)
_REMOVED = "removed"
_READ = "read"
_SUFFIX = re.compile(r"(\.jsonl?)?(\.gz)?$")


@dataclasses.dataclass(frozen=True)
class ReadConfig:
    """Where a document's text and id are (field paths, see jsonl.py) and whether bad lines are skipped."""

    text_fields: tuple[str, ...] = ("text",)
    id_field: str | None = None
    skip_bad_records: bool = False


@dataclasses.dataclass(frozen=True)
class QualityStep:
    """Keep documents with P(pos) >= ``threshold`` under the fastText model at ``model`` (local or gs://)."""

    model: str
    threshold: float = 0.5
    name: str = "quality"


@dataclasses.dataclass(frozen=True)
class DedupStep:
    """Exact and MinHash-LSH near-duplicate removal (lowest id kept, see dedup.py)."""

    config: DedupConfig = DedupConfig()
    name: str = "dedup"


@dataclasses.dataclass(frozen=True)
class DecontaminateStep:
    """Remove documents sharing an n-gram with the eval texts in ``index`` (built by the launcher)."""

    index: EvalNgramIndex
    name: str = "decontaminate"


Step = QualityStep | DedupStep | DecontaminateStep


def shard_paths(output: str, num_shards: int) -> list[str]:
    """``out/kept.jsonl.gz`` -> ``out/kept-00000-of-00004.jsonl.gz``, ... (suffix ``.jsonl`` when none)."""
    suffix = _SUFFIX.search(output).group(0) or ".jsonl"
    stem = _SUFFIX.sub("", output)
    return [f"{stem}-{shard:05d}-of-{num_shards:05d}{suffix}" for shard in range(num_shards)]


def shard_of(doc_id: str, num_shards: int) -> int:
    """The output shard of a document id (stable across runs and machines)."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little") % num_shards


def _open_any(path: str) -> IO[bytes]:
    """Opens a local or gs:// file for reading, gunzipped when it ends in .gz."""
    return FileSystems.open(path, compression_type=CompressionTypes.AUTO)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path holding the contents of ``path`` (itself when local)."""
    if "://" not in path:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="clean-") as tmp:
        local = os.path.join(tmp, os.path.basename(path))
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst)
        yield local


def load_classifier(path: str) -> QualityClassifier:
    """The quality classifier at ``path`` (local or gs://); raises ValueError on a wrong model."""
    with local_copy(path) as local:
        return QualityClassifier.load(local)


class ReadFile(beam.DoFn):
    """A file path -> one :data:`Row` per document; the file's :class:`ReadStats` go to the ``read`` output."""

    def __init__(self, config: ReadConfig) -> None:
        self._config = config

    def process(self, path: str) -> Iterator:
        stats = ReadStats()
        for document in read_documents([path], TextSelector(self._config.text_fields), id_field=self._config.id_field,
                                       skip_bad_records=self._config.skip_bad_records, stats=stats, opener=_open_any):
            yield document.id, document.location, document.raw, document.text
        yield beam.pvalue.TaggedOutput(_READ, stats.to_dict())


def _removal(row: Row, step: str, details: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return row[0], {"id": row[0], "location": row[1], "step": step, **details}


class QualityFilter(beam.DoFn):
    """Keeps rows by :func:`quality_verdict`; the model is loaded once per worker."""

    def __init__(self, step: QualityStep) -> None:
        self._step = step
        self._classifier: QualityClassifier | None = None

    def setup(self) -> None:
        self._classifier = load_classifier(self._step.model)

    def process(self, row: Row) -> Iterator:
        keep, details = quality_verdict(self._classifier, row[3], self._step.threshold)
        yield row if keep else beam.pvalue.TaggedOutput(_REMOVED, _removal(row, self._step.name, details))


def _decontaminate(row: Row, index: EvalNgramIndex, step: str) -> Iterator:
    details = contamination(index, row[3])
    yield row if details is None else beam.pvalue.TaggedOutput(_REMOVED, _removal(row, step, details))


class FingerprintRows(beam.DoFn):
    """Row -> (exact digest, (id, signature bytes or None))."""

    def __init__(self, config: DedupConfig) -> None:
        self._config = config
        self._fingerprint: Fingerprinter | None = None

    def setup(self) -> None:
        self._fingerprint = Fingerprinter(self._config)

    def process(self, row: Row) -> Iterator:
        found = self._fingerprint(row[0], row[3])
        yield found.digest, (found.id, None if found.signature is None else found.signature.tobytes())


def _fingerprints(members: Iterable[tuple[str, bytes | None]], digest: bytes) -> list[Fingerprint]:
    return [Fingerprint(doc_id, digest, None if sig is None else np.frombuffer(sig, dtype=np.uint32))
            for doc_id, sig in members]


class ExactGroup(beam.DoFn):
    """(digest, members) -> exact removals (``removed`` output) and the keeper's (bucket key, member) per band."""

    def __init__(self, config: DedupConfig) -> None:
        self._config = config
        self._fingerprint: Fingerprinter | None = None
        self._group_size = Metrics.distribution("dedup", "exact_group_size")

    def setup(self) -> None:
        self._fingerprint = Fingerprinter(self._config)

    def process(self, element: tuple[bytes, Iterable[tuple[str, bytes | None]]]) -> Iterator:
        digest, members = element
        group = _fingerprints(members, digest)
        self._group_size.update(len(group))
        keeper, removals = exact_group_removals(group)
        for removal in removals:
            yield beam.pvalue.TaggedOutput(_REMOVED, removal)
        if keeper.signature is not None:
            for key in self._fingerprint.band_keys(keeper.signature):
                yield key, (keeper.id, keeper.signature.tobytes())


class CompareBucket(beam.DoFn):
    """(bucket key, members) -> (higher id, (similarity, lower id)) per confirmed pair in the bucket."""

    def __init__(self, threshold: float) -> None:
        self._threshold = threshold
        self._bucket_size = Metrics.distribution("dedup", "bucket_size")

    def process(self, element: tuple[bytes, Iterable[tuple[str, bytes]]]) -> Iterator:
        _, members = element
        bucket = _fingerprints(members, b"")
        self._bucket_size.update(len(bucket))
        yield from confirmed_pairs(bucket, self._threshold)


def _apply_removals(element: tuple[str, dict[str, list]], step: str) -> Iterator:
    """(id, {rows, removals}) -> the row, or its removal log entry; two rows with one id raise, naming both."""
    doc_id, joined = element
    rows = sorted(joined["rows"], key=lambda row: row[1])
    if len(rows) > 1:
        raise ValueError(f"{rows[1][1]}: document id {doc_id!r} also at {rows[0][1]}; "
                         "dedup needs unique ids (pass an id field with unique values)")
    if not rows:
        return
    removals = joined["removals"]
    if removals:
        yield beam.pvalue.TaggedOutput(_REMOVED, _removal(rows[0], step, removals[0]))
    else:
        yield rows[0]


def _dedup(rows: beam.PCollection, step: DedupStep) -> beam.pvalue.DoOutputsTuple:
    name, config = step.name, step.config
    groups = (rows
              | f"{name}/Fingerprint" >> beam.ParDo(FingerprintRows(config))
              | f"{name}/GroupByDigest" >> beam.GroupByKey()
              | f"{name}/ExactGroups" >> beam.ParDo(ExactGroup(config)).with_outputs(_REMOVED, main="bands"))
    near = (groups.bands
            | f"{name}/GroupByBucket" >> beam.GroupByKey()
            | f"{name}/CompareBuckets" >> beam.ParDo(CompareBucket(config.threshold))
            | f"{name}/BestMatch" >> beam.CombinePerKey(best_match)
            | f"{name}/NearDetails" >> beam.MapTuple(lambda doc_id, match: (doc_id, near_details(match))))
    removals = (groups[_REMOVED], near) | f"{name}/AllRemovals" >> beam.Flatten()
    keyed = rows | f"{name}/KeyById" >> beam.Map(lambda row: (row[0], row))
    return ({"rows": keyed, "removals": removals}
            | f"{name}/JoinById" >> beam.CoGroupByKey()
            | f"{name}/Apply" >> beam.FlatMap(_apply_removals, name).with_outputs(_REMOVED, main="kept"))


def apply_step(rows: beam.PCollection, step: Step) -> tuple[beam.PCollection, beam.PCollection]:
    """(kept rows, removal log entries keyed by id) of one step."""
    if isinstance(step, QualityStep):
        out = rows | f"{step.name}/Filter" >> beam.ParDo(QualityFilter(step)).with_outputs(_REMOVED, main="kept")
    elif isinstance(step, DecontaminateStep):
        index = rows.pipeline | f"{step.name}/EvalIndex" >> beam.Create([step.index])
        out = rows | f"{step.name}/Filter" >> beam.FlatMap(
            _decontaminate, beam.pvalue.AsSingleton(index), step.name).with_outputs(_REMOVED, main="kept")
    else:
        out = _dedup(rows, step)
    return out.kept, out[_REMOVED]


class WriteShard(beam.DoFn):
    """(shard, [(id, line)]) -> the shard file, lines sorted by id; gzip (zero mtime) for ``.gz``."""

    def __init__(self, paths: Sequence[str]) -> None:
        self._paths = list(paths)

    def process(self, element: tuple[int, Iterable[tuple[str, str] | None]]) -> None:
        shard, lines = element
        data = "".join(line + "\n" for _, line in sorted(line for line in lines if line is not None)).encode()
        path = self._paths[shard]
        if path.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            handle.write(data)


def write_shards(lines: beam.PCollection, output: str, num_shards: int, label: str) -> list[str]:
    """Writes ``(id, line)`` elements to ``num_shards`` sorted shards (empty shards too); returns their paths."""
    paths = shard_paths(output, num_shards)
    every_shard = lines.pipeline | f"{label}/EveryShard" >> beam.Create([(shard, None) for shard in range(num_shards)])
    _ = ((lines | f"{label}/ToShard" >> beam.Map(lambda kv: (shard_of(kv[0], num_shards), kv)), every_shard)
         | f"{label}/WithEmptyShards" >> beam.Flatten()
         | f"{label}/GroupByShard" >> beam.GroupByKey()
         | f"{label}/Write" >> beam.ParDo(WriteShard(paths)))
    return paths


@dataclasses.dataclass(frozen=True)
class CleanJob:
    """A cleaning job: inputs, the steps in order, and where kept lines, removals and the report go."""

    inputs: tuple[str, ...]
    steps: tuple[Step, ...]
    output: str
    report: str
    read: ReadConfig = ReadConfig()
    removal_log: str | None = None
    num_shards: int = 8

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("a cleaning job needs at least one step")
        names = [step.name for step in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"step names must be unique, got {names}")
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")


def _tallies(step: str, kept: beam.PCollection, removed: beam.PCollection) -> beam.PCollection:
    """(step, kind, name) -> count, for kept documents and removals by reason and eval item."""
    def removal_keys(entry: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
        yield step, "removed", ""
        if "reason" in entry:
            yield step, "reason", entry["reason"]
        if "eval_item" in entry:
            yield step, "eval_item", entry["eval_item"]

    kept_keys = kept | f"{step}/TallyKept" >> beam.Map(lambda _: (step, "kept", ""))
    removed_keys = removed | f"{step}/TallyRemoved" >> beam.FlatMapTuple(lambda _, entry: removal_keys(entry))
    return (kept_keys, removed_keys) | f"{step}/Tallies" >> beam.Flatten() | f"{step}/Count" >> beam.combiners.Count.PerElement()


def _sum_read_stats(stats: Iterable[dict[str, Any]]) -> dict[str, Any]:
    total = ReadStats()
    for one in stats:
        total.documents += one["documents"]
        total.blank_lines += one["blank_lines"]
        total.bad_records += one["bad_records"]
        total.bad_record_examples.extend(one["bad_record_examples"])
    total.bad_record_examples = sorted(total.bad_record_examples)[:MAX_LOGGED_SKIPS]
    return total.to_dict()


def step_summary(step: Step) -> dict[str, Any]:
    """The settings of a step, for the report."""
    if isinstance(step, QualityStep):
        return {"model": step.model, "threshold": step.threshold}
    if isinstance(step, DedupStep):
        return {"config": dataclasses.asdict(step.config)}
    return {"ngram": step.index.n, "eval_index": dataclasses.asdict(step.index.stats)}


def report_dict(job: CleanJob, paths: dict[str, list[str]], read: Sequence[dict[str, Any]],
                tallies: Sequence[tuple[tuple[str, str, str], int]]) -> dict[str, Any]:
    """The JSON report: read counts, then per step its settings, input, kept, removed and by reason / eval item."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for (step, kind, name), count in tallies:
        counts[step][(kind, name)] = count
    steps = []
    for step in job.steps:
        mine = counts[step.name]
        kept, removed = mine[("kept", "")], mine[("removed", "")]
        by = {kind: dict(sorted((name, n) for (k, name), n in mine.items() if k == kind))
              for kind in ("reason", "eval_item")}
        steps.append({"step": step.name, **step_summary(step), "input": kept + removed, "kept": kept,
                      "removed": removed, "removed_by_reason": by["reason"], "removed_per_eval_item": by["eval_item"]})
    return {"inputs": list(job.inputs), "read": _sum_read_stats(read), "kept": steps[-1]["kept"],
            "removed": sum(step["removed"] for step in steps), "steps": steps, **paths}


def build_pipeline(pipeline: beam.Pipeline, job: CleanJob) -> None:
    """Adds the job's read, steps, writes and report to ``pipeline``."""
    files = expand_patterns(job.inputs)
    read = (pipeline
            | "ListFiles" >> beam.Create(files)
            | "SpreadFiles" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(ReadFile(job.read)).with_outputs(_READ, main="rows"))
    rows = read.rows
    removals: list[beam.PCollection] = []
    tallies: list[beam.PCollection] = []
    for step in job.steps:
        kept, removed = apply_step(rows, step)
        removals.append(removed)
        tallies.append(_tallies(step.name, kept, removed))
        rows = kept
    paths = {"output": write_shards(rows | "KeptLines" >> beam.Map(lambda row: (row[0], row[2])),
                                    job.output, job.num_shards, "WriteKept")}
    all_removals = tuple(removals) | "AllRemovals" >> beam.Flatten()
    if job.removal_log:
        log_lines = all_removals | "LogLines" >> beam.MapTuple(
            lambda doc_id, entry: (doc_id, json.dumps(entry, ensure_ascii=False, sort_keys=True)))
        paths["removal_log"] = write_shards(log_lines, job.removal_log, job.num_shards, "WriteLog")
    all_tallies = tuple(tallies) | "AllTallies" >> beam.Flatten()
    _ = (pipeline
         | "ReportTrigger" >> beam.Create([None])
         | "FormatReport" >> beam.Map(
             lambda _, read_stats, counts: json.dumps(report_dict(job, paths, read_stats, counts), indent=2) + "\n",
             beam.pvalue.AsList(read[_READ]), beam.pvalue.AsList(all_tallies))
         | "WriteReport" >> beam.Map(_write_text, job.report))


def _write_text(text: str, path: str) -> None:
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.write(text.encode("utf-8"))


def run(job: CleanJob, options: PipelineOptions | None = None) -> beam.runners.runner.PipelineResult:
    """Runs the job (DirectRunner unless the options name another runner), waits, and returns the result."""
    pipeline = beam.Pipeline(options=options or PipelineOptions())
    build_pipeline(pipeline, job)
    result = pipeline.run()
    result.wait_until_finish()
    return result
