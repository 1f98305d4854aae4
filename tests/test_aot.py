"""Ahead-of-time compilation of the train step for Cloud TPU topologies (libtpu's compile-only devices, on CPU)."""

import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support.cli_helpers import load_tool
from conftest import REPO_ROOT
from hephaestus_jax import aot, hlo_cost, sharding
from hephaestus_jax.config import REMAT_POLICY_NAMES, ConfigError, DataConfig, MeshConfig, ModelConfig, \
    OptimizerConfig, TrainConfig
from hephaestus_jax.model import attention
from hephaestus_jax.gin_configs import Configs

pytest.importorskip("libtpu", reason="the [tpu] extra (libtpu) describes TPU topologies")

SMALL = aot.parse_topology("v5p-8")  # One host: 4 chips, 2x2x1.


def tiny(batch: int = 8, seq_len: int = 256, grad_accum: int = 1, mesh: MeshConfig = MeshConfig(fsdp=-1),
         **model) -> Configs:
    """A small Llama-3-architecture model, bf16 activations, as the stage configs run it; every sharded dimension
    is a multiple of 128 per chip, so TPU tiles do not pad the state."""
    settings = dict(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=4,
                    num_kv_heads=2, dtype="bfloat16", param_dtype="float32", remat_policy="none")
    return Configs(ModelConfig(**{**settings, **model}), mesh, OptimizerConfig(), DataConfig(seq_len=seq_len),
                   TrainConfig(output_dir="unused", batch_size=batch, grad_accum_steps=grad_accum))


@pytest.mark.parametrize("name, libtpu_name, chips", [
    # Cloud's accelerator types and their slice shapes (cloud.google.com/tpu/docs: v4, v5p, v5e, v6e).
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-32", "v5p:2x2x4", 16), ("v5p-128", "v5p:4x4x4", 64),
    ("v5p-1280", "v5p:4x8x20", 640), ("v4-128", "v4:4x4x4", 64), ("v5e-256", "v5e:16x16", 256),
    ("v5litepod-16", "v5e:4x4", 16), ("v6e-8", "v6e:2x4", 8), ("v5p:2x2x2", "v5p:2x2x2", 8),
])
def test_cloud_names_map_to_libtpu_topologies(name, libtpu_name, chips):
    topology = aot.parse_topology(name)
    assert (topology.libtpu_name, topology.num_chips) == (libtpu_name, chips)


def test_topology_devices_are_one_per_chip():
    v4 = aot.parse_topology("v4-16").devices()  # 8 chips of 2 TensorCores: one (megacore) device each.
    v5e = aot.parse_topology("v5e-8").devices()  # One host of 8 chips, as Cloud sells it.
    assert (len(v4), v4[0].device_kind, v4[0].platform) == (8, "TPU v4", "tpu")
    assert (len(v5e), v5e[0].device_kind, {d.process_index for d in v5e}) == (8, "TPU v5 lite", {0})
    assert len(aot.parse_topology("v6e-1").devices()) == 1


@pytest.mark.parametrize("name, message", [
    ("v5p-33", "count TensorCores"), ("v5p-48", "multiple of 64 chips"), ("v5e-512", "slices have 1, 4, 8"),
    ("v3-8", "expected a Cloud TPU type"), ("tpu-v5p", "expected a Cloud TPU type"), ("v5p:2x2", "3 positive"),
    ("v5p-0", "multiple of 64 chips"), ("v5p-20000", "up to 8960"),
])
def test_bad_topology_names_fail_clearly(name, message):
    with pytest.raises(ConfigError, match=message):
        aot.parse_topology(name)


@pytest.fixture(scope="module")
def tiny_report() -> aot.StepReport:
    return aot.compile_train_step(tiny(), SMALL)


