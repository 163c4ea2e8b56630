"""TensorBoard scalars without TensorFlow: Event protos (tensorboardX's copies of
TensorBoard's) framed as TFRecords (iap_jax.io.records), written through the storage layer.

A local file is appended to as events come. A bucket has no appends: the file is rewritten
whole at each flush (training flushes at log steps; an event file is small), through the
same atomic writes as every other output, so a bucket never holds half an event file.
"""
from __future__ import annotations

import os
import socket
import time

from tensorboardX.proto import event_pb2, summary_pb2

from iap_jax.io import records, storage


class EventLog:
    """One event file in `logdir`, named as TensorBoard expects."""

    def __init__(self, logdir: str):
        storage.makedirs(logdir)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self.remote = storage.is_remote(logdir)
        self._written = bytearray()  # a bucket's file so far
        self._pending = [records.frame(event_pb2.Event(
            wall_time=time.time(), file_version="brain.Event:2").SerializeToString())]

    def scalar(self, tag: str, value: float, step: int) -> None:
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
            tag=tag, simple_value=float(value))])
        self._pending.append(records.frame(event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary).SerializeToString()))

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending = []
        if self.remote:
            self._written += data
            storage.write_bytes_atomic(self.path, bytes(self._written))
        else:
            with open(self.path, "ab") as f:
                f.write(data)
