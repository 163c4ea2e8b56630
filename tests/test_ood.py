"""The out-of-distribution model (iap_jax.prediction.ood): its p-values, its refusal of
another checkpoint, and the leave-one-scanner-out benchmark's bookkeeping (bench/ood.py)."""
import importlib.util
import json
import pathlib

import numpy as np
import pytest
from scipy import stats
from train_data import tiny_config

from iap_jax.prediction import ood

REPO = pathlib.Path(__file__).resolve().parent.parent
LAYERS = {"stage1": 8, "stage2": 12, "features": 6}


def _series(rng, centres: dict, group: int, series: int, slices: int = 5) -> dict:
    """Features of `series` series of one group: the group's centre, a per-series offset
    (series differ more than the slices of one), slice noise."""
    out = {}
    for name, width in LAYERS.items():
        offset = rng.normal(0, 0.5, (series, 1, width))
        noise = rng.normal(0, 1.0, (series, slices, width))
        out[name] = (centres[name][group] + offset + noise).reshape(series * slices, width)
    return out


def _cohort(rng, centres, groups, series_per_group: int, tag: str):
    parts = [_series(rng, centres, g, series_per_group) for g in groups]
    features = {n: np.concatenate([p[n] for p in parts]) for n in LAYERS}
    labels = np.repeat([f"g{g}" for g in groups], series_per_group * 5)
    series = np.repeat([f"{tag}{i}" for i in range(len(groups) * series_per_group)], 5)
    return features, labels, series


@pytest.mark.parametrize("kind", ood.SCORES)
def test_series_p_values_are_uniform_on_known_data_and_small_on_a_new_group(kind):
    rng = np.random.default_rng(20)
    centres = {n: rng.normal(0, 3, (4, w)) for n, w in LAYERS.items()}
    known = [0, 1, 2]
    train, train_groups, _ = _cohort(rng, centres, known, 100, "t")
    validation, _, val_series = _cohort(rng, centres, known, 100, "v")
    model = ood.fit_model(kind, train, train_groups, validation, val_series, rate=0.1, bank_size=1000)
    fresh, _, fresh_series = _cohort(rng, centres, known, 150, "f")
    _, medians = ood.series_medians(model.score(fresh), fresh_series)
    p = 1 - model.series_unknown_probability(medians)
    # Uniform on [0, 1] (on the grid of 1/301): a known series' p-value is as likely below
    # any level as that level, whatever the score.
    assert stats.kstest(p, "uniform").pvalue > 1e-3, np.histogram(p, bins=10, range=(0, 1))[0]
    called = model.out_of_domain(medians)
    assert called.tolist() == (p <= 0.1 + 1e-12).tolist()
    assert 0.1 * 450 - 3 * np.sqrt(450 * 0.09) < called.sum() < 0.1 * 450 + 3 * np.sqrt(450 * 0.09)
    # The decision and the threshold shown beside it agree.
    assert called.tolist() == (medians > model.threshold).tolist()
    # A group no training saw: its series are called unknown.
    new, _, new_series = _cohort(rng, centres, [3], 50, "n")
    _, new_medians = ood.series_medians(model.score(new), new_series)
    assert np.mean(model.out_of_domain(new_medians)) > 0.9
    assert np.median(model.series_unknown_probability(new_medians)) > 0.99


def test_p_values_and_threshold_by_hand():
    reference = np.arange(1.0, 20.0)  # 19 validation scores: 1 ... 19
    assert ood.p_values([0.5, 1.0, 19.0, 25.0], reference).tolist() == [1.0, 1.0, 2 / 20, 1 / 20]
    # At 10%: p <= 0.1 means at most one reference value at least as high: above 18.
    assert ood.threshold_for(reference, 0.1) == 18.0
    assert ood.threshold_for(reference, 0.01) == np.inf  # 19 values cannot resolve 1%


def _fitted(tmp_path):
    rng = np.random.default_rng(3)
    centres = {n: rng.normal(0, 3, (3, w)) for n, w in LAYERS.items()}
    train, groups, _ = _cohort(rng, centres, [0, 1], 20, "t")
    validation, _, series = _cohort(rng, centres, [0, 1], 20, "v")
    model = ood.fit_model("combined", train, groups, validation, series, rate=0.05)
    ood.save(str(tmp_path), model, step=7, checkpoint="ck", encoding_sha256="enc-1",
             fingerprint="params-1")
    return model, train


