"""Clean a JSONL corpus: quality classifier, deduplication, benchmark decontamination.

Subcommands (each streams its inputs line by line, writes the kept records unchanged to
``--output``, prints a one-line summary and writes a JSON report):

  train-quality   train the fastText quality classifier (positives: seed agent data; negatives:
                  general text) and report held-out precision / recall / F1
  filter-quality  keep documents with P(pos) >= --threshold
  dedup           drop exact and MinHash-LSH near duplicates (the lowest document id of a cluster kept)
  decontaminate   drop documents sharing an n-gram (default 13 tokens) with eval sets (BFCL, JSONL, text)
  clean           quality -> dedup -> decontaminate (any subset, in that order) as one Beam job

Example::

  python tools/clean_corpus.py train-quality --positive seed.jsonl --negative web.jsonl \\
      --model_output quality.bin --report quality_train.json
  python tools/clean_corpus.py filter-quality --input raw.jsonl.gz --output good.jsonl.gz \\
      --model quality.bin --threshold 0.5 --report filter.json
  python tools/clean_corpus.py dedup --input good.jsonl.gz --output dedup.jsonl.gz --report dedup.json
  python tools/clean_corpus.py decontaminate --input dedup.jsonl.gz --output clean.jsonl.gz \\
      --eval BFCL_v3_simple.json BFCL_v3_multiple.json --report decontam.json --removal_log decontam.jsonl

Beam: with ``--runner`` (DirectRunner, DataflowRunner, ...) filter-quality, dedup and decontaminate run
as Apache Beam pipelines (hephaestus_jax/clean/beam.py) and make the same decisions; every other
unrecognised option goes to Beam (``--direct_num_workers 4``, ``--project P --region R
--temp_location gs://...``).  ``--input`` then also takes glob patterns and gs:// paths, and ``--output``
and ``--removal_log`` name ``--num_shards`` shards (``kept.jsonl.gz`` -> ``kept-00000-of-00008.jsonl.gz``)
sorted by document id.  ``clean`` always runs on Beam (DirectRunner unless told otherwise)::

  python tools/clean_corpus.py clean --input 'gs://b/raw/*.jsonl.gz' --output gs://b/clean/train.jsonl.gz \
      --id_field id --quality_model gs://b/quality.bin --eval BFCL_v3_simple.json \
      --report clean.json --removal_log gs://b/clean/removed.jsonl.gz \
      --runner DataflowRunner --project P --region us-central1 --temp_location gs://b/tmp

Text comes from ``--text_field`` (repeatable field paths such as ``messages.*.content``, joined by
newlines; see hephaestus_jax/clean/jsonl.py).  A malformed line stops the run with
``file:line: what is wrong``; with ``--skip_bad_records`` it is skipped and counted in the report.
Needs the ``[data]`` extra: ``pip install -e '.[data]'``.
"""

from __future__ import annotations

from hephaestus_jax import command

if __name__ == "__main__":  # A command, not a library import: quiet start-up before jax/TF load.
    command.start()

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from hephaestus_jax.clean.jsonl import (
    Decision, Document, JsonlWriter, ReadStats, TextSelector, read_documents,
)
from hephaestus_jax.json_lines import write_json


@dataclasses.dataclass
class FilterCounts:
    """What a filtering stage kept and removed (by the decisions' ``reason`` where they give one)."""

    kept: int = 0
    removed: int = 0
    removed_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)


