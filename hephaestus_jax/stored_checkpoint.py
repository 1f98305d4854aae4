"""What a hephaestus_jax checkpoint is on disk, and how parameters are read from one.

A checkpoint directory is an Orbax CheckpointManager root; each step directory holds

    state/    Orbax pytree {"params": ..., and for training checkpoints "opt_state", "step", "data_state"}
    _CHECKPOINT_METADATA   Orbax's step metadata; its custom_metadata is our `CheckpointMetadata` (JSON):
                           format version, the full ModelConfig (which records the layout: scanned layers or
                           not, param dtype, vocabulary padding), what produced it and the gin config text.

Converted Hugging Face checkpoints are step 0 with params only. Orbax writes a step under a temporary name and
renames it when complete, so a partially written step is never listed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from hephaestus_jax.config import ModelConfig
from hephaestus_jax.errors import InputError
from hephaestus_jax.model import llama

FORMAT_NAME = "hephaestus_jax"
FORMAT_VERSION = 1
STATE_ITEM = "state"  # The item name Orbax's partial saving uses; training checkpoints use it too.

# ModelConfig fields that only say how the model is run or stored; they may differ between checkpoint and job.
RUNTIME_FIELDS = ("vocab_pad_multiple", "dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl",
                  "logits_chunk_size")


class CheckpointError(InputError, RuntimeError):
    """A checkpoint is missing, unreadable or does not match the configuration; the message says which."""


@dataclasses.dataclass(frozen=True)
class CheckpointMetadata:
    model_config: ModelConfig
    kind: str  # "converted" (params only) or "train" (params + optimizer state + step + data state)
    source: str = ""
    gin_config: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": self.kind, "source": self.source,
                "gin_config": self.gin_config, "model_config": self.model_config.to_json_dict()}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "CheckpointMetadata":
        if data.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{where}: not a hephaestus_jax checkpoint (no '{FORMAT_NAME}' metadata); "
                                  "convert Hugging Face weights with tools/convert_hf_to_orbax.py first")
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{where}: checkpoint format_version={data.get('format_version')} is not "
                                  f"supported (this code reads version {FORMAT_VERSION})")
        return cls(model_config=ModelConfig.from_json_dict(data["model_config"]), kind=data["kind"],
                   source=data.get("source", ""), gin_config=data.get("gin_config", ""))


def absolute(path: str | epath.Path) -> epath.Path:
    """Local paths made absolute (Orbax requires it); URLs such as gs://... unchanged."""
    return epath.Path(path if "://" in str(path) else os.path.abspath(str(path)))


