"""Offline preparation (Beam, DirectRunner) on a small fixture: stats, determinism, and prepared == raw documents."""

import hashlib
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import gin
import numpy as np
import pytest
import seqio

from conftest import REPO_ROOT
from hephaestus_jax.config import ConfigError, DataConfig, ForgeFiles
from hephaestus_jax.data import tasks
from hephaestus_jax.data.example import Example
from hephaestus_jax.data.prepare import PrepareConfig, document_key, run
from hephaestus_jax.data.records import RecordFormatError, decode_example, encode_example
from support.forge_fixture import write_forge_fixture

REPO = Path(REPO_ROOT)
BAD_FILE = "text/train-00000-of-00002.jsonl"


def load_cli():
    spec = importlib.util.spec_from_file_location("prepare_data_cli", REPO / "tools" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tree_digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.arrayrecord"))}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    counts = write_forge_fixture(raw, seed=3)
    with open(raw / BAD_FILE, "a") as f:
        f.write('{"text": 5}\n')
    out = tmp_path_factory.mktemp("prepared")
    components = ["tool_docs", "trajectories", "code", "text", "sft"]
    load_cli().main(["--input_dir", str(raw), "--output_dir", str(out), "--num_shards", "3", "--seed", "5",
                     "--skip_bad_records", "--components", *components])
    return raw, out, counts


def test_stats_count_documents_tokens_and_skipped_lines(prepared):
    raw, out, counts = prepared
    stats = json.loads((out / "stats.json").read_text())
    assert stats["seed"] == 5 and stats["num_shards"] == 3
    for component, splits in stats["components"].items():
        for split, row in splits.items():
            assert row["documents"] == counts[("", component, split)]
            assert row["skipped_bad_records"] == (1 if (component, split) == ("text", "train") else 0)
    assert sorted(p.name for p in (out / "code").iterdir()) == [
        f"{split}-0000{i}-of-00003.arrayrecord" for split in ("train", "validation") for i in range(3)]


def test_prepared_shards_hold_the_same_documents_as_the_raw_files(prepared):
    raw, out, _ = prepared
    views = {}
    try:
        for data_dir, pattern in ((raw, "{data_dir}/{component}/{split}-*.jsonl*"),
                                  (out, "{data_dir}/{component}/{split}-*.arrayrecord")):
            gin.clear_config()
            gin.bind_parameter("ForgeFiles.data_dir", str(data_dir))
            gin.bind_parameter("ForgeFiles.pattern", pattern)
            gin.bind_parameter("ForgeFiles.skip_bad_records", True)
            tasks.register_forge_tasks(DataConfig())
            for name in ("forge_text", "forge_sft", "forge_trajectories"):
                for split in ("train", "validation"):
                    task = seqio.get_mixture_or_task(name)
                    documents = task.source.documents(split)
                    views[(str(data_dir), name, split)] = [documents[i] for i in range(len(documents))]
                    dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False)
                    assert [ex["targets"].tolist() for ex in dataset.as_numpy_iterator()] == [
                        documents[i].tokens.tolist() for i in range(len(documents))]
    finally:
        gin.clear_config()
        tasks.register_forge_tasks(DataConfig())
    stats = json.loads((out / "stats.json").read_text())
    for name in ("forge_text", "forge_sft", "forge_trajectories"):
        for split in ("train", "validation"):
            from_raw, from_prepared = views[(str(raw), name, split)], views[(str(out), name, split)]
            as_multiset = lambda docs: Counter((d.tokens.tobytes(), d.loss_mask.tobytes()) for d in docs)
            assert as_multiset(from_raw) == as_multiset(from_prepared)
            assert [d.tokens.tolist() for d in from_raw] != [d.tokens.tolist() for d in from_prepared], "shuffled"
            component = name.removeprefix("forge_")
            assert stats["components"][component][split]["tokens"] == sum(d.tokens.size for d in from_raw)


def test_output_is_deterministic_whatever_the_runner_parallelism(prepared, tmp_path):
    raw, out, _ = prepared
    config = PrepareConfig(input_dir=str(raw), output_dir=str(tmp_path), components=("text", "code"), seed=5,
                           num_shards=3, skip_bad_records=True)
    from apache_beam.options.pipeline_options import PipelineOptions

    run(config, PipelineOptions(["--direct_num_workers=2", "--direct_running_mode=multi_threading"]))
    again = tree_digest(tmp_path)
    first = {k: v for k, v in tree_digest(out).items() if k.split("/")[0] in ("text", "code")}
    assert again == first and len(again) == 12


