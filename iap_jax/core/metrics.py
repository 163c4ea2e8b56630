"""The scores of the heads, one implementation for every stage: sums that add across
batches and hosts, the scores made from them, and the one table that prints them.

Per categorical head: labelled count, top-1 and top-2 hits, and the confusion matrix
(rows: true class, columns: predicted). Per continuous head, in real
units (the encoding's inverse transform): count, sum |error|, sum error^2, sum y, sum y^2,
giving MAE and R^2 (`summarise`). `metric_sums` runs inside the jitted eval step, where the
sums span the global batch, and `MetricSums` accumulates the host copies (training's
validation); `categorical_sums` / `continuous_sums` make the same sums from decoded
predictions (the predictor's summary, iap-eval's point estimates). `score_table` prints them.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from iap_jax.core.iaps import SPECS
from iap_jax.core.labels import ABSENT, EMPTY, OTHER, HeadEncoding, LabelEncoding


def metric_sums(outputs: Mapping, targets: Mapping, masks: Mapping,
                encoding: LabelEncoding) -> dict[str, dict[str, jax.Array]]:
    sums = {}
    for head in encoding.heads:
        out, target, mask = outputs[head.name], targets[head.name], masks[head.name]
        if head.categorical:
            k = min(2, head.size)
            _, top = jax.lax.top_k(out, k)
            hit = top == target[:, None]
            truth = jax.nn.one_hot(target, head.size) * mask[:, None]
            predicted = jax.nn.one_hot(top[:, 0], head.size)
            sums[head.name] = {"count": jnp.sum(mask),
                               "top1": jnp.sum(hit[:, 0] * mask),
                               "top2": jnp.sum(jnp.any(hit, axis=-1) * mask),
                               "confusion": truth.T @ predicted}
        else:
            pred = head.from_standard(out.reshape(out.shape[0], -1)[:, 0].astype(jnp.float32))
            true = head.from_standard(jnp.where(mask > 0, target, 0.0))
            err = jnp.where(mask > 0, pred - true, 0.0)
            true = jnp.where(mask > 0, true, 0.0)
            sums[head.name] = {"count": jnp.sum(mask), "abs_err": jnp.sum(jnp.abs(err)),
                               "sq_err": jnp.sum(err * err), "y": jnp.sum(true),
                               "y2": jnp.sum(true * true)}
    return sums


class MetricSums:
    """Host-side running totals (float64) of metric_sums over batches (or hosts)."""

    def __init__(self):
        self.totals: dict[str, dict[str, float]] = {}

    def add(self, sums: Mapping[str, Mapping[str, float]]) -> "MetricSums":
        for head, values in jax.device_get(sums).items():
            bucket = self.totals.setdefault(head, {})
            for key, value in values.items():
                bucket[key] = bucket.get(key, 0.0) + np.asarray(value, np.float64)
        return self

    def confusion(self, name: str) -> np.ndarray:
        """Counts [true class, predicted class] of a categorical head."""
        return self.totals[name]["confusion"]

    def summary(self, encoding: LabelEncoding) -> dict[str, dict[str, float]]:
        """Per head: categorical {count, top1, top2}; continuous {count, mae, r2, unit}
        (NaN where nothing was labelled)."""
        return {head.name: summarise(head, self.totals.get(head.name, {})) for head in encoding.heads}


def summarise(head: HeadEncoding, sums: Mapping[str, float]) -> dict[str, float]:
    """Scores from one head's sums: categorical {count, top1, top2}; continuous {count, mae,
    r2, unit} (NaN where nothing was labelled, R^2 where the truth does not vary)."""
    t = {k: float(v) for k, v in sums.items() if k != "confusion"}
    n = t.get("count", 0.0)
    if head.categorical:
        return {"count": n, "top1": t["top1"] / n if n else math.nan,
                "top2": t["top2"] / n if n else math.nan}
    mae = t["abs_err"] / n if n else math.nan
    total_var = t.get("y2", 0.0) - t.get("y", 0.0) ** 2 / n if n else math.nan
    r2 = 1.0 - t["sq_err"] / total_var if n and total_var > 0 else math.nan
    return {"count": n, "mae": mae, "r2": r2, "unit": head.unit}


def categorical_sums(labelled, hit1, hit2) -> dict[str, float]:
    """A categorical head's sums from decoded predictions: per row whether it has a label,
    whether the top-1 class and whether one of the top two classes is it."""
    labelled = np.asarray(labelled, bool)
    return {"count": float(labelled.sum()), "top1": float((np.asarray(hit1, bool) & labelled).sum()),
            "top2": float((np.asarray(hit2, bool) & labelled).sum())}


def continuous_sums(predicted, truth) -> dict[str, float]:
    """A continuous head's sums from predictions and labels in real units (NaN: no label)."""
    predicted, truth = np.asarray(predicted, np.float64), np.asarray(truth, np.float64)
    valid = np.isfinite(truth)
    error, truth = predicted[valid] - truth[valid], truth[valid]
    return {"count": float(valid.sum()), "abs_err": float(np.abs(error).sum()),
            "sq_err": float((error * error).sum()), "y": float(truth.sum()),
            "y2": float((truth * truth).sum())}


