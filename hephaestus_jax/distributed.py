"""Multi-process start-up and synchronisation.

`initialize()` must run before anything touches JAX devices. It reads the environment:
  HEPHAESTUS_COORDINATOR_ADDRESS, HEPHAESTUS_NUM_PROCESSES, HEPHAESTUS_PROCESS_ID: an explicit cluster
      (CPU or GPU hosts; CPU collectives use gloo);
  HEPHAESTUS_DISTRIBUTED=auto: `jax.distributed.initialize()` with JAX's own detection (Cloud TPU VMs, SLURM);
  neither: a single process.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
    """A multi-process setting is missing, inconsistent or a peer did not answer in time."""


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
        jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id)
    elif os.environ.get("HEPHAESTUS_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
    else:
        return
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
