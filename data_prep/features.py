"""The prep's record layout (iap_jax.io.dataset_info) as TFDS features, for writing the dataset.

Only the prep stage builds these (TensorFlow Datasets); training and prediction read the
records with iap_jax.io.records and the dataset's JSON files (iap_jax.io.dataset_info.DatasetInfo).
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from iap_jax.core.iaps import IAP_NAMES
from iap_jax.io.dataset_info import IMAGE_ENCODINGS

# IMAGE_ENCODINGS names -> TFDS encodings (features.json spells them "zlib" and "bytes").
_TFDS_ENCODINGS = {"zlib": tfds.features.Encoding.ZLIB, "none": tfds.features.Encoding.BYTES}


def label_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        name: tfds.features.FeaturesDict({
            "value": tfds.features.Text(),
            "number": np.float32,
            "state": np.int32,
        })
        for name in IAP_NAMES
    })


def example_features(image_size: int, image_encoding: str = "zlib") -> tfds.features.FeaturesDict:
    if image_encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"image encoding {image_encoding!r} is not one of {sorted(IMAGE_ENCODINGS)}")
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(image_size, image_size), dtype=np.uint16,
                                      encoding=_TFDS_ENCODINGS[image_encoding]),
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
