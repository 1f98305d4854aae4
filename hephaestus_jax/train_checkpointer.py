"""Training checkpoints: Orbax CheckpointManager over the train state, async saves, keep-last-K, safe restore.

The saved `state` item is {"params", "opt_state", "step", "data_state"} (see `stored_checkpoint` for the
layout and metadata). The data state (the data pipeline's int64 position per batch row) is passed to `save` and
returned by `restore_latest` as this process's rows; how it is stored (int32 words, a row-sharded global array)
is private to this module. Saves are asynchronous; a failure in the background surfaces as an exception at the next
save, `check_for_errors()` or `wait()`. Restoring walks back from the latest step: a step that fails to
restore (corrupted or partly deleted files) is skipped with a warning in favour of the one before it.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from hephaestus_jax import stored_checkpoint as ckpt
from hephaestus_jax import sharding

log = logging.getLogger(__name__)

DATA_STATE = "data_state"


def _encode_data_state(state: np.ndarray) -> np.ndarray:
    """int64 data-pipeline state -> int32 [..., 2] (high, low words): JAX arrays are 32-bit by default."""
    state = np.asarray(state, np.int64)
    return np.stack([(state >> 32).astype(np.int32), (state & 0xFFFFFFFF).astype(np.uint32).view(np.int32)], -1)


def _decode_data_state(encoded: np.ndarray) -> np.ndarray:
    encoded = np.asarray(encoded)
    high = encoded[..., 0].astype(np.int64) << 32
    low = encoded[..., 1].view(np.uint32).astype(np.int64)
    return high | low


class TrainCheckpointer:
    """Saves and restores the train state and data state of one run under `directory`; the data state's rows are
    split over `mesh`'s batch axes."""

    def __init__(self, directory: str, *, metadata: ckpt.CheckpointMetadata, keep: int, async_save: bool,
                 mesh: Mesh):
        self.directory = ckpt.absolute(directory)
        self.metadata = metadata
        self.mesh = mesh
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={ckpt.STATE_ITEM: ocp.PyTreeCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: dict[str, Any], data_state: np.ndarray) -> None:
        """Start saving `state` and this process's rows of `data_state` (int64) as `step` (returns once arrays
        are copied off the devices)."""
        self._manager.check_for_errors()
        data = sharding.global_batch({DATA_STATE: _encode_data_state(data_state)}, self.mesh)
        saved = self._manager.save(
            step, args=ocp.args.Composite(**{ckpt.STATE_ITEM: ocp.args.PyTreeSave({**state, **data})}),
            custom_metadata=self.metadata.to_json(), force=True)
        if not saved:
            raise RuntimeError(f"{self.directory}: Orbax declined to save step {step}")

    def check_for_errors(self) -> None:
        self._manager.check_for_errors()

    def wait(self) -> None:
        """Block until pending saves are on disk; raises if one failed."""
        self._manager.wait_until_finished()
        self._manager.check_for_errors()

    def restore_latest(self, abstract_state: dict[str, Any],
                       data_state_shape: tuple[int, ...]) -> tuple[int, dict[str, Any], np.ndarray] | None:
        """(step, state, this process's rows of the data state) from the newest step that restores into
        `abstract_state`'s shapes and shardings and a data state of global shape `data_state_shape`.

        None when there is no checkpoint. A step whose stored shapes differ from `abstract_state` is a
        configuration mismatch and raises (never silently restarting a run); a step that fails to read is
        skipped with a warning; if every step fails, CheckpointError.
        """
        abstract_state = {**abstract_state, DATA_STATE: jax.ShapeDtypeStruct(
            (*data_state_shape, 2), np.int32, sharding=sharding.batch_sharding(self.mesh))}
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                stored = ckpt.StoredCheckpoint(self.directory, step, checkpoint_manager=self._manager).shapes
            except Exception as e:
                log.warning("%s/%d: unreadable checkpoint metadata (%s); trying the previous one",
                            self.directory, step, e)
                continue
            where = f"{self.directory}/{step}"
            ckpt.check_shapes(stored["params"], abstract_state["params"], where)
            saved_data, want_data = tuple(stored[DATA_STATE].shape), tuple(abstract_state[DATA_STATE].shape)
            if saved_data != want_data:
                raise ckpt.CheckpointError(
                    f"{where}: data state has shape {saved_data} but this run needs {want_data} "
                    "([batch rows, mixture components, 3, 2]): the batch size or mixture changed; resume with the "
                    "original settings, or start a new output_dir with init_from pointing at this checkpoint")
            try:
                args = ocp.args.PyTreeRestore(
                    item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
                state = self._manager.restore(step, args=ocp.args.Composite(**{ckpt.STATE_ITEM: args}))
                state = state[ckpt.STATE_ITEM]
                return step, state, _decode_data_state(sharding.local_rows(state.pop(DATA_STATE)))
            except Exception as e:  # Orbax/TensorStore raise many types for damaged files.
                log.warning("%s/%d: cannot restore this checkpoint (%s: %s); trying the previous one",
                            self.directory, step, type(e).__name__, str(e).splitlines()[0][:300])
        if steps:
            raise ckpt.CheckpointError(f"{self.directory}: none of the checkpoints {steps} could be restored")
        return None

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

