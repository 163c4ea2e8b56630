"""The prep stage end to end on a small Duke-like cohort written with pydicom."""
import json
import os
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import tensorflow_datasets as tfds

import prep_series
from data_prep.builder import IapDataset, REPORT_FILE, prepare

from iap_jax.core.iaps import IAP_NAMES, SPECS, LabelState
from iap_jax.io.dataset_info import STATS_FILE, load_iap_stats

NUM_PATIENTS, NUM_SLICES = 8, 4
SPLIT = (0.5, 0.25, 0.25)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dicom"))
    return root, prep_series.write_duke_cohort(root, NUM_PATIENTS, NUM_SLICES)


@pytest.fixture(scope="module")
def pre_dataset(cohort, tmp_path_factory):
    root, _ = cohort
    data_dir = str(tmp_path_factory.mktemp("data"))
    return data_dir, prepare(root, data_dir, image_size=16, split=SPLIT, progress=False)


def read_split(dataset_dir, split):
    builder = tfds.builder_from_directory(dataset_dir)
    return list(tfds.as_numpy(builder.as_dataset(split=split)))


def read_all(dataset_dir):
    builder = tfds.builder_from_directory(dataset_dir)
    return {split: read_split(dataset_dir, split) for split in builder.info.splits}


def test_pre_contrast_dataset_reads_back_with_header_labels(cohort, pre_dataset):
    root, patients = cohort
    _, dataset_dir = pre_dataset
    splits = read_all(dataset_dir)
    examples = [e for split in splits.values() for e in split]
    assert len(examples) == NUM_PATIENTS * NUM_SLICES
    assert {e["phase"] for e in examples} == {0}
    assert {e["image"].shape for e in examples} == {(16, 16)}
    # One pre-contrast fat-sat series per patient, labelled from its vendor's headers.
    vendors = {}
    for e in examples:
        labels = {n: e["labels"][n] for n in IAP_NAMES}
        assert labels["ScanOptions"]["value"].decode() != "PFP", "the non-fat-sat T1 was selected"
        vendors.setdefault(e["patient"], labels["Manufacturer"]["value"].decode())
        assert LabelState(labels["RepetitionTime"]["state"]) == LabelState.PRESENT
    expected_vendors = sorted(SPECS["Manufacturer"].canonicalise(v[0]["Manufacturer"])[0]
                              for v in patients.values())
    assert sorted(vendors.values()) == expected_vendors
    siemens = [e for e in examples if e["labels"]["Manufacturer"]["value"] == b"SIEMENS"]
    first = siemens[0]["labels"]
    assert first["ManufacturerModelName"]["value"] == b"AVANTO"
    assert first["AcquisitionMatrix"]["value"] == b"448x251"
    assert first["MagneticFieldStrength"]["value"] == b"1.494"
    assert first["EchoTime"]["number"] == pytest.approx(2.81)
    ge = [e for e in examples if e["labels"]["Manufacturer"]["value"] == b"GE MEDICAL SYSTEMS"][0]["labels"]
    assert ge["AcquisitionMatrix"]["value"] == b"384x384"
    assert LabelState(ge["ContrastBolusAgent"]["state"]) == LabelState.ABSENT


def test_slices_are_ordered_and_intensities_recoverable(cohort, pre_dataset):
    _, dataset_dir = pre_dataset
    examples = [e for split in read_all(dataset_dir).values() for e in split]
    by_series = {}
    for e in examples:
        by_series.setdefault(e["series"], []).append(e)
    for series in by_series.values():
        assert sorted(int(e["slice_index"]) for e in series) == list(range(NUM_SLICES))
        assert {int(e["num_slices"]) for e in series} == {NUM_SLICES}
        top = [e for e in series if e["slice_index"] == NUM_SLICES - 1][0]
        assert top["slice_position"] == pytest.approx(1.0)
    e = examples[0]
    restored = e["image"].astype(np.float32) * e["intensity_scale"] + e["intensity_offset"]
    assert 0 <= restored.min() and restored.max() <= 4000  # 12-bit test pixels


