"""The one table between Hugging Face tensor names/layouts and our parameter tree; both directions use it.

Our layouts equal Hugging Face's up to a transpose and a reshape of the head axis (no q/k permutation: we
use the same rotate_half RoPE). Vocabulary padding rows exist only on our side and are trimmed on export.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from hephaestus_jax.config import ModelConfig

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one tensor changes between HF (`to_hf`) and ours (`to_ours`); shapes given per model config."""

    to_ours: Callable[[Array, ModelConfig], Array]
    to_hf: Callable[[Array, ModelConfig], Array]
    hf_shape: Callable[[ModelConfig], tuple[int, ...]]


def _pad_rows(w: Array, rows: int) -> Array:
    return w if w.shape[0] == rows else np.concatenate([w, np.zeros((rows - w.shape[0],) + w.shape[1:], w.dtype)])


def _heads_in(heads: Callable[[ModelConfig], int]) -> Layout:
    """HF [heads*head_dim, embed] <-> ours [embed, heads, head_dim] (q/k/v projections)."""
    return Layout(
        to_ours=lambda w, c: np.ascontiguousarray(w.T).reshape(c.hidden_size, heads(c), c.head_dim),
        to_hf=lambda w, c: np.ascontiguousarray(w.reshape(c.hidden_size, heads(c) * c.head_dim).T),
        hf_shape=lambda c: (heads(c) * c.head_dim, c.hidden_size),
    )


def _transpose(shape: Callable[[ModelConfig], tuple[int, int]]) -> Layout:
    return Layout(to_ours=lambda w, c: np.ascontiguousarray(w.T), to_hf=lambda w, c: np.ascontiguousarray(w.T),
                  hf_shape=shape)


_VECTOR = Layout(to_ours=lambda w, c: w, to_hf=lambda w, c: w, hf_shape=lambda c: (c.hidden_size,))
_EMBED = Layout(to_ours=lambda w, c: _pad_rows(w, c.padded_vocab_size), to_hf=lambda w, c: w[:c.vocab_size],
                hf_shape=lambda c: (c.vocab_size, c.hidden_size))
_LM_HEAD = Layout(to_ours=lambda w, c: np.ascontiguousarray(_pad_rows(w, c.padded_vocab_size).T),
                  to_hf=lambda w, c: np.ascontiguousarray(w[:, :c.vocab_size].T),
                  hf_shape=lambda c: (c.vocab_size, c.hidden_size))
_O_PROJ = Layout(
    to_ours=lambda w, c: np.ascontiguousarray(w.T).reshape(c.num_heads, c.head_dim, c.hidden_size),
    to_hf=lambda w, c: np.ascontiguousarray(w.reshape(c.num_heads * c.head_dim, c.hidden_size).T),
    hf_shape=lambda c: (c.hidden_size, c.num_heads * c.head_dim),
)

# (our path inside one layer, HF name inside `model.layers.{i}.`, layout)
LAYER_TABLE: tuple[tuple[tuple[str, ...], str, Layout], ...] = (
    (("attn_norm", "scale"), "input_layernorm.weight", _VECTOR),
    (("attn", "q_proj"), "self_attn.q_proj.weight", _heads_in(lambda c: c.num_heads)),
    (("attn", "k_proj"), "self_attn.k_proj.weight", _heads_in(lambda c: c.num_kv_heads)),
    (("attn", "v_proj"), "self_attn.v_proj.weight", _heads_in(lambda c: c.num_kv_heads)),
    (("attn", "o_proj"), "self_attn.o_proj.weight", _O_PROJ),
    (("mlp_norm", "scale"), "post_attention_layernorm.weight", _VECTOR),
    (("mlp", "gate_proj"), "mlp.gate_proj.weight", _transpose(lambda c: (c.intermediate_size, c.hidden_size))),
    (("mlp", "up_proj"), "mlp.up_proj.weight", _transpose(lambda c: (c.intermediate_size, c.hidden_size))),
    (("mlp", "down_proj"), "mlp.down_proj.weight", _transpose(lambda c: (c.hidden_size, c.intermediate_size))),
)

# (our top-level path, HF name, layout); lm_head only for untied models.
GLOBAL_TABLE: tuple[tuple[tuple[str, ...], str, Layout], ...] = (
    (("embed",), "model.embed_tokens.weight", _EMBED),
    (("final_norm", "scale"), "model.norm.weight", _VECTOR),
    (("lm_head",), "lm_head.weight", _LM_HEAD),
)


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One of our parameters and the HF tensors it is made of (one per layer for scanned layer params)."""

    path: tuple[str, ...]
    hf_names: tuple[str, ...]
    layout: Layout
    stacked: bool  # True: our tensor stacks the HF tensors along a leading `layers` axis.


def entries(config: ModelConfig) -> Iterator[TensorEntry]:
    """Every parameter of `config`'s model in our tree, with its HF source tensors, in a stable order."""
    for path, hf_name, layout in GLOBAL_TABLE:
        if path == ("lm_head",) and config.tie_word_embeddings:
            continue
        yield TensorEntry(path, (hf_name,), layout, stacked=False)
    for path, hf_name, layout in LAYER_TABLE:
        names = tuple(f"model.layers.{i}.{hf_name}" for i in range(config.num_layers))
        if config.scan_layers:
            yield TensorEntry(("layers",) + path, names, layout, stacked=True)
        else:
            for i, name in enumerate(names):
                yield TensorEntry((f"layers_{i}",) + path, (name,), layout, stacked=False)


def expected_hf_names(config: ModelConfig) -> set[str]:
    return {name for entry in entries(config) for name in entry.hf_names}


def get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def our_tensor(entry: TensorEntry, read_hf: Callable[[str], Array], config: ModelConfig) -> Array:
    """Build one of our parameters from HF tensors fetched one at a time with `read_hf(name)`."""
    parts = [entry.layout.to_ours(read_hf(name), config) for name in entry.hf_names]
    return np.stack(parts) if entry.stacked else parts[0]


def hf_tensors(entry: TensorEntry, value: Array, config: ModelConfig) -> Iterator[tuple[str, Array]]:
    """The HF tensors (name, array) that one of our parameters holds."""
    slices = value if entry.stacked else [value]
    for name, part in zip(entry.hf_names, slices):
        yield name, entry.layout.to_hf(np.asarray(part), config)


def params_from_hf(read_hf: Callable[[str], Array], config: ModelConfig) -> dict:
    """Our full parameter tree from HF tensors (in memory; the streaming converter writes entry by entry)."""
    params: dict = {}
    for entry in entries(config):
        set_path(params, entry.path, our_tensor(entry, read_hf, config))
    return params


def hf_from_params(params: dict, config: ModelConfig) -> dict[str, Array]:
    """All HF tensors of our parameter tree (in memory)."""
    return {name: t for entry in entries(config) for name, t in hf_tensors(entry, get_path(params, entry.path),
                                                                          config)}
