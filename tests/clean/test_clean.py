"""Tests for hephaestus_jax.clean (quality classifier, dedup, decontamination) and its CLI."""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import inspect
import itertools
import json
import os
import random
import re
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from hephaestus_jax.clean.decontaminate import (
    EvalItem,
    EvalNgramIndex,
    bfcl_protected_texts,
    build_eval_index,
    decontaminate,
    word_tokens,
)
from hephaestus_jax.clean.dedup import DedupConfig, Fingerprinter, deduplicate, estimated_jaccard
from hephaestus_jax.clean.jsonl import (
    Document,
    JsonlWriter,
    ReadStats,
    RecordError,
    TextSelector,
    read_documents,
)
from hephaestus_jax.clean.quality import (
    FastTextParams,
    QualityClassifier,
    fasttext_line,
    filter_by_quality,
    is_heldout,
    train_quality_classifier,
)

REPO = Path(REPO_ROOT)
FIXTURES = REPO / "tests" / "fixtures" / "clean"
CLI = REPO / "tools" / "clean_corpus.py"
FASTTEXT_MAGIC = 793712314  # first int32 of every fastText binary model (FASTTEXT_FILEFORMAT_MAGIC_INT32)
SMALL_FASTTEXT = FastTextParams(epoch=25, lr=0.5, dim=32, word_ngrams=2, bucket=50_000, threads=1)


# ----------------------------------------------------------------------------- corpora for the tests

_DOC_MODULES = (
    "json", "os.path", "re", "textwrap", "statistics", "string", "shutil", "glob", "fnmatch", "difflib", "csv",
    "base64", "urllib.parse", "random", "functools", "heapq", "bisect", "zlib", "gzip", "calendar", "html",
    "uuid", "ipaddress", "tempfile", "copy", "pprint", "inspect", "tarfile", "zipfile", "email.utils", "colorsys",
    "struct", "math", "itertools", "operator", "datetime", "ast", "tokenize",
)


def tool_documents() -> list[str]:
    """Agent-style positives rendered from real stdlib functions: JSON tool schemas, API docs, tool calls."""
    documents = []
    for module_name in _DOC_MODULES:
        module = importlib.import_module(module_name)
        for name, function in inspect.getmembers(module, callable):
            doc = inspect.getdoc(function)
            if name.startswith("_") or inspect.isclass(function) or not doc or len(doc.split()) < 5:
                continue
            try:
                signature = inspect.signature(function)
            except (TypeError, ValueError):
                continue
            qualified = f"{module_name}.{name}"
            summary = doc.split("\n\n")[0].replace("\n", " ")
            properties = {
                p.name: {"type": "string" if p.annotation is inspect.Parameter.empty else str(p.annotation),
                         "description": f"The {p.name.replace('_', ' ')} argument of {qualified}."}
                for p in signature.parameters.values()
            }
            required = [p.name for p in signature.parameters.values() if p.default is inspect.Parameter.empty]
            style = len(documents) % 3
            if style == 0:
                documents.append(json.dumps({"name": qualified, "description": summary, "parameters": {
                    "type": "object", "properties": properties, "required": required}}))
            elif style == 1:
                documents.append(f"{qualified}{re.sub(r' at 0x[0-9a-f]+', '', str(signature))}\n{doc}")
            else:
                arguments = {p: f"<{p}>" for p in required}
                documents.append(
                    f"User: I need to {summary[0].lower()}{summary[1:]}\n"
                    f"Assistant: <tool_call>{json.dumps({'name': qualified, 'arguments': arguments})}</tool_call>")
    return documents


def prose_documents(count: int, seed: int = 0) -> list[str]:
    """General-text negatives: 2-4 sentences drawn from hand-written everyday paragraphs."""
    paragraphs = (FIXTURES / "general_prose.txt").read_text(encoding="utf-8").splitlines()
    sentences = [s for p in paragraphs for s in re.split(r"(?<=[.!?])\s+", p) if s]
    rng = random.Random(seed)
    return paragraphs + [" ".join(rng.sample(sentences, rng.randint(2, 4))) for _ in range(count - len(paragraphs))]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def docs_from_texts(texts: list[str]) -> Iterator[Document]:
    for i, text in enumerate(texts):
        yield Document(source="mem", line=i + 1, raw=json.dumps({"text": text}), record={"text": text}, text=text,
                       id=f"doc-{i}")


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, env=env, cwd=REPO)
    if check:
        assert result.returncode == 0, result.stderr
    return result


