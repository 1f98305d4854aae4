"""Continuous-batching KV-cache decoding: a fixed number of slots, each decoding one prompt; a finished prompt's
slot takes the next queued prompt, so that the batch stays full.

- Prefill: prompts are admitted `shards` at a time (one per batch shard; one on a single device), right-padded
  to a length bucket (`length_bucket`: powers of two up to 256 tokens, then four per power of two, so that prompt
  lengths share a few programs and a long prompt wastes at most a quarter) in a cache exactly that long (causal query blocks); their keys and values are then
  copied into their slots, and their first token is chosen.
- Decode: a jitted loop of steps over all slots, each row at its own position (`llama.KVCache.lengths`), runs
  until some row finishes; the host then hands the slot the next prompt. Once the queue is empty and at most
  half the slots are busy, the busy rows are moved into a batch half as large (or smaller), so that idle rows
  cost no compute. The model's weights are unstacked per layer and each layer's cache is its own buffer,
  updated in place, head-major as attention reads it (`llama.KVCache`).
- Everything a row computes with (its positions, its cache slots, its sampling key: prompt index and step)
  belongs to that row alone, so a prompt's tokens do not depend on its slot, its neighbours or the refill order.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from hephaestus_jax.config import ModelConfig
from hephaestus_jax.model import kernels, llama

log = logging.getLogger("hephaestus_jax.decoding")

MIN_LENGTH_BUCKET = 16
FINE_BUCKETS_FROM = 256
MIN_COMPACT_WIDTH = 4  # Fewer rows read the same weights per step: not worth another compiled step.


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


def choose_tokens(logits: jnp.ndarray, sampling: SamplingConfig, key: jax.Array, steps: jnp.ndarray,
                  rows: jnp.ndarray) -> jnp.ndarray:
    """Next token per row from float32 logits [rows, vocab], following `sampling`; row i draws with the key of
    (its prompt `rows[i]`, its step `steps[i]`), whatever else is in the batch."""
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
    keys = jax.vmap(lambda step, row: jax.random.fold_in(jax.random.fold_in(key, step), row))(steps, rows)
    choice = jax.vmap(jax.random.categorical)(keys, logits)
    if candidates is not None:
        choice = jnp.take_along_axis(candidates, choice[:, None], axis=-1)[:, 0]
    return choice.astype(jnp.int32)


def length_bucket(size: int) -> int:
    """The padded length of `size` tokens: the next power of two up to FINE_BUCKETS_FROM (>= MIN_LENGTH_BUCKET),
    above it four buckets per power of two (in (2^(p-1), 2^p] a multiple of 2^(p-3)). Short prompts cost little
    to pad and a compiled program more (some seconds for a 30-layer model), so they share few programs."""
    size = max(size, MIN_LENGTH_BUCKET)
    if size <= FINE_BUCKETS_FROM:
        return power_of_two(size)
    step = 1 << ((size - 1).bit_length() - 3)
    return -(-size // step) * step


def power_of_two(size: int) -> int:
    """The next power of two >= `size`."""
    return 1 << (max(size, 1) - 1).bit_length()


# ------------------------------------------------------------------------------------------------ device state


@flax.struct.dataclass
class Slots:
    """The decoding batch: per slot its cache, the token to feed next, how many tokens it has chosen (`steps`),
    whether it has finished, its prompt's index, and its chosen tokens [slots, max_new_tokens] (and their
    logits [slots, max_new_tokens, padded vocab] when asked for)."""

    cache: llama.KVCache
    token: jnp.ndarray
    steps: jnp.ndarray
    done: jnp.ndarray
    prompt: jnp.ndarray
    tokens: jnp.ndarray
    logits: jnp.ndarray | None


@functools.partial(jax.jit, static_argnames=("config", "slots", "max_len", "max_new_tokens", "return_logits"))
def _empty(config: ModelConfig, slots: int, max_len: int, max_new_tokens: int, return_logits: bool) -> Slots:
    zeros = jnp.zeros((slots,), jnp.int32)
    logits = jnp.zeros((slots, max_new_tokens, config.padded_vocab_size), jnp.float32) if return_logits else None
    return Slots(cache=llama.KVCache.zeros(config, slots, max_len), token=zeros, steps=zeros,
                 done=jnp.ones((slots,), bool), prompt=zeros, tokens=jnp.zeros((slots, max_new_tokens), jnp.int32),
                 logits=logits)


def _record(state: Slots, where: jnp.ndarray, token: jnp.ndarray, logits: jnp.ndarray, busy: jnp.ndarray,
            stop_ids: jnp.ndarray, max_new_tokens: int) -> Slots:
    """Slots `where` (out of range: ignored) chose `token` from `logits`; only the `busy` ones record it."""
    column = jnp.where(busy, state.steps[where], max_new_tokens)  # Out of range: dropped.
    steps = state.steps.at[where].add(busy.astype(jnp.int32), mode="drop")
    finished = busy & (jnp.isin(token, stop_ids) | (steps[where] >= max_new_tokens))
    state = state.replace(
        token=state.token.at[where].set(jnp.where(busy, token, state.token[where]), mode="drop"), steps=steps,
        done=state.done.at[where].set(state.done[where] | finished, mode="drop"),
        tokens=state.tokens.at[where, column].set(token, mode="drop"))
    if state.logits is not None:
        state = state.replace(logits=state.logits.at[where, column].set(logits, mode="drop"))
    return state


@functools.partial(jax.jit, static_argnames=("config", "sampling"))
def _prefill(params: Any, tokens: jnp.ndarray, lengths: jnp.ndarray, prompt: jnp.ndarray, key: jax.Array, *,
             config: ModelConfig, sampling: SamplingConfig) -> tuple[llama.KVCache, jnp.ndarray, jnp.ndarray]:
    """Prefill `tokens` [n, bucket] (row i's first `lengths[i]` tokens are prompt `prompt[i]`): their cache, and
    each prompt's first token and the logits it was chosen from. One program per bucket, whatever the batch."""
    rows, bucket = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(bucket, dtype=jnp.int32), tokens.shape)
    (hidden, head), cache = llama.Transformer(config, return_hidden=True).apply(
        {"params": params}, tokens, positions, (positions < lengths[:, None]).astype(jnp.int32),
        llama.KVCache.zeros(config, rows, bucket))
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    logits = kernels.mask_vocab_padding(jnp.einsum("be,ve->bv", last, head, preferred_element_type=jnp.float32),
                                        config.vocab_size)
    return cache, choose_tokens(logits, sampling, key, jnp.zeros_like(prompt), prompt), logits


