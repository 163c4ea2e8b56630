import math

import jax.numpy as jnp
import numpy as np
import pytest

from iap_jax.core.labels import HeadEncoding, LabelEncoding
from iap_jax.core.metrics import MetricSums, mean_top1, metric_sums

ENC = LabelEncoding((HeadEncoding("Manufacturer", "categorical", classes=("A", "B", "C")),
                     HeadEncoding("EchoTime", "continuous", unit="ms", transform="log",
                                  mean=0.5, std=0.2)))


def _batch(rng, n):
    logits = rng.normal(size=(n, 3)).astype(np.float32)
    labels = rng.integers(0, 3, n).astype(np.int32)
    mask = (rng.uniform(size=n) > 0.2).astype(np.float32)
    pred = rng.normal(size=(n, 1)).astype(np.float32)
    target = rng.normal(size=n).astype(np.float32)
    tmask = (rng.uniform(size=n) > 0.3).astype(np.float32)
    return ({"Manufacturer": logits, "EchoTime": pred}, {"Manufacturer": labels, "EchoTime": target},
            {"Manufacturer": mask, "EchoTime": tmask})


def test_metrics_match_numpy_and_accumulate_across_batches():
    rng = np.random.default_rng(1)
    batches = [_batch(rng, 16), _batch(rng, 8)]
    sums = MetricSums()
    for outputs, targets, masks in batches:
        sums.add(metric_sums({k: jnp.asarray(v) for k, v in outputs.items()},
                             {k: jnp.asarray(v) for k, v in targets.items()},
                             {k: jnp.asarray(v) for k, v in masks.items()}, ENC))
    summary = sums.summary(ENC)

    def cat(part, name):  # part 0/1/2: outputs/targets/masks of every batch
        return np.concatenate([b[part][name] for b in batches])

    logits, labels = cat(0, "Manufacturer"), cat(1, "Manufacturer")
    mask = cat(2, "Manufacturer").astype(bool)
    order = np.argsort(-logits, axis=1)
    assert summary["Manufacturer"]["top1"] == pytest.approx(np.mean((order[:, 0] == labels)[mask]))
    assert summary["Manufacturer"]["top2"] == pytest.approx(
        np.mean((order[:, :2] == labels[:, None]).any(1)[mask]))
    assert summary["Manufacturer"]["count"] == mask.sum()
    expected = np.zeros((3, 3))
    np.add.at(expected, (labels[mask], order[mask, 0]), 1)
    np.testing.assert_array_equal(sums.confusion("Manufacturer"), expected)
    assert "confusion" not in summary["Manufacturer"]

    tmask = cat(2, "EchoTime").astype(bool)
    pred = np.exp(cat(0, "EchoTime")[:, 0] * 0.2 + 0.5)[tmask]
    true = np.exp(cat(1, "EchoTime") * 0.2 + 0.5)[tmask]
    assert summary["EchoTime"]["mae"] == pytest.approx(np.mean(np.abs(pred - true)), rel=1e-4)
    r2 = 1 - np.sum((pred - true) ** 2) / np.sum((true - true.mean()) ** 2)
    assert summary["EchoTime"]["r2"] == pytest.approx(r2, rel=1e-4)
    assert mean_top1(summary) == summary["Manufacturer"]["top1"]


def test_no_labels_gives_nan_not_error():
    outputs, targets, masks = _batch(np.random.default_rng(2), 4)
    masks = {k: np.zeros_like(v) for k, v in masks.items()}
    summary = MetricSums().add(metric_sums(outputs, targets, masks, ENC)).summary(ENC)
    assert math.isnan(summary["Manufacturer"]["top1"]) and math.isnan(summary["EchoTime"]["mae"])


