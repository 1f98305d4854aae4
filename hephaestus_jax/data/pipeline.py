"""The training stream: the global batch at step k is a function of (seed, k) alone, whatever the process count.

Row r of every global batch comes from *lane* r. Lane r reads, from a component with N documents, the documents
at shuffled positions p = r, r + B, r + 2B, ... (B = global rows): epoch p // N, document perm_{seed, component,
epoch}(p % N), with grain's O(1)-memory `index_shuffle`. Each row is filled from one component, chosen by a
token-deficit rule (see `choose_component`), and packed per lane and component (`packing.py`). A process computes
only its own rows, and its whole position is a small int64 array `[local rows, components, 3]` holding, per lane
and component, (document counter, pair offset in that document, training pairs taken so far). Concatenating the
states of processes 0..P-1 gives the global state, which any process count can resume from.
See docs/data_pipeline.md.
"""

from __future__ import annotations

import functools
import hashlib
import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from grain.experimental import index_shuffle

from hephaestus_jax.data.example import DocumentSource, Example
from hephaestus_jax.data.packing import CONCAT, PACKING_MODES, Piece, empty_batch, num_pairs, plan_row, write_row

STATE_FIELDS = ("document", "offset", "tokens")
"""Columns of the last state axis: lane document counter, pair offset in that document, pairs taken so far."""
_DOCUMENT, _OFFSET, _TOKENS = range(len(STATE_FIELDS))
_SHUFFLE_ROUNDS = 4


@dataclass(frozen=True)
class StreamSpec:
    """How one process reads a stream: the global batch (`global_rows` x `seq_len`), the shuffling seed, which of
    `process_count` processes it is, and how many batches it prefetches and rows it packs in parallel."""

    global_rows: int
    seq_len: int
    seed: int = 0
    process_index: int = 0
    process_count: int = 1
    prefetch: int = 2
    num_threads: int = 1


@dataclass(frozen=True)
class StreamComponent:
    """One source of a training mixture: its documents, its share of training pairs, and how rows are packed."""

    name: str
    documents: DocumentSource
    rate: float
    packing: str = CONCAT


def process_rows(global_rows: int, process_index: int, process_count: int) -> range:
    """The global rows process `process_index` of `process_count` owns: [p*B/P, (p+1)*B/P)."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    if global_rows < 1 or global_rows % process_count:
        raise ValueError(
            f"the global batch of {global_rows} rows does not split evenly over {process_count} processes "
            "(global rows must be a positive multiple of the process count)"
        )
    per_process = global_rows // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


def _hash64(*parts: object) -> int:
    """A stable 64-bit hash of the parts' reprs (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


class LaneOrder:
    """The document each lane reads next from one component, for any number of documents N >= 1."""

    def __init__(self, name: str, num_documents: int, num_lanes: int, seed: int):
        if num_documents < 1:
            raise ValueError(f"component {name!r} has no documents")
        self.name = name
        self.num_documents = num_documents
        self.num_lanes = num_lanes
        self.seed = seed

    def document(self, lane: int, counter: int) -> int:
        """Index of the `counter`-th document of `lane`: shuffled position p = lane + counter * lanes."""
        epoch, position = divmod(lane + counter * self.num_lanes, self.num_documents)
        epoch_seed = _hash64("epoch", self.seed, self.name, epoch) & 0xFFFFFFFF
        return index_shuffle(position, max_index=self.num_documents - 1, seed=epoch_seed, rounds=_SHUFFLE_ROUNDS)


def lane_phase(seed: int, lane: int, names: Sequence[str], seq_len: int) -> np.ndarray:
    """Per-lane head start in [0, seq_len) pairs for each component, so that lanes do not move in lock-step."""
    return np.array([(_hash64("phase", seed, lane, name) % 2**32) / 2**32 * seq_len for name in names])


def choose_component(tokens: np.ndarray, rates: np.ndarray, phase: np.ndarray) -> int:
    """The component whose share lags most: argmax of rate_c * total - tokens_c + phase_c over rates > 0
    (ties by lowest index). Over a long stream each component's share of pairs converges to its rate."""
    deficit = rates * float(tokens.sum()) - tokens + phase
    deficit = np.where(rates > 0, deficit, -np.inf)
    return int(np.argmax(deficit))


class _DocumentCache:
    """Documents by counter (a lane's or a process's sequence), kept while packing may still need them."""

    def __init__(self, fetch: Callable[[int], Example]):
        self._fetch = fetch
        self._cache: dict[int, Example] = {}

    def get(self, counter: int) -> Example:
        example = self._cache.get(counter)
        if example is None:
            example = self._cache[counter] = self._fetch(counter)
        return example

    def pairs(self, counter: int) -> int:
        return num_pairs(self.get(counter))

    def forget_before(self, counter: int) -> None:
        for old in [key for key in self._cache if key < counter]:
            del self._cache[old]

    def clear(self) -> None:
        self._cache.clear()


