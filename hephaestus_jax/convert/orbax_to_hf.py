"""Our Orbax checkpoint (converted or training) -> a Hugging Face model directory, one parameter at a time.

The output loads with `transformers.AutoModelForCausalLM.from_pretrained(dir)` and no custom code. Training
checkpoints export only their params. The directory is assembled under a temporary name and renamed when
complete, so a failed export never leaves something that looks like a model.
"""

from __future__ import annotations

import json
import os
import shutil

import jax

from hephaestus_jax import checkpoint_format as ckpt
from hephaestus_jax.convert import mapping
from hephaestus_jax.convert.safetensors_io import ConversionError, ShardedSafetensorsWriter, parse_size
from hephaestus_jax.model import llama

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def convert_orbax_to_hf(checkpoint_dir: str, output_dir: str, step: int | None = None, dtype: str | None = None,
                        max_shard_size: str = "5GB", tokenizer_dir: str | None = None) -> list[str]:
    """Export params of `checkpoint_dir` (latest step by default); returns the files written."""
    step = ckpt.resolve_step(checkpoint_dir, step)
    config = ckpt.read_metadata(checkpoint_dir, step).model_config
    dtype = dtype or config.param_dtype
    stored = ckpt.stored_shapes(checkpoint_dir, step)
    if "params" not in stored:
        raise ConversionError(f"{checkpoint_dir}/{step}: checkpoint holds no params")
    expected = llama.abstract_params(config)
    ckpt.check_shapes(stored["params"], expected, f"{checkpoint_dir}/{step}")
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise ConversionError(f"{output_dir} exists and is not empty; refusing to overwrite it")

    plan = [(name, entry.layout.hf_shape(config), dtype) for entry in mapping.entries(config)
            for name in entry.hf_names]
    staging = f"{output_dir.rstrip('/')}.partial-{os.getpid()}"
    os.makedirs(staging)
    try:
        writer = ShardedSafetensorsWriter(staging, plan, parse_size(max_shard_size))
        for entry in mapping.entries(config):
            value = _read_param(checkpoint_dir, step, entry.path, stored["params"])
            for name, tensor in mapping.hf_tensors(entry, value, config):
                writer.write(name, tensor)
            del value
        files = writer.finish()
        files += _write_configs(staging, config, dtype)
        if tokenizer_dir:
            files += _copy_tokenizer(tokenizer_dir, staging)
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)  # Empty (checked above); replaced atomically by the rename below.
        os.rename(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return files


def _read_param(checkpoint_dir: str, step: int, path: tuple[str, ...], stored_params) -> object:
    leaf = mapping.get_path(stored_params, path)
    target: dict = {}
    mapping.set_path(target, ("params",) + path, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return mapping.get_path(ckpt.restore_tree(checkpoint_dir, step, target), ("params",) + path)


def _write_configs(out_dir: str, config, dtype: str) -> list[str]:
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_hf(torch_dtype=dtype), f, indent=2)
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.to_hf()["eos_token_id"]}
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=2)
    return ["config.json", "generation_config.json"]


def _copy_tokenizer(tokenizer_dir: str, out_dir: str) -> list[str]:
    source = tokenizer_dir if os.path.isdir(tokenizer_dir) else os.path.dirname(tokenizer_dir)
    copied = [name for name in TOKENIZER_FILES if os.path.exists(os.path.join(source, name))]
    if not copied:
        raise ConversionError(f"--tokenizer_dir {tokenizer_dir}: none of {TOKENIZER_FILES} found")
    for name in copied:
        shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
    return copied
