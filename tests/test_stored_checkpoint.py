"""`stored_checkpoint.StoredCheckpoint`: one step resolved once, metadata and shapes read once, one manager."""

import os

import orbax.checkpoint as ocp
import pytest

from conftest import REPO_ROOT
from hephaestus_jax import stored_checkpoint as ckpt

GOLDEN = os.path.join(REPO_ROOT, "tests", "fixtures", "golden_checkpoint")


def test_one_handle_reads_the_metadata_once_and_restores_through_one_manager(monkeypatch):
    managers, metadata_reads = [], []
    real_init, real_metadata = ocp.CheckpointManager.__init__, ocp.CheckpointManager.metadata

    def counting_init(self, *args, **kwargs):
        managers.append(self)
        real_init(self, *args, **kwargs)

    def counting_metadata(self, *args, **kwargs):
        metadata_reads.append(args)
        return real_metadata(self, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "__init__", counting_init)
    monkeypatch.setattr(ocp.CheckpointManager, "metadata", counting_metadata)
    checkpoint = ckpt.StoredCheckpoint(GOLDEN)
    assert checkpoint.step == 1 and checkpoint.where.endswith("golden_checkpoint/1")
    config = checkpoint.model_config
    assert checkpoint.metadata.kind == "train" and checkpoint.shapes["params"]["embed"].shape == (64, 16)
    params = checkpoint.restore_params(config)
    assert params["embed"].shape == (64, 16)
    assert checkpoint.restore({"step": checkpoint.shapes["step"]})["step"].shape == ()
    assert len(managers) == 1 and len(metadata_reads) == 1


def test_a_missing_directory_or_step_is_named(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="checkpoint directory does not exist"):
        ckpt.StoredCheckpoint(tmp_path / "none")
    with pytest.raises(ckpt.CheckpointError, match=r"step 7 not found \(available: \[1\]\)"):
        ckpt.StoredCheckpoint(GOLDEN, 7)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="contains no complete checkpoint step"):
        ckpt.StoredCheckpoint(tmp_path / "empty")
