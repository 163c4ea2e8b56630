"""The TFDS builder: a DICOM archive (manual_dir) -> TFRecord shards labelled from headers.

Through this module:
    prepare(dicom_root, data_dir, phases="all", workers=2)        # returns the dataset dir
Through TFDS:
    tfds build data_prep/builder.py --manual_dir DICOM_ROOT --data_dir OUT [--config all_224]
    IapDataset(config=IapDatasetConfig(...), data_dir=OUT, workers=2).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=DICOM_ROOT))

Output, under <data_dir>/iap_dataset/<config>/<version>/ (the "dataset dir"):
TFRecord shards, dataset_info.json and features.json (TFDS), iap_stats.json (per-split
statistics of the examples written, iap_jax.io.dataset_info), prep_options.json (the options
below, which training copies into its checkpoints) and metadata.json (the same
statistics, skip counts, the archive fingerprint and the decode skips by salted file
hash). Nothing in it identifies a patient: identifiers are salted hashes and the salt is
never written there (iap_jax.io.salt: --salt, $IAP_PREP_SALT, or <data_dir>/prep_salt).
<data_dir>/prep_report.json lists every skipped file by its salted file key, and
<data_dir>/paths.local.json maps those keys to paths under the DICOM root (personal data:
archive paths often hold patients' names, IDs and UIDs; `--no-local-paths` leaves it out;
iap_jax.io.local_paths). Both stay outside the dataset dir, which can be shared as is.

A rerun into the same data dir reuses the dataset of the same config if the archive's
fingerprint (relative paths, sizes, mtimes) is unchanged; if the archive changed it
stops, naming both fingerprints, unless overwrite=True (`iap-prep --overwrite`, or
`tfds build --overwrite`) rebuilds it.

Many machines: with a Beam runner (`prepare(..., beam_runner="DirectRunner")`, or
`iap-prep --beam-runner`, or `tfds build ... --beam_pipeline_options=...`), header
discovery runs on the launching machine and pixel decoding, resizing and shard writing
run as a Beam pipeline. The launching machine writes the selected slices as work-items
files (JSON lines, a line per series) under <data_dir>/.beam_work.<config>/ and the
pipeline starts from their paths alone, so its graph stays small however large the
archive; the workers read the files and decode. The folder is removed when the build
ends (they name the input files, for the workers, as paths.local.json does). On a cluster
the DICOM root must be readable by every worker (a shared file system, or a gs:// bucket,
read in place) and the data dir readable and writable (that, or a gs:// bucket), and
the workers need this package installed:
    tfds build data_prep/builder.py --manual_dir /mnt/dicom --data_dir gs://bucket/tfds \
      --beam_pipeline_options="runner=DataflowRunner,project=P,region=R,\
temp_location=gs://bucket/tmp,setup_file=./setup.py,num_workers=32"
    (Flink: runner=FlinkRunner,flink_master=HOST:8081; Spark: runner=SparkRunner or
    PortableRunner,job_endpoint=HOST:8099; each with environment_type as the cluster needs.)
Skips found while decoding are a side output there, written as JSON lines under
<data_dir>/.beam_skips.<config>/ and merged into prep_report.json after the pipeline
(and Beam counters iap_prep/skipped_<reason>).

Kill-and-rerun: TFDS writes into a temporary sibling dir and renames it when complete;
a rerun removes temporaries left by a killed run and writes the same records in the same
order, because example keys derive from salted hashes and slice indices, and TFDS orders
examples by key (the shard bytes may differ: the serialisation order of a record's features
can vary between processes).
The report is completed before the rename, and the dataset's metadata keeps the decode
skips (by salted file hash), so a rerun that finds the report missing or from another
run rebuilds it. The options (prep_options.json) and statistics are written after the
shards (iap_stats.json last, atomically) and redone by a rerun if missing.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import os
from typing import Any, Iterable, Iterator, Sequence

import tensorflow_datasets as tfds
from etils import epath

from data_prep import report as report_lib
from data_prep.examples import SliceItem, items_of_line, make_examples, series_line
from data_prep.report import FileSkip
from data_prep.splits import SPLIT_NAMES, parse_split, split_of
from data_prep.stats import compute_stats, write_stats
from data_prep.features import example_features

from iap_jax.core.preprocess import RESIZE_MODES
from iap_jax.core.progress import Progress
from iap_jax.core.workers import worker_pool
from iap_jax.io import local_paths
from iap_jax.io.dataset_info import DATASET_NAME, IMAGE_ENCODINGS, PREP_OPTIONS_FILE, STATS_FILE
from iap_jax.io.dicom import DicomError, group_by_file
from iap_jax.io.salt import resolve_salt
from iap_jax.io.series import (Discovery, SeriesSelection, archive_fingerprint, discover, list_files,
                               parse_slices, select)
from iap_jax.io.storage import absolute, read_json, relative, write_json_atomic

REPORT_FILE = "prep_report.json"
SKIP_TAG = "skips"
# Series per work-items file of the Beam path: a few thousand slices per file, a few hundred
# files for the whole Duke archive.
WORK_SHARD_SERIES = 16


@dataclasses.dataclass(eq=False)
class IapDatasetConfig(tfds.core.BuilderConfig):
    """Everything that changes the written examples, except the salt (worker count does not)."""

    series_filter: str | None = None
    phases: str = "pre"
    image_size: int = 224
    slices: str = "all"
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    resize: str = "resize"
    image_encoding: str = "zlib"  # features.IMAGE_ENCODINGS

    def validate(self) -> None:
        SeriesSelection(self.series_filter, self.phases)
        parse_slices(self.slices)
        parse_split(self.split)
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize {self.resize!r} is not one of {RESIZE_MODES}")
        if self.image_encoding not in IMAGE_ENCODINGS:
            raise ValueError(f"image encoding {self.image_encoding!r} is not one of "
                             f"{sorted(IMAGE_ENCODINGS)}")
        if not 8 <= int(self.image_size) <= 4096:
            raise ValueError(f"image_size {self.image_size} outside 8..4096")


def make_config(*, series_filter=None, phases="pre", image_size=224, slices="all",
                split=(0.7, 0.15, 0.15), resize="resize", image_encoding="zlib") -> IapDatasetConfig:
    """A config named `<phases>_<size>`, plus a digest of the other options when not default.
    The salt is not an option here: nothing derived from it may name a dataset."""
    options = dict(series_filter=series_filter, phases=phases, image_size=int(image_size),
                   slices=slices, split=parse_split(split), resize=resize,
                   image_encoding=image_encoding)
    defaults = dict(series_filter=None, slices="all", split=(0.7, 0.15, 0.15), resize="resize",
                    image_encoding="zlib")
    name = f"{phases}_{int(image_size)}"
    if any(options[k] != v for k, v in defaults.items()):
        digest = hashlib.sha256(repr(sorted(options.items())).encode()).hexdigest()[:8]
        name = f"{name}_{digest}"
    config = IapDatasetConfig(name=name, description=f"iap-prep options: {options}", **options)
    config.validate()
    return config


@dataclasses.dataclass
class WorkPlan:
    items: dict[str, list[SliceItem]]  # slices to write, per split
    rejected: collections.Counter  # why series were left out
    used_files: list[str]  # files of the selected series
    no_patient_id: collections.Counter  # selected series without PatientID, by the key used
    file_notes: dict[str, str] = dataclasses.field(default_factory=dict)  # used files' notes, by key
    salt: str = ""
    paths: dict[str, str] = dataclasses.field(default_factory=dict)  # file key -> relative path

    def key(self, relative: str) -> str:
        """The salted key of a file under the DICOM root, remembered for paths.local.json."""
        key = local_paths.file_key(self.salt, relative)
        self.paths[key] = relative
        return key

    @property
    def slices_per_file(self) -> collections.Counter:
        return collections.Counter(i.file_key for items in self.items.values() for i in items)

    def notes(self) -> dict[str, Any]:
        notes: dict[str, Any] = {}
        if self.no_patient_id:
            notes["no_patient_id"] = {"series": sum(self.no_patient_id.values()),
                                      "keyed_by": dict(sorted(self.no_patient_id.items()))}
        if self.file_notes:
            notes["files"] = dict(self.file_notes)
        return notes


def _work_plan(discovery: Discovery, config: IapDatasetConfig, dicom_root: str, salt: str) -> WorkPlan:
    fractions = parse_split(config.split)
    kept, rejected = select(discovery, SeriesSelection(config.series_filter, config.phases),
                            config.slices, salt)
    plan = WorkPlan({name: [] for name in SPLIT_NAMES}, collections.Counter(rejected), [],
                    collections.Counter(), salt=salt)
    for chosen in kept:
        series = chosen.series
        plan.used_files.extend(series.files)
        plan.file_notes.update({plan.key(f): discovery.notes[f] for f in series.files
                                if f in discovery.notes})
        if series.patient_key_source != "patient_id":
            plan.no_patient_id[series.patient_key_source] += 1
        split = split_of(series.patient_id, salt, fractions)
        num_slices = len(series.slices)
        for index in chosen.indices:
            ref = series.slices[index]
            plan.items[split].append(SliceItem(
                key=f"{chosen.series_hash}_{index:05d}", path=ref.path,
                file_key=plan.key(relative(ref.path, dicom_root)), frame=ref.frame,
                patient=chosen.patient_hash, series=chosen.series_hash, phase=chosen.phase,
                slice_index=index, num_slices=num_slices, iaps=ref.iaps))
    return plan


def write_work_items(items: Sequence[SliceItem], folder: epath.Path, split: str,
                     series_per_shard: int | None = None) -> list[str]:
    """The split's slices as JSON-lines files (a line per series) for Beam workers to read,
    so that the pipeline graph holds only these paths, not every slice of the archive.
    Returns the paths, one per `series_per_shard` (default WORK_SHARD_SERIES) series."""
    series_per_shard = series_per_shard or WORK_SHARD_SERIES
    series = [list(group) for _, group in itertools.groupby(items, key=lambda i: i.series)]
    shards = [series[i:i + series_per_shard] for i in range(0, len(series), series_per_shard)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, shard in enumerate(shards):
        path = folder / f"{split}-{index:05d}-of-{len(shards):05d}.jsonl"
        path.write_text("".join(series_line(group) + "\n" for group in shard))
        paths.append(os.fspath(path))
    return paths


def read_work_items(path: str) -> Iterable[SliceItem]:
    """A work-items file's slices, read by a Beam worker."""
    with epath.Path(path).open() as f:
        for line in f:
            if line.strip():
                yield from items_of_line(line)


