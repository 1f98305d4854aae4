"""Start-up noise (TensorFlow/CUDA/libtpu probing for hardware) is silenced by default for every command, and
HEPHAESTUS_VERBOSE_STARTUP=1 brings it back; real errors always come through."""

import os
import subprocess
import sys

from conftest import REPO_ROOT
from hephaestus_jax import startup

BFCL_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "bfcl")
CUINIT = "E0000 00:00:1796217953.813006    5358 cuda_executor.cc:1] failed call to cuInit: UNKNOWN ERROR (303)"


def _run(args, verbose: bool) -> subprocess.CompletedProcess:
    """A command as a user starts it: no test-session settings that quieten or pin the libraries."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "JAX_PLATFORMS", startup.VERBOSE_ENV)}
    if verbose:
        env[startup.VERBOSE_ENV] = "1"
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(n in line for n in startup.NOISE)]


def test_a_real_command_starts_quietly_and_verbose_startup_shows_the_noise():
    args = ["-m", "hephaestus_jax.evaluate", "function_calling", "--predictions",
            os.path.join(BFCL_DIR, "predictions.jsonl"), "--dataset", BFCL_DIR]
    quiet, verbose = _run(args, verbose=False), _run(args, verbose=True)
    assert quiet.returncode == verbose.returncode == 0, quiet.stderr[-3000:]
    assert _noise(verbose.stderr)  # libtpu (the [tpu] extra) looks for a TPU on this machine and says so.
    assert _noise(quiet.stderr) == [], quiet.stderr[-3000:]
    assert "micro average" in quiet.stdout


def test_the_filter_drops_only_the_noise_and_passes_errors_and_child_output():
    code = ("import hephaestus_jax, os, subprocess, sys\n"
            f"os.write(2, {CUINIT + chr(10)!r}.encode())\n"
            "print('error: a real problem', file=sys.stderr, flush=True)\n"
            "subprocess.run([sys.executable, '-c', 'import sys; sys.stderr.write(\"child: partial line\")'])\n")
    quiet, verbose = _run(["-c", code], verbose=False), _run(["-c", code], verbose=True)
    assert quiet.stderr == "error: a real problem\nchild: partial line"
    assert verbose.stderr == CUINIT + "\nerror: a real problem\nchild: partial line"


def test_a_failing_command_still_prints_its_error():
    result = _run(["-m", "hephaestus_jax.evaluate", "function_calling", "--predictions", "missing.jsonl",
                   "--dataset", "/nonexistent"], verbose=False)
    assert result.returncode == 2 and "error: /nonexistent: no such BFCL file or directory" in result.stderr
