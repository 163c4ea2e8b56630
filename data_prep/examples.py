"""Work items (one per slice), their JSON lines (the Beam path's work-items files), and the
functions that turn them into dataset examples (the slices of one file from one reading).

Kept free of TensorFlow so that worker processes start fast and Beam workers can run it.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import numpy as np

from iap_jax.core.iaps import IAP_NAMES
from iap_jax.io.dicom import DicomError, iter_prepared_frames


@dataclasses.dataclass(frozen=True)
class SliceItem:
    key: str  # unique, stable: the example key
    path: str  # absolute path of the file
    file_key: str  # the file's salted key (iap_jax.io.local_paths), for skip reports
    frame: int
    patient: str  # salted hash
    series: str  # salted hash
    phase: int
    slice_index: int
    num_slices: int
    iaps: tuple[tuple[int, str, float], ...]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> "SliceItem":
        """The item back from to_json (JSON turns the iaps tuples into lists)."""
        return cls(**{**fields, "iaps": tuple(tuple(iap) for iap in fields["iaps"])})


def series_line(items: list[SliceItem]) -> str:
    """One series' items as a line of a work-items file (NaN numbers stay NaN)."""
    return json.dumps([item.to_json() for item in items])


def items_of_line(line: str) -> list[SliceItem]:
    return [SliceItem.from_json(fields) for fields in json.loads(line)]


def label_record(iaps: tuple[tuple[int, str, float], ...]) -> dict[str, dict[str, Any]]:
    return {name: {"value": value, "number": np.float32(number), "state": np.int32(state)}
            for name, (state, value, number) in zip(IAP_NAMES, iaps)}


def make_examples(items: Sequence[SliceItem], image_size: int,
                  resize_mode: str) -> list[tuple[str, Any]]:
    """Slices of one file, read from one parse of it: (key, example dict) per item, or
    (key, DicomError) for a slice whose pixels cannot be decoded."""
    if len({item.path for item in items}) > 1:
        raise ValueError("make_examples takes the slices of one file")
    if not items:
        return []
    frames = iter_prepared_frames(items[0].path, [item.frame for item in items], image_size,
                                  resize_mode)
    return [(item.key, prepared if isinstance(prepared, DicomError) else _example(item, prepared))
            for item, prepared in zip(items, frames)]


def make_example(item: SliceItem, image_size: int, resize_mode: str) -> tuple[str, Any]:
    """(key, example dict) or (key, DicomError) when the pixels cannot be decoded."""
    return make_examples([item], image_size, resize_mode)[0]


def _example(item: SliceItem, prepared) -> dict[str, Any]:
    return {
        "image": prepared.image,
        "intensity_scale": np.float32(prepared.scale),
        "intensity_offset": np.float32(prepared.offset),
        "patient": item.patient,
        "series": item.series,
        "phase": np.int32(item.phase),
        "slice_index": np.int32(item.slice_index),
        "num_slices": np.int32(item.num_slices),
        "slice_position": np.float32(item.slice_index / max(item.num_slices - 1, 1)),
        "labels": label_record(item.iaps),
    }
