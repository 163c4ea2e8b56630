"""The prepared dataset's record layout, shared by its writer (data_prep) and readers.

One example is one slice:
  image            uint16 [S, S], lossless; intensities = image * intensity_scale + intensity_offset
  intensity_scale, intensity_offset   float32
  patient, series  salted hashes (hex text); never raw identifiers
  phase            0 = pre-contrast, k = k-th post-contrast phase
  slice_index, num_slices, slice_position   position of the slice in its series
                   (slice_position = slice_index / max(num_slices - 1, 1), along the slice normal)
  labels/<IAP>/value   canonical spelling (iap_jax.iaps), "" unless PRESENT
  labels/<IAP>/number  float32, NaN unless PRESENT and numeric
  labels/<IAP>/state   int32 iap_jax.iaps.LabelState

The prep's options (series filter, phases, slice selection, stored size, resize mode,
split fractions) live beside the shards in PREP_OPTIONS_FILE (JSON): training copies them
into its checkpoints' pixel spec (iap_jax.preprocess.PixelSpec).

Split statistics live beside the shards in STATS_FILE (JSON), per split:
  {"num_examples", "num_series", "num_patients",
   "images_per_series": {count, min, max, mean}, "series_per_patient": {count, min, max, mean},
   "iaps": {<IAP>: {"states": {"ABSENT": n, "EMPTY": n, "PRESENT": n, "INVALID": n},
                    "value_counts": {<canonical value>: n},          # PRESENT values
                    "numeric": {count, min, max, mean, std, quantiles: {"0.01": x, ...},
                                log_mean, log_std}}}}     # numeric IAPs only
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from iap_jax.atomic import read_json
from iap_jax.iaps import IAP_NAMES

DATASET_NAME = "iap_dataset"
STATS_FILE = "iap_stats.json"
PREP_OPTIONS_FILE = "prep_options.json"
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def label_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        name: tfds.features.FeaturesDict({
            "value": tfds.features.Text(),
            "number": np.float32,
            "state": np.int32,
        })
        for name in IAP_NAMES
    })


# How iap-prep stores the uint16 image of a record (--image-encoding): zlib-compressed bytes
# (the default: smaller files) or the raw bytes (half the CPU per image to decode, more
# bytes; bench/input.py measures both). A reader tells them apart by the byte count.
IMAGE_ENCODINGS = {"zlib": tfds.features.Encoding.ZLIB, "none": tfds.features.Encoding.BYTES}


def example_features(image_size: int, image_encoding: str = "zlib") -> tfds.features.FeaturesDict:
    if image_encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"image encoding {image_encoding!r} is not one of {sorted(IMAGE_ENCODINGS)}")
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(image_size, image_size), dtype=np.uint16,
                                      encoding=IMAGE_ENCODINGS[image_encoding]),
        "intensity_scale": np.float32,
        "intensity_offset": np.float32,
        "patient": tfds.features.Text(),
        "series": tfds.features.Text(),
        "phase": np.int32,
        "slice_index": np.int32,
        "num_slices": np.int32,
        "slice_position": np.float32,
        "labels": label_features(),
    })


def load_iap_stats(dataset_dir: str) -> dict:
    """Per-split statistics of a prepared dataset (the directory holding its shards; local
    or a URI)."""
    path = os.path.join(os.fspath(dataset_dir), STATS_FILE)
    if not epath.Path(path).exists():
        raise FileNotFoundError(f"{path}: no split statistics; was this dataset made by iap-prep?")
    return read_json(path)


def load_prep_options(dataset_dir: str) -> dict | None:
    """The options iap-prep wrote this dataset with (None for a dataset made otherwise)."""
    path = os.path.join(os.fspath(dataset_dir), PREP_OPTIONS_FILE)
    if not epath.Path(path).exists():
        return None
    return read_json(path)
