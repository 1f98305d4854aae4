"""Ahead-of-time compilation of the real sharded train step for a Cloud TPU topology, on any host (a CPU will do).

libtpu (the `tpu` extra) describes the devices of a TPU slice without the hardware
(`jax.experimental.topologies`); the train step is lowered with abstract state and batch carrying their
shardings on a mesh of those devices, and compiled by the TPU compiler. The compiled program says how many bytes
each chip needs (arguments, outputs, temporaries, generated code) and how many FLOPs and HBM bytes one step costs,
which gives a roofline step time and MFU. Nothing is allocated and no TPU is needed.

Topologies are named as Cloud names accelerator types: `v5p-32` (32 TensorCores = 16 chips, 2x2x4), `v4-128`
(64 chips, 4x4x4), `v5e-256` or `v5litepod-256` (256 chips, 16x16), `v6e-64` (8x8); libtpu's own form
(`v5p:2x2x4`) is accepted too. Several slices joined over DCN: `num_slices`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from hephaestus_jax import metrics, sharding
from hephaestus_jax.gin_configs import Configs
from hephaestus_jax.config import ConfigError, ModelConfig
from hephaestus_jax.data.packing import BATCH_FIELDS
from hephaestus_jax.hlo_cost import ProgramCost, program_cost
from hephaestus_jax.tpu_catalog import GENERATIONS, GIB, Generation, generation_name, split_cloud_name
from hephaestus_jax.train_step import TrainStep

# Cloud's v5e/v6e slice shapes (a pod is 16x16 chips).
_GRID_SHAPES = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
# Cloud's v4/v5p slices below a full 4x4x4 cube; larger slices are made of 4x4x4 cubes.
_SMALL_TORUS_SHAPES = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}


@dataclasses.dataclass(frozen=True)
class Topology:
    """`num_slices` TPU slices of one generation and shape (chips per dimension)."""

    name: str
    generation: str
    shape: tuple[int, ...]
    num_slices: int = 1

    @property
    def chip(self) -> Generation:
        return GENERATIONS[self.generation]

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def wraparound(self) -> tuple[bool, bool, bool]:
        """Torus links per dimension: v4/v5p slices of whole 4x4x4 cubes wrap; v5e/v6e wrap 16-chip sides."""
        if self.chip.dims == 3:
            return (self.chips_per_slice >= 64,) * 3
        return (self.shape[0] == 16, self.shape[1] == 16, False)

    def devices(self) -> list[jax.Device]:
        """Compile-only devices of this topology (libtpu; no TPU needed), one per chip, slice_index set if > 1."""
        from jax.experimental import topologies

        # Compiling touches no TPU, so it need not own libtpu's one-process-per-host lock (/tmp/libtpu_lockfile),
        # which a trainer on this host may hold.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        options: dict[str, Any] = {"chip_config_name": self.chip.chip_config, "wrap": self.wraparound}
        if self.chip.dims == 2 and self.chips_per_slice <= 8:  # v5e/v6e slices of up to 8 chips are one host.
            options["chips_per_host_bounds"] = (*self.shape, 1)
        if self.num_slices > 1:
            options["num_slices"] = self.num_slices
        try:
            devices = topologies.get_topology_desc(platform="tpu", topology_name=self.libtpu_name,
                                                   **options).devices
        except RuntimeError as e:  # No libtpu, or libtpu refuses the topology.
            hint = "" if importlib.util.find_spec("libtpu") else " (install the TPU extra: pip install -e '.[tpu]')"
            raise ConfigError(f"topology {self.name} ({self.libtpu_name}): libtpu cannot describe it: {e}{hint}") \
                from e
        if len(devices) != self.num_chips:
            raise ConfigError(f"topology {self.name}: libtpu gave {len(devices)} devices for {self.num_chips} chips")
        return list(devices)


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """A Topology from a Cloud accelerator type (`v5p-32`, `v5e-256`, `v5litepod-16`, `v4-128`, `v6e-8`) or
    libtpu's form (`v5p:2x2x4`); ConfigError naming the accepted forms otherwise."""
    if num_slices < 1:
        raise ConfigError(f"--num_slices must be >= 1, got {num_slices}")
    cloud = split_cloud_name(name)
    libtpu = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", name)
    written = cloud[0] if cloud else libtpu.group(1) if libtpu else None
    generation = generation_name(written) if written else None
    if generation is None:
        raise ConfigError(f"topology {name!r}: expected a Cloud TPU type such as v5p-32, v5e-256 (or "
                          f"v5litepod-256), v4-128, v6e-64, or libtpu's form such as v5p:2x2x4; known "
                          f"generations: {sorted(GENERATIONS)}")
    chip = GENERATIONS[generation]
    if libtpu:
        shape = tuple(int(d) for d in libtpu.group(2).split("x"))
        if len(shape) != chip.dims or min(shape) < 1:
            raise ConfigError(f"topology {name!r}: {generation} slices have {chip.dims} positive dimensions")
    else:
        shape = _cloud_shape(name, generation, cloud[1])
    return Topology(name=name, generation=generation, shape=shape, num_slices=num_slices)


