"""Series selection, slice sampling and patient splits."""
import collections

import pytest

from data_prep.discovery import Series
from data_prep.selection import SeriesSelection, phase_of, select_slices
from data_prep.splits import parse_split, salted_hash, split_of


def series(description, temporal_position=None):
    return Series("1.2.3", temporal_position, "P", description, 8, 8, (), ())


@pytest.mark.parametrize("description,temporal,phase,default_pre", [
    ("ax dyn pre", None, 0, True),
    ("ax dyn 1st pass", None, 1, False),
    ("ax dyn 4th pass", None, 4, False),
    ("ax 3d dyn", 1, 0, True),
    ("Ph1/ax 3d dyn", 2, 1, False),
    ("ax 3d dyn MP", None, 0, True),
    ("Ph3/ax 3d dyn MP", None, 3, False),
    ("Ax Vibrant MultiPhase", None, 0, True),
    ("Ph2/Ax Vibrant MultiPhase", None, 2, False),
    ("ax dynamic", None, 0, True),
    ("Ph4/ax dynamic", 5, 4, False),
    ("ax t1", None, 0, False),
    ("Ax 3D T1 NON FS", None, 0, False),
])
def test_duke_descriptions(description, temporal, phase, default_pre):
    s = series(description, temporal)
    assert phase_of(s) == phase
    assert (SeriesSelection().rejection(s) is None) == default_pre
    assert (SeriesSelection(phases="all").rejection(s) is None) == (default_pre or phase > 0)


def test_temporal_position_gives_the_phase_without_a_description_marker():
    assert phase_of(series("dce", 3)) == 2
    assert SeriesSelection(series_filter="dce", phases="pre").rejection(series("dce", 3)) is not None
    assert SeriesSelection(series_filter=".*").rejection(series("t2 tse")) is None
    with pytest.raises(ValueError, match="regex"):
        SeriesSelection(series_filter="(")


def test_slice_sampling():
    assert select_slices(5, "all") == [0, 1, 2, 3, 4]
    assert select_slices(10, "central:0.5") == [2, 3, 4, 5, 6]
    assert select_slices(7, "stride:3") == [0, 3, 6]
    assert select_slices(3, "central:0.01") == [1]
    for bad in ("central:0", "stride:0", "every", "central:x"):
        with pytest.raises(ValueError, match="slices"):
            select_slices(4, bad)


def test_splits_are_stable_when_patients_are_added():
    fractions = parse_split("0.7,0.15,0.15")
    first = {f"P{i}": split_of(f"P{i}", "s", fractions) for i in range(200)}
    more = {f"P{i}": split_of(f"P{i}", "s", fractions) for i in range(1000)}
    assert all(more[p] == first[p] for p in first)
    counts = collections.Counter(more.values())
    assert 620 < counts["train"] < 780 and 100 < counts["validation"] < 200 and 100 < counts["test"] < 200
    # Another salt gives another assignment and other hashes.
    assert sum(split_of(p, "t", fractions) != s for p, s in more.items()) > 100
    assert salted_hash("s", "patient", "P1") != salted_hash("t", "patient", "P1")
    assert salted_hash("s", "patient", "P1") != salted_hash("s", "series", "P1")


def test_split_parsing():
    assert parse_split([1, 0, 0]) == (1.0, 0.0, 0.0)
    assert {split_of(f"P{i}", "s", (1, 0, 0)) for i in range(50)} == {"train"}
    for bad in ("0.5,0.5", "0.5,0.6,0.1", "a,b,c", (-0.5, 1, 0.5)):
        with pytest.raises(ValueError, match="split"):
            parse_split(bad)
