"""The train step: sharding invariance, gradient accumulation (CPT and uneven SFT masks), NaN/Inf skipping, the
optimizer (clipping, decay), and resuming the data position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support.forge_fixture import write_forge_fixture
from support.train_helpers import OPTIMIZER, TINY, assert_close_rel, forge_batches, mesh_of, run_steps
from hephaestus_jax import stored_checkpoint as ckpt
from hephaestus_jax import hooks, optim, sharding, train
from hephaestus_jax.train_checkpointer import TrainCheckpointer
from hephaestus_jax.config import DataConfig, ForgeFiles, OptimizerConfig, TrainConfig
from hephaestus_jax.data import mixtures
from hephaestus_jax.data.pipeline import StreamSpec
from hephaestus_jax.model import llama
from hephaestus_jax.train_step import TrainStep


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    return forge_batches(tmp_path_factory.mktemp("forge"), count=5)


@pytest.mark.slow
def test_eight_devices_fsdp_tensor_match_one_device(batches):
    """fsdp=4 x tensor=2 over 8 simulated devices: the same losses as 1 device for 5 steps (<= 1e-5 relative)."""
    one = TrainStep.create(TINY, mesh_of(1), OPTIMIZER, num_steps=5)
    eight = TrainStep.create(TINY, mesh_of(8, fsdp=4, tensor=2), OPTIMIZER, num_steps=5)
    state_one = one.init(jax.random.key(0))
    state_eight = eight.init(jax.random.key(0))
    assert state_eight["params"]["layers"]["attn"]["q_proj"].sharding.spec == \
        jax.sharding.PartitionSpec(None, "tensor", None, "fsdp")
    np.testing.assert_array_equal(np.asarray(state_one["params"]["embed"]),
                                  np.asarray(state_eight["params"]["embed"]))  # Init independent of the mesh.
    _, losses_one = run_steps(one, state_one, batches)
    _, losses_eight = run_steps(eight, state_eight, batches)
    assert losses_one[-1] < losses_one[0]
    assert_close_rel(losses_eight, losses_one, 1e-5)


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch(batches):
    """4 micro-batches of 2 rows == one batch of 8 rows: same gradients and losses (<= 1e-5)."""
    mesh = mesh_of(2)
    whole = TrainStep.create(TINY, mesh, OPTIMIZER, num_steps=5)
    accumulated = TrainStep.create(TINY, mesh, OPTIMIZER, num_steps=5, grad_accum_steps=4)
    params = whole.init(jax.random.key(1))["params"]
    batch = sharding.global_batch(batches[0], mesh)
    with sharding.activate(mesh):
        grads_a, sums_a = jax.jit(whole.gradients)(params, batch)
        grads_b, sums_b = jax.jit(accumulated.gradients)(params, batch)
    assert float(sums_a["weight"]) == float(sums_b["weight"]) > 0
    assert_close_rel(float(sums_b["loss"]), float(sums_a["loss"]), 1e-5)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))
    _, losses_a = run_steps(whole, whole.init(jax.random.key(1)), batches[:3])
    _, losses_b = run_steps(accumulated, accumulated.init(jax.random.key(1)), batches[:3])
    assert_close_rel(losses_b, losses_a, 1e-5)


def test_the_z_loss_is_in_the_steps_gradients_and_total_loss(batches):
    """TrainStep(z_loss=z) takes the gradient of the token mean of nll + z * logsumexp(logits)^2 (written out
    here from the logits), and reports that mean as total_loss beside the plain nll as loss."""
    z_loss, mesh, local = 0.05, mesh_of(1), batches[0]
    step_fn = TrainStep.create(TINY, mesh, OPTIMIZER, num_steps=5, z_loss=z_loss)
    params = step_fn.init(jax.random.key(4))["params"]

    def objective(p, z):
        logits = llama.forward(TINY, p, local["inputs"], local["positions"], local["segment_ids"])
        log_z = jax.nn.logsumexp(logits, axis=-1)
        nll = log_z - jnp.take_along_axis(logits, local["targets"][..., None], axis=-1)[..., 0]
        weights = local["loss_weights"]
        return jnp.sum((nll + z * log_z**2) * weights) / jnp.sum(weights)

    objective = jax.jit(objective)
    expected, without = (jax.jit(jax.grad(objective))(params, z) for z in (z_loss, 0.0))
    with sharding.activate(mesh):
        grads, _ = jax.jit(step_fn.gradients)(params, sharding.global_batch(local, mesh))
    for got, want, plain in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), jax.tree.leaves(without)):
        scale = np.max(np.abs(want))
        assert np.max(np.abs(np.asarray(got) - want)) <= 1e-4 * scale
    assert max(np.max(np.abs(w - p)) / np.max(np.abs(w)) for w, p in
               zip(jax.tree.leaves(expected), jax.tree.leaves(without))) > 1e-2  # The z-loss term matters.
    _, metrics = step_fn(step_fn.from_params(params), sharding.global_batch(local, mesh))
    assert_close_rel(float(metrics["total_loss"]), float(objective(params, z_loss)), 1e-5)
    assert_close_rel(float(metrics["loss"]), float(objective(params, 0.0)), 1e-5)


class _Writer:
    def __init__(self):
        self.rows = []

    def write(self, step, scalars, progress=True):
        self.rows.append((step, scalars))


def test_non_finite_steps_are_skipped_then_the_run_stops(batches):
    step_fn = TrainStep.create(TINY, mesh_of(1), OPTIMIZER, num_steps=10)
    state = step_fn.init(jax.random.key(2))
    good_params = jax.tree.map(np.asarray, state["params"])
    poisoned = dict(batches[0], loss_weights=np.where(batches[0]["loss_weights"] > 0, np.nan, 0.0).astype(np.float32))
    writer = _Writer()
    logger = hooks.LogHook(writer, every=1, tokens_per_step=1, flops_per_step=1.0, peak_flops=1.0, max_bad_steps=3)
    with pytest.raises(hooks.TrainingDiverged, match="3 consecutive steps"):
        for step in range(1, 6):
            state, metrics = step_fn(state, sharding.global_batch(poisoned, step_fn.mesh))
            logger.record(step, metrics, 0.0)
            logger(step, state, False)
    # Detected when step 4 is recorded (one step behind, so as not to wait for the device every step).
    assert int(state["skipped"]) == 4 and int(state["bad_steps"]) == 4
    for kept, good in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(good_params)):
        np.testing.assert_array_equal(np.asarray(kept), good)  # Skipped steps left the parameters alone.
    assert [row[1]["skipped_steps"] for row in writer.rows] == [1.0, 1.0, 1.0]
    state, metrics = step_fn(state, sharding.global_batch(batches[1], step_fn.mesh))  # A good batch recovers.
    assert bool(metrics["finite"]) and int(state["bad_steps"]) == 0


def test_a_finite_loss_with_a_non_finite_gradient_norm_is_skipped(batches):
    """Output logits scaled up by 2e19 (the final norm's scale): the loss (~1e19) and every gradient (~1e18) are
    finite, but their global norm overflows float32. The step is skipped on the norm alone."""
    step_fn = TrainStep.create(TINY, mesh_of(1), OPTIMIZER, num_steps=10)
    params = step_fn.init(jax.random.key(2))["params"]
    params["final_norm"]["scale"] = params["final_norm"]["scale"] * 2e19
    batch = sharding.global_batch(batches[0], step_fn.mesh)
    with sharding.activate(step_fn.mesh):
        grads, _ = jax.jit(step_fn.gradients)(params, batch)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    state = step_fn.from_params(params)
    before = jax.tree.map(np.asarray, state)
    state, metrics = step_fn(state, batch)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["total_loss"]))
    assert not np.isfinite(float(metrics["grad_norm"]))
    assert not bool(metrics["finite"]) and int(state["skipped"]) == 1 and int(state["bad_steps"]) == 1
    for kept, old in zip(jax.tree.leaves({k: state[k] for k in ("params", "opt_state")}),
                         jax.tree.leaves({k: before[k] for k in ("params", "opt_state")})):
        np.testing.assert_array_equal(np.asarray(kept), old)  # Parameters and Adam's moments and count unchanged.


def test_a_stop_mid_window_writes_the_steps_since_the_last_write():
    writer = _Writer()
    logger = hooks.LogHook(writer, every=2, tokens_per_step=1, flops_per_step=1.0, peak_flops=1.0, max_bad_steps=3)
    for step, loss in zip(range(1, 4), (4.0, 2.0, 7.0)):
        logger.record(step, {"loss": np.float32(loss), "total_loss": np.float32(loss), "grad_norm": np.float32(1.0),
                             "learning_rate": np.float32(0.1), "finite": np.bool_(True), "bad_steps": np.int32(0)}, 0.0)
        logger(step, None, False)
    logger.flush(3)  # A preemption at step 3.
    logger.flush(3)  # Nothing new to write.
    assert [(step, row["loss"], row["mean_of_steps"]) for step, row in writer.rows] == [(2, 3.0, 2.0), (3, 7.0, 1.0)]


def test_schedules():
    cosine = optim.learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1), 110)
    assert float(cosine(0)) == 0.0 and float(cosine(5)) == pytest.approx(0.5)
    assert float(cosine(10)) == pytest.approx(1.0) and float(cosine(60)) == pytest.approx(0.55, abs=1e-6)
    assert float(cosine(110)) == pytest.approx(0.1, abs=1e-6)
    wsd = optim.learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10, schedule="wsd",
                                                       decay_fraction=0.2, min_lr_ratio=0.0), 110)
    assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(90)) == pytest.approx(1.0)
    assert float(wsd(100)) == pytest.approx(0.5) and float(wsd(110)) == pytest.approx(0.0, abs=1e-6)


def test_weight_decay_spares_norm_scales():
    from hephaestus_jax.model import llama

    params = llama.unbox(llama.init_params(TINY, jax.random.key(0)))
    optimizer = optim.make_optimizer(OptimizerConfig(learning_rate=0.1, warmup_steps=0, schedule="constant",
                                                     weight_decay=0.5), num_steps=10)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    np.testing.assert_allclose(updates["layers"]["attn"]["q_proj"], -0.1 * 0.5 * params["layers"]["attn"]["q_proj"],
                               rtol=1e-6)
    np.testing.assert_allclose(updates["embed"], -0.1 * 0.5 * params["embed"], rtol=1e-6)
    assert not np.any(updates["layers"]["attn_norm"]["scale"]) and not np.any(updates["final_norm"]["scale"])


def _sft_batch(rows=8, seq=32, accum=4, seed=3):
    """Random tokens with SFT-like loss masks whose token counts differ a lot between micro-batches.

    Micro-batch k holds rows k, k+accum, ...; micro-batch 0 keeps the loss on whole rows, the others on a few
    response tokens each, so a mean of micro-batch means weighs their tokens far more than the batch mean does.
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY.vocab_size, (rows, seq + 1)).astype(np.int32)
    weights = np.zeros((rows, seq), np.float32)
    for row in range(rows):
        weights[row, -(seq if row % accum == 0 else 1 + row % 3):] = 1.0
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": np.tile(np.arange(seq), (rows, 1)),
            "segment_ids": np.ones((rows, seq), np.int32), "loss_weights": weights}