def test_a_stored_model_gives_the_same_scores_and_refuses_another_checkpoint(tmp_path):
    model, train = _fitted(tmp_path)
    loaded = ood.load_ood(str(tmp_path), 7, "enc-1", "params-1")
    np.testing.assert_allclose(loaded.score(train), model.score(train))
    assert loaded.threshold == model.threshold and loaded.rate == 0.05
    assert ood.load_ood(str(tmp_path), 8, "enc-1", "params-1") is None  # another step
    with pytest.raises(ValueError, match="another label encoding"):
        ood.load_ood(str(tmp_path), 7, "enc-2", "params-1")
    with pytest.raises(ValueError, match="another checkpoint's parameters"):
        ood.load_ood(str(tmp_path), 7, "enc-1", "params-2")
    with pytest.raises(ValueError, match="needs the features"):
        loaded.score({"features": train["features"]})


def test_a_stored_model_refuses_changed_arrays_and_an_older_format(tmp_path):
    _fitted(tmp_path)
    arrays = tmp_path / ood.ARRAYS_FILE
    arrays.write_bytes(arrays.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ValueError, match="not the one"):
        ood.load_ood(str(tmp_path), 7, "enc-1", "params-1")
    meta = json.loads((tmp_path / ood.OOD_FILE).read_text())
    del meta["format"]
    (tmp_path / ood.OOD_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="run iap-fit again"):
        ood.load_ood(str(tmp_path), 7)


def test_another_false_unknown_rate_moves_the_threshold(tmp_path):
    model, _ = _fitted(tmp_path)
    looser = model.with_rate(0.25)
    assert looser.threshold < model.threshold
    with pytest.raises(ValueError, match="between 0 and 1"):
        model.with_rate(1.5)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_ood", REPO / "bench" / "ood.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_benchmark_keeps_the_held_out_scanner_and_the_test_patients_out_of_the_fit(
        trained_run, tmp_path):
    bench = _bench()
    models, skipped = bench.eligible_models(trained_run.dataset_dir, "train", min_patients=1)
    counts = {}
    for patient, model, _ in bench.split_slices(trained_run.dataset_dir, "train"):
        counts.setdefault(model, set()).add(patient)
    held = max(models, key=lambda m: len(counts[m]))
    few, reason = bench.eligible_models(trained_run.dataset_dir, "train",
                                        min_patients=len(counts[held]) + 1)
    assert few == [] and "fewer than" in reason[held]
    config = tiny_config(trained_run.dataset_dir)
    config.num_epochs = 1
    run = bench.held_out_run(trained_run.dataset_dir, held, config, str(tmp_path / "train"),
                             ["pooled", "knn"], rate=0.4, real_root=None, batch_size=16)
    book = run["bookkeeping"]
    assert book["held_out_slices_in_fit"] == 0 and held not in book["fit_groups"]
    assert book["trained_exclude"] == {"ManufacturerModelName": [held]}
    every = [row for split in ("train", "validation", "test")
             for row in _series_of(trained_run.dataset_dir, split)]
    assert book["held_out_patients"] == len({p for p, m, _ in every if m == held})
    assert book["known_test_patients_in_fit"] == 0
    # Thresholds from validation only: as many reference series as known validation series.
    validation = {s for _, m, s in _series_of(trained_run.dataset_dir, "validation") if m != held}
    for kind in ("pooled", "knn"):
        result = run["results"][kind]
        assert result["validation_series"] == len(validation)
        assert result["held_out_series"] == len({s for _, m, s in every if m == held})
        assert 0.0 <= result["held_out_unknown"] <= 1.0

def _series_of(dataset_dir, split):
    from iap_jax.core.iaps import IAP_NAMES
    from iap_jax.core.preprocess import PixelSpec
    from iap_jax.io.dataset_info import DatasetInfo
    from iap_jax.io.sources import tfds_source

    source = tfds_source(dataset_dir, split, PixelSpec(stored_size=DatasetInfo.load(dataset_dir).image_size))
    model = IAP_NAMES.index("ManufacturerModelName")
    return [(s.patient, s.headers[model][1] or "<missing>", s.series_key)
            for unit in source.plan() for s in source.read(unit, [])]
