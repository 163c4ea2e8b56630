"""Series selection, slice sampling, patient splits and keys, report counting."""
import collections
import glob
import json
import os

import pydicom
import pytest
import tensorflow_datasets as tfds

import prep_series
from data_prep import report as report_lib
from data_prep.builder import REPORT_FILE, prepare
from data_prep.splits import parse_split, salted_hash, split_of

from iap_jax.io.salt import SALT_FILE
from iap_jax.io.series import (LATER_TIME_POINT, Discovery, Series, SeriesSelection, Skip, discover,
                               is_time_series, phase_of, select, select_slices)


def series(description, temporal_position=None):
    return Series("1.2.3", temporal_position, "P", description, 8, 8, (), ())


@pytest.mark.parametrize("description,temporal,phase,default_pre", [
    ("ax dyn pre", None, 0, True),
    ("ax dyn 1st pass", None, 1, False),
    ("ax dyn 4th pass", None, 4, False),
    ("ax 3d dyn", 1, 0, True),
    ("Ph1/ax 3d dyn", 2, 1, False),
    ("ax 3d dyn MP", None, 0, True),
    ("Ph3/ax 3d dyn MP", None, 3, False),
    ("Ax Vibrant MultiPhase", None, 0, True),
    ("Ph2/Ax Vibrant MultiPhase", None, 2, False),
    ("ax dynamic", None, 0, True),
    ("Ph4/ax dynamic", 5, 4, False),
    ("ax t1", None, 0, False),
    ("Ax 3D T1 NON FS", None, 0, False),
])
def test_duke_descriptions(description, temporal, phase, default_pre):
    s = series(description, temporal)
    assert phase_of(s) == phase
    assert (SeriesSelection().rejection(s) is None) == default_pre
    assert (SeriesSelection(phases="all").rejection(s) is None) == (default_pre or phase > 0)


def test_temporal_position_gives_the_phase_without_a_description_marker():
    assert phase_of(series("dce", 3)) == 2
    assert SeriesSelection(series_filter="dce", phases="pre").rejection(series("dce", 3)) is not None
    assert SeriesSelection(series_filter=".*").rejection(series("t2 tse")) is None
    with pytest.raises(ValueError, match="regex"):
        SeriesSelection(series_filter="(")


def test_time_points_of_an_fmri_series_are_not_contrast_phases(tmp_path):
    def time_series(name, description, time_points):
        """One series whose volumes carry TemporalPositionIdentifier 1, 2, ..."""
        paths = [path for t in time_points
                 for path in prep_series.write_series(str(tmp_path / name / str(t)), patient_id="P",
                                                      description=description, num_slices=2,
                                                      temporal_position=t, study_uid="1.2.3")]
        for path in paths:  # one SeriesInstanceUID for all volumes
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = f"1.2.3.{len(name)}"
            ds.save_as(path)

    time_series("bold", "ep2d_bold_rest", (1, 2, 3))
    time_series("dynamic", "t1 fl3d dce", (1, 2))  # phases numbered by TemporalPositionIdentifier only
    found = discover(str(tmp_path), progress=False)
    assert [(s.description, s.time_series) for s in found.series] == \
        [("ep2d_bold_rest", True)] * 3 + [("t1 fl3d dce", False)] * 2
    for phases in ("pre", "all"):
        kept, rejected = select(found, SeriesSelection(series_filter="bold", phases=phases), "all", "s")
        assert [(k.series.temporal_position, k.phase, len(k.indices)) for k in kept] == [(1, 0, 2)]
        assert rejected == {LATER_TIME_POINT: 2, "description does not match the series filter": 2}
        # A DCE series still follows the phase rule.
        kept, rejected = select(found, SeriesSelection(series_filter="dce", phases=phases), "all", "s")
        assert [(k.series.temporal_position, k.phase) for k in kept] == \
            ([(1, 0)] if phases == "pre" else [(1, 0), (2, 1)])
        assert rejected.get("post-contrast phase", 0) == (phases == "pre")


@pytest.mark.parametrize("texts,diffusion,contrast,expected", [
    (("ep2d_bold",), False, False, True),
    (("rsfMRI",), False, False, True),
    (("ep2d_diff_mddw_20",), False, False, True),
    (("DTI 64 directions",), False, False, True),
    (("ax dwi",), False, False, True),
    (("tgse_pcasl",), False, False, True),
    (("", "", "ORIGINAL\\PRIMARY\\DIFFUSION\\NONE"), False, False, True),
    (("ax t2",), True, False, True),  # a DiffusionBValue in the header
    (("perfusion",), False, False, True),  # ASL
    (("perfusion",), False, True, False),  # with a contrast agent: DCE / DSC
    (("ax dyn pre",), False, True, False),
    (("DCE perfusion",), False, False, False),
    (("ax 3d dyn", "ep2d_bold"), False, False, False),  # a DCE name wins
    (("t1 bolder", "bolus tracking"), False, False, False),  # words, not letters in a word
    (("ax t1",), False, False, False),
])
def test_time_series_recognition(texts, diffusion, contrast, expected):
    assert is_time_series(texts, diffusion, contrast) == expected


def test_slice_sampling():
    assert select_slices(5, "all") == [0, 1, 2, 3, 4]
    assert select_slices(10, "central:0.5") == [2, 3, 4, 5, 6]
    assert select_slices(7, "stride:3") == [0, 3, 6]
    assert select_slices(3, "central:0.01") == [1]
    for bad in ("central:0", "stride:0", "every", "central:x"):
        with pytest.raises(ValueError, match="slices"):
            select_slices(4, bad)


