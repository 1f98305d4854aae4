"""Batched KV-cache decoding (greedy, temperature / top-k / top-p sampling) and loading a checkpoint for it.

`complete` (greedy completions of many prompts) and `generate` (one batch, with sampling, finish reasons and
optionally logits) both run `decoding.decode`: continuous batching over a fixed number of slots, a finished
prompt's slot refilled from the queue, prompts prefilled one length bucket at a time. A row's tokens depend on its
prompt alone (and the seed), not on its slot, its neighbours or the padding. `python -m hephaestus_jax.generate`
is its command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from jax.sharding import Mesh

from hephaestus_jax import decoding
from hephaestus_jax import stored_checkpoint as ckpt
from hephaestus_jax import sharding
from hephaestus_jax.config import ConfigError, MeshConfig, ModelConfig
from hephaestus_jax.decoding import GREEDY, SamplingConfig
from hephaestus_jax.model import llama

if TYPE_CHECKING:
    import seqio  # Imports TensorFlow; decoding only needs a vocabulary's ids.

log = logging.getLogger("hephaestus_jax.inference")


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


def _decode(config: ModelConfig, params: Any, rows: list[np.ndarray], mesh: Mesh | None, *, max_new_tokens: int,
            batch_size: int, **options) -> list[decoding.Completion]:
    """`decoding.decode` of `rows` in `batch_size` slots, under `mesh` (rows split over its batch axes)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    shards = 1 if mesh is None else sharding.batch_shards(mesh)
    with sharding.activate(mesh) if mesh is not None else contextlib.nullcontext():
        return decoding.decode(config, params, [np.asarray(row, np.int32) for row in rows],
                               max_new_tokens=max_new_tokens, slots=batch_size, shards=shards, **options)


def generate(config: ModelConfig, params: Any, prompts: Sequence[np.ndarray] | np.ndarray,
             mask: np.ndarray | None = None, *, max_new_tokens: int, stop_ids: Sequence[int] = (),
             sampling: SamplingConfig = GREEDY, seed: int = 0, pad_id: int = 0, mesh: Mesh | None = None,
             batch_size: int | None = None, return_logits: bool = False) -> GenerationResult:
    """Continue each prompt by up to `max_new_tokens` tokens, ending a row at its first token in `stop_ids`.

    `prompts` is a list of 1-D token arrays, or a [rows, length] array with a `mask` of its valid tokens (left or
    right padding, or none). `params` are the model's (unboxed) parameters; with `mesh`, they must be placed on it
    and rows are split over its batch axes. At most `batch_size` rows (default: all) decode at once; a finished
    row's slot takes the next prompt. Sampling is reproducible: the same `seed` and prompt order give the same
    tokens, whatever the batch size.
    """
    rows = _prompt_rows(prompts, mask)
    completions = _decode(config, params, rows, mesh, max_new_tokens=max_new_tokens,
                          batch_size=batch_size or len(rows), stop_ids=stop_ids, sampling=sampling, seed=seed,
                          return_logits=return_logits)
    tokens = np.full((len(rows), max_new_tokens), pad_id, np.int32)
    logits = None
    if return_logits:
        logits = np.zeros((len(rows), max_new_tokens, config.padded_vocab_size), np.float32)
    for row, completion in enumerate(completions):
        tokens[row, :completion.tokens.size] = completion.tokens
        if logits is not None:
            logits[row, :completion.tokens.size] = completion.logits
    return GenerationResult(tokens=tokens, lengths=np.array([c.tokens.size for c in completions], np.int32),
                            stopped=np.array([c.stopped for c in completions]), logits=logits)


def complete(config: ModelConfig, params: Any, prompts: Sequence[np.ndarray], *, max_new_tokens: int,
             stop_ids: Sequence[int] = (), mesh: Mesh | None = None, batch_size: int) -> list[np.ndarray]:
    """Greedy completions (stop token excluded) of many prompts, in their order, decoded `batch_size` rows at a
    time (continuous batching: `decoding`)."""
    completions = _decode(config, params, list(prompts), mesh, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          stop_ids=stop_ids)
    return [c.tokens[:c.tokens.size - c.stopped] for c in completions]


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