def run_filter(
    decisions: Iterable[Decision],
    output: str,
    *,
    removed_output: str | None = None,
    removal_log: str | None = None,
    annotate: Callable[[Decision], dict[str, Any]] | None = None,
) -> FilterCounts:
    """Writes kept (and optionally removed) records and a removal log; returns the counts.

    Records are written byte-for-byte as read unless ``annotate`` gives fields to add.
    """
    counts = FilterCounts()
    reasons: collections.Counter[str] = collections.Counter()
    with contextlib.ExitStack() as stack:
        kept_writer = stack.enter_context(JsonlWriter(output))
        removed_writer = stack.enter_context(JsonlWriter(removed_output)) if removed_output else None
        log_writer = stack.enter_context(JsonlWriter(removal_log)) if removal_log else None
        for decision in decisions:
            document = decision.document
            line = document.raw if annotate is None else json.dumps(
                {**document.record, **annotate(decision)}, ensure_ascii=False)
            if decision.keep:
                counts.kept += 1
                kept_writer.write_raw(line)
                continue
            counts.removed += 1
            if "reason" in decision.details:
                reasons[decision.details["reason"]] += 1
            if removed_writer:
                removed_writer.write_raw(line)
            if log_writer:
                log_writer.write({"id": document.id, "location": document.location, **decision.details})
    counts.removed_by_reason = dict(sorted(reasons.items()))
    return counts


def _selector(fields: list[str] | None, default: list[str] | None = None) -> TextSelector:
    return TextSelector(fields or default or ["text"])


def _check_output_is_not_input(inputs: list[str], outputs: Iterable[str | None]) -> None:
    input_paths = {os.path.realpath(p) for p in inputs}
    for output in outputs:
        if output and os.path.realpath(output) in input_paths:
            raise ValueError(f"output {output} is also an input; write to a new file")


def _documents(args: argparse.Namespace, stats: ReadStats) -> Iterator[Document]:
    _check_output_is_not_input(args.input, (args.output, args.removed_output, args.removal_log))
    return read_documents(args.input, _selector(args.text_field), id_field=args.id_field,
                          skip_bad_records=args.skip_bad_records, stats=stats)


def _finish(args: argparse.Namespace, stats: ReadStats, counts: FilterCounts, extra: dict[str, Any]) -> None:
    report = {
        "command": args.command,
        "inputs": args.input,
        "output": args.output,
        "removed_output": args.removed_output,
        "removal_log": args.removal_log,
        "read": stats.to_dict(),
        **dataclasses.asdict(counts),
        **extra,
    }
    write_json(args.report, report)
    reasons = "".join(f", {reason} {n}" for reason, n in counts.removed_by_reason.items())
    print(f"{args.command}: read {stats.documents}, kept {counts.kept}, removed {counts.removed}{reasons}, "
          f"bad records {stats.bad_records} -> {args.output} (report {args.report})")


def cmd_train_quality(args: argparse.Namespace) -> None:
    from hephaestus_jax.clean.quality import FastTextParams, train_quality_classifier

    positive_stats, negative_stats = ReadStats(), ReadStats()
    params = FastTextParams(epoch=args.epoch, lr=args.lr, dim=args.dim, word_ngrams=args.word_ngrams,
                            min_count=args.min_count, bucket=args.bucket, threads=args.threads)

    def texts(paths: list[str], fields: list[str] | None, stats: ReadStats) -> Iterator[str]:
        selector = _selector(fields, args.text_field)
        for document in read_documents(paths, selector, skip_bad_records=args.skip_bad_records, stats=stats):
            yield document.text

    result = train_quality_classifier(
        texts(args.positive, args.positive_text_field, positive_stats),
        texts(args.negative, args.negative_text_field, negative_stats),
        args.model_output, threshold=args.threshold, heldout_fraction=args.heldout_fraction, seed=args.seed,
        params=params, shuffle_buckets=args.shuffle_buckets,
    )
    report = {"command": args.command, "positive_inputs": args.positive, "negative_inputs": args.negative,
              "read_positive": positive_stats.to_dict(), "read_negative": negative_stats.to_dict(),
              **result.to_dict()}
    write_json(args.report, report)
    metrics = result.heldout_metrics

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    print(f"train-quality: train {result.train_positive} pos / {result.train_negative} neg, held-out "
          f"{result.heldout_positive} pos / {result.heldout_negative} neg, at threshold {args.threshold}: "
          f"precision {fmt(metrics.precision)} recall {fmt(metrics.recall)} F1 {fmt(metrics.f1)}, bad records "
          f"{positive_stats.bad_records + negative_stats.bad_records} -> {args.model_output} (report {args.report})")


