"""On-disk format of one prepared (rendered and tokenized) example: a fixed little-endian binary layout, no pickle.

    offset 0   4 bytes   magic b"HFXE"
    offset 4   uint32    format version (1)
    offset 8   uint32    n, the number of tokens
    offset 12  int32[n]  tokens
    then       uint8[n]  loss mask (0 or 1)

Prepared shards (ArrayRecord files written by tools/prepare_data.py) hold one such record per document.
"""

from __future__ import annotations

import struct

import numpy as np

from hephaestus_jax.data.example import Example
from hephaestus_jax.errors import InputError

MAGIC = b"HFXE"
VERSION = 1
_HEADER = struct.Struct("<4sII")


class RecordFormatError(InputError, ValueError):
    """A prepared record that does not follow the layout above; the message names where it came from."""


def encode_example(example: Example) -> bytes:
    """The bytes of one example in the layout above."""
    mask = example.loss_mask
    if mask.size and (mask.min() < 0 or mask.max() > 1):
        raise ValueError(f"loss_mask must hold only 0 and 1, got values in [{mask.min()}, {mask.max()}]")
    header = _HEADER.pack(MAGIC, VERSION, example.tokens.size)
    return header + example.tokens.astype("<i4").tobytes() + mask.astype(np.uint8).tobytes()


def decode_example(data: bytes, origin: str = "<record>") -> Example:
    """Parses bytes written by `encode_example`; `origin` (e.g. "shard.arrayrecord#12") names the record in errors."""
    if len(data) < _HEADER.size:
        raise RecordFormatError(f"{origin}: {len(data)} bytes is shorter than the {_HEADER.size}-byte header")
    magic, version, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise RecordFormatError(f"{origin}: bad magic {magic!r}, expected {MAGIC!r} (not a prepared Forge record)")
    if version != VERSION:
        raise RecordFormatError(f"{origin}: format version {version}, this code reads version {VERSION}")
    expected = _HEADER.size + 5 * length
    if len(data) != expected:
        raise RecordFormatError(f"{origin}: {len(data)} bytes, expected {expected} for {length} tokens")
    tokens = np.frombuffer(data, dtype="<i4", count=length, offset=_HEADER.size).astype(np.int32)
    mask = np.frombuffer(data, dtype=np.uint8, count=length, offset=_HEADER.size + 4 * length).astype(np.int32)
    if mask.size and mask.max() > 1:
        raise RecordFormatError(f"{origin}: loss mask holds {mask.max()}, expected only 0 and 1")
    return Example(tokens, mask)
