"""model/kernels.py: every hand-written gradient against its plain-autodiff twin, kernel by kernel and for the whole
model with `ModelConfig.kernels = 'plain'`.

Tolerance (float32): values and gradients agree to TOL times the largest magnitude of the twin's (a max-norm
relative error); the fast and plain versions only sum in other orders.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hephaestus_jax import losses
from hephaestus_jax.config import KERNEL_NAMES, REMAT_POLICY_NAMES, ModelConfig
from hephaestus_jax.model import attention, kernels, llama, remat

TOL = 1e-5
FAST, PLAIN = kernels.KERNELS["fast"], kernels.KERNELS["plain"]


def _normal(seed: int, shape: tuple[int, ...]) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _assert_close(got, want, what: str) -> None:
    scale = float(jnp.max(jnp.abs(want)))
    assert scale > 0, what
    np.testing.assert_allclose(got, want, atol=TOL * scale, rtol=0, err_msg=what)


def _check_vjp(fast, plain, args: tuple, cotangent) -> None:
    """Equal outputs, and equal input gradients for `cotangent` (a pytree like the output), jitted."""
    outs, grads = [], []
    for fn in (fast, plain):
        out, vjp = jax.vjp(fn, *args)
        outs.append(out)
        grads.append(jax.jit(vjp)(cotangent))
    for index, (got, want) in enumerate(zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]))):
        _assert_close(got, want, f"output {index}")
    for index, (got, want) in enumerate(zip(grads[0], grads[1])):
        _assert_close(got, want, f"gradient of argument {index}")


def test_the_switch_names_the_configs_kernels_and_policies():
    assert sorted(kernels.KERNELS) == sorted(KERNEL_NAMES)
    assert sorted(remat.REMAT_POLICIES) == sorted(REMAT_POLICY_NAMES)


# Each einsum the model runs: q/k/v ([b, s, e] -> heads), o, gate/up, down, and the float32 logits. The down and o
# projections' inputs are larger than their output gradients, the others smaller: both operand orders of the
# fast weight gradient.
@pytest.mark.parametrize("spec, x_shape, w_shape, out_dtype", [
    ("bse,hde->bshd", (2, 12, 16), (4, 8, 16), None),
    ("bshd,ehd->bse", (2, 12, 4, 8), (16, 4, 8), None),
    ("bse,fe->bsf", (2, 12, 16), (40, 16), None),
    ("bsf,ef->bse", (2, 12, 40), (16, 40), None),
    ("bse,ve->bsv", (2, 12, 16), (96, 16), jnp.float32),
])
def test_project_matches_autodiff(spec, x_shape, w_shape, out_dtype):
    x, weight = _normal(0, x_shape), _normal(1, w_shape)
    out_shape = jax.eval_shape(lambda: jnp.einsum(spec, x, weight)).shape
    _check_vjp(lambda x, w: FAST.project(spec, x, w, "p", out_dtype),
               lambda x, w: PLAIN.project(spec, x, w, "p", out_dtype), (x, weight), _normal(2, out_shape))



@pytest.mark.parametrize("spec, x_shape, w_shape, transposed", [
    ("bse,fe->bsf", (2, 12, 16), (40, 16), True),  # gate/up: x first, the gradient laid out [e, f], transposed.
    ("bsf,ef->bse", (2, 12, 40), (16, 40), False),  # down: the output gradient first, already [e, f].
])
def test_project_keeps_the_weight_gradient_transpose_apart_from_its_matmul(spec, x_shape, w_shape, transposed):
    """A barrier between the weight-gradient matmul and its transpose, where there is one: without it XLA:CPU
    folds the transpose into the matmul's output layout, its slower form (docs/performance.md)."""
    x, weight = _normal(0, x_shape), _normal(1, w_shape)
    out, vjp = jax.vjp(lambda x, w: FAST.project(spec, x, w, "p"), x, weight)
    jaxpr = str(jax.make_jaxpr(vjp)(out))
    assert ("optimization_barrier" in jaxpr) == transposed
    assert ("transpose" in jaxpr) == transposed


def test_swiglu_matches_autodiff():
    gate, up = 3 * _normal(0, (2, 12, 40)), _normal(1, (2, 12, 40))
    _check_vjp(FAST.swiglu, PLAIN.swiglu, (gate, up), _normal(2, gate.shape))