# ----------------------------------------------------------------------------- jsonl

def test_text_selector_resolves_field_paths_and_names_bad_fields():
    record = {"title": "T", "messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": None, "tool_calls": []},
                                         {"role": "tool", "content": "42"}]}
    assert TextSelector(["title", "messages.*.content"])(record) == "T\nhi\n42"
    assert TextSelector(["messages.2.content"])(record) == "42"
    with pytest.raises(ValueError, match="field 'body' is missing"):
        TextSelector(["body"])(record)
    with pytest.raises(ValueError, match="field 'messages' must be a string"):
        TextSelector(["messages"])(record)
    with pytest.raises(ValueError, match="no string found"):
        TextSelector(["messages.*.name"])(record)


def test_malformed_line_fails_with_file_and_line():
    path = FIXTURES / "malformed.jsonl"
    with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}:3: "):
        list(read_documents([path], TextSelector()))


def test_skip_bad_records_counts_them():
    stats = ReadStats()
    documents = list(read_documents([FIXTURES / "malformed.jsonl"], TextSelector(), id_field="id",
                                    skip_bad_records=True, stats=stats))
    assert [d.id for d in documents] == ["a", "b", "e"]
    assert [d.line for d in documents] == [1, 2, 5]
    assert stats.documents == 3 and stats.bad_records == 2
    assert stats.bad_record_examples[0].startswith(f"{FIXTURES / 'malformed.jsonl'}:3: ")
    assert stats.bad_record_examples[1] == f"{FIXTURES / 'malformed.jsonl'}:4: field 'text' is missing"


def test_each_kind_of_bad_line_is_named(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b'{"text": "one"}\n\xff\xfe\n[1, 2]\n   \n{"text": 3}\n{"text": "six"}\n')
    stats = ReadStats()
    documents = list(read_documents([path], TextSelector(), skip_bad_records=True, stats=stats))
    assert [d.location for d in documents] == [f"{path}:1", f"{path}:6"]
    assert (stats.documents, stats.blank_lines, stats.bad_records) == (2, 1, 3)
    assert [m.split(": ", 1)[1] for m in stats.bad_record_examples] == [
        "invalid UTF-8: byte 0xff at byte offset 16 of the file",
        "expected a JSON object, got array",
        "field 'text' must be a string, got int",
    ]


def test_gzip_writer_round_trip_and_atomic_failure(tmp_path):
    path = tmp_path / "out.jsonl.gz"
    with JsonlWriter(path) as writer:
        writer.write({"text": "héllo"})
        writer.write_raw('{"text": "raw line"}')
    assert [d.text for d in read_documents([path], TextSelector())] == ["héllo", "raw line"]
    failed = tmp_path / "failed.jsonl"
    with pytest.raises(RuntimeError):
        with JsonlWriter(failed) as writer:
            writer.write({"text": "partial"})
            raise RuntimeError("stage crashed")
    assert not failed.exists() and not (tmp_path / "failed.jsonl.tmp").exists()


def test_truncated_gzip_names_the_file(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl.gz", [{"text": f"record {i} " * 50} for i in range(200)])
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}:\d+: cannot read the file"):
        list(read_documents([path], TextSelector()))


# ----------------------------------------------------------------------------- quality

def test_fasttext_line_is_one_line_without_injected_labels():
    line = fasttext_line("Title\n\nbody\twith  tabs\r\n__label__pos sneaky\x00end")
    assert line == "Title body with tabs _label_pos sneaky end"


def test_heldout_split_is_deterministic_and_seeded():
    texts = [f"document number {i}" for i in range(2000)]
    first = [is_heldout(t, seed=3, heldout_fraction=0.2) for t in texts]
    assert first == [is_heldout(t, seed=3, heldout_fraction=0.2) for t in texts]
    assert first != [is_heldout(t, seed=4, heldout_fraction=0.2) for t in texts]
    assert 0.15 < sum(first) / len(texts) < 0.25


