"""What the predictor reads: an input SPEC -> units of work, each yielding stored slices.

SPEC forms (`open_source`):
  a TFDS dataset dir made by iap-prep, with a split      every shard of that split
  a glob of TFRecord shards (or one shard file)           in the prep's record layout (dataset_info.py)
  a DICOM folder                                          discovered and selected by iap_jax.io.series,
                                                          decoded by iap_jax.io.dicom, as iap-prep does
  a folder or glob of PNG / NumPy (.npy) images           a folder of files is a series, a 3D .npy
                                                          [slices, rows, columns] is one

Every slice reaches the model as what the prep stage stores (preprocess.preprocess_slice: a
square uint16 image with its scale and offset), so a slice predicted from its DICOM file and
from its TFRecord is the same input. A unit is the resumable piece of work: one TFRecord
shard, or a chunk of whole series or image files. What cannot be read is recorded as a
skip (input, reason, detail, slices) and the rest goes on.

Every input may also be a URI (gs://...), read through etils.epath; a `**` glob is local
only. A DICOM folder in a bucket is listed by the launching process; each object is read,
whole, by the worker that reads its header, and again by the one that decodes its pixels
(one object per instance, as the NCI Imaging Data Commons keeps them, any names, no layout).
No name taken from the input leaves a source: every file (shard, DICOM file, image) is named
by its salted key (local_paths.file_key), in the units (so in plan.json), the slices and the
skips; `paths` maps the keys a source has named back to paths, for paths.local.json.
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import secrets
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from etils import epath

from iap_jax.core.iaps import IAP_NAMES
from iap_jax.core.preprocess import PixelSpec, preprocess_slice
from iap_jax.core.workers import worker_pool
from iap_jax.io import records
from iap_jax.io.dataset_info import DatasetInfo, image_feature
from iap_jax.io.dicom import DicomError, group_by_file, read_prepared_frames
from iap_jax.io.local_paths import file_key, scrub
from iap_jax.io.salt import salted_hash
from iap_jax.io.series import SeriesSelection, discover, list_files, select
from iap_jax.io.storage import files_under, is_remote, open_file, relative as relative_path

IMAGE_SUFFIXES = (".png", ".npy")
# The salt of a source's keys: a function asked once a key is needed, the salt, or None.
Salt = Callable[[], str] | str | None
# A unit of DICOM or image input holds whole series of at least this many slices.
UNIT_SLICES = 512


@dataclasses.dataclass
class StoredSlice:
    image: np.ndarray  # uint16 [S, S], as iap-prep stores it
    scale: float
    offset: float
    series_key: str
    slice_index: int
    file_key: str  # the salted key of the file or shard it came from
    frame: int = 0  # where in that file: the frame (or tile), the .npy plane, the record
    patient: str | None = None  # salted hash
    phase: int | None = None
    headers: Sequence[Sequence] | None = None  # (state, canonical value, number) per IAP_NAMES


@dataclasses.dataclass(frozen=True)
class Unit:
    id: str
    entries: tuple  # JSON-able; what a unit holds depends on the source kind


@dataclasses.dataclass
class Skip:
    file: str  # the salted key of the input file
    reason: str
    detail: str = ""
    slices: int = 1

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Source:
    """One input SPEC. `plan()` lists the units; `read(unit, skips)` yields its slices and
    appends what it could not read to skips. `salt` (asked for once, when a first key is
    needed; or the salt itself) keys the files, and the series of sources that have no keys
    of their own; None for keys that never leave this process (a random salt)."""

    kind = ""
    has_headers = False

    def __init__(self, root: str, spec: PixelSpec, salt: Salt):
        self.root = root
        self.spec = spec
        given = salt
        self._salt_of = (given if callable(given) else (lambda: given) if given is not None
                         else (lambda: secrets.token_hex(16)))
        self._salt: str | None = None
        self.paths: dict[str, str] = {}  # file key -> path relative to root, of files named
        self.plan_skips: list[Skip] = []  # found while planning (DICOM headers)
        self.notes: dict[str, Any] = {}

    @property
    def salt(self) -> str:
        if self._salt is None:
            self._salt = self._salt_of()
        return self._salt

    def plan(self) -> list[Unit]:
        raise NotImplementedError

    def read(self, unit: Unit, skips: list[Skip]) -> Iterator[StoredSlice]:
        raise NotImplementedError

    def expected_slices(self, units: Sequence[Unit]) -> int | None:
        """How many slices the units hold, where that is known before reading them."""
        return None

    def close(self) -> None:
        pass

    def _listing(self) -> list[str]:
        """Every input file, relative to the root (to find a key planned by another process)."""
        raise NotImplementedError

    def _relative(self, path: str) -> str:
        return relative_path(path, self.root)

    def key(self, relative: str) -> str:
        """The key of a file (relative to the root), remembered for `paths`."""
        key = file_key(self.salt, relative)
        self.paths[key] = relative
        return key

    def path(self, key: str) -> str:
        """The full path of a file planned under `key` (on any process)."""
        if key not in self.paths:
            for relative in self._listing():
                self.key(relative)
        if key not in self.paths:
            raise FileNotFoundError(f"{self.root}: no input file has key {key} (the input "
                                    f"changed since it was planned)")
        return os.path.join(self.root, self.paths[key])

    def skip(self, key: str, reason: str, detail: str = "", slices: int = 1) -> Skip:
        """A skip of the file `key`, its detail without the file's path."""
        relative = self.paths.get(key, "")
        names = (os.path.join(self.root, relative), relative) if relative else ()
        return Skip(key, reason, scrub(detail, *names), slices)


