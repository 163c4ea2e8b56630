"""A tiny prepared dataset in the real record layout (iap_jax.io.dataset_info), for training tests.

The image shows its labels: the manufacturer decides which half is bright, the flip angle
the brightness of a central square, the echo time a stripe frequency; so a tiny model
can learn them in a few steps. ScanOptions is never present (a head with no labels), and
the contrast agent is sometimes ABSENT (a class of its own).
"""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import tensorflow_datasets as tfds

from data_prep.stats import compute_stats, write_stats
from data_prep.features import example_features

from iap_jax.core.iaps import IAP_NAMES, SPECS, LabelState

MANUFACTURERS = ("GE MEDICAL SYSTEMS", "SIEMENS")
FLIP_ANGLES = ("10", "12")
ECHO_TIMES = (1.8, 2.8)


def _example(rng: np.random.Generator, index: int, image_size: int) -> dict:
    maker, flip, echo = rng.integers(2), rng.integers(2), rng.integers(2)
    image = rng.uniform(0, 200, (image_size, image_size))
    half = image_size // 2
    if maker:
        image[:, half:] += 600
    else:
        image[:, :half] += 600
    q = image_size // 4
    image[q:3 * q, q:3 * q] += 300 + 500 * flip
    image[::2 + 2 * echo] += 400
    values = {
        "Manufacturer": MANUFACTURERS[maker],
        "ManufacturerModelName": ("SIGNA HDX", "AVANTO")[maker],
        "FlipAngle": FLIP_ANGLES[flip],
        "EchoTime": f"{ECHO_TIMES[echo]:g}",
        "RepetitionTime": f"{5.0 + echo:g}",
        "MagneticFieldStrength": "1.5",
    }
    labels = {}
    for name in IAP_NAMES:
        spec = SPECS[name]
        if name == "ContrastBolusAgent":
            absent = index % 3 == 0
            labels[name] = {"value": "" if absent else "GADAVIST",
                            "state": int(LabelState.ABSENT if absent else LabelState.PRESENT),
                            "number": math.nan}
        elif name in values:
            labels[name] = {"value": values[name], "state": int(LabelState.PRESENT),
                            "number": float(values[name]) if spec.numeric else math.nan}
        else:
            labels[name] = {"value": "", "state": int(LabelState.ABSENT), "number": math.nan}
    return {"image": image.astype(np.uint16), "intensity_scale": 1.0, "intensity_offset": 0.0,
            "patient": f"p{index}", "series": f"s{index}", "phase": 0, "slice_index": 0,
            "num_slices": 1, "slice_position": 0.0, "labels": labels}


def write_dataset(root: str, *, num_train: int = 64, num_validation: int = 32,
                  image_size: int = 32, seed: int = 0, edit=None,
                  image_encoding: str = "zlib") -> str:
    """Writes the dataset under root; returns its directory (for builder_from_directory).
    edit(split, index, example) may change an example before it is written."""
    rng = np.random.default_rng(seed)
    splits = {"train": [_example(rng, i, image_size) for i in range(num_train)],
              "validation": [_example(rng, i, image_size) for i in range(num_validation)]}
    if edit is not None:
        splits = {split: [edit(split, i, ex) for i, ex in enumerate(examples)]
                  for split, examples in splits.items()}
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name="iap_dataset", version="1.0.0", features=example_features(image_size, image_encoding),
        split_datasets={k: list(enumerate(v)) for k, v in splits.items()}, data_dir=root, disable_shuffling=True)
    dataset_dir = str(builder.data_dir)
    write_stats(dataset_dir, compute_stats(splits))  # the prep stage's own statistics
    return dataset_dir


@contextlib.contextmanager
def compilation_cache(directory: str):
    """Share compiled programs between the training runs of one test module (the same
    step compiled again for a resumed run is read back instead)."""
    import jax
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    previous = {name: getattr(jax.config, name) for name in names}
    jax.config.update(names[0], directory)
    jax.config.update(names[1], 0.0)
    try:
        yield
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)


def tiny_config(dataset_dir: str, **overrides):
    """The demo config shrunk by its runlocal switch (tiny model, 32 px), two epochs."""
    from configs import synthetic_cpu
    config = synthetic_cpu.get_config("runlocal")
    config.dataset_dir = dataset_dir
    config.num_epochs = 2
    config.progress_bar = False
    config.checkpoint.every_steps = 1000
    for key, value in overrides.items():
        config[key] = value
    return config
