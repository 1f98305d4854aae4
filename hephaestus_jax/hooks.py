"""What the training loop does besides stepping: logging, checkpointing, evaluation, export.

Each hook is called after every step with the step number and the state; it acts when its interval divides
the step (and at the last step). The loop itself stays a few lines long.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np

from hephaestus_jax.train_checkpointer import TrainCheckpointer
from hephaestus_jax.metrics import MetricsWriter

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class LogHook:
    """Collects per-step metrics and, every `every` steps or at a stop, writes their means, throughput and MFU.

    Also stops the run (TrainingDiverged) once `max_bad_steps` consecutive steps were non-finite; such steps were
    not applied, so the state (and any checkpoint) still holds the last good parameters.
    """

    def __init__(self, writer: MetricsWriter, *, every: int, tokens_per_step: int, flops_per_step: float,
                 peak_flops: float, max_bad_steps: int):
        self.writer, self.every = writer, every
        self.tokens_per_step, self.flops_per_step, self.peak_flops = tokens_per_step, flops_per_step, peak_flops
        self.max_bad_steps = max_bad_steps
        self._pending: list[dict] = []
        self._last: dict | None = None
        self._input_seconds = 0.0
        self._window_start: float | None = None
        self._window_steps = 0

    def record(self, step: int, metrics: dict, input_seconds: float) -> None:
        """Called right after step `step` was dispatched; checks the previous step for divergence.

        The first step of a run includes compilation, so throughput is timed from when it is done.
        """
        if self._last is not None:
            bad = int(self._last["bad_steps"])  # The previous step: usually done, so this rarely waits.
            if bad >= self.max_bad_steps:
                raise TrainingDiverged(f"{bad} consecutive steps (through step {step - 1}) had a non-finite loss or "
                                       "gradient; they were skipped and the run stops. The last checkpoint holds the "
                                       "last good parameters: lower the learning rate or check the data.")
        self._pending.append(metrics)
        self._last = metrics
        if self._window_start is None:
            jax.block_until_ready(metrics)
            self._window_start = time.perf_counter()
            return
        self._input_seconds += input_seconds
        self._window_steps += 1

    def __call__(self, step: int, state: dict[str, Any], last: bool) -> None:
        if step % self.every == 0 or last:
            self.flush(step)

    def flush(self, step: int) -> None:
        """Writes the means of the steps recorded since the last write, at `step`, even mid-window.

        A run stopped mid-window (preemption) flushes, so no step's metrics are lost; `mean_of_steps` says how
        many steps an entry averages (fewer than `every` in the windows cut by a stop and a resume).
        """
        if not self._pending:
            return
        values = jax.device_get(self._pending)
        scalars = {key: float(np.mean([v[key] for v in values])) for key in ("loss", "total_loss", "grad_norm")}
        scalars["mean_of_steps"] = float(len(values))
        scalars["learning_rate"] = float(values[-1]["learning_rate"])
        scalars["skipped_steps"] = float(sum(1 - int(v["finite"]) for v in values))
        if self._window_steps:
            elapsed = time.perf_counter() - self._window_start
            step_seconds = elapsed / self._window_steps
            scalars.update(step_seconds=step_seconds, tokens_per_second=self.tokens_per_step / step_seconds,
                           mfu=self.flops_per_step / step_seconds / self.peak_flops,
                           input_wait_share=self._input_seconds / elapsed)
        self.writer.write(step, scalars)
        self._pending, self._input_seconds, self._window_steps = [], 0.0, 0
        self._window_start = time.perf_counter()


class CheckpointHook:
    """Saves the state and this run's data position every `every` steps and at the last step."""

    def __init__(self, checkpointer: TrainCheckpointer, *, every: int, data_state: Callable[[], np.ndarray]):
        self.checkpointer, self.every, self.data_state = checkpointer, every, data_state
        self.last_saved: int | None = None

    def save(self, step: int, state: dict[str, Any]) -> None:
        if self.last_saved == step:
            return
        self.checkpointer.save(step, state, self.data_state())
        self.last_saved = step

    def __call__(self, step: int, state: dict[str, Any], last: bool) -> None:
        if step % self.every == 0 or last:
            self.save(step, state)
        else:
            self.checkpointer.check_for_errors()


class EvalHook:
    """Held-out loss per task every `every` steps (interruptible by preemption between batches)."""

    def __init__(self, writer: MetricsWriter, *, every: int, evaluate: Callable[[Any, Callable[[], bool]], dict],
                 should_stop: Callable[[], bool]):
        self.writer, self.every, self.evaluate, self.should_stop = writer, every, evaluate, should_stop

    def __call__(self, step: int, state: dict[str, Any], last: bool) -> None:
        if self.every and (step % self.every == 0 or last):
            results = self.evaluate(state["params"], self.should_stop)
            if results:
                self.writer.write(step, results, progress=False)


def until(stop: Callable[[], bool], iterable: Iterable) -> Iterable:
    """Items of `iterable` until `stop()` becomes true (checked before each item)."""
    for item in iterable:
        if stop():
            return
        yield item


class PreemptionWatcher:
    """Turns SIGTERM (TPU maintenance/preemption, `kill`) into a request to save and exit at a step boundary.

    One process: a Python signal handler sets a flag, also checked between evaluation batches. Several
    processes: every process must stop at the same step, so JAX's preemption sync point decides (its
    coordination service receives the notice and agrees on the step); no Python handler is installed then,
    as it would replace JAX's.
    """

    def __init__(self):
        self._requested = threading.Event()
        self._multi_process = jax.process_count() > 1
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self._requested.set())

    def requested(self) -> bool:
        """True once this process was asked to stop (single-process runs; for checks inside evaluation)."""
        return self._requested.is_set()

    def should_stop(self, step: int) -> bool:
        """Whether to save and exit after `step`; call at every step on every process."""
        if self._multi_process:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested()
