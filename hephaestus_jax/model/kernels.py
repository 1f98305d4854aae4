"""Every hand-written gradient of the model, each beside its plain-autodiff twin, chosen by `ModelConfig.kernels`.

`KERNELS["fast"]` runs the custom VJPs; `KERNELS["plain"]` the same functions differentiated by JAX itself, for
debugging and for hardware where the hand-written versions do not pay. Forward values agree up to rounding and
gradients up to float32 rounding (tests/model/test_kernels.py states the tolerances). What each fast version saves,
and on what: docs/performance.md, "Hand-written kernels". Splash attention (`ModelConfig.attention_impl`) is
Pallas's own kernel and not switched here.

- `project`: einsum(spec, x, weight) with its output named for the remat policies (`remat.PROJECTION_NAMES`);
  its backward pass puts the smaller operand first in the weight-gradient matmul.
- `swiglu`: silu(gate) * up; its backward pass keeps only gate and up.
- `attend`: head-major softmax attention; its backward pass keeps only the unnormalised exponentials.
- `chunked_cross_entropy`: output projection + cross entropy a chunk of positions at a time; the fast version
  takes the gradients in the forward pass, from each chunk's logits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_MASK_LOGIT = -1e9


# ---------------------------------------------------------------------------------------------- projections
def project(spec: str, x: jnp.ndarray, weight: jnp.ndarray, name: str, out_dtype: Any = None) -> jnp.ndarray:
    """`einsum(spec, x, weight)` (accumulated and returned in `out_dtype` if given), its output named `name`.

    The backward pass lays the weight gradient out with the axes of the smaller of `x` and the output gradient
    first and transposes the (small) result into the weight's layout: XLA:CPU relayouts the first operand of a
    matmul that contracts tokens, and autodiff's own order put the larger one there. An optimization barrier keeps
    that transpose apart: folded into the matmul, it gave XLA:CPU the [mlp, embed] output form, 10% slower for
    the gate and up weight gradients (docs/performance.md).
    """
    return checkpoint_name(_project(spec, out_dtype, x, weight), name)


def project_plain(spec: str, x: jnp.ndarray, weight: jnp.ndarray, name: str, out_dtype: Any = None) -> jnp.ndarray:
    """`project` differentiated by autodiff."""
    return checkpoint_name(jnp.einsum(spec, x, weight, preferred_element_type=out_dtype), name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _project(spec: str, out_dtype: Any, x: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
    return jnp.einsum(spec, x, weight, preferred_element_type=out_dtype)


def _project_forward(spec, out_dtype, x, weight):
    return _project(spec, out_dtype, x, weight), (x, weight)


def _project_backward(spec, out_dtype, residuals, d_y):
    x, weight = residuals
    inputs, y_axes = spec.split("->")
    x_axes, weight_axes = inputs.split(",")
    d_x = jnp.einsum(f"{y_axes},{weight_axes}->{x_axes}", d_y.astype(weight.dtype), weight,
                     preferred_element_type=out_dtype)
    (first, first_axes), (second, second_axes) = sorted(
        [(x, x_axes), (d_y.astype(x.dtype), y_axes)], key=lambda operand: operand[0].size)
    order = "".join(a for a in weight_axes if a in first_axes) + "".join(a for a in weight_axes if a not in first_axes)
    d_weight = jnp.einsum(f"{first_axes},{second_axes}->{order}", first, second, preferred_element_type=out_dtype)
    if order != weight_axes:  # Else XLA folds the transpose back into the matmul: its slow form again.
        d_weight = jax.lax.optimization_barrier(d_weight)
    d_weight = jnp.transpose(d_weight, [order.index(a) for a in weight_axes])
    return d_x.astype(x.dtype), d_weight.astype(weight.dtype)


_project.defvjp(_project_forward, _project_backward)


# ---------------------------------------------------------------------------------------------- SwiGLU
@jax.custom_vjp
def swiglu(gate: jnp.ndarray, up: jnp.ndarray) -> jnp.ndarray:
    """silu(gate) * up. Its backward pass keeps only `gate` and `up` and recomputes the sigmoid, where autodiff
    keeps five [tokens, mlp] tensors. It computes in the inputs' dtype, as autodiff does (a float32 sigmoid makes
    XLA:TPU keep float32 [tokens, mlp] temporaries)."""
    return swiglu_plain(gate, up)


def swiglu_plain(gate: jnp.ndarray, up: jnp.ndarray) -> jnp.ndarray:
    """`swiglu` differentiated by autodiff."""
    return jax.nn.silu(gate) * up


def _swiglu_forward(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_backward(residuals, d_hidden):
    gate, up = residuals
    sigmoid = jax.nn.sigmoid(gate)
    d_gate = d_hidden * up * sigmoid * (1 + gate * (1 - sigmoid))
    return d_gate.astype(gate.dtype), (d_hidden * gate * sigmoid).astype(up.dtype)


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


# ---------------------------------------------------------------------------------------------- attention
def _masked_scores(q: jnp.ndarray, k: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """float32 scaled scores, masked: q [b, k, g, s, d], k [b, k, t, d], mask [b, s, t] -> [b, k, g, s, t]."""
    scores = jnp.einsum("bkgsd,bktd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = scores * (q.shape[-1] ** -0.5)
    return jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)


def _exponentials(q: jnp.ndarray, k: jnp.ndarray, mask: jnp.ndarray, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The unnormalised softmax of the masked, scaled scores, exp(scores - row max) in `dtype`, and its float32
    row sums: [b, k, g, s, t], [b, k, g, s, 1]."""
    scores = _masked_scores(q, k, mask)
    exps = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    return exps.astype(dtype), jnp.sum(exps, axis=-1, keepdims=True)


