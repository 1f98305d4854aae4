"""Rotary position embeddings in Hugging Face's native (rotate_half) layout.

RoPE variants form a small registry keyed by Hugging Face's `rope_scaling["rope_type"]`; each entry turns the
default inverse frequencies into the variant's, using only the fields of the HF dict (never the model name).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from hephaestus_jax.config import ModelConfig

RopeScaler = Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]


def _llama3(inv_freq: np.ndarray, scaling: Mapping[str, Any]) -> np.ndarray:
    """Llama-3.1 frequency scaling: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _linear(inv_freq: np.ndarray, scaling: Mapping[str, Any]) -> np.ndarray:
    """Position interpolation: every frequency divided by `factor`."""
    return (inv_freq / scaling["factor"]).astype(np.float32)


ROPE_SCALERS: dict[str, RopeScaler] = {"llama3": _llama3, "linear": _linear}


def inverse_frequencies(config: "ModelConfig") -> np.ndarray:
    """float32 [head_dim // 2] inverse frequencies, computed as transformers does (float32 arithmetic)."""
    from hephaestus_jax.config import ConfigError

    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    scaling = config.rope_scaling_dict
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type not in ROPE_SCALERS:
        raise ConfigError(f"rope_scaling type {rope_type!r} is not supported; supported: "
                          f"{sorted(ROPE_SCALERS)} (or no rope_scaling)")
    try:
        return ROPE_SCALERS[rope_type](inv_freq, scaling)
    except KeyError as e:
        raise ConfigError(f"rope_scaling of type {rope_type!r} lacks field {e.args[0]!r}") from None


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: jnp.ndarray) -> jnp.ndarray:
    """Rotate `x` [batch, seq, heads, head_dim] by `positions` [batch, seq]; angles in float32 as in HF."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    return x * cos + rotate_half(x) * sin
