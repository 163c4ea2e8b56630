"""A real run for the predictor tests: synthetic DICOM -> iap-prep -> a tiny trained model."""
from __future__ import annotations

import argparse
import dataclasses
import os

from data_prep.builder import prepare
from data_prep.synthetic.cohort import generate_cohort
from train_data import tiny_config

from iap_jax.prediction.job import predict
from iap_jax.prediction.predict_cli import build_parser
from iap_jax.training import train

SALT = "predict-test-salt"


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    dicom_root: str
    dataset_dir: str
    workdir: str
    validation: dict  # the training's final validation summary


def make_run(root: str) -> TrainedRun:
    dicom_root = os.path.join(root, "dicom")
    generate_cohort(dicom_root, 20, seed=5, preset="small", slices=3, workers=1)
    dataset_dir = prepare(dicom_root, os.path.join(root, "data"), image_size=32, workers=1,
                          salt=SALT, progress=False)
    workdir = os.path.join(root, "train")
    result = train.train_and_evaluate(tiny_config(dataset_dir), workdir)
    return TrainedRun(dicom_root, dataset_dir, workdir, result["validation"])


def predict_args(run: TrainedRun, out: str, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["--workdir", run.workdir, "--out", out, "--quiet",
                                      "--salt", SALT, "--workers", "1", *extra])


def run_predict(run: TrainedRun, out: str, *extra: str) -> dict:
    return predict(predict_args(run, out, *extra))