def read_work_files(path: str) -> Iterable[list[SliceItem]]:
    """A work-items file's slices grouped by file (a group per file of each series): what a
    Beam worker decodes from one reading of that file."""
    with epath.Path(path).open() as f:
        for line in f:
            if line.strip():
                items = items_of_line(line)
                for group in group_by_file([item.path for item in items], min_frames=len(items)):
                    yield [items[i] for i in group]


def _beam_examples(items: Sequence[SliceItem], image_size: int, resize_mode: str) -> Iterator[Any]:
    import apache_beam as beam

    for item, (key, result) in zip(items, make_examples(items, image_size, resize_mode)):
        if isinstance(result, DicomError):
            beam.metrics.Metrics.counter("iap_prep", f"skipped_{result.reason}").inc()
            yield beam.pvalue.TaggedOutput(SKIP_TAG, dataclasses.asdict(_decode_skip(item, result)))
            continue
        yield key, result


def _decode_skip(item: SliceItem, err: DicomError) -> FileSkip:
    """A slice whose pixels failed, by its file's key (the detail without the file's path)."""
    return FileSkip(item.file_key, err.reason, local_paths.scrub(err.detail, item.path))


def _counted_skips(skips: Sequence[FileSkip]) -> list[dict[str, Any]]:
    """Decode skips for the dataset's metadata: file key, reason, count (no detail)."""
    counts = collections.Counter((s.file, s.reason) for s in skips)
    return sorted(({"file": file, "reason": reason, "slices": n}
                   for (file, reason), n in counts.items()), key=lambda s: (s["file"], s["reason"]))


