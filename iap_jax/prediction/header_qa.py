"""Header QA: does a series' header contradict a prediction confident enough to say so?

For each QA IAP, a series is flagged when 1 - P(the class of its header) reaches the IAP's
threshold (the header is wrong, the prediction says), or when its header is missing and the
top-1 answer is that sure ("missing_header:<IAP>"). The thresholds are fitted on the
validation split's correctly labelled series (iap-fit) so that at most QA_FALSE_FLAG_RATE of
them get any flag, the budget shared by the QA IAPs; iap-predict applies them
(tables.series_table), never to a series outside the model's domain, and iap-eval lists
the flagged series. Everything here is arrays and values: the tables are read elsewhere.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from iap_jax.core.labels import HeadEncoding, target_class

QA_IAPS = ("Manufacturer", "ManufacturerModelName", "MagneticFieldStrength", "PatientPosition")
QA_FALSE_FLAG_RATE = 0.02
OUT_OF_DOMAIN_NOTE = "not applied: the series is outside the model's domain"


def commonest(values: Sequence) -> Any:
    """The most frequent value that is not None (ties: the first by its text); None if none."""
    counts: dict[Any, int] = {}
    for v in values:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    if not counts:
        return None
    return max(sorted(counts, key=str), key=counts.get)


def qa_flags(head, answer_probability: float, header, header_probability: float | None,
             threshold: float) -> list[str]:
    """Header QA of one series and IAP: the IAP when the prediction is at least `threshold`
    sure that the header is wrong (1 - the probability of the header's class), and
    "missing_header:<IAP>" when the header is missing and the top-1 answer is that sure."""
    if header is None:
        return [f"missing_header:{head.name}"] if answer_probability >= threshold else []
    if target_class(head, header) is None or header_probability is None:
        return []
    return [head.name] if 1.0 - header_probability >= threshold else []


def header_probability(head, mean: np.ndarray, header) -> float | None:
    """The (mean) probability a prediction gives the class of a header value."""
    target = target_class(head, header)
    return None if target is None else float(mean[head.classes.index(target)])


def qa_threshold(scores: np.ndarray, rate: float, floor: float = 0.5) -> float:
    """The lowest threshold at which at most `rate` of these correctly labelled series would
    be flagged, a series being flagged when its score (1 - P(header's class)) reaches it."""
    ranked = np.sort(np.asarray(scores, np.float64))[::-1]
    allowed = int(math.floor(rate * len(ranked)))
    if len(ranked) <= allowed:
        return floor
    # Just above the (allowed + 1)-th highest score: only `allowed` reach it.
    return float(max(floor, np.nextafter(ranked[allowed], np.inf)))


def series_scores(head: HeadEncoding, probs: np.ndarray, headers: Sequence,
                  series_rows: Sequence[np.ndarray]) -> np.ndarray:
    """1 - P(the class of the series' header) for every series whose header has a class:
    the mean of its slices' probabilities against its commonest slice header."""
    scores = []
    for rows in series_rows:
        p = header_probability(head, probs[rows].mean(axis=0), commonest([headers[i] for i in rows]))
        if p is not None:
            scores.append(1.0 - p)
    return np.array(scores)


def fit_thresholds(heads: Sequence[HeadEncoding], probs: Mapping[str, np.ndarray],
                   headers: Mapping[str, Sequence], series_rows: Sequence[np.ndarray],
                   false_flag_rate: float = QA_FALSE_FLAG_RATE) -> dict[str, float]:
    """Per QA head, the threshold that flags at most its share of false_flag_rate of these
    (correctly labelled, validation) series."""
    rate = false_flag_rate / max(len(heads), 1)
    return {head.name: qa_threshold(series_scores(head, probs[head.name], headers[head.name],
                                                  series_rows), rate)
            for head in heads}

