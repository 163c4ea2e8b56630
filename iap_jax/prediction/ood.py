"""Unknown domain: an out-of-distribution score from the network's pooled features.

Fitted after training on the train split's features: one Gaussian per scanner model
(ManufacturerModelName from the headers) with a shared covariance (shrunk towards its
diagonal so that it inverts with few examples). A slice's score is its smallest Mahalanobis
distance to a known scanner; a series' score is the median of its slices'. The threshold is
the 95th percentile of the validation split's slice scores, so about 5% of known-domain
slices score above it. Stored beside the calibration in the training workdir (OOD_FILE), for
the checkpoint step it was fitted for; iap-predict adds `ood_score` and `out_of_domain` to
both tables when it is present (the decision made once, in tables.series_table), and
gives out-of-domain series no header-QA flags. Fitted by iap-fit (iap_jax/analysis/fit_cli.py).
"""
from __future__ import annotations

import os

import jax
import numpy as np

from iap_jax.core.iaps import IAP_NAMES
from iap_jax.io.sources import tfds_source
from iap_jax.io.storage import write_json_atomic
from iap_jax.prediction.calibration import load_fitted
from iap_jax.prediction.engine import Predictor, batches

OOD_FILE = "ood.json"
GROUP_IAP = "ManufacturerModelName"
QUANTILE = 95.0
SHRINKAGE = 0.1


def fit_gaussians(features: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
    """(means [G, D], shared precision [D, D], group names) of features by group."""
    features = np.asarray(features, np.float64)
    names = sorted(set(groups.tolist()))
    means = np.stack([features[groups == g].mean(axis=0) for g in names])
    centred = features - means[np.searchsorted(names, groups)]
    covariance = centred.T @ centred / max(len(features) - len(names), 1)
    covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * np.diag(np.diag(covariance))
    covariance += 1e-6 * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    return means, np.linalg.inv(covariance), names


def scores(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """The smallest Mahalanobis distance of each feature row to the group means."""
    diff = np.asarray(features, np.float64)[:, None, :] - np.asarray(means)[None]
    squared = np.einsum("ngd,de,nge->ng", diff, precision, diff)
    return np.sqrt(np.maximum(squared.min(axis=1), 0.0))


class OodModel:
    def __init__(self, data: dict):
        self.data = data
        self.means = np.asarray(data["means"], np.float64)
        self.precision = np.asarray(data["precision"], np.float64)
        self.threshold = float(data["threshold"])

    def score(self, features: np.ndarray) -> np.ndarray:
        return scores(features, self.means, self.precision)

    def summary(self) -> dict:
        return {k: v for k, v in self.data.items() if k not in ("means", "precision")}


def load_ood(workdir: str, step: int) -> OodModel | None:
    data = load_fitted(workdir, OOD_FILE, step)
    return OodModel(data) if data is not None else None


def split_features(predictor, dataset_dir: str, split: str) -> tuple[np.ndarray, list]:
    """Pooled features and group header values of every slice of a split."""
    source = tfds_source(dataset_dir, split, predictor.spec)
    features, groups = [], []
    index = IAP_NAMES.index(GROUP_IAP)
    for item in batches(source, source.plan(), {}, predictor.batch_size, predictor.spec.stored_size):
        if item[0] != "batch":
            continue
        _, _, slices, images, scales, offsets = item
        _, pooled = predictor(images, scales, offsets)
        features.append(np.asarray(jax.device_get(pooled))[:len(slices)])
        groups += [s.headers[index][1] or "<missing>" for s in slices]
    return np.concatenate(features), groups


def fit(workdir: str, dataset_dir: str | None = None, step="best", batch_size: int = 256) -> dict:
    predictor = Predictor.from_checkpoint(workdir, step, batch_size)
    dataset_dir = dataset_dir or predictor.config.get("dataset_dir")
    train_split = predictor.config.get("train_split", "train")
    eval_split = predictor.config.get("eval_split", "validation")
    exclude = dict(predictor.config.get("input", {}).get("exclude") or {})
    train_features, train_groups = split_features(predictor, dataset_dir, train_split)
    train_groups = np.asarray(train_groups, dtype=object)
    kept = np.ones(len(train_groups), bool)
    for values in exclude.get(GROUP_IAP, []):  # what training left out is not "known"
        kept &= train_groups != values
    means, precision, names = fit_gaussians(train_features[kept], train_groups[kept].astype(str))
    val_features, val_groups = split_features(predictor, dataset_dir, eval_split)
    val_groups = np.asarray(val_groups, dtype=object)
    val_kept = np.ones(len(val_groups), bool)
    for values in exclude.get(GROUP_IAP, []):
        val_kept &= val_groups != values
    val_scores = scores(val_features[val_kept], means, precision)
    data = {"step": predictor.step, "checkpoint": predictor.directory, "groups": names,
            "group_iap": GROUP_IAP, "threshold": float(np.percentile(val_scores, QUANTILE)),
            "quantile": QUANTILE, "train_slices": int(kept.sum()),
            "validation_slices": int(val_kept.sum()), "features": int(means.shape[1]),
            "means": means.tolist(), "precision": precision.tolist()}
    write_json_atomic(os.path.join(workdir, OOD_FILE), data)
    return data
