"""Calibrator families, their choice by grouped cross-validation, calibration.json old and new,
and the ECE's noise floor and bootstrap, on synthetic heads whose truth is known."""
import json
import re

import numpy as np
import pytest

from iap_jax.analysis import evaluate
from iap_jax.core.labels import HeadEncoding, LabelEncoding
from iap_jax.prediction import calibration


def _draw(rng, logits):
    """One label per row drawn from softmax(logits)."""
    p = calibration.softmax(logits)
    return (rng.random((len(p), 1)) > np.cumsum(p, axis=1)).sum(axis=1).clip(0, p.shape[1] - 1)


def _class_biased_head(rng, n, classes=8):
    """A head over-confident by a factor of 1.5 that also favours its first two classes by
    4.5 nats: a class-dependent miscalibration no single temperature undoes. Returns (model
    logits, labels, patient of each slice)."""
    true = rng.normal(0, 1.5, (n, classes))
    labels = _draw(rng, true)
    model = 1.5 * true + np.r_[4.5, 4.5, np.zeros(classes - 2)]
    return model, labels, np.arange(n) // 4


def _ece(logits, labels, calibrator):
    p = calibration.probabilities(logits, calibrator)
    return calibration.expected_calibration_error(p.max(axis=1), p.argmax(axis=1) == labels)


def test_temperature_fitting_undoes_over_confidence():
    rng = np.random.default_rng(2)
    true_logits = rng.normal(0, 1.5, (4000, 6))
    labels = _draw(rng, true_logits)
    over_confident = true_logits * 3.0
    t = calibration.fit_temperature(over_confident, labels)
    assert t == pytest.approx(3.0, rel=0.15)
    assert (calibration.negative_log_likelihood(over_confident, labels, t)
            < calibration.negative_log_likelihood(over_confident, labels) - 0.1)
    before = calibration.probabilities(over_confident)
    after = calibration.probabilities(over_confident, t)
    ece = [calibration.expected_calibration_error(p.max(axis=1), p.argmax(axis=1) == labels)
           for p in (before, after)]
    assert ece[1] < 0.03 < ece[0]
    np.testing.assert_array_equal(before.argmax(axis=1), after.argmax(axis=1))


def test_bias_families_undo_a_class_dependent_miscalibration_a_temperature_cannot():
    rng = np.random.default_rng(0)
    val_logits, val_labels, _ = _class_biased_head(rng, 4000)
    test_logits, test_labels, _ = _class_biased_head(rng, 4000)
    fitted = {f: calibration.fit(val_logits, val_labels, f) for f in calibration.FAMILIES}
    nll = {f: calibration.negative_log_likelihood(val_logits, val_labels, c) for f, c in fitted.items()}
    ece = {f: _ece(test_logits, test_labels, c) for f, c in fitted.items()}
    assert nll["bcts"] < nll["temperature"] - 0.05 and nll["vector"] < nll["temperature"] - 0.05
    assert ece["temperature"] > 0.05  # the temperature leaves it visibly miscalibrated
    assert max(ece["bcts"], ece["vector"]) < min(0.03, ece["temperature"] / 2)
    # The bias it found undoes the one put in: -4.5 nats on the first two classes once divided
    # by the temperature (about 1.5), about nothing on the others.
    bias = np.array(fitted["bcts"].bias)
    assert fitted["bcts"].temperature == pytest.approx(1.5, rel=0.1)
    np.testing.assert_allclose(bias[:2] - bias[2:].mean(), -4.5 / 1.5, rtol=0.15)
    assert np.ptp(bias[2:]) < 0.3


def test_the_top_label_temperature_calibrates_the_top1_probability_where_the_nll_one_does_not():
    """A head whose top class alone is over-confident (by 1 nat over a calibrated model), as
    the low-accuracy heads of the demo are: the NLL temperature compromises between the top
    class and the rest, and leaves the top-1 probability over-confident."""
    rng = np.random.default_rng(9)

    def head(n):
        true = rng.normal(0, 1.0, (n, 10))
        model = true.copy()
        model[np.arange(n), true.argmax(axis=1)] += 1.0
        return model, _draw(rng, true)

    (val_logits, val_labels), (test_logits, test_labels) = head(10000), head(10000)
    nll_t = calibration.fit_temperature(val_logits, val_labels, "nll")
    top_t = calibration.fit_temperature(val_logits, val_labels)
    assert top_t > 1.08 * nll_t
    nll_ece, top_ece = (_ece(test_logits, test_labels, t) for t in (nll_t, top_t))
    assert nll_ece > 0.045 and top_ece < nll_ece - 0.012
    assert calibration.fit(val_logits, val_labels).temperature == top_t  # the default


