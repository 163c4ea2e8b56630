"""iap-eval and iap-sort: the numbers (ECE, bootstrap intervals, calibrators, QA thresholds)
against independent ones, and the report and manifest on real predictions."""
import base64
import csv
import json
import math
import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from predict_data import run_predict

from iap_jax.analysis import eval_cli, evaluate, fit, fit_cli, sort
from iap_jax.analysis import report as report_lib
from iap_jax.core.labels import HeadEncoding, LabelEncoding, class_indices
from iap_jax.prediction import calibration, header_qa, ood, tables


def test_ece_matches_an_independent_implementation():
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.05, 0.999, 5000)
    correct = rng.random(5000) < confidence ** 1.7  # over-confident on purpose
    ours = calibration.expected_calibration_error(confidence, correct, bins=15)
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=15, strategy="uniform")
    counts, _ = np.histogram(confidence, bins=np.linspace(0, 1, 16))
    counts = counts[counts > 0]
    reference = np.sum(counts * np.abs(accuracy - mean_confidence)) / counts.sum()
    assert ours == pytest.approx(reference, abs=1e-12)
    assert ours > 0.05  # and the data is visibly miscalibrated
    assert calibration.expected_calibration_error(np.array([1.0, 1.0]), np.array([1, 1])) == 0.0


def test_bootstrap_intervals_over_patients_cover_the_true_accuracy():
    rng = np.random.default_rng(1)
    true_accuracy, covered, trials = 0.8, 0, 120
    for _ in range(trials):
        # 60 patients with 5 slices each; a patient's slices share how hard they are.
        ability = np.clip(rng.normal(true_accuracy, 0.12, 60), 0, 1)
        hits = rng.random((60, 5)) < ability[:, None]
        low, high = evaluate.bootstrap_interval(hits.sum(axis=1), np.full(60, 5), 400, rng)
        covered += low <= true_accuracy <= high
    assert covered / trials >= 0.88  # nominal 95%
    assert evaluate.bootstrap_interval(np.array([]), np.array([]), 10, rng) == (math.nan, math.nan)


def test_qa_threshold_and_flags():
    scores = np.array([0.99, 0.03, 0.9, 0.6, 0.05, 0.2])  # 1 - P(header's class), per series
    # One flag in six correct series is allowed at a rate of 0.2: just above the second score.
    t = header_qa.qa_threshold(scores, rate=0.2)
    assert 0.9 < t <= 0.9 + 1e-9 and np.sum(scores >= t) == 1
    assert header_qa.qa_threshold(scores, rate=0.0) > 0.99
    assert header_qa.qa_threshold(np.array([0.1, 0.2]), rate=0.0) == 0.5  # the floor
    head = HeadEncoding("Manufacturer", "categorical", classes=("GE", "SIEMENS", "<other>"))
    assert header_qa.header_probability(head, np.array([0.9, 0.08, 0.02]), "SIEMENS") == 0.08
    assert header_qa.header_probability(head, np.array([0.9, 0.08, 0.02]), "PHILIPS") == 0.02
    assert header_qa.qa_flags(head, 0.9, "SIEMENS", 0.08, 0.9) == ["Manufacturer"]
    assert header_qa.qa_flags(head, 0.9, "GE", 0.9, 0.9) == []
    assert header_qa.qa_flags(head, 0.6, "SIEMENS", 0.4, 0.9) == []  # not sure enough
    assert header_qa.qa_flags(head, 0.95, None, None, 0.9) == ["missing_header:Manufacturer"]
    assert header_qa.qa_flags(head, 0.5, None, None, 0.9) == []


