"""Next-token losses on packed batches, in float32, as sums so that micro-batches add up exactly.

A batch holds `inputs`, `targets`, `positions`, `segment_ids` and `loss_weights` ([rows, seq_len]); target t is
the token after input t within the same document, and `loss_weights` is 0 on padding and on tokens outside the
loss mask (e.g. SFT prompts).

With `ModelConfig.logits_chunk_size > 0` the output projection, softmax and their gradients run over chunks
of that many positions and the [rows, seq_len, vocab] logits never exist at once (`kernels.chunked_cross_entropy`:
its custom VJP takes each chunk's gradients in the forward pass, from the chunk's logits, and the backward pass
only scales them; its plain twin, `ModelConfig.kernels = 'plain'`, recomputes each chunk's logits). With Llama-3's 128K vocabulary the full float32 logits of
one 8192-token row take 4 GiB, so this is what lets long sequences fit, and it also saves memory traffic on CPUs.

`nll` (cross entropy without the z-loss) is a metric: its gradient is stopped on both paths.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from hephaestus_jax.config import ModelConfig
from hephaestus_jax.model import llama
from hephaestus_jax.model.kernels import KERNELS


def cross_entropy_sums(logits: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray,
                       z_loss: float = 0.0) -> dict[str, jnp.ndarray]:
    """Weighted sums: `loss` (cross entropy + z_loss * logsumexp^2), `nll` (cross entropy only, a metric: no
    gradient), `weight`."""
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = log_z - target_logits
    loss = nll + z_loss * jnp.square(log_z)
    return {"loss": jnp.sum(loss * weights), "nll": jax.lax.stop_gradient(jnp.sum(nll * weights)),
            "weight": jnp.sum(weights)}


def batch_loss_sums(config: ModelConfig, params: Any, batch: dict[str, jnp.ndarray],
                    z_loss: float = 0.0) -> dict[str, jnp.ndarray]:
    """Run the model on a packed batch and return `cross_entropy_sums` of its targets."""
    inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
    chunk = config.logits_chunk_size
    if chunk and batch["inputs"].shape[1] > chunk:
        hidden, head = llama.forward(config, params, *inputs, return_hidden=True)
        return chunked_cross_entropy_sums(hidden, head, batch["targets"], batch["loss_weights"], z_loss=z_loss,
                                          chunk=chunk, vocab_size=config.vocab_size, kernels=config.kernels)
    logits = llama.forward(config, params, *inputs)
    return cross_entropy_sums(logits, batch["targets"], batch["loss_weights"], z_loss)


def chunked_cross_entropy_sums(hidden: jnp.ndarray, head: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray,
                               *, z_loss: float, chunk: int, vocab_size: int,
                               kernels: str = "fast") -> dict[str, jnp.ndarray]:
    """`cross_entropy_sums` of logits = hidden @ head.T, computed `chunk` positions at a time by
    `kernels.chunked_cross_entropy` (`kernels`: a name of `kernels.KERNELS`).

    hidden [rows, seq, embed]; head [padded vocab, embed]; rows beyond `vocab_size` are padding (masked).
    The sequence is padded up to a multiple of `chunk` with zero-weight positions.
    """
    seq = hidden.shape[1]
    pad = -seq % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    chunked = KERNELS[kernels].chunked_cross_entropy
    loss, nll = chunked(hidden, head, targets.astype(jnp.int32), weights.astype(jnp.float32), z_loss, chunk,
                        vocab_size)
    return {"loss": loss, "nll": jax.lax.stop_gradient(nll), "weight": jnp.sum(weights.astype(jnp.float32))}
