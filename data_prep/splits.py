"""Patient-level splits and identifiers from a salted hash.

A patient's split depends only on (salt, PatientID): the hash maps to a number in [0, 1)
that falls into the cumulative split fractions, so adding patients never moves old ones
and one patient never lands in two splits. Records carry salted hashes only; without the
salt they cannot be linked back to a PatientID or a UID.
"""
from __future__ import annotations

import math
from typing import Sequence

from iap_jax.io.salt import salted_hash

SPLIT_NAMES = ("train", "validation", "test")


def parse_split(split: str | Sequence[float]) -> tuple[float, float, float]:
    """'0.7,0.15,0.15' or a 3-sequence of non-negative fractions summing to 1."""
    values = split.split(",") if isinstance(split, str) else list(split)
    try:
        fractions = tuple(float(v) for v in values)
    except ValueError:
        raise ValueError(f"split {split!r}: expected three numbers") from None
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split {split!r}: expected three non-negative fractions summing to 1")
    return fractions


def unit_interval(salt: str, patient_id: str) -> float:
    return int(salted_hash(salt, "split", patient_id), 16) / 16 ** 16


def split_of(patient_id: str, salt: str, fractions: Sequence[float]) -> str:
    u = unit_interval(salt, patient_id)
    cumulative = 0.0
    for name, fraction in zip(SPLIT_NAMES, fractions):
        cumulative += fraction
        if u < cumulative:
            return name
    # Rounding of the fractions can leave u just above the last boundary.
    return [n for n, f in zip(SPLIT_NAMES, fractions) if f > 0][-1]
