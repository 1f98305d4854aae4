"""Streaming safetensors reading and writing: one tensor in memory at a time.

Reading uses safetensors' lazy `safe_open` (single file or sharded with `model.safetensors.index.json`).
Writing plans every shard's header from the tensor shapes first, then streams each tensor's bytes into place,
so a multi-gigabyte shard never sits in memory. Pickle checkpoints (`*.bin`, `*.pt`) are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from typing import Iterable

import numpy as np
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPE_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int32": "I32",
                "int64": "I64"}


class ConversionError(RuntimeError):
    """Bad conversion input or output; the message names the file and tensor."""


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1024' -> bytes (decimal units, as Hugging Face uses)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not match:
        raise ConversionError(f"--max_shard_size {text!r}: expected a size like 5GB, 500MB or a byte count")
    units = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
             "T": 10**12, "TB": 10**12}
    return int(float(match.group(1)) * units[match.group(2)])


class SafetensorsReader:
    """Lazy access to the tensors of a Hugging Face model directory."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self._file_of = self._locate_files(hf_dir)
        self._handles: dict[str, object] = {}

    @staticmethod
    def _locate_files(hf_dir: str) -> dict[str, str]:
        index_path = os.path.join(hf_dir, INDEX_FILE)
        single_path = os.path.join(hf_dir, SINGLE_FILE)
        if os.path.exists(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index_path}: not a valid safetensors index ({e})") from None
            files = {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
            for path in sorted(set(files.values())):
                if not os.path.exists(path):
                    raise ConversionError(f"{index_path} lists shard {os.path.basename(path)}, which is missing "
                                          f"from {hf_dir}")
            return files
        if os.path.exists(single_path):
            return {name: single_path for name in _keys(single_path)}
        pickles = [f for f in sorted(os.listdir(hf_dir)) if f.endswith((".bin", ".pt", ".pth"))] \
            if os.path.isdir(hf_dir) else []
        if pickles:
            raise ConversionError(
                f"{hf_dir} holds only pickle weights ({', '.join(pickles)}); they are not loaded because unpickling "
                "can run arbitrary code. Convert them to safetensors first, e.g. with transformers: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)")
        raise ConversionError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")

    def names(self) -> set[str]:
        return set(self._file_of)

    def read(self, name: str, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
        """One tensor as a numpy array (bfloat16 via ml_dtypes); ConversionError naming file and tensor."""
        path = self._file_of.get(name)
        if path is None:
            raise ConversionError(f"{self.hf_dir}: tensor {name!r} is missing from the checkpoint")
        try:
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = safe_open(path, framework="flax")
            if name not in handle.keys():
                raise ConversionError(f"{path}: the index places tensor {name!r} in this file, but it is not there")
            array = np.asarray(handle.get_tensor(name))
        except ConversionError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files.
            raise ConversionError(f"{path}: cannot read tensor {name!r}: {e}") from None
        if expected_shape is not None and tuple(array.shape) != tuple(expected_shape):
            raise ConversionError(f"{path}: tensor {name!r} has shape {tuple(array.shape)} but config.json implies "
                                  f"{tuple(expected_shape)}")
        return array


def _keys(path: str) -> list[str]:
    try:
        with safe_open(path, framework="flax") as f:
            return list(f.keys())
    except Exception as e:
        raise ConversionError(f"{path}: not a readable safetensors file: {e}") from None


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * np.dtype(_numpy_dtype(dtype)).itemsize


def _numpy_dtype(dtype: str):
    import ml_dtypes

    return ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)


class ShardedSafetensorsWriter:
    """Writes tensors, given in a fixed order, into shards of at most `max_shard_bytes` plus an index.

    `plan` lists (name, shape, dtype) in the order `write` will receive them; headers are written up front.
    """

    def __init__(self, out_dir: str, plan: list[tuple[str, tuple[int, ...], str]], max_shard_bytes: int):
        self.out_dir = out_dir
        self._shards = _split(plan, max_shard_bytes)
        total = len(self._shards)
        self._file_names = [SINGLE_FILE] if total == 1 else \
            [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        self._expected = iter([(shard_index, entry) for shard_index, shard in enumerate(self._shards)
                               for entry in shard])
        self._open_index = -1
        self._file = None
        self.total_bytes = sum(_nbytes(shape, dtype) for _, shape, dtype in plan)

    def write(self, name: str, array: np.ndarray) -> None:
        try:
            shard_index, (want_name, shape, dtype) = next(self._expected)
        except StopIteration:
            raise ConversionError(f"tensor {name!r} was not in the export plan") from None
        if name != want_name or tuple(array.shape) != tuple(shape):
            raise ConversionError(f"export order broken: expected {want_name} {shape}, got {name} {array.shape}")
        if shard_index != self._open_index:
            self._start_shard(shard_index)
        self._file.write(np.ascontiguousarray(array.astype(_numpy_dtype(dtype), copy=False)).tobytes())

    def _start_shard(self, index: int) -> None:
        self._close_file()
        header, offset = {}, 0
        for name, shape, dtype in self._shards[index]:
            size = _nbytes(shape, dtype)
            header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._file = open(os.path.join(self.out_dir, self._file_names[index]), "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._open_index = index

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> list[str]:
        """Close the last shard, write the index when sharded; return the file names written."""
        self._close_file()
        leftover = next(self._expected, None)
        if leftover is not None:
            raise ConversionError(f"export incomplete: tensor {leftover[1][0]} was never written")
        if len(self._file_names) > 1:
            weight_map = {name: self._file_names[i] for i, shard in enumerate(self._shards) for name, _, _ in shard}
            with open(os.path.join(self.out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
            return self._file_names + [INDEX_FILE]
        return list(self._file_names)


def _split(plan: Iterable[tuple[str, tuple[int, ...], str]], max_bytes: int) -> list[list]:
    shards: list[list] = [[]]
    used = 0
    for entry in plan:
        size = _nbytes(entry[1], entry[2])
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += size
    return shards


def dtype_name(array_dtype) -> str:
    """Our dtype name for a numpy dtype (bfloat16 included)."""
    name = np.dtype(array_dtype).name
    if name not in _DTYPE_CODES:
        raise ConversionError(f"dtype {name} cannot be written to safetensors by this exporter")
    return name

