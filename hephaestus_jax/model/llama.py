"""The Llama-3 family (and Mistral) as a Flax module.

Parameters keep Hugging Face's layouts and orientation ([out, in] matrices, separate q/k/v/o and gate/up/down,
rotate_half RoPE); only the head axis is split out, which is a free reshape. Conversion is therefore renaming
plus reshaping, with no transpose and no q/k permutation. Every parameter carries logical axis names; the mesh
placement comes only from `hephaestus_jax.sharding`. The projections, SwiGLU and attention's softmax run in
`model.kernels`: hand-written gradients, or their plain-autodiff twins with `ModelConfig.kernels = 'plain'`.
The parameter tree is:

    embed [vocab, embed]
    layers/attn_norm/scale [embed]
    layers/attn/q_proj [heads, head_dim, embed], k_proj and v_proj [kv_heads, head_dim, embed],
               o_proj [embed, heads, head_dim]
    layers/mlp_norm/scale [embed]
    layers/mlp/gate_proj and up_proj [mlp, embed], down_proj [embed, mlp]
        (with a leading `layers` axis when scanned; `layers_0`, `layers_1`, ... when not)
    final_norm/scale [embed]
    lm_head [vocab, embed]                      (absent with tied embeddings)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from hephaestus_jax import rope
from hephaestus_jax.config import ModelConfig
from hephaestus_jax.model import attention, kernels, remat

_INIT = nn.initializers.normal(stddev=0.02)
CAUSAL_BLOCKS = 4  # Query blocks of XLA attention over training rows (attention.dot_product_attention).

@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer ([layers, batch, max_len, kv_heads, head_dim]) plus what masking needs.

    `segment_ids` [batch, max_len] is 0 for empty or padding slots; `index` is the next slot to write.
    """

    k: jnp.ndarray
    v: jnp.ndarray
    segment_ids: jnp.ndarray
    index: jnp.ndarray

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, max_len: int) -> "KVCache":
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        dtype = jnp.dtype(config.dtype)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init=_INIT) -> jnp.ndarray:
    cfg: ModelConfig = module.config
    value = module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(cfg.param_dtype))
    return value.astype(cfg.dtype)


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: jnp.ndarray) -> jnp.ndarray:
    """Rotate `x` [batch, seq, heads, head_dim] by `positions` [batch, seq]; angles in float32 as in HF."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, cast back before the scale (as Hugging Face does)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = _param(self, "scale", (x.shape[-1],), ("embed",), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        return scale * normed.astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, segment-id masking and an optional KV cache."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, slots, layer_cache=None, cache_segment_ids=None,
                 cache_index=None):
        cfg = self.config
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        project = kernels.KERNELS[cfg.kernels].project
        q = project("bse,hde->bshd", x, _param(self, "q_proj", (h, hd, d), ("heads", "head_dim", "embed")),
                    "query_proj")
        k = project("bse,kde->bskd", x, _param(self, "k_proj", (kv, hd, d), ("kv_heads", "head_dim", "embed")),
                    "key_proj")
        v = project("bse,kde->bskd", x, _param(self, "v_proj", (kv, hd, d), ("kv_heads", "head_dim", "embed")),
                    "value_proj")
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
        k = nn.with_logical_constraint(k, ("batch", "length", "act_kv_heads", None))
        v = nn.with_logical_constraint(v, ("batch", "length", "act_kv_heads", None))
        inv_freq = jnp.asarray(rope.inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict))
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)

        new_cache = None
        if layer_cache is None:
            kv_segment_ids, kv_slots = segment_ids, slots
        else:
            k = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k.astype(layer_cache["k"].dtype),
                                                    cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v.astype(layer_cache["v"].dtype),
                                                    cache_index, axis=1)
            new_cache = {"k": k, "v": v}
            kv_segment_ids = cache_segment_ids
            kv_slots = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), kv_segment_ids.shape)

        if cfg.attention_impl == "splash" and layer_cache is None:
            out = attention.splash_attention(q, k, v, segment_ids, cfg.sliding_window)
        else:
            mask = attention.attention_mask(segment_ids, kv_segment_ids, slots, kv_slots, cfg.sliding_window)
            blocks = min(CAUSAL_BLOCKS, q.shape[1]) if layer_cache is None else 1  # Training rows: causal.
            out = attention.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, blocks, cfg.kernels)
        out = project("bshd,ehd->bse", out, _param(self, "o_proj", (d, h, hd), ("embed", "heads", "head_dim")),
                      "out_proj")
        return out, new_cache


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        d, f = self.config.hidden_size, self.config.intermediate_size
        chosen = kernels.KERNELS[self.config.kernels]
        project, swiglu = chosen.project, chosen.swiglu
        gate = project("bse,fe->bsf", x, _param(self, "gate_proj", (f, d), ("mlp", "embed")), "mlp_gate")
        up = project("bse,fe->bsf", x, _param(self, "up_proj", (f, d), ("mlp", "embed")), "mlp_up")
        hidden = nn.with_logical_constraint(swiglu(gate, up), ("batch", "length", "act_mlp"))
        return project("bsf,ef->bse", hidden, _param(self, "down_proj", (d, f), ("embed", "mlp")), "mlp_down")


class DecoderLayer(nn.Module):
    """Pre-norm transformer block; signature (carry, *broadcast, scanned) so that it can be `nn.scan`ned."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, slots, cache_segment_ids, cache_index, layer_cache):
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        attn_out, new_cache = Attention(self.config, name="attn")(
            RMSNorm(self.config, name="attn_norm")(x), positions, segment_ids, slots, layer_cache,
            cache_segment_ids, cache_index)
        x = x + attn_out
        x = x + MLP(self.config, name="mlp")(RMSNorm(self.config, name="mlp_norm")(x))
        return x, new_cache