def manager(directory: str | epath.Path, **options: Any) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` with our single `state` item."""
    return ocp.CheckpointManager(absolute(directory), item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler()},
                                 options=ocp.CheckpointManagerOptions(**options) if options else None)


def architecture_mismatches(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Fields (outside RUNTIME_FIELDS) on which two configs disagree, formatted `field: a vs b`."""
    return [f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}" for f in dataclasses.fields(ModelConfig)
            if f.name not in RUNTIME_FIELDS and getattr(a, f.name) != getattr(b, f.name)]


def check_shapes(stored: Any, expected: Any, where: str) -> None:
    """CheckpointError naming the parameter and both shapes on the first mismatch."""
    stored_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(stored)}
    expected_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    missing = sorted(set(expected_flat) - set(stored_flat))
    if missing:
        raise CheckpointError(f"{where}: parameters missing from the checkpoint: {missing[:5]}")
    for key, want in expected_flat.items():
        if tuple(stored_flat[key].shape) != tuple(want.shape):
            raise CheckpointError(f"{where}: parameter {key} has shape {tuple(stored_flat[key].shape)} in the "
                                  f"checkpoint but the model config expects {tuple(want.shape)}")


def convert_layout(params: Any, source: ModelConfig, target: ModelConfig) -> Any:
    """Re-express params stored for `source` in `target`'s layout: scanned or not, vocabulary padding, dtype.

    Works on numpy or jax arrays and inside jit. Architectures must match (see `architecture_mismatches`).
    """
    params = dict(params)
    if source.scan_layers and not target.scan_layers:
        stacked = params.pop("layers")
        for i in range(source.num_layers):
            params[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    elif target.scan_layers and not source.scan_layers:
        layers = [params.pop(f"layers_{i}") for i in range(source.num_layers)]
        params["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    rows = target.padded_vocab_size
    if rows != source.padded_vocab_size:
        params["embed"] = _resize_vocab(params["embed"], rows, axis=0, vocab=target.vocab_size)
        if "lm_head" in params:
            params["lm_head"] = _resize_vocab(params["lm_head"], rows, axis=0, vocab=target.vocab_size)
    dtype = jnp.dtype(target.param_dtype)
    return jax.tree.map(lambda a: a.astype(dtype), params)


def _resize_vocab(w, rows: int, axis: int, vocab: int):
    w = jax.lax.slice_in_dim(w, 0, min(vocab, w.shape[axis]), axis=axis)
    pad = [(0, 0)] * w.ndim
    pad[axis] = (0, rows - w.shape[axis])
    return jnp.pad(w, pad)


class StoredCheckpoint:
    """One step of a checkpoint directory: the directory and step resolved once, our metadata and the stored
    shapes read once, and one CheckpointManager for every read."""

    def __init__(self, directory: str | epath.Path, step: int | None = None, *,
                 checkpoint_manager: ocp.CheckpointManager | None = None):
        """`step` None: the latest complete step. CheckpointError when the directory or the step is missing.
        `checkpoint_manager` reuses an open manager over `directory` (the trainer's)."""
        self.directory = absolute(directory)
        if checkpoint_manager is None:
            if not self.directory.exists():
                raise CheckpointError(f"{self.directory}: checkpoint directory does not exist")
            checkpoint_manager = manager(self.directory)
        self._manager = checkpoint_manager
        steps = self._manager.all_steps()
        if not steps:
            raise CheckpointError(f"{self.directory}: contains no complete checkpoint step")
        if step is not None and step not in steps:
            raise CheckpointError(f"{self.directory}: step {step} not found (available: {sorted(steps)})")
        self.step = max(steps) if step is None else step
        self.where = f"{directory}/{self.step}"
        self._metadata: CheckpointMetadata | None = None
        self._shapes: Any = None

    @property
    def metadata(self) -> CheckpointMetadata:
        if self._metadata is None:
            custom = self._manager.metadata(self.step).custom_metadata or {}
            self._metadata = CheckpointMetadata.from_json(custom, self.where)
        return self._metadata

    @property
    def model_config(self) -> ModelConfig:
        """The architecture and layout the params were saved with."""
        return self.metadata.model_config

    @property
    def shapes(self) -> Any:
        """The stored pytree of (shape, dtype), read without any array data."""
        if self._shapes is None:
            tree = ocp.PyTreeCheckpointHandler().metadata(self.directory / str(self.step) / STATE_ITEM).tree
            self._shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
        return self._shapes

    def restore(self, target: Any) -> Any:
        """Restore the part of the `state` item that `target` (a pytree of ShapeDtypeStructs) names.

        Leaves with a sharding come back as jax Arrays placed accordingly, others as numpy arrays.
        """
        args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=True)
        return self._manager.restore(self.step, args=ocp.args.Composite(**{STATE_ITEM: args}))[STATE_ITEM]

    def restore_params(self, config: ModelConfig, shardings: Any = None) -> Any:
        """Read the params into `config`'s layout (optionally placed with `shardings`).

        The checkpoint's own layout comes from its metadata; a different layout is converted (with a log line
        saying which), a different architecture is an error naming the fields.
        """
        stored_config = self.model_config
        mismatches = architecture_mismatches(stored_config, config)
        if mismatches:
            raise CheckpointError(f"{self.where}: checkpoint architecture differs from the configured model: "
                                  + "; ".join(mismatches))
        stored_abstract = llama.abstract_params(stored_config)
        check_shapes(self.shapes["params"], stored_abstract, self.where)
        layout = ("scan_layers", "vocab_pad_multiple", "param_dtype")
        changes = [f"{f}: {getattr(stored_config, f)!r} -> {getattr(config, f)!r}"
                   for f in layout if getattr(stored_config, f) != getattr(config, f)]
        if not changes:
            return self.restore({"params": _with_shardings(stored_abstract, shardings, config.param_dtype)})["params"]
        logging.info("%s: converting checkpoint layout (%s)", self.where, ", ".join(changes))
        stored = self.restore({"params": stored_abstract})["params"]
        convert = jax.jit(lambda p: convert_layout(p, stored_config, config), out_shardings=shardings)
        return convert(stored)

    def open_array(self, path: tuple[str, ...], cache_bytes: int = 0):
        """One stored array of the `state` item as a TensorStore, for reading blocks without loading it whole.

        `cache_bytes` sizes TensorStore's chunk cache, so that reading a chunk block by block reads it once.

        This reads Orbax's documented on-disk layout (an OCDBT key-value store of zarr arrays named by the tree
        path joined with '.'); the golden-checkpoint test pins that layout against Orbax upgrades.
        """
        import tensorstore as ts

        base = self.directory / str(self.step) / STATE_ITEM
        metadata = json.loads((base / "_METADATA").read_text())
        if not metadata.get("use_ocdbt", False):
            raise CheckpointError(f"{base}: arrays not stored with OCDBT; cannot stream them")
        uri = str(base) if "://" in str(base) else f"file://{base}"
        spec = {"driver": "zarr3" if metadata.get("use_zarr3") else "zarr",
                "kvstore": {"driver": "ocdbt", "base": uri.rstrip("/") + "/", "path": ".".join(path)}}
        context = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes}})
        try:
            return ts.open(spec, read=True, context=context).result()
        except ValueError as e:
            raise CheckpointError(f"{base}: cannot open stored array {'/'.join(path)}: {e}") from None


def _with_shardings(abstract: Any, shardings: Any, dtype: str) -> Any:
    if shardings is None:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype)), abstract)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype), sharding=s), abstract, shardings)


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype by name, bfloat16 included (via ml_dtypes, which jax ships)."""
    return np.dtype(jnp.dtype(name))