@pytest.fixture(scope="module")
def trained_quality_model(tmp_path_factory) -> tuple[Path, object]:
    model_path = tmp_path_factory.mktemp("quality") / "quality.bin"
    positives = tool_documents()
    report = train_quality_classifier(iter(positives), iter(prose_documents(len(positives))), model_path,
                                      heldout_fraction=0.2, seed=0, params=SMALL_FASTTEXT)
    return model_path, report


def test_quality_classifier_separates_tool_docs_from_prose(trained_quality_model):
    model_path, report = trained_quality_model
    assert report.heldout_positive >= 50 and report.heldout_negative >= 50
    assert report.train_positive >= 250 and report.train_negative >= 250
    metrics = report.heldout_metrics
    assert metrics.precision >= 0.95 and metrics.recall >= 0.95, metrics.to_dict()
    with open(model_path, "rb") as handle:  # fastText's own binary format, not a pickle
        assert struct.unpack("<i", handle.read(4))[0] == FASTTEXT_MAGIC


def test_quality_filter_keeps_unseen_agent_docs_and_removes_prose(trained_quality_model):
    classifier = QualityClassifier.load(trained_quality_model[0])
    documents = read_documents([FIXTURES / "quality_mixed.jsonl"], TextSelector(), id_field="id")
    decisions = list(filter_by_quality(documents, classifier, threshold=0.5))
    kept = {d.document.record["kind"] for d in decisions if d.keep}
    removed = {d.document.record["kind"] for d in decisions if not d.keep}
    assert kept == {"agent"} and removed == {"general"}
    assert sum(d.keep for d in decisions) == 8
    assert all(0.0 <= d.details["quality_score"] <= 1.0 for d in decisions)
    assert classifier.positive_probability(" \n\t ") == 0.0


def test_quality_training_is_reproducible(tmp_path):
    positives, negatives = tool_documents()[:120], prose_documents(120)
    probe = [PARAGRAPH, OTHER, positives[0]]
    scores = []
    for run in range(2):
        train_quality_classifier(iter(positives), iter(negatives), tmp_path / f"run{run}.bin", seed=5,
                                 params=SMALL_FASTTEXT)
        classifier = QualityClassifier.load(tmp_path / f"run{run}.bin")
        scores.append([classifier.positive_probability(text) for text in probe])
    assert scores[0] == scores[1]


def test_quality_model_with_other_labels_is_rejected(tmp_path):
    import fasttext

    train = tmp_path / "train.txt"
    train.write_text("__label__a one two three\n__label__b four five six\n" * 20, encoding="utf-8")
    model = fasttext.train_supervised(str(train), verbose=0, thread=1, bucket=1000, dim=4, seed=0)
    with pytest.raises(ValueError, match="expected a fastText model with labels"):
        QualityClassifier(model)
    not_a_model = tmp_path / "model.bin"
    not_a_model.write_bytes(b"\x80\x04\x95 pickled bytes, not a fastText model")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(not_a_model))}: not a fastText model file"):
        QualityClassifier.load(not_a_model)


# ----------------------------------------------------------------------------- dedup

PARAGRAPH = (
    "The calendar tool lets an agent create, move and cancel meetings on behalf of a user. Each call takes "
    "a title, a start time in ISO 8601 format, a duration in minutes and an optional list of attendees. When "
    "the requested slot overlaps an existing meeting the tool returns a conflict error together with the three "
    "nearest free slots, so that the agent can ask the user which alternative they prefer before trying again. "
    "Cancelled meetings stay visible in the history for thirty days and can be restored with a single call."
)
EDITED = (PARAGRAPH.replace("move and cancel", "move or cancel").replace("three nearest", "two nearest")
          .replace("thirty days", "sixty days"))
OTHER = ("A completely different text about baking sourdough bread at home: feed the starter the night before, "
         "mix flour, water and salt in the morning, fold the dough every half hour and bake it in a hot oven.")


def word_shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    """Reference Jaccard of lower-cased word 5-gram sets, computed independently of dedup.py."""
    def grams(text: str) -> set[tuple[str, ...]]:
        words = re.findall(r"\w+", text.lower())
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}
    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y)