@pytest.fixture(scope="module")
def calibrated_run(trained_run, tmp_path_factory):
    """The trained run with a calibration fitted on its validation predictions, and its test
    split predicted from the DICOM folder with it."""
    root = tmp_path_factory.mktemp("calibrated")
    workdir = root / "train"
    shutil.copytree(trained_run.workdir, workdir)
    run = type(trained_run)(trained_run.dicom_root, trained_run.dataset_dir, str(workdir),
                            trained_run.validation)
    run_predict(run, str(root / "val"), "--input", run.dataset_dir, "--split", "validation")
    path, data = fit.fit_calibration(str(root / "val"))
    assert path == str(workdir / calibration.CALIBRATION_FILE)
    report = run_predict(run, str(root / "dicom"), "--input", run.dicom_root)
    return run, root, data, report


def test_iap_fit_stores_the_calibration_and_the_ood_model_and_iap_eval_only_reports(
        calibrated_run, tmp_path, capsys):
    run, root, _, _ = calibrated_run
    workdir = tmp_path / "train"  # its own copy: the other tests' run stays as it was
    shutil.copytree(run.workdir, workdir)
    for name in (calibration.CALIBRATION_FILE, "ood.json"):
        (workdir / name).unlink(missing_ok=True)
    # A tiny validation split (a dozen series) resolves no 5% rate: iap-fit says so.
    assert fit_cli.main(["--predictions", str(root / "val"), "--workdir", str(workdir)]) == 2
    assert "cannot resolve a false-unknown rate of 0.05" in capsys.readouterr().err
    assert fit_cli.main(["--predictions", str(root / "val"), "--workdir", str(workdir),
                         "--false-unknown-rate", "0.25"]) == 0
    out = capsys.readouterr().out
    fitted = {name: json.loads((workdir / name).read_text())
              for name in (calibration.CALIBRATION_FILE, "ood.json")}
    assert fitted["calibration.json"]["step"] == fitted["ood.json"]["step"]
    assert "calibration for step" in out and "out-of-distribution model for step" in out
    assert fit_cli.main(["--predictions", str(tmp_path / "nothing")]) == 2
    with pytest.raises(SystemExit):  # no fitting flag any more, and a report is its only output
        eval_cli.main(["--predictions", str(root / "val"), "--fit-calibration"])


def test_calibration_is_stored_for_its_step_and_applied(calibrated_run):
    run, root, data, report = calibrated_run
    assert set(data["calibrators"]) >= {"Manufacturer", "FOV"} and data["qa"]["thresholds"]
    assert report["checkpoint"]["calibration"]["calibrators"] == data["calibrators"]
    fov = data["fitted_on"]["heads"]["FOV"]
    assert fov["family"] == data["calibrators"]["FOV"]["family"] in calibration.FAMILIES
    assert set(fov["cv"]) == set(calibration.FAMILIES) and data["selection"]["groups"] == "patient"
    slices = pq.read_table(root / "dicom" / "slices.parquet")
    meta = tables.read_metadata(str(root / "dicom" / "slices.parquet"))
    assert meta["calibration"]["step"] == meta["step"] == data["step"]
    encoding = LabelEncoding.from_json(meta["label_encoding"])
    calibrators = calibration.head_calibrators(meta["calibration"])
    for name in ("FOV", "ScanOptions"):
        head = encoding.head(name)
        expected = tables.slice_probabilities(slices, head, calibrators[name])
        np.testing.assert_allclose(slices.column(f"{name}_prob").to_numpy(), expected.max(axis=1), rtol=1e-5)
        assert slices.column(name).to_pylist() == [head.classes[i] for i in expected.argmax(axis=1)]
    series = pq.read_table(root / "dicom" / "series.parquet")
    assert "qa_flags" in series.column_names
    # Another step's calibration is not applied.
    assert calibration.load_calibration(run.workdir, data["step"] + 1) is None


