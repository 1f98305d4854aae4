"""Losses: the chunked (custom-VJP) cross entropy equals the plain one, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hephaestus_jax import losses
from hephaestus_jax.config import ModelConfig
from hephaestus_jax.model import llama

CONFIG = ModelConfig(vocab_size=300, vocab_pad_multiple=128, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, max_position_embeddings=128)


def _batch(rows=3, seq=37, seed=0):
    rng = np.random.default_rng(seed)
    weights = (rng.random((rows, seq)) > 0.2).astype(np.float32)
    weights[0, -5:] = 0.0
    return {"inputs": rng.integers(0, 300, (rows, seq)), "targets": rng.integers(0, 300, (rows, seq)),
            "positions": np.tile(np.arange(seq), (rows, 1)), "segment_ids": np.ones((rows, seq), np.int32),
            "loss_weights": weights}


@pytest.mark.parametrize("chunk, z_loss", [(8, 0.0), (16, 1e-3), (5, 1e-4)])
def test_chunked_loss_and_gradients_equal_the_plain_loss(chunk, z_loss):
    params = llama.unbox(llama.init_params(CONFIG, jax.random.key(0)))
    batch = _batch()

    def total(config, p):
        sums = losses.batch_loss_sums(config, p, batch, z_loss)
        return 1.7 * sums["loss"] + 0.5 * sums["nll"], sums  # A cotangent other than 1; nll is a metric (no gradient).

    (plain_value, plain_sums), plain_grads = jax.jit(jax.value_and_grad(lambda p: total(CONFIG, p), has_aux=True))(params)
    chunked_config = CONFIG.replace(logits_chunk_size=chunk)
    (value, sums), grads = jax.jit(jax.value_and_grad(lambda p: total(chunked_config, p), has_aux=True))(params)
    for key in ("loss", "nll", "weight"):
        np.testing.assert_allclose(sums[key], plain_sums[key], rtol=1e-5)
    np.testing.assert_allclose(value, plain_value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
        np.testing.assert_allclose(a, b, atol=1e-6 * float(jnp.max(jnp.abs(b))) + 1e-9, rtol=1e-4)
    loss_only = jax.jit(jax.grad(lambda p: 1.7 * losses.batch_loss_sums(chunked_config, p, batch, z_loss)["loss"]))
    for a, b in zip(jax.tree.leaves(loss_only(params)), jax.tree.leaves(grads)):
        np.testing.assert_array_equal(a, b)  # The nll term added nothing.


def test_cross_entropy_matches_a_direct_computation():
    logits = np.random.default_rng(1).standard_normal((2, 4, 10)).astype(np.float32)
    targets = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    weights = np.array([[1, 1, 0, 1], [1, 0, 1, 1]], np.float32)
    sums = losses.cross_entropy_sums(logits, targets, weights, z_loss=0.1)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    log_z = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(sums["nll"], (nll * weights).sum(), rtol=1e-6)
    np.testing.assert_allclose(sums["loss"], ((nll + 0.1 * log_z ** 2) * weights).sum(), rtol=1e-6)
    assert float(sums["weight"]) == 6.0