@jax.custom_vjp
def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Head-major attention: q [b, k, g, s, d]; k, v [b, k, t, d]; mask [b, s, t] -> [b, k, g, s, d].

    The [s, t] exponentials are written once, in the values' dtype, and multiply the values unnormalised; the
    [s, d] output is divided by the row sums (as flash attention does). The backward pass keeps one [s, t] tensor,
    the exponentials, where autodiff of the softmax keeps three (masked scores, exponentials, probabilities) and
    the mask broadcast over heads.
    """
    return _attend_forward(q, k, v, mask)[0]


def attend_plain(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """`attend` as a float32 softmax differentiated by autodiff."""
    probs = jax.nn.softmax(_masked_scores(q, k, mask), axis=-1)
    return jnp.einsum("bkgst,bktd->bkgsd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(
        v.dtype)


def _attend_forward(q, k, v, mask):
    exps, sums = _exponentials(q, k, mask, v.dtype)
    out = (jnp.einsum("bkgst,bktd->bkgsd", exps, v, preferred_element_type=jnp.float32) / sums).astype(v.dtype)
    return out, (q, k, v, mask, exps, sums, out)


def _attend_backward(residuals, d_out):
    """Softmax backward with the row term sum_t(dP * P) taken as sum_d(dO * O), a [seq, d] reduction instead
    of a [seq, seq] one, and P = exps / sums with the division applied to [seq, d] operands where it can. The
    key and value gradients are computed transposed ([d, t]) and turned back: that contracts the [seq, seq]
    operand along its major axis, so XLA's CPU dots need no relayout of it."""
    q, k, v, mask, exps, sums, out = residuals
    d_out_normalised = (d_out.astype(jnp.float32) / sums).astype(d_out.dtype)
    d_v = jnp.swapaxes(jnp.einsum("bkgsd,bkgst->bkdt", d_out_normalised, exps.astype(d_out.dtype)), 2, 3)
    d_probs = jnp.einsum("bkgsd,bktd->bkgst", d_out_normalised, v, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True) / sums
    d_scores = (exps.astype(jnp.float32) * (d_probs - row) * (q.shape[-1] ** -0.5)).astype(q.dtype)
    d_q = jnp.einsum("bkgst,bktd->bkgsd", d_scores, k)
    d_k = jnp.swapaxes(jnp.einsum("bkgsd,bkgst->bkdt", q, d_scores), 2, 3)
    return d_q, d_k.astype(k.dtype), d_v.astype(v.dtype), None


attend.defvjp(_attend_forward, _attend_backward)


# ---------------------------------------------------------------------------------------------- chunked loss
def mask_vocab_padding(logits: jnp.ndarray, vocab_size: int) -> jnp.ndarray:
    """`logits` [..., padded vocab] with every entry past `vocab_size` set to a large negative logit."""
    if logits.shape[-1] == vocab_size:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, _MASK_LOGIT)


