"""What the code knows about each TPU generation, in one table: memory, bandwidth and peak FLOP/s per chip, how
JAX names its devices, how Cloud names and sizes its slices, its default runtime. Used by `aot` (compile-only
topologies), `tpu_vm` (creating slices) and `metrics` (MFU). Sources: the Cloud TPU documentation ("TPU
versions", "TPU software versions")."""

from __future__ import annotations

import dataclasses
import re

GIB = 1024**3
_SMALL_POD_SIZES = frozenset({1, 4, 8, 16, 32, 64, 128, 256})


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation."""

    hbm_bytes: int  # Per chip.
    hbm_bandwidth: float  # Bytes/s per chip (Google Cloud's published figure).
    peak_flops: float  # Dense bf16 FLOP/s per JAX device (a chip; v4/v5p run their two cores as one).
    device_kinds: tuple[str, ...]  # Substrings of `jax.Device.device_kind` that name this generation.
    cores_per_name_unit: int  # Cloud's `v5p-32` counts TensorCores (2 per chip); `v5e-256` counts chips.
    dims: int  # 3: a 3D torus (v4, v5p); 2: a 2D grid (v5e, v6e).
    chip_config: str  # libtpu's chip_config_name: "megacore" makes each chip's two cores one JAX device.
    max_chips: int  # A full pod.
    api_prefix: str  # How gcloud's --accelerator-type spells it (v5e is v5litepod-N).
    runtime_version: str  # The default TPU VM image for JAX.
    sizes: frozenset[int]  # The accelerator-type sizes `tpu_vm` accepts.
    size_rule: str  # `sizes` in words, for error messages.


def _torus_sizes(max_cores: int) -> frozenset[int]:
    return frozenset(range(8, max_cores + 1, 8))


# Dict order matters for device kinds: "TPU v5 lite" (v5e) must be tried before "TPU v5" (v5p).
GENERATIONS: dict[str, Generation] = {
    "v4": Generation(32 * GIB, 1200e9, 275e12, ("TPU v4",), 2, 3, "megacore", 4096, "v4", "tpu-ubuntu2204-base",
                     _torus_sizes(8192), "a TensorCore count (2 per chip) that is a multiple of 8 from 8 to 8192"),
    "v5e": Generation(16 * GIB, 819e9, 197e12, ("TPU v5 lite",), 1, 2, "default", 256, "v5litepod",
                      "v2-alpha-tpuv5-lite", _SMALL_POD_SIZES, f"a chip count in {sorted(_SMALL_POD_SIZES)}"),
    "v5p": Generation(95 * GIB, 2765e9, 459e12, ("TPU v5p", "TPU v5"), 2, 3, "megacore", 8960, "v5p",
                      "v2-alpha-tpuv5", _torus_sizes(17920),
                      "a TensorCore count (2 per chip) that is a multiple of 8 from 8 to 17920"),
    "v6e": Generation(32 * GIB, 1640e9, 918e12, ("TPU v6 lite",), 1, 2, "default", 256, "v6e", "v2-alpha-tpuv6e",
                      _SMALL_POD_SIZES, f"a chip count in {sorted(_SMALL_POD_SIZES)}"),
}
ALIASES = {"v5litepod": "v5e", "v5": "v5p"}
_CLOUD_NAME = re.compile(r"([a-z0-9]+)-(\d+)")


def generation_name(text: str) -> str | None:
    """The catalog's name for a generation as Cloud or libtpu spell it (`v5litepod` -> `v5e`), None if unknown."""
    name = ALIASES.get(text, text)
    return name if name in GENERATIONS else None


def split_cloud_name(text: str) -> tuple[str, int] | None:
    """`v5p-32` -> ("v5p", 32), as written (aliases unresolved); None when `text` is not GENERATION-SIZE."""
    match = _CLOUD_NAME.fullmatch(text)
    return (match.group(1), int(match.group(2))) if match else None


def peak_flops_by_device_kind() -> tuple[tuple[str, float], ...]:
    """(device-kind substring, peak FLOP/s per device) for every TPU generation, first match wins."""
    return tuple((kind, generation.peak_flops) for generation in GENERATIONS.values()
                 for kind in generation.device_kinds)
