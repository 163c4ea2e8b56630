"""Batches made ahead of the training loop: in a thread of this process, or in reader
processes that decode straight into shared memory.

Reader processes (spawned: the parent holds JAX's threads) each get the batch function
once; per batch they receive only its item and a slot, write the images into that slot's
shared-memory block (allocated once, reused) and send back the small arrays. The parent
copies the images out and frees the slot. Moving a decoded batch between processes so
costs one copy of its images; Grain's process prefetch (a new shared-memory block and
its page faults per array, per batch) cost more than decoding raw records itself
(bench/input.py; bench/README.md, "Training input").
"""
from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import os
import queue
import threading
from multiprocessing import shared_memory
from typing import Any, Callable, Iterable, Iterator

import numpy as np

# Set in each reader process by _start.
_FILL: Callable | None = None
_SLOTS: list[np.ndarray] = []
_BLOCKS: list[shared_memory.SharedMemory] = []


def _start(fill: Callable, names: list[str], shape: tuple[int, ...]) -> None:
    global _FILL, _SLOTS, _BLOCKS
    _FILL = fill
    _BLOCKS = [shared_memory.SharedMemory(name=name) for name in names]
    _SLOTS = [np.ndarray(shape, np.uint16, buffer=block.buf) for block in _BLOCKS]


def _run(item: Any, slot: int) -> dict:
    batch = _FILL(item, _SLOTS[slot])
    return {**batch, "image": len(batch["image"])}  # the rows written; the pixels stay


class ReaderPool:
    """`fill(item, out)` -> a batch dict whose "image" it wrote into `out[:n]` (uint16
    `shape`), run in `workers` processes, at most `depth` batches in flight."""

    def __init__(self, fill: Callable, workers: int, shape: tuple[int, ...], depth: int):
        nbytes = int(np.prod(shape)) * 2
        self.shape, self.depth = shape, max(depth, workers)
        _check_shared_memory(nbytes * self.depth)
        self._blocks = [shared_memory.SharedMemory(create=True, size=nbytes)
                        for _ in range(self.depth)]
        self._slots = [np.ndarray(shape, np.uint16, buffer=b.buf) for b in self._blocks]
        self._executor = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
            initargs=(fill, [b.name for b in self._blocks], shape))

    def map(self, items: Iterable) -> Iterator[dict]:
        """The batches of `items`, in order."""
        free = collections.deque(range(self.depth))
        pending: collections.deque = collections.deque()
        items = iter(items)
        while True:
            while free:
                item = next(items, StopIteration)
                if item is StopIteration:
                    break
                slot = free.popleft()
                pending.append((slot, self._executor.submit(_run, item, slot)))
            if not pending:
                return
            slot, future = pending.popleft()
            batch = future.result()  # a reader's error (or its death) is raised here
            batch["image"] = self._slots[slot][:batch["image"]].copy()
            free.append(slot)
            yield batch

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        for block in self._blocks:
            block.close()
            block.unlink()
        self._blocks, self._slots = [], []


def _check_shared_memory(need: int, folder: str = "/dev/shm") -> None:
    """A container's /dev/shm is often small (Docker: 64 MiB); a block that outgrows it
    would kill its reader with SIGBUS mid-batch, so refuse at the start instead."""
    try:
        stat = os.statvfs(folder)
    except OSError:  # no such folder: shared memory lives elsewhere on this system
        return
    free = stat.f_bavail * stat.f_frsize
    if need > free:
        raise RuntimeError(
            f"the reader processes need {need / 2**20:.0f} MiB of shared memory and {folder} "
            f"has {free / 2**20:.0f} MiB free: lower config.input.workers or .prefetch, use "
            "input.workers=0, or give the container more (docker run --shm-size / --ipc=host)")


def in_processes(fill: Callable, items: Iterable, workers: int, shape: tuple[int, ...],
                 depth: int) -> Iterator[dict]:
    """ReaderPool.map that shuts the pool down when the stream is closed or done."""
    pool = ReaderPool(fill, workers, shape, depth)
    try:
        yield from pool.map(items)
    finally:
        pool.close()


def in_thread(make: Callable[[Any], dict], items: Iterable, depth: int) -> Iterator[dict]:
    """make(item) for each item, `depth` ahead, in one thread of this process (file reads
    and zlib release the GIL); its errors are raised here, in order."""
    out: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                result = make(item)
                while not stop.is_set():
                    try:
                        out.put((result, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put((done, None))
        except BaseException as err:  # noqa: BLE001  (handed to the consumer)
            out.put((None, err))

    thread = threading.Thread(target=produce, daemon=True, name="iap-reader")
    thread.start()
    try:
        while True:
            result, err = out.get()
            if err is not None:
                raise err
            if result is done:
                return
            yield result
    finally:
        stop.set()
        while thread.is_alive():
            try:
                out.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)