def test_an_old_calibration_file_of_temperatures_is_still_applied(calibrated_run, tmp_path):
    run, root, data, _ = calibrated_run
    workdir = tmp_path / "train"
    shutil.copytree(run.workdir, workdir)
    old = {"step": data["step"], "checkpoint": data["checkpoint"], "qa": data["qa"],
           "temperatures": {"FOV": 2.0, "Manufacturer": 0.5}}
    (workdir / calibration.CALIBRATION_FILE).write_text(json.dumps(old))
    old_run = type(run)(run.dicom_root, run.dataset_dir, str(workdir), run.validation)
    run_predict(old_run, str(tmp_path / "pred"), "--input", run.dataset_dir, "--split", "test")
    slices = pq.read_table(tmp_path / "pred" / "slices.parquet")
    encoding = LabelEncoding.from_json(tables.read_metadata(
        str(tmp_path / "pred" / "slices.parquet"))["label_encoding"])
    for name, temperature in (("FOV", 2.0), ("ScanOptions", 1.0)):  # ScanOptions: none given
        logits = tables.slice_logits(slices, encoding.head(name))
        np.testing.assert_allclose(slices.column(f"{name}_prob").to_numpy(),
                                   calibration.softmax(logits / temperature).max(axis=1), rtol=1e-5)
    metrics = evaluate.evaluate(str(tmp_path / "pred"), resamples=50)
    assert metrics["heads"]["FOV"]["calibrator"] == "temperature"
    assert metrics["heads"]["ScanOptions"]["calibrator"] is None
    assert metrics["calibration_selection"] is None
    markdown = open(report_lib.write_report(metrics, str(tmp_path / "report"))["report.md"]).read()
    row = next(line for line in markdown.splitlines() if line.startswith("| FOV |"))
    assert "| temperature T=2.00 |" in row


@pytest.fixture(scope="module")
def report(calibrated_run, tmp_path_factory):
    """The calibrated run's report, written once: (metrics, files, metrics.json read back)."""
    _, root, _, _ = calibrated_run
    metrics = evaluate.evaluate(str(root / "dicom"), resamples=200)
    files = report_lib.write_report(metrics, str(tmp_path_factory.mktemp("report")))
    return metrics, files, json.load(open(files["metrics.json"]))


def test_metrics_json_holds_scores_intervals_and_calibration(report):
    metrics, _, saved = report
    m = saved["heads"]["Manufacturer"]
    assert m["slices"] == metrics["slices"] and 0 <= m["top1"] <= 1
    assert m["top1_ci"][0] <= m["top1"] <= m["top1_ci"][1]
    assert saved["calibrated"] and "ece_after" in m and "series_top1" in m
    assert m["calibrator"] in calibration.FAMILIES
    assert m["ece_after_ci"][0] <= m["ece_after_ci"][1]
    assert saved["heads"]["EchoTime"]["unit"] == "ms" and "r2" in saved["heads"]["EchoTime"]


def test_ece_floor_is_that_of_labels_drawn_per_series(calibrated_run, report):
    """The floor is the ECE of labels drawn from the calibrated probabilities of the labelled
    slices, one uniform number per series; drawn here label set by label set, it agrees."""
    _, root, _, _ = calibrated_run
    metrics, _, saved = report
    slices = pq.read_table(root / "dicom" / "slices.parquet")
    head = metrics["_encoding"].head("Manufacturer")
    calibrator = calibration.HeadCalibration.from_json(saved["calibrators"]["Manufacturer"])
    labelled = class_indices(head, slices.column("Manufacturer_header").to_pylist()) >= 0
    probs = tables.slice_probabilities(slices, head, calibrator)[labelled]
    series = np.unique(slices.column("series_key").to_pylist(), return_inverse=True)[1][labelled]
    rng = np.random.default_rng(0)
    simulated = []
    for _ in range(2000):
        labels = (rng.random(series.max() + 1)[series, None] >= np.cumsum(probs, axis=1)).sum(axis=1)
        simulated.append(calibration.expected_calibration_error(probs.max(axis=1),
                                                                probs.argmax(axis=1) == labels))
    # Slices drawn as if independent would give about 0.6 of it: outside this tolerance.
    assert saved["heads"]["Manufacturer"]["ece_floor"] == pytest.approx(np.mean(simulated), rel=0.2)