# --- TFRecord shards ----------------------------------------------------------------

class TfrecordSource(Source):
    kind = "tfrecord"
    has_headers = True

    def __init__(self, root: str, files: Sequence[str], spec: PixelSpec,
                 salt: Salt = None, counts: dict[str, int] | None = None):
        super().__init__(root, spec, salt)
        self.files = sorted(files)
        self.counts = counts or {}  # records per shard, by path relative to the root
        self._encoding: str | None = None

    def _listing(self) -> list[str]:
        return [self._relative(path) for path in self.files]

    def plan(self) -> list[Unit]:
        return [Unit(f"shard-{i:05d}", (self.key(relative),))
                for i, relative in enumerate(self._listing())]

    def expected_slices(self, units):
        counts = [self.counts.get(self.paths.get(u.entries[0], "")) for u in units]
        return None if any(c is None for c in counts) else sum(counts)

    def _image_encoding(self) -> str:
        """"zlib" or "none": from the features.json of the shards' folders (TFDS writes one
        beside every dataset), "zlib" where there is none; folders that disagree are refused."""
        if self._encoding is None:
            found = {}
            for folder in sorted({os.path.dirname(path) for path in self.files}):
                if (epath.Path(folder) / "features.json").exists():
                    found[folder] = image_feature(folder)[1]
            if len(set(found.values())) > 1:
                raise ValueError(f"{self.root}: shards of different image encodings {found}: "
                                 "predict each dataset on its own")
            self._encoding = next(iter(found.values()), "zlib")
        return self._encoding

    def read(self, unit: Unit, skips: list[Skip]) -> Iterator[StoredSlice]:
        """Every record of the shard in order. A record that fails its checksum or does not
        parse is skipped with its reason and the rest is read; after damage that hides
        where the next record starts, the rest of the shard is skipped."""
        key = unit.entries[0]
        path = self.path(key)
        size = self.spec.stored_size
        encoding = self._image_encoding()
        wrong: dict[int, int] = {}
        read = 0
        try:
            with open_file(path, "rb") as f:
                for item in records.iter_records(f, path):
                    read += 1
                    try:
                        if isinstance(item, records.CorruptRecordError):
                            raise item
                        example = records.decode_example(item)
                        image = records.decode_image(example.image_bytes, encoding, size)
                    except ValueError as err:
                        skips.append(self.skip(key, "corrupt_tfrecord",
                                               f"record {read - 1}: {_message(err, path)}"))
                        continue
                    if isinstance(image, int):
                        wrong[image] = wrong.get(image, 0) + 1
                        continue
                    headers = [(state, value.decode(), number)
                               for state, value, number in example.labels.values()]
                    yield StoredSlice(image, float(example.scale), float(example.offset),
                                      example.series, example.slice_index, key, read - 1,
                                      patient=example.patient, phase=example.phase,
                                      headers=headers)
        except (records.CorruptRecordError, OSError) as err:
            skips.append(self.skip(key, "corrupt_tfrecord",
                                   f"stopped after {max(read - 1, 0)} records: {_message(err, path)}",
                                   slices=0))
        for pixels, n in sorted(wrong.items()):
            side = math.isqrt(pixels)
            shape = f"{side}x{side}" if side * side == pixels else f"{pixels}-pixel"
            skips.append(self.skip(key, "wrong_image_shape",
                                   f"{shape} images; the checkpoint was trained on {size}x{size}",
                                   slices=n))


