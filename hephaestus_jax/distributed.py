"""Multi-process start-up, pre-flight checks and barriers with timeouts.

`initialize()` must run before anything touches JAX devices. It reads the environment:
  HEPHAESTUS_COORDINATOR_ADDRESS (host:port), HEPHAESTUS_NUM_PROCESSES, HEPHAESTUS_PROCESS_ID: an explicit
      cluster (CPU or GPU hosts; CPU collectives use gloo);
  HEPHAESTUS_DISTRIBUTED=auto: `jax.distributed.initialize()` with JAX's own detection (Cloud TPU VMs, SLURM);
  neither: a single process.
Every cross-process wait has a timeout (HEPHAESTUS_BARRIER_TIMEOUT_S, default 600), so a broken or missing
host produces an error naming what was waited for instead of a hang.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import json
import logging
import os

import jax
import numpy as np

log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
    """A multi-process setting is missing, inconsistent, or a peer did not answer in time."""


def timeout_seconds() -> float:
    return float(os.environ.get("HEPHAESTUS_BARRIER_TIMEOUT_S", "600"))


def initialize() -> None:
    """Join the cluster described by the environment (see the module docstring); no-op for one process."""
    address = os.environ.get("HEPHAESTUS_COORDINATOR_ADDRESS")
    if address:
        try:
            num_processes = int(os.environ["HEPHAESTUS_NUM_PROCESSES"])
            process_id = int(os.environ["HEPHAESTUS_PROCESS_ID"])
        except (KeyError, ValueError) as e:
            raise DistributedError("HEPHAESTUS_COORDINATOR_ADDRESS is set, so HEPHAESTUS_NUM_PROCESSES and "
                                   f"HEPHAESTUS_PROCESS_ID must be integers too ({e})") from None
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # The shutdown timeout bounds the exit too: a process that failed (e.g. a barrier timed out) does not wait
        # at exit for a peer that never comes (JAX's default is 5 minutes).
        jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id,
                                   initialization_timeout=int(timeout_seconds()),
                                   shutdown_timeout_seconds=int(timeout_seconds()))
    elif os.environ.get("HEPHAESTUS_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
    else:
        return
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def _client():
    from jax._src import distributed  # The coordination-service client (key-value store, barriers).

    if distributed.global_state.client is None:
        raise DistributedError("several processes but jax.distributed is not initialised")
    return distributed.global_state.client


def barrier(name: str) -> None:
    """Wait until every process reaches barrier `name`, at most `timeout_seconds()` (no-op for one process)."""
    if jax.process_count() == 1:
        return
    timeout = timeout_seconds()
    try:
        _client().wait_at_barrier(f"hephaestus/{name}", int(timeout * 1000))
    except Exception as e:  # The client raises XlaRuntimeError (DEADLINE_EXCEEDED, UNAVAILABLE, ...).
        raise DistributedError(f"barrier {name!r}: not every process arrived within {timeout:.0f} s ({e})") from None


def host_description() -> dict:
    """What must agree across hosts: versions of jax, jaxlib, libtpu and this project, and the device count."""
    versions = {}
    for package in ("jax", "jaxlib", "libtpu", "hephaestus-jax"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"versions": versions, "local_devices": jax.local_device_count(),
            "platform": jax.local_devices()[0].platform}


def preflight() -> None:
    """On every host before training: same versions and device counts everywhere, then a cross-host sum.

    Raises DistributedError naming the disagreeing processes, or the step that timed out.
    """
    if jax.process_count() == 1:
        return
    client, me, count = _client(), jax.process_index(), jax.process_count()
    timeout_ms = int(timeout_seconds() * 1000)
    client.key_value_set(f"hephaestus/preflight/{me}", json.dumps(host_description()))
    descriptions = []
    for process in range(count):
        try:
            descriptions.append(json.loads(client.blocking_key_value_get(f"hephaestus/preflight/{process}",
                                                                         timeout_ms)))
        except Exception as e:
            raise DistributedError(f"pre-flight: process {process} did not report within "
                                   f"{timeout_ms / 1000:.0f} s ({e})") from None
    for process, description in enumerate(descriptions):
        if description != descriptions[0]:
            raise DistributedError(f"pre-flight: process {process} differs from process 0: {description} vs "
                                   f"{descriptions[0]} (install the same versions on every host)")
    _check_collective(timeout_ms / 1000)
    log.info("pre-flight passed on %d processes: %s", count, descriptions[0]["versions"])


def _check_collective(timeout: float) -> None:
    """A sum over every device of every host must equal the device count, within `timeout` seconds."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("all"))
    ones = jax.make_array_from_callback((jax.device_count(),), sharding, lambda index: np.ones(1, np.float32))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    future = pool.submit(lambda: float(jax.jit(lambda x: x.sum(), out_shardings=replicated)(ones)))
    try:
        total = future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        raise DistributedError(f"pre-flight: a sum over all {jax.device_count()} devices did not finish within "
                               f"{timeout:.0f} s: a host or the network between hosts is not working") from None
    finally:
        pool.shutdown(wait=False)
    if total != jax.device_count():
        raise DistributedError(f"pre-flight: a sum over all devices gave {total}, expected {jax.device_count()}")
