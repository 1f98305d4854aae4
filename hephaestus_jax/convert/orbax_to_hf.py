"""Our Orbax checkpoint (converted or training) -> a Hugging Face model directory, in bounded memory.

Each parameter is read in blocks of at most `block_bytes` (whole layers, or leading rows of a layer) through a
chunk cache sized to that parameter, so every stored chunk is read once whatever chunking the checkpoint was
written with, and each block is appended to the safetensors shards (written front to back, with direct I/O where
the filesystem allows) while the next block is read. That works because a block of our leading rows is a
contiguous run of the HF tensor (see `mapping`), and the shards list tensors in our parameter order.
The output loads with `transformers.AutoModelForCausalLM.from_pretrained(dir)` and no custom code. Training
checkpoints export only their params. The directory is assembled under a temporary name and moved into place
when complete (and verified, with --verify), so a failed export never leaves something that looks like a model.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import shutil
from typing import Any, Callable, Iterator

import numpy as np
import tensorstore as ts

from hephaestus_jax import stored_checkpoint as ckpt
from hephaestus_jax.config import ModelConfig
from hephaestus_jax.convert import mapping, remote
from hephaestus_jax.convert.safetensors_io import ConversionError, ShardedSafetensorsWriter, parse_size
from hephaestus_jax.model import llama

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
BLOCK_BYTES = 64 * 2**20


def convert_orbax_to_hf(checkpoint_dir: str, output_dir: str, step: int | None = None, dtype: str | None = None,
                        max_shard_size: str = "5GB", tokenizer_dir: str | None = None,
                        block_bytes: int = BLOCK_BYTES, check: Callable[[str, str], None] | None = None) -> list[str]:
    """Export params of `checkpoint_dir` (latest step by default); returns the files written.

    The directory is moved to `output_dir` when complete, after `check(written hf_dir, checkpoint_dir)` (e.g.
    `verify.Verifier`) returns: on any error, a failed check included, nothing is left at `output_dir`. A remote
    `output_dir` (gs://...) is written to a local temporary directory and uploaded when complete; a remote
    `tokenizer_dir` is copied locally first (convert/remote.py)."""
    with remote.local_output(output_dir) as local_out, remote.local_input(tokenizer_dir) as tokenizer:
        files = _export(checkpoint_dir, local_out, step, dtype, max_shard_size, tokenizer, block_bytes)
        if check is not None:
            check(local_out, checkpoint_dir)
        return files


def _export(checkpoint_dir: str, output_dir: str, step: int | None, dtype: str | None, max_shard_size: str,
            tokenizer_dir: str | None, block_bytes: int) -> list[str]:
    """convert_orbax_to_hf into the new, empty local directory `output_dir`."""
    checkpoint = ckpt.StoredCheckpoint(checkpoint_dir, step)
    config = checkpoint.model_config
    dtype = dtype or config.param_dtype
    stored = checkpoint.shapes
    if "params" not in stored:
        raise ConversionError(f"{checkpoint.where}: checkpoint holds no params")
    ckpt.check_shapes(stored["params"], llama.abstract_params(config), checkpoint.where)

    plan = [(name, entry.hf_shape, dtype) for entry in mapping.entries(config) for name in entry.hf_names]
    # Reading a block (TensorStore) and writing the previous one (pwrite) overlap: both release the GIL.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        writer = ShardedSafetensorsWriter(output_dir, plan, parse_size(max_shard_size))
        _export_params(checkpoint, config, stored["params"], writer, pool, block_bytes)
    files = writer.finish()
    files += _write_configs(output_dir, config, dtype)
    if tokenizer_dir:
        files += _copy_tokenizer(tokenizer_dir, output_dir)
    return files


def _export_params(checkpoint: ckpt.StoredCheckpoint, config: ModelConfig, stored_params: Any,
                   writer: ShardedSafetensorsWriter, pool: concurrent.futures.Executor, block_bytes: int) -> None:
    """Stream every parameter into `writer`, one block read while the previous one is written.

    Blocks are read into two buffers allocated once and used in turn, so at most two blocks are in memory
    (reading into a fresh array per block took twice as long: each new page is a fault).
    """
    buffers = [np.empty(block_bytes, np.uint8) for _ in range(2)]
    pending = None
    for entry in mapping.entries(config):
        store = checkpoint.open_array(("params",) + entry.path,
                                      cache_bytes=_cache_bytes(stored_params, entry.path, block_bytes))
        for first_layer, start, region in _blocks(store, entry.stacked, block_bytes):
            buffers.reverse()  # buffers[0] is not the one the write in flight is reading.
            block = _read_into(region, buffers[0])
            if pending is not None:
                pending.result()  # At most one write in flight.
            pending = pool.submit(_write_block, writer, entry, first_layer, start, block)
    if pending is not None:
        pending.result()


def _write_block(writer: ShardedSafetensorsWriter, entry: mapping.TensorEntry, first_layer: int, start: int,
                 block: np.ndarray) -> None:
    for offset, layer in enumerate(block):
        end = min(start + layer.size, entry.hf_size)  # Elements past the HF size are vocab padding.
        if end > start:
            writer.write(entry.hf_names[first_layer + offset], start, layer[:end - start])


def _blocks(store, stacked: bool, block_bytes: int) -> Iterator[tuple[int, int, Any]]:
    """Blocks of a stored parameter, as (first layer, first flat element within each layer, region of `store`).

    A block is whole layers when they fit in `block_bytes`, else leading rows of one layer (at least one row).
    """
    shape = tuple(store.shape) if stacked else (1,) + tuple(store.shape)
    layers, rows = shape[0], shape[1] if len(shape) > 1 else 1
    row_elements = math.prod(shape[2:])
    row_bytes = row_elements * store.dtype.numpy_dtype.itemsize
    rows_per_block = max(1, block_bytes // row_bytes)
    layers_per_block = max(1, rows_per_block // rows) if rows_per_block >= rows else 1
    for l0 in range(0, layers, layers_per_block):
        l1 = min(l0 + layers_per_block, layers)
        for r0 in range(0, rows, rows_per_block):
            r1 = min(r0 + rows_per_block, rows)
            yield l0, r0 * row_elements, store[l0:l1, r0:r1] if stacked else store[r0:r1][None]


def _read_into(region, buffer: np.ndarray) -> np.ndarray:
    """Read a TensorStore region into the front of `buffer` (grown if the region is larger: a single row can
    exceed the block size); returns it as [layers, elements]."""
    dtype = region.dtype.numpy_dtype
    size = math.prod(region.shape)
    if size * dtype.itemsize > buffer.nbytes:
        buffer = np.empty(size * dtype.itemsize, np.uint8)
    out = buffer[:size * dtype.itemsize].view(dtype).reshape(region.shape)
    ts.array(out, copy=False, write=True).write(region).result()
    return out.reshape(region.shape[0], -1)


def _cache_bytes(stored_params, path: tuple[str, ...], block_bytes: int) -> int:
    """TensorStore chunk cache for reading one parameter block by block: large enough to hold the parameter
    (so a chunk spanning several blocks is read once), with room for the cache's own bookkeeping."""
    size = _param_bytes(stored_params, path)
    return 0 if size <= block_bytes else size + size // 16 + 2**20


def _param_bytes(stored_params, path: tuple[str, ...]) -> int:
    leaf = mapping.get_path(stored_params, path)
    return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def _write_configs(out_dir: str, config: ModelConfig, dtype: str) -> list[str]:
    hf_config = config.to_hf(torch_dtype=dtype)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    generation = {"bos_token_id": hf_config["bos_token_id"], "eos_token_id": hf_config["eos_token_id"]}
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=2)
    return ["config.json", "generation_config.json"]


def _copy_tokenizer(tokenizer_dir: str, out_dir: str) -> list[str]:
    source = tokenizer_dir if os.path.isdir(tokenizer_dir) else os.path.dirname(tokenizer_dir)
    copied = [name for name in TOKENIZER_FILES if os.path.exists(os.path.join(source, name))]
    if not copied:
        raise ConversionError(f"--tokenizer_dir {tokenizer_dir}: none of {TOKENIZER_FILES} found")
    for name in copied:
        shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
    return copied
