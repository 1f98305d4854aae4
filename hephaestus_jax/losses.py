"""Next-token losses on packed batches, in float32, as sums so that micro-batches add up exactly.

A batch holds `inputs`, `targets`, `positions`, `segment_ids` and `loss_weights` ([rows, seq_len]); target t is
the token after input t within the same document, and `loss_weights` is 0 on padding and on tokens outside the
loss mask (e.g. SFT prompts).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from hephaestus_jax.config import ModelConfig
from hephaestus_jax.model import llama

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_weights")


def cross_entropy_sums(logits: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray,
                       z_loss: float = 0.0) -> dict[str, jnp.ndarray]:
    """Weighted sums: `loss` (cross entropy + z_loss * logsumexp^2), `nll` (cross entropy only), `weight`."""
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = log_z - target_logits
    loss = nll + z_loss * jnp.square(log_z)
    return {"loss": jnp.sum(loss * weights), "nll": jnp.sum(nll * weights), "weight": jnp.sum(weights)}


def batch_loss_sums(config: ModelConfig, params: Any, batch: dict[str, jnp.ndarray],
                    z_loss: float = 0.0) -> dict[str, jnp.ndarray]:
    """Run the model on a packed batch and return `cross_entropy_sums` of its targets."""
    logits = llama.forward(config, params, batch["inputs"], batch["positions"], batch["segment_ids"])
    return cross_entropy_sums(logits, batch["targets"], batch["loss_weights"], z_loss)