def _message(err: Exception, path: str) -> str:
    """An error's text without the path (the skip names the file by its key)."""
    text = str(getattr(err, "reason", None) or err).replace(path, "").lstrip(": ")
    return " ".join(text.split())[:200]


def tfds_source(dataset_dir: str, split: str | None, spec: PixelSpec,
                salt: Salt = None) -> TfrecordSource:
    info = DatasetInfo.load(dataset_dir)
    if not split:
        raise ValueError(f"{dataset_dir} is a TFDS dataset: pass --split (one of {sorted(info.splits)})")
    chosen = info.split(split)
    counts = {relative_path(f, dataset_dir): n for f, n in zip(chosen.files, chosen.shard_lengths)}
    return TfrecordSource(dataset_dir, list(chosen.files), spec, salt, counts)


# --- DICOM folders ------------------------------------------------------------------

def _decode_dicom(job: tuple[str, list[int], int, str]) -> list:
    """Worker: (path, frames, size, resize) -> a PreparedSlice or DicomError per frame, from
    one reading of the file."""
    path, frames, size, resize = job
    return read_prepared_frames(path, frames, size, resize)


class DicomSource(Source):
    """A DICOM folder, selected as the checkpoint's training data was (spec's series filter,
    phases and slices), keyed by the same salted hashes as iap-prep."""

    kind = "dicom"
    has_headers = True

    def __init__(self, root: str, spec: PixelSpec, salt: Salt, workers: int = 1,
                 progress: bool = True, listing: Sequence[str] | None = None):
        """listing: root's files (series.list_files) where the caller has listed them."""
        super().__init__(root, spec, salt)
        self.workers = max(1, int(workers))
        self.progress = progress
        self._files = None if listing is None else list(listing)
        self._pool = None

    def _listing(self) -> list[str]:
        if self._files is None:  # a bucket is listed once
            self._files = list_files(self.root)
        return self._files

    def plan(self) -> list[Unit]:
        found = discover(self.root, self.workers, progress=self.progress,
                         relative_paths=self._listing())
        self.plan_skips = [self.skip(*s.keyed(self.key)) for s in found.skips]
        kept, rejected = select(found, SeriesSelection(self.spec.series_filter, self.spec.phases),
                                self.spec.slices, self.salt)
        units, entries = [], []
        for chosen in kept:
            for index in chosen.indices:
                ref = chosen.series.slices[index]
                entries.append((self.key(self._relative(ref.path)), ref.frame, chosen.series_hash,
                                chosen.patient_hash, index, chosen.phase, [list(v) for v in ref.iaps]))
            if len(entries) >= UNIT_SLICES:
                units.append(Unit(f"dicom-{len(units):05d}", tuple(entries)))
                entries = []
        if entries:
            units.append(Unit(f"dicom-{len(units):05d}", tuple(entries)))
        used = {e[0] for unit in units for e in unit.entries}
        notes = {self.key(p): n for p, n in found.notes.items()}
        self.notes = {"files_found": found.num_files, "series_found": len(found.series),
                      "series_not_selected": dict(sorted(rejected.items())),
                      "archive_fingerprint": found.fingerprint,
                      "iap_origins": found.iap_origins,
                      "file_notes": {k: n for k, n in sorted(notes.items()) if k in used}}
        return units

    def expected_slices(self, units):
        return sum(len(u.entries) for u in units)

    def read(self, unit: Unit, skips: list[Skip]) -> Iterator[StoredSlice]:
        """The unit's slices in the order of its entries; each file is read once for all of
        its selected frames (a large one once per worker that reads a part of them)."""
        size, resize = self.spec.stored_size, self.spec.resize
        groups = group_by_file([e[0] for e in unit.entries], self.workers)
        jobs = [(self.path(unit.entries[group[0]][0]), [unit.entries[i][1] for i in group], size,
                 resize) for group in groups]
        if self.workers > 1:
            if self._pool is None:
                self._pool = worker_pool(self.workers)
            # Files of one frame (classic series) go four to a task, as single slices did.
            single = all(len(group) == 1 for group in groups)
            results = self._pool.imap(_decode_dicom, jobs, chunksize=4 if single else 1)
        else:
            results = map(_decode_dicom, jobs)
        done: dict[int, Any] = {}  # entry position -> result, until its turn comes
        pending = zip(groups, results)
        for position, entry in enumerate(unit.entries):
            while position not in done:
                group, prepared = next(pending)
                done.update(zip(group, prepared))
            result = done.pop(position)
            key, frame, series_key, patient, index, phase, iaps = entry
            if isinstance(result, DicomError):
                skips.append(self.skip(key, result.reason, result.detail))
                continue
            yield StoredSlice(result.image, result.scale, result.offset, series_key, index,
                              key, frame, patient=patient, phase=phase, headers=iaps)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None


