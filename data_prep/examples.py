"""Work items (one per slice), their JSON lines (the Beam path's work-items files), and the
function that turns one into a dataset example.

Kept free of TensorFlow so that worker processes start fast and Beam workers can run it.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from iap_jax.dicom import DicomError, read_prepared_frame
from iap_jax.iaps import IAP_NAMES


@dataclasses.dataclass(frozen=True)
class SliceItem:
    key: str  # unique, stable: the example key
    path: str  # absolute path of the file
    file_key: str  # the file's salted key (iap_jax.local_paths), for skip reports
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


def make_example(item: SliceItem, image_size: int, resize_mode: str) -> tuple[str, Any]:
    """(key, example dict) or (key, DicomError) when the pixels cannot be decoded."""
    try:
        prepared = read_prepared_frame(item.path, item.frame, image_size, resize_mode)
    except DicomError as err:
        return item.key, err
    example = {
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
    return item.key, example

