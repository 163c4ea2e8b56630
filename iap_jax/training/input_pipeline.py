"""Training and evaluation input from the prepared dataset's TFRecord shards, one share per
process, without TensorFlow (iap_jax.io.records reads and checks the records; reader processes
or a reader thread make the batches ahead, iap_jax.training.reader_pool).

Training reads a split as a fixed number of logical shards (config.input.logical_shards,
contiguous ranges of the split's records): the global batch of every step holds
batch_size / logical_shards rows from each shard, in shard order, and each process reads
whole shards (process p of P owns shards p*L/P .. (p+1)*L/P - 1) and assembles their rows
in the same order. The global batch is the concatenation of the per-process batches (see
sharding.global_batch), so it is a function of (seed, step) alone: the same on any number
of processes and devices, and a checkpoint resumes exactly on another topology. Epoch e
visits shard k in a permutation drawn from (seed, e, k); step s is row block s % steps of
epoch s // steps, read directly (the records are located by byte offset), so a resumed run
reads nothing it skips.

With config.input.cache, each process keeps its shards' decoded rows (and their encoded
labels) in memory after one read, when they fit; batches are then gathered from memory.
Evaluation order does not matter (metric sums): each process reads one even share.

Batches hold the stored images as they are (uint16 [B, S, S]) with their intensity scale and
offset: the jitted steps turn them into the model's input with preprocess.model_input, the
one pixel path that evaluation and prediction use too (and training augments there).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import os
import threading
from typing import Iterator

import numpy as np
from absl import logging
from etils import epath

from iap_jax.core.iaps import IAP_NAMES
from iap_jax.core.labels import LabelEncoding
from iap_jax.core.preprocess import NORMALISATIONS, PixelSpec
from iap_jax.io import records
from iap_jax.io import storage
from iap_jax.io.dataset_info import STATS_FILE, DatasetInfo, load_iap_stats, load_prep_options
from iap_jax.training import reader_pool

@dataclasses.dataclass(frozen=True)
class InputConfig:
    """The input settings: the fields of a training config's `input` and their defaults
    (configs/default.py builds config.input from them, with the cache on for training)."""

    image_size: int = 0  # 0: the stored size
    normalisation: str = "max"
    percentiles: tuple[float, float] = (1.0, 99.0)
    augment: bool = False
    # Batches read ahead, per reader process where there are workers.
    prefetch: int = 2
    # Reader processes decoding records (0: one reader thread in the training process).
    workers: int = 0
    # Data selection: leave out every example whose header value of an IAP is one of these
    # canonical values, e.g. (("ManufacturerModelName", ("SKYRA",)),) holds a scanner out
    # (bench/ood.py); a config writes it {IAP: [values]}.
    exclude: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # The global batch is assembled from this many fixed logical shards of the split, so it
    # depends on (seed, step) only and a run resumes on any number of processes that divides
    # it: a multiple of every process count the run may use, and a divisor of the batch size.
    logical_shards: int = 16
    # Keep this process's decoded training rows in memory after one read (when they fit in
    # half the free memory; else the files are read every epoch, and it says so): far less
    # input CPU per image than decoding every epoch (bench/input.py).
    cache: bool = False

    @classmethod
    def config_fields(cls) -> dict:
        """The fields with their defaults, as a config holds them (exclude as a dict)."""
        fields = {field.name: field.default for field in dataclasses.fields(cls)}
        fields["exclude"] = dict(fields["exclude"])
        return fields

    @classmethod
    def from_config(cls, config) -> "InputConfig":
        """From a config's `input`: each field converted to its type, the default where the
        config lacks it (a config saved before the field existed)."""
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(config.keys()) - set(fields))
        if unknown:
            raise ValueError(f"config.input: no such input setting {', '.join(unknown)} "
                             f"(the settings: {', '.join(fields)})")
        values = {}
        for name, field in fields.items():
            value = config.get(name, field.default)
            if name == "exclude":
                value = tuple(sorted((iap, tuple(canonical))
                                     for iap, canonical in dict(value or {}).items()))
            elif isinstance(field.default, tuple):
                value = tuple(value)
            else:
                value = type(field.default)(value)
            values[name] = value
        return cls(**values)


def dataset_fingerprint(dataset_dir: str, info: DatasetInfo) -> dict:
    """What identifies a prepared dataset: split sizes and a hash of its metadata."""
    digest = hashlib.sha256()
    for name in ("dataset_info.json", "features.json", STATS_FILE):
        path = epath.Path(dataset_dir) / name
        if path.exists():
            digest.update(path.read_bytes())
    return {"dataset_dir": storage.absolute(dataset_dir), "sha256": digest.hexdigest(),
            "splits": {k: v.num_examples for k, v in info.splits.items()}}


def even_bounds(n: int, parts: int) -> np.ndarray:
    """Boundaries of `parts` contiguous ranges of n items whose sizes differ by at most one."""
    return np.asarray([(i * n) // parts for i in range(parts + 1)], np.int64)


# --- reading rows ----------------------------------------------------------------------

class RowReader:
    """Reads records of one split by position and decodes them into batch rows. Picklable
    (it travels to the reader processes); the open files are per process and thread (a
    bucket's file objects have a position that threads would share)."""

    def __init__(self, info: DatasetInfo, split: str):
        self.files = info.split(split).files
        self.starts = np.concatenate([[0], np.cumsum(info.split(split).shard_lengths)])
        self.size = info.image_size
        self.encoding = info.image_encoding
        self._index: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._open: dict[tuple[int, int], object] = {}

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}

    def _file(self, i: int):
        key = (threading.get_ident(), i)
        if key not in self._open:
            try:
                self._open[key] = storage.open_file(self.files[i], "rb")
            except OSError as err:
                raise FileNotFoundError(f"{self.files[i]}: cannot open shard ({err})") from err
        return self._open[key]

    def file_index(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, lengths) of file i's records, scanned once."""
        if i not in self._index:
            offsets, lengths = records.scan_offsets(self._file(i), self.files[i])
            expected = int(self.starts[i + 1] - self.starts[i])
            if len(offsets) != expected:
                raise ValueError(f"{self.files[i]}: {len(offsets)} records, the dataset's "
                                 f"metadata says {expected}")
            self._index[i] = (offsets, lengths)
        return self._index[i]

    def index_positions(self, positions: np.ndarray) -> None:
        """Scans the files holding these positions (so the index travels to the workers)."""
        for i in np.unique(np.searchsorted(self.starts, positions, side="right") - 1):
            self.file_index(int(i))

    def examples(self, i: int) -> Iterator[records.DecodedExample]:
        """Every record of file i, decoded, in order: one sequential read, which also
        indexes the file. Raises ValueError naming the file at a corrupt record."""
        path, offsets, lengths = self.files[i], [], []
        offset = 0
        with storage.open_file(path, "rb") as f:
            for item in records.iter_records(f, path):
                if isinstance(item, records.CorruptRecordError):
                    raise item
                try:
                    example = records.decode_example(item)
                except ValueError as err:
                    raise ValueError(f"{path}: record {len(offsets)}: {err}") from err
                offsets.append(offset)
                lengths.append(len(item))
                offset += len(item) + records.FRAMING_BYTES
                yield example
        self._index[i] = (np.asarray(offsets, np.int64), np.asarray(lengths, np.int64))

    def rows(self, positions: np.ndarray, out: np.ndarray | None = None) -> dict:
        """The decoded rows at these positions of the split, in order: image uint16
        [n, S, S] (written into out[:n] where given), scale, offset, and the raw labels
        (value / number / state per IAP)."""
        n = len(positions)
        images = np.empty((n, self.size, self.size), np.uint16) if out is None else out[:n]
        scale, offset = np.empty(n, np.float32), np.empty(n, np.float32)
        state = {name: np.empty(n, np.int32) for name in IAP_NAMES}
        number = {name: np.empty(n, np.float32) for name in IAP_NAMES}
        value = {name: np.empty(n, object) for name in IAP_NAMES}
        files = np.searchsorted(self.starts, positions, side="right") - 1
        for row, (position, i) in enumerate(zip(positions.tolist(), files.tolist())):
            index = position - int(self.starts[i])
            offsets, lengths = self.file_index(i)
            path = self.files[i]
            data = records.read_record_at(self._file(i), path, index, int(offsets[index]),
                                          int(lengths[index]))
            try:
                example = records.decode_example(data)
                image = records.decode_image(example.image_bytes, self.encoding, self.size)
            except ValueError as err:
                raise ValueError(f"{path}: record {index}: {err}") from err
            if isinstance(image, int):
                raise ValueError(f"{path}: record {index} holds an image of {image} pixels; "
                                 f"the dataset's images are {self.size}x{self.size}")
            images[row] = image
            scale[row], offset[row] = example.scale, example.offset
            for name, (s, v, x) in example.labels.items():
                state[name][row], value[name][row], number[name][row] = s, v, x
        labels = {name: {"value": value[name], "number": number[name], "state": state[name]}
                  for name in IAP_NAMES}
        return {"image": images, "scale": scale, "offset": offset, "labels": labels}