def test_bad_line_without_skip_names_file_and_line(prepared, tmp_path):
    raw, _, _ = prepared
    config = PrepareConfig(input_dir=str(raw), output_dir=str(tmp_path), components=("text",), splits=("train",))
    with pytest.raises(Exception, match=r"train-00000-of-00002\.jsonl:8"):
        run(config)


def test_missing_input_names_the_pattern(tmp_path):
    config = PrepareConfig(input_dir=str(tmp_path), output_dir=str(tmp_path / "out"), components=("code",))
    with pytest.raises(FileNotFoundError, match=r"code/train-\*\.jsonl\*"):
        run(config)


def test_document_key_depends_on_seed_and_line_only():
    key = document_key(0, "text", "train", "train-00000.jsonl", 3)
    assert key == document_key(0, "text", "train", "train-00000.jsonl", 3)
    assert len({key, document_key(1, "text", "train", "train-00000.jsonl", 3),
                document_key(0, "text", "train", "train-00000.jsonl", 4)}) == 3


def test_record_round_trip_and_corruption():
    example = Example(np.array([128000, 5, 70000, 128001], np.int32), np.array([0, 1, 1, 0], np.int32))
    data = encode_example(example)
    decoded = decode_example(data)
    np.testing.assert_array_equal(decoded.tokens, example.tokens)
    np.testing.assert_array_equal(decoded.loss_mask, example.loss_mask)
    with pytest.raises(RecordFormatError, match="shard-1#7: .*expected 32 for 4 tokens"):
        decode_example(data[:-1], "shard-1#7")
    with pytest.raises(RecordFormatError, match="bad magic"):
        decode_example(b"PK\x03\x04" + data[4:])


def test_prepared_shards_record_their_rendering_and_training_on_another_stops_naming_both(prepared, tmp_path,
                                                                                        capsys):
    """stats.json records the tokenizer and chat format; a run that renders differently (another tokenizer, or the
    same tokenizer with a chat template) stops before anything is compiled or written, naming both."""
    from hephaestus_jax import train
    from hephaestus_jax.data import chat_format, mixtures
    from hephaestus_jax.data.pipeline import StreamSpec
    from hephaestus_jax.data.vocab import default_tokenizer_path
    from support.train_helpers import tiny_gin

    _, out, _ = prepared
    recorded = json.loads((out / "stats.json").read_text())["rendering"]
    assert recorded == chat_format.rendering_identity(chat_format.forge_renderer())
    assert recorded["chat_format"] == "llama3" and recorded["chat_template"] is None
    pattern = repr("{data_dir}/{component}/{split}-*.arrayrecord")
    spec = StreamSpec(global_rows=2, seq_len=64)
    files = ForgeFiles(data_dir=str(out), pattern=pattern.strip("'"))
    with mixtures.train_stream(DataConfig(files=files, mixture="forge_sft"), spec) as stream:  # Same rendering.
        assert next(stream)["loss_weights"].any()

    templated = tmp_path / "llama31"  # The same tokenizer with Meta's chat template beside it.
    templated.mkdir()
    (templated / "tokenizer.json").write_bytes(Path(default_tokenizer_path()).read_bytes())
    (templated / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": (REPO / "tests/fixtures/chat_templates/llama31.jinja").read_text()}))
    with pytest.raises(ConfigError, match=r"rendered with the tokenizer .* chat format llama3, but this run renders "
                                          r"with .* chat format template [0-9a-f]{16} \(they differ in chat_format, "
                                          r"chat_template\)"):
        mixtures.train_stream(DataConfig(files=files, mixture="forge_sft", tokenizer_path=str(templated)), spec)

    config = tiny_gin(tmp_path, out, **{"ForgeFiles.pattern": pattern, "DataConfig.mixture": "'forge_sft'"})
    assert train.main(["--gin_file", config]) == 2  # The byte tokenizer of the tiny CLI config.
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("python -m hephaestus_jax.train: error: ") and str(out) in message
    assert "byte_tokenizer" in message and re.search(r"they differ in [a-z_, ]*tokenizer\)", message)
    assert not (tmp_path / "run").exists()