def test_tiny_step_compiles_with_plausible_numbers(tiny_report):
    report = tiny_report
    gib = 1024**3
    assert report.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 1} and report.device_kind == "TPU v5"
    assert min(report.argument_bytes, report.output_bytes, report.temp_bytes, report.code_bytes) > 0
    assert report.total_bytes == (report.argument_bytes + report.output_bytes - report.alias_bytes
                                  + report.temp_bytes + report.code_bytes)
    assert report.alias_bytes > 0  # The state is donated: its outputs reuse its buffers.
    # The arguments are the state (float32 params and two Adam moments, split over 4 chips) and the batch.
    state_bytes = 3 * 4 * tiny().model.num_params() / 4
    batch_bytes = 5 * 8 * 256 * 4 / 4  # Five int32 fields [8, 256], rows split over 4 chips.
    assert state_bytes + batch_bytes <= report.argument_bytes <= 1.05 * (state_bytes + batch_bytes)
    assert report.fits and report.total_bytes < gib and 0.99 < report.headroom < 1
    # No recomputation (remat none): XLA's FLOPs, loop bodies times trip counts, are close to 6N + attention.
    assert report.cost.loops >= 2 and report.cost.unknown_trip_counts == 0
    assert 0.9 < report.xla_flops / report.model_flops < 1.3
    assert report.xla_flops_loops_once < report.xla_flops  # XLA's own figure counts each loop body once.
    assert report.step_seconds == max(report.compute_seconds, report.memory_seconds) > 0
    assert 0 < report.mfu < 1
    assert "headroom" in report.format() and "v5p:2x2x1 = 4 chips" in report.format()


def test_bigger_batch_needs_more_temporary_memory_and_flops(tiny_report):
    small, big = tiny_report, aot.compile_train_step(tiny(batch=16), SMALL)
    assert big.temp_bytes > small.temp_bytes
    assert big.argument_bytes - small.argument_bytes == 5 * (16 - 8) * 256 * 4 // 4  # Five int32 fields.
    assert big.xla_flops == pytest.approx(2 * small.xla_flops, rel=0.1)


@pytest.fixture(scope="module")
def no_remat_report() -> aot.StepReport:
    return aot.compile_train_step(tiny(hidden_size=256, intermediate_size=512), SMALL)


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICY_NAMES if p != "none"])
def test_every_remat_policy_compiles_and_recomputes(policy, no_remat_report):
    report = aot.compile_train_step(tiny(remat_policy=policy, hidden_size=256, intermediate_size=512), SMALL)
    assert report.fits and report.remat_policy == policy
    # Recomputing part of the forward pass costs FLOPs beyond 6N + attention (up to a second forward pass).
    assert 1.0 < report.xla_flops / report.model_flops < 1.5
    # Against the same step without remat (a policy that is silently ignored compiles to that program): every
    # policy recomputes something and keeps fewer activations for the backward pass. Measured on this model:
    # FLOPs +0.7% (dots) to +20% (full), temporary memory -25% (dots) to -57% (full).
    assert report.xla_flops > 1.003 * no_remat_report.xla_flops
    assert report.temp_bytes < 0.9 * no_remat_report.temp_bytes
    if policy == "full":  # Nothing saved: the whole forward pass of the layers runs again.
        assert report.xla_flops - no_remat_report.xla_flops > 0.15 * report.model_flops
        assert report.temp_bytes < 0.6 * no_remat_report.temp_bytes


def test_a_step_over_the_chips_hbm_is_reported_as_not_fitting(monkeypatch):
    # The compiler accepts the program (it fits the real chip), but not our accounting for a 4 MiB chip.
    monkeypatch.setitem(aot.GENERATIONS, "v5p", dataclasses.replace(aot.GENERATIONS["v5p"], hbm_bytes=4 * 2**20))
    with pytest.raises(aot.DoesNotFit, match="DOES NOT FIT, headroom -") as failure:
        aot.compile_train_step(tiny(hidden_size=256, intermediate_size=512), SMALL)
    assert failure.value.report.total_bytes > 4 * 2**20 and failure.value.report.headroom < 0


def _aot_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """tools/aot_compile.py's exit status and stderr, run in this process from the repository root."""
    monkeypatch.chdir(REPO_ROOT)
    try:
        returncode = load_tool("aot_compile").main(["--gin_file", "configs/quickstart.gin", *args])
    finally:
        gin.clear_config()
    return returncode, capsys.readouterr().err


def test_oversized_batch_does_not_fit_and_the_cli_says_so(monkeypatch, capsys):
    returncode, stderr = _aot_cli(monkeypatch, capsys, "--topology", "v5e-4", "--gin_param",
                                  "DataConfig.seq_len=8192", "--gin_param", "TrainConfig.batch_size=64")
    assert returncode == 1, stderr[-2000:]
    assert "ran out of HBM" in stderr and "DOES NOT FIT" in stderr


