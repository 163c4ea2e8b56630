"""A prep killed part way and rerun gives the same dataset and report as a clean run; Beam
agrees; a changed archive is never silently reused."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import apache_beam  # noqa: F401  (the dev extra installs it: the Beam path is always tested)
import numpy as np
import pytest
import tensorflow_datasets as tfds

import prep_series
from local_paths_view import by_path
from data_prep.builder import REPORT_FILE, prepare
from data_prep.cli import main

NUM_PATIENTS, NUM_SLICES = 6, 24
UNDECODABLE = os.path.join("extra", "corrupt_j2k", "0000.dcm")


def write_undecodable_series(root):
    """A selected one-slice series whose JPEG 2000 stream is corrupt: fails at decode only."""
    path = prep_series.write_series(os.path.join(root, os.path.dirname(UNDECODABLE)),
                                    patient_id="Breast_MRI_000", description="ax dyn pre",
                                    num_slices=1)[0]
    prep_series.corrupt_pixels(path)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dicom"))
    prep_series.write_duke_cohort(root, NUM_PATIENTS, NUM_SLICES)
    write_undecodable_series(root)
    return root


def load_report(data_dir):
    with open(os.path.join(data_dir, REPORT_FILE)) as f:
        return json.load(f)


def decode_skips(report, data_dir):
    return {p: s["reason"] for p, s in by_path(report["skipped"], data_dir).items()
            if s["reason"] == "undecodable"}


def digests(dataset_dir):
    """Checksums of every file TFDS and the stats wrote (dataset_info.json aside: it holds
    the dataset's own location)."""
    return {name: hashlib.sha256(open(os.path.join(dataset_dir, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(dataset_dir)) if name != "dataset_info.json"}


def test_killed_then_rerun_equals_clean_run(archive, tmp_path):
    options = dict(image_size=32, split=(0.5, 0.25, 0.25), salt="same for both runs")
    clean = prepare(archive, str(tmp_path / "clean"), progress=False, **options)

    data_dir = str(tmp_path / "killed")
    command = [sys.executable, "-m", "data_prep.cli", "--dicom-root", archive, "--data-dir", data_dir,
               "--image-size", "32", "--split", "0.5,0.25,0.25", "--salt", options["salt"]]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config_dir = os.path.join(data_dir, "iap_dataset", os.path.basename(os.path.dirname(clean)))
    deadline = time.monotonic() + 120
    partial = []
    while time.monotonic() < deadline and process.poll() is None:
        if os.path.isdir(config_dir):
            partial = [d for d in os.listdir(config_dir) if d.startswith("incomplete.")]
            if partial:
                break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert partial, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(config_dir, "1.0.0"))

    rerun = prepare(archive, data_dir, progress=False, **options)
    assert [d for d in os.listdir(config_dir) if d.startswith("incomplete.")] == []
    assert digests(rerun) == digests(clean)
    assert any(".tfrecord" in name for name in digests(clean))
    assert load_report(data_dir) == load_report(str(tmp_path / "clean"))
    assert decode_skips(load_report(data_dir), data_dir) == {UNDECODABLE: "undecodable"}


def test_report_is_rebuilt_from_the_dataset_when_missing(archive, tmp_path):
    """As after a kill between the rename and the report: the rerun reuses the dataset and
    rebuilds the report, decode skips included, from the dataset's metadata."""
    data_dir = str(tmp_path / "data")
    options = dict(image_size=8, slices="stride:8", progress=False)
    dataset_dir = prepare(archive, data_dir, **options)
    original = load_report(data_dir)
    assert decode_skips(original, data_dir) == {UNDECODABLE: "undecodable"}
    metadata = open(os.path.join(dataset_dir, "metadata.json")).read()
    assert "corrupt_j2k" not in metadata and "Breast_MRI" not in metadata
    assert json.loads(metadata)["decode_skips"][0]["reason"] == "undecodable"
    os.remove(os.path.join(data_dir, REPORT_FILE))
    shards = sorted(os.listdir(dataset_dir))
    assert prepare(archive, data_dir, **options) == dataset_dir
    assert sorted(os.listdir(dataset_dir)) == shards
    rebuilt = load_report(data_dir)
    for key in ("config", "archive_fingerprint", "files", "skipped_by_reason", "series", "slices"):
        assert rebuilt[key] == original[key], key
    assert [(s["file"], s["reason"]) for s in rebuilt["skipped"]] == \
        [(s["file"], s["reason"]) for s in original["skipped"]]


def test_changed_archive_is_refused_unless_overwritten(tmp_path, capsys):
    root = str(tmp_path / "dicom")
    prep_series.write_duke_cohort(root, 2, num_slices=2)
    data_dir = str(tmp_path / "data")
    args = ["--dicom-root", root, "--data-dir", data_dir, "--image-size", "8", "--split", "1,0,0"]
    assert main(args) == 0
    dataset_dir = capsys.readouterr().out.strip().splitlines()[-1]
    before = json.load(open(os.path.join(dataset_dir, "metadata.json")))["archive_fingerprint"]
    assert main(args) == 0  # unchanged: reused
    prep_series.write_duke_cohort(root, 1, num_slices=2, first=2)
    assert main(args) == 2
    error = capsys.readouterr().err
    assert before in error and dataset_dir in error and "--overwrite" in error
    after = error.split("now has fingerprint ")[1].split()[0]
    assert after != before
    assert main(args + ["--overwrite"]) == 0
    builder = tfds.builder_from_directory(dataset_dir)
    assert builder.info.splits["train"].num_examples == 3 * 2
    assert builder.info.metadata["archive_fingerprint"] == after


def examples_by_key(dataset_dir):
    builder = tfds.builder_from_directory(dataset_dir)
    return {(e["series"], int(e["slice_index"])): e
            for split in builder.info.splits
            for e in tfds.as_numpy(builder.as_dataset(split=split))}


@pytest.mark.beam
@pytest.mark.slow
def test_beam_direct_runner_matches_local(archive, tmp_path):
    options = dict(image_size=16, split=(0.5, 0.25, 0.25), slices="stride:6", progress=False)
    local = prepare(archive, str(tmp_path / "local"), salt="s", **options)
    beam = prepare(archive, str(tmp_path / "beam"), salt="s", beam_runner="DirectRunner", **options)
    a, b = examples_by_key(local), examples_by_key(beam)
    assert a.keys() == b.keys() and len(a) == NUM_PATIENTS * NUM_SLICES // 6
    for key in a:
        np.testing.assert_array_equal(a[key]["image"], b[key]["image"])
        assert a[key]["labels"]["EchoTime"]["value"] == b[key]["labels"]["EchoTime"]["value"]
    assert open(os.path.join(local, "iap_stats.json")).read() == open(os.path.join(beam, "iap_stats.json")).read()
    # Decode failures: a side output of the pipeline, merged into the same report.
    local_report, beam_report = load_report(str(tmp_path / "local")), load_report(str(tmp_path / "beam"))
    assert decode_skips(beam_report, tmp_path / "beam") == {UNDECODABLE: "undecodable"}
    assert beam_report == local_report
    assert not [name for name in os.listdir(tmp_path / "beam") if name.startswith(".beam_skips")]
