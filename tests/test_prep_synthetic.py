"""iap-prep on the built-in synthetic cohort: labels match cohort.csv, no personal data."""
import csv
import json
import os

import pydicom
import pytest
import tensorflow_datasets as tfds

from data_prep.synthetic import cohort as cohort_module
from data_prep.builder import REPORT_FILE, prepare
from data_prep.splits import salted_hash
from local_paths_view import by_path

from iap_jax.core.iaps import IAP_NAMES, SPECS, LabelState
from iap_jax.io.salt import SALT_FILE

NUM_PATIENTS = 4


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    cohort_module.generate_cohort(root, NUM_PATIENTS, seed=3, preset="small", phases="all", workers=1)
    with open(os.path.join(root, "cohort.csv")) as f:
        rows = list(csv.DictReader(f))
    data_dir = str(tmp_path_factory.mktemp("prepared"))
    dataset_dir = prepare(root, data_dir, phases="all", image_size=32, workers=2, progress=False)
    return root, rows, data_dir, dataset_dir


def all_examples(dataset_dir):
    builder = tfds.builder_from_directory(dataset_dir)
    return {split: list(tfds.as_numpy(builder.as_dataset(split=split))) for split in builder.info.splits}


def expected_label(row, name):
    raw = row[name]
    if name == "ContrastBolusAgent" and not raw:
        state = row["ContrastBolusAgent_state"].upper()
        return LabelState[state], ""
    if name == "AcquisitionMatrix":  # the csv spells it FREQxPHASE already
        return LabelState.PRESENT, raw
    return LabelState.PRESENT, SPECS[name].canonicalise(raw)[0]


def test_labels_match_cohort_csv(synthetic):
    _, rows, data_dir, dataset_dir = synthetic
    with open(os.path.join(data_dir, SALT_FILE)) as f:
        salt = f.read().strip()
    dce = {(salted_hash(salt, "patient", r["patient_id"]), int(r["phase"])): r
           for r in rows if r["fat_suppressed"] == "1"}
    examples = [e for split in all_examples(dataset_dir).values() for e in split]
    assert len(examples) == sum(int(r["n_slices"]) for r in dce.values())
    seen = set()
    for e in examples:
        row = dce[(e["patient"].decode(), int(e["phase"]))]
        seen.add((e["patient"].decode(), int(e["phase"])))
        for name in IAP_NAMES:
            label = e["labels"][name]
            state, value = expected_label(row, name)
            assert (LabelState(label["state"]), label["value"].decode()) == (state, value), name
    assert seen == set(dce)


def test_splits_are_patient_disjoint(synthetic):
    _, _, _, dataset_dir = synthetic
    owner = {}
    for split, examples in all_examples(dataset_dir).items():
        for e in examples:
            assert owner.setdefault(e["patient"], split) == split


def test_no_personal_data_in_dataset_dir(synthetic):
    root, rows, data_dir, dataset_dir = synthetic
    secrets = set()
    for row in rows:
        folder = os.path.join(root, row["series_dir"])
        for name in sorted(os.listdir(folder))[:2]:
            ds = pydicom.dcmread(os.path.join(folder, name), stop_before_pixels=True)
            secrets |= {str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.StudyInstanceUID,
                        ds.SeriesInstanceUID, ds.SOPInstanceUID}
    secrets.discard("")
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.dirname(os.path.dirname(dataset_dir)))
             for f in fs]
    assert sum(".tfrecord" in f for f in files) >= 1
    for path in files:
        content = open(path, "rb").read()
        leaked = [s for s in secrets if s.encode() in content]
        assert not leaked, (path, leaked)
    # The skip report names the cohort.csv it skipped by key, paths.local.json by its path.
    report = json.load(open(os.path.join(data_dir, REPORT_FILE)))
    assert "cohort.csv" not in json.dumps(report)
    assert "cohort.csv" in by_path(report["skipped"], data_dir)
    assert str(rows[0]["patient_id"]) not in open(os.path.join(dataset_dir, "dataset_info.json")).read()
