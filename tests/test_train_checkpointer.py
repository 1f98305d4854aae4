"""Training checkpoints: resharding restores, corrupted steps skipped, async failures surfaced, golden format."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO_ROOT
from support.train_helpers import OPTIMIZER, TINY, forge_batches, mesh_of, run_steps
from hephaestus_jax import sharding, train_checkpointer
from hephaestus_jax import stored_checkpoint as ckpt
from hephaestus_jax.train_checkpointer import TrainCheckpointer
from hephaestus_jax.config import ModelConfig, OptimizerConfig
from hephaestus_jax.train_step import TrainStep

GOLDEN = os.path.join(REPO_ROOT, "tests", "fixtures", "golden_checkpoint")


def _checkpointer(directory, mesh, async_save=False, model=TINY):
    metadata = ckpt.CheckpointMetadata(model_config=model, kind="train")
    return TrainCheckpointer(str(directory), metadata=metadata, keep=5, async_save=async_save, mesh=mesh)


def _data_state(rows=8, value=7):
    return np.full((rows, 4, 3), value, np.int64)


def _placed(state, step_fn):
    """A copy of `state` on `step_fn`'s mesh (train steps donate their input, so tests never share buffers)."""
    return jax.device_put(jax.tree.map(np.asarray, state), step_fn.state_shardings)


def _restore(directory, step_fn, rows=8, model=TINY):
    return _checkpointer(directory, step_fn.mesh, model=model).restore_latest(step_fn.abstract_state(), (rows, 4, 3))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A state after 2 steps on 8 devices (fsdp=4 x tensor=2), and the batches."""
    batches = forge_batches(tmp_path_factory.mktemp("forge"), count=3)
    step_fn = TrainStep.create(TINY, mesh_of(8, fsdp=4, tensor=2), OPTIMIZER, num_steps=10)
    state, _ = run_steps(step_fn, step_fn.init(jax.random.key(0)), batches[:2])
    return step_fn, state, batches


def test_data_state_round_trips_through_int32():
    state = np.array([[0, 1, 2**31 + 5, 2**40 + 3, -1, 2**62]], np.int64)
    encoded = train_checkpointer._encode_data_state(state)
    assert encoded.dtype == np.int32 and encoded.shape == (1, 6, 2)
    np.testing.assert_array_equal(train_checkpointer._decode_data_state(encoded), state)


@pytest.mark.parametrize("save_devices, restore_devices", [(8, 1), (1, 8)])
def test_checkpoint_restores_on_a_different_device_count(tmp_path, trained, save_devices, restore_devices):
    step_fn_8, state_8, batches = trained
    meshes = {8: step_fn_8.mesh, 1: mesh_of(1)}
    saver_fn = step_fn_8 if save_devices == 8 else TrainStep.create(TINY, meshes[1], OPTIMIZER, num_steps=10)
    state = _placed(state_8, saver_fn)
    _checkpointer(tmp_path, saver_fn.mesh).save(2, state, _data_state())
    restore_fn = step_fn_8 if restore_devices == 8 else TrainStep.create(TINY, meshes[1], OPTIMIZER, num_steps=10)
    step, restored, data_state = _restore(tmp_path, restore_fn)
    assert step == 2 and len(restored["params"]["embed"].sharding.device_set) == restore_devices
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(data_state, _data_state())
    _, losses_restored = run_steps(restore_fn, restored, batches[2:3])
    _, losses_original = run_steps(saver_fn, _placed(state_8, saver_fn), batches[2:3])
    np.testing.assert_allclose(losses_restored, losses_original, rtol=1e-5)


def test_corrupted_latest_checkpoint_is_skipped_with_a_warning(tmp_path, trained, caplog):
    step_fn, state, _ = trained
    checkpointer = _checkpointer(tmp_path, step_fn.mesh)
    checkpointer.save(2, state, _data_state(value=2))
    checkpointer.save(4, state, _data_state(value=4))
    data_files = [os.path.join(root, f) for root, _, files in os.walk(tmp_path / "4" / "state")
                  for f in files if os.sep + "d" + os.sep in os.path.join(root, f) + os.sep]
    assert data_files
    for path in data_files:  # Damage every array data file of step 4.
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    step, _, data_state = _restore(tmp_path, step_fn)
    assert step == 2 and data_state[0, 0, 0] == 2
    assert any("/4:" in r.message and "trying the previous one" in r.message for r in caplog.records)


def test_a_changed_configuration_is_an_error_not_a_silent_restart(tmp_path, trained):
    step_fn, state, _ = trained
    _checkpointer(tmp_path, step_fn.mesh).save(2, state, _data_state())
    wider = TrainStep.create(TINY.replace(intermediate_size=256), mesh_of(1), OPTIMIZER, num_steps=10)
    with pytest.raises(ckpt.CheckpointError, match=r"\['down_proj'\] has shape \(2, 64, 128\) in the checkpoint but "
                                                    r"the model config expects \(2, 64, 256\)"):
        _restore(tmp_path, wider)
    with pytest.raises(ckpt.CheckpointError, match="the batch size or mixture changed"):
        _restore(tmp_path, step_fn, rows=16)


def test_failed_async_save_surfaces_as_an_error(tmp_path, trained, monkeypatch):
    step_fn, state, _ = trained
    original = ocp.PyTreeCheckpointHandler.async_save

    class DiskFull:
        def result(self, timeout=None):
            raise OSError(28, "No space left on device")

    async def failing_save(self, *args, **kwargs):
        return list(await original(self, *args, **kwargs) or []) + [DiskFull()]

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save", failing_save)
    checkpointer = _checkpointer(tmp_path, step_fn.mesh, async_save=True)
    checkpointer.save(2, state, _data_state())
    with pytest.raises(Exception, match="No space left on device"):
        checkpointer.wait()
    assert checkpointer.all_steps() == []  # Never committed, so never restorable.


def test_training_checkpoint_exports_only_params(tmp_path, trained):
    from hephaestus_jax.convert.orbax_to_hf import convert_orbax_to_hf
    from hephaestus_jax.convert.safetensors_io import SafetensorsReader

    step_fn, state, _ = trained
    _checkpointer(tmp_path / "ckpt", step_fn.mesh).save(2, state, _data_state())
    convert_orbax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    reader = SafetensorsReader(str(tmp_path / "hf"))
    assert "model.embed_tokens.weight" in reader.names() and len(reader.names()) == 2 + 9 * TINY.num_layers + 1
    np.testing.assert_array_equal(reader.read("model.layers.1.mlp.up_proj.weight"),
                                  np.asarray(state["params"]["layers"]["mlp"]["up_proj"])[1])


# ------------------------------------------------------------------ golden checkpoint
GOLDEN_MODEL = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                           num_kv_heads=1, max_position_embeddings=64)


def _golden_step_fn():
    return TrainStep.create(GOLDEN_MODEL, mesh_of(1), OptimizerConfig(learning_rate=1e-2, warmup_steps=0),
                            num_steps=10)


def _summary(tree) -> dict[str, list[float]]:
    """Per leaf: sum, sum of squares and the first 3 values: what the golden file pins."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        flat = np.asarray(leaf, np.float64).reshape(-1)
        out[jax.tree_util.keystr(path)] = [float(flat.sum()), float((flat ** 2).sum())] + flat[:3].tolist()
    return out


