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
    """Keys and values, one array per layer, each [batch, kv_heads, max_len, head_dim]: head-major, the layout
    attention reads, and one buffer per layer, which a decode step updates in place (slices of one stacked
    array would be copied). Row r holds its tokens in slots [0, lengths[r]); a token's slot is its RoPE position.
    """

    k: tuple[jnp.ndarray, ...]
    v: tuple[jnp.ndarray, ...]
    lengths: jnp.ndarray

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, max_len: int) -> "KVCache":
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        dtype = jnp.dtype(config.dtype)
        layers = range(config.num_layers)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in layers), v=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   lengths=jnp.zeros((batch,), jnp.int32))


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
    def __call__(self, x, positions, segment_ids, slots, layer_cache=None):
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
        if layer_cache is not None:
            out, new_cache = self._attend_cached(q, k, v, slots, layer_cache)
        elif cfg.attention_impl == "splash":
            out = attention.splash_attention(q, k, v, segment_ids, cfg.sliding_window)
        else:
            mask = attention.attention_mask(segment_ids, segment_ids, slots, slots, cfg.sliding_window)
            blocks = min(CAUSAL_BLOCKS, q.shape[1])  # Training rows: causal.
            out = attention.dot_product_attention(q, k, v, mask, blocks, cfg.kernels)
        out = project("bshd,ehd->bse", out, _param(self, "o_proj", (d, h, hd), ("embed", "heads", "head_dim")),
                      "out_proj")
        return out, new_cache

    def _attend_cached(self, q, k, v, slots, layer_cache):
        """Write this call's keys and values [b, s, kv_heads, d] into the layer's cache (k, v) at `slots` [b, s] and
        attend to the cache: the query in slot i sees slots <= i (within the sliding window). A call as long as
        the cache is a prefill of an empty one: its keys are the whole cache, attended in causal query blocks."""
        k_cache, v_cache = layer_cache
        length = k_cache.shape[2]
        if q.shape[1] == length:
            k_cache, v_cache = (jnp.swapaxes(a, 1, 2).astype(k_cache.dtype) for a in (k, v))
            blocks = min(CAUSAL_BLOCKS, length)
        else:  # Each row at its own slots, in place (out-of-range slots of finished rows are dropped).
            rows = jnp.arange(q.shape[0])[:, None]
            k_cache = k_cache.at[rows, :, slots].set(k.astype(k_cache.dtype), mode="drop")
            v_cache = v_cache.at[rows, :, slots].set(v.astype(v_cache.dtype), mode="drop")
            blocks = 1
        kv_axes = ("batch", "act_kv_heads", None, None)
        k_cache, v_cache = (nn.with_logical_constraint(a, kv_axes) for a in (k_cache, v_cache))
        kv_slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (q.shape[0], length))
        mask = attention.attention_mask(jnp.ones_like(slots), jnp.ones_like(kv_slots), slots, kv_slots,
                                        self.config.sliding_window)
        out = attention.head_major_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask, blocks,
                                             self.config.kernels)
        return out, (k_cache, v_cache)


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
    def __call__(self, x, positions, segment_ids, slots, layer_cache):
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        attn_out, new_cache = Attention(self.config, name="attn")(
            RMSNorm(self.config, name="attn_norm")(x), positions, segment_ids, slots, layer_cache)
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
    (0 = padding). With `cache` (unscanned layers only: `unstack_layers`), row r's tokens are written into the
    cache's slots from `cache.lengths[r]` on, attend to the slots before them, and count into the returned cache's
    lengths where their segment id is not 0 (a row's padding comes after its tokens). With `return_hidden`, the
    first output is (final normalised hidden states, output embedding matrix) instead of logits, for losses that
    compute logits chunk by chunk.
    """

    config: ModelConfig
    return_hidden: bool = False

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, positions: jnp.ndarray, segment_ids: jnp.ndarray,
                 cache: KVCache | None = None) -> tuple[jnp.ndarray, KVCache | None]:
        cfg = self.config
        embed = _param(self, "embed", (cfg.padded_vocab_size, cfg.hidden_size), ("vocab", "embed"))
        x = jnp.take(embed, tokens, axis=0)
        base = jnp.zeros((tokens.shape[0], 1), jnp.int32) if cache is None else cache.lengths[:, None]
        slots = base + jnp.arange(tokens.shape[1], dtype=jnp.int32)
        broadcast = (positions, segment_ids, slots)

        layer = _layer_class(cfg)
        new_cache = None
        if cache is not None:
            if cfg.scan_layers:
                raise ValueError("decoding with a KV cache needs unscanned layers (scan_layers=False, "
                                 "llama.unstack_layers(params))")
            layer_caches = []
            for i in range(cfg.num_layers):
                x, layer_cache = layer(cfg, name=f"layers_{i}")(x, *broadcast, (cache.k[i], cache.v[i]))
                layer_caches.append(layer_cache)
            new_cache = KVCache(k=tuple(k for k, _ in layer_caches), v=tuple(v for _, v in layer_caches),
                                lengths=cache.lengths + jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32))
        elif cfg.scan_layers:
            scanned = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast,) * len(broadcast) + (0,), length=cfg.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(cfg, name="layers")(x, *broadcast, None)
        else:
            for i in range(cfg.num_layers):
                x, _ = layer(cfg, name=f"layers_{i}")(x, *broadcast, None)

        x = RMSNorm(cfg, name="final_norm")(x)
        head = embed if cfg.tie_word_embeddings else _param(
            self, "lm_head", (cfg.padded_vocab_size, cfg.hidden_size), ("vocab", "embed"))
        if self.return_hidden:
            return (x, head), new_cache
        logits = kernels.KERNELS[cfg.kernels].project("bse,ve->bsv", x, head, "logits", out_dtype=jnp.float32)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
        return kernels.mask_vocab_padding(logits, cfg.vocab_size), new_cache


def unstack_layers(params: Any) -> Any:
    """Parameters of a scanned model (a leading `layers` axis under "layers") as an unscanned model's
    ("layers_0", "layers_1", ...): each layer's weights their own arrays, as a decode step reads them."""
    if "layers" not in params:
        return params
    stacked = params["layers"]
    count = jax.tree.leaves(stacked)[0].shape[0]
    layers = {f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(count)}
    return {**{name: value for name, value in params.items() if name != "layers"}, **layers}


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