def test_markdown_report_has_the_main_table_and_the_calibration_columns(report):
    _, files, _ = report
    markdown = open(files["report.md"]).read()
    assert "| Manufacturer |" in markdown and "slice top-1 [95% CI]" in markdown
    assert "ECE floor (mean, p95)" in markdown and "cross-validation over validation patients" in markdown


def test_html_page_is_self_contained_with_every_plot(report):
    _, files, _ = report
    page = open(files["report.html"]).read()
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing outside the page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    plots = os.listdir(os.path.join(os.path.dirname(files["report.html"]), "plots"))
    assert len(images) == len(plots) >= 12
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)


def test_report_copes_with_a_head_without_labels_and_a_single_class(calibrated_run, tmp_path):
    run, root, _, _ = calibrated_run
    table = pq.read_table(root / "dicom" / "slices.parquet")
    n = table.num_rows
    table = table.set_column(table.schema.get_field_index("ScanOptions_header"), "ScanOptions_header",
                             pa.array([None] * n, pa.string()))
    table = table.set_column(table.schema.get_field_index("Manufacturer_header"), "Manufacturer_header",
                             pa.array(["SIEMENS"] * n, pa.string()))
    (tmp_path / "pred").mkdir()
    pq.write_table(table, tmp_path / "pred" / "slices.parquet")
    metrics = evaluate.evaluate(str(tmp_path / "pred"), resamples=50)
    assert metrics["heads"]["ScanOptions"]["slices"] == 0 and "top1" not in metrics["heads"]["ScanOptions"]
    assert list(metrics["heads"]["Manufacturer"]["recall"]) == ["SIEMENS"]
    files = report_lib.write_report(metrics, str(tmp_path / "report"))
    assert "| ScanOptions | " in open(files["report.md"]).read()


def test_sorting_is_idempotent_and_moves_a_series_whose_domain_changed(calibrated_run, tmp_path):
    run, root, _, _ = calibrated_run
    pred = str(root / "dicom")
    links = tmp_path / "links"
    first = sort.sort_series(pred, None, str(tmp_path / "m1.csv"), 0.0, str(links))
    rows = list(csv.DictReader(open(tmp_path / "m1.csv")))
    assert first["series"] == len(rows) == pq.read_table(root / "dicom" / "series.parquet").num_rows
    assert first["links"]["added"] == len(rows)

    def linked():
        return sorted((d, name, os.readlink(links / d / name)) for d in os.listdir(links)
                      for name in os.listdir(links / d))

    before = linked()
    assert len(before) == len(rows) and all(os.path.isdir(target) for _, _, target in before)
    again = sort.sort_series(pred, None, str(tmp_path / "m2.csv"), 0.0, str(links))
    assert again["links"] == {"added": 0, "moved": 0, "kept": len(rows)} and linked() == before
    # Rules that send every GE series elsewhere move those links, and only those.
    rules = {"domains": [{"name": "ge", "model": "net_ge", "when": {"Manufacturer": "GE MEDICAL SYSTEMS"}},
                         {"name": "other", "model": "net_other", "when": {"Manufacturer": ["SIEMENS", "<other>"]}}]}
    moved = sort.sort_series(pred, rules, str(tmp_path / "m3.csv"), 0.0, str(links))
    after = linked()
    assert len(after) == len(rows) and len({name for _, name, _ in after}) == len(rows)
    assert {d for d, _, _ in after} <= {"ge", "other"} and moved["links"]["moved"] == len(rows)
    # A confidence threshold above every answer makes every series unknown.
    strict = sort.sort_series(pred, rules, str(tmp_path / "m4.csv"), 1.01)
    assert strict["domains"] == {"unknown": len(rows)}
    with pytest.raises(ValueError, match="lack"):
        sort.sort_series(pred, {"domains": [{"name": "x", "when": {"Colour": "red"}}]},
                         str(tmp_path / "m5.csv"))


