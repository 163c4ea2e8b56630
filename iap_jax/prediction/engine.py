"""The prediction engine: a checkpoint's model as one compiled forward, batches of stored
slices from an input source, and the thread that reads them ahead of the device.

Used by iap-predict (iap_jax/prediction/predict_cli.py), the out-of-distribution fitting (iap_jax/prediction/ood.py)
and bench/predict.py. The model comes from the checkpoint alone (parameters, batch
statistics, label encoding, pixel spec and config; never the optimizer state), restored
onto this process's devices and rebuilt with a convolution and dtype fit for this machine;
one jitted forward of a fixed global batch shape, compiled ahead of time, runs over
batches sharded on the local devices (the last batch padded, its rows dropped by the
caller).
"""
from __future__ import annotations

import functools
import hashlib
import json
import queue
import threading
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from iap_jax.core import sharding as sharding_lib
from iap_jax.core.preprocess import model_input
from iap_jax.io.checkpoints import restore_model
from iap_jax.models.factory import (build_model, describe_convolutions, inference_settings,
                                    prepare_inference)


def encoding_sha256(encoding) -> str:
    """The identity of a label encoding (what a run's predictions were decoded with)."""
    return hashlib.sha256(json.dumps(encoding.to_json(), sort_keys=True).encode()).hexdigest()


def checkpoint_fingerprint(params) -> str:
    """The identity of a checkpoint's parameters, from its heads (small, and different for
    any two trainings): what a model fitted on its outputs (the OOD model) is checked against."""
    digest = hashlib.sha256()
    for name in sorted(k for k in params if k.startswith("head_")):
        for leaf_name in sorted(params[name]):
            digest.update(f"{name}/{leaf_name}".encode())
            digest.update(np.asarray(jax.device_get(params[name][leaf_name]), np.float32).tobytes())
    return digest.hexdigest()


# --- the model --------------------------------------------------------------------------