def split_examples(dataset_dir: str, split: str) -> Iterator[records.DecodedExample]:
    """Every record of a split, decoded (images left as stored), in order."""
    reader = RowReader(DatasetInfo.load(dataset_dir), split)
    for i in range(len(reader.files)):
        yield from reader.examples(i)


def _encoded(rows: dict, encoding: LabelEncoding, valid: int | None = None) -> dict:
    targets, masks = encoding.encode(rows["labels"])
    if valid is not None:
        masks = {k: np.where(np.arange(len(m)) < valid, m, 0.0).astype(np.float32)
                 for k, m in masks.items()}
    return {"image": rows["image"], "scale": rows["scale"], "offset": rows["offset"],
            "targets": targets, "masks": masks}


# --- one split ---------------------------------------------------------------------------

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
        self.info = DatasetInfo.load(dataset_dir)
        self.split_info = self.info.split(split)
        unknown = {name for name, _ in cfg.exclude} - set(IAP_NAMES)
        if unknown:
            raise ValueError(f"input.exclude names unknown IAPs {sorted(unknown)}")
        self.cfg = cfg
        self.split = split
        self.dataset_dir = dataset_dir
        self.process_index, self.process_count = process_index, process_count
        self.row_reader = RowReader(self.info, split)
        n = self.split_info.num_examples
        self.shard_bounds = even_bounds(n, cfg.logical_shards)
        self.share_bounds = even_bounds(n, process_count)
        per_process = cfg.logical_shards // process_count
        self.owned_shards = tuple(range(process_index * per_process,
                                        (process_index + 1) * per_process))

    @functools.cached_property
    def _kept(self) -> np.ndarray | None:
        """Which records of the split input.exclude keeps (None: all); one read of every
        file's labels, the same in every process."""
        if not self.cfg.exclude:
            return None
        keep = []
        for i in range(len(self.split_info.files)):
            for example in self.row_reader.examples(i):
                keep.append(all(example.labels[name][1].decode() not in values
                                for name, values in self.cfg.exclude))
        return np.asarray(keep, bool)

    def _positions(self, lo: int, hi: int) -> np.ndarray:
        positions = np.arange(lo, hi, dtype=np.int64)
        return positions if self._kept is None else positions[self._kept[lo:hi]]

    def shard_positions(self, shard: int) -> np.ndarray:
        return self._positions(int(self.shard_bounds[shard]), int(self.shard_bounds[shard + 1]))

    def share_positions(self, process: int | None = None) -> np.ndarray:
        p = self.process_index if process is None else process
        return self._positions(int(self.share_bounds[p]), int(self.share_bounds[p + 1]))

    # Sizes count the kept examples (input.exclude), the same in every process.
    @functools.cached_property
    def shard_sizes(self) -> tuple[int, ...]:
        return tuple(len(self.shard_positions(k)) for k in range(self.cfg.logical_shards))

    @functools.cached_property
    def share_sizes(self) -> tuple[int, ...]:
        return tuple(len(self.share_positions(p)) for p in range(self.process_count))

    @property
    def split_size(self) -> int:
        return sum(self.share_sizes)

    @property
    def min_process_examples(self) -> int:
        return min(self.share_sizes)

    @property
    def max_process_examples(self) -> int:
        return max(self.share_sizes)

    def cache_fits(self) -> bool:
        """Whether this process's shards, decoded, fit in half of the free memory."""
        need = sum(self.shard_sizes[k] for k in self.owned_shards) * (
            self.info.image_size ** 2 * 2 + 512)
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