def test_ood_scores_rank_an_unseen_group_above_the_known_ones():
    rng = np.random.default_rng(4)
    centres = rng.normal(0, 4, (4, 16))
    groups = np.repeat(np.array(["a", "b", "c", "d"]), 200)
    features = centres[np.searchsorted(["a", "b", "c", "d"], groups)] + rng.normal(0, 1, (800, 16))
    known = groups != "d"
    means, precision, names = ood.fit_gaussians(features[known], groups[known])
    assert names == ["a", "b", "c"]
    fresh = centres[np.searchsorted(["a", "b", "c", "d"], groups)] + rng.normal(0, 1, (800, 16))
    scores = ood.scores(fresh, means, precision)
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(groups == "d", scores) > 0.99
    # Close to a chi distribution with 16 degrees of freedom for the known groups.
    assert 3.0 < np.median(scores[groups != "d"]) < 5.5


def test_fitted_ood_model_marks_series_and_sorting_sends_them_to_unknown(calibrated_run, tmp_path):
    run, root, _, _ = calibrated_run
    data = ood.fit(run.workdir, rate=0.25)  # a dozen validation series resolve no 5%
    assert data["step"] == calibration.load_calibration(run.workdir, data["step"])["step"]
    report = run_predict(run, str(tmp_path / "pred"), "--input", run.dataset_dir, "--split", "test")
    assert report["checkpoint"]["ood"]["threshold"] == data["threshold"]
    series = pq.read_table(tmp_path / "pred" / "series.parquet").to_pylist()
    slices = pq.read_table(tmp_path / "pred" / "slices.parquet")
    assert np.all(np.isfinite(slices.column("ood_score").to_numpy()))
    for s in series:
        assert s["out_of_domain"] == (s["ood_score"] > data["threshold"])
        assert s["out_of_domain"] == (s["unknown_probability"] >= 1 - data["false_unknown_rate"] - 1e-6)
    probability = slices.column("unknown_probability").to_numpy()
    assert np.all((probability >= 0) & (probability < 1))
    # The higher the score, the likelier unknown.
    order = np.argsort(slices.column("ood_score").to_numpy())
    assert np.all(np.diff(probability[order]) >= -1e-6)
    manifest = tmp_path / "manifest.csv"
    sort.sort_series(str(tmp_path / "pred"), None, str(manifest), 0.0)
    rows = {r["series_key"]: r for r in csv.DictReader(open(manifest))}
    for s in series:
        assert (rows[s["series_key"]]["domain"] == "unknown") == s["out_of_domain"]
    for name in (ood.OOD_FILE, ood.ARRAYS_FILE):  # the other tests' run stays as it was
        os.remove(os.path.join(run.workdir, name))


