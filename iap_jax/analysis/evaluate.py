"""The scores of iap-predict's tables against the headers they carried (iap-eval's
numbers): per IAP top-1 / top-2 accuracy at slice and series level, per-class recall, MAE,
bias and R2 in real units, each with a 95% interval by bootstrap over patients; the ECE of
every categorical head before and after its calibration, with its interval and noise
floor; how many series were out of the model's domain. The report is drawn from them
(iap_jax.analysis.report)."""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from etils import epath

from iap_jax.core import metrics
from iap_jax.core.labels import LabelEncoding, class_indices
from iap_jax.io.storage import absolute
from iap_jax.prediction import calibration as calibration_lib
from iap_jax.prediction import tables
from iap_jax.prediction.header_qa import commonest

INTERVAL = (2.5, 97.5)


def _percentile_interval(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    low, high = np.percentile(values, INTERVAL)
    return float(low), float(high)


def bootstrap_interval(numerators: np.ndarray, denominators: np.ndarray, resamples: int,
                       rng: np.random.Generator) -> tuple[float, float]:
    """95% interval of sum(numerators) / sum(denominators) over groups (patients) drawn with
    replacement; NaN when there is nothing to resample."""
    numerators = np.asarray(numerators, np.float64)
    denominators = np.asarray(denominators, np.float64)
    if len(numerators) == 0 or denominators.sum() == 0 or resamples <= 0:
        return math.nan, math.nan
    weights = calibration_lib.bootstrap_weights(len(numerators), resamples, rng)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _percentile_interval((weights @ numerators) / (weights @ denominators))


def ece_interval(confidence: np.ndarray, correct: np.ndarray, groups: np.ndarray, resamples: int,
                 rng: np.random.Generator) -> tuple[float, float]:
    """95% bootstrap interval over groups (patients) of the ECE of these slices. ECE is
    biased upwards on small samples, and a resample (with repeated patients) more so: the
    interval sits above the noise-free value, read it as the spread, with the noise floor."""
    if not len(groups) or resamples <= 0:
        return math.nan, math.nan
    groups, weights = calibration_lib.group_bootstrap(groups, resamples, rng)
    return _percentile_interval(calibration_lib.weighted_ece(confidence, correct, groups, weights))


def slice_patients(table) -> np.ndarray:
    """Per slice, the index of its patient (a slice without one: its series)."""
    patients = [p or s for p, s in zip(table.column("patient").to_pylist(),
                                       table.column("series_key").to_pylist())]
    return np.unique(np.asarray(patients, dtype=object).astype(str), return_inverse=True)[1]


def out_of_domain_series(table, series_rows) -> int | None:
    """How many series the predictor marked out of the model's domain (None: predicted
    without an out-of-distribution model, so nobody checked)."""
    if "out_of_domain" not in table.column_names:
        return None
    outside = table.column("out_of_domain").to_pylist()
    return sum(bool(outside[rows[0]]) for rows in series_rows)


def domain_note(metrics: dict) -> str:
    """The report's line on the model's domain."""
    outside = metrics.get("out_of_domain_series")
    if outside is None:
        return ("Not checked: these predictions were made without an out-of-distribution model "
                "(iap-fit), so a series outside the model's domain is not marked")
    ood = metrics.get("ood") or {}
    rule = (f": an unknown probability of at least {1 - ood['false_unknown_rate']:g} by the "
            f"{ood['score']} score, so about {ood['false_unknown_rate']:.0%} of known series are "
            f"called unknown" if ood.get("false_unknown_rate") is not None else "")
    return (f"{outside} of {metrics['series']} series are outside the model's domain (column "
            f"out_of_domain{rule}); their predictions are not to be trusted however confident "
            f"they read, they got no header QA, and the numbers above include them")


def _by_group(values: np.ndarray, groups: np.ndarray, count: int) -> np.ndarray:
    return np.bincount(groups, weights=np.asarray(values, np.float64), minlength=count)


def evaluate(pred_dir: str, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every number of the report, with the arrays the pictures need under "_plots"."""
    slices_path = os.path.join(pred_dir, "slices.parquet")
    if not epath.Path(slices_path).exists():
        raise FileNotFoundError(f"{pred_dir}: no slices.parquet; pass an iap-predict --out folder")
    metadata = tables.read_metadata(slices_path)
    encoding = LabelEncoding.from_json(metadata["label_encoding"])
    calibrators = calibration_lib.head_calibrators(metadata.get("calibration"), encoding, slices_path)
    table = tables.read_table(slices_path)
    if f"{encoding.heads[0].name}_header" not in table.column_names:
        raise ValueError(f"{pred_dir}: the input carried no headers, so there is nothing to score")
    rng = np.random.default_rng(seed)
    series_keys, series_rows = tables.series_groups(table)
    slice_patient = slice_patients(table)
    num_patients = int(slice_patient.max()) + 1 if len(slice_patient) else 0
    series_patient = np.array([slice_patient[rows[0]] for rows in series_rows], np.int64)
    result: dict[str, Any] = {"predictions": absolute(pred_dir), "step": metadata.get("step"),
                              "checkpoint": metadata.get("checkpoint"),
                              "calibrated": bool(calibrators),
                              "calibration_selection":
                                  calibration_selection(metadata.get("calibration")),
                              "calibrators": {k: c.to_json() for k, c in calibrators.items()},
                              "slices": table.num_rows, "series": len(series_keys),
                              "patients": num_patients, "bootstrap_resamples": resamples,
                              "out_of_domain_series": out_of_domain_series(table, series_rows),
                              "ood": {k: (metadata.get("ood") or {}).get(k) for k in
                                      ("score", "false_unknown_rate", "threshold")}
                              if metadata.get("ood") else None,
                              "heads": {}, "_plots": {}, "_encoding": encoding}

    def interval(values, groups, mask):
        return bootstrap_interval(_by_group(values * mask, groups, num_patients),
                                  _by_group(mask, groups, num_patients), resamples, rng)

    series_of_slices = np.empty(table.num_rows, np.int64)
    for s, rows in enumerate(series_rows):
        series_of_slices[rows] = s
    groups = {"patient": slice_patient, "series": series_of_slices}

    for head in encoding.heads:
        headers = table.column(f"{head.name}_header").to_pylist()
        if head.categorical:
            result["heads"][head.name], result["_plots"][head.name] = _categorical(
                head, table, headers, calibrators.get(head.name), series_rows,
                groups, series_patient, interval, resamples, rng)
        else:
            result["heads"][head.name], result["_plots"][head.name] = _continuous(
                head, table, headers, series_rows, slice_patient, series_patient, interval)
    return result


def _categorical(head, table, headers, calibrator, series_rows, groups, series_patient,
                 interval, resamples, rng):
    from sklearn.metrics import confusion_matrix, recall_score

    slice_patient = groups["patient"]
    truth = class_indices(head, headers)
    mask = (truth >= 0).astype(np.float64)
    raw = tables.slice_probabilities(table, head)
    calibrated = tables.slice_probabilities(table, head, calibrator)
    order = np.argsort(-calibrated, axis=1, kind="stable")
    top1 = order[:, 0]
    hit1 = (top1 == truth).astype(np.float64)
    hit2 = np.any(order[:, :2] == truth[:, None], axis=1).astype(np.float64)
    labelled = mask > 0
    n = int(labelled.sum())
    m: dict[str, Any] = {"kind": "categorical", "classes": len(head.classes), "slices": n,
                         "calibrator": calibrator.family if calibrator else None}
    plot: dict[str, Any] = {}
    if n:
        scores = metrics.summarise(head, metrics.categorical_sums(labelled, hit1 > 0, hit2 > 0))
        m["top1"], m["top2"] = scores["top1"], scores["top2"]
        m["top1_ci"] = interval(hit1, slice_patient, mask)
        m["top2_ci"] = interval(hit2, slice_patient, mask)
        recalls = recall_score(truth[labelled], top1[labelled], labels=range(head.size),
                               average=None, zero_division=np.nan)
        present = set(truth[labelled].tolist())
        m["recall"] = {head.classes[c]: float(recalls[c]) for c in sorted(present)}
        for label, probs in (("before", raw), ("after", calibrated)):
            confidence = probs.max(axis=1)[labelled]
            correct = (probs.argmax(axis=1) == truth)[labelled]
            m[f"ece_{label}"] = calibration_lib.expected_calibration_error(confidence, correct)
            plot[label] = (*calibration_lib.reliability(confidence, correct), m[f"ece_{label}"])
        # How far the calibrated ECE could move with other patients, and what sampling alone
        # gives a perfectly calibrated model on this many series.
        m["ece_after_ci"] = ece_interval(calibrated.max(axis=1)[labelled], hit1[labelled] > 0,
                                         slice_patient[labelled], resamples, rng)
        floor = calibration_lib.ece_noise_floor(calibrated[labelled], groups["series"][labelled],
                                                resamples, rng)
        if len(floor):
            m["ece_floor"], m["ece_floor_p95"] = float(floor.mean()), float(np.percentile(floor, 95))
        plot["confusion"] = confusion_matrix(truth[labelled], top1[labelled], labels=range(head.size))
    # Series: the mean of the slice probabilities, scored against the commonest slice truth.
    s_truth, s_hit1, s_hit2 = [], [], []
    for rows in series_rows:
        labelled_rows = [int(truth[i]) for i in rows if truth[i] >= 0]
        t = commonest([head.classes[c] for c in labelled_rows])
        mean = calibrated[rows].mean(axis=0)
        ranked = np.argsort(-mean, kind="stable")
        s_truth.append(head.classes.index(t) if t is not None else -1)
        s_hit1.append(float(s_truth[-1] >= 0 and ranked[0] == s_truth[-1]))
        s_hit2.append(float(s_truth[-1] >= 0 and s_truth[-1] in ranked[:2]))
    s_mask = (np.array(s_truth) >= 0).astype(np.float64)
    if s_mask.sum():
        scores = metrics.summarise(head, metrics.categorical_sums(s_mask > 0, np.array(s_hit1) > 0,
                                                                  np.array(s_hit2) > 0))
        m["series"] = int(scores["count"])
        m["series_top1"], m["series_top2"] = scores["top1"], scores["top2"]
        m["series_top1_ci"] = interval(np.array(s_hit1), series_patient, s_mask)
    return m, plot


def _continuous(head, table, headers, series_rows, slice_patient, series_patient, interval):
    predicted = np.asarray(table.column(head.name).to_numpy(), np.float64)
    truth = metrics.label_values(head, headers)
    valid = np.isfinite(truth)
    m: dict[str, Any] = {"kind": "continuous", "unit": head.unit, "slices": int(valid.sum())}
    plot: dict[str, Any] = {}
    if valid.any():
        error = np.where(valid, predicted - truth, 0.0)
        scores = metrics.summarise(head, metrics.continuous_sums(predicted, truth))
        m["mae"], m["r2"] = scores["mae"], scores["r2"]
        m["bias"] = float(error[valid].mean())
        m["mae_ci"] = interval(np.abs(error), slice_patient, valid.astype(np.float64))
        plot["true"], plot["predicted"] = truth[valid], predicted[valid]
    s_pred = np.array([np.median(predicted[rows]) for rows in series_rows])
    s_true = np.array([np.median(truth[rows][valid[rows]]) if valid[rows].any() else math.nan
                       for rows in series_rows])
    s_valid = np.isfinite(s_true)
    if s_valid.any():
        s_error = np.where(s_valid, s_pred - s_true, 0.0)
        m["series"] = int(s_valid.sum())
        m["series_mae"] = metrics.summarise(head, metrics.continuous_sums(s_pred, s_true))["mae"]
        m["series_mae_ci"] = interval(np.abs(s_error), series_patient, s_valid.astype(np.float64))
    return m, plot


def calibration_selection(calibration: dict | None) -> dict | None:
    """How a calibration chose its heads' families (None for one from before the choice):
    {"selection": its settings, "heads": {IAP: {"family", "cv"}}}."""
    if not calibration or "selection" not in calibration:
        return None
    heads = (calibration.get("fitted_on") or {}).get("heads", {})
    return {"selection": calibration["selection"],
            "heads": {k: {"family": v.get("family"), "cv": v.get("cv", {})} for k, v in heads.items()}}
