"""Synthetic series written as Enhanced MR multi-frame files: the same slices as the classic
files (pixels, IAPs, order) through discovery, selection and decoding, and each file read
once for all of its frames by the predictor's DICOM source and by the prep builder."""
import gzip
import math
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.uid import EnhancedMRImageStorage

from data_prep.synthetic import cli, cohort
from data_prep.synthetic.dicom_writer import ENHANCED_FILE

from iap_jax.core.iaps import extract_iaps
from iap_jax.core.preprocess import PixelSpec
from iap_jax.io import dicom
from iap_jax.io.series import discover
from iap_jax.io.sources import DicomSource

SEED = 5
SLICES = 6


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("enhanced")
    classic, enhanced = root / "classic", root / "enhanced"
    cohort.generate_cohort(classic, patients=2, seed=SEED, phases="all", slices=SLICES)
    cohort.generate_cohort(enhanced, patients=2, seed=SEED, phases="all", slices=SLICES,
                           enhanced=1.0)
    return classic, enhanced


def _labels(iaps) -> list:
    """IAPs as comparable tuples: (state, canonical value, number or None for NaN)."""
    values = iaps.values() if isinstance(iaps, dict) else iaps
    rows = [(v.state, v.value, v.number) if hasattr(v, "state") else tuple(v) for v in values]
    return [(int(state), value, None if math.isnan(number) else number)
            for state, value, number in rows]


def _by_uid(found):
    return {s.series_uid: s for s in found.series}


def test_enhanced_series_are_one_multiframe_file_each(cohorts):
    classic, enhanced = cohorts
    series_dirs = {p.parent for p in classic.rglob("*.dcm")}
    assert series_dirs and {p.parent for p in enhanced.rglob("*.dcm")} == {
        enhanced / d.relative_to(classic) for d in series_dirs}
    for folder in series_dirs:
        files = sorted(folder.glob("*.dcm"))
        multi = sorted((enhanced / folder.relative_to(classic)).glob("*.dcm"))
        assert [p.name for p in multi] == [ENHANCED_FILE]
        ds = pydicom.dcmread(multi[0])
        assert ds.SOPClassUID == EnhancedMRImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert int(ds.NumberOfFrames) == len(files) == SLICES
        for keyword in ("RepetitionTime", "EchoTime", "FlipAngle", "PixelSpacing", "AcquisitionMatrix",
                        "ImagePositionPatient"):  # in the functional groups, as scanners write them
            assert keyword not in ds
        # The header IAPs of every frame read as those of its classic file.
        for frame, path in enumerate(files):
            assert _labels(extract_iaps(ds, frame)) == _labels(extract_iaps(pydicom.dcmread(path), 0))
        stored = ds.pixel_array
        for frame, path in enumerate(files):
            np.testing.assert_array_equal(stored[frame], pydicom.dcmread(path).pixel_array)


def test_enhanced_and_classic_give_the_same_slices(cohorts):
    classic, enhanced = cohorts
    found_classic, found_enhanced = (_by_uid(discover(str(c), progress=False)) for c in cohorts)
    assert found_classic.keys() == found_enhanced.keys() and found_classic
    for uid, series in found_classic.items():
        multi = found_enhanced[uid]
        assert (multi.description, multi.temporal_position, multi.patient_id, multi.rows) == (
            series.description, series.temporal_position, series.patient_id, series.rows)
        assert len(multi.files) == 1 and len(multi.slices) == len(series.slices) == SLICES
        assert [_labels(r.iaps) for r in multi.slices] == [_labels(r.iaps) for r in series.slices]
        assert [r.frame for r in multi.slices] == list(range(SLICES))  # ordered as the classic files
        pixels = list(dicom.iter_frames(multi.slices[0].path, [r.frame for r in multi.slices]))
        for ref, frame in zip(series.slices, pixels):
            np.testing.assert_array_equal(frame, dicom.read_frame(ref.path, ref.frame))
    # The predictor's input: the same stored slices, keys and order.
    spec = PixelSpec(stored_size=32, phases="all")
    read = []
    for root in cohorts:
        source = DicomSource(str(root), spec, salt=lambda: "s", progress=False)
        read.append([s for unit in source.plan() for s in source.read(unit, [])])
    assert len(read[0]) == len(read[1]) > 0
    for a, b in zip(*read):
        assert (a.series_key, a.slice_index) == (b.series_key, b.slice_index)
        assert _labels(a.headers) == _labels(b.headers)
        np.testing.assert_array_equal(a.image, b.image)
        assert (a.scale, a.offset) == (b.scale, b.offset)


def test_a_share_of_series_is_written_enhanced(tmp_path):
    out = tmp_path / "mixed"
    rows = cohort.generate_cohort(out, patients=2, seed=SEED, phases="all", slices=2, enhanced=0.5)
    counts = [len(list((out / r["series_dir"]).glob("*.dcm"))) for r in rows]
    assert 1 in counts and 2 in counts  # some series multi-frame, some a file per slice
    assert cli.parse_args(["--out", "x", "--enhanced", "0.25"]).enhanced == 0.25
    with pytest.raises(SystemExit):
        cli.parse_args(["--out", "x", "--enhanced", "2"])
    with pytest.raises(ValueError, match="other settings"):  # rerun with another share
        cohort.generate_cohort(out, patients=2, seed=SEED, phases="all", slices=2)