def patient_splits(dataset_dir):
    builder = tfds.builder_from_directory(dataset_dir)
    return {e["patient"].decode(): split for split in builder.info.splits
            for e in tfds.as_numpy(builder.as_dataset(split=split))}


def test_adding_patients_later_keeps_every_old_patients_split(tmp_path, monkeypatch):
    monkeypatch.delenv("IAP_PREP_SALT", raising=False)
    root, data_dir = str(tmp_path / "dicom"), str(tmp_path / "data")
    options = dict(image_size=8, split=(0.4, 0.3, 0.3), progress=False)
    prep_series.write_duke_cohort(root, 10, num_slices=2)
    os.makedirs(data_dir)
    with open(os.path.join(data_dir, SALT_FILE), "w") as f:  # as a first run would keep it
        f.write("0123456789abcdef0123456789abcdef\n")
    old = patient_splits(prepare(root, data_dir, **options))
    assert len(old) == 10 and len(set(old.values())) > 1
    prep_series.write_duke_cohort(root, 10, num_slices=2, first=10)
    # The data dir's kept salt is reused: the archive grew, so rebuild the dataset over it.
    new = patient_splits(prepare(root, data_dir, overwrite=True, **options))
    assert len(new) == 20
    assert {p: new[p] for p in old} == old


def test_split_assignment_follows_the_fractions_and_the_salt():
    fractions = parse_split("0.7,0.15,0.15")
    more = {f"P{i}": split_of(f"P{i}", "s", fractions) for i in range(1000)}
    counts = collections.Counter(more.values())
    assert 620 < counts["train"] < 780 and 100 < counts["validation"] < 200 and 100 < counts["test"] < 200
    # Another salt gives another assignment and other hashes.
    assert sum(split_of(p, "t", fractions) != s for p, s in more.items()) > 100
    assert salted_hash("s", "patient", "P1") != salted_hash("t", "patient", "P1")
    assert salted_hash("s", "patient", "P1") != salted_hash("s", "series", "P1")


def test_split_parsing():
    assert parse_split([1, 0, 0]) == (1.0, 0.0, 0.0)
    assert {split_of(f"P{i}", "s", (1, 0, 0)) for i in range(50)} == {"train"}
    for bad in ("0.5,0.5", "0.5,0.6,0.1", "a,b,c", (-0.5, 1, 0.5)):
        with pytest.raises(ValueError, match="split"):
            parse_split(bad)


def test_series_without_patient_id_are_keyed_by_name_and_birth_date_then_study(tmp_path):
    root = str(tmp_path / "dicom")
    for study in ("a", "b"):  # one patient, two studies, no PatientID
        prep_series.write_series(os.path.join(root, "anonymous", study), patient_id="",
                                 patient_name="Roe^Jane", birth_date="19610203",
                                 description="ax dyn pre", num_slices=2)
    prep_series.write_series(os.path.join(root, "nameless"), patient_id="", patient_name="",
                             birth_date="", description="ax dyn pre", num_slices=2)
    prep_series.write_series(os.path.join(root, "named"), patient_id="Breast_MRI_001",
                             description="ax dyn pre", num_slices=2)
    data_dir = str(tmp_path / "data")
    dataset_dir = prepare(root, data_dir, image_size=8, split=(0.34, 0.33, 0.33), salt="s",
                          progress=False)
    builder = tfds.builder_from_directory(dataset_dir)
    series_of = collections.defaultdict(set)
    for split in builder.info.splits:
        for e in tfds.as_numpy(builder.as_dataset(split=split)):
            series_of[e["patient"].decode()].add((e["series"], split))
    assert sorted(len(s) for s in series_of.values()) == [1, 1, 2]
    both_studies = next(s for s in series_of.values() if len(s) == 2)
    assert len({split for _, split in both_studies}) == 1
    with open(os.path.join(data_dir, REPORT_FILE)) as f:
        report = json.load(f)
    assert report["notes"] == {"no_patient_id": {"series": 3, "keyed_by": {"name_birth_date": 2,
                                                                           "study_uid": 1}}}
    assert report["skipped"] == [] and report["files"]["skipped"] == 0


def test_decode_skips_count_files_only_when_every_frame_failed():
    found = Discovery(series=[], skips=[Skip("junk.txt", "not_dicom")], num_files=4, fingerprint="f")
    report = report_lib.new_report(found, report_lib.discovery_skips(found, lambda p: f"key-{p}"), {},
                                   ["multi.dcm", "single.dcm", "good.dcm"], {"train": [0] * 12}, "c")
    FileSkip = report_lib.FileSkip
    skips = [FileSkip("key-multi", "undecodable", "frame 3"), FileSkip("key-multi", "undecodable", "frame 4"),
             FileSkip("key-single", "undecodable", "bad stream")]
    report_lib.finish_report(report, skips, {"key-multi": 10, "key-single": 1, "key-good": 1})
    assert report["slices"]["skipped_at_decode"] == 3
    assert report["files"] == {"found": 4, "used": 2, "skipped": 2, "in_series_not_selected": 0,
                               "partly_skipped": 1}
    assert [s["file"] for s in report["skipped"]] == ["key-junk.txt", "key-single"]
    assert report["skipped_by_reason"] == {"not_dicom": 1, "undecodable": 1}
    assert report["partly_skipped"] == [{"file": "key-multi", "reason": "undecodable",
                                         "detail": "frame 3", "slices_skipped": 2,
                                         "slices_selected": 10}]
    assert "1 with some frames skipped" in report_lib.summary_table({}, report)
