"""Batched KV-cache decoding (greedy, temperature / top-k / top-p sampling) and loading a checkpoint for it.

`generate` prefills the whole prompt batch in one forward pass, then decodes one token per step inside a
`lax.while_loop`, writing keys and values into the model's `KVCache`; the loop ends when every row has produced a
stop token or `max_new_tokens` tokens. Prompts are left-padded into a [batch, length] bucket (powers of two), so
repeated calls with similar shapes reuse one compiled program. Padding slots carry segment id 0 and are never
attended to; RoPE positions count only a row's own tokens, so a row's output does not depend on the padding.
`python -m hephaestus_jax.generate` is its command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from hephaestus_jax import stored_checkpoint as ckpt
from hephaestus_jax import sharding
from hephaestus_jax.config import ConfigError, MeshConfig, ModelConfig
from hephaestus_jax.model import kernels, llama

if TYPE_CHECKING:
    import seqio  # Imports TensorFlow; decoding only needs a vocabulary's ids.

log = logging.getLogger("hephaestus_jax.inference")

MIN_LENGTH_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen: greedy when `temperature` is 0, else sampled from the tempered softmax
    restricted to the `top_k` most likely tokens (0: no limit) and to the smallest set whose probability reaches
    `top_p` (nucleus; 1: no limit)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingConfig()


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Generated tokens of each prompt row.

    `tokens[i, :lengths[i]]` are row i's tokens, its stop token included when `stopped[i]`; the rest is `pad_id`.
    `logits` ([rows, max_new_tokens, padded vocab], float32) holds the distribution each token was chosen from
    (before temperature and filtering), only when asked for.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray
    logits: np.ndarray | None = None

    def completion(self, row: int, include_stop: bool = False) -> np.ndarray:
        """Row `row`'s generated tokens, without its stop token unless `include_stop`."""
        end = int(self.lengths[row]) - (0 if include_stop or not self.stopped[row] else 1)
        return self.tokens[row, :end]

    @property
    def finish_reasons(self) -> list[str]:
        """Per row: "stop" (a stop token ended it) or "length" (it reached max_new_tokens)."""
        return ["stop" if stopped else "length" for stopped in self.stopped]


# ------------------------------------------------------------------------------------------------ token choice


def _row_keys(key: jax.Array, step: jnp.ndarray, rows: int) -> jax.Array:
    """One key per (row, step): sampling a row does not depend on how many rows the batch has."""
    step_key = jax.random.fold_in(key, step)
    return jax.vmap(lambda row: jax.random.fold_in(step_key, row))(jnp.arange(rows))


