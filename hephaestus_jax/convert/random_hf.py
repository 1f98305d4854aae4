"""A randomly initialised Hugging Face checkpoint for a ModelConfig (quickstart, benchmarks), without torch."""

from __future__ import annotations

import json
import os

import numpy as np

from hephaestus_jax.config import ModelConfig
from hephaestus_jax.convert import mapping
from hephaestus_jax.convert.safetensors_io import ShardedSafetensorsWriter

INIT_STDDEV = 0.02


def write_random_hf_checkpoint(config: ModelConfig, out_dir: str, dtype: str = "float32", seed: int = 0,
                               max_shard_bytes: int = 5 * 10**9) -> None:
    """config.json + safetensors with N(0, 0.02) matrices and unit norm scales, one tensor in memory at a time."""
    os.makedirs(out_dir)
    plan = [(name, entry.hf_shape, dtype) for entry in mapping.entries(config) for name in entry.hf_names]
    writer = ShardedSafetensorsWriter(out_dir, plan, max_shard_bytes)
    rng = np.random.default_rng(seed)
    for name, shape, _ in plan:
        if name.endswith("norm.weight"):
            tensor = np.ones(shape, np.float32)
        else:
            tensor = rng.standard_normal(shape, dtype=np.float32) * INIT_STDDEV
        writer.write(name, 0, tensor)
    writer.finish()
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_hf(torch_dtype=dtype), f, indent=2)
