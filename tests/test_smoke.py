"""Smoke test of the whole path in about a minute: a tiny synthetic cohort (iap-synth's API) ->
iap-prep -> a tiny model trained a few steps -> iap-predict, the two commands run as a user
runs them. Also what those commands print: their own lines, no library start-up notices."""
import json
import math
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from data_prep.synthetic.cohort import generate_cohort
from train_data import tiny_config

from iap_jax.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SALT = "smoke-test-salt"
# Lines libraries print on start-up or on every restore, which the commands keep out.
LIBRARY_NOTICES = (
    "oneDNN custom operations",  # TensorFlow
    "All log messages before absl::InitializeLog",  # TensorFlow's C++ logging
    "Using custom data configuration",  # TFDS
    "Downloading and preparing dataset",  # TFDS
    "WARNING:absl",  # Orbax's read-only restore, and absl's warnings before its set-up
    "Unable to initialize backend",  # JAX
)


def _command(module: str, *args) -> subprocess.CompletedProcess:
    """A command in a fresh process, in the environment of a user's shell (no log levels)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (REPO, env.get("PYTHONPATH"))))
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    generate_cohort(str(root / "dicom"), 10, seed=5, preset="small", slices=2, workers=1)
    prep = _command("data_prep.cli", "--dicom-root", root / "dicom", "--data-dir", root / "data",
                    "--image-size", 32, "--workers", 1, "--salt", SALT)
    dataset_dir = prep.stdout.strip().splitlines()[-1]
    config = tiny_config(dataset_dir, batch_size=4, eval_batch_size=4, num_epochs=1)
    config.input.logical_shards = 4  # a batch of 4 from a dataset of a few slices
    trained = train.train_and_evaluate(config, str(root / "train"))
    out = root / "predict"
    predict = _command("iap_jax.prediction.predict_cli", "--workdir", root / "train", "--input", dataset_dir,
                       "--split", "validation", "--out", out, "--salt", SALT, "--workers", 1)
    return dict(dataset_dir=dataset_dir, trained=trained, workdir=root / "train", out=out,
                prep=prep, predict=predict)


def _split_slices(dataset_dir: str) -> dict:
    with open(os.path.join(dataset_dir, "dataset_info.json")) as f:
        info = json.load(f)
    return {split["name"]: sum(int(n) for n in split["shardLengths"]) for split in info["splits"]}


def test_prep_writes_train_and_validation_records(smoke):
    slices = _split_slices(smoke["dataset_dir"])
    assert slices["train"] > 0 and slices["validation"] > 0


def test_training_validates_and_saves_a_checkpoint(smoke):
    validation = smoke["trained"]["validation"]
    assert validation["Manufacturer"]["count"] == _split_slices(smoke["dataset_dir"])["validation"]
    steps = [d for d in os.listdir(smoke["workdir"] / "checkpoints") if d.isdigit()]
    assert steps


def test_predictions_hold_a_row_per_validation_slice_and_series(smoke):
    slices = pq.read_table(smoke["out"] / "slices.parquet").to_pylist()
    series = pq.read_table(smoke["out"] / "series.parquet").to_pylist()
    assert len(slices) == _split_slices(smoke["dataset_dir"])["validation"]
    assert sorted(s["series_key"] for s in series) == sorted({r["series_key"] for r in slices})
    assert sum(s["num_slices"] for s in series) == len(slices)


def test_predicted_outputs_are_finite(smoke):
    rows = pq.read_table(smoke["out"] / "slices.parquet").to_pylist()
    for row in rows:
        for key, value in row.items():
            values = value if isinstance(value, list) else [value]
            if key.endswith("_prob"):  # _prob and _topk_prob
                assert all(0 <= v <= 1 for v in values), key
            elif key.endswith("_logits"):
                assert values and all(math.isfinite(v) for v in values), key
        assert math.isfinite(row["EchoTime"]) and math.isfinite(row["RepetitionTime"])


@pytest.mark.parametrize("command", ["prep", "predict"])
def test_commands_print_no_library_notices(smoke, command):
    result = smoke[command]
    output = result.stderr + result.stdout
    assert not [line for line in output.splitlines()
                if any(notice in line for notice in LIBRARY_NOTICES)], output
    assert result.stdout.strip()  # the command's own summary is there