def test_exact_duplicates_removed_lowest_id_kept():
    texts = [PARAGRAPH, OTHER, "  " + PARAGRAPH.upper().replace(" ", "\n"), OTHER, "third, distinct document"]
    decisions = list(deduplicate(list(docs_from_texts(texts)), DedupConfig(near=False)))
    assert [d.keep for d in decisions] == [True, True, False, False, True]
    assert decisions[2].details == {"reason": "exact", "duplicate_of": "doc-0"}
    assert decisions[3].details == {"reason": "exact", "duplicate_of": "doc-1"}


def test_near_duplicate_removed_at_threshold_and_kept_above_its_similarity():
    similarity = word_shingle_jaccard(PARAGRAPH, EDITED)
    assert 0.6 < similarity < 0.85  # a few words changed: similar, not identical
    texts = [PARAGRAPH, OTHER, EDITED]
    below = list(deduplicate(list(docs_from_texts(texts)), DedupConfig(threshold=similarity - 0.15, num_perm=256)))
    assert [d.keep for d in below] == [True, True, False]
    assert below[2].details["reason"] == "near" and below[2].details["duplicate_of"] == "doc-0"
    assert abs(below[2].details["estimated_jaccard"] - similarity) < 0.1
    above = list(deduplicate(list(docs_from_texts(texts)),
                           DedupConfig(threshold=min(1.0, similarity + 0.15), num_perm=256)))
    assert [d.keep for d in above] == [True, True, True]


def test_near_dedup_with_character_shingles_and_determinism():
    texts = [OTHER, PARAGRAPH, EDITED, PARAGRAPH.replace("agent", "assistant")]
    config = DedupConfig(threshold=0.5, shingle="char", ngram=7, num_perm=128, seed=7)
    first = [(d.keep, d.details) for d in deduplicate(list(docs_from_texts(texts)), config)]
    assert [keep for keep, _ in first] == [True, True, False, False]
    assert all(details["duplicate_of"] == "doc-1" for keep, details in first if not keep)
    assert first == [(d.keep, d.details) for d in deduplicate(list(docs_from_texts(texts)), config)]


def test_dedup_decisions_do_not_depend_on_input_order():
    """The lowest id of a cluster stays, wherever it comes in the input; a chain A~B~C removes B and C."""
    texts = {"b": PARAGRAPH, "a": EDITED, "c": PARAGRAPH.replace("agent", "assistant"), "d": OTHER,
             "e": PARAGRAPH.upper(), "f": OTHER + " "}
    config = DedupConfig(threshold=0.5, num_perm=256)

    def decisions(order: list[str]) -> dict[str, tuple[bool, dict]]:
        documents = [Document(source="mem", line=i, raw="{}", record={}, text=texts[doc_id], id=doc_id)
                     for i, doc_id in enumerate(order)]
        return {d.document.id: (d.keep, d.details) for d in deduplicate(documents, config)}

    first = decisions(sorted(texts))
    assert {doc_id for doc_id, (keep, _) in first.items() if keep} == {"a", "d"}
    assert first["e"][1] == {"reason": "exact", "duplicate_of": "b"}
    assert first["f"][1] == {"reason": "exact", "duplicate_of": "d"}
    assert first["b"][1]["duplicate_of"] == "a" and first["c"][1]["reason"] == "near"
    for seed in range(3):
        order = sorted(texts)
        random.Random(seed).shuffle(order)
        assert decisions(order) == first, order


def tie_texts() -> dict[str, str]:
    """Three documents for the default DedupConfig: "c" (PARAGRAPH) is equally similar (estimated) to "a" and
    "b" (one word of PARAGRAPH replaced each), which are not near duplicates of each other."""
    words = PARAGRAPH.split()
    a, b = list(words), list(words)
    a[3], b[19] = "zebra", "walrus"
    return {"b": " ".join(b), "c": PARAGRAPH, "a": " ".join(a)}


