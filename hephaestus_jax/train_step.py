"""The train state, its shardings, and the jitted train step (gradient accumulation, NaN/Inf skipping).

The state is a plain dict: params, opt_state, step, and two counters of skipped (non-finite) steps. It is
created directly sharded (jit with out_shardings), never materialised whole on one host.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hephaestus_jax import losses, optim, sharding
from hephaestus_jax.config import ModelConfig, OptimizerConfig
from hephaestus_jax.model import llama


@dataclasses.dataclass
class TrainStep:
    """The optimizer, the state's shardings and the compiled step for one model on one mesh."""

    model: ModelConfig
    mesh: Mesh
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: dict[str, Any]
    grad_accum_steps: int
    z_loss: float
    _step_fn: Callable | None = None

    @classmethod
    def create(cls, model: ModelConfig, mesh: Mesh, optimizer_config: OptimizerConfig, num_steps: int,
               grad_accum_steps: int = 1, z_loss: float = 0.0) -> "TrainStep":
        optimizer = optim.make_optimizer(optimizer_config, num_steps)
        param_shardings = sharding.logical_to_sharding(llama.param_axes(model), mesh)
        abstract_opt = jax.eval_shape(optimizer.init, llama.abstract_params(model))
        replicated = sharding.replicated(mesh)
        opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_shardings,
                                              transform_non_params=lambda _: replicated)
        shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated,
                     "bad_steps": replicated, "skipped": replicated}
        return cls(model, mesh, optimizer, optim.learning_rate_schedule(optimizer_config, num_steps), shardings,
                   grad_accum_steps, z_loss)

    def abstract_state(self) -> dict[str, Any]:
        """ShapeDtypeStructs (with shardings) of the state, without allocating it."""
        shapes = jax.eval_shape(lambda: self._state_from_params(llama.abstract_params(self.model), init=False))
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                            self.state_shardings)

    def _state_from_params(self, params: Any, init: bool = True) -> dict[str, Any]:
        if not init:  # Shapes only (params are ShapeDtypeStructs).
            params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params)
        zero = jnp.zeros((), jnp.int32)
        return {"params": params, "opt_state": self.optimizer.init(params), "step": zero, "bad_steps": zero,
                "skipped": zero}

    def init(self, rng: jax.Array) -> dict[str, Any]:
        """A randomly initialised state, created sharded."""
        with sharding.activate(self.mesh):
            make = jax.jit(lambda r: self._state_from_params(llama.unbox(llama.init_params(self.model, r))),
                           out_shardings=self.state_shardings)
            return make(rng)

    def from_params(self, params: Any) -> dict[str, Any]:
        """A fresh state (step 0, new optimizer state) around given (sharded) params."""
        with sharding.activate(self.mesh):
            return jax.jit(self._state_from_params, out_shardings=self.state_shardings)(params)

    def jitted(self) -> Callable:
        """The jitted step: state and batch placed by their shardings, the input state donated."""
        if self._step_fn is None:
            batch_sharding = sharding.batch_sharding(self.mesh)
            self._step_fn = jax.jit(self._step, in_shardings=(self.state_shardings, batch_sharding),
                                    out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                                    donate_argnums=0)
        return self._step_fn

    def __call__(self, state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[dict[str, Any], dict]:
        """One optimizer step on a global batch; the input state is donated."""
        with sharding.activate(self.mesh):
            return self.jitted()(state, batch)

    def _grads(self, params: Any, batch: dict[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        def loss_fn(p):
            sums = losses.batch_loss_sums(self.model, p, batch, self.z_loss)
            return sums["loss"], sums

        (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, sums

    def _accumulated_grads(self, params: Any, batch: dict[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        """Sum of gradients and loss sums over `grad_accum_steps` micro-batches (rows k, k+n, k+2n, ...)."""
        n = self.grad_accum_steps
        if n == 1:
            return self._grads(params, batch)
        spec = NamedSharding(self.mesh, PartitionSpec(None, sharding.BATCH_AXES))
        micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), spec), batch)

        def body(carry, micro_batch):
            grads, sums = self._grads(params, micro_batch)
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                 {"loss": jnp.zeros(()), "nll": jnp.zeros(()), "weight": jnp.zeros(())})
        (grads, sums), _ = jax.lax.scan(body, zeros, micro)
        return grads, sums

    def gradients(self, params: Any, batch: dict[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        """Token-weighted mean gradients over the whole batch (micro-batched if configured) and the loss sums."""
        grad_sums, sums = self._accumulated_grads(params, batch)
        weight = jnp.maximum(sums["weight"], 1.0)
        return jax.tree.map(lambda g: g / weight, grad_sums), sums

    def _step(self, state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[dict[str, Any], dict]:
        params = state["params"]
        grads, sums = self.gradients(params, batch)
        weight = jnp.maximum(sums["weight"], 1.0)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
        keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {
            "params": keep_old(new_params, params),
            "opt_state": keep_old(opt_state, state["opt_state"]),
            "step": state["step"] + 1,
            "bad_steps": jnp.where(finite, 0, state["bad_steps"] + 1),
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        }
        metrics = {"loss": sums["nll"] / weight, "total_loss": sums["loss"] / weight, "grad_norm": grad_norm,
                   "learning_rate": self.schedule(state["step"]), "loss_tokens": sums["weight"],
                   "finite": finite, "bad_steps": new_state["bad_steps"]}
        return new_state, metrics