def test_splits_are_patient_disjoint_and_stats_match(pre_dataset):
    data_dir, dataset_dir = pre_dataset
    splits = read_all(dataset_dir)
    patients = {split: {e["patient"] for e in examples} for split, examples in splits.items()}
    names = list(patients)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not patients[a] & patients[b]
    stats = load_iap_stats(dataset_dir)
    assert set(stats) == set(splits)
    for split, examples in splits.items():
        s = stats[split]
        assert s["num_examples"] == len(examples)
        assert s["num_patients"] == len(patients[split])
        assert s["images_per_series"]["min"] == NUM_SLICES
        models = s["iaps"]["ManufacturerModelName"]["value_counts"]
        assert sum(models.values()) == len(examples)
        te = s["iaps"]["EchoTime"]["numeric"]
        assert te["count"] == len(examples) and 2.4 <= te["min"] <= te["max"] <= 2.81
        assert set(te["quantiles"]) == {"0.01", "0.05", "0.25", "0.5", "0.75", "0.95", "0.99"}
    with open(os.path.join(dataset_dir, "metadata.json")) as f:
        assert json.load(f)["iap_stats"] == stats


def test_no_personal_data_in_the_dataset(cohort, pre_dataset):
    root, patients = cohort
    data_dir, dataset_dir = pre_dataset
    secrets = set()
    for folder in (f for _, folders in patients.values() for f in folders):
        for name in os.listdir(folder):
            ds = pydicom.dcmread(os.path.join(folder, name), stop_before_pixels=True)
            secrets |= {str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.StudyInstanceUID,
                        ds.SeriesInstanceUID, ds.SOPInstanceUID}
    assert len(secrets) > 100
    written = []
    for folder, _, files in os.walk(os.path.dirname(os.path.dirname(dataset_dir))):
        written += [os.path.join(folder, f) for f in files]
    assert any(".tfrecord" in f for f in written)
    for path in written:
        content = open(path, "rb").read()
        for secret in secrets:
            assert secret.encode() not in content, (path, secret)
    # The skip report lives outside the dataset dir; it holds archive paths but no header data.
    report = open(os.path.join(data_dir, REPORT_FILE), "rb").read()
    for secret in secrets - set(patients):
        assert secret.encode() not in report


def test_all_phases_with_workers_matches_pre_run(cohort, pre_dataset, tmp_path):
    root, _ = cohort
    data_dir, pre_dir = pre_dataset
    all_dir = prepare(root, data_dir, phases="all", image_size=16, split=SPLIT, workers=2,
                      progress=False)
    assert all_dir != pre_dir
    pre = {(e["series"], int(e["slice_index"])): e for s in read_all(pre_dir).values() for e in s}
    every = [e for s in read_all(all_dir).values() for e in s]
    assert len(every) == NUM_PATIENTS * 3 * NUM_SLICES
    assert sorted({int(e["phase"]) for e in every}) == [0, 1, 2]
    same = [e for e in every if (e["series"], int(e["slice_index"])) in pre]
    assert len(same) == len(pre)
    for e in same:
        np.testing.assert_array_equal(e["image"], pre[(e["series"], int(e["slice_index"]))]["image"])
    # Patients keep their split whichever series are selected.
    split_of = {}
    for split, examples in read_all(all_dir).items():
        for e in examples:
            assert split_of.setdefault(e["patient"], split) == split
    for split, examples in read_all(pre_dir).items():
        assert {split_of[e["patient"]] for e in examples} == {split}


def test_tfds_builder_interface(cohort, tmp_path):
    root, _ = cohort
    builder = IapDataset(config="pre_224", data_dir=str(tmp_path), progress=False)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
    assert sum(s.num_examples for s in builder.info.splits.values()) == NUM_PATIENTS * NUM_SLICES
    assert os.path.exists(os.path.join(builder.data_dir, STATS_FILE))
    example = next(iter(tfds.as_numpy(builder.as_dataset(split="train"))))
    assert example["image"].shape == (224, 224)


@pytest.mark.slow
def test_tfds_build_command(cohort, tmp_path):
    """The builder through TFDS's own command line, as documented."""
    root, _ = cohort
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tfds_command = os.path.join(os.path.dirname(sys.executable), "tfds")
    data_dir = str(tmp_path / "built")
    env = dict(os.environ, PYTHONPATH=repo, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("IAP_PREP_SALT", None)
    result = subprocess.run([tfds_command, "build", "data_prep/builder.py", "--manual_dir", root,
                             "--data_dir", data_dir, "--config", "pre_224"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    dataset_dir = os.path.join(data_dir, "iap_dataset", "pre_224", "1.0.0")
    builder = tfds.builder_from_directory(dataset_dir)
    assert sum(s.num_examples for s in builder.info.splits.values()) == NUM_PATIENTS * NUM_SLICES
    assert os.path.exists(os.path.join(dataset_dir, STATS_FILE))
    assert os.path.exists(os.path.join(data_dir, REPORT_FILE))
    assert os.path.exists(os.path.join(data_dir, "prep_salt"))