def test_a_document_equally_similar_to_two_kept_ones_is_a_duplicate_of_the_lower_id():
    texts = tie_texts()
    fingerprint = Fingerprinter(DedupConfig())
    signatures = {doc_id: fingerprint(doc_id, text).signature for doc_id, text in texts.items()}
    similarity = estimated_jaccard(signatures["c"], signatures["a"])
    assert similarity == estimated_jaccard(signatures["c"], signatures["b"]) >= 0.8  # The tie ...
    assert estimated_jaccard(signatures["a"], signatures["b"]) < 0.8  # ... between two kept documents.
    for order in itertools.permutations(texts):
        documents = [Document(source="mem", line=i, raw="{}", record={}, text=texts[doc_id], id=doc_id)
                     for i, doc_id in enumerate(order)]
        decisions = {d.document.id: (d.keep, d.details) for d in deduplicate(documents, DedupConfig())}
        assert decisions == {"a": (True, {}), "b": (True, {}), "c": (False, {
            "reason": "near", "duplicate_of": "a", "estimated_jaccard": similarity})}, order


def test_dedup_rejects_duplicate_ids():
    documents = list(docs_from_texts([PARAGRAPH, OTHER]))
    documents.append(dataclasses.replace(documents[1], line=9))
    with pytest.raises(ValueError, match=r"^mem:9: document id 'doc-1' also at mem:2"):
        list(deduplicate(documents))


# ----------------------------------------------------------------------------- decontamination

@pytest.fixture(scope="module")
def bfcl_index() -> EvalNgramIndex:
    return build_eval_index([FIXTURES / "bfcl_eval.jsonl", FIXTURES / "eval_prompts.txt"])


CONTAMINATED = {
    # 13 tokens of simple_7's user question, with different case and punctuation
    "user_13gram": "Yesterday a customer wrote: I NEED to know, the total cost of a loan of 25000 dollars! "
                   "We replied by phone.",
    # 13+ tokens of a parameter description of simple_7's function
    "param_description": "Docs say: the annual interest rate expressed as a percentage, for example 4.5 for four.",
    "system_message": "Prompt: you are a travel assistant that helps users plan trips, book hotels and compare "
                      "flight prices.",
    "nested_items_description": "one guest on the booking, given with the full name exactly as it appears on the "
                                "passport",
    "second_turn_user": "Now compress the archive folder into a single zip file named reports backup please, ok?",
    "text_eval_line": "Task: write a short poem about the ocean at night, mentioning the moon, the tide and more.",
}
CLEAN = {
    # only 12 tokens of the user question, then it diverges
    "user_12gram": "Yesterday a customer wrote: I need to know the total cost of a loan of 25000 euros today.",
    # the assistant message of multi_turn_base_4 is not protected
    "assistant_message": "I have moved the report files and the documents folder now only contains the budget "
                         "spreadsheet.",
    # function names are not protected
    "function_name": "finance calculate loan cost hotels book room mv finance calculate loan cost hotels book room",
    "unrelated": "The village market opens at dawn on Saturdays with apples, cheese and bread for everyone.",
}


def test_bfcl_protected_texts_are_user_system_and_descriptions():
    record = json.loads((FIXTURES / "bfcl_eval.jsonl").read_text(encoding="utf-8").splitlines()[1])
    assert bfcl_protected_texts(record) == [
        "You are a travel assistant that helps users plan trips, book hotels and compare flight prices across "
        "many different airlines.",
        "Book me a hotel room in Lisbon for three nights starting on the twelfth of May, under 150 euros per night.",
        "Book a hotel room.",
        "City where the hotel is located.",
        "One guest on the booking, given with the full name exactly as it appears on the passport or identity card.",
    ]


def test_word_tokens_normalise_case_and_punctuation():
    assert word_tokens("Find the AREA, of a ｔriangle—now!") == ["find", "the", "area", "of", "a", "triangle", "now"]