def test_majority_baseline_scores_trains_commonest_class_on_eval():
    from iap_jax.core.metrics import majority_baseline

    def split(values, states=None):
        return {"iaps": {
            "Manufacturer": {"value_counts": values, "states": {"PRESENT": sum(values.values())}},
            "ContrastBolusAgent": {"value_counts": {"GADAVIST": 2},
                                   "states": states or {"PRESENT": 2, "ABSENT": 5, "EMPTY": 1}},
            "EchoTime": {"value_counts": {}, "numeric": {"count": 3, "mean": 2.0, "std": 0.1,
                                                         "log_mean": 0.7, "log_std": 0.05}},
        }}

    train = split({"GE MEDICAL SYSTEMS": 30, "SIEMENS": 10})
    encoding = LabelEncoding.from_stats(train, iaps=("Manufacturer", "ContrastBolusAgent", "EchoTime"))
    evaluation = split({"GE MEDICAL SYSTEMS": 3, "SIEMENS": 9},
                       states={"PRESENT": 2, "ABSENT": 1, "EMPTY": 1})
    baseline = majority_baseline(encoding, train, evaluation)
    assert baseline["Manufacturer"] == pytest.approx(3 / 12)
    # "<absent>" is train's commonest agent class; eval has 1 of 4 labelled.
    assert baseline["ContrastBolusAgent"] == pytest.approx(1 / 4)
    assert "EchoTime" not in baseline


def test_confusion_matrix_pictures_are_written_per_categorical_head(tmp_path):
    from PIL import Image

    from iap_jax.io.plots import write_confusion_matrices

    paths = write_confusion_matrices({"Manufacturer": np.array([[5, 1, 0], [0, 3, 2], [0, 0, 4]])},
                                     ENC, str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["confusion_Manufacturer.png"]
    with Image.open(paths[0]) as image:
        assert image.size[0] > 300 and image.size[1] > 300


def test_decoded_predictions_score_as_the_training_sums_do():
    """The predictor's summary and iap-eval score decoded predictions with the same sums and
    formulas as training's validation: the same numbers from the same rows."""
    from iap_jax.core.metrics import categorical_sums, continuous_sums, label_values, summarise

    rng = np.random.default_rng(3)
    outputs, targets, masks = _batch(rng, 40)
    device = MetricSums().add(metric_sums(outputs, targets, masks, ENC)).summary(ENC)
    order = np.argsort(-outputs["Manufacturer"], axis=1)
    labels, mask = targets["Manufacturer"], masks["Manufacturer"] > 0
    host = summarise(ENC.heads[0], categorical_sums(mask, order[:, 0] == labels,
                                                    (order[:, :2] == labels[:, None]).any(1)))
    assert host == pytest.approx(device["Manufacturer"])
    head = ENC.heads[1]
    predicted = np.exp(outputs["EchoTime"][:, 0] * 0.2 + 0.5)
    headers = [float(np.exp(t * 0.2 + 0.5)) if m else None
               for t, m in zip(targets["EchoTime"], masks["EchoTime"])]
    host = summarise(head, continuous_sums(predicted, label_values(head, headers)))
    for key in ("count", "mae", "r2"):
        assert host[key] == pytest.approx(device["EchoTime"][key], rel=1e-4), key
    # A log head cannot take a non-positive value: no label, as training masks it.
    assert np.isnan(label_values(head, [0.0, -1.0, None])).all()


def test_score_table_prints_what_each_head_has():
    from iap_jax.core.metrics import score_table

    scores = {"Manufacturer": {"count": 10.0, "top1": 0.9, "top2": 1.0, "series_count": 3,
                               "series_top1": 2 / 3},
              "EchoTime": {"count": 8.0, "mae": 0.125, "r2": 0.95, "unit": "ms",
                           "series_count": 2, "series_mae": 0.1},
              "FOV": {"count": 0.0, "top1": math.nan, "top2": math.nan}}
    lines = score_table(scores).splitlines()
    assert lines[0].split() == ["IAP", "n", "top-1", "top-2", "MAE", "R2", "series", "top-1", "MAE"]
    assert lines[1].split() == ["Manufacturer", "10", "0.900", "1.000", "3", "0.667"]
    assert lines[2].split() == ["EchoTime", "8", "0.125", "ms", "0.950", "2", "0.1", "ms"]
    assert lines[3].split() == ["FOV", "0", "-", "-", "0", "-"]
    with_baseline = score_table({"Manufacturer": {"count": 4.0, "top1": 0.5, "top2": 0.75}},
                                {"Manufacturer": 0.25}).splitlines()
    assert "majority" in with_baseline[0] and with_baseline[1].split()[-1] == "0.250"