class Predictor:
    """A model as one compiled forward over a fixed global batch on this process's devices."""

    def __init__(self, restored: dict, mesh, batch_size: int = 256, conv_impl: str | None = None,
                 dtype: str | None = None, fold_norms: bool = True):
        """restored: checkpoints.restore_model's dict (arrays placed on `mesh`); fold_norms:
        see models.factory.build_model."""
        self.mesh = mesh
        self.step = restored["step"]
        self.directory = restored["directory"]
        self.encoding = restored["label_encoding"]
        self.spec = restored["pixel_spec"]
        self.config = restored["config"]
        # Only the heads (small): what the fingerprint reads, kept for when it is asked.
        self._heads = {k: v for k, v in restored["params"].items() if k.startswith("head_")}
        self.conv_impl, self.dtype = inference_settings(self.config["model"], conv_impl, dtype)
        self.convolutions = describe_convolutions(self.conv_impl, self.dtype, inference=fold_norms)
        model = build_model(self.config["model"], self.encoding.head_sizes(),
                            conv_impl=self.conv_impl, dtype=self.dtype, inference=True,
                            fold_norms=fold_norms)
        self.batch_size = self.global_batch_size(batch_size, self.mesh.size)
        variables = {"params": restored["params"], "batch_stats": restored["batch_stats"]}
        spec = self.spec
        # With oneDNN: every kernel folded with its BatchNorm and packed once, here.
        variables = prepare_inference(model, variables,
                                      (self.batch_size, spec.input_size, spec.input_size, 1))

        def forward(variables, images, scales, offsets):
            outputs, state = model.apply(variables, model_input(images, scales, offsets, spec),
                                         train=False, mutable=["intermediates"])
            # {"features": pooled [batch, width], "stage<n>": [batch, 2 x stage width]}
            return outputs, {name: value[0] for name, value in state["intermediates"].items()}

        batch = sharding_lib.batch_sharding(self.mesh)
        shape = (self.batch_size, spec.stored_size, spec.stored_size)
        abstract = (jax.ShapeDtypeStruct(shape, jnp.uint16, sharding=batch),
                    jax.ShapeDtypeStruct(shape[:1], jnp.float32, sharding=batch),
                    jax.ShapeDtypeStruct(shape[:1], jnp.float32, sharding=batch))
        replicated = sharding_lib.replicated(self.mesh)
        start = time.time()
        # Compiled once, ahead of time: a call of any other shape is an error, never a
        # silent recompilation.
        self._forward = jax.jit(forward, out_shardings=replicated).lower(
            variables, *abstract).compile()
        self.compile_s = time.time() - start
        self._variables = variables
        self._batch_sharding = batch

    @staticmethod
    def global_batch_size(batch_size: int, devices: int) -> int:
        """The compiled batch: `batch_size` rounded up to a multiple of the device count."""
        return -(-max(int(batch_size), 1) // devices) * devices

    @staticmethod
    def local_mesh():
        return sharding_lib.make_mesh({"data": -1}, devices=jax.local_devices())

    @classmethod
    def from_checkpoint(cls, workdir: str, step: str | int = "best", batch_size: int = 256,
                        conv_impl: str | None = None, dtype: str | None = None) -> "Predictor":
        """The checkpoint's model alone (never its optimizer state) on this process's devices."""
        mesh = cls.local_mesh()
        return cls(restore_model(workdir, mesh, step), mesh, batch_size, conv_impl, dtype)

    def __call__(self, images, scales, offsets) -> tuple[dict, Any]:
        """Host arrays of the full batch shape -> device (outputs per head, features: the
        pooled ones and each stage's texture statistics, by name), asynchronously."""
        arrays = [jax.device_put(x, self._batch_sharding) for x in (images, scales, offsets)]
        return self._forward(self._variables, *arrays)

    def encoding_sha256(self) -> str:
        return encoding_sha256(self.encoding)

    @functools.cached_property
    def fingerprint(self) -> str:
        """checkpoint_fingerprint of its parameters, computed where a fitted model asks."""
        return checkpoint_fingerprint(self._heads)


# --- batches --------------------------------------------------------------------------

def batches(source, units, skips_by_unit: dict, batch_size: int, stored_size: int
             ) -> Iterator[tuple]:
    """("batch", unit id, slices, images, scales, offsets) padded to batch_size, and
    ("end", unit id) after each unit's last batch."""
    for unit in units:
        skips = skips_by_unit.setdefault(unit.id, [])
        pending = []
        for record in source.read(unit, skips):
            pending.append(record)
            if len(pending) == batch_size:
                yield ("batch", unit.id, pending, *_stack(pending, batch_size, stored_size))
                pending = []
        if pending:
            yield ("batch", unit.id, pending, *_stack(pending, batch_size, stored_size))
        yield ("end", unit.id)


def _stack(slices, batch_size: int, size: int):
    images = np.zeros((batch_size, size, size), np.uint16)
    scales = np.ones(batch_size, np.float32)
    offsets = np.zeros(batch_size, np.float32)
    for i, s in enumerate(slices):
        images[i], scales[i], offsets[i] = s.image, s.scale, s.offset
    return images, scales, offsets


class Reader(threading.Thread):
    """Decodes batches ahead of the device in a thread of its own."""

    def __init__(self, iterator, depth: int = 4):
        super().__init__(daemon=True)
        self.iterator = iterator
        self.items: queue.Queue = queue.Queue(maxsize=depth)
        self._stopping = threading.Event()

    def run(self):
        try:
            for item in self.iterator:
                if not self._put(item):
                    return
            self._put(("done",))
        except BaseException as err:  # handed to the main thread
            self._put(("error", err))

    def _put(self, item) -> bool:
        while not self._stopping.is_set():
            try:
                self.items.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def stop(self) -> None:
        """Ends the thread after the item it is reading (the consumer has given up)."""
        self._stopping.set()
        self.join()
