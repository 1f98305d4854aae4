"""Device mesh construction and the logical-axis rules: the only place that decides where tensors live.

Model code names axes logically (`embed`, `mlp`, `heads`, ...); these rules map them to the mesh axes
`data`, `fsdp` and `tensor`. Multi-slice meshes put the DCN (cross-slice) factor on `data`/`fsdp`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hephaestus_jax.config import ConfigError, MeshConfig, ModelConfig

log = logging.getLogger("hephaestus_jax.sharding")

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    # Activations.
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", "tensor"),  # The residual stream (and the layer inputs remat keeps), as MaxText shards it.
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes (data, fsdp, tensor); ConfigError if the sizes do not fit."""
    devices = list(jax.devices() if devices is None else devices)
    slices = config.num_slices
    if len(devices) % slices:
        raise ConfigError(f"MeshConfig: {len(devices)} devices cannot form {slices} slices "
                          f"(dcn_data={config.dcn_data}, dcn_fsdp={config.dcn_fsdp})")
    ici = config.ici_shape(len(devices) // slices)
    if slices == 1:
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:
        dcn = (config.dcn_data, config.dcn_fsdp, 1)
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)


def check_model_fits(model: ModelConfig, mesh: Mesh) -> None:
    """ConfigError naming the field when a sharded dimension is not divisible by its mesh axis."""
    tensor = mesh.shape["tensor"]
    for field in ("num_heads", "num_kv_heads", "intermediate_size", "padded_vocab_size"):
        value = getattr(model, field)
        if value % tensor:
            hint = " (raise ModelConfig.vocab_pad_multiple)" if field == "padded_vocab_size" else ""
            raise ConfigError(f"ModelConfig.{field}={value} is not divisible by the mesh's tensor axis "
                              f"(MeshConfig.tensor={tensor}){hint}")
    fsdp = mesh.shape["fsdp"]
    if model.hidden_size % fsdp:
        raise ConfigError(f"ModelConfig.hidden_size={model.hidden_size} is not divisible by the mesh's fsdp axis "
                          f"(MeshConfig.fsdp={fsdp})")


def model_for_mesh(model: ModelConfig, mesh: Mesh) -> ModelConfig:
    """`model` as it computes on `mesh`'s devices: training (train.py) and every command that loads a checkpoint
    (inference.load_model: generate, evaluate) run the model this returns.

    XLA:CPU has no bf16 x bf16 -> f32 dot: its DotThunk rejects one at run time (the train step's backward pass
    has them; whether a forward-only program does depends on how XLA lowers it). So on CPU a bfloat16
    ModelConfig.dtype computes in float32, said in one log line; the parameters keep ModelConfig.param_dtype
    and a checkpoint records the model as configured. Other platforms keep the dtype, and so do TPU topologies
    compiled ahead of time on this host (aot.py), whose devices are TPUs.
    """
    if model.dtype != "bfloat16" or mesh.devices.flat[0].platform != "cpu":
        return model
    log.warning("ModelConfig.dtype=bfloat16: XLA:CPU has no bf16 dot; computing in float32 on CPU")
    return model.replace(dtype="float32")


def check_batch_fits(global_batch: int, mesh: Mesh, field: str = "TrainConfig.batch_size") -> None:
    shards = batch_shards(mesh)
    if global_batch % shards:
        raise ConfigError(f"{field}={global_batch} is not divisible by data*fsdp={shards} devices")


def batch_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def logical_to_sharding(logical_axes: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of logical PartitionSpecs (e.g. `llama.param_axes(config)`)."""
    return nn.logical_to_mesh_sharding(logical_axes, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over (data, fsdp), sequence replicated: how input batches and per-row data state are placed."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def axis_rules():
    """Context manager activating the rules for `nn.with_logical_constraint` inside jitted code."""
    return nn.logical_axis_rules(LOGICAL_AXIS_RULES)


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[None]:
    """The mesh and the logical-axis rules, for tracing and running sharded model code."""
    with jax.set_mesh(mesh), axis_rules():
        yield


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays, rows sharded over (data, fsdp), from this process's rows of each array.

    Process p supplies rows [p*B/P, (p+1)*B/P) of the global batch (`data.pipeline.process_rows`); on one
    process that is the whole batch.
    """
    target = batch_sharding(mesh)
    return {key: jax.make_array_from_process_local_data(target, value) for key, value in local.items()}


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a row-sharded global array (the inverse of `global_batch`), deduplicated."""
    shards = {shard.index[0].start or 0: np.asarray(shard.data) for shard in array.addressable_shards}
    return np.concatenate([shards[start] for start in sorted(shards)])
