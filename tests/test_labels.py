import math

import numpy as np
import pytest

from iap_jax.core.iaps import IAP_NAMES, LabelState
from iap_jax.core.labels import ABSENT, EMPTY, OTHER, LabelEncoding

P, A, E, I = (int(s) for s in (LabelState.PRESENT, LabelState.ABSENT, LabelState.EMPTY,
                               LabelState.INVALID))


def _stats():
    iaps = {name: {"states": {"PRESENT": 0}, "value_counts": {}} for name in IAP_NAMES}
    iaps["Manufacturer"]["value_counts"] = {"SIEMENS": 10, "GE MEDICAL SYSTEMS": 8, "PHILIPS": 1}
    iaps["SliceThickness"]["value_counts"] = {"10": 3, "2": 5, "1.5": 4}
    iaps["SliceThickness"]["numeric"] = {"count": 12, "mean": 3.6, "std": 3.4,
                                         "log_mean": 1.0, "log_std": 0.5}
    iaps["ContrastBolusAgent"]["value_counts"] = {"GADAVIST": 4}
    iaps["ContrastBolusAgent"]["states"] = {"PRESENT": 4, "ABSENT": 3, "EMPTY": 2}
    for name, mean in (("EchoTime", 2.0), ("RepetitionTime", 5.0)):
        iaps[name]["numeric"] = {"count": 10, "mean": mean, "std": 0.5,
                                 "log_mean": math.log(mean), "log_std": 0.25}
    return {"num_examples": 19, "iaps": iaps}


def _batch(**columns):
    """columns: IAP -> list of (state, value, number)."""
    batch = {}
    for name in IAP_NAMES:
        rows = columns.get(name, [(A, "", math.nan)] * len(next(iter(columns.values()))))
        batch[name] = {"state": np.array([r[0] for r in rows], np.int32),
                       "value": np.array([r[1].encode() for r in rows], object),
                       "number": np.array([r[2] for r in rows], np.float32)}
    return batch


def test_vocabulary_min_count_other_and_missing_classes():
    enc = LabelEncoding.from_stats(_stats(), min_count=2)
    assert enc.head("Manufacturer").classes == ("GE MEDICAL SYSTEMS", "SIEMENS", OTHER)
    assert enc.head("SliceThickness").classes == ("1.5", "2", "10")  # numeric order, none rare
    assert LabelEncoding.from_stats(_stats(), always_other=True).head("FlipAngle").classes == (OTHER,)
    assert enc.head("ContrastBolusAgent").classes == ("GADAVIST", ABSENT, EMPTY)
    assert enc.head_sizes()["EchoTime"] == 1
    strict = LabelEncoding.from_stats(_stats(), min_count=1)
    assert strict.head("Manufacturer").classes == ("GE MEDICAL SYSTEMS", "PHILIPS", "SIEMENS")


def test_encode_targets_and_masks():
    enc = LabelEncoding.from_stats(_stats(), min_count=2)
    targets, masks = enc.encode(_batch(
        Manufacturer=[(P, "SIEMENS", math.nan), (P, "TOSHIBA", math.nan), (A, "", math.nan),
                      (I, "", math.nan)],
        ContrastBolusAgent=[(P, "GADAVIST", math.nan), (A, "", math.nan), (E, "", math.nan),
                            (I, "", math.nan)],
        EchoTime=[(P, "2", 2.0), (P, "4", 4.0), (A, "", math.nan), (P, "0", 0.0)]))
    np.testing.assert_array_equal(targets["Manufacturer"][:2], [1, 2])  # unseen -> other
    np.testing.assert_array_equal(masks["Manufacturer"], [1, 1, 0, 0])
    np.testing.assert_array_equal(targets["ContrastBolusAgent"][:3], [0, 1, 2])
    np.testing.assert_array_equal(masks["ContrastBolusAgent"], [1, 1, 1, 0])
    np.testing.assert_allclose(targets["EchoTime"], [0.0, math.log(2) / 0.25, 0.0, 0.0], atol=1e-6)
    np.testing.assert_array_equal(masks["EchoTime"], [1, 1, 0, 0])  # log of 0 is masked
    assert all(np.isfinite(t).all() for t in targets.values())
    # Without an <other> class an unseen value is unlabelled; repeated values map alike.
    strict = LabelEncoding.from_stats(_stats(), min_count=1, always_other=False)
    assert OTHER not in strict.head("Manufacturer").classes
    targets, masks = strict.encode(_batch(Manufacturer=[
        (P, "TOSHIBA", math.nan), (P, "SIEMENS", math.nan), (P, "PHILIPS", math.nan),
        (P, "SIEMENS", math.nan)]))
    np.testing.assert_array_equal(masks["Manufacturer"], [0, 1, 1, 1])
    np.testing.assert_array_equal(targets["Manufacturer"], [0, 2, 1, 2])