@functools.partial(jax.jit, static_argnames=("max_new_tokens",), donate_argnames=("state",))
def _admit(state: Slots, cache: llama.KVCache, token: jnp.ndarray, logits: jnp.ndarray, where: jnp.ndarray,
           prompt: jnp.ndarray, stop_ids: jnp.ndarray, *, max_new_tokens: int) -> Slots:
    """Put prefilled prompts (`_prefill`'s outputs) into slots `where` (out of range: a filler row, dropped)."""
    bucket = cache.k[0].shape[2]

    def copy(into: jnp.ndarray, new: jnp.ndarray) -> jnp.ndarray:
        return into.at[where, :, :bucket].set(new, mode="drop")

    state = state.replace(
        cache=llama.KVCache(k=tuple(map(copy, state.cache.k, cache.k)), v=tuple(map(copy, state.cache.v, cache.v)),
                            lengths=state.cache.lengths.at[where].set(cache.lengths, mode="drop")),
        steps=state.steps.at[where].set(0, mode="drop"), done=state.done.at[where].set(False, mode="drop"),
        prompt=state.prompt.at[where].set(prompt, mode="drop"))
    return _record(state, where, token, logits, jnp.ones(where.shape, bool), stop_ids, max_new_tokens)


@functools.partial(jax.jit, static_argnames=("config", "sampling", "max_new_tokens"), donate_argnames=("state",))
def _decode_steps(params: Any, state: Slots, busy: jnp.ndarray, key: jax.Array, stop_ids: jnp.ndarray, *,
                  config: ModelConfig, sampling: SamplingConfig, max_new_tokens: int) -> Slots:
    """Decode one token per `busy` slot per step until a busy slot is done (at once if one already is)."""
    everywhere = jnp.arange(busy.shape[0])

    def step(state: Slots) -> Slots:
        live = busy & ~state.done
        logits, cache = llama.Transformer(config).apply(
            {"params": params}, state.token[:, None], state.cache.lengths[:, None], live[:, None].astype(jnp.int32),
            state.cache)
        token = choose_tokens(logits[:, 0], sampling, key, state.steps, state.prompt)
        return _record(state.replace(cache=cache), everywhere, token, logits[:, 0], live, stop_ids, max_new_tokens)

    def running(state: Slots) -> jnp.ndarray:
        return jnp.any(busy & ~state.done) & ~jnp.any(busy & state.done)

    return jax.lax.while_loop(running, step, state)