def label_values(head: HeadEncoding, headers) -> np.ndarray:
    """A continuous head's header values as labels in real units: NaN where there is none,
    or where the head's transform cannot take it (a log head's values must be positive)."""
    truth = np.array([math.nan if h is None else h for h in headers], np.float64)
    usable = np.isfinite(truth) & ((truth > 0) | (head.transform != "log"))
    return np.where(usable, truth, math.nan)


def score_table(scores: Mapping[str, Mapping[str, float]],
                baseline: Mapping[str, float] | None = None) -> str:
    """The per-IAP table of training's validation and the predictor's summary: count, top-1,
    top-2 (and the majority baseline) or MAE and R^2, and the series' scores where given."""
    with_series = any("series_count" in m for m in scores.values())
    header = f"{'IAP':<24} {'n':>6} {'top-1':>7} {'top-2':>7}"
    header += f" {'majority':>9}" if baseline is not None else ""
    header += f" {'MAE':>12} {'R2':>7}"
    header += f" {'series':>7} {'top-1':>7} {'MAE':>12}" if with_series else ""
    lines = [header]

    def number(value, spec: str, width: int) -> str:
        return f"{'-':>{width}}" if value is None or value != value else f"{value:>{width}{spec}}"

    for name, m in scores.items():
        categorical = "top1" in m
        unit = f" {m['unit']}" if m.get("unit") else ""
        row = f"{name:<24} {int(m['count']):>6}"
        row += (f" {number(m['top1'], '.3f', 7)} {number(m['top2'], '.3f', 7)}" if categorical
                else f" {'':>7} {'':>7}")
        if baseline is not None:
            row += f" {number(baseline.get(name), '.3f', 9)}" if categorical else f" {'':>9}"
        row += (f" {'':>12} {'':>7}" if categorical else
                f" {number(m['mae'], '.3g', 12 - len(unit))}{unit} {number(m.get('r2'), '.3f', 7)}")
        if with_series:
            row += f" {int(m.get('series_count', 0)):>7}"
            row += (f" {number(m.get('series_top1'), '.3f', 7)} {'':>12}" if categorical else
                    f" {'':>7} {number(m.get('series_mae'), '.3g', 12 - len(unit))}{unit}")
        lines.append(row.rstrip())
    return "\n".join(lines)


def mean_top1(summary: Mapping[str, Mapping[str, float]]) -> float:
    """Mean top-1 accuracy over the categorical heads that had labels."""
    values = [m["top1"] for m in summary.values() if "top1" in m and not np.isnan(m["top1"])]
    return float(np.mean(values)) if values else math.nan


def class_counts(head: HeadEncoding, split_stats: Mapping) -> dict[str, float]:
    """Labelled examples per class of a categorical head, from one split's statistics."""
    iap = split_stats["iaps"].get(head.name, {})
    counts: dict[str, float] = {}
    for value, n in iap.get("value_counts", {}).items():
        cls = head.canonical(value)
        cls = cls if cls in head.classes else OTHER
        if cls in head.classes:
            counts[cls] = counts.get(cls, 0) + n
    if SPECS[head.name].missing_is_class:
        states = iap.get("states", {})
        counts[ABSENT] = counts.get(ABSENT, 0) + states.get("ABSENT", 0)
        counts[EMPTY] = counts.get(EMPTY, 0) + states.get("EMPTY", 0)
    return counts


def majority_baseline(encoding: LabelEncoding, train_stats: Mapping,
                      eval_stats: Mapping) -> dict[str, float]:
    """Per categorical head, the top-1 accuracy on the eval split of always answering the
    train split's most common class: the chance level a model must clearly beat."""
    baseline = {}
    for head in encoding.heads:
        if not head.categorical:
            continue
        train_counts = class_counts(head, train_stats)
        eval_counts = class_counts(head, eval_stats)
        total = sum(eval_counts.values())
        if not train_counts or not total:
            baseline[head.name] = math.nan
            continue
        majority = max(sorted(train_counts), key=train_counts.get)
        baseline[head.name] = eval_counts.get(majority, 0) / total
    return baseline