def test_gradient_accumulation_weighs_micro_batches_by_their_loss_tokens():
    """SFT masks: micro-batches carry 64, 5, 4 and 3 loss tokens; accumulating must still give the gradient of
    the token-weighted batch mean, which a mean of per-micro-batch means (equal on CPT batches) does not."""
    mesh = mesh_of(2)
    whole = TrainStep.create(TINY, mesh, OPTIMIZER, num_steps=5)
    accumulated = TrainStep.create(TINY, mesh, OPTIMIZER, num_steps=5, grad_accum_steps=4)
    params = whole.init(jax.random.key(1))["params"]
    local = _sft_batch()
    micro_weights = [local["loss_weights"][k::4].sum() for k in range(4)]
    assert micro_weights == [64, 5, 4, 3]
    batch = sharding.global_batch(local, mesh)
    with sharding.activate(mesh):
        grads_a, sums_a = jax.jit(whole.gradients)(params, batch)
        grads_b, sums_b = jax.jit(accumulated.gradients)(params, batch)
    assert float(sums_a["weight"]) == float(sums_b["weight"]) == 76
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))


def test_gradients_are_clipped_to_the_hand_computed_global_norm():
    """The optimizer scales gradients by clip / ||g|| (global L2 norm over every leaf) when ||g|| > clip, and
    leaves them alone below. With a huge Adam epsilon the first update is -lr * g_clipped / (|g_clipped| + eps),
    so the clipped gradient can be read back from it exactly."""
    config = OptimizerConfig(learning_rate=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0,
                             eps=1e3, grad_clip_norm=2.0)
    optimizer = optim.make_optimizer(config, num_steps=10)
    rng = np.random.default_rng(0)
    params = {"a": np.zeros((3, 4), np.float32), "b": {"scale": np.zeros(5, np.float32)}}
    grads = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": {"scale": rng.standard_normal(5).astype(np.float32)}}
    norm = np.sqrt(sum(float(np.sum(np.square(g.astype(np.float64)))) for g in jax.tree.leaves(grads)))
    for factor, clipped in ((4.0 / norm, True), (1.0 / norm, False)):  # ||g|| = 4 > 2, then 1 < 2.
        scaled = jax.tree.map(lambda g: g * np.float32(factor), grads)
        updates, _ = optimizer.update(scaled, optimizer.init(params), params)
        expected_grads = jax.tree.map(lambda g: g * (2.0 / 4.0 if clipped else 1.0), scaled)
        for update, g in zip(jax.tree.leaves(updates), jax.tree.leaves(expected_grads)):
            np.testing.assert_allclose(update, -g / (np.abs(g) + 1e3), rtol=1e-5)