def _cloud_shape(name: str, generation: str, count: int) -> tuple[int, ...]:
    """The chip grid Cloud gives an accelerator type `{generation}-{count}`."""
    chip = GENERATIONS[generation]
    if count % chip.cores_per_name_unit:
        raise ConfigError(f"topology {name!r}: {generation} sizes count TensorCores (2 per chip) and are even")
    chips = count // chip.cores_per_name_unit
    if chip.dims == 2:
        if chips not in _GRID_SHAPES:
            raise ConfigError(f"topology {name!r}: {generation} slices have "
                              f"{', '.join(map(str, _GRID_SHAPES))} chips")
        return _GRID_SHAPES[chips]
    if chips in _SMALL_TORUS_SHAPES:
        return _SMALL_TORUS_SHAPES[chips]
    if chips and chips % 64 == 0 and chips <= chip.max_chips:
        return tuple(4 * d for d in _most_cubic(chips // 64))
    units = chip.cores_per_name_unit
    raise ConfigError(f"topology {name!r}: {generation} slices have 4, 8, 16, 32 or a multiple of 64 chips up to "
                      f"{chip.max_chips} ({generation}-{4 * units}, -{8 * units}, -{16 * units}, -{32 * units}, "
                      f"-{64 * units}, -{128 * units}, ..., -{chip.max_chips * units})")


def _most_cubic(n: int) -> tuple[int, int, int]:
    """a <= b <= c with a*b*c = n and the smallest largest side (Cloud's default slice shapes)."""
    triples = [(a, b, n // (a * b)) for a, b in itertools.product(range(1, n + 1), repeat=2)
               if a <= b and n % (a * b) == 0 and b <= n // (a * b)]
    return min(triples, key=lambda t: (t[2], t[1]))


# ---------------------------------------------------------------------------------------------------- compiling


class DoesNotFit(Exception):
    """The step needs more HBM per chip than the chip has: `report` when compiled, None when the TPU compiler
    itself refused (its message says by how much)."""

    def __init__(self, message: str, report: "StepReport | None" = None):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class StepReport:
    """Per-chip memory and cost of one compiled train step."""

    topology: Topology
    device_kind: str
    mesh_shape: dict[str, int]
    batch_size: int
    seq_len: int
    grad_accum_steps: int
    remat_policy: str
    attention_impl: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    peak_bytes: int | None  # XLA's estimate of the most bytes live at once (checked against the HBM it has); None
    # for another program whose compile did not print it (bench/peers_aot.py).
    cost: ProgramCost  # Per chip, XLA's cost analysis with loop bodies times trip counts (incl. recomputation).
    xla_flops_loops_once: float  # Per chip, XLA's cost analysis as the compiled program reports it.
    xla_bytes_loops_once: float  # Likewise for HBM bytes accessed.
    kernel_flops: float  # Per chip, in Pallas kernels that XLA's cost analysis cannot see (splash attention).
    model_flops: float  # Per chip, from metrics.training_flops_per_token (6N + attention).
    peak_flops: float  # Per chip.

    @property
    def xla_flops(self) -> float:
        return self.cost.flops

    @property
    def hbm_bytes(self) -> int:
        return self.topology.chip.hbm_bytes

    @property
    def total_bytes(self) -> int:
        """Arguments + outputs not aliased to (donated) arguments + temporaries + generated code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def headroom(self) -> float:
        """Fraction of HBM left free (negative when it does not fit)."""
        return 1.0 - self.total_bytes / self.hbm_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes

    @property
    def compute_seconds(self) -> float:
        return (self.xla_flops + self.kernel_flops) / self.peak_flops

    @property
    def memory_seconds(self) -> float:
        return self.cost.bytes_accessed / self.topology.chip.hbm_bandwidth

    @property
    def step_seconds(self) -> float:
        """Roofline lower bound: max(compute time at peak, HBM traffic time at full bandwidth); no ICI/DCN."""
        return max(self.compute_seconds, self.memory_seconds)

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation at the roofline step time (an upper bound for the real run)."""
        return self.model_flops / (self.peak_flops * self.step_seconds)

    def format(self) -> str:
        t, gib = self.topology, lambda b: f"{b / GIB:8.2f} GiB"
        slices = f"{t.num_slices} slices x " if t.num_slices > 1 else ""
        mesh = " ".join(f"{axis}={size}" for axis, size in self.mesh_shape.items())
        micro = self.batch_size // self.grad_accum_steps
        groups = self.mesh_shape["data"] * self.mesh_shape["fsdp"]
        kernels = f" + {self.kernel_flops:.4g} in the attention kernel" if self.kernel_flops else ""
        bound = "compute" if self.compute_seconds >= self.memory_seconds else "HBM bandwidth"
        lines = [
            f"topology    {t.name}: {slices}{t.libtpu_name} = {t.num_chips} chips ({self.device_kind}); mesh {mesh}",
            f"step        batch {self.batch_size} x seq {self.seq_len} (grad_accum {self.grad_accum_steps}: "
            f"{micro} rows per micro-batch, {micro / groups:g} per data x fsdp shard), remat {self.remat_policy}, "
            f"attention {self.attention_impl}",
            "memory per chip",
            f"  arguments      {gib(self.argument_bytes)}",
            f"  outputs        {gib(self.output_bytes)}  ({self.alias_bytes / GIB:.2f} GiB of it aliased to donated "
            "arguments)",
            f"  temporaries    {gib(self.temp_bytes)}",
            f"  generated code {gib(self.code_bytes)}",
            f"  total          {gib(self.total_bytes)} of {self.hbm_bytes / GIB:.0f} GiB HBM: "
            f"{'fits' if self.fits else 'DOES NOT FIT'}, headroom {100 * self.headroom:.1f}% (XLA's peak live "
            f"estimate {self.peak_bytes / GIB:.2f} GiB)",
            f"FLOPs per chip per step: XLA {self.xla_flops:.4g}{kernels} ({self.cost.loops} loops x trip counts; "
            f"{self.xla_flops_loops_once:.4g} with each loop body once, as XLA reports it), model "
            f"{self.model_flops:.4g}: {'(XLA + kernel)' if self.kernel_flops else 'XLA'} / model = "
            f"{(self.xla_flops + self.kernel_flops) / self.model_flops:.3f}",
            f"HBM bytes per chip per step: {self.cost.bytes_accessed:.4g} ({self.xla_bytes_loops_once:.4g} with each "
            "loop body once)",
            f"roofline    compute {self.compute_seconds:.4g} s at {self.peak_flops / 1e12:.0f} TFLOP/s, HBM "
            f"{self.memory_seconds:.4g} s for {self.cost.bytes_accessed / 1e9:.1f} GB at "
            f"{t.chip.hbm_bandwidth / 1e9:.0f} GB/s -> step >= {self.step_seconds:.4g} s ({bound}-bound), "
            f"MFU <= {100 * self.mfu:.1f}%",
        ]
        if self.cost.unknown_trip_counts:
            lines.append(f"note        {self.cost.unknown_trip_counts} loops of unknown trip count counted once")
        return "\n".join(lines)


def make_topology_mesh(configs: Configs, topology: Topology) -> Mesh:
    """The training mesh (MeshConfig) over the topology's devices, checked as training checks it."""
    if configs.mesh.num_slices != topology.num_slices:
        raise ConfigError(f"MeshConfig: dcn_data*dcn_fsdp = {configs.mesh.dcn_data}*{configs.mesh.dcn_fsdp} = "
                          f"{configs.mesh.num_slices} slices, but the topology has {topology.num_slices}")
    mesh = sharding.make_mesh(configs.mesh, topology.devices())
    sharding.check_model_fits(configs.model, mesh)
    sharding.check_batch_fits(configs.train.batch_size // configs.train.grad_accum_steps, mesh,
                              "TrainConfig.batch_size / grad_accum_steps")
    return mesh


def compile_train_step(configs: Configs, topology: Topology) -> StepReport:
    """Lower and compile the train step of `configs` for `topology`; DoesNotFit if a chip's HBM is too small."""
    model, train, seq_len = configs.model, configs.train, configs.data.seq_len
    mesh = make_topology_mesh(configs, topology)
    step = TrainStep.create(model, mesh, configs.optimizer, train.num_steps, train.grad_accum_steps, train.z_loss)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {field: jax.ShapeDtypeStruct((train.batch_size, seq_len), jnp.int32, sharding=batch_sharding)
             for field in BATCH_FIELDS}
    jitted = step.jitted()  # The training step itself, lowered with abstract arguments.
    with sharding.activate(mesh):
        lowered = jitted.lower(step.abstract_state(), batch)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
            raise DoesNotFit(f"{topology.name}: the TPU compiler ran out of HBM: {_first_lines(str(e))}") from e
        raise
    report = step_report(configs, topology, mesh, compiled.memory_analysis(), compiled.as_text(),
                         compiled.cost_analysis())
    if not report.fits:
        raise DoesNotFit(report.format(), report)
    return report


def step_report(configs: Configs, topology: Topology, mesh: Mesh, memory: Any, hlo_text: str,
                reported: dict[str, float]) -> StepReport:
    """The StepReport of the train step of `configs` on `mesh` (over `topology`'s devices), compiled into
    `hlo_text` (the optimised module), with its memory analysis (`*_in_bytes` attributes, as
    `compiled.memory_analysis()`) and XLA's cost analysis (`compiled.cost_analysis()`). Any program of that step
    will do, also another project's (bench/peers_aot.py)."""
    model, train, seq_len = configs.model, configs.train, configs.data.seq_len
    devices = list(mesh.devices.flat)
    tokens_per_chip = train.batch_size * seq_len / len(devices)
    return StepReport(
        topology=topology, device_kind=devices[0].device_kind, mesh_shape=dict(mesh.shape),
        batch_size=train.batch_size, seq_len=seq_len, grad_accum_steps=train.grad_accum_steps,
        remat_policy=model.remat_policy, attention_impl=model.attention_impl,
        argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
        code_bytes=memory.generated_code_size_in_bytes, peak_bytes=memory.peak_memory_in_bytes,
        cost=program_cost(hlo_text),
        xla_flops_loops_once=reported["flops"], xla_bytes_loops_once=reported["bytes accessed"],
        kernel_flops=tokens_per_chip * splash_flops_per_token(model, seq_len),
        model_flops=tokens_per_chip * metrics.training_flops_per_token(model, seq_len),
        peak_flops=metrics.peak_flops_total(devices[:1], train.peak_flops_per_device, model.dtype))


def splash_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """FLOPs per token in splash attention kernels, which XLA's cost analysis cannot see (0 for XLA attention).

    In units of one causal QK^T-sized matmul: forward 2 (QK^T, PV); backward 7 (the dq kernel recomputes QK^T
    and computes dP and dQ; the dkv kernel recomputes QK^T and computes dP, dV and dK); plus the forward again
    when a remat policy recomputes the layer (no policy saves the kernel's output).
    """
    if model.attention_impl != "splash":
        return 0.0
    # The model count's attention term is 3 forward passes (forward + a backward of twice the work).
    forward = (metrics.training_flops_per_token(model, seq_len) - metrics.training_flops_per_token(model, 0)) / 3
    return forward / 2 * (2 + 7 + (2 if model.remat_policy != "none" else 0))


def _first_lines(text: str, count: int = 4) -> str:
    return "\n".join(text.strip().splitlines()[:count])
