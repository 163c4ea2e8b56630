"""jax.distributed for multi-process runs, shared by training and prediction.

A run is multi-process when its settings say so (an explicit coordinator and process count,
local multi-process tests and launch/local_multiprocess.py), or under a SLURM job of several
tasks or on a TPU VM pod of several workers, where jax.distributed detects the cluster.
"""
from __future__ import annotations

import logging
import os

import jax


def is_multi_process(num_processes: int = 1, auto: bool = False) -> bool:
    """From the settings, or a SLURM job of several tasks, or a TPU VM pod of several workers."""
    cluster = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
    return num_processes > 1 or auto or cluster or tpu_pod


def initialise(coordinator: str = "", num_processes: int = 1, process_id: int = -1,
               cpu_collectives: str = "gloo", auto: bool = False) -> None:
    """jax.distributed.initialize for a multi-process run (before any backend starts); a
    no-op for one process."""
    if not is_multi_process(num_processes, auto):
        return
    if cpu_collectives:  # CPU arrays need it to talk across processes
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()
    logging.info("process %d of %d", jax.process_index(), jax.process_count())
