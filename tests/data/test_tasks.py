"""seqio Tasks/Mixtures over Forge files: registration, gin, the seqio view vs the random-access view, streams."""

import gin
import numpy as np
import pytest
import seqio

from hephaestus_jax.config import DataConfig
from hephaestus_jax.data import mixtures, tasks
from hephaestus_jax.data.chat_format import render_document, resolve_chat_format
from hephaestus_jax.data.forge import read_records
from hephaestus_jax.data.packing import GREEDY
from hephaestus_jax.data.pipeline import StreamSpec
from hephaestus_jax.data.vocab import forge_vocabulary
from support.forge_fixture import write_forge_fixture

@pytest.fixture
def forge_dir(tmp_path):
    counts = write_forge_fixture(tmp_path)
    gin.bind_parameter("ForgeFiles.data_dir", str(tmp_path))
    tasks.register_forge_tasks(DataConfig())
    yield tmp_path, counts
    gin.clear_config()
    tasks.register_forge_tasks(DataConfig())


ALL_TASKS = ["forge_tool_docs", "forge_trajectories", "forge_code", "forge_text", "forge_sft",
             "forge_seed_tool_docs", "forge_seed_trajectories"]


def test_registration_is_idempotent_and_complete():
    tasks.register_forge_tasks(DataConfig())
    tasks.register_forge_tasks(DataConfig())
    assert set(ALL_TASKS) <= set(seqio.TaskRegistry.names())
    assert {"forge_stage1", "forge_stage2"} <= set(seqio.MixtureRegistry.names())
    stage2 = seqio.get_mixture_or_task("forge_stage2")
    assert sorted(t.name for t in stage2.tasks) == ["forge_code", "forge_seed_tool_docs", "forge_seed_trajectories",
                                                     "forge_text"]


def shares(mixture_name):
    mixture = seqio.get_mixture_or_task(mixture_name)
    return {t.name: mixture.get_rate(t) / mixture.total_rate for t in mixture.tasks}


def test_default_rates_are_agent_code_text_one_to_one_to_one():
    tasks.register_forge_tasks(DataConfig())
    assert shares("forge_stage1") == pytest.approx(
        {"forge_tool_docs": 1 / 6, "forge_trajectories": 1 / 6, "forge_code": 1 / 3, "forge_text": 1 / 3})


def test_rates_come_from_gin_per_stage():
    try:
        gin.parse_config(["stage2/mixture_rates.code = 2.0", "stage2/mixture_rates.tool_docs_share_of_agent = 0.25"])
        tasks.register_forge_tasks(DataConfig())
        expected = {"forge_seed_tool_docs": 1 / 16, "forge_seed_trajectories": 3 / 16, "forge_code": 1 / 2,
                    "forge_text": 1 / 4}
        assert shares("forge_stage2") == pytest.approx(expected)
        assert shares("forge_stage1")["forge_code"] == pytest.approx(1 / 3)
    finally:
        gin.clear_config()
        tasks.register_forge_tasks(DataConfig())


def test_unset_data_dir_is_reported():
    tasks.register_forge_tasks(DataConfig())
    with pytest.raises(ValueError, match="ForgeFiles.data_dir is not set"):
        seqio.get_mixture_or_task("forge_code").source.list_shards("train")


