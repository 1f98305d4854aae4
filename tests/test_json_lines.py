"""hephaestus_jax/json_lines.py: the one JSON-lines reader, as metrics, Forge, corpus cleaning and BFCL use it."""

import gzip
import math
import re

import pytest

from hephaestus_jax import json_lines
from hephaestus_jax.data import forge
from hephaestus_jax.clean.jsonl import ReadStats, TextSelector, read_documents
from hephaestus_jax.eval.bfcl_files import BFCLFormatError, load_predictions

GOOD = b'{"text": "one"}\n'
LINES = GOOD + b"\xff\xfe\n" + b"   \n" + b"{oops\n" + b"[1, 2]\n" + b'{"text": "six"}\n'


def bad_lines(path, where: str) -> list[str]:
    return [f"{path}:2: invalid UTF-8: byte 0xff at byte offset {len(GOOD)} {where}",
            f"{path}:4: invalid JSON: Expecting property name enclosed in double quotes at column 2",
            f"{path}:5: expected a JSON object, got array"]


@pytest.mark.parametrize("compress", [False, True])
def test_every_reader_skips_and_names_the_same_bad_lines(tmp_path, compress):
    path = tmp_path / ("mixed.jsonl.gz" if compress else "mixed.jsonl")
    path.write_bytes(gzip.compress(LINES) if compress else LINES)
    expected = bad_lines(path, "of the decompressed stream" if compress else "of the file")

    stats = json_lines.ReadStats()
    lines = list(json_lines.read_json_lines(path, skip_bad_records=True, stats=stats))
    assert [(line.where, line.value) for line in lines] == [(f"{path}:1", {"text": "one"}),
                                                            (f"{path}:6", {"text": "six"})]
    assert (stats.bad_records, stats.blank_lines, stats.bad_record_examples) == (3, 1, expected)

    reader = forge.read_records(path, "text", skip_bad_records=True)
    assert [record.text for record in reader] == ["one", "six"]
    assert (reader.num_skipped, reader.stats.bad_record_examples) == (3, expected)

    clean_stats = ReadStats()
    documents = list(read_documents([path], TextSelector(), skip_bad_records=True, stats=clean_stats))
    assert [d.location for d in documents] == [f"{path}:1", f"{path}:6"]
    assert (clean_stats.documents, clean_stats.bad_records, clean_stats.bad_record_examples) == (2, 3, expected)


def test_without_skipping_the_first_bad_line_is_the_error_of_each_reader(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(LINES)
    first = bad_lines(path, "of the file")[0]
    with pytest.raises(json_lines.BadLine) as error:
        list(json_lines.read_json_lines(path))
    assert str(error.value) == first and error.value.where == f"{path}:2"
    with pytest.raises(forge.ForgeFormatError, match=f"^{re.escape(first)}$"):
        list(forge.read_records(path, "text"))
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_bytes(b'{"id": "simple_0", "result": "[]"}\n' + LINES[len(GOOD):])
    with pytest.raises(BFCLFormatError, match=f"^{re.escape(str(predictions))}:2: invalid UTF-8: byte 0xff at byte "
                                              "offset 35 of the file$"):
        load_predictions(predictions)


def test_nan_is_read_unless_the_caller_wants_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": NaN}\n')
    (line,) = json_lines.read_json_lines(path)
    assert math.isnan(line.value["loss"])
    with pytest.raises(json_lines.BadLine, match=r"metrics.jsonl:1: invalid JSON: NaN is not valid JSON$"):
        list(json_lines.read_json_lines(path, allow_nan=False))