@jax.jit
def _gather(state: Slots, rows: jnp.ndarray) -> Slots:
    """The slots `rows`, in that order (a smaller batch)."""
    return jax.tree.map(lambda a: a[rows], state)


# ------------------------------------------------------------------------------------------------ host loop


@dataclasses.dataclass(frozen=True)
class Completion:
    """One prompt's chosen tokens (its stop token included when `stopped`) and, when asked for, their logits."""

    tokens: np.ndarray
    stopped: bool
    logits: np.ndarray | None = None


def _fetch(array: jax.Array) -> np.ndarray:
    """A (possibly row-sharded, multi-host) array, whole, on this host."""
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _stop_array(stop_ids: Sequence[int]) -> np.ndarray:
    """Stop ids padded with -1 to a power-of-two length (>= 4), so that most stop sets share a compilation."""
    stops = np.full(power_of_two(max(len(stop_ids), 4)), -1, np.int32)
    stops[:len(stop_ids)] = stop_ids
    return stops


def decode(config: ModelConfig, params: Any, prompts: Sequence[np.ndarray], *, max_new_tokens: int,
           stop_ids: Sequence[int], slots: int, shards: int = 1, sampling: SamplingConfig = GREEDY, seed: int = 0,
           return_logits: bool = False) -> list[Completion]:
    """Decode every prompt (1-D token arrays, taken in order) in at most `slots` rows (a multiple of `shards`, the
    mesh's batch shards, which must be active): each row ends at its first token in `stop_ids` or after
    `max_new_tokens` tokens. `params` are the model's, scanned or not. Returns one `Completion` per prompt."""
    config = config.replace(scan_layers=False)
    params = llama.unstack_layers(params)
    static = dict(config=config, sampling=sampling, max_new_tokens=max_new_tokens)
    key, stops = jax.random.key(seed), _stop_array(stop_ids)
    width = -(-min(slots, power_of_two(len(prompts))) // shards) * shards
    max_len = length_bucket(max(length_bucket(p.size) for p in prompts) + max_new_tokens)
    state = _empty(config, width, max_len, max_new_tokens, return_logits)
    queue = collections.deque(range(len(prompts)))
    held: list[int | None] = [None] * width  # The prompt in each slot.
    results: list[Completion | None] = [None] * len(prompts)

    def admit(free: list[int]) -> None:
        """Prefill queued prompts into the `free` slots, `shards` at a time (filler rows complete a group)."""
        nonlocal state
        for start in range(0, len(free), shards):
            indices = [queue.popleft() for _ in free[start:start + shards] if queue]
            if not indices:
                return
            bucket = length_bucket(max(prompts[i].size for i in indices))
            tokens, lengths = np.zeros((shards, bucket), np.int32), np.ones((shards,), np.int32)
            where, index = np.full((shards,), width, np.int32), np.zeros((shards,), np.int32)
            for row, (slot, i) in enumerate(zip(free[start:], indices)):
                tokens[row, :prompts[i].size] = prompts[i]
                lengths[row], where[row], index[row], held[slot] = prompts[i].size, slot, i, i
            cache, token, logits = _prefill(params, tokens, lengths, index, key, config=config, sampling=sampling)
            state = _admit(state, cache, token, logits, where, index, stops, max_new_tokens=max_new_tokens)

    admit(list(range(width)))
    while any(i is not None for i in held):
        state = _decode_steps(params, state, np.array([i is not None for i in held]), key, stops, **static)
        done, steps = _fetch(state.done), _fetch(state.steps)
        finished = [slot for slot, i in enumerate(held) if i is not None and done[slot]]
        tokens = _fetch(state.tokens)
        logits = _fetch(state.logits) if return_logits else None
        for slot in finished:
            row = tokens[slot, :steps[slot]]
            results[held[slot]] = Completion(row, bool(np.isin(row[-1], stop_ids)),
                                             None if logits is None else logits[slot, :steps[slot]])
            held[slot] = None
        admit(finished)
        busy = [slot for slot, i in enumerate(held) if i is not None]
        if not queue and busy and 2 * len(busy) <= width and width > max(shards, MIN_COMPACT_WIDTH):
            width = -(-max(power_of_two(len(busy)), MIN_COMPACT_WIDTH) // shards) * shards
            rows = busy + [slot for slot, i in enumerate(held) if i is None][:width - len(busy)]
            state, held = _gather(state, np.asarray(rows, np.int32)), [held[slot] for slot in rows]
        log.info("decoded %d/%d prompts", sum(r is not None for r in results), len(prompts))
    return results
