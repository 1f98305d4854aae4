"""HF <-> Orbax conversion: exact round trips, dtypes, tied embeddings, layouts, bad inputs and the CLIs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from support.cli_helpers import load_tool, verify_figures
from support.hf_reference import LLAMA31_SCALING, TINY_HF, hf_logits, hf_model
from hephaestus_jax import stored_checkpoint as ckpt
from hephaestus_jax.config import ConfigError, ModelConfig
from hephaestus_jax.convert import mapping, verify
from hephaestus_jax.convert.hf_to_orbax import convert_hf_to_orbax
from hephaestus_jax.convert.orbax_to_hf import convert_orbax_to_hf
from hephaestus_jax.convert.random_hf import write_random_hf_checkpoint
from hephaestus_jax.convert.safetensors_io import ConversionError
from hephaestus_jax.model import llama

UNTIED = dict(TINY_HF, rope_scaling=LLAMA31_SCALING)
TIED = dict(TINY_HF, tie_word_embeddings=True)


def _save_hf(tmp_path, hf_config, name="hf", dtype=torch.float32, **save_kwargs):
    model = hf_model(hf_config).to(dtype)
    path = str(tmp_path / name)
    model.save_pretrained(path, **save_kwargs)
    return model, path


def _tensors(directory):
    """Every tensor of an HF directory as torch tensors (exact dtype), by name."""
    out = {}
    for file in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        with safe_open(os.path.join(directory, file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("hf_config, dtype", [(UNTIED, torch.float32), (TIED, torch.bfloat16)])
def test_round_trip_is_bit_identical_and_loads_in_transformers(tmp_path, hf_config, dtype):
    _, hf_dir = _save_hf(tmp_path, hf_config, dtype=dtype, max_shard_size="50KB")  # Sharded input.
    assert os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json"))
    convert_hf_to_orbax(hf_dir, str(tmp_path / "ckpt"))
    convert_orbax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), max_shard_size="40KB")
    original, exported = _tensors(hf_dir), _tensors(str(tmp_path / "out"))
    assert set(original) == set(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name
    load = lambda d: transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
    tokens = np.random.default_rng(0).integers(0, 300, (2, 24))
    np.testing.assert_array_equal(hf_logits(load(str(tmp_path / "out")), tokens), hf_logits(load(hf_dir), tokens))
    assert ("lm_head.weight" in exported) == (not hf_config.get("tie_word_embeddings"))


def test_bfloat16_export_halves_the_bytes(tmp_path):
    _, hf_dir = _save_hf(tmp_path, UNTIED)
    config = convert_hf_to_orbax(hf_dir, str(tmp_path / "ckpt"))
    assert config.param_dtype == "float32"
    convert_orbax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "bf16"), dtype="bfloat16")
    with open(tmp_path / "bf16" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    size = os.path.getsize(tmp_path / "bf16" / "model.safetensors")
    params = config.num_params()
    assert 2 * params <= size < 2 * params + 16384  # Two bytes a parameter plus the header.
    exported = _tensors(str(tmp_path / "bf16"))
    assert all(t.dtype == torch.bfloat16 for t in exported.values())
    original = _tensors(hf_dir)
    assert torch.equal(exported["lm_head.weight"], original["lm_head.weight"].to(torch.bfloat16))


def test_bfloat16_checkpoint_stored_as_float32_is_exact_and_padded_with_zeros(tmp_path):
    """Casting on read (stored dtype != HF dtype) and vocab padding, through the reused parameter buffer."""
    _, hf_dir = _save_hf(tmp_path, UNTIED, dtype=torch.bfloat16)
    config = convert_hf_to_orbax(hf_dir, str(tmp_path / "ckpt"), dtype="float32", vocab_pad_multiple=128)
    assert config.param_dtype == "float32" and config.padded_vocab_size == 384
    params = ckpt.StoredCheckpoint(str(tmp_path / "ckpt")).restore_params(config)
    original = _tensors(hf_dir)
    for name, ours in (("model.embed_tokens.weight", params["embed"]), ("lm_head.weight", params["lm_head"])):
        ours = np.asarray(ours)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours[:300], original[name].float().numpy())
        assert not ours[300:].any(), f"{name}: vocabulary padding rows must be zero"
    np.testing.assert_array_equal(np.asarray(params["layers"]["mlp"]["down_proj"][1]),
                                  original["model.layers.1.mlp.down_proj.weight"].float().numpy())


def test_restore_converts_layout_and_keeps_logits(tmp_path):
    model, hf_dir = _save_hf(tmp_path, UNTIED)
    stored = convert_hf_to_orbax(hf_dir, str(tmp_path / "ckpt"))
    tokens = np.random.default_rng(1).integers(0, 300, (1, 20))
    for layout in (dict(scan_layers=False), dict(vocab_pad_multiple=128), dict(scan_layers=False, vocab_pad_multiple=64)):
        target = stored.replace(**layout)
        params = ckpt.StoredCheckpoint(str(tmp_path / "ckpt")).restore_params(target)
        assert params["embed"].shape[0] == target.padded_vocab_size
        assert ("layers" in params) == target.scan_layers
        logits = np.asarray(llama.forward(target, params, tokens))[..., :300]
        comparison = verify.LogitComparison.of(logits, hf_logits(model, tokens))
        assert comparison.passed, comparison
    params = ckpt.StoredCheckpoint(str(tmp_path / "ckpt")).restore_params(stored.replace(param_dtype="bfloat16"))
    assert all(leaf.dtype == jax.numpy.bfloat16 for leaf in jax.tree.leaves(params))
    with pytest.raises(ckpt.CheckpointError, match=r"intermediate_size: 128 vs 256"):
        ckpt.StoredCheckpoint(str(tmp_path / "ckpt")).restore_params(stored.replace(intermediate_size=256))


def test_restore_places_params_on_a_mesh(tmp_path):
    from hephaestus_jax import sharding
    from hephaestus_jax.config import MeshConfig

    _, hf_dir = _save_hf(tmp_path, UNTIED)
    config = convert_hf_to_orbax(hf_dir, str(tmp_path / "ckpt"))
    mesh = sharding.make_mesh(MeshConfig(fsdp=4, tensor=2))
    shardings = sharding.logical_to_sharding(llama.param_axes(config), mesh)
    params = ckpt.StoredCheckpoint(str(tmp_path / "ckpt")).restore_params(config, shardings=shardings)
    q = params["layers"]["attn"]["q_proj"]
    assert q.sharding == shardings["layers"]["attn"]["q_proj"] and len(q.sharding.device_set) == 8


def _expect_failure(tmp_path, hf_dir, error, pattern):
    out = tmp_path / "ckpt_out"
    with pytest.raises(error, match=pattern):
        convert_hf_to_orbax(hf_dir, str(out))
    assert not out.exists(), "a failed conversion must not leave an output directory"


def test_missing_shard_is_named(tmp_path):
    _, hf_dir = _save_hf(tmp_path, UNTIED, max_shard_size="50KB")
    shard = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(hf_dir, shard))
    _expect_failure(tmp_path, hf_dir, ConversionError, f"shard {shard}, which is missing")


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    _, hf_dir = _save_hf(tmp_path, UNTIED)
    config_path = os.path.join(hf_dir, "config.json")
    with open(config_path) as f:
        data = json.load(f)
    data["intermediate_size"] = 96
    with open(config_path, "w") as f:
        json.dump(data, f)
    _expect_failure(tmp_path, hf_dir, ConversionError,
                    r"model.layers.0.mlp.gate_proj.weight' has shape \(128, 64\) but config.json implies \(96, 64\)")


def test_unknown_architecture_is_refused(tmp_path):
    _, hf_dir = _save_hf(tmp_path, UNTIED)
    config_path = os.path.join(hf_dir, "config.json")
    with open(config_path) as f:
        data = json.load(f)
    data["model_type"] = "gpt_neox"
    with open(config_path, "w") as f:
        json.dump(data, f)
    _expect_failure(tmp_path, hf_dir, ConfigError, r"config.json: model_type='gpt_neox' is not supported")


def test_pickle_only_checkpoint_is_refused(tmp_path):
    model, hf_dir = _save_hf(tmp_path, UNTIED)
    os.remove(os.path.join(hf_dir, "model.safetensors"))
    torch.save(model.state_dict(), os.path.join(hf_dir, "pytorch_model.bin"))
    _expect_failure(tmp_path, hf_dir, ConversionError, r"only pickle weights \(pytorch_model.bin\)")


def test_truncated_safetensors_is_named(tmp_path):
    _, hf_dir = _save_hf(tmp_path, UNTIED)
    path = os.path.join(hf_dir, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    _expect_failure(tmp_path, hf_dir, ConversionError, r"model.safetensors: truncated: tensor '.*' ends at byte")


def test_non_empty_output_dir_is_left_alone(tmp_path):
    _, hf_dir = _save_hf(tmp_path, UNTIED)
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ConversionError, match="not empty"):
        convert_hf_to_orbax(hf_dir, str(out))
    assert (out / "keep.txt").read_text() == "user data"


def test_failed_export_leaves_no_model_directory(tmp_path):
    _, hf_dir = _save_hf(tmp_path, UNTIED)
    convert_hf_to_orbax(hf_dir, str(tmp_path / "ckpt"))
    with pytest.raises(ConversionError, match="none of"):
        convert_orbax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), tokenizer_dir=str(tmp_path))
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out.partial")]


def _run_tool(capsys, name, *args):
    """A conversion tool run in process: asserts exit status 0, returns its stdout."""
    assert load_tool(name).main(list(args)) == 0
    return capsys.readouterr().out


def test_command_line_tools_verify_both_directions(tmp_path, capsys):
    _, hf_dir = _save_hf(tmp_path, UNTIED)
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer_config.json").write_text("{}")
    out = _run_tool(capsys, "convert_hf_to_orbax", "--hf_dir", hf_dir, "--output_dir", str(tmp_path / "ckpt"),
                    "--dtype", "float32", "--verify")
    diff, bound, verdict = verify_figures(out)
    assert diff <= bound < 1e-3 and verdict == "passed"
    out = _run_tool(capsys, "convert_orbax_to_hf", "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir",
                    str(tmp_path / "out"), "--tokenizer_dir", str(tokenizer_dir), "--verify")
    diff, bound, verdict = verify_figures(out)
    assert diff <= bound < 1e-3 and verdict == "passed"
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == 2


def test_export_streams_blocks_smaller_than_a_parameter(tmp_path):
    """A block budget far below one parameter still writes every byte exactly (block-to-offset mapping)."""
    _, hf_dir = _save_hf(tmp_path, dict(UNTIED, vocab_size=300))
    convert_hf_to_orbax(hf_dir, str(tmp_path / "ckpt"), vocab_pad_multiple=128)
    convert_orbax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), block_bytes=1024, max_shard_size="30KB")
    original, exported = _tensors(hf_dir), _tensors(str(tmp_path / "out"))
    assert set(original) == set(exported)
    assert all(torch.equal(exported[name], tensor) for name, tensor in original.items())


def test_fill_ours_overwrites_every_element_of_a_dirty_buffer():
    """The converter reuses one buffer for every parameter: whatever it held must not survive (padding included)."""
    from hephaestus_jax.config import ModelConfig
    from hephaestus_jax.convert import mapping

    config = ModelConfig.from_hf(UNTIED, vocab_pad_multiple=512)
    embed = next(e for e in mapping.entries(config) if e.path == ("embed",))
    hf = np.arange(embed.hf_size, dtype=np.float32).reshape(embed.hf_shape)
    out = np.full(mapping.our_shape(embed), np.nan, np.float32)
    mapping.fill_ours(embed, lambda name, flat: flat.__setitem__(Ellipsis, hf.reshape(-1)), out)
    np.testing.assert_array_equal(out[:300], hf)
    assert out.shape == (512, 64) and not out[300:].any()


def test_hf_tensors_are_the_leading_elements_of_ours():
    """The invariant the streaming exporter relies on, for every entry of padded, stacked configs."""
    from hephaestus_jax.config import ModelConfig
    from hephaestus_jax.convert import mapping

    config = ModelConfig.from_hf(dict(UNTIED, head_dim=32), vocab_pad_multiple=512)
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(entry.hf_shape).astype(np.float32)
               for entry in mapping.entries(config) for name in entry.hf_names}
    params = mapping.params_from_hf(tensors.__getitem__, config)
    for entry in mapping.entries(config):
        ours = np.asarray(mapping.get_path(params, entry.path))
        for name, layer in zip(entry.hf_names, ours if entry.stacked else [ours]):
            flat = layer.reshape(-1)
            np.testing.assert_array_equal(flat[:entry.hf_size], tensors[name].reshape(-1))
            assert not flat[entry.hf_size:].any()  # Padding rows are zero.
    assert params["embed"].shape == (512, 64) and params["layers"]["attn"]["q_proj"].shape == (2, 4, 32, 64)


# Weights N(0, 0.02) over 256-wide rows: rounding them to bf16 moves the logits far past verify's bound.
VERIFY_MODEL = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def float32_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    write_random_hf_checkpoint(VERIFY_MODEL, str(root / "hf"))
    convert_hf_to_orbax(str(root / "hf"), str(root / "ckpt"))
    return str(root / "hf"), str(root / "ckpt")


def test_bfloat16_export_verifies_against_its_own_rounded_weights(tmp_path, float32_checkpoint, capsys):
    """The README's `--dtype bfloat16 --verify` export of a float32 checkpoint passes: both sides run the same
    bf16-rounded weights (comparing the float32 originals with them would differ by bf16's rounding)."""
    _, checkpoint = float32_checkpoint
    params = ckpt.StoredCheckpoint(checkpoint).restore_params(VERIFY_MODEL)
    rounded = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), params)
    tokens = np.random.default_rng(0).integers(0, 512, (2, 16))
    rounding = verify.LogitComparison.of(llama.forward(VERIFY_MODEL, rounded, tokens),
                                         llama.forward(VERIFY_MODEL, params, tokens))
    assert rounding.max_abs_diff > 3 * rounding.bound  # What a float32-vs-bf16 comparison would see.
    out = _run_tool(capsys, "convert_orbax_to_hf", "--checkpoint_dir", checkpoint, "--output_dir",
                    str(tmp_path / "out"), "--dtype", "bfloat16", "--verify")
    diff, bound, verdict = verify_figures(out)
    assert diff <= bound and verdict == "passed"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _expect_verify_failure(capsys, tmp_path, tool, *args):
    """`tool --verify` exits 1, prints its figure above the bound, and leaves nothing at --output_dir (not even
    the staging directory): the output is verified before it is moved into place."""
    output = tmp_path / "out"
    assert load_tool(tool).main([*args, "--output_dir", str(output), "--verify"]) == 1
    captured = capsys.readouterr()
    diff, bound, verdict = verify_figures(captured.out)
    assert diff > bound and verdict == "FAILED"
    assert f"verification FAILED: max_abs_logit_diff={diff:.3g}" in captured.err
    assert f"nothing written at {output}" in captured.err
    assert sorted(os.listdir(tmp_path)) == []


