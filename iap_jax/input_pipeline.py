"""tf.data input over the prepared TFDS dataset, one share per process.

Training reads a split as a fixed number of logical shards (config.input.logical_shards,
contiguous ranges of the split, tfds.even_splits): the global batch of every step holds
batch_size / logical_shards consecutive rows from each shard, in shard order, and each
process reads whole shards (process p of P owns shards p*L/P .. (p+1)*L/P - 1) and
assembles their rows in the same order. The global batch is the concatenation of the
per-process batches (see sharding.global_batch), so it is a function of (seed, step)
alone: the same on any number of processes and devices, and a checkpoint resumes exactly
on another topology. Epoch e shuffles shard k with a seed drawn from (seed, e, k);
starting at global step s means starting epoch s // steps_per_epoch and skipping its first
s % steps_per_epoch batches. The shards share the shuffle buffer.

With config.input.cache, each process keeps its shards' decoded records in memory after
one read (when they fit), so later epochs read no files; the order is the same either way.
Evaluation order does not matter (metric sums): each process reads one even share.

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
from absl import logging
from etils import epath

from iap_jax import atomic
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
    # The global batch is split into this many logical shards: a multiple of every process
    # count the run may use, and a divisor of the global batch size.
    logical_shards: int = 16
    cache: bool = False  # keep decoded training records in memory after the first read

    @classmethod
    def from_config(cls, config) -> "InputConfig":
        exclude = tuple(sorted((name, tuple(values)) for name, values in
                               dict(config.get("exclude", {}) or {}).items()))
        return cls(image_size=int(config.image_size), normalisation=config.normalisation,
                   percentiles=tuple(config.percentiles), augment=bool(config.augment),
                   shuffle_buffer=int(config.shuffle_buffer), prefetch=int(config.prefetch),
                   threads=int(config.threads), exclude=exclude,
                   logical_shards=int(config.get("logical_shards", cls.logical_shards)),
                   cache=bool(config.get("cache", False)))


def load_builder(dataset_dir: str):
    if not epath.Path(dataset_dir).is_dir():
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
        path = epath.Path(dataset_dir) / name
        if path.exists():
            digest.update(path.read_bytes())
    return {"dataset_dir": atomic.absolute(dataset_dir), "sha256": digest.hexdigest(),
            "splits": {k: int(v.num_examples) for k, v in builder.info.splits.items()}}


# --- per-example transform ---------------------------------------------------------

def _raw_example(example: dict) -> dict:
    labels = {name: {key: example["labels"][name][key] for key in ("value", "number", "state")}
              for name in IAP_NAMES}
    return {"image": example["image"], "scale": example["intensity_scale"],
            "offset": example["intensity_offset"], "labels": labels}


# --- datasets ----------------------------------------------------------------------

class SplitReader:
    """One process's view of one split: its logical training shards and its share for
    evaluation."""

    def __init__(self, dataset_dir: str, split: str, cfg: InputConfig, *,
                 process_index: int = 0, process_count: int = 1):
        if cfg.normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {cfg.normalisation!r}; "
                             f"expected one of {NORMALISATIONS}")
        if cfg.logical_shards < 1 or cfg.logical_shards % process_count:
            raise ValueError(f"input.logical_shards={cfg.logical_shards} must be a positive "
                             f"multiple of the process count ({process_count})")
        self.builder = load_builder(dataset_dir)
        if split not in self.builder.info.splits:
            raise ValueError(f"{dataset_dir}: no split {split!r} "
                             f"(has {sorted(self.builder.info.splits)})")
        unknown = {name for name, _ in cfg.exclude} - set(IAP_NAMES)
        if unknown:
            raise ValueError(f"input.exclude names unknown IAPs {sorted(unknown)}")
        self.cfg = cfg
        self.split = split
        self.process_index, self.process_count = process_index, process_count
        self.process_split = tfds.even_splits(split, n=process_count)[process_index]
        self.shard_splits = tfds.even_splits(split, n=cfg.logical_shards)
        per_process = cfg.logical_shards // process_count
        self.owned_shards = tuple(range(process_index * per_process,
                                        (process_index + 1) * per_process))
        self._sizes: dict[str, tuple[int, ...]] = {}

    # Sizes count the kept examples (input.exclude), the same in every process; they are
    # read once, on first use (a pass over the labels when examples are excluded).
    def _split_sizes(self, name: str, splits) -> tuple[int, ...]:
        if name not in self._sizes:
            if self.cfg.exclude:
                self._sizes[name] = tuple(self._count_kept(s) for s in splits)
            else:
                self._sizes[name] = tuple(int(self.builder.info.splits[s].num_examples)
                                          for s in splits)
        return self._sizes[name]

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        return self._split_sizes("shards", self.shard_splits)

    @property
    def share_sizes(self) -> tuple[int, ...]:
        return self._split_sizes("shares", tfds.even_splits(self.split, n=self.process_count))

    @property
    def split_size(self) -> int:
        return sum(self.share_sizes)

    @property
    def min_process_examples(self) -> int:
        return min(self.share_sizes)

    @property
    def max_process_examples(self) -> int:
        return max(self.share_sizes)

    def _keep(self, example) -> tf.Tensor:
        keep = tf.constant(True)
        for name, values in self.cfg.exclude:
            value = example["labels"][name]["value"]
            for v in values:
                keep = tf.logical_and(keep, tf.not_equal(value, v))
        return keep

    def _count_kept(self, split) -> int:
        ds = self.builder.as_dataset(split=split, shuffle_files=False,
                                     decoders={"image": tfds.decode.SkipDecoding()})
        return int(ds.filter(self._keep).reduce(0, lambda n, _: n + 1).numpy())

    def records(self, split=None, decode: bool = True) -> tf.data.Dataset:
        """The kept records of `split` (default: this process's evaluation share); with
        decode=False the images stay encoded (decode_image decodes them)."""
        ds = self.builder.as_dataset(split=self.process_split if split is None else split,
                                     shuffle_files=False,
                                     read_config=tfds.ReadConfig(try_autocache=False),
                                     decoders=None if decode else {
                                         "image": tfds.decode.SkipDecoding()})
        if self.cfg.exclude:
            ds = ds.filter(self._keep)
        options = tf.data.Options()
        options.deterministic = True
        if self.cfg.threads:
            options.threading.private_threadpool_size = self.cfg.threads
        return ds.with_options(options)

    def shard_examples(self, shard: int, decode: bool = True) -> tf.data.Dataset:
        """Logical shard `shard`'s examples as the training step reads them."""
        return self.records(self.shard_splits[shard], decode).map(
            _raw_example, num_parallel_calls=tf.data.AUTOTUNE)

    def cached_shards(self) -> list[tf.data.Dataset]:
        """This process's shards from one in-memory cache of their decoded examples, filled
        by one sequential read of the contiguous range they make up (reading each shard
        on its own re-reads the start of a shared TFRecord file)."""
        stored = [int(self.builder.info.splits[s].num_examples) for s in self.shard_splits]
        start = sum(stored[:self.owned_shards[0]])
        stop = start + sum(stored[k] for k in self.owned_shards)
        union = self.records(f"{self.split}[{start}:{stop}]").map(
            _raw_example, num_parallel_calls=tf.data.AUTOTUNE).cache()
        union.reduce(0, lambda n, _: n + 1)  # the one read
        shards, offset = [], 0
        for k in self.owned_shards:
            shards.append(union.skip(offset).take(self.shard_sizes[k]))
            offset += self.shard_sizes[k]
        return shards

    def decode_image(self, example: dict) -> dict:
        """An example of shard_examples(decode=False) with its image decoded."""
        image = self.builder.info.features["image"].decode_example(example["image"])
        return {**example, "image": image}

    def cache_fits(self) -> bool:
        """Whether this process's shards, decoded, fit in half of the free memory."""
        stored = self.builder.info.features["image"].shape
        need = sum(self.shard_sizes[k] for k in self.owned_shards) * (
            int(np.prod(stored)) * 2 + 512)
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):  # not a POSIX memory report: trust the user
            return True
        if need > free / 2:
            logging.warning("input.cache: this process's %.1f GiB of decoded images do not fit "
                            "in half of the free %.1f GiB; reading the files every epoch",
                            need / 2**30, free / 2**30)
            return False
        return True