def make_golden_checkpoint(directory: str) -> None:
    """Regenerate tests/fixtures/golden_checkpoint (run by hand when the format changes on purpose):
    python -c 'import sys; sys.path[:0] = ["tests"]; import test_train_checkpointer as t; t.make_golden_checkpoint(t.GOLDEN)'
    """
    step_fn = _golden_step_fn()
    state = step_fn.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 64, (2, 8)).astype(np.int32), "targets": rng.integers(0, 64, (2, 8)).astype(
        np.int32), "positions": np.tile(np.arange(8, dtype=np.int32), (2, 1)),
        "segment_ids": np.ones((2, 8), np.int32), "loss_weights": np.ones((2, 8), np.float32)}
    state, _ = run_steps(step_fn, state, [batch])
    shutil.rmtree(directory, ignore_errors=True)
    data_state = _data_state(rows=2, value=2**33 + 1)
    checkpointer = _checkpointer(directory, step_fn.mesh, model=GOLDEN_MODEL)
    checkpointer.save(1, state, data_state)
    checkpointer.wait()
    encoded = sharding.global_batch({"data_state": train_checkpointer._encode_data_state(data_state)}, step_fn.mesh)
    with open(os.path.join(directory, "expected.json"), "w") as f:
        json.dump({"orbax_version": ocp.__version__, "summary": _summary({**state, **encoded})}, f, indent=1)


def test_golden_checkpoint_written_by_an_older_orbax_still_restores():
    with open(os.path.join(GOLDEN, "expected.json")) as f:
        expected = json.load(f)
    step_fn = _golden_step_fn()
    assert ckpt.StoredCheckpoint(GOLDEN, 1).model_config == GOLDEN_MODEL
    step, restored, data_state = _restore(GOLDEN, step_fn, rows=2, model=GOLDEN_MODEL)
    assert step == 1
    encoded = sharding.global_batch({"data_state": train_checkpointer._encode_data_state(data_state)}, step_fn.mesh)
    summary = _summary({**restored, **encoded})
    assert summary.keys() == expected["summary"].keys()
    for key, values in expected["summary"].items():
        np.testing.assert_allclose(summary[key], values, rtol=1e-6, err_msg=key)
    assert data_state[0, 0, 0] == 2**33 + 1
    # Also read by the converter.
    params = ckpt.StoredCheckpoint(GOLDEN).restore_params(GOLDEN_MODEL.replace(scan_layers=False))
    assert params["layers_1"]["mlp"]["up_proj"].shape == (32, 16)
