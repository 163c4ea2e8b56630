"""The TFDS builder: a DICOM archive (manual_dir) -> TFRecord shards labelled from headers.

Through this module:
    prepare(dicom_root, data_dir, phases="all", workers=2)        # returns the dataset dir
Through TFDS:
    tfds build data_prep/builder.py --manual_dir DICOM_ROOT --data_dir OUT [--config all_224]
    IapDataset(config=IapDatasetConfig(...), data_dir=OUT, workers=2).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=DICOM_ROOT))

Output, under <data_dir>/iap_dataset/<config>/<version>/ (the "dataset dir"):
TFRecord shards, dataset_info.json and features.json (TFDS), iap_stats.json (per-split
statistics of the examples written, iap_jax.features) and metadata.json (the same
statistics plus skip counts). Nothing in it identifies a patient: identifiers are salted
hashes and the salt is never written. <data_dir>/prep_report.json lists every skipped
file by its path under the DICOM root: a local diagnostic (archive paths often contain
patient IDs), kept outside the dataset dir so the dataset dir can be shared as is.

Many machines: with a Beam runner (`prepare(..., beam_runner="DirectRunner")`, or
`iap-prep --beam-runner`, or `tfds build ... --beam_pipeline_options=...`), header
discovery runs on the launching machine and pixel decoding, resizing and shard writing
run as a Beam pipeline. On a cluster the DICOM root and data dir must be readable and
writable by every worker (a shared file system or a gcsfuse mount), and the workers need
this package installed:
    tfds build data_prep/builder.py --manual_dir /mnt/dicom --data_dir gs://bucket/tfds \
      --beam_pipeline_options="runner=DataflowRunner,project=P,region=R,\
temp_location=gs://bucket/tmp,setup_file=./setup.py,num_workers=32"
    (Flink: runner=FlinkRunner,flink_master=HOST:8081; Spark: runner=SparkRunner or
    PortableRunner,job_endpoint=HOST:8099; each with environment_type as the cluster needs.)
Skips found while decoding are Beam counters there (iap_prep/skipped_<reason>), not
report entries.

Kill-and-rerun: TFDS writes into a temporary sibling dir and renames it when complete;
a rerun removes temporaries left by a killed run and makes the same shards, because
example keys derive from salted hashes and slice indices, and TFDS orders examples by key.
Statistics are written after the shards (iap_stats.json last, atomically) and redone by
a rerun if missing.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
import shutil
from typing import Any, Iterator, Sequence

import tensorflow_datasets as tfds

from data_prep import report as report_lib
from data_prep.discovery import Discovery, Skip, discover
from data_prep.examples import SliceItem, make_example
from data_prep.progress import Progress
from data_prep.selection import SeriesSelection, parse_slices, phase_of, select_slices
from data_prep.splits import SPLIT_NAMES, parse_split, salted_hash, split_of
from data_prep.stats import compute_stats, write_json_atomic, write_stats
from data_prep.workers import worker_pool
from iap_jax.dicom import DicomError
from iap_jax.features import DATASET_NAME, STATS_FILE, example_features
from iap_jax.preprocess import RESIZE_MODES

REPORT_FILE = "prep_report.json"
DEFAULT_SALT = "iap-jax"


@dataclasses.dataclass(eq=False)
class IapDatasetConfig(tfds.core.BuilderConfig):
    """Everything that changes the written examples (worker count does not)."""

    series_filter: str | None = None
    phases: str = "pre"
    image_size: int = 224
    slices: str = "all"
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    salt: str = dataclasses.field(default=DEFAULT_SALT, repr=False)  # never logged
    resize: str = "resize"

    def validate(self) -> None:
        SeriesSelection(self.series_filter, self.phases)
        parse_slices(self.slices)
        parse_split(self.split)
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize {self.resize!r} is not one of {RESIZE_MODES}")
        if not 8 <= int(self.image_size) <= 4096:
            raise ValueError(f"image_size {self.image_size} outside 8..4096")


def make_config(*, series_filter=None, phases="pre", image_size=224, slices="all",
                split=(0.7, 0.15, 0.15), salt=DEFAULT_SALT, resize="resize") -> IapDatasetConfig:
    """A config named `<phases>_<size>`, plus a digest of the other options when not default."""
    options = dict(series_filter=series_filter, phases=phases, image_size=int(image_size),
                   slices=slices, split=parse_split(split), salt=salt, resize=resize)
    defaults = dict(series_filter=None, slices="all", split=(0.7, 0.15, 0.15),
                    salt=DEFAULT_SALT, resize="resize")
    name = f"{phases}_{int(image_size)}"
    if any(options[k] != v for k, v in defaults.items()):
        digest = hashlib.sha256(repr(sorted(options.items())).encode()).hexdigest()[:8]
        name = f"{name}_{digest}"
    public = {k: v for k, v in options.items() if k != "salt"}
    config = IapDatasetConfig(name=name, description=f"iap-prep options (salt not shown): {public}",
                              **options)
    config.validate()
    return config


def _work_items(discovery: Discovery, config: IapDatasetConfig, dicom_root: str
                ) -> tuple[dict[str, list[SliceItem]], collections.Counter, list[str]]:
    """Slices to write per split, reasons series were left out, files of selected series."""
    selection = SeriesSelection(config.series_filter, config.phases)
    fractions = parse_split(config.split)
    items: dict[str, list[SliceItem]] = {name: [] for name in SPLIT_NAMES}
    rejected: collections.Counter = collections.Counter()
    used_files: list[str] = []
    for series in discovery.series:
        reason = selection.rejection(series)
        if reason:
            rejected[reason] += 1
            continue
        used_files.extend(series.files)
        patient = salted_hash(config.salt, "patient", series.patient_id)
        series_hash = salted_hash(config.salt, "series", series.key)
        split = split_of(series.patient_id, config.salt, fractions)
        num_slices = len(series.slices)
        for index in select_slices(num_slices, config.slices):
            ref = series.slices[index]
            items[split].append(SliceItem(
                key=f"{series_hash}_{index:05d}", path=ref.path,
                relative_path=os.path.relpath(ref.path, dicom_root), frame=ref.frame,
                patient=patient, series=series_hash, phase=phase_of(series),
                slice_index=index, num_slices=num_slices, iaps=ref.iaps))
    return items, rejected, used_files


def _beam_examples(item: SliceItem, image_size: int, resize_mode: str) -> Iterator[tuple[str, Any]]:
    import apache_beam as beam

    key, result = make_example(item, image_size, resize_mode)
    if isinstance(result, DicomError):
        beam.metrics.Metrics.counter("iap_prep", f"skipped_{result.reason}").inc()
        return
    yield key, result


def remove_incomplete_dirs(dataset_dir: str) -> list[str]:
    """Temporary dirs that TFDS left beside dataset_dir when a run was killed."""
    parent, name = os.path.split(os.path.normpath(dataset_dir))
    if not os.path.isdir(parent):
        return []
    removed = []
    for entry in sorted(os.listdir(parent)):
        if entry.startswith("incomplete.") and entry.endswith(f"_{name}"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(entry)
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

    def __init__(self, *, workers: int = 1, progress: bool = True, **kwargs):
        self._workers = max(1, int(workers))
        self._progress = progress
        self._use_beam = False
        self._report: dict[str, Any] | None = None
        self._decode_skips: list[Skip] = []
        super().__init__(**kwargs)
        assert DATASET_NAME == self.name, (DATASET_NAME, self.name)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=example_features(int(self.builder_config.image_size)),
            description=("MR slices labelled with the image acquisition parameters (IAPs) read "
                         "from their own DICOM headers; identifiers are salted hashes."),
            metadata=tfds.core.MetadataDict(),
        )

    # --- generation ---------------------------------------------------------------

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config = self.builder_config
        config.validate()
        dicom_root = os.fspath(dl_manager.manual_dir)
        found = discover(dicom_root, self._workers, progress=self._progress)
        items, rejected, used_files = _work_items(found, config, dicom_root)
        self._report = report_lib.new_report(found, rejected, used_files, items, config.name)
        self._write_report()
        empty = [name for name in SPLIT_NAMES if not items[name]]
        if len(empty) == len(SPLIT_NAMES):
            raise ValueError(f"{dicom_root}: no slices selected from {found.num_files} files "
                             f"(series left out: {dict(rejected)}; see {self._report_path()})")
        return {name: self._generate_examples(items[name]) for name in SPLIT_NAMES if items[name]}

    def _generate_examples(self, items: Sequence[SliceItem]):
        config = self.builder_config
        make = functools.partial(make_example, image_size=int(config.image_size),
                                 resize_mode=config.resize)
        if self._use_beam:
            import apache_beam as beam

            return (beam.Create(list(items))
                    | beam.FlatMap(_beam_examples, int(config.image_size), config.resize))
        return self._generate_locally(items, make)

    def _generate_locally(self, items: Sequence[SliceItem], make) -> Iterator[tuple[str, Any]]:
        meter = Progress("slices", len(items), unit="slices") if self._progress else None
        paths = {item.key: item.relative_path for item in items}
        if self._workers > 1 and len(items) > 1:
            with worker_pool(self._workers) as pool:
                yield from self._collect(pool.imap(make, items, chunksize=4), paths, meter)
        else:
            yield from self._collect(map(make, items), paths, meter)
        if meter:
            meter.close()

    def _collect(self, results, paths, meter):
        for key, result in results:
            if meter:
                meter.advance()
            if isinstance(result, DicomError):
                self._decode_skips.append(Skip(paths[key], result.reason, result.detail))
                continue
            yield key, result

    # --- after the shards: statistics, metadata, report ------------------------------

    def download_and_prepare(self, *, download_config: tfds.download.DownloadConfig | None = None,
                             **kwargs) -> None:
        download_config = download_config or tfds.download.DownloadConfig()
        self._use_beam = download_config.beam_runner is not None or download_config.beam_options is not None
        removed = remove_incomplete_dirs(os.fspath(self.data_dir))
        if removed:
            print(f"removed {len(removed)} incomplete dir(s) left by an interrupted run")
        super().download_and_prepare(download_config=download_config, **kwargs)
        dataset_dir = os.fspath(self.data_dir)
        if self._report is not None:
            report_lib.finish_report(self._report, self._decode_skips)
            self._write_report()
        stats_path = os.path.join(dataset_dir, STATS_FILE)
        if not os.path.exists(stats_path):
            stats = self.compute_stats()
            counts = self._report["skipped_by_reason"] if self._report else {}
            self.info.metadata.update({"iap_stats": stats, "skipped_by_reason": counts})
            self.info.metadata.save_metadata(dataset_dir)
            write_stats(dataset_dir, stats)
        if self._progress:
            print(report_lib.summary_table(report_lib.load_stats(dataset_dir), self._load_report()))
            print(f"dataset: {dataset_dir}\nreport:  {self._report_path()}")

    def compute_stats(self) -> dict[str, Any]:
        """Statistics of the examples as written, read back without decoding images."""
        decoders = {"image": tfds.decode.SkipDecoding()}
        by_split = {name: tfds.as_numpy(self.as_dataset(split=name, decoders=decoders))
                    for name in SPLIT_NAMES if name in self.info.splits}
        return compute_stats(by_split)

    def _report_path(self) -> str:
        return os.path.join(os.fspath(self._data_dir_root), REPORT_FILE)

    def _write_report(self) -> None:
        os.makedirs(os.path.dirname(self._report_path()), exist_ok=True)
        write_json_atomic(self._report_path(), self._report)

    def _load_report(self) -> dict[str, Any] | None:
        if self._report is not None:
            return self._report
        return report_lib.load_report(self._report_path())


def prepare(dicom_root: str, data_dir: str, *, series_filter: str | None = None, phases: str = "pre",
            image_size: int = 224, slices: str = "all",
            split: str | Sequence[float] = (0.7, 0.15, 0.15), salt: str = DEFAULT_SALT,
            workers: int = 1, resize: str = "resize", beam_runner: Any = None,
            progress: bool = True) -> str:
    """DICOM archive -> TFDS dataset; returns the dataset dir (for tfds.builder_from_directory)."""
    if not os.path.isdir(dicom_root):
        raise FileNotFoundError(f"{dicom_root}: DICOM root is not a directory")
    config = make_config(series_filter=series_filter, phases=phases, image_size=image_size,
                         slices=slices, split=split, salt=salt, resize=resize)
    # The predefined configs (for `tfds build --config`) must be passed by name.
    predefined = {c.name for c in IapDataset.BUILDER_CONFIGS}
    builder = IapDataset(config=config.name if config.name in predefined else config,
                         data_dir=data_dir, workers=workers, progress=progress)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=dicom_root, beam_runner=beam_runner))
    return os.fspath(builder.data_dir)
