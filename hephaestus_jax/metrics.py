"""Training metrics: model FLOPs and MFU, device peaks, and the writers (metrics.jsonl, TensorBoard, progress)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from hephaestus_jax import tpu_catalog
from hephaestus_jax.config import ModelConfig
from hephaestus_jax.json_lines import read_json_lines

# Dense bf16 peak FLOP/s per JAX device, matched as substrings of `device.device_kind` (first match wins).
PEAK_FLOPS_BY_DEVICE_KIND: tuple[tuple[str, float], ...] = tpu_catalog.peak_flops_by_device_kind() + (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
)


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 * matmul params + causal attention (6 * layers * heads * head_dim *
    seq_len, i.e. PaLM's 12*L*H*Q*T halved because a causal mask needs half of the score matrix)."""
    # lm_head (tied or not) is a matmul.
    matmul_params = config.num_layers * config.layer_matmul_params() + config.vocab_size * config.hidden_size
    return 6 * matmul_params + 6 * config.num_layers * config.num_heads * config.head_dim * seq_len


def best_seconds(fn, *args, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn(*args)` (each waiting for its result), after one untimed call
    (compilation, warm-up)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def measure_cpu_peak_flops(dtype: str = "float32", size: int = 1024, repeats: int = 5) -> float:
    """Measured matmul FLOP/s of this host's CPU (all cores, via one XLA matmul): the CPU's "peak"."""
    cpu = jax.local_devices(backend="cpu")[0]
    a = jax.device_put(jnp.ones((size, size), dtype), cpu)
    return 2 * size**3 / best_seconds(jax.jit(lambda x: x @ x), a, repeats=repeats)


def peak_flops_total(devices: list[jax.Device], override_per_device: float | None, dtype: str) -> float:
    """Peak FLOP/s of all `devices` together: the override, the table by device kind, or measured (CPU)."""
    if override_per_device:
        return override_per_device * len(devices)
    kind = devices[0].device_kind
    for pattern, peak in PEAK_FLOPS_BY_DEVICE_KIND:
        if pattern in kind:
            return peak * len(devices)
    if devices[0].platform == "cpu":
        return measure_cpu_peak_flops(dtype)  # Simulated CPU devices share the same cores.
    raise ValueError(f"unknown peak FLOP/s for device kind {kind!r}: set TrainConfig.peak_flops_per_device")


class ProgressBar:
    """One line of progress with ETA on stderr (redrawn in place on a terminal)."""

    def __init__(self, total_steps: int, start_step: int, stream=None):
        self.total, self.start = total_steps, start_step
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def update(self, step: int, scalars: Mapping[str, float]) -> None:
        done = step - self.start
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        width = 24
        filled = int(width * step / self.total)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} "
                f"loss {scalars.get('loss', float('nan')):.4f} "
                f"{scalars.get('tokens_per_second', 0.0):,.0f} tok/s ETA {_duration(eta)}")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class MetricsWriter:
    """Writes scalars to `<output_dir>/metrics.jsonl` and TensorBoard, and draws the progress bar.

    Only process 0 writes. On resume, entries after `start_step` (steps that will be recomputed) are dropped
    from metrics.jsonl so the file always describes one consistent run. `output_dir` may be a URL (gs://...):
    object stores cannot append, so there the whole (small) file is rewritten at each write.
    """

    def __init__(self, output_dir: str, *, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = epath.Path(output_dir) / "metrics.jsonl"
        self.tensorboard_dir = str(epath.Path(output_dir) / "tensorboard")
        if not enabled:
            return
        from clu import metric_writers  # TensorBoard event files (imports TensorFlow; process 0 only).

        self._lines = [json.dumps(entry) + "\n" for entry in read_metrics(self.path)
                       if entry["step"] <= start_step] if self.path.exists() else []
        self.path.write_text("".join(self._lines))
        self._local = "://" not in str(self.path)
        self._file = open(self.path, "a", encoding="utf-8") if self._local else None
        self._tensorboard = metric_writers.create_default_writer(self.tensorboard_dir, asynchronous=False)
        self.progress = ProgressBar(total_steps, start_step)

    def write(self, step: int, scalars: Mapping[str, Any], progress: bool = True) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        line = json.dumps({"step": step, **clean}) + "\n"
        self._lines.append(line)
        if self._local:
            self._file.write(line)
            self._file.flush()
        else:
            self.path.write_text("".join(self._lines))
        self._tensorboard.write_scalars(step, clean)
        if progress:
            self.progress.update(step, clean)

    def close(self) -> None:
        if self.enabled:
            self.progress.close()
            if self._file:
                self._file.close()
            self._tensorboard.close()


def read_metrics(path) -> list[dict[str, float]]:
    """The entries of a metrics.jsonl file (local path or URL)."""
    return [line.value for line in read_json_lines(path)]