# --- PNG / NumPy images ---------------------------------------------------------------

def _load_image(path: str) -> np.ndarray:
    """A PNG (8 or 16 bit grayscale) or .npy array as float32, from a local path or a URI;
    raises ValueError."""
    if is_remote(path):
        with open_file(path, "rb") as f:
            return _decode_image(f, path)
    return _decode_image(path, path)


def _decode_image(file, path: str) -> np.ndarray:
    if path.endswith(".npy"):
        array = np.load(file, allow_pickle=False)
        if array.dtype.kind not in "uif":
            raise ValueError(f"array of dtype {array.dtype}, not numbers")
        return array.astype(np.float32)
    from PIL import Image

    with Image.open(file) as image:
        if image.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
            raise ValueError(f"PNG mode {image.mode}, not grayscale")
        return np.asarray(image).astype(np.float32)


class ImageSource(Source):
    """PNG / .npy files: the files of one folder are the slices of one series (sorted by
    name), a 3D .npy is a series of its own; series keys are salted hashes of the folder or
    file's path relative to the root."""

    kind = "images"

    def __init__(self, root: str, files: Sequence[str], spec: PixelSpec, salt: Salt):
        super().__init__(root, spec, salt)
        self.files = sorted(files)

    def _listing(self) -> list[str]:
        return [self._relative(path) for path in self.files]

    def _series_key(self, relative: str) -> str:
        return salted_hash(self.salt, "series", relative)

    def plan(self) -> list[Unit]:
        index_in_folder: dict[str, int] = {}
        entries = []
        for relative in self._listing():
            folder = os.path.dirname(relative) or "."
            index = index_in_folder.get(folder, 0)
            index_in_folder[folder] = index + 1
            entries.append((self.key(relative), self._series_key(folder), index))
        return [Unit(f"images-{i // UNIT_SLICES:05d}", tuple(entries[i:i + UNIT_SLICES]))
                for i in range(0, len(entries), UNIT_SLICES)]

    def read(self, unit: Unit, skips: list[Skip]) -> Iterator[StoredSlice]:
        size, resize = self.spec.stored_size, self.spec.resize
        for key, series_key, index in unit.entries:
            path = self.path(key)
            try:
                array = _load_image(path)
                if array.ndim == 2:
                    planes = [(series_key, index, array)]
                elif array.ndim == 3 and path.endswith(".npy"):
                    volume = self._series_key(self.paths[key])
                    planes = [(volume, k, plane) for k, plane in enumerate(array)]
                else:
                    raise ValueError(f"array of shape {array.shape}, expected [rows, columns]"
                                     + (" or [slices, rows, columns]" if path.endswith(".npy") else ""))
                prepared = [(series, k, preprocess_slice(plane, size, resize)) for series, k, plane in planes]
            except (OSError, ValueError, EOFError) as err:
                reason = "wrong_image_shape" if "shape" in str(err) else "unreadable"
                skips.append(self.skip(key, reason, f"{type(err).__name__}: {err}"[:200]))
                continue
            for series, k, p in prepared:
                yield StoredSlice(p.image, p.scale, p.offset, series, k, key,
                                  k if len(prepared) > 1 else 0)


