"""Streaming safetensors reading and writing: one tensor in memory at a time.

Reading parses each file's header once and reads tensors one at a time (single file or sharded with
`model.safetensors.index.json`).
Writing computes every shard's header from the tensor shapes first, then appends blocks of elements in file
order, so neither a shard nor a whole tensor ever needs to sit in memory. Pickle checkpoints (`*.bin`, `*.pt`)
are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from typing import Iterable

import numpy as np

from hephaestus_jax.convert import direct_io
from hephaestus_jax.errors import InputError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPE_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int32": "I32",
                "int64": "I64"}
_DTYPE_NAMES = {code: name for name, code in _DTYPE_CODES.items()}


class ConversionError(InputError, RuntimeError):
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
    """Lazy access to the tensors of a Hugging Face model directory.

    Headers are parsed once; each tensor is then read with positioned reads into a fresh buffer or one the
    caller gives (`read_into`). (No mmap: pages of a mapped file count towards the process's resident memory,
    which would grow with the model.)
    """

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self._file_of = self._locate_files(hf_dir)
        self._headers: dict[str, tuple[int, dict]] = {}

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
            return {name: single_path for name in _read_header(single_path)[1]}
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
        located = self._locate(name, expected_shape)
        info = located[2]
        out = np.empty(math.prod(info["shape"]), _numpy_dtype(_DTYPE_NAMES[info["dtype"]]))
        self._read_located(name, located, out)
        return out.reshape(info["shape"])

    def read_into(self, name: str, out: np.ndarray, expected_shape: tuple[int, ...] | None = None) -> None:
        """Read tensor `name` into the flat contiguous `out` (its element count), cast to `out`'s dtype.

        When the dtypes agree the bytes go straight from the file into `out`: no intermediate buffer.
        """
        self._read_located(name, self._locate(name, expected_shape), out)

    @staticmethod
    def _read_located(name: str, located: tuple[str, int, dict], out: np.ndarray) -> None:
        path, data_start, info = located
        stored = np.dtype(_numpy_dtype(_DTYPE_NAMES[info["dtype"]]))
        if out.ndim != 1 or out.size != math.prod(info["shape"]):
            raise ValueError(f"read_into({name!r}): destination of shape {out.shape}, tensor of {info['shape']}")
        target = out if out.dtype == stored else np.empty(out.size, stored)
        view, offset, done = memoryview(target.view(np.uint8)), data_start + info["data_offsets"][0], 0
        fd = os.open(path, os.O_RDONLY)
        try:
            while done < len(view):  # Linux reads at most ~2 GiB per call.
                count = os.preadv(fd, [view[done:]], offset + done)
                if count == 0:
                    raise ConversionError(f"{path}: truncated while reading tensor {name!r}")
                done += count
        finally:
            os.close(fd)
        if target is not out:
            out[...] = target

    def _locate(self, name: str, expected_shape: tuple[int, ...] | None) -> tuple[str, int, dict]:
        """(file, offset of its data section, header entry) of tensor `name`, its shape checked."""
        path = self._file_of.get(name)
        if path is None:
            raise ConversionError(f"{self.hf_dir}: tensor {name!r} is missing from the checkpoint")
        if path not in self._headers:
            self._headers[path] = _read_header(path)
        data_start, header = self._headers[path]
        if name not in header:
            raise ConversionError(f"{path}: the index places tensor {name!r} in this file, but it is not there")
        info = header[name]
        if expected_shape is not None and tuple(info["shape"]) != tuple(expected_shape):
            raise ConversionError(f"{path}: tensor {name!r} has shape {tuple(info['shape'])} but config.json "
                                  f"implies {tuple(expected_shape)}")
        return path, data_start, info


def _read_header(path: str) -> tuple[int, dict]:
    """(offset of the data section, {tensor name: header entry}) with every offset checked against the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if length < 2 or 8 + length > size:
            raise ConversionError(f"{path}: not a readable safetensors file (header length {length}, file size {size})")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path}: not a readable safetensors file (bad header: {e})") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    for name, info in header.items():
        if info.get("dtype") not in _DTYPE_NAMES:
            raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        if end > data_size:
            raise ConversionError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data section, "
                                  f"which holds only {data_size} bytes")
        if end - begin != _nbytes(tuple(info["shape"]), _DTYPE_NAMES[info["dtype"]]):
            raise ConversionError(f"{path}: tensor {name!r}: header offsets do not match its shape and dtype")
    return 8 + length, header


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * np.dtype(_numpy_dtype(dtype)).itemsize


