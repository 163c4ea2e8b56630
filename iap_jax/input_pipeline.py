"""tf.data input over the prepared TFDS dataset, one share per process.

Each process reads its own slice of a split (tfds.even_splits), so the global batch is
the concatenation of the per-process batches (see sharding.global_batch).

Training order is a pure function of (seed, epoch): epoch e is the split shuffled with
seed (seed, e). Starting at global step s means starting epoch s // steps_per_epoch and
skipping the records of its first s % steps_per_epoch batches, so a resumed run sees
exactly the batches an uninterrupted run would have.

Batches hold the stored images as they are (uint16 [B, S, S]) with their intensity scale and
offset: the jitted steps turn them into the model's input with preprocess.model_input, the
one pixel path that evaluation and prediction use too (and training augments there).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from iap_jax.features import STATS_FILE, load_iap_stats, load_prep_options
from iap_jax.iaps import IAP_NAMES
from iap_jax.labels import LabelEncoding
from iap_jax.preprocess import NORMALISATIONS, PixelSpec

_tf_configured = False


def configure_tensorflow(threads: int = 0) -> None:
    """Keep TensorFlow off the accelerators (JAX owns them) and cap its thread pools."""
    global _tf_configured
    if _tf_configured:
        return
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):  # no such device type in this TF build
            pass
    if threads:
        try:
            tf.config.threading.set_inter_op_parallelism_threads(threads)
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError:  # the TF runtime already started; its pools are fixed now
            pass
    _tf_configured = True


@dataclasses.dataclass(frozen=True)
class InputConfig:
    image_size: int = 0  # 0: the stored size
    normalisation: str = "max"
    percentiles: tuple[float, float] = (1.0, 99.0)
    augment: bool = False
    shuffle_buffer: int = 10_000
    prefetch: int = 2
    threads: int = 0  # tf.data private thread pool (0: TF's default)
    # Data selection: leave out every example whose header value of an IAP is one of these
    # canonical values, e.g. (("ManufacturerModelName", ("SKYRA",)),) to hold a scanner out.
    exclude: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def from_config(cls, config) -> "InputConfig":
        exclude = tuple(sorted((name, tuple(values)) for name, values in
                               dict(config.get("exclude", {}) or {}).items()))
        return cls(image_size=int(config.image_size), normalisation=config.normalisation,
                   percentiles=tuple(config.percentiles), augment=bool(config.augment),
                   shuffle_buffer=int(config.shuffle_buffer), prefetch=int(config.prefetch),
                   threads=int(config.threads), exclude=exclude)


def load_builder(dataset_dir: str):
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"{dataset_dir}: no such dataset directory")
    try:
        return tfds.builder_from_directory(dataset_dir)
    except Exception as err:
        raise ValueError(f"{dataset_dir}: not a prepared TFDS dataset ({err})") from err


def dataset_fingerprint(dataset_dir: str, builder: tfds.core.DatasetBuilder) -> dict:
    """What identifies a prepared dataset (opened as `builder`): split sizes and a hash of
    its metadata."""
    digest = hashlib.sha256()
    for name in ("dataset_info.json", "features.json", STATS_FILE):
        path = os.path.join(dataset_dir, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                digest.update(f.read())
    return {"dataset_dir": os.path.abspath(dataset_dir), "sha256": digest.hexdigest(),
            "splits": {k: int(v.num_examples) for k, v in builder.info.splits.items()}}


# --- per-example transform ---------------------------------------------------------

def _raw_example(example: dict) -> dict:
    labels = {name: {key: example["labels"][name][key] for key in ("value", "number", "state")}
              for name in IAP_NAMES}
    return {"image": example["image"], "scale": example["intensity_scale"],
            "offset": example["intensity_offset"], "labels": labels}


# --- datasets ----------------------------------------------------------------------

class SplitReader:
    """One process's share of one split."""

    def __init__(self, dataset_dir: str, split: str, cfg: InputConfig, *,
                 process_index: int = 0, process_count: int = 1):
        if cfg.normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {cfg.normalisation!r}; "
                             f"expected one of {NORMALISATIONS}")
        self.builder = load_builder(dataset_dir)
        if split not in self.builder.info.splits:
            raise ValueError(f"{dataset_dir}: no split {split!r} "
                             f"(has {sorted(self.builder.info.splits)})")
        unknown = {name for name, _ in cfg.exclude} - set(IAP_NAMES)
        if unknown:
            raise ValueError(f"input.exclude names unknown IAPs {sorted(unknown)}")
        self.cfg = cfg
        self.process_split = tfds.even_splits(split, n=process_count)[process_index]
        self.split_size = int(self.builder.info.splits[split].num_examples)
        # Every process runs the same number of steps: plan with the smallest share.
        self.min_process_examples = self.split_size // process_count
        self.max_process_examples = -(-self.split_size // process_count)
        if cfg.exclude:  # every process counts every share's kept examples alike
            shares = [self._count_kept(s) for s in tfds.even_splits(split, n=process_count)]
            self.split_size = sum(shares)
            self.min_process_examples, self.max_process_examples = min(shares), max(shares)

    def _keep(self, example) -> tf.Tensor:
        keep = tf.constant(True)
        for name, values in self.cfg.exclude:
            value = example["labels"][name]["value"]
            for v in values:
                keep = tf.logical_and(keep, tf.not_equal(value, v))
        return keep

    def _count_kept(self, split: str) -> int:
        ds = self.builder.as_dataset(split=split, shuffle_files=False,
                                     decoders={"image": tfds.decode.SkipDecoding()})
        return int(ds.filter(self._keep).reduce(0, lambda n, _: n + 1).numpy())

    def records(self) -> tf.data.Dataset:
        ds = self.builder.as_dataset(split=self.process_split, shuffle_files=False,
                                     read_config=tfds.ReadConfig(try_autocache=False))
        if self.cfg.exclude:
            ds = ds.filter(self._keep)
        options = tf.data.Options()
        options.deterministic = True
        if self.cfg.threads:
            options.threading.private_threadpool_size = self.cfg.threads
        return ds.with_options(options)


def _to_numpy_batch(batch: dict, encoding: LabelEncoding, valid: int | None = None) -> dict:
    targets, masks = encoding.encode(batch["labels"])
    if valid is not None:
        masks = {k: np.where(np.arange(len(m)) < valid, m, 0.0).astype(np.float32)
                 for k, m in masks.items()}
    return {"image": batch["image"], "scale": batch["scale"], "offset": batch["offset"],
            "targets": targets, "masks": masks}


def train_batches(reader: SplitReader, encoding: LabelEncoding, local_batch_size: int, *,
                  seed: int, start_step: int = 0) -> Iterator[dict]:
    """Endless stream of local training batches starting at global step start_step."""
    steps_per_epoch = reader.min_process_examples // local_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"split has {reader.split_size} examples: fewer than one batch of "
                         f"{local_batch_size} per process")
    cfg = reader.cfg
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        ds = reader.records().shuffle(min(cfg.shuffle_buffer, reader.max_process_examples),
                                      seed=seed * 100_003 + epoch, reshuffle_each_iteration=False)
        ds = ds.take(steps_per_epoch * local_batch_size).skip(skip * local_batch_size)
        ds = ds.map(_raw_example, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(cfg.prefetch)
        for batch in tfds.as_numpy(ds):
            yield _to_numpy_batch(batch, encoding)
        epoch, skip = epoch + 1, 0


def eval_batches(reader: SplitReader, encoding: LabelEncoding, local_batch_size: int
                 ) -> Iterator[dict]:
    """One pass over the split in fixed-shape batches; padding rows have zero masks.
    Every process yields the same number of batches."""
    num_batches = -(-reader.max_process_examples // local_batch_size)
    ds = reader.records().map(_raw_example, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch_size).prefetch(reader.cfg.prefetch)
    produced = 0
    template = None
    for batch in tfds.as_numpy(ds):
        valid = len(batch["image"])
        padded = _pad(batch, local_batch_size)
        template = padded
        produced += 1
        yield _to_numpy_batch(padded, encoding, valid)
    while produced < num_batches:
        if template is None:
            raise ValueError("cannot build an empty evaluation batch without one example")
        produced += 1
        yield _to_numpy_batch(template, encoding, 0)


def steps_per_epoch(reader: SplitReader, local_batch_size: int) -> int:
    return reader.min_process_examples // local_batch_size


def _pad(batch, size: int):
    def pad(x):
        x = np.asarray(x)
        if len(x) == size:
            return x
        return np.concatenate([x, np.repeat(x[:1], size - len(x), axis=0)])
    return jax.tree.map(pad, batch)


def pixel_spec(reader: SplitReader) -> PixelSpec:
    """The pixel path of a run on this dataset: its stored size and prep options, and the
    run's input settings. A dataset not made by iap-prep counts as made with its defaults."""
    stored_size = int(reader.builder.info.features["image"].shape[0])
    options = load_prep_options(os.fspath(reader.builder.data_dir)) or {}
    cfg = reader.cfg
    return PixelSpec(stored_size=stored_size, resize=options.get("resize", "resize"),
                     image_size=cfg.image_size, normalisation=cfg.normalisation,
                     percentiles=cfg.percentiles, series_filter=options.get("series_filter"),
                     phases=options.get("phases", "pre"), slices=options.get("slices", "all"))


def load_split_stats(dataset_dir: str, split: str = "train") -> dict:
    stats = load_iap_stats(dataset_dir)
    if split not in stats:
        raise ValueError(f"{dataset_dir}: no statistics for split {split!r} (has {sorted(stats)})")
    return stats[split]