def _dedup_config(args: argparse.Namespace, prefix: str = "") -> Any:
    from hephaestus_jax.clean.dedup import DedupConfig

    def option(name: str) -> Any:
        return getattr(args, prefix + name)

    return DedupConfig(exact=not option("no_exact"), near=not option("no_near"), threshold=option("threshold"),
                       num_perm=option("num_perm"), shingle=option("shingle"), ngram=option("ngram"),
                       seed=option("seed"))


def _eval_index(args: argparse.Namespace, stats: ReadStats, prefix: str = "") -> Any:
    from hephaestus_jax.clean.decontaminate import build_eval_index

    return build_eval_index(args.eval, n=getattr(args, prefix + "ngram"), fmt=args.eval_format,
                            selector=_selector(args.eval_text_field), skip_bad_records=args.skip_bad_records,
                            stats=stats)


def run_beam(args: argparse.Namespace, steps: tuple[Any, ...], beam_args: list[str]) -> None:
    """Runs ``steps`` as one Beam job over ``--input``, then prints a summary of its report."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from hephaestus_jax.clean import beam as clean_beam

    if getattr(args, "removed_output", None) or getattr(args, "score_field", None):
        raise ValueError("--removed_output and --score_field are single-process options; with Beam every removed "
                         "document is in --removal_log")
    _check_output_is_not_input(args.input, (args.output, args.removal_log))
    job = clean_beam.CleanJob(
        inputs=tuple(args.input), steps=steps, output=args.output, report=args.report,
        read=clean_beam.ReadConfig(tuple(args.text_field or ["text"]), args.id_field, args.skip_bad_records),
        removal_log=args.removal_log, num_shards=args.num_shards)
    clean_beam.run(job, PipelineOptions(beam_args))
    with clean_beam.FileSystems.open(args.report) as handle:
        report = json.load(handle)
    def reasons(step: dict[str, Any]) -> str:
        return "".join(f", {reason} {n}" for reason, n in step["removed_by_reason"].items())

    steps = report["steps"]
    for step in steps if len(steps) > 1 else ():
        print(f"  {step['step']}: read {step['input']}, kept {step['kept']}, removed {step['removed']}{reasons(step)}")
    print(f"{args.command}: read {report['read']['documents']}, kept {report['kept']}, removed {report['removed']}"
          f"{reasons(steps[0]) if len(steps) == 1 else ''}, bad records {report['read']['bad_records']} -> "
          f"{len(report['output'])} shards of {args.output} (report {args.report})")


def cmd_filter_quality(args: argparse.Namespace, beam_args: list[str] | None = None) -> None:
    from hephaestus_jax.clean.quality import QualityClassifier, filter_by_quality

    if beam_args:
        from hephaestus_jax.clean.beam import QualityStep, load_classifier

        load_classifier(args.model)  # a missing or wrong model fails here, before the job starts
        run_beam(args, (QualityStep(args.model, args.threshold),), beam_args)
        return
    classifier = QualityClassifier.load(args.model)
    stats = ReadStats()
    decisions = filter_by_quality(_documents(args, stats), classifier, threshold=args.threshold)
    annotate = (lambda d: {args.score_field: d.details["quality_score"]}) if args.score_field else None
    counts = run_filter(decisions, args.output, removed_output=args.removed_output, removal_log=args.removal_log,
                        annotate=annotate)
    _finish(args, stats, counts, {"model": args.model, "threshold": args.threshold})


class _ReadAgain:
    """The input documents, read afresh on every iteration (dedup reads them twice); ``stats`` of the last read."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._args = args
        self.stats = ReadStats()

    def __iter__(self) -> Iterator[Document]:
        self.stats = ReadStats()
        return _documents(self._args, self.stats)