def test_series_table_gives_out_of_domain_series_no_header_qa(tmp_path):
    """Issue 18 item 7, the rule on its own: two series whose header contradicts an equally
    confident prediction; only the in-domain one is flagged, the other is marked out of the
    model's domain, on its slices too, and says why it was not checked."""
    head = HeadEncoding("Manufacturer", "categorical", classes=("GE", "SIEMENS", "<other>"))
    encoding = LabelEncoding((head,))
    logits = [[8.0, 0.0, 0.0]] * 4  # GE, near-certain
    slices = pa.table({"series_key": ["far", "far", "near", "near"], "slice_index": [0, 1, 0, 1],
                       "patient": ["p"] * 4, "phase": [0] * 4, "file_key": ["x"] * 4,
                       "ood_score": pa.array([90.0, 80.0, 1.0, 2.0], pa.float32()),
                       "Manufacturer": ["GE"] * 4, "Manufacturer_logits": logits,
                       "Manufacturer_header": ["SIEMENS"] * 4})
    path = str(tmp_path / "slices.parquet")
    pq.write_table(slices, path)
    # An OOD model whose validation series scored 0.5 ... 10: at 5%, above 10 is unknown.
    known = np.linspace(0.5, 10.0, 20)
    model = ood.OodModel({"score": "pooled", "layers": ["features"], "false_unknown_rate": 0.05},
                         {"validation_slice_scores": known, "validation_series_scores": known})
    assert model.threshold == 10.0
    series = tables.series_table(path, encoding, qa_thresholds={"Manufacturer": 0.9}, ood=model)
    rows = {r["series_key"]: r for r in series.to_pylist()}
    assert rows["near"]["qa_flags"] == ["Manufacturer"] and not rows["near"]["out_of_domain"]
    assert rows["near"]["qa_note"] is None
    assert rows["far"]["qa_flags"] == [] and rows["far"]["out_of_domain"]
    # 1 - p-value among the 20 validation series: none scored 85, 18 at least 1.5.
    assert rows["far"]["unknown_probability"] == pytest.approx(1 - 1 / 21)
    assert rows["near"]["unknown_probability"] == pytest.approx(1 - 19 / 21)
    assert "outside the model's domain" in rows["far"]["qa_note"]
    tables.mark_out_of_domain_slices(path, series)
    marked = pq.read_table(path)
    assert marked.column("out_of_domain").to_pylist() == [True, True, False, False]


def _noise_and_swapped_manufacturer(dicom_root: str, out: str, noisy: int) -> set[str]:
    """A copy of a DICOM folder whose every file names the other manufacturer (GE <->
    Siemens, a contradiction the calibrated model flags in its own domain) and whose first
    `noisy` series (by SeriesInstanceUID) hold uniform noise: no scanner's images."""
    import pydicom

    files = sorted(os.path.join(d, n) for d, _, names in os.walk(dicom_root) for n in names
                   if n.endswith(".dcm"))
    uids = sorted({str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in files})
    noise_uids = set(uids[:noisy])
    rng = np.random.default_rng(18)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.Manufacturer = "SIEMENS" if ds.Manufacturer.startswith("GE") else "GE MEDICAL SYSTEMS"
        if str(ds.SeriesInstanceUID) in noise_uids:
            pixels = ds.pixel_array
            ds.PixelData = rng.integers(0, 4000, pixels.shape).astype(pixels.dtype).tobytes()
        target = os.path.join(out, os.path.relpath(path, dicom_root))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        ds.save_as(target)
    return noise_uids


def test_out_of_domain_series_get_no_header_qa_and_the_report_says_so(calibrated_run, tmp_path):
    """Issue 18 item 7 end to end: noise series with contradicting headers are out of the
    model's domain, get no QA flags, are marked so in both tables, and the report says how
    many there are and that their predictions and QA are not to be trusted; in-domain series
    with the same contradiction are still flagged."""
    run, _, _, _ = calibrated_run
    workdir = tmp_path / "train"  # its own copy: the OOD model stays out of the other tests
    shutil.copytree(run.workdir, workdir)
    ood_run = type(run)(run.dicom_root, run.dataset_dir, str(workdir), run.validation)
    ood.fit(str(workdir), rate=0.25)
    dicom = str(tmp_path / "dicom")
    _noise_and_swapped_manufacturer(run.dicom_root, dicom, noisy=6)
    report = run_predict(ood_run, str(tmp_path / "pred"), "--input", dicom)
    threshold = report["checkpoint"]["ood"]["threshold"]
    series = pq.read_table(tmp_path / "pred" / "series.parquet").to_pylist()
    slices = pq.read_table(tmp_path / "pred" / "slices.parquet").to_pylist()
    outside = {s["series_key"] for s in series if s["out_of_domain"]}
    inside = [s for s in series if not s["out_of_domain"]]
    assert outside and inside, [(s["ood_score"], s["out_of_domain"]) for s in series]
    for s in series:
        assert s["out_of_domain"] == (s["ood_score"] > threshold)
        if s["out_of_domain"]:
            assert s["qa_flags"] == [] and "outside the model's domain" in s["qa_note"]
    assert {r["series_key"] for r in slices if r["out_of_domain"]} == outside
    # In its domain QA still applies (this tiny model is sure of little: a few flags).
    assert any(s["qa_flags"] for s in inside) and all(s["qa_note"] is None for s in inside)
    # iap-sort reads the predictor's decision.
    sort.sort_series(str(tmp_path / "pred"), None, str(tmp_path / "manifest.csv"), 0.0)
    rows = {r["series_key"]: r for r in csv.DictReader(open(tmp_path / "manifest.csv"))}
    assert {k for k, r in rows.items() if r["reason"].startswith("out of")} == outside
    files = report_lib.write_report(evaluate.evaluate(str(tmp_path / "pred"), resamples=20),
                                    str(tmp_path / "report"), str(tmp_path / "pred"))
    for name in ("report.md", "report.html"):
        text = open(files[name]).read()
        assert f"{len(outside)} of {len(series)} series are outside the model's domain" in text
        assert "an unknown probability of at least 0.75" in text  # the rate fitted: 25%
        # Each out-of-domain series listed with its unknown probability, none of the others.
        start = text.index("Model's domain")
        section = text[start:text.index("Header QA", start)]
        listed = [s for s in series if s["series_key"] in section]
        assert {s["series_key"] for s in listed} == outside
        assert all(f"{s['unknown_probability']:.3f}" in section for s in listed)
    assert json.load(open(files["metrics.json"]))["out_of_domain_series"] == len(outside)


