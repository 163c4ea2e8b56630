"""The prepared dataset's record layout and metadata, shared by its writer (data_prep) and
readers, which need no TensorFlow: iap_jax.io.records parses the records, DatasetInfo reads the
splits, shard files and image feature from the dataset's JSON files (dataset_info.json and
features.json, written by TFDS).

One example is one slice:
  image            uint16 [S, S], lossless; intensities = image * intensity_scale + intensity_offset
  intensity_scale, intensity_offset   float32
  patient, series  salted hashes (hex text); never raw identifiers
  phase            0 = pre-contrast, k = k-th post-contrast phase
  slice_index, num_slices, slice_position   position of the slice in its series
                   (slice_position = slice_index / max(num_slices - 1, 1), along the slice normal)
  labels/<IAP>/value   canonical spelling (iap_jax.core.iaps), "" unless PRESENT
  labels/<IAP>/number  float32, NaN unless PRESENT and numeric
  labels/<IAP>/state   int32 iap_jax.core.iaps.LabelState

The prep's options (series filter, phases, slice selection, stored size, resize mode,
split fractions) live beside the shards in PREP_OPTIONS_FILE (JSON): training copies them
into its checkpoints' pixel spec (iap_jax.core.preprocess.PixelSpec).

Split statistics live beside the shards in STATS_FILE (JSON), per split:
  {"num_examples", "num_series", "num_patients",
   "images_per_series": {count, min, max, mean}, "series_per_patient": {count, min, max, mean},
   "iaps": {<IAP>: {"states": {"ABSENT": n, "EMPTY": n, "PRESENT": n, "INVALID": n},
                    "value_counts": {<canonical value>: n},          # PRESENT values
                    "numeric": {count, min, max, mean, std, quantiles: {"0.01": x, ...},
                                log_mean, log_std}}}}     # numeric IAPs only
"""
from __future__ import annotations

import dataclasses
import os

from etils import epath

from iap_jax.io.storage import read_json

DATASET_NAME = "iap_dataset"
STATS_FILE = "iap_stats.json"
PREP_OPTIONS_FILE = "prep_options.json"
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)

# How iap-prep stores the uint16 image of a record (--image-encoding): zlib-compressed bytes
# (the default: smaller files) or the raw bytes (less CPU per image to decode, more bytes;
# bench/input.py measures both). features.json spells them "zlib" and "bytes".
IMAGE_ENCODINGS = ("zlib", "none")
_FEATURES_JSON_ENCODINGS = {"zlib": "zlib", "bytes": "none", "none": "none"}
# TFDS's default shard file names, for a dataset_info.json that names none.
_DEFAULT_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    name: str
    files: tuple[str, ...]  # the shard files, in order
    shard_lengths: tuple[int, ...]  # records per file

    @property
    def num_examples(self) -> int:
        return sum(self.shard_lengths)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a prepared dataset directory holds, from its JSON files."""
    directory: str
    splits: dict[str, SplitInfo]
    image_size: int
    image_encoding: str  # one of IMAGE_ENCODINGS

    @classmethod
    def load(cls, dataset_dir: str) -> "DatasetInfo":
        """Raises FileNotFoundError for a missing directory, ValueError (naming the file)
        for one that is not a prepared dataset."""
        root = os.fspath(dataset_dir).rstrip("/")
        if not epath.Path(root).is_dir():
            raise FileNotFoundError(f"{root}: no such dataset directory")
        info_path = os.path.join(root, "dataset_info.json")
        if not epath.Path(info_path).exists():
            raise ValueError(f"{root}: not a prepared dataset (no dataset_info.json)")
        try:
            info = read_json(info_path)
            file_format = info.get("fileFormat", "tfrecord")
            if file_format != "tfrecord":
                raise ValueError(f"records stored as {file_format!r}; only tfrecord is read")
            splits = {s["name"]: _split_info(root, info.get("name", DATASET_NAME), s)
                      for s in info.get("splits", [])}
            size, encoding = image_feature(root)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{info_path}: not a prepared dataset ({err})") from err
        return cls(root, splits, size, encoding)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ValueError(f"{self.directory}: no split {name!r} (has {sorted(self.splits)})")
        return self.splits[name]


def _split_info(root: str, dataset: str, split: dict) -> SplitInfo:
    lengths = tuple(int(n) for n in split.get("shardLengths", []))
    template = split.get("filepathTemplate")
    files = [os.path.join(root, shard_file_name(template, dataset, split["name"], index,
                                                len(lengths)))
             for index in range(len(lengths))]
    return SplitInfo(split["name"], tuple(files), lengths)


def shard_file_name(template: str | None, dataset: str, split: str, index: int,
                    count: int) -> str:
    """The name of shard `index` of `count` of a split, from dataset_info.json's template."""
    return (template or _DEFAULT_TEMPLATE).format(
        DATASET=dataset, SPLIT=split, FILEFORMAT="tfrecord", SHARD_INDEX=f"{index:05d}",
        NUM_SHARDS=f"{count:05d}", SHARD_X_OF_Y=f"{index:05d}-of-{count:05d}")


def image_feature(folder: str) -> tuple[int, str]:
    """(stored size, encoding) of the image feature the folder's features.json declares;
    (0, "zlib") where the folder has none (a bare glob of shards in the default layout)."""
    path = os.path.join(os.fspath(folder), "features.json")
    if not epath.Path(path).exists():
        return 0, "zlib"
    tensor = read_json(path)["featuresDict"]["features"]["image"]["tensor"]
    encoding = tensor.get("encoding", "none")
    if encoding not in _FEATURES_JSON_ENCODINGS:
        raise ValueError(f"{path}: image encoding {encoding!r} is not read")
    dimensions = [int(d) for d in tensor["shape"]["dimensions"]]
    if len(dimensions) != 2 or dimensions[0] != dimensions[1] or tensor["dtype"] != "uint16":
        raise ValueError(f"{path}: the image is {tensor['dtype']} {dimensions}, not square uint16")
    return dimensions[0], _FEATURES_JSON_ENCODINGS[encoding]


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