# --- the streams ---------------------------------------------------------------------------

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


def steps_per_epoch(reader: SplitReader, local_batch_size: int) -> int:
    """Steps of one epoch: the smallest logical shard's number of whole batch rows."""
    return min(reader.shard_sizes) // rows_per_shard(reader, local_batch_size)


class _TrainRows:
    """step -> this process's rows of that step's global batch, as row numbers into the
    concatenation of its owned shards' kept records."""

    def __init__(self, sizes: list[int], rows: int, steps: int, seed: int, shards: tuple):
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.rows, self.steps, self.seed, self.shards = rows, steps, seed, shards
        self._epoch, self._orders = -1, []

    def __call__(self, step: int) -> np.ndarray:
        epoch, block = divmod(step, self.steps)
        if epoch != self._epoch:  # one permutation per shard and epoch
            self._orders = [np.random.default_rng(_shard_seed(self.seed, epoch, k)).permutation(
                int(self.starts[j + 1] - self.starts[j])) for j, k in enumerate(self.shards)]
            self._epoch = epoch
        picks = [self.starts[j] + order[block * self.rows:(block + 1) * self.rows]
                 for j, order in enumerate(self._orders)]
        return np.concatenate(picks)


class _Chunks:
    """chunk number -> its row numbers (chunks of `size` rows of n)."""

    def __init__(self, size: int, n: int):
        self.size, self.n = size, n

    def __call__(self, chunk: int) -> np.ndarray:
        return np.arange(chunk * self.size, min((chunk + 1) * self.size, self.n))