def test_cli_rejects_bad_topologies(monkeypatch, capsys):
    returncode, stderr = _aot_cli(monkeypatch, capsys, "--topology", "v5p-12")
    assert returncode == 2 and "tools/aot_compile.py: error: topology 'v5p-12'" in stderr


def test_two_slices_build_a_hybrid_mesh_with_slices_on_data_and_compile(tiny_report):
    topology = aot.parse_topology("v5p-8", num_slices=2)
    configs = tiny(batch=16, grad_accum=2, mesh=MeshConfig(fsdp=-1, dcn_data=2))
    mesh = aot.make_topology_mesh(configs, topology)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    slices = np.vectorize(lambda device: device.slice_index)(mesh.devices)
    assert (slices == np.arange(2)[:, None, None]).all()  # Slice k is data row k: only data crosses DCN.
    report = aot.compile_train_step(configs, topology)
    assert report.fits and report.topology.num_chips == 8
    # Twice the chips and rows, in two micro-batches: each chip computes what it does in the one-slice step,
    # which XLA's own count (each loop body once) misses by the accumulation loop's two trips.
    assert report.xla_flops == pytest.approx(tiny_report.xla_flops, rel=0.05)
    assert report.xla_flops_loops_once < 0.9 * tiny_report.xla_flops_loops_once
    with pytest.raises(ConfigError, match="topology has 2"):
        aot.make_topology_mesh(tiny(), topology)


LOOP_HLO = """HloModule loop

%body (state: (u32[], f32[8,8])) -> (u32[], f32[8,8]) {
  %state = (u32[], f32[8,8]) parameter(0)
  %counter = u32[] get-tuple-element(%state), index=0
  %x = f32[8,8] get-tuple-element(%state), index=1
  %two = u32[] constant(2)
  %next = u32[] add(%counter, %two)
  %y = f32[8,8] dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %out = (u32[], f32[8,8]) tuple(%next, %y)
}

%cond (state: (u32[], f32[8,8])) -> pred[] {
  %state = (u32[], f32[8,8]) parameter(0)
  %counter = u32[] get-tuple-element(%state), index=0
BOUND
  ROOT %less = pred[] compare(%counter, %bound), direction=LT
}

ENTRY %main (x: f32[8,8]) -> f32[8,8] {
  %x = f32[8,8] parameter(0)
  %zero = u32[] constant(0)
  %start = u32[] copy(%zero)
  %init = (u32[], f32[8,8]) tuple(%start, %x)
  %loop = (u32[], f32[8,8]) while(%init), condition=%cond, body=%body
  ROOT %result = f32[8,8] get-tuple-element(%loop), index=1
}
"""
MATMUL_FLOPS = 2 * 8 * 8 * 8


def test_loop_bodies_count_as_often_as_they_run():
    # Counter from 0 (through a copy) to 8 in steps of 2, as XLA's unrolled windowed einsum loops count: 4 trips.
    cost = hlo_cost.program_cost(LOOP_HLO.replace("BOUND", "  %bound = u32[] constant(8)"))
    assert (cost.loops, cost.unknown_trip_counts) == (1, 0)
    assert 4 * MATMUL_FLOPS <= cost.flops < 4 * MATMUL_FLOPS + 16  # Plus the counter's adds and compares.
    # A bound computed in the condition is not read: that loop is counted once, and reported as such.
    computed = "  %four = u32[] constant(4)\n  %bound = u32[] add(%four, %four)"
    unknown = hlo_cost.program_cost(LOOP_HLO.replace("BOUND", computed))
    assert unknown.unknown_trip_counts == 1 and MATMUL_FLOPS <= unknown.flops < 2 * MATMUL_FLOPS