def test_resume_restores_the_data_position(tmp_path):
    """What train.py does on resume, in process and without training: a checkpoint saved after 3 batches (with
    the stream's position, as CheckpointHook saves it) makes a fresh stream continue with batch 4, not batch 1."""
    write_forge_fixture(tmp_path / "forge", records_per_file=(20, 6))
    data = DataConfig(seq_len=32, files=ForgeFiles(data_dir=str(tmp_path / "forge")))
    mesh = mesh_of(2)
    step_fn = TrainStep.create(TINY, mesh, OPTIMIZER, num_steps=5)

    def stream():
        return mixtures.train_stream(data, StreamSpec(global_rows=4, seq_len=32, seed=0), name="forge_stage1")

    def checkpointer():
        metadata = ckpt.CheckpointMetadata(model_config=TINY, kind="train")
        return TrainCheckpointer(str(tmp_path / "run" / "checkpoints"), metadata=metadata, keep=2, async_save=False,
                                 mesh=mesh)

    saving, restoring = checkpointer(), None
    try:
        with stream() as first:
            batches = [next(first) for _ in range(3)]
            state = step_fn.init(jax.random.key(0))
            state["step"] = state["step"] + 3  # Marks the saved state (a fresh one is at 0).
            hooks.CheckpointHook(saving, every=3, data_state=first.get_state).save(3, state)
            batches.append(next(first))
        saving.close()
        restoring = checkpointer()
        with stream() as resumed:
            state, step = train._initial_state(TrainConfig(output_dir=str(tmp_path / "run"), batch_size=4), TINY, step_fn,
                                               restoring, resumed)
            assert step == int(state["step"]) == 3
            following = next(resumed)
    finally:
        saving.close()
        if restoring is not None:
            restoring.close()
    assert not np.array_equal(batches[3]["inputs"], batches[0]["inputs"])
    for key, value in batches[3].items():
        np.testing.assert_array_equal(following[key], value, err_msg=key)