def _lane_documents(order: LaneOrder, documents: DocumentSource, lane: int) -> _DocumentCache:
    return _DocumentCache(lambda counter: documents[order.document(lane, counter)])


class BatchMaker:
    """Makes this process's rows of consecutive global batches from a state (see `TrainStream` for prefetching).

    With `num_threads` > 1, the rows of a batch are packed in parallel threads (reading and tokenizing documents
    release the GIL); each row depends only on its lane, so the batches are the same for any thread count.
    """

    def __init__(self, components: Sequence[StreamComponent], spec: StreamSpec):
        global_rows, seq_len, seed = spec.global_rows, spec.seq_len, spec.seed
        if not components:
            raise ValueError("a training stream needs at least one component")
        names = [component.name for component in components]
        if len(set(names)) != len(names):
            raise ValueError(f"component names must be unique, got {names}")
        for component in components:
            name = component.name
            if component.packing not in PACKING_MODES:
                raise ValueError(f"component {name!r}: unknown packing {component.packing!r}; expected {PACKING_MODES}")
            if not (component.rate >= 0 and math.isfinite(component.rate)):
                raise ValueError(f"component {name!r}: rate must be a finite number >= 0, got {component.rate}")
        rates = np.array([component.rate for component in components], np.float64)
        if rates.sum() <= 0:
            raise ValueError(f"at least one component rate must be > 0, got {dict(zip(names, rates.tolist()))}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.components = tuple(components)
        self.rates = rates / rates.sum()
        self.seq_len = seq_len
        self.global_rows = global_rows
        self.rows = process_rows(global_rows, spec.process_index, spec.process_count)
        orders = [LaneOrder(c.name, len(c.documents), global_rows, seed) for c in components]
        self._lanes = [
            [_lane_documents(order, component.documents, lane) for order, component in zip(orders, components)]
            for lane in self.rows
        ]
        self._phases = np.stack([lane_phase(seed, lane, names, seq_len) for lane in self.rows])
        self._state = np.zeros(self.state_shape, np.int64)
        self._pool = (ThreadPoolExecutor(spec.num_threads, thread_name_prefix="BatchMaker") if spec.num_threads > 1
                      else None)

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return (len(self.rows), len(self.components), len(STATE_FIELDS))

    def get_state(self) -> np.ndarray:
        return self._state.copy()

    def set_state(self, state: np.ndarray) -> None:
        state = np.asarray(state)
        if state.shape != self.state_shape:
            raise ValueError(
                f"data state has shape {state.shape}, expected {self.state_shape} = (rows of this process "
                f"{self.rows.start}..{self.rows.stop - 1}, components {[c.name for c in self.components]}, "
                f"fields {STATE_FIELDS})"
            )
        if not np.issubdtype(state.dtype, np.integer) or (state < 0).any():
            raise ValueError(f"data state must hold non-negative integers, got dtype {state.dtype}")
        self._state = state.astype(np.int64)
        for lane_documents in self._lanes:
            for documents in lane_documents:
                documents.clear()

    def next_batch(self) -> dict[str, np.ndarray]:
        """This process's rows of the next global batch; advances the state."""
        batch = empty_batch(len(self.rows), self.seq_len)
        if self._pool is None:
            for row in range(len(self.rows)):
                self._fill_row(batch, row)
        else:
            list(self._pool.map(functools.partial(self._fill_row, batch), range(len(self.rows))))
        return batch

    def _fill_row(self, batch: dict[str, np.ndarray], row: int) -> None:
        """Packs one lane's next row; touches only that lane's state and documents (so rows run in parallel)."""
        state = self._state[row]
        c = choose_component(state[:, _TOKENS], self.rates, self._phases[row])
        documents = self._lanes[row][c]
        pieces, (counter, offset) = plan_row(
            self.components[c].packing,
            self.seq_len,
            (int(state[c, _DOCUMENT]), int(state[c, _OFFSET])),
            documents.pairs,
        )
        state[c, _TOKENS] += write_row(batch, row, pieces, documents.get)
        state[c, _DOCUMENT], state[c, _OFFSET] = counter, offset
        documents.forget_before(counter)


class _Failure:
    """An exception raised in the prefetch thread, handed to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


def _produce(maker: BatchMaker, out: queue.Queue, stop: threading.Event) -> None:
    """Prefetch thread: puts (batch, state after it) until stopped, or a `_Failure` and returns. It holds no
    reference to the `TrainStream`, so a stream that is dropped without `close()` is collected and stops it."""
    while not stop.is_set():
        try:
            item = (maker.next_batch(), maker.get_state())
        except BaseException as error:  # handed to the consumer, which re-raises it
            item = _Failure(error)
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                break
            except queue.Full:
                continue
        if isinstance(item, _Failure):
            return


class TrainStream:
    """Iterates this process's rows of the global training batches, prefetching in a background thread.

    `get_state()` describes the batches consumed (returned by `next()`), never the prefetched ones; `set_state()`
    accepts a state from `get_state()` (or the rows of this process from a concatenation of all processes' states)
    and the stream then continues exactly as an uninterrupted one would. `num_threads` packs rows in parallel
    (same batches for any value).
    """

    def __init__(self, components: Sequence[StreamComponent], spec: StreamSpec):
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._maker = BatchMaker(components, spec)
        self._prefetch = spec.prefetch
        self._consumed_state = self._maker.get_state()

    @property
    def rows(self) -> range:
        """The global rows this process owns."""
        return self._maker.rows

    @property
    def global_state_shape(self) -> tuple[int, int, int]:
        """Shape of the concatenation of every process's state: [global rows, components, 3]."""
        return (self._maker.global_rows, *self._maker.state_shape[1:])

    @property
    def component_names(self) -> tuple[str, ...]:
        return tuple(component.name for component in self._maker.components)

    def get_state(self) -> np.ndarray:
        """int64 [local rows, components, 3] after the last batch returned by `next()`."""
        return self._consumed_state.copy()

    def set_state(self, state: np.ndarray) -> None:
        """Continue after the batches that `state` describes (discards anything prefetched)."""
        self._stop_prefetch()
        self._maker.set_state(state)
        self._consumed_state = self._maker.get_state()

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._prefetch <= 0:
            batch = self._maker.next_batch()
            self._consumed_state = self._maker.get_state()
            return batch
        if self._thread is None:
            self._start_prefetch()
        item = self._queue.get()
        if isinstance(item, _Failure):
            self._stop_prefetch()
            raise item.error
        batch, self._consumed_state = item
        return batch

    def close(self) -> None:
        """Stops the prefetch thread (the stream can still be resumed with `set_state`)."""
        self._stop_prefetch()

    def __enter__(self) -> TrainStream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _start_prefetch(self) -> None:
        self._queue = queue.Queue(maxsize=self._prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_produce, args=(self._maker, self._queue, self._stop), name="TrainStream-prefetch", daemon=True
        )
        self._thread.start()

    def __del__(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _stop_prefetch(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = self._queue = self._stop = None
        self._maker.set_state(self._consumed_state)


class EvalStream:
    """Finite batches of a held-out split: each document exactly once, packed, split over processes.

    Process p packs documents p, p + P, p + 2P, ... in order into rows and yields batches of its rows of the
    global batch; the last batch is padded with empty rows (loss weight 0). With several processes, every process
    yields the same number of batches (`num_batches()`, computed from all documents' lengths), padding with empty
    batches, so that collective evaluation steps line up.
    """

    def __init__(self, documents: DocumentSource, spec: StreamSpec, *, packing: str):
        """`spec`'s seed, prefetch and threads are unused: held-out batches are in document order."""
        if packing not in PACKING_MODES:
            raise ValueError(f"unknown packing {packing!r}; expected one of {PACKING_MODES}")
        self.documents = documents
        self.packing = packing
        self.seq_len = spec.seq_len
        self.global_rows = spec.global_rows
        self.rows = process_rows(spec.global_rows, spec.process_index, spec.process_count)
        self.process_index = spec.process_index
        self.process_count = spec.process_count
        self._pairs: list[int] | None = None

    def _local(self, process_index: int) -> range:
        """Indices of the documents process `process_index` evaluates."""
        return range(process_index, len(self.documents), self.process_count)

    def _row_plans(self, num_local: int, pairs_of: Callable[[int], int]) -> Iterator[list[Piece]]:
        """The pieces of each row, packing `num_local` documents whose counter j has `pairs_of(j)` pairs."""
        cursor = (0, 0)
        while cursor[0] < num_local:
            pieces, cursor = plan_row(self.packing, self.seq_len, cursor, pairs_of, num_local)
            if pieces:
                yield pieces

    def num_batches(self) -> int:
        """Batches every process yields: the most any process needs (reads every document once to count)."""
        if self._pairs is None:
            self._pairs = [num_pairs(self.documents[i]) for i in range(len(self.documents))]
        most_rows = 0
        for process_index in range(self.process_count):
            local = self._local(process_index)
            rows = sum(1 for _ in self._row_plans(len(local), lambda j: self._pairs[local[j]]))
            most_rows = max(most_rows, rows)
        return -(-most_rows // len(self.rows))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        local = self._local(self.process_index)
        documents = _DocumentCache(lambda j: self.documents[local[j]])
        rows_per_batch = len(self.rows)
        yielded = 0
        batch, row = empty_batch(rows_per_batch, self.seq_len), 0
        for pieces in self._row_plans(len(local), documents.pairs):
            write_row(batch, row, pieces, documents.get)
            documents.forget_before(pieces[-1].document)
            row += 1
            if row == rows_per_batch:
                yield batch
                yielded += 1
                batch, row = empty_batch(rows_per_batch, self.seq_len), 0
        if row:
            yield batch
            yielded += 1
        if self.process_count > 1:
            for _ in range(self.num_batches() - yielded):
                yield empty_batch(rows_per_batch, self.seq_len)