def cmd_dedup(args: argparse.Namespace, beam_args: list[str] | None = None) -> None:
    from hephaestus_jax.clean.dedup import deduplicate

    config = _dedup_config(args)
    if beam_args:
        from hephaestus_jax.clean.beam import DedupStep

        run_beam(args, (DedupStep(config),), beam_args)
        return
    documents = _ReadAgain(args)
    counts = run_filter(deduplicate(documents, config), args.output,
                        removed_output=args.removed_output, removal_log=args.removal_log)
    _finish(args, documents.stats, counts, {"config": dataclasses.asdict(config)})


def cmd_decontaminate(args: argparse.Namespace, beam_args: list[str] | None = None) -> None:
    from hephaestus_jax.clean.decontaminate import decontaminate

    eval_stats = ReadStats()
    index = _eval_index(args, eval_stats)
    if beam_args:
        from hephaestus_jax.clean.beam import DecontaminateStep

        run_beam(args, (DecontaminateStep(index),), beam_args)
        return
    hits: collections.Counter[str] = collections.Counter()

    def count_hits(decisions: Iterable[Decision]) -> Iterator[Decision]:
        for decision in decisions:
            if not decision.keep:
                hits[decision.details["eval_item"]] += 1
            yield decision

    stats = ReadStats()
    counts = run_filter(count_hits(decontaminate(_documents(args, stats), index)), args.output,
                        removed_output=args.removed_output, removal_log=args.removal_log)
    _finish(args, stats, counts, {
        "ngram": args.ngram, "eval_inputs": args.eval, "eval_read": eval_stats.to_dict(),
        "eval_index": dataclasses.asdict(index.stats), "removed_per_eval_item": dict(hits.most_common()),
    })


CLEAN_STEPS = ("quality", "dedup", "decontaminate")


def cmd_clean(args: argparse.Namespace, beam_args: list[str] | None = None) -> None:
    from hephaestus_jax.clean.beam import DecontaminateStep, DedupStep, QualityStep, load_classifier

    steps: list[Any] = []
    if "quality" in args.steps:
        if not args.quality_model:
            raise ValueError("the quality step needs --quality_model")
        load_classifier(args.quality_model)
        steps.append(QualityStep(args.quality_model, args.quality_threshold))
    if "dedup" in args.steps:
        steps.append(DedupStep(_dedup_config(args, "dedup_")))
    if "decontaminate" in args.steps:
        if not args.eval:
            raise ValueError("the decontaminate step needs --eval")
        steps.append(DecontaminateStep(_eval_index(args, ReadStats(), "decontaminate_")))
    run_beam(args, tuple(steps), beam_args or ["--runner", "DirectRunner"])


def _add_dedup_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument(f"--{prefix}threshold", type=float, default=0.8, help="Jaccard threshold for near duplicates")
    parser.add_argument(f"--{prefix}num_perm", type=int, default=128)
    parser.add_argument(f"--{prefix}shingle", choices=("word", "char"), default="word")
    parser.add_argument(f"--{prefix}ngram", type=int, default=5, help="shingle length in words or characters")
    parser.add_argument(f"--{prefix}seed", type=int, default=1, help="MinHash seed")
    parser.add_argument(f"--{prefix}no_exact", action="store_true", help="skip exact dedup")
    parser.add_argument(f"--{prefix}no_near", action="store_true", help="skip near-duplicate dedup")