def _chunks(x: jnp.ndarray, chunk: int) -> jnp.ndarray:
    """[rows, seq, ...] -> [seq // chunk, rows, chunk, ...] (the leading axis is scanned)."""
    rows, seq = x.shape[:2]
    return jnp.swapaxes(x.reshape(rows, seq // chunk, chunk, *x.shape[2:]), 0, 1)


def _chunk_loss(h, head, t, w, z_loss, vocab_size):
    """One chunk's logits [rows, chunk, vocab], their logsumexp, and its (loss sum, nll sum)."""
    logits = mask_vocab_padding(jnp.einsum("bce,ve->bcv", h, head, preferred_element_type=jnp.float32), vocab_size)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    nll = log_z - jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    loss = nll + z_loss * jnp.square(log_z)
    return logits, log_z, (jnp.sum(loss * w), jnp.sum(nll * w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def chunked_cross_entropy(hidden, head, targets, weights, z_loss, chunk, vocab_size):
    """(loss sum, nll sum) of logits = hidden @ head.T, `chunk` positions at a time: hidden [rows, seq, embed]
    with seq a multiple of `chunk`; head [padded vocab, embed]; int32 targets, float32 weights [rows, seq].

    Each chunk's logits exist once: the gradients are taken from them in the same pass (the loss is a sum, so
    its gradient for a cotangent g is g times these), where autodiff's backward pass recomputes them, a fourth
    output-projection matmul. The nll sum gets no gradient: it is a metric.
    """
    return _chunked_scan(hidden, head, targets, weights, z_loss, chunk, vocab_size, with_gradients=False)[0]


def chunked_cross_entropy_plain(hidden, head, targets, weights, z_loss, chunk, vocab_size):
    """`chunked_cross_entropy` differentiated by autodiff, each chunk rematerialised (its logits are recomputed
    in the backward pass, never all kept)."""
    @jax.checkpoint
    def body(totals, xs):
        h, t, w = xs
        sums = _chunk_loss(h, head, t, w, z_loss, vocab_size)[2]
        return (totals[0] + sums[0], totals[1] + sums[1]), None

    zero = jnp.zeros((), jnp.float32)
    totals, _ = jax.lax.scan(body, (zero, zero), (_chunks(hidden, chunk), _chunks(targets, chunk),
                                                  _chunks(weights, chunk)))
    return totals


def _chunked_scan(hidden, head, targets, weights, z_loss, chunk, vocab_size, *, with_gradients: bool):
    """(loss sum, nll sum) over the chunks; `with_gradients` also gives d(loss sum)/d hidden and d/d head."""
    def body(carry, xs):
        totals, d_head = carry
        h, t, w = xs
        logits, log_z, sums = _chunk_loss(h, head, t, w, z_loss, vocab_size)
        totals = (totals[0] + sums[0], totals[1] + sums[1])
        if not with_gradients:
            return (totals, d_head), None
        # d(loss)/d(logits) = w * (p * (1 + 2 z lse) - onehot).
        d_logits = jnp.exp(logits - log_z[..., None]) * ((1 + 2 * z_loss * log_z) * w)[..., None]
        d_logits = d_logits - jax.nn.one_hot(t, head.shape[0], dtype=jnp.float32) * w[..., None]
        d_h = jnp.einsum("bcv,ve->bce", d_logits.astype(head.dtype), head, preferred_element_type=jnp.float32)
        d_head = d_head + jnp.einsum("bcv,bce->ve", d_logits.astype(h.dtype), h, preferred_element_type=jnp.float32)
        return (totals, d_head), d_h.astype(h.dtype)

    zero = jnp.zeros((), jnp.float32)
    d_head = jnp.zeros(head.shape, jnp.float32) if with_gradients else zero
    (totals, d_head), d_hidden = jax.lax.scan(body, ((zero, zero), d_head), (
        _chunks(hidden, chunk), _chunks(targets, chunk), _chunks(weights, chunk)))
    if not with_gradients:
        return totals, None
    rows, seq = hidden.shape[:2]
    return totals, (jnp.swapaxes(d_hidden, 0, 1).reshape(rows, seq, hidden.shape[-1]), d_head)


def _chunked_forward(hidden, head, targets, weights, z_loss, chunk, vocab_size):
    totals, (d_hidden, d_head) = _chunked_scan(hidden, head, targets, weights, z_loss, chunk, vocab_size,
                                               with_gradients=True)
    return totals, (d_hidden, d_head.astype(head.dtype))


def _chunked_backward(z_loss, chunk, vocab_size, residuals, cotangents):
    """Only the loss sum's cotangent counts (the nll sum is a metric). Targets and weights are data: no
    gradient (None)."""
    d_hidden, d_head = residuals
    g_loss, _ = cotangents
    return (g_loss * d_hidden).astype(d_hidden.dtype), (g_loss * d_head).astype(d_head.dtype), None, None


chunked_cross_entropy.defvjp(_chunked_forward, _chunked_backward)


# ---------------------------------------------------------------------------------------------- the switch
@dataclasses.dataclass(frozen=True)
class Kernels:
    """One implementation of each kernel, with the fast versions' signatures."""

    project: Callable[..., jnp.ndarray]
    swiglu: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
    attend: Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]
    chunked_cross_entropy: Callable[..., tuple[jnp.ndarray, jnp.ndarray]]


KERNELS = {  # ModelConfig.kernels -> the kernels the model and the loss run.
    "fast": Kernels(project, swiglu, attend, chunked_cross_entropy),
    "plain": Kernels(project_plain, swiglu_plain, attend_plain, chunked_cross_entropy_plain),
}