@pytest.mark.parametrize("window", [None, 5])
def test_attend_matches_autodiff(window):
    """Head-major attention ([b, kv_heads, group, s, d]) on two packed documents and a padded row."""
    b, kv, group, s, d = 2, 2, 3, 20, 8
    q, k, v = _normal(0, (b, kv, group, s, d)), _normal(1, (b, kv, s, d)), _normal(2, (b, kv, s, d))
    segments = np.ones((b, s), np.int32)
    segments[0, 8:] = 2
    segments[1, 15:] = 0
    slots = jnp.broadcast_to(jnp.arange(s), (b, s))
    mask = attention.attention_mask(jnp.asarray(segments), jnp.asarray(segments), slots, slots, window)
    _check_vjp(lambda q, k, v: FAST.attend(q, k, v, mask), lambda q, k, v: PLAIN.attend(q, k, v, mask), (q, k, v),
               _normal(3, q.shape))


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_chunked_cross_entropy_matches_autodiff(z_loss):
    """Loss and nll sums over 3 chunks of 8 positions, a padded vocabulary (100 of 128 rows); the loss sum's
    gradient for a cotangent other than 1. The nll sum is a metric: the fast kernel gives it no gradient, so its
    cotangent is 0 here."""
    rows, seq, embed, padded, vocab, chunk = 2, 24, 16, 128, 100, 8
    hidden, head = _normal(0, (rows, seq, embed)), _normal(1, (padded, embed))
    rng = np.random.default_rng(2)
    targets = jnp.asarray(rng.integers(0, vocab, (rows, seq)), jnp.int32)
    weights = jnp.asarray(rng.random((rows, seq)) > 0.3, jnp.float32)

    def run(chunked):
        return lambda hidden, head: chunked(hidden, head, targets, weights, z_loss, chunk, vocab)

    _check_vjp(run(FAST.chunked_cross_entropy), run(PLAIN.chunked_cross_entropy), (hidden, head),
               (jnp.float32(1.7), jnp.float32(0.0)))


CONFIG = ModelConfig(vocab_size=300, vocab_pad_multiple=128, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, max_position_embeddings=128)


def _batch(rows=2, seq=40):
    rng = np.random.default_rng(0)
    segments = np.ones((rows, seq), np.int32)
    segments[0, 17:] = 2
    positions = np.tile(np.arange(seq), (rows, 1))
    positions[0, 17:] -= 17
    return {"inputs": rng.integers(0, 300, (rows, seq)), "targets": rng.integers(0, 300, (rows, seq)),
            "positions": positions, "segment_ids": segments,
            "loss_weights": (rng.random((rows, seq)) > 0.2).astype(np.float32)}


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (scan, remat, pjit, custom_vjp_call)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(item, "jaxpr", item)
                if hasattr(sub, "eqns"):
                    yield from _equations(sub)


@pytest.mark.parametrize("chunk", [0, 16])
def test_the_model_on_plain_kernels_matches_the_fast_kernels(chunk):
    """Loss sums and every parameter's gradient, scanned layers, remat, packed rows; `chunk` > 0 also runs the
    chunked loss. The plain model traces no custom VJP at all."""
    fast = CONFIG.replace(logits_chunk_size=chunk, remat_policy="dots")
    plain = fast.replace(kernels="plain")
    params = llama.unbox(llama.init_params(CONFIG, jax.random.key(0)))
    batch = _batch()

    def loss(config):
        return lambda p: losses.batch_loss_sums(config, p, batch, z_loss=1e-4)["loss"]

    custom = {config.kernels: sum(eqn.primitive.name.startswith("custom_vjp")
                                  for eqn in _equations(jax.make_jaxpr(loss(config))(params).jaxpr))
              for config in (fast, plain)}
    assert custom["plain"] == 0 and custom["fast"] > 0, custom
    (value, grads), (plain_value, plain_grads) = (jax.jit(jax.value_and_grad(loss(c)))(params) for c in (fast, plain))
    _assert_close(value, plain_value, "loss")
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(plain_grads)):
        _assert_close(got, want, jax.tree_util.keystr(path))


def test_the_model_on_plain_kernels_gives_the_fast_logits():
    params = llama.unbox(llama.init_params(CONFIG, jax.random.key(1)))
    batch = _batch()
    inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
    fast, plain = (jax.jit(lambda p, c=c: llama.forward(c, p, *inputs))(params)
                   for c in (CONFIG, CONFIG.replace(kernels="plain")))
    _assert_close(fast[..., :300], plain[..., :300], "logits")


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_the_model_names_exactly_the_remat_projections(name):
    """The outputs `remat.PROJECTION_NAMES` lists are the ones the layers name (and the head's logits)."""
    config = CONFIG.replace(kernels=name)
    params = llama.unbox(llama.init_params(config, jax.random.key(0)))
    jaxpr = jax.make_jaxpr(lambda p: llama.forward(config, p, jnp.zeros((1, 8), jnp.int32)))(params).jaxpr
    named = {eqn.params["name"] for eqn in _equations(jaxpr) if eqn.primitive.name == "name"}
    assert named == {*remat.PROJECTION_NAMES, "logits"}
