"""Two real processes (gloo on CPU) through distributed.py's waits: pre-flight mismatches and barrier timeouts end
in a clear error within the timeout, not a hang. The processes run only start-up and the check (seconds each)."""

import os
import socket
import subprocess
import sys
import time

from conftest import REPO_ROOT

TIMEOUT_S = 5
# Process 1 can pretend to run another jax (`version`) or skip the barrier for a long sleep (`barrier`).
_CHILD = """
import sys, time
from hephaestus_jax import distributed

distributed.initialize()
import jax

mode = sys.argv[1]
if mode == "barrier":
    if jax.process_index() == 1:
        time.sleep(600)
    distributed.barrier("checkpoint")
else:
    if mode == "version" and jax.process_index() == 1:
        real = distributed.host_description
        distributed.host_description = lambda: {**real(), "versions": {**real()["versions"], "jax": "0.0.1"}}
    distributed.preflight()
print("passed")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_pair(mode: str, devices=(4, 4)) -> list[subprocess.Popen]:
    port = _free_port()
    processes = []
    for process_id, count in enumerate(devices):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}",
               "HEPHAESTUS_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "HEPHAESTUS_NUM_PROCESSES": "2",
               "HEPHAESTUS_PROCESS_ID": str(process_id), "HEPHAESTUS_BARRIER_TIMEOUT_S": str(TIMEOUT_S)}
        processes.append(subprocess.Popen([sys.executable, "-c", _CHILD, mode], cwd=REPO_ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return processes


def _finish(process: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{stderr[-3000:]}") from None
    return process.returncode, stderr


def _preflight_errors(mode: str, devices=(4, 4)) -> list[str]:
    results = [_finish(process, 120) for process in _start_pair(mode, devices)]
    for returncode, stderr in results:
        assert returncode != 0 and "DistributedError: pre-flight: process 1 differs from process 0" in stderr, \
            stderr[-3000:]
    return [stderr for _, stderr in results]


def test_preflight_refuses_hosts_with_different_versions():
    for stderr in _preflight_errors("version"):
        assert "'jax': '0.0.1'" in stderr and "install the same versions on every host" in stderr


def test_preflight_refuses_hosts_with_different_device_counts():
    for stderr in _preflight_errors("devices", devices=(4, 2)):
        assert "'local_devices': 2" in stderr and "'local_devices': 4" in stderr


def test_a_barrier_a_host_never_reaches_fails_within_the_timeout():
    """Process 1 hangs (sleeps 10 minutes) instead of reaching the barrier: process 0 reports it after the
    timeout and exits soon after (JAX's shutdown waits at most the timeout too, not 5 minutes for the peer)."""
    waiting, hung = _start_pair("barrier")
    start = time.monotonic()
    try:
        returncode, stderr = _finish(waiting, 120)
        elapsed = time.monotonic() - start
    finally:
        hung.kill()
        hung.communicate()
    assert returncode != 0
    assert f"barrier 'checkpoint': not every process arrived within {TIMEOUT_S} s" in stderr, stderr[-3000:]
    assert elapsed < 60  # Start-up (~5 s) + the barrier's timeout + the shutdown's timeout, with room for load.
