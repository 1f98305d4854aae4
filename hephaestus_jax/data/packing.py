"""Packing documents into fixed-length rows of training pairs.

A document d[0..n-1] with loss mask m gives n-1 training pairs (input d[i], target d[i+1], weight m[i+1]) at
position i. A row holds `seq_len` pairs from one or more *pieces* (consecutive pairs of one document); each piece
gets its own segment id (1, 2, ...; 0 marks padding) and keeps its positions from the document, so a document
split over rows continues its positions. Tokens are never dropped.

Two modes:
- `CONCAT` (continual pre-training): rows are filled completely; a document that does not fit continues in
  the next row.
- `GREEDY` (SFT): whole documents while they fit; the row is closed with padding when the next one does not fit;
  a document longer than a row is split into row-sized pieces (its last piece may share a row with the next ones).

Packing is split into *planning* (which pieces go into a row: needs only document lengths) and *writing*
(copying the pieces' tokens), so the number of rows of a document list can be computed from lengths alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hephaestus_jax.data.example import Example

CONCAT = "concat"
GREEDY = "greedy"
PACKING_MODES = (CONCAT, GREEDY)

BATCH_FIELDS = ("inputs", "targets", "positions", "segment_ids", "loss_weights")
"""Fields of a batch: int32 arrays [rows, seq_len]. Padding has segment id 0 and loss weight 0 (and zeros elsewhere)."""

MAX_EMPTY_RUN = 10_000
"""Consecutive documents without pairs after which an unlimited source is taken to be empty."""

Cursor = tuple[int, int]
"""(document counter, pair offset in that document): where packing resumes."""


@dataclass(frozen=True)
class Piece:
    """Pairs [start, start + count) of document `document` (its counter in the packed sequence)."""

    document: int
    start: int
    count: int


def num_pairs(example: Example) -> int:
    """Number of training pairs of a document: one less than its tokens (none for a 0- or 1-token document)."""
    return max(int(example.tokens.shape[0]) - 1, 0)


def empty_batch(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """An all-padding batch."""
    return {name: np.zeros((rows, seq_len), np.int32) for name in BATCH_FIELDS}


def plan_row(
    mode: str,
    seq_len: int,
    cursor: Cursor,
    pairs_of: Callable[[int], int],
    num_documents: int | None = None,
) -> tuple[list[Piece], Cursor]:
    """The pieces of the next row starting at `cursor`, and the cursor after them.

    `pairs_of(j)` is the number of pairs of document j. With `num_documents`, packing stops after document
    `num_documents - 1` (the row may then be partly or entirely empty); without, documents are unlimited.
    Documents without pairs are passed over; with unlimited documents, more than `MAX_EMPTY_RUN` of them in a
    row raise, so a source of only empty documents cannot loop forever.
    """
    if mode not in PACKING_MODES:
        raise ValueError(f"unknown packing mode {mode!r}; expected one of {PACKING_MODES}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    document, offset = cursor
    pieces: list[Piece] = []
    space = seq_len
    empty_run = 0
    while space > 0 and (num_documents is None or document < num_documents):
        remaining = pairs_of(document) - offset
        if remaining <= 0:
            empty_run += 1
            if num_documents is None and empty_run > MAX_EMPTY_RUN:
                raise ValueError(
                    f"{empty_run} consecutive documents (up to counter {document}) have no training pair (fewer than "
                    "2 tokens); the source looks empty"
                )
            document, offset = document + 1, 0
            continue
        empty_run = 0
        if mode == GREEDY and remaining > space and space < seq_len:
            break  # does not fit: close the row with padding; the document starts the next row
        take = min(space, remaining)
        pieces.append(Piece(document, offset, take))
        space -= take
        if take == remaining:
            document, offset = document + 1, 0
        else:
            offset += take
    return pieces, (document, offset)


def write_row(
    batch: dict[str, np.ndarray], row: int, pieces: list[Piece], document_of: Callable[[int], Example]
) -> int:
    """Writes `pieces` into row `row` of a zero-initialised batch; returns the number of pairs written."""
    column = 0
    for segment_id, piece in enumerate(pieces, start=1):
        example = document_of(piece.document)
        start, end = piece.start, piece.start + piece.count
        columns = slice(column, column + piece.count)
        batch["inputs"][row, columns] = example.tokens[start:end]
        batch["targets"][row, columns] = example.tokens[start + 1 : end + 1]
        batch["loss_weights"][row, columns] = example.loss_mask[start + 1 : end + 1]
        batch["positions"][row, columns] = np.arange(start, end, dtype=np.int32)
        batch["segment_ids"][row, columns] = segment_id
        column += piece.count
    return column


def pack_documents(documents: list[Example], mode: str, seq_len: int) -> dict[str, np.ndarray]:
    """All rows of a finite list of documents packed in order: a convenience for tests and small data."""
    rows: list[list[Piece]] = []
    cursor: Cursor = (0, 0)
    while cursor[0] < len(documents):
        pieces, cursor = plan_row(mode, seq_len, cursor, lambda j: num_pairs(documents[j]), len(documents))
        if pieces:
            rows.append(pieces)
    batch = empty_batch(len(rows), seq_len)
    for row, pieces in enumerate(rows):
        write_row(batch, row, pieces, documents.__getitem__)
    return batch
