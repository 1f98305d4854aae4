"""ModelConfig <-> config.json (both dialects), RoPE frequencies vs transformers, and the model gin files."""

import glob
import os

import gin
import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from conftest import REPO_ROOT
from support.hf_reference import LLAMA31_SCALING, TINY_HF
from hephaestus_jax import rope
from hephaestus_jax.config import ConfigError, ModelConfig


def _hf_inv_freq(hf_config: dict) -> np.ndarray:
    config = transformers.AutoConfig.for_model(**hf_config)
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        dim = config.head_dim
        theta = config.rope_parameters["rope_theta"]
        import torch
        return (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))).numpy()
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.numpy()


@pytest.mark.parametrize("scaling", [
    None,
    LLAMA31_SCALING,
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},  # Llama-3.2-1B's values.
    {"type": "linear", "factor": 4.0},  # Legacy `type` key.
])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_inverse_frequencies_equal_transformers_exactly(scaling, head_dim):
    hf_config = dict(TINY_HF, head_dim=head_dim, rope_scaling=scaling)
    config = ModelConfig.from_hf(hf_config)
    ours = rope.inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling_dict)
    theirs = _hf_inv_freq(hf_config)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)


def test_both_config_dialects_give_the_same_model_config():
    hub = dict(TINY_HF, rope_scaling=LLAMA31_SCALING, torch_dtype="bfloat16")
    v5 = {k: v for k, v in hub.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    v5.update(dtype="bfloat16", rope_parameters={**LLAMA31_SCALING, "rope_theta": TINY_HF["rope_theta"]})
    assert ModelConfig.from_hf(hub) == ModelConfig.from_hf(v5)
    # And what transformers 5 itself writes for the Hub dialect reads back identically.
    written = transformers.AutoConfig.for_model(**hub).to_dict()
    assert "rope_parameters" in written
    assert ModelConfig.from_hf(written) == ModelConfig.from_hf(hub)


@pytest.mark.parametrize("hf_config", [
    dict(TINY_HF, rope_scaling=LLAMA31_SCALING),
    dict(TINY_HF, tie_word_embeddings=True, head_dim=32),
    dict(TINY_HF, model_type="mistral", sliding_window=64),
])
def test_to_hf_loads_in_transformers_and_round_trips(hf_config):
    config = ModelConfig.from_hf(hf_config)
    exported = config.to_hf(torch_dtype="bfloat16")
    loaded = transformers.AutoConfig.for_model(**exported)
    assert type(loaded).__name__ == {"llama": "LlamaConfig", "mistral": "MistralConfig"}[config.model_type]
    assert loaded.num_key_value_heads == config.num_kv_heads and loaded.head_dim == config.head_dim
    assert ModelConfig.from_hf(loaded.to_dict()) == config
    assert ModelConfig.from_hf(exported) == config


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gpt2"), "model_type='gpt2' is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn' is not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
    (dict(hidden_size=66), "not divisible by num_heads"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_bad_config_json_fails_clearly(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(dict(TINY_HF, **change))


def test_missing_config_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_hf_file(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n "vocab_size": }')
    with pytest.raises(ConfigError, match=r"config.json:2: invalid JSON"):
        ModelConfig.from_hf_file(str(tmp_path / "config.json"))


# Parameter counts published for these checkpoints (safetensors totals on the Hub).
PUBLISHED = {
    "llama3_8b": 8_030_261_248,
    "llama3_1_8b": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
    "llama3_1_70b": 70_553_706_496,
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
    "mistral_7b": 7_248_023_552,
    "smollm2_135m": 134_515_008,
}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO_ROOT, "configs/model/*.gin"))))
def test_model_gin_files_build_published_shapes(path):
    name = os.path.basename(path)[:-4]
    gin.clear_config()
    gin.add_config_file_search_path(REPO_ROOT)
    gin.parse_config_file(path)
    config = ModelConfig()
    gin.clear_config()
    if name in PUBLISHED:
        assert config.num_params() == PUBLISHED[name]
    else:
        assert name == "tiny" and config.num_params() < 20_000_000
    if name.startswith(("llama3_1", "llama3_2")) or name == "tiny":
        assert config.rope_scaling_dict["rope_type"] == "llama3"