def remove_incomplete_dirs(dataset_dir) -> list[str]:
    """Temporary dirs that TFDS left beside dataset_dir when a run was killed."""
    dataset_dir = epath.Path(dataset_dir)
    parent = dataset_dir.parent
    if not parent.is_dir():
        return []
    removed = []
    for entry in sorted(parent.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("incomplete.") and entry.name.endswith(f"_{dataset_dir.name}"):
            entry.rmtree(missing_ok=True)
            removed.append(entry.name)
    return removed


class IapDataset(tfds.core.GeneratorBasedBuilder):
    """MR slices with their acquisition parameters (IAPs) read from the DICOM headers."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIG_CLASS = IapDatasetConfig
    BUILDER_CONFIGS = [
        IapDatasetConfig(name="pre_224", description="Pre-contrast fat-sat DCE series, 224x224."),
        IapDatasetConfig(name="all_224", phases="all", description="Every DCE phase, 224x224."),
    ]
    DEFAULT_CONFIG_NAME = "pre_224"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass the root folder of the DICOM archive (any layout) as manual_dir, e.g. the "
        "Duke-Breast-Cancer-MRI download from TCIA or the output of `iap-synth`.")

    def __init__(self, *, workers: int = 1, progress: bool = True, salt: str | None = None,
                 overwrite: bool = False, write_local_paths: bool = True, **kwargs):
        self._workers = max(1, int(workers))
        self._progress = progress
        self._given_salt = salt
        self._salt: str | None = None
        self._overwrite = overwrite
        self._write_local_paths = write_local_paths
        self._dicom_root: str | None = None
        self._use_beam = False
        self._report: dict[str, Any] | None = None
        self._plan: WorkPlan | None = None
        self._fingerprint: str | None = None
        self._decode_skips: list[FileSkip] = []
        super().__init__(**kwargs)
        assert DATASET_NAME == self.name, (DATASET_NAME, self.name)

    # TFDS prints a line before a build ("Downloading and preparing dataset Unknown size ...")
    # and one after it; the prep prints its own summary, the dataset's folder included.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=example_features(int(self.builder_config.image_size),
                                      self.builder_config.image_encoding),
            description=("MR slices labelled with the image acquisition parameters (IAPs) read "
                         "from their own DICOM headers; identifiers are salted hashes."),
            metadata=tfds.core.MetadataDict(),
        )

    def _resolve_salt(self) -> str:
        if self._salt is None:  # says where a generated salt is kept, even when quiet
            self._salt = resolve_salt(os.fspath(self._data_dir_root), self._given_salt)
        return self._salt

    def _plan_work(self, dicom_root: str) -> tuple[Discovery, WorkPlan]:
        found = discover(dicom_root, self._workers, progress=self._progress)
        self._dicom_root = dicom_root
        return found, _work_plan(found, self.builder_config, dicom_root, self._resolve_salt())

    def _new_report(self, found: Discovery, plan: WorkPlan) -> dict[str, Any]:
        return report_lib.new_report(found, report_lib.discovery_skips(found, plan.key), plan.rejected,
                                     plan.used_files, plan.items, self.builder_config.name,
                                     plan.notes())

    # --- generation ---------------------------------------------------------------

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config = self.builder_config
        config.validate()
        dicom_root = os.fspath(dl_manager.manual_dir)
        found, self._plan = self._plan_work(dicom_root)
        self._fingerprint = found.fingerprint
        items = self._plan.items
        self._report = self._new_report(found, self._plan)
        self._write_report()
        empty = [name for name in SPLIT_NAMES if not items[name]]
        if len(empty) == len(SPLIT_NAMES):
            raise ValueError(f"{dicom_root}: no slices selected from {found.num_files} files "
                             f"(series left out: {dict(self._plan.rejected)}; see {self._report_path()})")
        if self._use_beam:  # left by a killed run
            self._beam_skips_dir().rmtree(missing_ok=True)
            self._beam_work_dir().rmtree(missing_ok=True)
        return {name: self._generate_examples(items[name], name)
                for name in SPLIT_NAMES if items[name]}

    def _generate_examples(self, items: Sequence[SliceItem], split: str):
        config = self.builder_config
        if self._use_beam:
            return self._beam_transform(items, split)
        make = functools.partial(make_examples, image_size=int(config.image_size),
                                 resize_mode=config.resize)
        return self._generate_locally(items, make)

    def _beam_transform(self, items: Sequence[SliceItem], split: str):
        """Decoding as a Beam transform; failures go to a side output written as JSON lines.
        The pipeline is created from the paths of the split's work-items files and the
        workers read the slices from them: a graph holding every slice of an archive the
        size of Duke's is too large for a runner (Dataflow) to accept. The reshuffle spreads
        the files over the workers for decoding, each file's slices read from one parse."""
        import apache_beam as beam

        config = self.builder_config
        work_files = write_work_items(items, self._beam_work_dir(), split)
        skips_prefix = os.fspath(self._beam_skips_dir() / split)

        @beam.ptransform_fn
        def examples(pipeline):
            results = (pipeline
                       | "work_files" >> beam.Create(work_files)
                       | "read_items" >> beam.FlatMap(read_work_files)
                       | "spread" >> beam.Reshuffle()
                       | "decode" >> beam.FlatMap(_beam_examples, int(config.image_size),
                                                  config.resize).with_outputs(SKIP_TAG, main="examples"))
            _ = (results[SKIP_TAG]
                 | "skip_json" >> beam.Map(json.dumps, sort_keys=True)
                 | "write_skips" >> beam.io.WriteToText(skips_prefix, file_name_suffix=".jsonl"))
            return results.examples

        return examples()

    def _beam_skips_dir(self) -> epath.Path:
        return epath.Path(self._data_dir_root) / f".beam_skips.{self.builder_config.name}"

    def _beam_work_dir(self) -> epath.Path:
        """The work-items files of a Beam run (write_work_items), removed when it ends."""
        return epath.Path(self._data_dir_root) / f".beam_work.{self.builder_config.name}"

    def _collect_beam_skips(self) -> list[FileSkip]:
        folder = self._beam_skips_dir()
        if not folder.exists():
            return []
        skips = [FileSkip(**json.loads(line)) for path in sorted(folder.glob("*.jsonl"))
                 for line in path.read_text().splitlines() if line.strip()]
        folder.rmtree()
        return skips

    def _generate_locally(self, items: Sequence[SliceItem], make) -> Iterator[tuple[str, Any]]:
        """make: the examples of one file's slices. Each file is read once for all of its
        slices (a large one once per worker that decodes a part of them)."""
        meter = Progress("slices", len(items), unit="slices") if self._progress else None
        by_key = {item.key: item for item in items}
        groups = group_by_file([item.path for item in items], self._workers)
        jobs = [[items[i] for i in group] for group in groups]
        if self._workers > 1 and len(jobs) > 1:
            single = all(len(job) == 1 for job in jobs)  # classic files: four to a task
            with worker_pool(self._workers) as pool:
                results = pool.imap(make, jobs, chunksize=4 if single else 1)
                yield from self._collect(itertools.chain.from_iterable(results), by_key, meter)
        else:
            yield from self._collect(itertools.chain.from_iterable(map(make, jobs)), by_key, meter)
        if meter:
            meter.close()

    def _collect(self, results, by_key, meter):
        for key, result in results:
            if meter:
                meter.advance()
            if isinstance(result, DicomError):
                self._decode_skips.append(_decode_skip(by_key[key], result))
                continue
            yield key, result

    def _download_and_prepare(self, dl_manager, download_config=None) -> None:
        try:
            super()._download_and_prepare(dl_manager, download_config)
        finally:  # the pipeline has ended: its work-items files are no longer read
            if self._use_beam:
                self._beam_work_dir().rmtree(missing_ok=True)
        # Still inside TFDS's temporary dir, before the rename: the report is completed and
        # the metadata (which moves with the shards) keeps what a rerun needs to rebuild it.
        skips = self._decode_skips + self._collect_beam_skips()
        report_lib.finish_report(self._report, skips, self._plan.slices_per_file)
        self._write_report()
        self.info.metadata.update({"archive_fingerprint": self._fingerprint,
                                   "decode_skips": _counted_skips(skips)})

    # --- before: an existing dataset; after the shards: statistics, metadata, report --------

    def download_and_prepare(self, *, download_config: tfds.download.DownloadConfig | None = None,
                             **kwargs) -> None:
        download_config = download_config or tfds.download.DownloadConfig()
        self._use_beam = download_config.beam_runner is not None or download_config.beam_options is not None
        removed = remove_incomplete_dirs(os.fspath(self.data_dir))
        if removed:
            print(f"removed {len(removed)} incomplete dir(s) left by an interrupted run")
        dicom_root = download_config.manual_dir and os.fspath(download_config.manual_dir)
        if dicom_root and self.data_path.exists():
            self._check_existing(dicom_root, self._overwrite or
                                 download_config.download_mode.overwrite_dataset)
        super().download_and_prepare(download_config=download_config, **kwargs)
        dataset_dir = epath.Path(self.data_dir)
        report = self._load_report()
        if dicom_root and not self._report_is_current(report):
            print(f"rebuilding {self._report_path()} for {dataset_dir}")
            self._rebuild_report(dicom_root)
        options_path = dataset_dir / PREP_OPTIONS_FILE
        if not options_path.exists():
            write_json_atomic(options_path, self.options())
        stats_path = dataset_dir / STATS_FILE
        if not stats_path.exists():
            stats = self.compute_stats()
            report = self._load_report()
            counts = report["skipped_by_reason"] if self._report_is_current(report) else {}
            self.info.metadata.update({"iap_stats": stats, "skipped_by_reason": counts})
            self.info.metadata.save_metadata(dataset_dir)
            write_stats(dataset_dir, stats)
        if self._progress:
            print(report_lib.summary_table(read_json(stats_path), self._load_report()))
            print(f"dataset: {dataset_dir}\nreport:  {self._report_path()}")

    def options(self) -> dict[str, Any]:
        """The options of this dataset's config (features.PREP_OPTIONS_FILE)."""
        config = self.builder_config
        return {"series_filter": config.series_filter, "phases": config.phases,
                "slices": config.slices, "image_size": int(config.image_size),
                "resize": config.resize, "split": list(parse_split(config.split)),
                "image_encoding": config.image_encoding}

    def _check_existing(self, dicom_root: str, overwrite: bool) -> None:
        """Stops (or, with overwrite, removes the dataset) when the archive has changed."""
        stored = self.info.metadata.get("archive_fingerprint")
        current = archive_fingerprint(dicom_root, list_files(dicom_root))
        if stored == current:
            return
        dataset_dir = os.fspath(self.data_dir)
        if not overwrite:
            raise ValueError(
                f"{dataset_dir} was written from an archive with fingerprint {stored}, but "
                f"{dicom_root} now has fingerprint {current} (files added, removed or changed): "
                f"pass --overwrite (overwrite=True) to rebuild it, or use another data dir")
        print(f"archive changed (fingerprint {stored} -> {current}): rebuilding {dataset_dir}")
        self.data_path.rmtree()
        self.info.metadata.clear()

    def _report_is_current(self, report: dict[str, Any] | None) -> bool:
        return bool(report) and report.get("config") == self.builder_config.name and \
            report.get("archive_fingerprint") == self.info.metadata.get("archive_fingerprint")

    def _rebuild_report(self, dicom_root: str) -> None:
        """The report of the run that wrote the dataset: discovery again, and the decode skips
        from the metadata (file hashes matched against the selected files)."""
        found, self._plan = self._plan_work(dicom_root)
        per_file = self._plan.slices_per_file
        skips = [FileSkip(entry["file"], entry["reason"], "found by the run that wrote the dataset")
                 for entry in self.info.metadata.get("decode_skips", []) if entry["file"] in per_file
                 for _ in range(entry["slices"])]
        self._report = self._new_report(found, self._plan)
        report_lib.finish_report(self._report, skips, per_file)
        self._write_report()

    def compute_stats(self) -> dict[str, Any]:
        """Statistics of the examples as written, read back without decoding images."""
        decoders = {"image": tfds.decode.SkipDecoding()}
        by_split = {name: tfds.as_numpy(self.as_dataset(split=name, decoders=decoders))
                    for name in SPLIT_NAMES if name in self.info.splits}
        return compute_stats(by_split)

    def _report_path(self) -> epath.Path:
        return epath.Path(self._data_dir_root) / REPORT_FILE

    def _write_report(self) -> None:
        """The report, and paths.local.json for the files it names (unless disabled)."""
        self._report_path().parent.mkdir(parents=True, exist_ok=True)
        if self._write_local_paths and self._plan is not None:
            local_paths.write(os.fspath(self._data_dir_root), absolute(self._dicom_root),
                              report_lib.named_files(self._report, self._plan.paths))
        write_json_atomic(self._report_path(), self._report)

    def _load_report(self) -> dict[str, Any] | None:
        if self._report is not None:
            return self._report
        return report_lib.load_report(self._report_path())


def prepare(dicom_root: str, data_dir: str, *, series_filter: str | None = None, phases: str = "pre",
            image_size: int = 224, slices: str = "all",
            split: str | Sequence[float] = (0.7, 0.15, 0.15), salt: str | None = None,
            workers: int = 1, resize: str = "resize", image_encoding: str = "zlib",
            beam_runner: Any = None,
            beam_options: Any = None, overwrite: bool = False, progress: bool = True,
            write_local_paths: bool = True) -> str:
    """DICOM archive -> TFDS dataset; returns the dataset dir (for tfds.builder_from_directory).
    salt None: $IAP_PREP_SALT, else the data dir's kept salt (iap_jax.io.salt). beam_runner or
    beam_options (apache_beam PipelineOptions, e.g. the DirectRunner's direct_num_workers)
    prepare with Beam. write_local_paths False: no <data_dir>/paths.local.json."""
    if not epath.Path(dicom_root).is_dir():
        raise FileNotFoundError(f"{dicom_root}: DICOM root is not a directory")
    config = make_config(series_filter=series_filter, phases=phases, image_size=image_size,
                         slices=slices, split=split, resize=resize, image_encoding=image_encoding)
    # The predefined configs (for `tfds build --config`) must be passed by name.
    predefined = {c.name for c in IapDataset.BUILDER_CONFIGS}
    builder = IapDataset(config=config.name if config.name in predefined else config,
                         data_dir=data_dir, workers=workers, progress=progress, salt=salt,
                         overwrite=overwrite, write_local_paths=write_local_paths)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=dicom_root, beam_runner=beam_runner, beam_options=beam_options))
    return os.fspath(builder.data_dir)
