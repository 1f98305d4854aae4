"""Held-out loss: the token-weighted mean next-token NLL of packed batches, per Forge task and over all tasks.

Used by the trainer's evaluation hook and by `python -m hephaestus_jax.evaluate loss`; the keys are those the
trainer logs (`eval/loss/forge_code`, ...)."""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from hephaestus_jax import losses, sharding
from hephaestus_jax.config import ModelConfig

log = logging.getLogger("hephaestus_jax.eval.heldout")

LOSS_KEY = "eval/loss"
TOKENS_KEY = "eval/tokens"


@functools.lru_cache(maxsize=None)
def _loss_sums(config: ModelConfig):
    """The jitted `losses.batch_loss_sums` for `config` (one per config, so repeated evaluations reuse it)."""
    return jax.jit(functools.partial(losses.batch_loss_sums, config))


def _host_value(array: jax.Array) -> float:
    """A replicated scalar's value (works on every process of a multi-host run)."""
    return float(np.asarray(array.addressable_data(0)))


def heldout_losses(config: ModelConfig, params: Any, streams: Mapping[str, Iterable[dict[str, np.ndarray]]],
                   mesh: Mesh, max_batches: int | None = None) -> dict[str, float]:
    """Token-weighted mean next-token NLL of each stream of packed batches (this process's rows of each batch).

    Returns `eval/loss/<name>` and `eval/tokens/<name>` (the loss weight summed over the batches) per stream, and
    `eval/loss` over all streams together. A stream that contributed no tokens has no loss entry. `params` are
    placed on `mesh` (as the trainer holds them); every process must pass the same number of batches.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be positive or None, got {max_batches}")
    loss_sums = _loss_sums(config)
    results: dict[str, float] = {}
    total_nll = total_weight = 0.0
    with sharding.activate(mesh):
        for name, stream in streams.items():
            sums = [loss_sums(params, sharding.global_batch(local, mesh))
                    for local in itertools.islice(stream, max_batches)]
            nll = sum(_host_value(s["nll"]) for s in sums)
            weight = sum(_host_value(s["weight"]) for s in sums)
            results[f"{TOKENS_KEY}/{name}"] = weight
            if weight > 0:
                results[f"{LOSS_KEY}/{name}"] = nll / weight
            else:
                log.warning("held-out loss of %s: no tokens evaluated", name)
            total_nll, total_weight = total_nll + nll, total_weight + weight
    if total_weight > 0:
        results[LOSS_KEY] = total_nll / total_weight
    return results


def format_loss_table(results: Mapping[str, float]) -> str:
    """One row per task (loss, tokens), then all tasks together."""
    names = [key[len(TOKENS_KEY) + 1:] for key in results if key.startswith(TOKENS_KEY + "/")]
    width = max(len("all"), len("task"), *(len(name) for name in names))
    rows = [f"{'task':<{width}}  {'loss':>9}  {'tokens':>12}"]
    for name in names:
        loss = results.get(f"{LOSS_KEY}/{name}")
        rows.append(f"{name:<{width}}  {'-' if loss is None else f'{loss:.4f}':>9}  "
                    f"{int(results[f'{TOKENS_KEY}/{name}']):>12}")
    if LOSS_KEY in results:
        total = sum(int(results[f"{TOKENS_KEY}/{name}"]) for name in names)
        rows.append(f"{'all':<{width}}  {results[LOSS_KEY]:>9.4f}  {total:>12}")
    return "\n".join(rows)