def test_decontamination_removes_13gram_overlaps_and_keeps_12gram(bfcl_index):
    names = list(CONTAMINATED) + list(CLEAN)
    texts = list(CONTAMINATED.values()) + list(CLEAN.values())
    decisions = dict(zip(names, decontaminate(docs_from_texts(texts), bfcl_index)))
    assert {n for n, d in decisions.items() if not d.keep} == set(CONTAMINATED)
    user = decisions["user_13gram"].details
    assert user["eval_item"] == "simple_7"
    assert user["eval_location"] == f"{FIXTURES / 'bfcl_eval.jsonl'}:1"
    assert user["ngram"] == "i need to know the total cost of a loan of 25000 dollars"
    assert decisions["system_message"].details["eval_item"] == "live_multiple_3-1-0"
    assert decisions["second_turn_user"].details["eval_item"] == "multi_turn_base_4"
    text_item = decisions["text_eval_line"].details
    assert text_item["eval_item"] == text_item["eval_location"] == f"{FIXTURES / 'eval_prompts.txt'}:1"


def test_ngram_length_is_configurable_and_short_pieces_are_counted():
    index = EvalNgramIndex(n=12)
    index.add(EvalItem("q", "eval:1"), ["I need to know the total cost of a loan of 25000 dollars", "too short"])
    assert index.stats.pieces == 2 and index.stats.short_pieces == 1
    assert index.first_match(CLEAN["user_12gram"]) is not None
    assert EvalNgramIndex(n=13).first_match(CLEAN["user_12gram"]) is None


# ----------------------------------------------------------------------------- streaming

def counting_documents(limit: int, pulled: list[int]) -> Iterator[Document]:
    """An endless-looking document stream that fails if a stage reads more than ``limit`` documents."""
    for i in itertools.count():
        assert i < limit, "stage materialised its input instead of streaming it"
        pulled[0] = i + 1
        yield from docs_from_texts([f"streamed document {i} " + OTHER])


def test_stages_are_lazy_iterators(trained_quality_model, bfcl_index):
    classifier = QualityClassifier.load(trained_quality_model[0])
    stages = {
        "quality": lambda docs: filter_by_quality(docs, classifier, threshold=0.5),
        "decontaminate": lambda docs: decontaminate(docs, bfcl_index),
    }
    for name, stage in stages.items():
        pulled = [0]
        decisions = stage(counting_documents(1000, pulled))
        assert iter(decisions) is decisions, name
        assert len(list(itertools.islice(decisions, 3))) == 3
        assert pulled[0] == 3, (name, pulled[0])
    with pytest.raises(TypeError, match="reads its documents twice"):  # dedup's keep rule needs two passes
        deduplicate(counting_documents(1000, [0]), DedupConfig())


def test_decontamination_memory_does_not_grow_with_corpus_size(tmp_path, bfcl_index):
    def peak_bytes(num_documents: int) -> int:
        path = write_jsonl(tmp_path / f"corpus{num_documents}.jsonl",
                           [{"text": f"{i} {OTHER} {CLEAN['user_12gram']}"} for i in range(num_documents)])
        tracemalloc.start()
        kept = sum(d.keep for d in decontaminate(read_documents([path], TextSelector()), bfcl_index))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert kept == num_documents
        return peak

    small, large = peak_bytes(500), peak_bytes(5000)
    assert large < small * 1.5 + 64 * 1024, (small, large)


def test_read_documents_is_lazy(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "ok"}\n' + "not json\n", encoding="utf-8")
    documents = read_documents([path], TextSelector())
    assert next(documents).text == "ok"  # the bad second line is not read yet
    with pytest.raises(RecordError, match=":2: "):
        next(documents)


# ----------------------------------------------------------------------------- CLI end to end

