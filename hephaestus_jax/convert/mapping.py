"""The one table between Hugging Face tensor names/shapes and our parameter tree; both directions use it.

Our parameters keep HF's orientation ([out, in] matrices). The invariant that makes conversion cheap:

    each HF tensor, flattened in C order, equals the first elements of its counterpart (one layer of it, when
    layers are stacked) flattened in C order.

Our shapes only split the head axis out of q/k/v/o (a reshape) and pad vocabulary rows at the end (trimmed on
export). So conversion is renaming, reshaping and stacking: no transposes, no q/k permutation (we use the same
rotate_half RoPE), and any block of our leading rows is a contiguous byte range of the HF tensor.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import numpy as np

from hephaestus_jax.config import ModelConfig

Array = np.ndarray
Shape = Callable[[ModelConfig], tuple[int, ...]]

_HIDDEN: Shape = lambda c: (c.hidden_size,)
_MLP_IN: Shape = lambda c: (c.intermediate_size, c.hidden_size)

# (our path inside one layer, HF name inside `model.layers.{i}.`, HF shape, our shape)
LAYER_TABLE: tuple[tuple[tuple[str, ...], str, Shape, Shape], ...] = (
    (("attn_norm", "scale"), "input_layernorm.weight", _HIDDEN, _HIDDEN),
    (("attn", "q_proj"), "self_attn.q_proj.weight", lambda c: (c.num_heads * c.head_dim, c.hidden_size),
     lambda c: (c.num_heads, c.head_dim, c.hidden_size)),
    (("attn", "k_proj"), "self_attn.k_proj.weight", lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size),
     lambda c: (c.num_kv_heads, c.head_dim, c.hidden_size)),
    (("attn", "v_proj"), "self_attn.v_proj.weight", lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size),
     lambda c: (c.num_kv_heads, c.head_dim, c.hidden_size)),
    (("attn", "o_proj"), "self_attn.o_proj.weight", lambda c: (c.hidden_size, c.num_heads * c.head_dim),
     lambda c: (c.hidden_size, c.num_heads, c.head_dim)),
    (("mlp_norm", "scale"), "post_attention_layernorm.weight", _HIDDEN, _HIDDEN),
    (("mlp", "gate_proj"), "mlp.gate_proj.weight", _MLP_IN, _MLP_IN),
    (("mlp", "up_proj"), "mlp.up_proj.weight", _MLP_IN, _MLP_IN),
    (("mlp", "down_proj"), "mlp.down_proj.weight", lambda c: (c.hidden_size, c.intermediate_size),
     lambda c: (c.hidden_size, c.intermediate_size)),
)

# (our top-level path, HF name, HF shape, our shape); lm_head only for untied models.
GLOBAL_TABLE: tuple[tuple[tuple[str, ...], str, Shape, Shape], ...] = (
    (("embed",), "model.embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size),
     lambda c: (c.padded_vocab_size, c.hidden_size)),
    (("final_norm", "scale"), "model.norm.weight", _HIDDEN, _HIDDEN),
    (("lm_head",), "lm_head.weight", lambda c: (c.vocab_size, c.hidden_size),
     lambda c: (c.padded_vocab_size, c.hidden_size)),
)


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One of our parameters and the HF tensors it is made of (one per layer for stacked layer params)."""

    path: tuple[str, ...]
    hf_names: tuple[str, ...]
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]  # Ours, per layer.
    stacked: bool  # True: our tensor stacks the HF tensors along a leading `layers` axis.

    @property
    def hf_size(self) -> int:
        return math.prod(self.hf_shape)


def entries(config: ModelConfig) -> Iterator[TensorEntry]:
    """Every parameter of `config`'s model in our tree, with its HF source tensors, in a stable order."""
    for path, hf_name, hf_shape, shape in GLOBAL_TABLE:
        if path == ("lm_head",) and config.tie_word_embeddings:
            continue
        yield TensorEntry(path, (hf_name,), hf_shape(config), shape(config), stacked=False)
    for path, hf_name, hf_shape, shape in LAYER_TABLE:
        names = tuple(f"model.layers.{i}.{hf_name}" for i in range(config.num_layers))
        if config.scan_layers:
            yield TensorEntry(("layers",) + path, names, hf_shape(config), shape(config), stacked=True)
        else:
            for i, name in enumerate(names):
                yield TensorEntry((f"layers_{i}",) + path, (name,), hf_shape(config), shape(config), stacked=False)


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


def _bits(array: Array) -> Array:
    """The same memory viewed as unsigned integers, so copies run at memcpy speed for any float (bf16 too)."""
    return array.view(np.dtype(f"u{array.dtype.itemsize}"))


def fill_ours(entry: TensorEntry, read_into: Callable[[str, Array], None], out: Array) -> None:
    """Fill `out` (our parameter, any contents) from its HF tensors, one at a time.

    `read_into(name, destination)` writes HF tensor `name`, flattened, into the flat `destination` (its element
    count, `out`'s dtype). Each lands on the leading elements of its layer; the rest (vocab padding) is zeroed.
    """
    if not out.flags.c_contiguous:
        raise ValueError("fill_ours needs a C-contiguous `out`: its layers are filled through flat views")
    for name, layer in zip(entry.hf_names, out if entry.stacked else out[None]):
        flat = layer.reshape(-1)
        read_into(name, flat[:entry.hf_size])
        flat[entry.hf_size:] = 0


def our_shape(entry: TensorEntry) -> tuple[int, ...]:
    """Our parameter's full shape (with the leading layers axis when stacked)."""
    return ((len(entry.hf_names),) if entry.stacked else ()) + entry.shape


def our_tensor(entry: TensorEntry, read_hf: Callable[[str], Array]) -> Array:
    """One of our parameters, in memory, from HF tensors fetched with `read_hf(name)` (dtype of the first)."""
    dtype = read_hf(entry.hf_names[0]).dtype
    out = np.empty(our_shape(entry), dtype)

    def copy(name: str, destination: Array) -> None:
        _bits(destination)[...] = _bits(read_hf(name)).reshape(-1)

    fill_ours(entry, copy, out)
    return out


def params_from_hf(read_hf: Callable[[str], Array], config: ModelConfig) -> dict:
    """Our full parameter tree from HF tensors (in memory; the converters stream parameter by parameter)."""
    params: dict = {}
    for entry in entries(config):
        set_path(params, entry.path, our_tensor(entry, read_hf))
    return params