class _CountingReads:
    """pydicom.dcmread wrapped to count the parses of each file (pydicom's own decoding
    through a path would parse the file again, outside dcmread: counted as well)."""

    def __init__(self, monkeypatch):
        self.parses: dict[str, int] = {}
        read, decode = pydicom.dcmread, dicom.pixel_array

        def counting_read(source, *args, **kwargs):
            self._count(source)
            return read(source, *args, **kwargs)

        def counting_decode(source, *args, **kwargs):
            if not isinstance(source, pydicom.Dataset):
                self._count(source)
            return decode(source, *args, **kwargs)

        monkeypatch.setattr(pydicom, "dcmread", counting_read)
        monkeypatch.setattr(dicom, "pixel_array", counting_decode)

    def _count(self, source):
        key = str(getattr(source, "name", source))
        self.parses[key] = self.parses.get(key, 0) + 1


def _multiframe_file(tmp_path, frames: int = 12, compress: bool = False) -> str:
    """emri_small.dcm's frames repeated to `frames`, as one Enhanced MR file (optionally .gz)."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    stored = ds.pixel_array
    ds.PixelData = np.concatenate([stored] * (frames // len(stored) + 1))[:frames].tobytes()
    ds.NumberOfFrames = frames
    path = tmp_path / "multi.dcm"
    ds.save_as(path)
    if compress:
        gz = tmp_path / "multi.dcm.gz"
        gz.write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
        path = gz
    return str(path)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_every_frame_of_a_file_from_one_parse(tmp_path, monkeypatch, compress):
    path = _multiframe_file(tmp_path, 12, compress)
    expected = [dicom.read_frame(path, k) for k in range(12)]
    frames = [7, 0, 3, 11, 1]
    counter = _CountingReads(monkeypatch)
    decompressed = []
    original = gzip.decompress
    monkeypatch.setattr(gzip, "decompress", lambda data: decompressed.append(1) or original(data))
    prepared = dicom.read_prepared_frames(path, frames, 16, "resize")
    assert sum(counter.parses.values()) == 1
    assert len(decompressed) == (1 if compress else 0)  # a gzip file is decompressed once
    for frame, result in zip(frames, prepared):
        np.testing.assert_array_equal(
            result.image, dicom.preprocess_slice(expected[frame], 16, "resize").image)


def test_a_failing_frame_leaves_the_others(tmp_path):
    path = _multiframe_file(tmp_path, 4)
    results = dicom.read_prepared_frames(path, [0, 9, 2], 16, "resize")  # no frame 9
    assert isinstance(results[1], dicom.DicomError) and results[1].reason == "undecodable"
    assert [isinstance(r, dicom.DicomError) for r in results] == [False, True, False]
    missing = dicom.read_prepared_frames(str(tmp_path / "absent.dcm"), [0, 1], 16, "resize")
    assert [r.reason for r in missing] == ["unreadable", "unreadable"]


def _enhanced_series(cohorts, tmp_path):
    """One enhanced series of the cohort alone, and its number of frames."""
    from iap_jax.io.series import SeriesSelection, select

    _, enhanced = cohorts
    kept, _ = select(discover(str(enhanced), progress=False), SeriesSelection(phases="all"), "all", "s")
    path = enhanced / kept[0].series.files[0]
    root = tmp_path / "one"
    target = root / path.relative_to(enhanced)
    target.parent.mkdir(parents=True)
    shutil.copy(path, target)
    return root, str(target)


@pytest.mark.parametrize("workers", [1, 2])
def test_predictor_reads_a_multiframe_file_once(cohorts, tmp_path, monkeypatch, workers):
    root, path = _enhanced_series(cohorts, tmp_path)
    source = DicomSource(str(root), PixelSpec(stored_size=16, phases="all"), salt=lambda: "s",
                         workers=workers, progress=False)
    units = source.plan()
    counter = _CountingReads(monkeypatch)
    try:
        slices = [s for unit in units for s in source.read(unit, [])]
    finally:
        source.close()
    assert [s.slice_index for s in slices] == list(range(SLICES))
    if workers == 1:  # (a worker process's parses are not seen here)
        assert counter.parses == {path: 1}


def test_prep_builder_reads_a_multiframe_file_once(cohorts, tmp_path, monkeypatch):
    from data_prep.builder import IapDataset, make_config, read_work_files, write_work_items
    from data_prep.examples import make_examples

    root, path = _enhanced_series(cohorts, tmp_path)
    dataset = IapDataset(config=make_config(image_size=16, phases="all"),
                         data_dir=str(tmp_path / "out"), progress=False, salt="s")
    found, plan = dataset._plan_work(str(root))
    items = [item for split in plan.items.values() for item in split]
    assert len(items) == SLICES
    counter = _CountingReads(monkeypatch)
    made = list(dataset._generate_locally(items, lambda group: make_examples(group, 16, "resize")))
    assert len(made) == SLICES and counter.parses == {path: 1}
    # The Beam path's work items come grouped by file: one reading for all of its slices.
    counter.parses.clear()
    work = write_work_items(items, dataset._beam_work_dir(), "train")
    groups = [group for p in work for group in read_work_files(p)]
    assert [len(g) for g in groups] == [SLICES]
    assert len(make_examples(groups[0], 16, "resize")) == SLICES and counter.parses == {path: 1}