class _ReadBatch:
    """item -> an encoded batch read from the files, of the rows `rows(item)` (a step's
    or a chunk's); runs in the reader processes."""

    def __init__(self, reader: RowReader, positions: np.ndarray, encoding: LabelEncoding,
                 rows):
        self.reader, self.positions, self.encoding, self.rows = reader, positions, encoding, rows

    def __call__(self, item: int, out: np.ndarray | None = None) -> dict:
        return _encoded(self.reader.rows(self.positions[self.rows(item)], out), self.encoding)


class _GatherBatch:
    """Row numbers -> an encoded batch gathered from the in-memory cache."""

    def __init__(self, cache: dict, rows: _TrainRows):
        self.cache, self.rows = cache, rows

    def __call__(self, step: int) -> dict:
        picks = self.rows(step)
        return {key: ({k: v[picks] for k, v in value.items()} if isinstance(value, dict)
                      else value[picks]) for key, value in self.cache.items()}


def _made_ahead(read: _ReadBatch, items, cfg: InputConfig, rows: int, size: int) -> Iterator:
    """read(item) for each item, made ahead: in cfg.workers reader processes, or a thread."""
    if cfg.workers > 0:
        return reader_pool.in_processes(read, items, cfg.workers, (rows, size, size),
                                        cfg.workers * max(1, cfg.prefetch))
    return reader_pool.in_thread(read, items, cfg.prefetch)