def _to_numpy_batch(batch: dict, encoding: LabelEncoding, valid: int | None = None) -> dict:
    targets, masks = encoding.encode(batch["labels"])
    if valid is not None:
        masks = {k: np.where(np.arange(len(m)) < valid, m, 0.0).astype(np.float32)
                 for k, m in masks.items()}
    return {"image": batch["image"], "scale": batch["scale"], "offset": batch["offset"],
            "targets": targets, "masks": masks}


def _shard_seed(seed: int, epoch: int, shard: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, shard]).generate_state(1)[0])


def rows_per_shard(reader: SplitReader, local_batch_size: int) -> int:
    """Rows each logical shard gives to every batch (the same in every process)."""
    shards = len(reader.owned_shards)
    if local_batch_size % shards:
        raise ValueError(
            f"the global batch does not split into input.logical_shards="
            f"{reader.cfg.logical_shards}: use a batch size divisible by it "
            f"(or fewer logical shards, in a new run)")
    return local_batch_size // shards


def train_batches(reader: SplitReader, encoding: LabelEncoding, local_batch_size: int, *,
                  seed: int, start_step: int = 0) -> Iterator[dict]:
    """Endless stream of this process's rows of the global batches from step start_step."""
    steps = steps_per_epoch(reader, local_batch_size)
    if steps == 0:
        raise ValueError(f"split has {sum(reader.shard_sizes)} examples: its smallest logical "
                         f"shard ({min(reader.shard_sizes)}) holds fewer than one batch's "
                         f"{rows_per_shard(reader, local_batch_size)} rows")
    cfg = reader.cfg
    rows = rows_per_shard(reader, local_batch_size)
    # Shards are shuffled encoded (a smaller buffer), then decoded in one parallel map after
    # they are merged; the cache holds decoded images, read once.
    cached = cfg.cache and reader.cache_fits()
    if cached:
        sources = reader.cached_shards()
    else:
        files = int(reader.builder.info.splits[reader.split].num_shards)
        if files < cfg.logical_shards:
            logging.warning(
                "input: %d logical shards over %d TFRecord files: a shard that starts inside a "
                "file reads that file from its start every epoch; use input.cache when the "
                "split fits in memory, or a dataset written in at least as many files",
                cfg.logical_shards, files)
        sources = [reader.shard_examples(k, decode=False) for k in reader.owned_shards]
    # Row r of a local batch comes from owned shard r // rows: shard 0's rows, then 1's...
    order = tf.data.Dataset.from_tensor_slices(
        np.repeat(np.arange(len(sources), dtype=np.int64), rows)).repeat()
    buffer = max(1, cfg.shuffle_buffer // cfg.logical_shards)
    epoch, skip = divmod(start_step, steps)
    while True:
        shards = [ds.shuffle(max(1, min(buffer, reader.shard_sizes[k])),
                             seed=_shard_seed(seed, epoch, k), reshuffle_each_iteration=False)
                  .take(steps * rows) for k, ds in zip(reader.owned_shards, sources)]
        ds = tf.data.Dataset.choose_from_datasets(shards, order, stop_on_empty_dataset=True)
        ds = ds.skip(skip * local_batch_size)
        if not cached:
            ds = ds.map(reader.decode_image, num_parallel_calls=tf.data.AUTOTUNE)
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
    """Steps of one epoch: the smallest logical shard's number of whole batch rows."""
    return min(reader.shard_sizes) // rows_per_shard(reader, local_batch_size)


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
