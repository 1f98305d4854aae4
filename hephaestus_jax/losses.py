"""Next-token losses on packed batches, in float32, as sums so that micro-batches add up exactly.

A batch holds `inputs`, `targets`, `positions`, `segment_ids` and `loss_weights` ([rows, seq_len]); target t is
the token after input t within the same document, and `loss_weights` is 0 on padding and on tokens outside the
loss mask (e.g. SFT prompts).

With `ModelConfig.logits_chunk_size > 0` the output projection, softmax and their gradients run over chunks
of that many positions and the [rows, seq_len, vocab] logits never exist at once: a custom VJP takes each
chunk's gradients in the forward pass, from the chunk's logits, and the backward pass only scales them (no
recomputed logits: 3 output-projection matmuls, not 4). With Llama-3's 128K vocabulary the full float32 logits of
one 8192-token row take 4 GiB, so this is what lets long sequences fit, and it also saves memory traffic on CPUs.

`nll` (cross entropy without the z-loss) is a metric: its gradient is stopped on both paths.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from hephaestus_jax.config import ModelConfig
from hephaestus_jax.model import llama


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
                                          chunk=chunk, vocab_size=config.vocab_size)
    logits = llama.forward(config, params, *inputs)
    return cross_entropy_sums(logits, batch["targets"], batch["loss_weights"], z_loss)


def chunked_cross_entropy_sums(hidden: jnp.ndarray, head: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray,
                               *, z_loss: float, chunk: int, vocab_size: int) -> dict[str, jnp.ndarray]:
    """`cross_entropy_sums` of logits = hidden @ head.T, computed `chunk` positions at a time.

    hidden [rows, seq, embed]; head [padded vocab, embed]; rows beyond `vocab_size` are padding (masked).
    The sequence is padded up to a multiple of `chunk` with zero-weight positions.
    """
    seq = hidden.shape[1]
    pad = -seq % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    loss, nll = _chunked(hidden, head, targets.astype(jnp.int32), weights.astype(jnp.float32), z_loss, chunk,
                         vocab_size)
    return {"loss": loss, "nll": jax.lax.stop_gradient(nll), "weight": jnp.sum(weights.astype(jnp.float32))}


def _chunks(x: jnp.ndarray, chunk: int) -> jnp.ndarray:
    """[rows, seq, ...] -> [seq // chunk, rows, chunk, ...] (the leading axis is scanned)."""
    rows, seq = x.shape[:2]
    return jnp.swapaxes(x.reshape(rows, seq // chunk, chunk, *x.shape[2:]), 0, 1)


def _chunk_logits(h: jnp.ndarray, head: jnp.ndarray, vocab_size: int) -> jnp.ndarray:
    return llama.mask_vocab_padding(jnp.einsum("bce,ve->bcv", h, head, preferred_element_type=jnp.float32),
                                    vocab_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked(hidden, head, targets, weights, z_loss, chunk, vocab_size):
    return _chunked_scan(hidden, head, targets, weights, z_loss, chunk, vocab_size, with_gradients=False)[0]


def _chunked_scan(hidden, head, targets, weights, z_loss, chunk, vocab_size, *, with_gradients: bool):
    """(loss sum, nll sum) over the chunks; `with_gradients` also gives d(loss sum)/d hidden and d/d head.

    Each chunk's logits exist once: the gradients are taken from them in the same pass (the loss is a sum, so
    its gradient for a cotangent g is g times these), where a recomputing backward pass would run the output
    projection a fourth time.
    """
    def body(carry, xs):
        totals, d_head = carry
        h, t, w = xs
        logits = _chunk_logits(h, head, vocab_size)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        nll = log_z - jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        loss = nll + z_loss * jnp.square(log_z)
        totals = (totals[0] + jnp.sum(loss * w), totals[1] + jnp.sum(nll * w))
        if not with_gradients:
            return (totals, d_head), None
        # d(loss)/d(logits) = w * (p * (1 + 2 z lse) - onehot).
        d_logits = jnp.exp(logits - log_z[..., None]) * ((1 + 2 * z_loss * log_z) * w)[..., None]
        d_logits = d_logits - jax.nn.one_hot(t, head.shape[0], dtype=jnp.float32) * w[..., None]
        d_h = jnp.einsum("bcv,ve->bce", d_logits.astype(head.dtype), head, preferred_element_type=jnp.float32)
        d_head = d_head + jnp.einsum("bcv,bce->ve", d_logits.astype(h.dtype), h, preferred_element_type=jnp.float32)
        return (totals, d_head), d_h.astype(h.dtype)

    zero = jnp.zeros((), jnp.float32)
    d_head = jnp.zeros(head.shape, jnp.float32) if with_gradients else zero
    (totals, d_head), d_hidden = jax.lax.scan(body, ((zero, zero), d_head), (
        _chunks(hidden, chunk), _chunks(targets, chunk), _chunks(weights, chunk)))
    if not with_gradients:
        return totals, None
    rows, seq = hidden.shape[:2]
    return totals, (jnp.swapaxes(d_hidden, 0, 1).reshape(rows, seq, hidden.shape[-1]), d_head)


def _chunked_fwd(hidden, head, targets, weights, z_loss, chunk, vocab_size):
    totals, (d_hidden, d_head) = _chunked_scan(hidden, head, targets, weights, z_loss, chunk, vocab_size,
                                               with_gradients=True)
    return totals, (d_hidden, d_head.astype(head.dtype))


def _chunked_bwd(z_loss, chunk, vocab_size, residuals, cotangents):
    """The nll sum is a metric (its callers stop its gradient), so only the loss sum's cotangent counts. Targets
    and weights are data: no gradient (None)."""
    d_hidden, d_head = residuals
    g_loss, _ = cotangents
    return (g_loss * d_hidden).astype(d_hidden.dtype), (g_loss * d_head).astype(d_head.dtype), None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
