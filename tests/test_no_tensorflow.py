"""Training, prediction (every SPEC kind), evaluation, OOD fitting and sorting run without
importing TensorFlow or TensorFlow Datasets, which accelerator hosts do not have: every
command runs in one fresh interpreter (TensorFlow is installed here, for the prep stage, so
an import of it anywhere on these paths would succeed and be caught), and the interpreter
reports what it imported."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import predict_data

pytestmark = pytest.mark.slow  # a trained run's commands, each in a fresh interpreter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs each command's console entry point in turn; any non-zero exit stops with its name.
_DRIVER = """
import json, sys
commands = json.loads(sys.argv[1])
for module, function, argv in commands:
    sys.argv = [module] + argv
    entry = getattr(__import__(module, fromlist=[function]), function)
    try:
        entry()
    except SystemExit as exit:
        if exit.code not in (None, 0):
            raise SystemExit(f"{module} {argv}: exit status {exit.code}")
print(json.dumps(sorted(name for name in sys.modules
                        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"))))
"""


def test_training_prediction_and_analysis_never_import_tensorflow(trained_run, tmp_path):
    workdir, out = str(tmp_path / "train"), str(tmp_path / "predict")
    pngs = tmp_path / "pngs" / "series"
    pngs.mkdir(parents=True)
    for k in range(2):
        Image.fromarray(np.full((40, 40), 100 * (k + 1), np.uint16)).save(pngs / f"{k}.png")
    glob = os.path.join(trained_run.dataset_dir, "*-test.tfrecord-*")
    predict = ["--workdir", workdir, "--quiet", "--salt", predict_data.SALT, "--workers", "1"]
    commands = [
        ("iap_jax.training.train_cli", "run", [
            "--config=configs/synthetic_cpu.py:runlocal", f"--workdir={workdir}",
            f"--config.dataset_dir={trained_run.dataset_dir}", "--config.num_epochs=1",
            "--config.progress_bar=False"]),
        ("iap_jax.prediction.predict_cli", "run", predict + ["--input", trained_run.dataset_dir, "--split",
                                              "test", "--out", out]),
        ("iap_jax.prediction.predict_cli", "run", predict + ["--input", glob, "--out", out + "_glob"]),
        ("iap_jax.prediction.predict_cli", "run", predict + ["--input", trained_run.dicom_root,
                                              "--out", out + "_dicom"]),
        ("iap_jax.prediction.predict_cli", "run", predict + ["--input", str(pngs.parent), "--out", out + "_png"]),
        ("iap_jax.analysis.eval_cli", "run", ["--predictions", out, "--out", str(tmp_path / "report"),
                                     "--bootstrap", "20"]),
        ("iap_jax.prediction.predict_cli", "run", predict + ["--input", trained_run.dataset_dir, "--split",
                                              "validation", "--out", out + "_val",
                                              "--no-calibration"]),
        ("iap_jax.analysis.fit_cli", "run", ["--predictions", out + "_val",
                                             "--false-unknown-rate", "0.25"]),
        ("iap_jax.analysis.sort_cli", "run", ["--predictions", out, "--out", str(tmp_path / "manifest.csv")]),
    ]
    done = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(commands)], cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    # Each command did its work (so the check above covers real runs, not early exits).
    for folder in (out, out + "_glob", out + "_dicom", out + "_png"):
        assert os.path.exists(os.path.join(folder, "slices.parquet")), folder
    assert os.path.exists(tmp_path / "report" / "report.html")
    assert os.path.exists(tmp_path / "manifest.csv")
    assert os.path.exists(os.path.join(workdir, "calibration.json"))
    assert os.path.exists(os.path.join(workdir, "ood.json"))
    assert os.path.exists(os.path.join(workdir, "tensorboard"))