def _add_eval_options(parser: argparse.ArgumentParser, prefix: str = "", required: bool = True) -> None:
    parser.add_argument("--eval", nargs="+", required=required, help="eval files: BFCL JSON lines, JSONL or .txt")
    parser.add_argument("--eval_format", choices=("auto", "bfcl", "jsonl", "text"), default="auto")
    parser.add_argument("--eval_text_field", action="append", help="text field paths of plain-JSONL eval files")
    parser.add_argument(f"--{prefix}ngram", type=int, default=13, help="n-gram length in normalised word tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--text_field", action="append",
                        help="field path of the text, repeatable (joined by newlines); default: text")
    common.add_argument("--skip_bad_records", action="store_true",
                        help="skip malformed lines (counted in the report) instead of failing")
    common.add_argument("--report", required=True, help="JSON report to write")

    filtering = argparse.ArgumentParser(add_help=False, parents=[common])
    filtering.add_argument("--input", nargs="+", required=True, help="input JSONL files (.gz ok), read in order")
    filtering.add_argument("--output", required=True, help="JSONL of kept records (.gz compresses)")
    filtering.add_argument("--removed_output", help="JSONL of removed records")
    filtering.add_argument("--removal_log", help="JSONL with one line per removed record: id, location, why")
    filtering.add_argument("--id_field", help="field path of a unique record id; default: file:line")
    filtering.add_argument("--num_shards", type=int, default=8, help="Beam only: output and removal log shards")

    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train-quality", parents=[common], help="train the fastText quality classifier")
    train.add_argument("--positive", nargs="+", required=True, help="high-quality (seed agent data) JSONL files")
    train.add_argument("--negative", nargs="+", required=True, help="general-text JSONL files")
    train.add_argument("--positive_text_field", action="append", help="text field paths of positives")
    train.add_argument("--negative_text_field", action="append", help="text field paths of negatives")
    train.add_argument("--model_output", required=True, help="fastText .bin model to write")
    train.add_argument("--threshold", type=float, default=0.5, help="P(pos) threshold for held-out metrics")
    train.add_argument("--heldout_fraction", type=float, default=0.1)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--epoch", type=int, default=5)
    train.add_argument("--lr", type=float, default=0.1)
    train.add_argument("--dim", type=int, default=100)
    train.add_argument("--word_ngrams", type=int, default=2)
    train.add_argument("--min_count", type=int, default=1)
    train.add_argument("--bucket", type=int, default=2_000_000, help="hash buckets for word n-grams")
    train.add_argument("--threads", type=int, default=1, help="> 1 is faster but not bit-reproducible")
    train.add_argument("--shuffle_buckets", type=int, default=16,
                       help="out-of-core shuffle buckets (memory ~ training data / this)")
    train.set_defaults(func=cmd_train_quality)

    quality = commands.add_parser("filter-quality", parents=[filtering], help="keep documents with P(pos) >= t")
    quality.add_argument("--model", required=True, help="fastText model from train-quality")
    quality.add_argument("--threshold", type=float, default=0.5)
    quality.add_argument("--score_field", help="if set, add P(pos) under this key to written records")
    quality.set_defaults(func=cmd_filter_quality)

    dedup = commands.add_parser("dedup", parents=[filtering], help="exact + MinHash-LSH near-duplicate removal")
    _add_dedup_options(dedup)
    dedup.set_defaults(func=cmd_dedup)

    decontam = commands.add_parser("decontaminate", parents=[filtering], help="n-gram overlap removal vs eval sets")
    _add_eval_options(decontam)
    decontam.set_defaults(func=cmd_decontaminate)

    clean = commands.add_parser("clean", parents=[filtering], help="quality, dedup, decontaminate as one Beam job")
    clean.add_argument("--steps", nargs="+", default=list(CLEAN_STEPS), choices=CLEAN_STEPS,
                       help="steps to run, always in this order")
    clean.add_argument("--quality_model", help="fastText model from train-quality (local or gs://)")
    clean.add_argument("--quality_threshold", type=float, default=0.5)
    _add_dedup_options(clean, "dedup_")
    _add_eval_options(clean, "decontaminate_", required=False)
    clean.set_defaults(func=cmd_clean)
    return parser


@command.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    if beam_args and (args.command == "train-quality" or not any(a.startswith("--runner") for a in beam_args)):
        parser.error(f"unrecognized arguments: {' '.join(beam_args)} (Beam options need --runner)")
    with command.input_errors(ValueError, OSError):  # The library's checks of the files and options given.
        if beam_args:
            args.func(args, beam_args)
        else:
            args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
