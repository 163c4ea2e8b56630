"""Per-split statistics of the examples actually written (format: iap_jax.io.dataset_info)."""
from __future__ import annotations

import collections
import math
import os
from typing import Any, Iterable, Mapping

import numpy as np
from etils import epath

from iap_jax.core.iaps import IAP_NAMES, SPECS, LabelState
from iap_jax.io.dataset_info import QUANTILES, STATS_FILE
from iap_jax.io.storage import write_json_atomic


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _summary(values: Iterable[float]) -> dict[str, float]:
    values = np.asarray(list(values), np.float64)
    if values.size == 0:
        return {"count": 0}
    return {"count": int(values.size), "min": float(values.min()), "max": float(values.max()),
            "mean": float(values.mean())}


def numeric_stats(numbers: np.ndarray) -> dict[str, Any]:
    numbers = np.asarray(numbers, np.float64)
    if numbers.size == 0:
        return {"count": 0}
    stats = _summary(numbers)
    stats["std"] = float(numbers.std())
    stats["quantiles"] = {str(q): float(np.quantile(numbers, q)) for q in QUANTILES}
    positive = numbers[numbers > 0]
    logs = np.log(positive) if positive.size else np.zeros(1)
    stats["log_mean"], stats["log_std"] = float(logs.mean()), float(logs.std())
    return stats


class SplitStats:
    """Accumulates one split's examples (label fields, patient, series)."""

    def __init__(self):
        self.num_examples = 0
        self.images_per_series: collections.Counter = collections.Counter()
        self.series_of_patient: dict[str, set] = collections.defaultdict(set)
        self.states = {n: collections.Counter() for n in IAP_NAMES}
        self.values = {n: collections.Counter() for n in IAP_NAMES}
        self.numbers: dict[str, list[float]] = {n: [] for n in IAP_NAMES if SPECS[n].numeric}

    def add(self, example: Mapping[str, Any]) -> None:
        self.num_examples += 1
        series, patient = _text(example["series"]), _text(example["patient"])
        self.images_per_series[series] += 1
        self.series_of_patient[patient].add(series)
        for name in IAP_NAMES:
            label = example["labels"][name]
            state = LabelState(int(label["state"]))
            self.states[name][state.name] += 1
            if state != LabelState.PRESENT:
                continue
            self.values[name][_text(label["value"])] += 1
            if name in self.numbers and math.isfinite(float(label["number"])):
                self.numbers[name].append(float(label["number"]))

    def result(self) -> dict[str, Any]:
        iaps = {}
        for name in IAP_NAMES:
            entry = {"states": {s.name: self.states[name][s.name] for s in LabelState},
                     "value_counts": dict(sorted(self.values[name].items(), key=lambda kv: (-kv[1], kv[0])))}
            if name in self.numbers:
                entry["numeric"] = numeric_stats(np.array(self.numbers[name]))
            iaps[name] = entry
        return {
            "num_examples": self.num_examples,
            "num_series": len(self.images_per_series),
            "num_patients": len(self.series_of_patient),
            "images_per_series": _summary(self.images_per_series.values()),
            "series_per_patient": _summary(len(s) for s in self.series_of_patient.values()),
            "iaps": iaps,
        }


def compute_stats(examples_by_split: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[str, Any]:
    stats = {}
    for split, examples in examples_by_split.items():
        accumulator = SplitStats()
        for example in examples:
            accumulator.add(example)
        stats[split] = accumulator.result()
    return stats


def write_stats(dataset_dir, stats: Mapping[str, Any]) -> str:
    path = epath.Path(dataset_dir) / STATS_FILE
    write_json_atomic(path, stats)
    return os.fspath(path)
