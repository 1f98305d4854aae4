"""Shared pieces for training tests: a tiny model, a tiny Forge tree, batches from the real pipeline."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import jax
import numpy as np

from conftest import REPO_ROOT
from support.forge_fixture import write_forge_fixture
from hephaestus_jax import sharding
from hephaestus_jax.config import DataConfig, ForgeFiles, MeshConfig, ModelConfig, OptimizerConfig
from hephaestus_jax.data import mixtures
from hephaestus_jax.data.pipeline import StreamSpec
from hephaestus_jax.train_step import TrainStep

# Everything tiny, the vocabulary too: the pipeline's Llama-3 ids are folded into 512 (`forge_batches`), which
# keeps its packing, positions and loss masks; 128256 embedding rows made the in-process training tests 2x slower.
TINY = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=512)
SEQ_LEN = 32
BATCH = 8
OPTIMIZER = OptimizerConfig(learning_rate=1e-3, warmup_steps=2)


def forge_batches(root, count: int, batch: int = BATCH, seq_len: int = SEQ_LEN, mixture: str = "forge_stage1"):
    """`count` local batches of the stage-I mixture over a synthetic Forge tree written under `root`, token ids
    folded into TINY's vocabulary."""
    if not (root / "text").exists():
        write_forge_fixture(root, records_per_file=(20, 6))
    data = DataConfig(files=ForgeFiles(data_dir=str(root)))
    with mixtures.train_stream(data, StreamSpec(global_rows=batch, seq_len=seq_len), name=mixture) as stream:
        batches = [next(stream) for _ in range(count)]
    for batch in batches:
        batch["inputs"], batch["targets"] = batch["inputs"] % TINY.vocab_size, batch["targets"] % TINY.vocab_size
    return batches


def mesh_of(devices: int, **axes) -> jax.sharding.Mesh:
    return sharding.make_mesh(MeshConfig(**axes) if axes else MeshConfig(fsdp=-1), jax.devices()[:devices])


def run_steps(step_fn: TrainStep, state, batches):
    """Apply `batches` in order; returns (final state, per-step losses as floats)."""
    losses = []
    for batch in batches:
        state, metrics = step_fn(state, sharding.global_batch(batch, step_fn.mesh))
        losses.append(float(metrics["loss"]))
    return state, losses


def byte_tokenizer(directory) -> str:
    """A 512-token Llama-3 tokenizer written under `directory`: a tiktoken tokenizer.model whose 256 tokens are
    the single bytes (no merges), followed by Meta's 256 special tokens. The CLI tests train on real Forge text
    with it; with the 128256-token vocabulary the embedding and logits made every CLI step ~20x slower."""
    path = os.path.join(directory, "byte_tokenizer", "tokenizer.model")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="ascii") as f:
        f.writelines(f"{base64.b64encode(bytes([byte])).decode()} {byte}\n" for byte in range(256))
    return os.path.dirname(path)


def byte_vocab_bindings(directory) -> dict[str, object]:
    """Gin bindings that train on the 512-token byte tokenizer (written under `directory`), embeddings tied."""
    return {"ModelConfig.vocab_size": 512, "ModelConfig.tie_word_embeddings": True,
            "DataConfig.tokenizer_path": repr(byte_tokenizer(directory))}


def tiny_gin(tmp_path, data_dir, **bindings) -> str:
    """A gin file for the CLI: tiny model with a 512-token byte vocabulary, CPU mesh, the given Forge tree,
    overridable bindings."""
    values = {
        **byte_vocab_bindings(tmp_path), "ModelConfig.hidden_size": 64, "ModelConfig.intermediate_size": 128,
        "ModelConfig.num_layers": 2, "ModelConfig.num_heads": 4, "ModelConfig.num_kv_heads": 2,
        "ModelConfig.max_position_embeddings": 512, "MeshConfig.fsdp": -1,
        "ForgeFiles.data_dir": repr(str(data_dir)), "DataConfig.seq_len": SEQ_LEN,
        "TrainConfig.output_dir": repr(str(tmp_path / "run")), "TrainConfig.batch_size": BATCH,
        "TrainConfig.num_steps": 8, "TrainConfig.log_every": 1, "TrainConfig.checkpoint_every": 2,
        "TrainConfig.async_checkpointing": False, "OptimizerConfig.learning_rate": 1e-3,
        "OptimizerConfig.warmup_steps": 2,
    }
    values.update(bindings)
    path = tmp_path / "tiny.gin"
    path.write_text("".join(f"{key} = {value}\n" for key, value in values.items()))
    return str(path)


def train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "hephaestus_jax.train", *args]


def run_train(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(*args), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def losses_by_step(path) -> dict[int, float]:
    from hephaestus_jax.metrics import read_metrics

    return {entry["step"]: entry["loss"] for entry in read_metrics(path) if "loss" in entry}  # Not evaluations.


def assert_close_rel(a, b, rel):
    a, b = np.asarray(a), np.asarray(b)
    assert np.all(np.abs(a - b) <= rel * np.abs(b)), (a, b)