def test_cli_train_and_filter_quality(tmp_path):
    positives = write_jsonl(tmp_path / "seed.jsonl", [{"text": t} for t in tool_documents()])
    negatives = write_jsonl(tmp_path / "web.jsonl.gz",
                            [{"body": {"text": t}} for t in prose_documents(len(tool_documents()))])
    model, train_report = tmp_path / "model" / "quality.bin", tmp_path / "train.json"
    result = run_cli("train-quality", "--positive", str(positives), "--negative", str(negatives),
                     "--negative_text_field", "body.text", "--model_output", str(model), "--report",
                     str(train_report), "--heldout_fraction", "0.2", "--epoch", "25", "--lr", "0.5", "--dim", "32",
                     "--bucket", "50000")
    assert result.stdout.startswith("train-quality: ") and "precision" in result.stdout
    report = json.loads(train_report.read_text())
    assert report["heldout_metrics"]["precision"] >= 0.95 and report["heldout_metrics"]["recall"] >= 0.95

    output, removed, filter_report = tmp_path / "kept.jsonl.gz", tmp_path / "removed.jsonl", tmp_path / "filter.json"
    result = run_cli("filter-quality", "--input", str(FIXTURES / "quality_mixed.jsonl"), "--output", str(output),
                     "--removed_output", str(removed), "--model", str(model), "--report", str(filter_report),
                     "--score_field", "quality_score")
    assert result.stdout.startswith("filter-quality: read 16, kept 8, removed 8")
    assert {r["kind"] for r in read_jsonl(output)} == {"agent"}
    assert {r["kind"] for r in read_jsonl(removed)} == {"general"}
    assert all(r["quality_score"] < 0.5 for r in read_jsonl(removed))
    report = json.loads(filter_report.read_text())
    assert (report["kept"], report["removed"], report["read"]["bad_records"]) == (8, 8, 0)


def test_cli_dedup(tmp_path):
    records = [{"id": "p", "text": PARAGRAPH}, {"id": "o", "text": OTHER}, {"id": "p-copy", "text": PARAGRAPH},
               {"id": "p-edit", "text": EDITED}]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records)
    output, log, report_path = tmp_path / "dedup.jsonl", tmp_path / "removed.jsonl", tmp_path / "dedup.json"
    result = run_cli("dedup", "--input", str(corpus), "--output", str(output), "--report", str(report_path),
                     "--removal_log", str(log), "--id_field", "id", "--threshold", "0.5", "--num_perm", "256")
    assert result.stdout.startswith("dedup: read 4, kept 2, removed 2, exact 1, near 1")
    assert output.read_text(encoding="utf-8").splitlines() == corpus.read_text(encoding="utf-8").splitlines()[:2]
    removals = read_jsonl(log)
    assert [(r["id"], r["reason"], r["duplicate_of"]) for r in removals] == [("p-copy", "exact", "p"),
                                                                           ("p-edit", "near", "p")]
    assert removals[0]["location"] == f"{corpus}:3"
    report = json.loads(report_path.read_text())
    assert report["removed_by_reason"] == {"exact": 1, "near": 1} and report["config"]["num_perm"] == 256


def test_cli_decontaminate(tmp_path):
    texts = list(CONTAMINATED.values()) + list(CLEAN.values())
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"messages": [{"content": t}]} for t in texts])
    output, log, report_path = tmp_path / "clean.jsonl", tmp_path / "removed.jsonl", tmp_path / "decontam.json"
    run_cli("decontaminate", "--input", str(corpus), "--output", str(output), "--report", str(report_path),
            "--removal_log", str(log), "--text_field", "messages.*.content",
            "--eval", str(FIXTURES / "bfcl_eval.jsonl"), str(FIXTURES / "eval_prompts.txt"))
    assert [r["messages"][0]["content"] for r in read_jsonl(output)] == list(CLEAN.values())
    first = read_jsonl(log)[0]
    assert (first["location"], first["eval_item"], first["ngram"]) == (
        f"{corpus}:1", "simple_7", "i need to know the total cost of a loan of 25000 dollars")
    report = json.loads(report_path.read_text())
    assert report["removed"] == len(CONTAMINATED) and report["eval_index"]["items"] == 5
    assert report["removed_per_eval_item"]["simple_7"] == 2


def test_cli_malformed_line_fails_unless_skipped(tmp_path):
    args = ["decontaminate", "--input", str(FIXTURES / "malformed.jsonl"), "--output", str(tmp_path / "out.jsonl"),
            "--report", str(tmp_path / "report.json"), "--eval", str(FIXTURES / "bfcl_eval.jsonl")]
    failed = run_cli(*args, check=False)
    assert failed.returncode == 2
    assert f"{FIXTURES / 'malformed.jsonl'}:3: " in failed.stderr
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "report.json").exists()
    skipped = run_cli(*args, "--skip_bad_records")
    assert "bad records 2" in skipped.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["read"]["bad_records"] == 2 and report["kept"] == 3