@pytest.mark.slow
def test_iap_predict_refuses_an_ood_model_fitted_on_another_checkpoint(calibrated_run, tmp_path,
                                                                        capsys):
    """An ood.json copied beside another training's checkpoint of the same step (or left
    from before a retraining) is refused, not applied to features it was not fitted on."""
    from iap_jax.prediction.predict_cli import main as predict_main

    run, _, _, _ = calibrated_run
    workdir = tmp_path / "train"
    shutil.copytree(run.workdir, workdir)
    fitted = ood.fit(str(workdir), rate=0.25)
    args = ["--workdir", str(workdir), "--input", run.dataset_dir, "--split", "test", "--quiet",
            "--workers", "1"]
    assert predict_main([*args, "--out", str(tmp_path / "ok")]) == 0
    meta = json.loads((workdir / ood.OOD_FILE).read_text())
    meta["checkpoint_fingerprint"] = "another training"
    (workdir / ood.OOD_FILE).write_text(json.dumps(meta))
    capsys.readouterr()
    assert predict_main([*args, "--out", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert "ood.json was fitted on another checkpoint's parameters" in error
    assert not (tmp_path / "refused" / "slices.parquet").exists()
    # The rate is the user's: a looser one calls more series unknown, never fewer.
    meta["checkpoint_fingerprint"] = fitted["checkpoint_fingerprint"]
    (workdir / ood.OOD_FILE).write_text(json.dumps(meta))
    assert predict_main([*args, "--out", str(tmp_path / "loose"), "--false-unknown-rate", "0.6"]) == 0
    strict = pq.read_table(tmp_path / "ok" / "series.parquet").to_pylist()
    loose = pq.read_table(tmp_path / "loose" / "series.parquet").to_pylist()
    assert all(b["out_of_domain"] for a, b in zip(strict, loose) if a["out_of_domain"])
    for rows, rate in ((strict, 0.25), (loose, 0.6)):  # the decision is the rate's
        assert [r["out_of_domain"] for r in rows] == [
            r["unknown_probability"] >= 1 - rate - 1e-6 for r in rows]
    thresholds = [json.load(open(tmp_path / out / "predict_report.json"))["checkpoint"]["ood"]
                  for out in ("ok", "loose")]
    assert [t["false_unknown_rate"] for t in thresholds] == [0.25, 0.6]
    assert thresholds[1]["threshold"] < thresholds[0]["threshold"]
