"""Device mesh, partition rules and global batches.

The mesh has two axes: "data" (pure data parallelism) and "fsdp" (data parallelism whose
devices also split the parameters and optimizer state). The batch is split over both.
How the state is laid out is a named tactic from config:
  replicate  every leaf on every device
  fsdp       each leaf split along its largest dimension divisible by the fsdp size
             (leaves smaller than `min_size` elements stay replicated)
"""
from __future__ import annotations

import collections
import math
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # the batch is split over every axis
TACTICS = ("replicate", "fsdp")


def make_mesh(axis_sizes: Mapping[str, int], devices=None) -> Mesh:
    """Mesh over all (or the given) devices; one axis size may be -1 (the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}")
    sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(axis_sizes)}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {dict(axis_sizes)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"have {len(devices)}")
    return jax.make_mesh(tuple(sizes), MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every mesh axis."""
    return NamedSharding(mesh, P(BATCH_AXES))


def leaf_spec(shape: tuple[int, ...], tactic: str, fsdp_size: int, min_size: int = 0) -> P:
    if tactic not in TACTICS:
        raise ValueError(f"unknown sharding tactic {tactic!r}; expected one of {TACTICS}")
    if tactic == "replicate" or fsdp_size == 1 or math.prod(shape) < max(min_size, 1):
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(abstract_tree: Any, mesh: Mesh, tactic: str = "replicate",
                   min_size: int = 0) -> Any:
    """A NamedSharding per leaf of a tree of arrays / ShapeDtypeStructs."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), tactic, fsdp_size, min_size)),
        abstract_tree)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings: restore / AOT-compile targets."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_tree, shardings)


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """This process's share of a batch (numpy, leading dim = local batch) -> global
    jax.Arrays split over the mesh; the same call on one device or many hosts."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def prefetch_to_mesh(local_batches: Iterator[Any], mesh: Mesh, depth: int = 2) -> Iterator[Any]:
    """global_batch of each local batch, `depth` batches ahead: their transfers to the
    devices are started (asynchronously) while the steps before them run."""
    queue: collections.deque = collections.deque()
    try:
        for batch in local_batches:
            queue.append(global_batch(batch, mesh))
            if len(queue) >= depth:
                yield queue.popleft()
        while queue:
            yield queue.popleft()
    finally:
        close = getattr(local_batches, "close", None)
        if close is not None:
            close()
