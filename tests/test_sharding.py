"""Mesh construction, logical-axis rules, and sharded forward passes equal to one device."""

import jax
import numpy as np
import pytest

from support.hf_reference import TINY_HF
from hephaestus_jax import sharding
from hephaestus_jax.config import ConfigError, MeshConfig, ModelConfig
from hephaestus_jax.model import llama

CONFIG = ModelConfig.from_hf(TINY_HF, vocab_pad_multiple=64)


def test_eight_simulated_devices_are_available():
    assert jax.device_count() == 8


@pytest.mark.parametrize("mesh_config", [MeshConfig(fsdp=4, tensor=2), MeshConfig(data=2, fsdp=2, tensor=2),
                                         MeshConfig(data=-1, fsdp=1, tensor=1)])
def test_sharded_forward_matches_one_device(mesh_config):
    params = llama.unbox(llama.init_params(CONFIG, jax.random.key(0)))
    tokens = np.random.default_rng(0).integers(0, 300, (8, 24))
    reference = np.asarray(jax.jit(lambda p, t: llama.forward(CONFIG, p, t))(params, tokens))

    mesh = sharding.make_mesh(mesh_config)
    shardings = sharding.logical_to_sharding(llama.param_axes(CONFIG), mesh)
    with jax.set_mesh(mesh), sharding.axis_rules():
        step = jax.jit(lambda p, t: llama.forward(CONFIG, p, t),
                       in_shardings=(shardings, sharding.batch_sharding(mesh)))
        logits = step(jax.device_put(params, shardings), tokens)
    assert len(logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-5, rtol=1e-5)


def test_parameters_are_split_by_the_rules():
    mesh = sharding.make_mesh(MeshConfig(fsdp=4, tensor=2))
    shardings = sharding.logical_to_sharding(llama.param_axes(CONFIG), mesh)
    assert shardings["layers"]["attn"]["q_proj"].spec == jax.sharding.PartitionSpec(None, "tensor", None, "fsdp")
    assert shardings["layers"]["mlp"]["down_proj"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert shardings["embed"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")


@pytest.mark.parametrize("mesh_config, message", [
    (MeshConfig(data=3, fsdp=1, tensor=1), r"data\*fsdp\*tensor = 3\*1\*1 = 3 does not match the 8 devices"),
    (MeshConfig(data=-1, fsdp=-1, tensor=1), "at most one axis may be -1"),
    (MeshConfig(data=1, fsdp=-1, tensor=3), "not divisible by the fixed axes"),
    (MeshConfig(fsdp=-1, dcn_data=3), "cannot form 3 slices"),
])
def test_impossible_meshes_fail_with_the_binding(mesh_config, message):
    with pytest.raises(ConfigError, match=message):
        sharding.make_mesh(mesh_config)


def test_model_that_does_not_divide_the_tensor_axis_is_refused():
    mesh = sharding.make_mesh(MeshConfig(fsdp=1, tensor=8))
    with pytest.raises(ConfigError, match=r"ModelConfig.num_heads=4 is not divisible by the mesh's tensor axis"):
        sharding.check_model_fits(CONFIG, mesh)
    with pytest.raises(ConfigError, match=r"TrainConfig.batch_size=6 is not divisible by data\*fsdp=8"):
        sharding.check_batch_fits(6, sharding.make_mesh(MeshConfig(fsdp=8)))



def test_residual_stream_is_split_over_the_tensor_axis():
    # As MaxText's `activation_embed: tensor`: remat's saved layer inputs are not replicated over tensor
    # (8B on v5e-256, tensor 8: 3.26 -> 1.40 GiB per chip with splash; docs/tpu_memory.md).
    mesh = sharding.make_mesh(MeshConfig(fsdp=2, tensor=4))
    placed = sharding.logical_to_sharding(jax.sharding.PartitionSpec("batch", "length", "act_embed"), mesh)
    assert placed.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")


@pytest.mark.parametrize("dtype, computes_in", [("bfloat16", "float32"), ("float16", "float16"),
                                                ("float32", "float32")])
def test_on_cpu_only_a_bfloat16_dtype_computes_in_float32_said_in_one_log_line(dtype, computes_in, caplog):
    """XLA:CPU rejects a bf16 x bf16 dot at run time (float16 dots run); params keep their dtype."""
    config = CONFIG.replace(dtype=dtype, param_dtype="bfloat16")
    with caplog.at_level("WARNING", logger="hephaestus_jax"):
        runnable = sharding.model_for_mesh(config, sharding.make_mesh(MeshConfig()))
    assert runnable == config.replace(dtype=computes_in)
    said = [r.getMessage() for r in caplog.records if "XLA:CPU has no bf16 dot" in r.getMessage()]
    assert said == (["ModelConfig.dtype=bfloat16: XLA:CPU has no bf16 dot; computing in float32 on CPU"]
                    if dtype == "bfloat16" else [])
