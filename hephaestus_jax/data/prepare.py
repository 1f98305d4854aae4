"""Offline preparation with Apache Beam: raw Forge JSONL(.gz) -> rendered, tokenized, shuffled ArrayRecord shards.

For every component and split, the files `{input_dir}/{component}/{split}-*.jsonl*` are read and rendered with
the tokenizer; each document gets a key hashed from (seed, component, split, file name, line), goes to shard
`key % num_shards`, and each shard holds its documents sorted by key. The output is therefore a deterministic
function of the inputs and the seed, whatever the runner or its parallelism:

    {output_dir}/{component}/{split}-00000-of-00008.arrayrecord   (records in the layout of records.py)
    {output_dir}/stats.json   documents, tokens, target tokens and skipped bad records per component and split

Read the shards with `ForgeFiles.pattern = "{data_dir}/{component}/{split}-*.arrayrecord"`. The pipeline runs
locally on the DirectRunner and unchanged on Dataflow, Flink or Spark (pass their options through); every shard
is sorted in one worker's memory, so choose `num_shards` to keep shards well under a worker's memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from hephaestus_jax.data import forge
from hephaestus_jax.data.records import encode_example
from hephaestus_jax.data.sources import ARRAY_RECORD_WRITER_OPTIONS, PREPARED_SUFFIX, STATS_FILE, expand_patterns

RAW_PATTERN = "{input_dir}/{component}/{split}-*.jsonl*"
_SKIPPED = "skipped"


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """What to prepare. `tokenizer_path` None means the default Llama-3 tokenizer, resolved on each worker."""

    input_dir: str
    output_dir: str
    components: tuple[str, ...] = forge.COMPONENTS
    splits: tuple[str, ...] = ("train", "validation")
    seed: int = 0
    num_shards: int = 8
    tokenizer_path: str | None = None
    chat_format: str | None = None  # A `config.CHAT_FORMAT_NAMES` name; None: the tokenizer's template, else a fallback.
    skip_bad_records: bool = False

    def __post_init__(self):
        unknown = sorted(set(self.components) - set(forge.COMPONENTS))
        if unknown:
            raise ValueError(f"unknown component(s) {unknown}; expected some of {forge.COMPONENTS}")
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")


def shard_path(output_dir: str, component: str, split: str, shard: int, num_shards: int) -> str:
    return f"{output_dir.rstrip('/')}/{component}/{split}-{shard:05d}-of-{num_shards:05d}{PREPARED_SUFFIX}"


def document_key(seed: int, component: str, split: str, file_name: str, line: int) -> int:
    """A stable 64-bit shuffle key for one input line (independent of where the input directory lies)."""
    text = f"{seed}\0{component}\0{split}\0{file_name}\0{line}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def input_files(config: PrepareConfig) -> list[tuple[str, str, str]]:
    """(component, split, path) of every input file; a pattern matching nothing raises, naming it."""
    found = []
    for component in config.components:
        for split in config.splits:
            pattern = RAW_PATTERN.format(input_dir=config.input_dir.rstrip("/"), component=component, split=split)
            found.extend((component, split, path) for path in expand_patterns([pattern]))
    return found


class RenderFile(beam.DoFn):
    """(component, split, path) -> ((component, split, shard), (key, record bytes, tokens, target tokens)) per
    document; the number of skipped bad lines goes to the `skipped` output."""

    def __init__(self, config: PrepareConfig):
        self._config = config
        self._renderer = None

    def setup(self) -> None:
        from hephaestus_jax.data.chat_format import forge_renderer  # lazy: TensorFlow on the workers only.

        self._renderer = forge_renderer(self._config.tokenizer_path, self._config.chat_format)

    def process(self, element: tuple[str, str, str]) -> Iterator:
        from hephaestus_jax.data.chat_format import render_document  # lazy: TensorFlow on the workers only.

        component, split, path = element
        config = self._config
        reader = forge.read_records(path, component, skip_bad_records=config.skip_bad_records)
        file_name = os.path.basename(path)
        for record in reader:
            line = int(record.origin.rsplit(":", 1)[1])
            example = render_document(record, self._renderer)
            key = document_key(config.seed, component, split, file_name, line)
            value = (key, encode_example(example), int(example.tokens.size), int(example.loss_mask.sum()))
            yield (component, split, key % config.num_shards), value
        yield beam.pvalue.TaggedOutput(_SKIPPED, ((component, split), reader.num_skipped))


class WriteShard(beam.DoFn):
    """((component, split, shard), documents) -> the shard file with its documents sorted by key; yields
    ((component, split), (documents, tokens, target tokens))."""

    def __init__(self, output_dir: str, num_shards: int):
        self._output_dir = output_dir
        self._num_shards = num_shards

    def process(self, element) -> Iterator:
        from array_record.python.array_record_module import ArrayRecordWriter

        (component, split, shard), values = element
        documents = sorted(value for value in values if value is not None)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "shard" + PREPARED_SUFFIX)
            writer = ArrayRecordWriter(local, ARRAY_RECORD_WRITER_OPTIONS)
            for _, data, _, _ in documents:
                writer.write(data)
            writer.close()
            with open(local, "rb") as src, FileSystems.create(
                shard_path(self._output_dir, component, split, shard, self._num_shards)
            ) as dst:
                shutil.copyfileobj(src, dst)
        tokens = sum(value[2] for value in documents)
        targets = sum(value[3] for value in documents)
        yield (component, split), (len(documents), tokens, targets)


def _sum_counts(counts: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    return tuple(sum(column) for column in zip(*counts))


def stats_json(config: PrepareConfig, written: Sequence, skipped: Sequence, rendering: dict) -> str:
    """The stats file: per component and split, documents, tokens, target tokens, skipped bad records; and the
    rendering (`chat_format.rendering_identity`), which training checks against its own (`sources.check_prepared`)."""
    table: dict = {}
    for (component, split), (documents, tokens, targets) in written:
        table.setdefault(component, {})[split] = {"documents": documents, "tokens": tokens, "target_tokens": targets}
    for (component, split), count in skipped:
        table[component][split]["skipped_bad_records"] = count
    stats = {
        "seed": config.seed,
        "num_shards": config.num_shards,
        "tokenizer": os.path.basename(config.tokenizer_path) if config.tokenizer_path else "default (Llama-3)",
        "components": table,
        "rendering": rendering,
    }
    return json.dumps(stats, indent=2, sort_keys=True) + "\n"


def _write_stats(text: str, path: str) -> None:
    with FileSystems.create(path) as f:
        f.write(text.encode())


def build_pipeline(pipeline: beam.Pipeline, config: PrepareConfig) -> None:
    """Adds the preparation steps to `pipeline`."""
    from hephaestus_jax.data.chat_format import forge_renderer, rendering_identity  # lazy: TensorFlow.

    files = input_files(config)
    rendering = rendering_identity(forge_renderer(config.tokenizer_path, config.chat_format))
    every_shard = [
        ((component, split, shard), None)
        for component in config.components
        for split in config.splits
        for shard in range(config.num_shards)
    ]
    rendered = (
        pipeline
        | "ListFiles" >> beam.Create(files)
        | "SpreadFiles" >> beam.Reshuffle()
        | "Render" >> beam.ParDo(RenderFile(config)).with_outputs(_SKIPPED, main="documents")
    )
    empty_shards = pipeline | "EveryShard" >> beam.Create(every_shard)
    written = (
        (rendered.documents, empty_shards)
        | "WithEmptyShards" >> beam.Flatten()
        | "GroupByShard" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(WriteShard(config.output_dir, config.num_shards))
        | "SumPerSplit" >> beam.CombinePerKey(_sum_counts)
    )
    skipped = rendered[_SKIPPED] | "SumSkipped" >> beam.CombinePerKey(sum)
    stats_path = f"{config.output_dir.rstrip('/')}/{STATS_FILE}"
    _ = (
        pipeline
        | "StatsTrigger" >> beam.Create([None])
        | "FormatStats"
        >> beam.Map(
            lambda _, written, skipped: stats_json(config, written, skipped, rendering),
            written=beam.pvalue.AsList(written),
            skipped=beam.pvalue.AsList(skipped),
        )
        | "WriteStats" >> beam.Map(_write_stats, stats_path)
    )


def run(config: PrepareConfig, pipeline_options: PipelineOptions | None = None) -> None:
    """Runs the preparation (DirectRunner unless the options name another runner) and waits for it."""
    with beam.Pipeline(options=pipeline_options or PipelineOptions()) as pipeline:
        build_pipeline(pipeline, config)