def _numpy_dtype(dtype: str):
    import ml_dtypes

    return ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)


class ShardedSafetensorsWriter:
    """Safetensors shards of at most `max_shard_bytes`, written front to back.

    `plan` lists (name, shape, dtype) in file order. `write` takes each tensor's elements (C order) in runs of
    any size, following the plan (anything else is a ConversionError), so neither a shard nor a whole tensor
    sits in memory and every file is written sequentially, bypassing the page cache where it can (`direct_io`).
    `finish` checks that every element was written and writes the index when sharded.
    """

    def __init__(self, out_dir: str, plan: list[tuple[str, tuple[int, ...], str]], max_shard_bytes: int):
        shards = _split(plan, max_shard_bytes)
        total = len(shards)
        self.file_names = [SINGLE_FILE] if total == 1 else \
            [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        self.out_dir = out_dir
        self.total_bytes = sum(_nbytes(shape, dtype) for _, shape, dtype in plan)
        self._headers = [_encode_header(shard) for shard in shards]
        # (file index, name, dtype, elements) in writing order.
        self._order = [(index, name, np.dtype(_numpy_dtype(dtype)), math.prod(shape))
                       for index, shard in enumerate(shards) for name, shape, dtype in shard]
        self._next = 0  # Position in `_order` of the tensor being written ...
        self._written = 0  # ... and how many of its elements are.
        self._file: direct_io.SequentialFile | None = None
        self._file_index = -1
        self._skip_empty_tensors()

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        """Write `values` (flattened, cast to the tensor's dtype) as elements [start, start + len) of `name`."""
        expected = self._order[self._next][1] if self._next < len(self._order) else None
        if name != expected or start != self._written:
            raise ConversionError(f"write of tensor {name!r} from element {start}, but the export plan expects "
                                  + (f"{expected!r} from element {self._written}" if expected else "no more data"))
        index, _, dtype, size = self._order[self._next]
        flat = np.ascontiguousarray(values.astype(dtype, copy=False).reshape(-1))
        if start + flat.size > size:
            raise ConversionError(f"write of elements [{start}, {start + flat.size}) outside tensor {name!r} "
                                  f"of {size} elements")
        if index != self._file_index:
            self._open(index)
        self._file.append(flat)
        self._written += flat.size
        self._skip_empty_tensors()

    def finish(self) -> list[str]:
        """Close the shards, write the index when sharded; return the file names written."""
        if self._next < len(self._order):
            missing = [name for _, name, _, _ in self._order[self._next:]]
            raise ConversionError(f"export incomplete: {len(missing)} tensors not fully written, e.g. {missing[:3]}")
        while self._file_index < len(self.file_names) - 1:  # Shards of empty tensors only.
            self._open(self._file_index + 1)
        self._file.close()
        if len(self.file_names) == 1:
            return list(self.file_names)
        weight_map = {name: self.file_names[index] for index, name, _, _ in self._order}
        with open(os.path.join(self.out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
        return self.file_names + [INDEX_FILE]

    def _open(self, index: int) -> None:
        if self._file is not None:
            self._file.close()
        self._file = direct_io.SequentialFile(os.path.join(self.out_dir, self.file_names[index]))
        self._file.append(np.frombuffer(self._headers[index], np.uint8))
        self._file_index = index

    def _skip_empty_tensors(self) -> None:
        while self._next < len(self._order) and self._written == self._order[self._next][3]:
            self._next += 1
            self._written = 0


def _encode_header(shard: list[tuple[str, tuple[int, ...], str]]) -> bytes:
    """A shard's length prefix and JSON header, padded to 8 bytes as safetensors writes it."""
    header, offset = {}, 0
    for name, shape, dtype in shard:
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


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