def test_missing_files_name_the_pattern(forge_dir):
    root, _ = forge_dir
    source = seqio.get_mixture_or_task("forge_text").source
    for path in (root / "text").glob("validation-*"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{root}/text/validation-\*\.jsonl\*"):
        source.documents("validation")
    with pytest.raises(FileNotFoundError, match="validation"):
        source.get_dataset("validation", shuffle=False)


@pytest.mark.parametrize("task", ["forge_trajectories", "forge_sft", "forge_seed_tool_docs"])
def test_seqio_dataset_matches_random_access_view_and_raw_records(forge_dir, task):
    root, counts = forge_dir
    provider = seqio.get_mixture_or_task(task)
    dataset = provider.get_dataset(sequence_length=None, split="train", shuffle=False)
    from_seqio = [(ex["targets"], ex["loss_mask"]) for ex in dataset.as_numpy_iterator()]
    documents = provider.source.documents("train")
    subdir = "seed/" if "seed" in task else ""
    component = task.removeprefix("forge_").removeprefix("seed_")
    assert len(from_seqio) == len(documents) == counts[(subdir, component, "train")]
    vocab = forge_vocabulary()
    records = [r for path in sorted((root / subdir / component).glob("train-*")) for r in read_records(path, component)]
    for i, (targets, mask) in enumerate(from_seqio):
        expected = render_document(records[i], resolve_chat_format(vocab))
        np.testing.assert_array_equal(targets, documents[i].tokens)
        np.testing.assert_array_equal(mask, documents[i].loss_mask)
        np.testing.assert_array_equal(targets, expected.tokens)
        assert targets[0] == vocab.bos_id


def test_mixture_get_dataset_works_for_users(forge_dir):
    dataset = seqio.get_mixture_or_task("forge_stage1").get_dataset(
        sequence_length={"targets": 64, "loss_mask": 64}, split="train", shuffle=True, seed=0)
    examples = list(dataset.take(10).as_numpy_iterator())
    assert len(examples) == 10
    assert all(0 < len(ex["targets"]) <= 64 and ex["targets"].shape == ex["loss_mask"].shape for ex in examples)


def test_train_stream_over_the_stage1_mixture(forge_dir):
    stream = mixtures.train_stream(DataConfig(), StreamSpec(global_rows=4, seq_len=32), name="forge_stage1")
    assert stream.component_names == ("forge_code", "forge_text", "forge_tool_docs", "forge_trajectories")
    vocab = forge_vocabulary()
    for _ in range(6):
        batch = next(stream)
        assert batch["inputs"].shape == (4, 32)
        assert (batch["segment_ids"] > 0).all(), "CPT rows are full"
        assert batch["inputs"].max() < vocab.vocab_size
    assert (stream.get_state()[:, :, 2].sum(axis=0) > 0).sum() >= 3, "several components were read"
    stream.close()


def test_sft_stream_trains_only_on_assistant_tokens(forge_dir):
    stream = mixtures.train_stream(DataConfig(), StreamSpec(global_rows=2, seq_len=256, prefetch=0), name="forge_sft")
    assert stream.component_names == ("forge_sft",)
    vocab = forge_vocabulary()
    header = vocab.start_header_id
    batch = next(stream)
    weighted = batch["targets"][batch["loss_weights"] > 0]
    assert weighted.size > 0 and header not in weighted, "headers are never targets"
    assert vocab.eot_id in weighted, "the assistant's closing <|eot_id|> is a target"
    unweighted = batch["targets"][(batch["loss_weights"] == 0) & (batch["segment_ids"] > 0)]
    assert header in unweighted


def test_eval_streams_cover_the_validation_split(forge_dir):
    _, counts = forge_dir
    streams = mixtures.eval_streams(DataConfig(), StreamSpec(global_rows=2, seq_len=64), name="forge_stage1")
    for name, stream in streams.items():
        documents = stream.documents
        pairs = sum(len(documents[i].tokens) - 1 for i in range(len(documents)))
        packed = sum(int((batch["segment_ids"] > 0).sum()) for batch in stream)
        assert packed == pairs, name
    sft = mixtures.eval_streams(DataConfig(), StreamSpec(global_rows=2, seq_len=64), name="forge_sft")["forge_sft"]
    assert sft.packing == GREEDY and len(sft.documents) == counts[("", "sft", "validation")]


def test_seqio_mixtures_match_what_training_reads(forge_dir):
    """The registered mixtures have the tasks, order and rates of `mixtures.task_rates` (what train_stream uses)."""
    gin.parse_config(["stage1/mixture_rates.text = 0.0", "stage2/mixture_rates.code = 3.0"])
    data = DataConfig()
    tasks.register_forge_tasks(data)
    for name in (mixtures.STAGE1, mixtures.STAGE2):
        mixture = seqio.get_mixture_or_task(name)
        expected = mixtures.task_rates(data, name)
        assert [task.name for task in mixture.tasks] == list(expected)
        assert {task.name: mixture.get_rate(task) for task in mixture.tasks} == pytest.approx(expected)
    assert "forge_text" not in mixtures.task_rates(data, mixtures.STAGE1)
    with pytest.raises(ValueError, match="unknown Forge task or mixture 'forge_nope'"):
        mixtures.task_rates(data, "forge_nope")