def test_verify_fails_a_broken_conversion_and_writes_nothing(tmp_path, float32_checkpoint, monkeypatch, capsys):
    """A conversion that scales one matrix (a stand-in for any mapping bug) fails --verify."""
    hf_dir, _ = float32_checkpoint
    fill = mapping.fill_ours

    def broken_fill(entry, read_into, out):
        fill(entry, read_into, out)
        if entry.path[-1] == "up_proj":
            out *= 1.01

    monkeypatch.setattr(mapping, "fill_ours", broken_fill)
    _expect_verify_failure(capsys, tmp_path, "convert_hf_to_orbax", "--hf_dir", hf_dir)


def test_verify_fails_a_broken_export_and_writes_nothing(tmp_path, float32_checkpoint, monkeypatch, capsys):
    from hephaestus_jax.convert import orbax_to_hf

    _, checkpoint = float32_checkpoint
    write_block = orbax_to_hf._write_block

    def broken_write_block(writer, entry, first_layer, start, block):
        write_block(writer, entry, first_layer, start, block * 1.01 if entry.path[-1] == "up_proj" else block)

    monkeypatch.setattr(orbax_to_hf, "_write_block", broken_write_block)
    _expect_verify_failure(capsys, tmp_path, "convert_orbax_to_hf", "--checkpoint_dir", checkpoint)
