"""bench/label_baselines.py: the majority and by-scanner reference points of the demo table."""
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "label_baselines.py"
_spec = importlib.util.spec_from_file_location("label_baselines", _PATH)
label_baselines = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(label_baselines)


def _row(model, field, agent):
    return {"ManufacturerModelName": model, "MagneticFieldStrength": field, "ContrastBolusAgent": agent}


def test_by_scanner_answers_each_scanners_commonest_value():
    train = ([_row("AVANTO", "1.494", "GADAVIST")] * 3 + [_row("AVANTO", "1.494", "MAGNEVIST")]
             + [_row("SKYRA", "2.8936", "MULTIHANCE")] * 2 + [_row("SKYRA", "2.8936", "GADAVIST")]
             + [_row("SKYRA", "3", "<absent>")])  # another field strength is another scanner
    evaluation = [_row("AVANTO", "1.494", "GADAVIST"), _row("SKYRA", "2.8936", "MULTIHANCE"),
                  _row("SKYRA", "2.8936", "GADAVIST"), _row("SKYRA", "3", "<absent>"),
                  # A scanner never seen in training gets the overall majority.
                  _row("TRIO", "2.8936", "GADAVIST")]
    result = label_baselines.baselines(train, evaluation, ["ContrastBolusAgent"])["ContrastBolusAgent"]
    assert result["majority"] == pytest.approx(3 / 5)  # GADAVIST: 4 of 8 train slices
    assert result["by_scanner"] == pytest.approx(4 / 5)


def test_ties_break_alphabetically_not_by_order():
    train = [_row("A", "1.5", "Y"), _row("A", "1.5", "X")]
    flipped = list(reversed(train))
    evaluation = [_row("A", "1.5", "X")]
    for rows in (train, flipped):
        assert label_baselines.baselines(rows, evaluation, ["ContrastBolusAgent"])["ContrastBolusAgent"] == {
            "majority": 1.0, "by_scanner": 1.0}
