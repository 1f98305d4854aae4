"""Hugging Face's rotary-embedding settings: the inverse frequencies, the rope_scaling registry, both config.json
dialects. The rotation itself (rotate_half layout) is the model's (`model.llama.apply_rope`).

RoPE variants form a small registry keyed by Hugging Face's `rope_scaling["rope_type"]`; each entry turns the
default inverse frequencies into the variant's, using only the fields of the HF dict (never the model name).
`read_hf_rope` reads those settings from either config.json dialect. Nothing here knows `ModelConfig` (which
calls this module to validate its rope fields); bad settings raise ValueError naming the field.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np

# HF config.json keys we read; anything that changes the math and is not listed is checked explicitly.
_ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

RopeScaler = Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]


def _llama3(inv_freq: np.ndarray, scaling: Mapping[str, Any]) -> np.ndarray:
    """Llama-3.1 frequency scaling: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.

    Written in float32 the way torch evaluates transformers' version (`c / x` as `c * (1 / x)`), so that the
    result is bit-identical.
    """
    f32 = np.float32
    factor, low, high = f32(scaling["factor"]), f32(scaling["low_freq_factor"]), f32(scaling["high_freq_factor"])
    old_context = f32(scaling["original_max_position_embeddings"])
    wavelen = f32(2 * math.pi) * (f32(1.0) / inv_freq)
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (f32(1.0) - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _linear(inv_freq: np.ndarray, scaling: Mapping[str, Any]) -> np.ndarray:
    """Position interpolation: every frequency divided by `factor`."""
    return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)


ROPE_SCALERS: dict[str, RopeScaler] = {"llama3": _llama3, "linear": _linear}


def inverse_frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> np.ndarray:
    """float32 [head_dim // 2] inverse frequencies, bit-identical to transformers'.

    torch evaluates `theta ** exponents` (a Python float base) with a correctly rounded power, which float64
    then rounding to float32 reproduces; numpy's float32 `**` can differ in the last bit.
    """
    dim = head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    powers = (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)
    inv_freq = np.float32(1.0) / powers
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type not in ROPE_SCALERS:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: "
                         f"{sorted(ROPE_SCALERS)} (or no rope_scaling)")
    try:
        return ROPE_SCALERS[rope_type](inv_freq, scaling)
    except KeyError as e:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks field {e.args[0]!r}") from None


def read_hf_rope(hf: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either config.json dialect; scaling None means plain RoPE."""
    params = hf.get("rope_parameters")
    if params is not None:
        if not isinstance(params, Mapping) or "rope_theta" not in params:
            raise ValueError("config.json: rope_parameters must be a dict with rope_theta "
                             "(per-layer-type rope parameters are not supported)")
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        theta = params["rope_theta"]
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("config.json: partial_rotary_factor != 1 is not supported")
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf["rope_scaling"]) if hf.get("rope_scaling") else {}
    if "type" in scaling and "rope_type" not in scaling:  # Legacy key.
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3":
        missing = [k for k in _ROPE_SCALING_KEYS if k not in scaling]
        if missing:
            raise ValueError(f"config.json: rope_scaling of type 'llama3' lacks {missing}")
        scaling = {"rope_type": "llama3", **{k: scaling[k] for k in _ROPE_SCALING_KEYS}}
    return float(theta), scaling

