"""Attention kernels for grouped-query attention with packed documents.

Masking is expressed with slot indices (where a token sits in the row or KV cache) and segment ids: a query
attends to keys at slots <= its own that carry the same segment id. Packed documents therefore never attend
across boundaries, padding (segment 0) never reaches real tokens, and the same rule serves training rows and a
KV cache (whose empty or padded slots carry segment 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_segment_ids: jnp.ndarray, kv_segment_ids: jnp.ndarray, q_slots: jnp.ndarray,
                   kv_slots: jnp.ndarray, sliding_window: int | None = None) -> jnp.ndarray:
    """Boolean [batch, q_len, kv_len]: causal by slot, same segment, optionally within a sliding window."""
    causal = kv_slots[:, None, :] <= q_slots[:, :, None]
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    mask = causal & same_segment
    if sliding_window is not None:
        mask &= (q_slots[:, :, None] - kv_slots[:, None, :]) < sliding_window
    return mask


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Reference GQA attention. q [b, s, heads, d]; k, v [b, t, kv_heads, d]; mask [b, s, t] -> [b, s, heads, d].

    Scores and softmax are computed in float32; query heads are grouped over their shared KV head without
    materialising repeated keys.
    """
    b, s, heads, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, s, kv_heads, heads // kv_heads, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(b, s, heads, d)


def splash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray,
                     sliding_window: int | None = None) -> jnp.ndarray:
    """TPU Pallas splash attention for training rows (causal, segment ids); same contract as the reference."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, s, heads, d = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    mask = masks.CausalMask((s, s)) if sliding_window is None else masks.LocalMask(
        (s, s), window_size=(sliding_window - 1, 0), offset=0)
    if groups > 1:
        splash = kernel.make_splash_mqa_single_device(masks.MultiHeadMask([mask] * groups))
    else:
        splash = kernel.make_splash_mha_single_device(masks.MultiHeadMask([mask] * heads))
    seg = kernel.SegmentIds(q=segment_ids, kv=segment_ids)
    # Kernel layout: [heads, seq, d]; the kernel does not scale queries.
    q_t = jnp.swapaxes(q * (d ** -0.5), 1, 2)
    k_t, v_t = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if groups > 1:
        q_g = q_t.reshape(b, kv_heads, groups, s, d)
        out = jax.vmap(jax.vmap(splash, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, 0))(
            q_g, k_t, v_t, seg)
        out = out.reshape(b, heads, s, d)
    else:
        out = jax.vmap(splash, in_axes=(0, 0, 0, 0))(q_t, k_t, v_t, seg)
    return jnp.swapaxes(out, 1, 2)