def _layer_class(config: ModelConfig) -> type[nn.Module]:
    if config.remat_policy == "none":
        return DecoderLayer
    return nn.remat(DecoderLayer, policy=remat.REMAT_POLICIES[config.remat_policy], prevent_cse=not config.scan_layers)


class Transformer(nn.Module):
    """Token ids -> float32 logits over the (padded) vocabulary, padding rows masked
    (`kernels.mask_vocab_padding`: never predicted or sampled).

    `positions` are RoPE positions (per document in packed rows); `segment_ids` separate packed documents
    (0 = padding). With `cache`, the tokens are written at `cache.index` and the updated cache is returned.
    With `return_hidden`, the first output is (final normalised hidden states, output embedding matrix)
    instead of logits, for losses that compute logits chunk by chunk.
    """

    config: ModelConfig
    return_hidden: bool = False

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, positions: jnp.ndarray, segment_ids: jnp.ndarray,
                 cache: KVCache | None = None) -> tuple[jnp.ndarray, KVCache | None]:
        cfg = self.config
        embed = _param(self, "embed", (cfg.padded_vocab_size, cfg.hidden_size), ("vocab", "embed"))
        x = jnp.take(embed, tokens, axis=0)
        base = jnp.zeros((), jnp.int32) if cache is None else cache.index
        slots = jnp.broadcast_to(base + jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        cache_segment_ids = None if cache is None else jax.lax.dynamic_update_slice_in_dim(
            cache.segment_ids, segment_ids.astype(jnp.int32), cache.index, axis=1)
        layer_caches = None if cache is None else {"k": cache.k, "v": cache.v}
        broadcast = (positions, segment_ids, slots, cache_segment_ids, base)

        layer = _layer_class(cfg)
        if cfg.scan_layers:
            scanned = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast,) * len(broadcast) + (0,), length=cfg.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x, new_layer_caches = scanned(cfg, name="layers")(x, *broadcast, layer_caches)
        else:
            outputs = []
            for i in range(cfg.num_layers):
                layer_cache = None if cache is None else jax.tree.map(lambda a, i=i: a[i], layer_caches)
                x, new_layer_cache = layer(cfg, name=f"layers_{i}")(x, *broadcast, layer_cache)
                outputs.append(new_layer_cache)
            new_layer_caches = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outputs)

        x = RMSNorm(cfg, name="final_norm")(x)
        head = embed if cfg.tie_word_embeddings else _param(
            self, "lm_head", (cfg.padded_vocab_size, cfg.hidden_size), ("vocab", "embed"))
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=new_layer_caches["k"], v=new_layer_caches["v"], segment_ids=cache_segment_ids,
                                index=cache.index + tokens.shape[1])
        if self.return_hidden:
            return (x, head), new_cache
        logits = kernels.KERNELS[cfg.kernels].project("bse,ve->bsv", x, head, "logits", out_dtype=jnp.float32)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
        return kernels.mask_vocab_padding(logits, cfg.vocab_size), new_cache


def init_params(config: ModelConfig, rng: jax.Array, batch: int = 1, seq_len: int = 8) -> Any:
    """Randomly initialised parameters, boxed with their logical axes (`nn.Partitioned`)."""
    tokens = jnp.zeros((batch, seq_len), jnp.int32)
    return Transformer(config).init(rng, tokens, tokens, tokens)["params"]


def abstract_params(config: ModelConfig) -> Any:
    """Unboxed parameter shapes and dtypes (ShapeDtypeStructs), without allocating anything."""
    return jax.eval_shape(lambda: unbox(init_params(config, jax.random.key(0))))


def forward(config: ModelConfig, params: Any, tokens: jnp.ndarray, positions: jnp.ndarray | None = None,
            segment_ids: jnp.ndarray | None = None, return_hidden: bool = False) -> Any:
    """Logits for full rows (no cache), or (hidden states, output embedding) with `return_hidden`.

    Defaults: one document per row at positions 0..S-1.
    """
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    output, _ = Transformer(config, return_hidden).apply({"params": params}, tokens, positions, segment_ids)
    return output


def param_axes(config: ModelConfig) -> Any:
    """The logical axis names of every parameter, as a pytree of PartitionSpec-like tuples."""
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return nn.get_partition_spec(abstract)


def unbox(params: Any) -> Any:
    """Strip `nn.Partitioned` boxes, leaving a plain pytree of arrays."""
    return nn.unbox(params)