def test_cost_by_loop_splits_the_program_cost_between_the_entry_and_each_loop_body():
    hlo = LOOP_HLO.replace("BOUND", "  %bound = u32[] constant(8)")
    entry, body = hlo_cost.program_cost_by_loop(hlo)
    assert (entry.name, entry.depth, entry.runs, body.name, body.depth, body.runs) == ("main", 0, 1, "body", 1, 4)
    assert MATMUL_FLOPS <= body.flops < MATMUL_FLOPS + 4 and entry.flops < MATMUL_FLOPS  # The dot is the body's.
    assert body.bytes_accessed >= 2 * 8 * 8 * 4  # At least the dot's operand and its output.
    total = hlo_cost.program_cost(hlo)
    assert total.flops == entry.flops + 4 * body.flops
    assert total.bytes_accessed == entry.bytes_accessed + 4 * body.bytes_accessed


def test_trip_counts_are_read_from_newer_xlas_tuple_element_syntax():
    # MaxText's program under jax 0.12 (bench/peers_aot.py) reads tuple elements as `%state#0`, with no
    # get-tuple-element. Only the trip count is checked: jaxlib 0.10's HLO parser does not read that syntax.
    loops, entry = LOOP_HLO.replace("BOUND", "  %bound = u32[] constant(8)").split("ENTRY")
    for name, kind, index in (("counter", "u32[]", 0), ("x", "f32[8,8]", 1)):
        loops = loops.replace(f"  %{name} = {kind} get-tuple-element(%state), index={index}\n", "")
        loops = loops.replace(f"%{name},", f"%state#{index},").replace(f"%{name})", f"%state#{index})")
    hlo = f"{loops}ENTRY{entry}"
    assert "get-tuple-element(%state)" not in hlo and "compare(%state#0, %bound)" in hlo
    computations = hlo_cost._computations(hlo)
    loop = next(line for line in computations["main"] if " while(" in line)
    assert hlo_cost._trip_count(computations, "main", loop) == 4
    slower = hlo_cost._computations(hlo.replace("constant(2)", "constant(3)"))  # 0, 3, 6: 3 trips.
    assert hlo_cost._trip_count(slower, "main", loop) == 3


def test_splash_attention_compiles_for_tpu_with_sharded_heads():
    configs = tiny(attention_impl="splash", mesh=MeshConfig(fsdp=2, tensor=2))
    report = aot.compile_train_step(configs, SMALL)
    assert report.fits and report.attention_impl == "splash"
    # XLA cannot see inside the Pallas kernel; its FLOPs are estimated, which brings the count near 6N + attention.
    assert report.kernel_flops > 0 and 1.0 < (report.xla_flops + report.kernel_flops) / report.model_flops < 1.5


def test_splash_attention_matches_the_reference_sharded():
    """Pallas's interpreter runs the TPU kernel here: rows over fsdp, heads over tensor, packed documents."""
    b, s, heads, kv_heads, d = 2, 256, 4, 2, 64
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, s, n, d)), jnp.float32) for n in (heads, kv_heads, kv_heads))
    segments = np.ones((b, s), np.int32)
    segments[0, 100:], segments[1, 50:130], segments[1, 200:] = 2, 3, 0  # Packed documents, then padding.
    segment_ids = jnp.asarray(segments)
    slots = jnp.broadcast_to(jnp.arange(s), (b, s))
    real = (segment_ids > 0)[:, :, None, None]  # Padding outputs are never used (zero loss weight).

    def reference(q, k, v):
        mask = attention.attention_mask(segment_ids, segment_ids, slots, slots)
        return attention.dot_product_attention(q, k, v, mask)

    def splash(q, k, v):
        return attention.splash_attention(q, k, v, segment_ids, interpret=True)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v), 0.0) ** 2)

    expected = reference(q, k, v)
    expected_grads = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    mesh = sharding.make_mesh(MeshConfig(fsdp=2, tensor=2), jax.devices()[:4])
    with sharding.activate(mesh):
        out = jax.jit(splash)(q, k, v)
        grads = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, expected, 0), atol=2e-5)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, atol=1e-4 * float(jnp.max(jnp.abs(want))))


def test_tpu_topologies_compiled_on_this_cpu_host_keep_the_bfloat16_dtype():
    """The CPU fallback (sharding.model_for_mesh) looks at the mesh's devices, not at the host compiling."""
    configs = tiny()
    mesh = aot.make_topology_mesh(configs, SMALL)
    assert sharding.model_for_mesh(configs.model, mesh).dtype == "bfloat16"