def _fill_cache(reader: SplitReader, positions: np.ndarray, encoding: LabelEncoding,
                chunk: int = 256) -> dict:
    """Every owned row read once (by the reader processes), with its labels encoded."""
    read = _ReadBatch(reader.row_reader, positions, encoding, _Chunks(chunk, len(positions)))
    parts = list(_made_ahead(read, range(-(-len(positions) // chunk)), reader.cfg, chunk,
                             reader.info.image_size))

    def join(items):
        if isinstance(items[0], dict):
            return {k: join([item[k] for item in items]) for k in items[0]}
        return np.concatenate(items)
    return join(parts)


def train_batches(reader: SplitReader, encoding: LabelEncoding, local_batch_size: int, *,
                  seed: int, start_step: int = 0) -> Iterator[dict]:
    """Endless stream of this process's rows of the global batches from step start_step."""
    steps = steps_per_epoch(reader, local_batch_size)
    if steps == 0:
        raise ValueError(f"split has {sum(reader.shard_sizes)} examples: its smallest logical "
                         f"shard ({min(reader.shard_sizes)}) holds fewer than one batch's "
                         f"{rows_per_shard(reader, local_batch_size)} rows")
    owned = [reader.shard_positions(k) for k in reader.owned_shards]
    positions = np.concatenate(owned)
    rows = _TrainRows([len(p) for p in owned], rows_per_shard(reader, local_batch_size), steps,
                      seed, reader.owned_shards)
    reader.row_reader.index_positions(positions)
    steps_from_start = itertools.count(start_step)
    if reader.cfg.cache and reader.cache_fits():
        cache = _fill_cache(reader, positions, encoding)
        yield from reader_pool.in_thread(_GatherBatch(cache, rows), steps_from_start,
                                         reader.cfg.prefetch)
    else:
        yield from _made_ahead(_ReadBatch(reader.row_reader, positions, encoding, rows),
                               steps_from_start, reader.cfg, local_batch_size,
                               reader.info.image_size)


def eval_batches(reader: SplitReader, encoding: LabelEncoding, local_batch_size: int
                 ) -> Iterator[dict]:
    """One pass over this process's share in fixed-shape batches; padding rows (a copy of
    the share's first row, or of the split's where the share is empty) have zero masks.
    Every process yields the same number of batches."""
    num_batches = -(-reader.max_process_examples // local_batch_size)
    share = reader.share_positions()
    if not len(share):
        everything = reader._positions(0, reader.split_info.num_examples)
        if not len(everything):
            raise ValueError(f"{reader.dataset_dir}: split {reader.split!r} keeps no example")
        share = everything[:1]
        valid_rows = 0
    else:
        valid_rows = len(share)
    reader.row_reader.index_positions(share)

    def batch(b: int) -> dict:
        picks = np.arange(b * local_batch_size, (b + 1) * local_batch_size)
        valid = int(np.clip(valid_rows - b * local_batch_size, 0, local_batch_size))
        picks = np.where(picks < valid_rows, picks, 0)
        return _encoded(reader.row_reader.rows(share[picks]), encoding, valid)

    yield from reader_pool.in_thread(batch, range(num_batches), reader.cfg.prefetch)


def pixel_spec(reader: SplitReader) -> PixelSpec:
    """The pixel path of a run on this dataset: its stored size and prep options, and the
    run's input settings. A dataset not made by iap-prep counts as made with its defaults."""
    options = load_prep_options(reader.dataset_dir) or {}
    cfg = reader.cfg
    return PixelSpec(stored_size=reader.info.image_size, resize=options.get("resize", "resize"),
                     image_size=cfg.image_size, normalisation=cfg.normalisation,
                     percentiles=cfg.percentiles, series_filter=options.get("series_filter"),
                     phases=options.get("phases", "pre"), slices=options.get("slices", "all"))


def load_split_stats(dataset_dir: str, split: str = "train") -> dict:
    stats = load_iap_stats(dataset_dir)
    if split not in stats:
        raise ValueError(f"{dataset_dir}: no statistics for split {split!r} (has {sorted(stats)})")
    return stats[split]
