"""Grouped-query attention over packed documents: masks, XLA attention (its softmax in `kernels.attend`) and
Pallas splash attention on TPU.

Masking is expressed with slot indices (where a token sits in the row or KV cache) and segment ids: a query
attends to keys at slots <= its own that carry the same segment id. Packed documents therefore never attend
across boundaries, padding (segment 0) never reaches real tokens, and the same rule serves training rows and a
KV cache (whose empty or padded slots carry segment 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hephaestus_jax.model.kernels import KERNELS


def attention_mask(q_segment_ids: jnp.ndarray, kv_segment_ids: jnp.ndarray, q_slots: jnp.ndarray,
                   kv_slots: jnp.ndarray, sliding_window: int | None = None) -> jnp.ndarray:
    """Boolean [batch, q_len, kv_len]: causal by slot, same segment, optionally within a sliding window."""
    causal = kv_slots[:, None, :] <= q_slots[:, :, None]
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    mask = causal & same_segment
    if sliding_window is not None:
        mask &= (q_slots[:, :, None] - kv_slots[:, None, :]) < sliding_window
    return mask


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray,
                          causal_blocks: int = 1, kernels: str = "fast") -> jnp.ndarray:
    """XLA GQA attention. q [b, s, heads, d]; k, v [b, t, kv_heads, d]; mask [b, s, t] -> [b, s, heads, d].

    Query heads are grouped over their shared KV head without materialising repeated keys, and the softmax runs
    in `kernels.attend` (`kernels`: a name of `kernels.KERNELS`). Queries, keys and values are first laid out
    head-major ([b, kv_heads, ..., seq, d]) and the output is transposed back: these transposes move [seq, d]
    tensors, whereas contracting the token-major layouts directly makes XLA relayout the [seq, seq] scores and
    probabilities (docs/performance.md). The forward result is bit-identical.

    `causal_blocks` > 1 promises that query i and key j are the same row's positions and that the mask never
    lets a query see a later key (training rows). The queries are then cut into that many blocks, each scored
    against the keys up to its own end only, which skips most of the masked scores above the diagonal (4
    blocks: 62.5% of the work of the full square). The result is the same: the skipped scores would be masked.
    """
    return head_major_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, causal_blocks, kernels)


def head_major_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray,
                         causal_blocks: int = 1, kernels: str = "fast") -> jnp.ndarray:
    """`dot_product_attention` with keys and values already head-major, k, v [b, kv_heads, t, d] (the layout of
    `llama.KVCache`, so that a decode step reads the cache as it lies)."""
    attend = KERNELS[kernels].attend
    b, s, heads, d = q.shape
    kv_heads = k.shape[1]
    q = jnp.transpose(q.reshape(b, s, kv_heads, heads // kv_heads, d), (0, 2, 3, 1, 4))  # [b, k, g, s, d]
    if causal_blocks == 1:
        out = attend(q, k, v, mask)
    else:
        if k.shape[2] != s:
            raise ValueError(f"causal_blocks needs as many keys as queries, got {k.shape[2]} keys for {s} queries")
        edges = [s * i // causal_blocks for i in range(causal_blocks + 1)]
        out = jnp.concatenate([attend(q[:, :, :, start:end], k[:, :, :end], v[:, :, :end], mask[:, start:end, :end])
                               for start, end in zip(edges[:-1], edges[1:])], axis=3)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, s, heads, d)


def splash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray,
                     sliding_window: int | None = None, *, interpret: bool = False) -> jnp.ndarray:
    """TPU Pallas splash attention for training rows (causal, segment ids); same contract as the XLA attention.

    Under a mesh the kernel runs per device (shard_map): rows split like the `batch` activation axis and heads
    like `act_heads`/`act_kv_heads` under the active logical-axis rules (a dimension that does not divide is
    kept whole, e.g. the one-row batch of parameter init). `interpret` runs the kernel in Pallas's interpreter
    (any backend; for tests). Sequences must be multiples of 128 (the kernel's blocks); shorter ones than a
    block take the XLA path.
    """
    import math

    import flax.linen as nn
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
    from jax.sharding import PartitionSpec

    s, d = q.shape[1], q.shape[3]
    if s < 128:  # Shorter than one kernel block (e.g. parameter init's rows): XLA attention computes the same.
        slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), segment_ids.shape)
        return dot_product_attention(q, k, v, attention_mask(segment_ids, segment_ids, slots, slots, sliding_window))
    if s % 128:
        raise ValueError(f"splash attention: the sequence length ({s}) must be a multiple of 128")
    groups = q.shape[2] // k.shape[2]
    block = math.gcd(s, 512)
    sizes = kernel.BlockSizes(block_q=block, block_kv=block, block_q_dkv=block, block_kv_dkv=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = masks.CausalMask((s, s)) if sliding_window is None else masks.LocalMask(
        (s, s), window_size=(sliding_window - 1, 0), offset=0)

    def attend(q, k, v, segment_ids):  # One device's rows and heads; kernel layout [heads, seq, d].
        b, _, heads, _ = q.shape
        kv_heads = k.shape[2]
        make = kernel.make_splash_mqa_single_device if groups > 1 else kernel.make_splash_mha_single_device
        splash = make(masks.MultiHeadMask([mask] * (groups if groups > 1 else heads)), block_sizes=sizes,
                      interpret=interpret)
        seg = kernel.SegmentIds(q=segment_ids, kv=segment_ids)
        q_t = jnp.swapaxes(q * (d ** -0.5), 1, 2)  # The kernel does not scale queries.
        k_t, v_t = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        if groups > 1:  # One MQA kernel per KV head over its group of query heads.
            q_g = q_t.reshape(b, kv_heads, groups, s, d)
            out = jax.vmap(jax.vmap(splash, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, 0))(q_g, k_t, v_t, seg)
            out = out.reshape(b, heads, s, d)
        else:
            out = jax.vmap(splash, in_axes=(0, 0, 0, 0))(q_t, k_t, v_t, seg)
        return jnp.swapaxes(out, 1, 2)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return attend(q, k, v, segment_ids.astype(jnp.int32))

    def split(logical: str, dim: int):  # The mesh axes of a logical axis if they divide the dimension.
        axes = nn.logical_to_mesh_axes((logical,))[0]
        names = () if axes is None else (axes,) if isinstance(axes, str) else axes
        return axes if dim % math.prod(mesh.shape[n] for n in names) == 0 else None

    rows = split("batch", q.shape[0])
    heads = split("act_heads", q.shape[2])
    if heads != split("act_kv_heads", k.shape[2]):  # Query and KV heads must split alike to stay grouped.
        heads = None
    qkv_spec = PartitionSpec(rows, None, heads, None)  # Whole sequences: the kernel needs every key.
    return jax.shard_map(attend, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, PartitionSpec(rows, None)),
                         out_specs=qkv_spec, check_vma=False)(q, k, v, segment_ids.astype(jnp.int32))
