"""XLA attention (model/attention.py), on either kernel (the hand-written backward pass or its twin), and the causal
query blocks against a textbook autodiff softmax attention, on packed rows with padding, with and without a sliding
window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hephaestus_jax.model import attention


def _plain_attention(q, k, v, mask):
    """Textbook GQA attention, differentiated by JAX itself (repeated KV heads, token-major layouts)."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bshd,bthd->bhst", q, k) / np.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None], scores, -1e30)
    return jnp.einsum("bhst,bthd->bshd", jax.nn.softmax(scores, axis=-1), v)


def _rows(seq: int):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, seq, n, 16)), jnp.float32) for n in (6, 2, 2))
    segments = np.ones((2, seq), np.int32)
    segments[0, seq // 3:] = 2  # Two packed documents,
    segments[1, seq - 7:] = 0  # then padding.
    slots = np.broadcast_to(np.arange(seq), (2, seq))
    return q, k, v, jnp.asarray(segments), jnp.asarray(slots)


@pytest.mark.parametrize("kernels", ["fast", "plain"])
@pytest.mark.parametrize("blocks", [1, 4])
@pytest.mark.parametrize("window", [None, 9])
def test_attention_and_its_gradients_match_plain_autodiff(blocks, window, kernels):
    q, k, v, segments, slots = _rows(50)  # 4 blocks of 50 positions: uneven edges 0, 12, 25, 37, 50.
    mask = attention.attention_mask(segments, segments, slots, slots, window)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

    ours = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, mask, blocks, kernels))
    plain = lambda q, k, v: _plain_attention(q, k, v, mask)
    np.testing.assert_allclose(ours(q, k, v), plain(q, k, v), atol=1e-5)
    for got, want in zip(jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v),
                         jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_causal_blocks_skip_the_scores_above_the_diagonal():
    q, k, v, segments, slots = _rows(512)
    mask = attention.attention_mask(segments, segments, slots, slots)
    flops = [jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, mask, blocks)).lower(q, k, v)
             .compile().cost_analysis()["flops"] for blocks in (1, 4)]
    assert flops[1] < 0.7 * flops[0], flops  # 4 blocks: (1 + 2 + 3 + 4) / 16 of the square.


def test_causal_blocks_refuse_a_kv_cache_longer_than_the_queries():
    q, k, v, segments, slots = _rows(8)
    mask = jnp.ones((2, 8, 16), bool)
    with pytest.raises(ValueError, match="16 keys for 8 queries"):
        attention.dot_product_attention(q, jnp.concatenate([k, k], 1), jnp.concatenate([v, v], 1), mask, 2)