# --- SPEC -> source -------------------------------------------------------------------

def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


def _glob_root(pattern: str) -> str:
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    root = os.sep.join(fixed) or "."
    return root if epath.Path(root).is_dir() else os.path.dirname(root) or "."


def _glob(pattern: str) -> list[str]:
    """The files (not folders) a glob matches, sorted."""
    if not is_remote(pattern):
        return sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    if "**" in pattern:
        raise ValueError(f"{pattern}: `**` globs are for local paths only (each level of a "
                         f"bucket would be listed); spell the levels out with `*`")
    root = _glob_root(pattern)
    return sorted(os.fspath(p) for p in epath.Path(root).glob(relative_path(pattern, root))
                  if not p.is_dir())


def open_source(spec_text: str, pixel_spec: PixelSpec, *, split: str | None = None,
                salt: Salt = None, workers: int = 1,
                progress: bool = True) -> Source:
    """The source a SPEC names (a local path or a URI). `salt` is asked for once a key is
    needed (the file keys; DICOM and image series keys)."""
    path = spec_text.rstrip(os.sep) or os.sep
    where = epath.Path(path)
    kind = ("folder" if where.is_dir() else "file" if where.exists() else
            "glob" if glob.has_magic(path) else "")
    if kind == "folder":
        if epath.Path(path, "dataset_info.json").exists():
            return tfds_source(path, split, pixel_spec, salt)
        listing = files_under(path)
        files = [os.path.join(path, f) for f in listing if not os.path.basename(f).startswith(".")]
        if files and all(_is_image(f) for f in files):
            return ImageSource(path, files, pixel_spec, salt)
        return DicomSource(path, pixel_spec, salt, workers, progress, listing)
    if kind == "file":
        root = os.path.dirname(path) or "."
        if _is_image(path):
            return ImageSource(root, [path], pixel_spec, salt)
        return TfrecordSource(root, [path], pixel_spec, salt)
    if kind == "glob":
        files = _glob(path)
        if not files:
            raise FileNotFoundError(f"{spec_text}: no file matches")
        root = _glob_root(path)
        if all(_is_image(f) for f in files):
            return ImageSource(root, files, pixel_spec, salt)
        if any(_is_image(f) for f in files):
            raise ValueError(f"{spec_text}: matches both images and other files; "
                             f"give one kind of input")
        return TfrecordSource(root, files, pixel_spec, salt)
    raise FileNotFoundError(f"{spec_text}: no such file, folder or glob")
