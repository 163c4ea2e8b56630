"""Which series and slices go into the dataset.

Default (the paper's choice on Duke-Breast-Cancer-MRI): the fat-saturated DCE series, of
which `phases="pre"` keeps the pre-contrast one and `phases="all"` keeps every phase.
A DCE series is recognised by its SeriesDescription (Siemens `ax dyn pre`,
`ax dyn 1st pass`; GE `ax 3d dyn`, `ax 3d dyn MP`, `Ax Vibrant MultiPhase`, `ax dynamic`,
each post-contrast phase prefixed `PhN/`); the non-fat-sat T1 (`ax t1`,
`Ax 3D T1 NON FS`) is not one. A custom `series_filter` regex (searched, case-insensitive,
in SeriesDescription) replaces that pattern; the phase rule still applies, and a series
with no phase information counts as phase 0.

Phase: "PhN/" prefix or "Nth pass" -> N; "pre" -> 0; else TemporalPositionIdentifier - 1
(it counts from 1); else 0.
"""
from __future__ import annotations

import dataclasses
import re

from data_prep.discovery import Series

PHASE_CHOICES = ("pre", "all")
DCE_PATTERN = r"dyn|vibrant|multiphase"
NON_FAT_SAT_PATTERN = r"non[\s_-]*fs|non[\s_-]*fat"
_PHASE_PREFIX = re.compile(r"^\s*ph(\d+)\s*/", re.IGNORECASE)
_PASS = re.compile(r"(\d+)\s*(?:st|nd|rd|th)\s+pass", re.IGNORECASE)
_PRE = re.compile(r"\bpre\b", re.IGNORECASE)


def phase_of(series: Series) -> int:
    description = series.description
    for pattern in (_PHASE_PREFIX, _PASS):
        match = pattern.search(description)
        if match:
            return int(match.group(1))
    if _PRE.search(description):
        return 0
    if series.temporal_position is not None:
        return max(series.temporal_position - 1, 0)
    return 0


@dataclasses.dataclass(frozen=True)
class SeriesSelection:
    series_filter: str | None = None
    phases: str = "pre"

    def __post_init__(self):
        if self.phases not in PHASE_CHOICES:
            raise ValueError(f"phases {self.phases!r} is not one of {PHASE_CHOICES}")
        if self.series_filter is not None:
            try:
                re.compile(self.series_filter)
            except re.error as err:
                raise ValueError(f"series filter {self.series_filter!r} is not a regex: {err}") from None

    def rejection(self, series: Series) -> str | None:
        """Why the series is left out, or None if it is selected."""
        description = series.description
        if self.series_filter is not None:
            if not re.search(self.series_filter, description, re.IGNORECASE):
                return "description does not match the series filter"
        else:
            if not re.search(DCE_PATTERN, description, re.IGNORECASE):
                return "not a DCE series"
            if re.search(NON_FAT_SAT_PATTERN, description, re.IGNORECASE):
                return "not fat-saturated"
        if self.phases == "pre" and phase_of(series) != 0:
            return "post-contrast phase"
        return None


def parse_slices(spec: str) -> tuple[str, float]:
    """'all' | 'central:F' (the central fraction F of each series) | 'stride:K'."""
    kind, _, arg = spec.partition(":")
    try:
        if kind == "all" and not arg:
            return "all", 1.0
        if kind == "central" and 0 < float(arg) <= 1:
            return "central", float(arg)
        if kind == "stride" and int(arg) >= 1:
            return "stride", int(arg)
    except ValueError:
        pass
    raise ValueError(f"slices {spec!r}: expected all, central:F with 0<F<=1, or stride:K with K>=1")


def select_slices(num_slices: int, spec: str) -> list[int]:
    """Indices (into the ordered series) of the slices to keep."""
    kind, arg = parse_slices(spec)
    if kind == "central":
        count = max(1, round(num_slices * arg))
        start = (num_slices - count) // 2
        return list(range(start, start + count))
    if kind == "stride":
        return list(range(0, num_slices, int(arg)))
    return list(range(num_slices))
