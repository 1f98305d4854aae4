"""Test session setup: 8 simulated CPU devices (before jax is imported) and shared fixtures."""

import atexit
import logging
import os
import shutil
import sys
import tempfile

import pytest

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (the [tpu] extra) must not probe for TPU chips here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # One persistent compilation cache per test session, this process and every command it starts: the same
    # program (a tiny model's train step, its init) is compiled once, not once per subprocess. Removed at exit.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hephaestus_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("HEPHAESTUS_VERBOSE_STARTUP", "1")  # Commands the tests start keep their stderr whole.
sys.path.insert(0, os.path.dirname(__file__))  # For the shared helper modules next to the tests.

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def isolated_package_logger():
    """Undo what in-process CLI runs do to the package logger (gin_configs.log_to_stderr adds a handler on the
    captured stderr, which pytest closes after the test, and stops propagation, which hides records from
    caplog), so that later tests see the logger as it was."""
    logger = logging.getLogger("hephaestus_jax")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


# The modules that take longest (minutes: real-model conversions and training commands), run first. With README's
# `-n 2 --dist loadfile` each worker takes the next whole module when it is free, so starting with the longest ones
# keeps both workers busy to the end (longest-first scheduling) instead of leaving one long module for the last.
LONGEST_FIRST = ("test_readme.py", "test_train_cli.py", "test_smollm2.py", "test_gcs.py", "test_mixture_study.py",
                 "test_replicate.py", "test_train_step.py", "test_aot.py", "test_multihost.py", "test_evaluate.py",
                 "test_losses.py", "test_decoding.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: the rest keep their order.
