"""Calibrated confidence: one temperature per categorical head, and the calibration error.

A temperature T divides a head's logits before the softmax: T > 1 softens an over-confident
head, T < 1 sharpens an under-confident one, and the top-1 class never changes. It is fitted
on the validation split's predictions (minimising the negative log-likelihood) and kept in
the training workdir as CALIBRATION_FILE, for the checkpoint step it was fitted for;
iap-predict applies it when the step matches.

Expected calibration error (top-label, equal-width bins): the slices are binned by their top-1
probability, and ECE = sum over bins of (share of slices) * |accuracy - mean confidence|.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

import numpy as np
from etils import epath

from iap_jax.atomic import read_json, write_json_atomic

CALIBRATION_FILE = "calibration.json"
ECE_BINS = 15


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS):
    """Per equal-width bin of confidence: (mean confidence, accuracy, count); empty bins
    have NaN means and count 0. A confidence of exactly 1 falls in the last bin."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, np.float64)
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, minlength=bins) / counts
        accuracy = np.bincount(index, correct, minlength=bins) / counts
    return mean_confidence, accuracy, counts


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """Top-label ECE of top-1 probabilities `confidence` and hits `correct` (0/1)."""
    mean_confidence, accuracy, counts = reliability(confidence, correct, bins)
    if counts.sum() == 0:
        return math.nan
    filled = counts > 0
    return float(np.sum(counts[filled] * np.abs(accuracy[filled] - mean_confidence[filled]))
                 / counts.sum())


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [0.05, 20] minimising the NLL of `labels` (class indices)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    if len(labels) == 0:
        return 1.0
    result = minimize_scalar(lambda log_t: negative_log_likelihood(logits, labels, math.exp(log_t)),
                             bounds=(math.log(0.05), math.log(20.0)), method="bounded",
                             options={"xatol": 1e-4})
    return float(math.exp(result.x))


def save_calibration(workdir: str, data: Mapping[str, Any]) -> str:
    path = os.path.join(workdir, CALIBRATION_FILE)
    write_json_atomic(path, dict(data), sort_keys=True)
    return path


def load_fitted(workdir: str, filename: str, step: int) -> dict | None:
    """A JSON fitted after training and kept in the workdir (the calibration, the OOD model),
    when it was fitted for this checkpoint step; else None."""
    path = os.path.join(workdir, filename)
    if not epath.Path(path).exists():
        return None
    data = read_json(path)
    return data if int(data.get("step", -1)) == int(step) else None


def load_calibration(workdir: str, step: int) -> dict | None:
    """The workdir's calibration when it was fitted for this checkpoint step, else None."""
    return load_fitted(workdir, CALIBRATION_FILE, step)