def choose_tokens(logits: jnp.ndarray, sampling: SamplingConfig, key: jax.Array, step: jnp.ndarray) -> jnp.ndarray:
    """Next token per row from float32 logits [rows, vocab], following `sampling`."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    candidates = None
    if sampling.top_k or sampling.top_p < 1:
        # Candidates sorted by decreasing logit: the top k, or the whole vocabulary for nucleus sampling alone.
        k = min(sampling.top_k or logits.shape[-1], logits.shape[-1])
        logits, candidates = jax.lax.top_k(logits, k)
        if sampling.top_p < 1:
            probs = jax.nn.softmax(logits, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            logits = jnp.where(mass_before < sampling.top_p, logits, -jnp.inf)  # The top candidate always stays.
    choice = jax.vmap(jax.random.categorical)(_row_keys(key, step, logits.shape[0]), logits)
    if candidates is not None:
        choice = jnp.take_along_axis(candidates, choice[:, None], axis=-1)[:, 0]
    return choice.astype(jnp.int32)


# ------------------------------------------------------------------------------------------------ decoding


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampling", "return_logits"))
def _decode(params: Any, tokens: jnp.ndarray, mask: jnp.ndarray, key: jax.Array, stop_ids: jnp.ndarray,
            pad_id: jnp.ndarray, *, config: ModelConfig, max_new_tokens: int, sampling: SamplingConfig,
            return_logits: bool) -> dict[str, jnp.ndarray]:
    """Prefill `tokens` [rows, length] (valid where `mask`), then decode up to `max_new_tokens` tokens per row.

    A row stops at its first token in `stop_ids` (entries < 0 are unused); it then emits `pad_id`.
    """
    rows, prompt_len = tokens.shape
    segment_ids = mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
    cache = llama.KVCache.zeros(config, rows, prompt_len + max_new_tokens)
    kv_axes = ("layers", "batch", "length", "act_kv_heads", None)
    cache = cache.replace(k=nn.with_logical_constraint(cache.k, kv_axes),
                          v=nn.with_logical_constraint(cache.v, kv_axes))

    # Prefill: hidden states of every prompt slot, logits only at each row's last valid slot.
    (hidden, head), cache = llama.Transformer(config, return_hidden=True).apply(
        {"params": params}, tokens, positions, segment_ids, cache)
    last_slot = jnp.max(jnp.where(mask, jnp.arange(prompt_len), 0), axis=1)
    last_hidden = jnp.take_along_axis(hidden, last_slot[:, None, None], axis=1)[:, 0]
    first_logits = kernels.mask_vocab_padding(
        jnp.einsum("be,ve->bv", last_hidden, head, preferred_element_type=jnp.float32), config.vocab_size)
    next_position = jnp.sum(segment_ids, axis=1)

    def record(state: dict, step: jnp.ndarray, logits: jnp.ndarray) -> dict:
        """Choose step `step`'s tokens from `logits`; rows already stopped record padding (and are ignored)."""
        token = choose_tokens(logits, sampling, key, step)
        done = state["done"]
        state = dict(state, token=token, tokens=state["tokens"].at[:, step].set(jnp.where(done, pad_id, token)),
                     lengths=state["lengths"] + (~done).astype(jnp.int32), done=done | jnp.isin(token, stop_ids))
        if return_logits:
            state["logits"] = state["logits"].at[:, step].set(logits)
        return state

    state = {"tokens": jnp.full((rows, max_new_tokens), pad_id, jnp.int32), "lengths": jnp.zeros(rows, jnp.int32),
             "done": jnp.zeros(rows, bool), "token": jnp.zeros(rows, jnp.int32), "cache": cache}
    if return_logits:
        state["logits"] = jnp.zeros((rows, max_new_tokens, config.padded_vocab_size), jnp.float32)
    state = record(state, jnp.int32(0), first_logits)

    def step_once(carry: tuple[jnp.ndarray, dict]) -> tuple[jnp.ndarray, dict]:
        step, state = carry
        position = (next_position + step - 1)[:, None]
        logits, cache = llama.Transformer(config).apply(
            {"params": params}, state["token"][:, None], position, jnp.ones((rows, 1), jnp.int32), state["cache"])
        return step + 1, record(dict(state, cache=cache), step, logits[:, 0])

    def running(carry: tuple[jnp.ndarray, dict]) -> jnp.ndarray:
        step, state = carry
        return (step < max_new_tokens) & ~jnp.all(state["done"])

    _, state = jax.lax.while_loop(running, step_once, (jnp.int32(1), state))
    outputs = {"tokens": state["tokens"], "lengths": state["lengths"], "stopped": state["done"]}
    if return_logits:
        outputs["logits"] = state["logits"]
    return outputs


def _bucket(size: int, minimum: int = 1) -> int:
    """The next power of two >= max(size, minimum)."""
    return 1 << (max(size, minimum) - 1).bit_length()


def _prompt_rows(prompts: Sequence[np.ndarray] | np.ndarray, mask: np.ndarray | None) -> list[np.ndarray]:
    """Each prompt's valid tokens, from a list of 1-D arrays or from a [rows, length] array and its mask."""
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        mask = np.ones(prompts.shape, bool) if mask is None else np.asarray(mask, bool)
        if mask.shape != prompts.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the prompts' shape {prompts.shape}")
        rows = [row[valid] for row, valid in zip(prompts, mask)]
    else:
        if mask is not None:
            raise ValueError("a mask is only meaningful with a [rows, length] prompt array")
        rows = [np.asarray(prompt) for prompt in prompts]
    for index, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"prompt {index} must be a non-empty 1-D token array, got shape {row.shape}")
    if not rows:
        raise ValueError("no prompts to generate from")
    return rows


def _stop_array(stop_ids: Sequence[int]) -> np.ndarray:
    """Stop ids padded with -1 to a power-of-two length (>= 4), so that most stop sets share a compilation."""
    stops = np.full(_bucket(len(stop_ids), 4), -1, np.int32)
    stops[:len(stop_ids)] = stop_ids
    return stops


def _place(array: np.ndarray, mesh: Mesh | None) -> jax.Array | np.ndarray:
    if mesh is None:
        return array
    return jax.make_array_from_callback(array.shape, sharding.batch_sharding(mesh), lambda index: array[index])


