"""bench/peers_aot.py's helpers: reading a compile's printout and XLA dump, and MaxText's arguments for our step."""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import pytest

from conftest import REPO_ROOT
from hephaestus_jax import aot, gin_configs, hlo_cost

_SPEC = importlib.util.spec_from_file_location("peers_aot", os.path.join(REPO_ROOT, "bench", "peers_aot.py"))
peers_aot = sys.modules["peers_aot"] = importlib.util.module_from_spec(_SPEC)  # Its dataclasses look it up.
_SPEC.loader.exec_module(peers_aot)

# A loop of 5 [64, 64] matmuls: 5 * 2 * 64**3 FLOPs, which XLA's own cost analysis counts once.
_PROGRAM = """
import jax, jax.numpy as jnp
def f(w, x):
    return jax.lax.fori_loop(0, 5, lambda i, x: jnp.tanh(x @ w), x)
jax.jit(f).lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile()
"""


def test_compile_printout_round_trips_a_real_memory_analysis():
    compiled = jax.jit(lambda x: x @ x).lower(jnp.ones((64, 64))).compile()
    memory, costs = compiled.memory_analysis(), compiled.cost_analysis()
    printed = f"Starting...\n{peers_aot.format_compile_output(memory, costs)}\nFinished\n"
    parsed, parsed_costs = peers_aot.parse_compile_output(printed)
    assert parsed.argument_size_in_bytes == memory.argument_size_in_bytes == 64 * 64 * 4
    assert parsed.output_size_in_bytes == memory.output_size_in_bytes
    assert parsed.temp_size_in_bytes == memory.temp_size_in_bytes
    assert parsed.peak_memory_in_bytes == memory.peak_memory_in_bytes
    assert parsed_costs == {"flops": costs["flops"], "bytes accessed": costs["bytes accessed"]}


def test_maxtext_style_printout_parses():
    # What MaxText's train_compile prints under jax 0.12: CompiledMemoryStats and the cost-analysis dict.
    printed = ("Memory analysis: CompiledMemoryStats(generated_code_size_in_bytes=40960, argument_size_in_bytes=6, "
               "output_size_in_bytes=5, alias_size_in_bytes=4, temp_size_in_bytes=300, host_generated_code_size_in_"
               "bytes=0, host_argument_size_in_bytes=0, host_output_size_in_bytes=0, host_alias_size_in_bytes=0, "
               "host_temp_size_in_bytes=7)\n"
               "Cost analysis: {'bytes accessedout{}': 1.0, 'flops': 2.5e+16, 'bytes accessed': 3e+14}\n")
    memory, costs = peers_aot.parse_compile_output(printed)
    assert (memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.alias_size_in_bytes,
            memory.temp_size_in_bytes, memory.generated_code_size_in_bytes, memory.peak_memory_in_bytes) == \
        (6, 5, 4, 300, 40960, None)  # jax 0.12 prints no peak; host_temp is not the device's temp.
    assert costs == {"flops": 2.5e16, "bytes accessed": 3e14}
    with pytest.raises(ValueError, match="lacks .*temp_size_in_bytes"):
        peers_aot.parse_compile_output(printed.replace("temp_size_in_bytes", "temp_size"))
    with pytest.raises(ValueError, match="no 'Memory analysis:'"):
        peers_aot.parse_compile_output("Cost analysis: {}\n")


def test_dumped_program_is_the_optimised_module_and_its_loops_count(tmp_path):
    env = peers_aot.dump_env(str(tmp_path), "jit_f")
    subprocess.run([sys.executable, "-c", _PROGRAM], env={**env, "JAX_PLATFORMS": "cpu"}, check=True)
    cost = hlo_cost.program_cost(peers_aot.dumped_program(str(tmp_path), "jit_f"))
    assert cost.loops == 1 and cost.unknown_trip_counts == 0
    assert cost.flops >= 5 * 2 * 64**3
    assert cost.flops < 6 * 2 * 64**3  # Counted once, it would be 1/5 of this; tanh adds a little.
    entry, body = peers_aot.loop_lines(peers_aot.dumped_program(str(tmp_path), "jit_f")).splitlines()
    assert entry.startswith("    main") and ": 1 runs" in entry
    assert body.startswith("      ") and ": 5 runs" in body  # The loop body, one level deeper, 5 times a step.
    with pytest.raises(FileNotFoundError, match="no optimised HLO of module jit_g"):
        peers_aot.dumped_program(str(tmp_path), "jit_g")


def _configs(row: str, attention: str) -> gin_configs.Configs:
    """The configuration the bench compiles for a row (gin state cleared afterwards)."""
    gin.clear_config()
    try:
        gin_configs.load_gin(*peers_aot.gin_setup(peers_aot.ROWS[row], attention))
        return gin_configs.build_configs()
    finally:
        gin.clear_config()


@pytest.mark.parametrize("row, expected", [
    ("8b-v5p-32", ["compile_topology=v5p-32", "model_name=llama3-8b", "per_device_batch_size=2",
                   "ici_fsdp_parallelism=16", "ici_tensor_parallelism=1"]),
    ("8b-v5e-256", ["compile_topology=v5e-256", "per_device_batch_size=0.125", "ici_fsdp_parallelism=32",
                    "ici_tensor_parallelism=8"]),
    ("70b-v5p-128", ["model_name=llama3-70b", "per_device_batch_size=0.5", "ici_fsdp_parallelism=32",
                     "ici_tensor_parallelism=2"]),
])
def test_maxtext_arguments_describe_our_step(row, expected):
    configs = _configs(row, "splash")
    chips = aot.parse_topology(peers_aot.ROWS[row].topology).num_chips
    args = peers_aot.maxtext_args(configs, peers_aot.ROWS[row], chips)
    # 512 x 8192 in 16 micro-batches of (per_device_batch_size x chips) rows, full remat, flash attention.
    assert set(expected) | {"max_target_length=8192", "gradient_accumulation_steps=16", "remat_policy=full",
                            "attention=flash", "compile_topology_num_slices=1", "ici_data_parallelism=1",
                            "allow_split_physical_axes=true"} \
        <= set(args)
    per_device = float(next(a for a in args if a.startswith("per_device_batch_size=")).split("=")[1])
    assert per_device * chips * 16 == 512


def test_maxtext_arguments_refuse_a_policy_maxtext_lacks():
    configs = _configs("8b-v5p-32", "xla")
    configs = dataclasses.replace(configs, model=configs.model.replace(remat_policy="qkv_out"))
    with pytest.raises(ValueError, match="no MaxText equivalent of remat_policy 'qkv_out'"):
        peers_aot.maxtext_args(configs, peers_aot.ROWS["8b-v5p-32"], 16)

