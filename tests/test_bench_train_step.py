"""bench/train_step.py's list of the train step's matmuls (its matmul-only ceiling) against the matmuls that
jax actually traces for our loss and its gradients."""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from conftest import REPO_ROOT
from hephaestus_jax import losses
from hephaestus_jax.config import ModelConfig
from hephaestus_jax.model import llama

_SPEC = importlib.util.spec_from_file_location("train_step_bench", os.path.join(REPO_ROOT, "bench", "train_step.py"))
train_step_bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(train_step_bench)


def _einsum_flops(spec: str, lhs: tuple, rhs: tuple) -> int:
    sizes = dict(zip(spec.split("->")[0].split(",")[0], lhs)) | dict(zip(spec.split("->")[0].split(",")[1], rhs))
    return 2 * math.prod(sizes.values())


def _traced_dot_flops(jaxpr) -> int:
    """FLOPs of every dot_general in a jaxpr and the jaxprs inside it (unscanned model: no loop to multiply)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            total += 2 * math.prod(lhs) * math.prod(rhs) // math.prod(lhs[i] for i in (*lhs_contract, *lhs_batch))
        for value in eqn.params.values():  # Sub-jaxprs: pjit, custom_vjp_call, remat, cond branches.
            for item in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(item, "jaxpr", item)
                if hasattr(sub, "eqns"):
                    total += _traced_dot_flops(sub)
    return total


def test_the_listed_matmuls_are_the_ones_the_step_runs():
    config = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, scan_layers=False, remat_policy="none", dtype="float32",
                         param_dtype="float32")
    rows, seq_len = 2, 32
    params = llama.unbox(llama.init_params(config, jax.random.key(0)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (rows, seq_len)), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens, "positions": jnp.broadcast_to(jnp.arange(seq_len), tokens.shape),
             "segment_ids": jnp.ones_like(tokens), "loss_weights": jnp.ones(tokens.shape, jnp.float32)}

    traced = _traced_dot_flops(
        jax.make_jaxpr(jax.grad(lambda p: losses.batch_loss_sums(config, p, batch)["loss"]))(params).jaxpr)
    listed = sum(count * _einsum_flops(spec, lhs, rhs)
                 for spec, lhs, rhs, count in train_step_bench.step_matmuls(config, rows, seq_len))
    assert listed == traced