def _fetch(array: jax.Array) -> np.ndarray:
    """A (possibly row-sharded, multi-host) array, whole, on this host."""
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def generate(config: ModelConfig, params: Any, prompts: Sequence[np.ndarray] | np.ndarray,
             mask: np.ndarray | None = None, *, max_new_tokens: int, stop_ids: Sequence[int] = (),
             sampling: SamplingConfig = GREEDY, seed: int = 0, pad_id: int = 0, mesh: Mesh | None = None,
             batch_size: int | None = None, return_logits: bool = False) -> GenerationResult:
    """Continue each prompt by up to `max_new_tokens` tokens, ending a row at its first token in `stop_ids`.

    `prompts` is a list of 1-D token arrays, or a [rows, length] array with a `mask` of its valid tokens (left or
    right padding, or none). `params` are the model's (unboxed) parameters; with `mesh`, they must be placed on it
    and rows are split over its batch axes. The batch is padded to `batch_size` rows (default: the next power of
    two) and the prompt length to a power of two, so that calls with similar shapes share one compilation.
    Sampling is reproducible: the same `seed`, prompts and row order give the same tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rows = _prompt_rows(prompts, mask)
    shards = 1 if mesh is None else sharding.batch_shards(mesh)
    batch = batch_size or _bucket(len(rows))
    if batch < len(rows):
        raise ValueError(f"batch_size={batch_size} is smaller than the {len(rows)} prompts")
    batch = -(-batch // shards) * shards
    length = _bucket(max(row.size for row in rows), MIN_LENGTH_BUCKET)
    tokens = np.zeros((batch, length), np.int32)  # Padding slots hold token 0 (any valid id; never attended to).
    valid = np.zeros((batch, length), bool)
    for index, row in enumerate(rows):  # Left padding: every row's last prompt token sits in the last slot.
        tokens[index, length - row.size:] = row
        valid[index, length - row.size:] = True
    valid[len(rows):, -1] = True  # Filler rows hold one token, so that no row is empty.

    with sharding.activate(mesh) if mesh is not None else contextlib.nullcontext():
        outputs = _decode(params, _place(tokens, mesh), _place(valid, mesh), jax.random.key(seed),
                          _stop_array(stop_ids), jnp.int32(pad_id), config=config, max_new_tokens=max_new_tokens,
                          sampling=sampling, return_logits=return_logits)
    fetched = {name: _fetch(value)[:len(rows)] for name, value in outputs.items()}
    return GenerationResult(tokens=fetched["tokens"], lengths=fetched["lengths"], stopped=fetched["stopped"],
                            logits=fetched.get("logits"))


def complete(config: ModelConfig, params: Any, prompts: Sequence[np.ndarray], *, max_new_tokens: int,
             stop_ids: Sequence[int] = (), pad_id: int = 0, mesh: Mesh | None = None,
             batch_size: int) -> list[np.ndarray]:
    """Greedy completions (stop token excluded) of many prompts, in their order, decoded `batch_size` rows at a time:
    prompts are taken shortest first, so that a batch holds prompts of similar length."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda index: prompts[index].size)
    completions: list[np.ndarray | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        result = generate(config, params, [prompts[index] for index in rows], max_new_tokens=max_new_tokens,
                          stop_ids=stop_ids, pad_id=pad_id, mesh=mesh, batch_size=batch_size)
        for row, index in enumerate(rows):
            completions[index] = result.completion(row)
        log.info("completed %d/%d prompts", start + len(rows), len(order))
    return completions


# ------------------------------------------------------------------------------------------------ loading


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A checkpoint's parameters placed on a mesh, with the config they were saved with."""

    config: ModelConfig
    params: Any
    mesh: Mesh
    step: int


def inference_mesh_config(tensor_parallel: int = 1) -> MeshConfig:
    """Parameters replicated over data-parallel groups of `tensor_parallel` devices (what decoding wants)."""
    return MeshConfig(data=-1, fsdp=1, tensor=tensor_parallel)


def load_model(checkpoint_dir: str, step: int | None = None, mesh_config: MeshConfig | None = None) -> LoadedModel:
    """Restore a checkpoint's params (latest step by default) with the architecture recorded in it."""
    checkpoint = ckpt.StoredCheckpoint(checkpoint_dir, step)
    mesh = sharding.make_mesh(mesh_config or inference_mesh_config())
    config = sharding.model_for_mesh(checkpoint.model_config.replace(remat_policy="none"), mesh)
    sharding.check_model_fits(config, mesh)
    shardings = sharding.logical_to_sharding(llama.param_axes(config), mesh)
    params = checkpoint.restore_params(config, shardings=shardings)
    log.info("loaded %s (%s)", checkpoint.where, dict(mesh.shape))
    return LoadedModel(config, params, mesh, checkpoint.step)


def stop_ids_of(vocab: seqio.Vocabulary) -> tuple[int, ...]:
    """The vocabulary's end-of-turn/message/text ids (Llama-3), or its EOS id."""
    return tuple(getattr(vocab, "stop_ids", (vocab.eos_id,)))


def check_vocabulary(vocab: seqio.Vocabulary, config: ModelConfig) -> None:
    """ConfigError when the tokenizer has ids the model cannot embed."""
    if vocab.vocab_size > config.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab.vocab_size} tokens but the checkpoint's model has "
                          f"vocab_size={config.vocab_size}")
