"""Corpus cleaning on Beam (DirectRunner): same decisions as the single-process stages, deterministic output
for any parallelism and input sharding, dedup memory bounded by a bucket, bad inputs named.

Beam start-up costs seconds, so the pipelines run once per module fixture and the tests share them.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from hephaestus_jax.clean import beam as clean_beam
from hephaestus_jax.clean.decontaminate import bfcl_protected_texts, build_eval_index, decontaminate
from hephaestus_jax.clean.dedup import DedupConfig, deduplicate
from hephaestus_jax.clean.jsonl import ReadStats, RecordError, TextSelector, read_documents
from hephaestus_jax.clean.quality import QualityClassifier, filter_by_quality, train_quality_classifier
from hephaestus_jax.clean.synthetic import synthetic_corpus
from hephaestus_jax.json_lines import read_json_lines
from test_clean import SMALL_FASTTEXT, prose_documents, tie_texts, tool_documents

REPO = Path(REPO_ROOT)
EVAL_FILES = sorted((REPO / "data" / "eval").glob("BFCL_v3_*.json"))
SAMPLE = REPO / "data" / "forge" / "trajectories" / "train-00000-of-00001.jsonl"
NUM_DOCS = 1200
BAD_LINES = 'not json\n{"id": "no-text"}\n'
DEDUP = DedupConfig()


def load_cli():
    spec = importlib.util.spec_from_file_location("clean_corpus_cli", REPO / "tools" / "clean_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def read_lines(paths) -> list[str]:
    lines = []
    for path in paths:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            lines.extend(handle.read().splitlines())
    return lines


def eval_texts() -> list[str]:
    texts = []
    for path in EVAL_FILES:
        for line in read_json_lines(path):
            texts.extend(bfcl_protected_texts(line.value))
    return texts


def single_process(paths, classifier, index, *, id_field, text_fields=("text",), skip_bad_records=True):
    """The single-process stages chained in memory: (kept ids in order, {id: removal entry}, read stats)."""
    stats = ReadStats()
    documents = list(read_documents(paths, TextSelector(text_fields), id_field=id_field,
                                    skip_bad_records=skip_bad_records, stats=stats))
    removed = {}
    for step, stage in (("quality", lambda docs: filter_by_quality(docs, classifier, threshold=0.5)),
                        ("dedup", lambda docs: deduplicate(docs, DEDUP)),
                        ("decontaminate", lambda docs: decontaminate(docs, index))):
        kept = []
        for decision in stage(documents):
            if decision.keep:
                kept.append(decision.document)
            else:
                document = decision.document
                removed[document.id] = {"id": document.id, "location": document.location, "step": step,
                                        **decision.details}
        documents = kept
    return [d.id for d in documents], removed, stats


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("quality") / "quality.bin"
    positives = tool_documents()
    train_quality_classifier(iter(positives), iter(prose_documents(len(positives))), path, seed=0,
                             params=SMALL_FASTTEXT)
    return path


@pytest.fixture(scope="module")
def index():
    return build_eval_index(EVAL_FILES)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """The synthetic corpus as one file, and the same records shuffled into three files (one gzip) plus an
    empty file; both layouts end with the same two bad lines."""
    root = tmp_path_factory.mktemp("corpus")
    records = list(synthetic_corpus(NUM_DOCS, seed=3, eval_texts=eval_texts()))
    lines = [json.dumps(record) + "\n" for record in records]
    (root / "whole.jsonl").write_text("".join(lines) + BAD_LINES, encoding="utf-8")
    parts = root / "parts"
    parts.mkdir()
    random.Random(0).shuffle(lines)
    (parts / "a.jsonl").write_text("".join(lines[0::3]), encoding="utf-8")
    (parts / "b.jsonl").write_text("".join(lines[1::3]) + BAD_LINES, encoding="utf-8")
    (parts / "c.jsonl.gz").write_bytes(gzip.compress("".join(lines[2::3]).encode()))
    (parts / "empty.jsonl").write_text("", encoding="utf-8")
    return root / "whole.jsonl", parts, records


def _job(inputs, out: Path, classifier_path, index) -> clean_beam.CleanJob:
    steps = (clean_beam.QualityStep(str(classifier_path)), clean_beam.DedupStep(DEDUP),
             clean_beam.DecontaminateStep(index))
    return clean_beam.CleanJob(inputs=tuple(inputs), steps=steps, output=str(out / "kept.jsonl.gz"),
                               report=str(out / "report.json"), removal_log=str(out / "removed.jsonl"),
                               read=clean_beam.ReadConfig(id_field="id", skip_bad_records=True), num_shards=3)


@pytest.fixture(scope="module")
def beam_runs(corpus, classifier_path, index, tmp_path_factory):
    """The corpus cleaned twice: one file on one worker, and three shuffled files on two workers."""
    whole, parts, _ = corpus
    one, two = tmp_path_factory.mktemp("one_worker"), tmp_path_factory.mktemp("two_workers")
    result = clean_beam.run(_job([str(whole)], one, classifier_path, index),
                            clean_beam.PipelineOptions(["--direct_num_workers", "1"]))
    clean_beam.run(_job([f"{parts}/*.jsonl*"], two, classifier_path, index), clean_beam.PipelineOptions(
        ["--direct_num_workers", "2", "--direct_running_mode", "multi_threading"]))
    return one, two, result


def test_output_is_the_same_for_any_workers_and_input_sharding(beam_runs):
    one, two, _ = beam_runs
    names = sorted(p.name for p in one.iterdir())
    assert names == ["kept-0000{}-of-00003.jsonl.gz".format(i) for i in range(3)] + [
        "removed-0000{}-of-00003.jsonl".format(i) for i in range(3)] + ["report.json"]
    assert names == sorted(p.name for p in two.iterdir())
    for name in names[:3]:  # kept lines: the same bytes
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    for name in names[3:6]:  # removal log: the same entries in the same order, but from other files and lines
        logs = [[{k: v for k, v in json.loads(line).items() if k != "location"} for line in read_lines([run / name])]
                for run in (one, two)]
        assert logs[0] == logs[1] and logs[0], name
    reports = [json.loads((run / "report.json").read_text()) for run in (one, two)]
    for report in reports:
        for key in ("inputs", "output", "removal_log"):
            report.pop(key)
        report["read"].pop("bad_record_examples")
    assert reports[0] == reports[1]
    assert reports[0]["read"]["bad_records"] == 2 and reports[0]["read"]["documents"] == NUM_DOCS


def test_beam_decisions_equal_single_process_decisions(beam_runs, corpus, classifier_path, index):
    one, _, _ = beam_runs
    kept_ids, removed, stats = single_process([corpus[0]], QualityClassifier.load(classifier_path), index,
                                              id_field="id")
    beam_kept = read_lines(sorted(one.glob("kept-*")))
    beam_removed = {entry["id"]: entry for entry in map(json.loads, read_lines(sorted(one.glob("removed-*"))))}
    assert sorted(json.loads(line)["id"] for line in beam_kept) == sorted(kept_ids)
    assert beam_removed == removed
    steps = {step["step"]: step for step in json.loads((one / "report.json").read_text())["steps"]}
    for step in ("quality", "dedup", "decontaminate"):
        assert steps[step]["removed"] == sum(entry["step"] == step for entry in removed.values()) > 0, step
    assert stats.documents == len(kept_ids) + len(removed)  # nothing dropped silently: kept or logged


def test_planted_duplicates_and_leaks_are_removed_and_nothing_else(beam_runs, corpus):
    one, _, _ = beam_runs
    removed = {entry["id"]: entry for entry in map(json.loads, read_lines(sorted(one.glob("removed-*"))))}
    records = {record["id"]: record for record in corpus[2]}
    survived_quality = {doc_id for doc_id in records if removed.get(doc_id, {}).get("step") != "quality"}
    found = {"exact": 0, "near": 0, "leak": 0}
    expected = dict(found)
    for doc_id, record in records.items():
        entry = removed.get(doc_id, {})
        if entry.get("step") in ("dedup", "decontaminate"):  # no false positive: only planted ones go
            assert record["planted"], (doc_id, entry)
        kind, _, source = (record["planted"] or "::").partition(":")
        if not kind or doc_id not in survived_quality:
            continue
        if kind == "leak":
            expected[kind] += 1
            found[kind] += entry.get("step") == "decontaminate"
        elif source in survived_quality:
            expected[kind] += 1
            found[kind] += entry.get("reason") == kind and entry["duplicate_of"] == source
    assert min(expected.values()) >= 5, expected
    assert found["exact"] == expected["exact"] and found["leak"] == expected["leak"], (found, expected)
    assert found["near"] >= 0.9 * expected["near"], (found, expected)  # LSH recall at Jaccard ~0.9


def test_beam_dedup_breaks_a_similarity_tie_as_the_single_process_path_does(tmp_path):
    """A document equally similar to two kept ones: Beam names the same one (the lower id) as `deduplicate`."""
    texts = tie_texts()
    path = tmp_path / "tie.jsonl"
    path.write_text("".join(json.dumps({"id": doc_id, "text": text}) + "\n" for doc_id, text in texts.items()),
                    encoding="utf-8")
    job = clean_beam.CleanJob(inputs=(str(path),), steps=(clean_beam.DedupStep(DEDUP),),
                              output=str(tmp_path / "kept.jsonl"), report=str(tmp_path / "report.json"),
                              removal_log=str(tmp_path / "removed.jsonl"),
                              read=clean_beam.ReadConfig(id_field="id"), num_shards=1)
    clean_beam.run(job, clean_beam.PipelineOptions(["--direct_num_workers", "1"]))
    documents = list(read_documents([path], TextSelector(("text",)), id_field="id"))
    [single] = [decision for decision in deduplicate(documents, DEDUP) if not decision.keep]
    [entry] = map(json.loads, read_lines(tmp_path.glob("removed-*")))
    assert entry == {"id": "c", "location": single.document.location, "step": "dedup", **single.details}
    assert entry["duplicate_of"] == "a"


def test_dedup_holds_one_bucket_not_the_corpus(beam_runs):
    """What a dedup worker holds at once: one exact group or one band bucket (Beam metrics, the largest)."""
    _, _, result = beam_runs
    largest = {m.key.metric.name: m.committed.max for m in result.metrics().query()["distributions"]
               if m.key.metric.namespace == "dedup"}
    assert set(largest) == {"exact_group_size", "bucket_size"}
    assert largest["exact_group_size"] <= 3 and largest["bucket_size"] <= 3, largest  # planted clusters
    assert NUM_DOCS > 100 * max(largest.values())


def test_cli_clean_on_the_bundled_sample_equals_single_process(tmp_path, classifier_path):
    """The bundled Forge sample (trajectories: templated, so dedup finds clusters), clean on Beam
    through the CLI vs the single-process stages, with 8-token n-grams so that BFCL overlaps exist."""
    out = tmp_path / "out"
    cli = load_cli()
    assert cli.main(["clean", "--input", str(SAMPLE), "--output", str(out / "kept.jsonl"), "--text_field",
                     "query", "--text_field", "final_answer", "--quality_model", str(classifier_path), "--eval", *map(str, EVAL_FILES),
                     "--decontaminate_ngram", "8", "--report", str(out / "report.json"), "--removal_log",
                     str(out / "removed.jsonl"), "--num_shards", "2", "--runner", "DirectRunner"]) == 0
    kept_ids, removed, _ = single_process([SAMPLE], QualityClassifier.load(classifier_path),
                                          build_eval_index(EVAL_FILES, n=8), id_field=None,
                                          text_fields=("query", "final_answer"), skip_bad_records=False)
    sample_lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    assert sorted(read_lines(sorted(out.glob("kept-*")))) == sorted(
        sample_lines[int(doc_id.rsplit(":", 1)[1]) - 1] for doc_id in kept_ids)
    assert {e["id"]: e for e in map(json.loads, read_lines(sorted(out.glob("removed-*"))))} == removed
    report = json.loads((out / "report.json").read_text())
    assert [step["removed"] for step in report["steps"]] == [
        sum(entry["step"] == step for entry in removed.values()) for step in ("quality", "dedup", "decontaminate")]
    assert report["steps"][1]["removed"] > 0 and report["steps"][2]["removed"] > 0


def test_malformed_line_stops_the_beam_job_naming_file_and_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "fine"}\n' + BAD_LINES, encoding="utf-8")
    job = clean_beam.CleanJob(inputs=(str(path),), steps=(clean_beam.DedupStep(),), output=str(tmp_path / "o.jsonl"),
                              report=str(tmp_path / "report.json"), num_shards=1)
    with pytest.raises(RecordError, match=rf"{path}:2: invalid JSON"):
        clean_beam.run(job)
    assert not (tmp_path / "report.json").exists()


def test_duplicate_ids_stop_the_beam_dedup_naming_both_lines(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"id": "x", "text": "one text"}\n{"id": "y", "text": "two"}\n{"id": "x", "text": "three"}\n',
                    encoding="utf-8")
    job = clean_beam.CleanJob(inputs=(str(path),), steps=(clean_beam.DedupStep(),), output=str(tmp_path / "o.jsonl"),
                              report=str(tmp_path / "report.json"), read=clean_beam.ReadConfig(id_field="id"),
                              num_shards=1)
    with pytest.raises(ValueError, match=rf"{path}:3: document id 'x' also at {path}:1"):
        clean_beam.run(job)


def test_empty_input_gives_empty_shards_and_a_zero_report(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl.gz"
    empty.write_bytes(gzip.compress(b""))
    out = tmp_path / "out"
    assert load_cli().main(["dedup", "--input", str(empty), "--output", str(out / "kept.jsonl"), "--report",
                            str(out / "report.json"), "--num_shards", "2", "--runner", "DirectRunner"]) == 0
    assert [p.read_bytes() for p in sorted(out.glob("kept-*"))] == [b"", b""]
    report = json.loads((out / "report.json").read_text())
    assert (report["read"]["documents"], report["kept"], report["removed"]) == (0, 0, 0)
    assert "dedup: read 0, kept 0, removed 0" in capsys.readouterr().out


def test_bad_inputs_fail_before_the_job_with_a_clear_error(tmp_path, capsys):
    import fasttext

    cli = load_cli()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "one"}\n', encoding="utf-8")
    common = ["--output", str(tmp_path / "out.jsonl"), "--report", str(tmp_path / "report.json"),
              "--runner", "DirectRunner"]
    train = tmp_path / "train.txt"
    train.write_text("__label__a one two three\n__label__b four five six\n" * 20, encoding="utf-8")
    wrong = tmp_path / "wrong.bin"
    fasttext.train_supervised(str(train), verbose=0, thread=1, bucket=1000, dim=4, seed=0).save_model(str(wrong))
    unknown_eval = tmp_path / "eval.csv"
    unknown_eval.write_text("question,answer\n", encoding="utf-8")
    cases = {
        "expected a fastText model with labels": ["clean", "--input", str(corpus), "--steps", "quality",
                                                  "--quality_model", str(wrong)],
        f"{unknown_eval}: unknown eval file format": ["decontaminate", "--input", str(corpus), "--eval",
                                                      str(unknown_eval)],
        f"no file matches the pattern(s): {tmp_path}/missing-*.jsonl": ["dedup", "--input", f"{tmp_path}/missing-*.jsonl"],
    }
    for message, args in cases.items():
        capsys.readouterr()
        assert cli.main(args + common) == 2, args  # Bad input: one line, exit 2.
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "report.json").exists()