def test_config_can_make_numeric_iap_continuous_and_decode_real_units():
    enc = LabelEncoding.from_stats(_stats(), kinds={"SliceThickness": "continuous"},
                                   transforms={"SliceThickness": "zscore", "EchoTime": "log"})
    head = enc.head("SliceThickness")
    assert not head.categorical and head.unit == "mm"
    targets, _ = enc.encode(_batch(SliceThickness=[(P, "7", 7.0)]))
    outputs = {h.name: np.zeros((1, h.size)) for h in enc.heads}
    outputs["SliceThickness"] = targets["SliceThickness"][:, None]
    outputs["Manufacturer"] = np.array([[0.0, 2.0, 1.0]])
    decoded = enc.decode(outputs, top_k=2)
    assert decoded["SliceThickness"]["value"][0] == pytest.approx(7.0, rel=1e-5)
    assert decoded["EchoTime"]["value"][0] == pytest.approx(2.0)  # exp(log_mean)
    assert list(decoded["Manufacturer"]["top_classes"][0]) == ["PHILIPS", "SIEMENS"]
    assert decoded["Manufacturer"]["top_probs"][0, 0] > decoded["Manufacturer"]["top_probs"][0, 1]
    with pytest.raises(ValueError, match="Manufacturer"):
        LabelEncoding.from_stats(_stats(), kinds={"Manufacturer": "continuous"})


def test_json_round_trip():
    enc = LabelEncoding.from_stats(_stats(), min_count=2, transforms={"RepetitionTime": "raw"})
    assert LabelEncoding.from_json(enc.to_json()) == enc
    import json
    assert LabelEncoding.from_json(json.dumps(enc.to_json())) == enc


def test_bad_stats_and_names():
    with pytest.raises(ValueError, match="one split"):
        LabelEncoding.from_stats({"train": _stats()})
    with pytest.raises(ValueError, match="unknown IAP"):
        LabelEncoding.from_stats(_stats(), kinds={"Colour": "categorical"})


def test_aliases_join_one_scanners_spellings_only_when_asked():
    from iap_jax.core.labels import target_class

    stats = _stats()
    stats["iaps"]["Manufacturer"]["value_counts"] = {"SIEMENS": 10, "SIEMENS HEALTHINEERS": 4,
                                                     "GE MEDICAL SYSTEMS": 8}
    plain = LabelEncoding.from_stats(stats).head("Manufacturer")
    assert "SIEMENS HEALTHINEERS" in plain.classes  # off by default
    encoding = LabelEncoding.from_stats(stats, aliases=True)
    head = encoding.head("Manufacturer")
    assert "SIEMENS HEALTHINEERS" not in head.classes and "SIEMENS" in head.classes
    targets, masks = encoding.encode(_batch(Manufacturer=[(P, "SIEMENS HEALTHINEERS", math.nan),
                                                           (P, "SIEMENS", math.nan)]))
    assert targets["Manufacturer"][0] == targets["Manufacturer"][1] == head.classes.index("SIEMENS")
    again = LabelEncoding.from_json(encoding.to_json())
    assert again == encoding
    assert target_class(again.head("Manufacturer"), "SIEMENS HEALTHINEERS") == "SIEMENS"
