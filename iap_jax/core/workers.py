"""Worker processes for header reading and pixel decoding.

Spawned, not forked: the parent may hold JAX's (or TensorFlow's) threads, which fork does
not copy safely. Each worker runs single-threaded BLAS so that N workers use N cores.
"""
from __future__ import annotations

import multiprocessing
import os
from multiprocessing.pool import Pool

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def worker_pool(workers: int) -> Pool:
    saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    os.environ.update({name: "1" for name in _THREAD_VARIABLES})
    try:
        return multiprocessing.get_context("spawn").Pool(workers)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
