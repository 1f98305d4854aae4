"""Hugging Face safetensors -> our Orbax checkpoint, streaming one parameter at a time.

Each of our parameters is built from its HF tensors (a stacked parameter from one tensor per layer) and
appended to the checkpoint with Orbax partial saving, so peak memory stays near our largest parameter: with
scanned layers that is all layers of one matrix (3.8 GB of MLP for Llama-3-8B in bf16); unscanned
(`scan_layers=False`), the largest HF tensor.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Callable

from etils import epath
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp_v1
from orbax.checkpoint.experimental.v1 import partial

from hephaestus_jax.stored_checkpoint import CheckpointMetadata, absolute, numpy_dtype
from hephaestus_jax.config import ConfigError, ModelConfig
from hephaestus_jax.convert import mapping, remote
from hephaestus_jax.convert.safetensors_io import ConversionError, SafetensorsReader

# Tensors some HF checkpoints carry that hold no weights of their own.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_dtype(hf_config: dict[str, Any]) -> str:
    """The checkpoint dtype declared in config.json (either dialect), default float32."""
    return str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32")


def read_hf_config(hf_dir: str, **runtime: Any) -> tuple[ModelConfig, dict[str, Any]]:
    """(our ModelConfig, the raw config.json dict) of a Hugging Face model directory."""
    with remote.local_input(os.path.join(hf_dir, "config.json")) as path:  # gs://: a local copy.
        config = ModelConfig.from_hf_file(path, **runtime)
        with open(path, encoding="utf-8") as f:
            return config, json.load(f)


def check_tensor_names(reader: SafetensorsReader, config: ModelConfig) -> None:
    """ConversionError for missing tensors, or for extra ones that would mean an unsupported architecture."""
    expected = mapping.expected_hf_names(config)
    present = reader.names()
    missing = sorted(expected - present)
    if missing:
        raise ConversionError(f"{reader.hf_dir}: {len(missing)} tensors required by config.json are missing, "
                              f"e.g. {missing[:3]}")
    extra = sorted(n for n in present - expected if not n.endswith(_IGNORABLE_SUFFIXES))
    if config.tie_word_embeddings and "lm_head.weight" in extra:
        logging.warning("%s: tie_word_embeddings=true; ignoring the stored lm_head.weight", reader.hf_dir)
        extra.remove("lm_head.weight")
    if extra:
        raise ConversionError(f"{reader.hf_dir}: tensors not explained by config.json {extra[:5]} (layer count, "
                              "biases or tied embeddings disagree with config.json?)")


def convert_hf_to_orbax(hf_dir: str, output_dir: str, dtype: str | None = None,
                        check: Callable[[str, str], None] | None = None, **runtime: Any) -> ModelConfig:
    """Write `output_dir/0` from the HF model in `hf_dir`; returns the stored ModelConfig.

    `dtype` is the stored parameter dtype (default: config.json's). `runtime` sets other ModelConfig runtime
    fields (scan_layers, vocab_pad_multiple, ...). The checkpoint is written under a temporary name and moved to
    `output_dir` when complete, after `check(local hf_dir, written checkpoint_dir)` (e.g. `verify.Verifier`)
    returns: on any error, a failed check included, nothing is left at `output_dir`. A remote `hf_dir` or
    `output_dir` (gs://...) is staged through a local temporary directory (convert/remote.py).
    """
    with remote.local_input(hf_dir) as local_dir, remote.local_output(output_dir) as local_out:
        config = _convert(local_dir, hf_dir, local_out, dtype, **runtime)
        if check is not None:
            check(local_dir, local_out)
        return config


def _convert(hf_dir: str, source: str, output_dir: str, dtype: str | None, **runtime: Any) -> ModelConfig:
    """convert_hf_to_orbax from the local directory `hf_dir` (a copy of `source` when that is remote) into the
    new, empty `output_dir`."""
    probe, hf_config = read_hf_config(hf_dir)
    dtype = dtype or hf_dtype(hf_config)
    try:
        config = probe.replace(param_dtype=dtype, dtype=runtime.pop("compute_dtype", dtype), **runtime)
    except ConfigError as e:
        raise ConversionError(f"{hf_dir}: {e}") from None
    reader = SafetensorsReader(hf_dir)
    check_tensor_names(reader, config)
    origin = source if remote.is_remote(source) else os.path.abspath(source)
    metadata = CheckpointMetadata(model_config=config, kind="converted", source=f"hf:{origin}")
    _write_params(reader, config, absolute(output_dir) / "0", metadata)
    return config


def _storage_context() -> ocp_v1.Context:
    """Uncompressed (weights barely compress), without Orbax's re-read of the merged checkpoint after each
    partial save (`--verify` checks the result end to end), and without Orbax's defensive copy of each numpy array
    (a second copy of the parameter in memory; we do not touch the array until the save has returned). Arrays
    stay one chunk each: with smaller chunks TensorStore buffers a copy of the whole array while writing. What
    each of these cost: docs/performance.md, "Figures behind shipped settings"."""
    context = ocp_v1.Context()
    context.array.saving.use_compression = False
    context.array.saving.enable_post_merge_validation = False
    context.memory_options.deepcopy_host_arrays = False
    return context


def _write_params(reader: SafetensorsReader, config: ModelConfig, step_dir: epath.Path,
                  metadata: CheckpointMetadata) -> None:
    """Append each parameter to the step with Orbax partial saving, then finalize the step.

    Every parameter is assembled in one buffer, allocated once for the largest (clearing the fresh pages of a
    new array per parameter cost time: docs/performance.md). Reusing it is safe: each partial save has
    finished writing before it returns, and Orbax is told not to copy the array (`_storage_context`).
    """
    dtype = numpy_dtype(config.param_dtype)
    entries = list(mapping.entries(config))
    buffer = np.empty(max(math.prod(mapping.our_shape(e)) for e in entries), dtype)
    for entry in entries:
        shape = mapping.our_shape(entry)
        value = buffer[:math.prod(shape)].reshape(shape)
        mapping.fill_ours(entry, lambda name, out, entry=entry: reader.read_into(name, out, entry.hf_shape), value)
        tree: dict = {}
        mapping.set_path(tree, ("params",) + entry.path, value)
        with _storage_context():
            partial.save(step_dir, tree, custom_metadata=metadata.to_json())
    partial.finalize(step_dir)
