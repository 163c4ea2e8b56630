"""A prep killed part way and rerun gives the same dataset as a clean run; Beam agrees."""
import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

import prep_series
from data_prep.builder import prepare

NUM_PATIENTS, NUM_SLICES = 6, 24


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dicom"))
    prep_series.write_duke_cohort(root, NUM_PATIENTS, NUM_SLICES)
    return root


def digests(dataset_dir):
    """Checksums of every file TFDS and the stats wrote (dataset_info.json aside: it holds
    the dataset's own location)."""
    return {name: hashlib.sha256(open(os.path.join(dataset_dir, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(dataset_dir)) if name != "dataset_info.json"}


def test_killed_then_rerun_equals_clean_run(archive, tmp_path):
    options = dict(image_size=32, split=(0.5, 0.25, 0.25))
    clean = prepare(archive, str(tmp_path / "clean"), progress=False, **options)

    data_dir = str(tmp_path / "killed")
    command = [sys.executable, "-m", "data_prep.cli", "--dicom-root", archive, "--data-dir", data_dir,
               "--image-size", "32", "--split", "0.5,0.25,0.25"]
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


def examples_by_key(dataset_dir):
    builder = tfds.builder_from_directory(dataset_dir)
    return {(e["series"], int(e["slice_index"])): e
            for split in builder.info.splits
            for e in tfds.as_numpy(builder.as_dataset(split=split))}


def test_beam_direct_runner_matches_local(archive, tmp_path):
    pytest.importorskip("apache_beam", reason="apache-beam is not installed (extra 'beam')")
    options = dict(image_size=16, split=(0.5, 0.25, 0.25), slices="stride:6", progress=False)
    local = prepare(archive, str(tmp_path / "local"), **options)
    beam = prepare(archive, str(tmp_path / "beam"), beam_runner="DirectRunner", **options)
    a, b = examples_by_key(local), examples_by_key(beam)
    assert a.keys() == b.keys() and len(a) == NUM_PATIENTS * NUM_SLICES // 6
    for key in a:
        np.testing.assert_array_equal(a[key]["image"], b[key]["image"])
        assert a[key]["labels"]["EchoTime"]["value"] == b[key]["labels"]["EchoTime"]["value"]
    assert open(os.path.join(local, "iap_stats.json")).read() == open(os.path.join(beam, "iap_stats.json")).read()