def test_a_head_right_on_every_fitting_slice_is_not_made_certain():
    """Without an error to fit, the top-label temperature would run to its lower bound and
    the head's probabilities to 1.0; one pseudo-slice of each outcome keeps the top-1
    probability near (n + 1) / (n + 2)."""
    rng = np.random.default_rng(4)
    n = 700
    logits = rng.normal(0, 1.0, (n, 5))
    labels = logits.argmax(axis=1)  # the head is right on every slice
    logits[np.arange(n), labels] += 3.0
    t = calibration.fit_temperature(logits, labels)
    assert t > 2 * calibration.TEMPERATURE_BOUNDS[0]
    confidence = calibration.probabilities(logits, t).max(axis=1)
    assert 1 - 3 / (n + 2) < confidence.mean() < 1 - 0.3 / (n + 2)
    assert confidence.max() < 1.0
    # Nor by the other families, so the cross-validation has no certainty to prefer.
    for family in ("bcts", "vector"):
        c = calibration.fit(logits, labels, family)
        assert calibration.probabilities(logits, c).max(axis=1).mean() < 1 - 0.3 / (n + 2), family
    scores = calibration.cross_validate(logits, labels, np.arange(n) // 5)
    assert calibration.select_family(scores) == "temperature"
    # Without the pseudo-slices the fit is certain.
    no_prior = min(np.exp(np.linspace(np.log(0.05), np.log(20), 200)),
                   key=lambda t: calibration.top_label_loss(logits, labels, t))
    assert no_prior == pytest.approx(calibration.TEMPERATURE_BOUNDS[0])


def test_a_bias_moves_the_top1_class_and_a_temperature_never_does():
    rng = np.random.default_rng(1)
    logits, labels, _ = _class_biased_head(rng, 3000)
    before = logits.argmax(axis=1)
    t = calibration.fit(logits, labels, "temperature")
    bcts = calibration.fit(logits, labels, "bcts")
    np.testing.assert_array_equal(calibration.probabilities(logits, t).argmax(axis=1), before)
    after = calibration.probabilities(logits, bcts).argmax(axis=1)
    assert np.mean(after != before) > 0.01
    assert np.mean(after == labels) > np.mean(before == labels)  # the favoured classes were wrong


def test_fits_are_at_the_optimum_of_their_penalised_objective():
    rng = np.random.default_rng(2)
    logits, labels, _ = _class_biased_head(rng, 600, classes=5)
    for family in ("bcts", "vector"):
        c = calibration.fit(logits, labels, family, l2=0.05)
        penalty = 0.05 * (np.sum(np.square(c.bias)) + np.sum(np.square(c.log_scale)))
        best = calibration.negative_log_likelihood(logits, labels, c, calibration.PRIOR_SLICES) + penalty
        for _ in range(20):  # no nearby calibrator of the family does better
            step = rng.normal(0, 0.02, 1 + 2 * 5)
            other = calibration.HeadCalibration(
                family, c.temperature * np.exp(step[0]), tuple(np.array(c.bias) + step[1:6]),
                tuple(np.array(c.log_scale) + step[6:]) if family == "vector" else ())
            other_penalty = 0.05 * (np.sum(np.square(other.bias)) + np.sum(np.square(other.log_scale)))
            assert (calibration.negative_log_likelihood(logits, labels, other, calibration.PRIOR_SLICES)
                    + other_penalty > best - 1e-9)
    # A class absent from the fitting data keeps a finite bias.
    present = labels != 4
    c = calibration.fit(logits[present], labels[present], "bcts")
    assert np.isfinite(c.bias).all() and c.bias[4] == min(c.bias)
    # The top-label temperature minimises its own objective, not the NLL.
    t = calibration.fit_temperature(logits, labels)
    for other in (0.9 * t, 1.1 * t):
        assert calibration.top_label_loss(logits, labels, other) > calibration.top_label_loss(logits, labels, t)


def test_cross_validation_keeps_patients_whole_and_picks_a_bias_family_when_one_is_needed():
    rng = np.random.default_rng(4)
    groups = np.repeat(rng.permutation(300), 5)
    folds = calibration.group_folds(groups, 5, rng)
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1
    assert sorted(np.bincount(folds)) == [300] * 5
    logits, labels, patients = _class_biased_head(rng, 2400)
    scores = calibration.cross_validate(logits, labels, patients, repeats=1)
    assert set(scores) == set(calibration.FAMILIES)
    assert scores["temperature"]["ece"] > scores["bcts"]["ece"]
    assert scores["bcts"]["ece_difference"][1] < 0  # significantly better, paired over patients
    assert calibration.select_family(scores) in ("bcts", "vector")
    # Lower, but not by more than the noise: the temperature stays.
    assert calibration.select_family({"temperature": {"ece": 0.05},
                                      "bcts": {"ece": 0.04, "ece_difference": [-0.03, 0.01]},
                                      "vector": {"ece": 0.045, "ece_difference": [-0.02, -0.002]}}) == "vector"
    assert calibration.select_family({"temperature": {"ece": 0.05},
                                      "bcts": {"ece": 0.04, "ece_difference": [-0.03, 0.01]}}) == "temperature"
    # A head the model gets right: every family's ECE is about 0, and none is "better".
    assert calibration.select_family({"temperature": {"ece": 1e-6},
                                      "bcts": {"ece": 0.0, "ece_difference": [-2e-6, -1e-7]}}) == "temperature"
    # On a head a temperature calibrates, the richer families are not chosen.
    true = rng.normal(0, 1.5, (2000, 8))
    plain = 2.0 * true, _draw(rng, true)
    plain_scores = calibration.cross_validate(*plain, np.arange(2000) // 5, repeats=1)
    assert calibration.select_family(plain_scores) == "temperature"


def test_old_calibration_files_still_load_as_temperatures(tmp_path):
    (tmp_path / calibration.CALIBRATION_FILE).write_text(json.dumps(
        {"step": 7, "temperatures": {"FOV": 1.7, "Manufacturer": 0.8}, "qa": {"thresholds": {}}}))
    data = calibration.load_calibration(str(tmp_path), 7)
    calibrators = calibration.head_calibrators(data)
    assert calibrators == {"FOV": calibration.HeadCalibration("temperature", 1.7),
                           "Manufacturer": calibration.HeadCalibration("temperature", 0.8)}
    logits = np.random.default_rng(5).normal(0, 3, (10, 6))
    np.testing.assert_allclose(calibration.probabilities(logits, calibrators["FOV"]),
                               calibration.softmax(logits / 1.7), rtol=1e-12)
    assert calibration.head_calibrators(None) == {}


@pytest.mark.parametrize("family", calibration.FAMILIES)
def test_each_family_round_trips_through_calibration_json(tmp_path, family):
    rng = np.random.default_rng(6)
    logits, labels, _ = _class_biased_head(rng, 800, classes=6)
    fitted = calibration.fit(logits, labels, family)
    assert fitted.family == family
    assert len(fitted.bias) == (6 if family != "temperature" else 0)
    assert len(fitted.log_scale) == (6 if family == "vector" else 0)
    calibration.save_calibration(str(tmp_path), {"step": 3, "calibrators": {"FOV": fitted.to_json()}})
    loaded = calibration.head_calibrators(calibration.load_calibration(str(tmp_path), 3))["FOV"]
    assert loaded == fitted
    np.testing.assert_array_equal(calibration.probabilities(logits, loaded),
                                  calibration.probabilities(logits, fitted))
    if family != "temperature":
        with pytest.raises(ValueError, match="6 per-class terms for a head of 5"):
            calibration.probabilities(logits[:, :5], loaded)
    with pytest.raises(ValueError, match="not one of"):
        calibration.HeadCalibration.from_json({"family": "isotonic"})


def test_a_calibration_that_does_not_match_the_label_encoding_fails_at_load(tmp_path):
    encoding = LabelEncoding((HeadEncoding("FOV", "categorical", classes=tuple("abcde")),
                              HeadEncoding("EchoTime", "continuous", transform="log")))
    path = str(tmp_path / calibration.CALIBRATION_FILE)
    six = calibration.HeadCalibration("bcts", 1.2, (0.1,) * 6).to_json()
    five = calibration.HeadCalibration("vector", 1.2, (0.1,) * 5, (0.0,) * 5).to_json()
    for calibrators, message in (
            ({"FOV": six}, "FOV: calibrator has 6 per-class terms for a head of 5 classes"),
            ({"FOV": {**five, "log_scale": [0.0] * 4}}, "FOV: calibrator has 4 per-class terms"),
            ({"FOV": {"family": "isotonic"}}, "FOV: calibration family 'isotonic': not one of"),
            ({"FOV": five, "EchoTime": {"temperature": 2.0}}, "EchoTime: no categorical head"),
            ({"ScanOptions": five}, "ScanOptions: no categorical head")):
        calibration.save_calibration(str(tmp_path), {"step": 3, "calibrators": calibrators})
        data = calibration.load_calibration(str(tmp_path), 3)
        with pytest.raises(ValueError, match=f"^{re.escape(path)}: {re.escape(message)}"):
            calibration.head_calibrators(data, encoding, path)
    # A matching file, old or new, loads as it does without the encoding.
    for data in ({"calibrators": {"FOV": five}}, {"temperatures": {"FOV": 1.5}}):
        assert calibration.head_calibrators(data, encoding, path) == calibration.head_calibrators(data)


def _calibrated_series(rng, series, slices=5, classes=9, draws=1):
    """Probabilities of a perfectly calibrated model: every slice of a series carries its
    series' probabilities, whose label is drawn from them. Returns (probabilities, series of
    each slice, [draws, slices] labels: `draws` independent label sets)."""
    logits = rng.normal(0, 1.0, (series, classes)) * rng.uniform(0.5, 4.0, (series, 1))
    labels = np.stack([np.repeat(_draw(rng, logits), slices) for _ in range(draws)])
    probs = np.repeat(calibration.softmax(logits), slices, axis=0)
    return probs, np.repeat(np.arange(series), slices), labels


def test_noise_floor_matches_the_ece_of_perfectly_calibrated_data():
    rng = np.random.default_rng(7)
    # 600 fresh label sets of the same series, drawn independently of the floor's code.
    probs, series, label_sets = _calibrated_series(rng, 300, draws=600)
    measured = [calibration.expected_calibration_error(probs.max(axis=1), probs.argmax(axis=1) == labels)
                for labels in label_sets]
    floor = calibration.ece_noise_floor(probs, series, 2000, rng)
    assert floor.mean() == pytest.approx(np.mean(measured), rel=0.08)
    assert np.percentile(floor, 95) == pytest.approx(np.percentile(measured, 95), rel=0.12)
    # Slices drawn as if independent would understate it: 5 slices per series are not 5 draws.
    independent = calibration.ece_noise_floor(probs, np.arange(len(probs)), 2000, rng)
    assert independent.mean() < 0.7 * floor.mean()


def test_weighted_ece_and_its_bootstrap_interval():
    rng = np.random.default_rng(8)
    probs, series, (labels,) = _calibrated_series(rng, 200)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    ece = calibration.expected_calibration_error(confidence, correct)
    ones = np.ones((1, 200))
    assert calibration.weighted_ece(confidence, correct, series, ones)[0] == pytest.approx(ece, abs=1e-12)
    twice_first = np.r_[2.0, np.ones(199)][None]
    manual = np.r_[np.arange(5), np.arange(len(series))]
    assert calibration.weighted_ece(confidence, correct, series, twice_first)[0] == pytest.approx(
        calibration.expected_calibration_error(confidence[manual], correct[manual]), abs=1e-12)
    low, high = evaluate.ece_interval(confidence, correct, series, 500, rng)
    assert 0 < low < high < 1 and high - low > 0.01
