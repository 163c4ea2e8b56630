"""iap-eval: accuracy, intervals, calibration and pictures from iap-predict's tables.

  iap-eval --predictions PRED_DIR --out REPORT_DIR [--bootstrap 1000]

On predictions of a labelled input (the headers it carried are the truth, scored as training
scores them: a value outside the vocabulary counts as "<other>"): per IAP, top-1 and top-2
accuracy at slice and series level, per-class recall, and for continuous IAPs MAE, bias and
R2 in real units; 95% intervals by bootstrap over patients (the slices and series of one
patient are not independent); the expected calibration error of every categorical head
before and after the calibration the predictions carry, with its bootstrap interval over
patients and its noise floor (the ECE a perfectly calibrated model of these confidences
shows on this many series: calibration.ece_noise_floor); confusion matrices, TE/TR scatter
plots and reliability diagrams as PNG; how many series the predictor marked out of the
model's domain (their predictions untrusted, their headers not QA'd). Writes report.md (laid
out like the paper's results table), report.html (one self-contained page) and metrics.json
under REPORT_DIR.

It reads predictions and writes a report, nothing else: the calibration it reports on was
fitted by iap-fit (iap_jax/fit.py) and applied by iap-predict.
"""
from __future__ import annotations

import argparse
import base64
import html
import importlib.resources
import math
import os
import string
import sys
from typing import Any

import numpy as np
from etils import epath

from iap_jax import calibration as calibration_lib
from iap_jax import console, local_paths, metrics, plots, predictions, sources
from iap_jax.atomic import (absolute, makedirs, read_json, relative, write_json_atomic,
                            write_text_atomic)
from iap_jax.dicom import DicomError, read_prepared_frame
from iap_jax.header_qa import commonest
from iap_jax.labels import LabelEncoding, class_indices
from iap_jax.preprocess import PixelSpec

INTERVAL = (2.5, 97.5)


# --- the numbers ------------------------------------------------------------------------

def _percentile_interval(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    low, high = np.percentile(values, INTERVAL)
    return float(low), float(high)


def bootstrap_interval(numerators: np.ndarray, denominators: np.ndarray, resamples: int,
                       rng: np.random.Generator) -> tuple[float, float]:
    """95% interval of sum(numerators) / sum(denominators) over groups (patients) drawn with
    replacement; NaN when there is nothing to resample."""
    numerators = np.asarray(numerators, np.float64)
    denominators = np.asarray(denominators, np.float64)
    if len(numerators) == 0 or denominators.sum() == 0 or resamples <= 0:
        return math.nan, math.nan
    weights = calibration_lib.bootstrap_weights(len(numerators), resamples, rng)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _percentile_interval((weights @ numerators) / (weights @ denominators))


def ece_interval(confidence: np.ndarray, correct: np.ndarray, groups: np.ndarray, resamples: int,
                 rng: np.random.Generator) -> tuple[float, float]:
    """95% bootstrap interval over groups (patients) of the ECE of these slices. ECE is
    biased upwards on small samples, and a resample (with repeated patients) more so: the
    interval sits above the noise-free value, read it as the spread, with the noise floor."""
    if not len(groups) or resamples <= 0:
        return math.nan, math.nan
    groups, weights = calibration_lib.group_bootstrap(groups, resamples, rng)
    return _percentile_interval(calibration_lib.weighted_ece(confidence, correct, groups, weights))


def slice_patients(table) -> np.ndarray:
    """Per slice, the index of its patient (a slice without one: its series)."""
    patients = [p or s for p, s in zip(table.column("patient").to_pylist(),
                                       table.column("series_key").to_pylist())]
    return np.unique(np.asarray(patients, dtype=object).astype(str), return_inverse=True)[1]


def out_of_domain_series(table, series_rows) -> int | None:
    """How many series the predictor marked out of the model's domain (None: predicted
    without an out-of-distribution model, so nobody checked)."""
    if "out_of_domain" not in table.column_names:
        return None
    outside = table.column("out_of_domain").to_pylist()
    return sum(bool(outside[rows[0]]) for rows in series_rows)


def domain_note(metrics: dict) -> str:
    """The report's line on the model's domain."""
    outside = metrics.get("out_of_domain_series")
    if outside is None:
        return ("Not checked: these predictions were made without an out-of-distribution model "
                "(iap-fit), so a series outside the model's domain is not marked")
    return (f"{outside} of {metrics['series']} series are outside the model's domain (column "
            f"out_of_domain): their predictions are not to be trusted however confident they "
            f"read, they got no header QA, and the numbers above include them")


def _by_group(values: np.ndarray, groups: np.ndarray, count: int) -> np.ndarray:
    return np.bincount(groups, weights=np.asarray(values, np.float64), minlength=count)


def evaluate(pred_dir: str, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every number of the report, with the arrays the pictures need under "_plots"."""
    slices_path = os.path.join(pred_dir, "slices.parquet")
    if not epath.Path(slices_path).exists():
        raise FileNotFoundError(f"{pred_dir}: no slices.parquet; pass an iap-predict --out folder")
    metadata = predictions.read_metadata(slices_path)
    encoding = LabelEncoding.from_json(metadata["label_encoding"])
    calibrators = calibration_lib.head_calibrators(metadata.get("calibration"), encoding, slices_path)
    table = predictions.read_table(slices_path)
    if f"{encoding.heads[0].name}_header" not in table.column_names:
        raise ValueError(f"{pred_dir}: the input carried no headers, so there is nothing to score")
    rng = np.random.default_rng(seed)
    series_keys, series_rows = predictions.series_groups(table)
    slice_patient = slice_patients(table)
    num_patients = int(slice_patient.max()) + 1 if len(slice_patient) else 0
    series_patient = np.array([slice_patient[rows[0]] for rows in series_rows], np.int64)
    result: dict[str, Any] = {"predictions": absolute(pred_dir), "step": metadata.get("step"),
                              "checkpoint": metadata.get("checkpoint"),
                              "calibrated": bool(calibrators),
                              "calibration_selection":
                                  calibration_selection(metadata.get("calibration")),
                              "calibrators": {k: c.to_json() for k, c in calibrators.items()},
                              "slices": table.num_rows, "series": len(series_keys),
                              "patients": num_patients, "bootstrap_resamples": resamples,
                              "out_of_domain_series": out_of_domain_series(table, series_rows),
                              "heads": {}, "_plots": {}, "_encoding": encoding}

    def interval(values, groups, mask):
        return bootstrap_interval(_by_group(values * mask, groups, num_patients),
                                  _by_group(mask, groups, num_patients), resamples, rng)

    series_of_slices = np.empty(table.num_rows, np.int64)
    for s, rows in enumerate(series_rows):
        series_of_slices[rows] = s
    groups = {"patient": slice_patient, "series": series_of_slices}

    for head in encoding.heads:
        headers = table.column(f"{head.name}_header").to_pylist()
        if head.categorical:
            result["heads"][head.name], result["_plots"][head.name] = _categorical(
                head, table, headers, calibrators.get(head.name), series_rows,
                groups, series_patient, interval, resamples, rng)
        else:
            result["heads"][head.name], result["_plots"][head.name] = _continuous(
                head, table, headers, series_rows, slice_patient, series_patient, interval)
    return result


def _categorical(head, table, headers, calibrator, series_rows, groups, series_patient,
                 interval, resamples, rng):
    from sklearn.metrics import confusion_matrix, recall_score

    slice_patient = groups["patient"]
    truth = class_indices(head, headers)
    mask = (truth >= 0).astype(np.float64)
    raw = predictions.slice_probabilities(table, head)
    calibrated = predictions.slice_probabilities(table, head, calibrator)
    order = np.argsort(-calibrated, axis=1, kind="stable")
    top1 = order[:, 0]
    hit1 = (top1 == truth).astype(np.float64)
    hit2 = np.any(order[:, :2] == truth[:, None], axis=1).astype(np.float64)
    labelled = mask > 0
    n = int(labelled.sum())
    m: dict[str, Any] = {"kind": "categorical", "classes": len(head.classes), "slices": n,
                         "calibrator": calibrator.family if calibrator else None}
    plot: dict[str, Any] = {}
    if n:
        scores = metrics.summarise(head, metrics.categorical_sums(labelled, hit1 > 0, hit2 > 0))
        m["top1"], m["top2"] = scores["top1"], scores["top2"]
        m["top1_ci"] = interval(hit1, slice_patient, mask)
        m["top2_ci"] = interval(hit2, slice_patient, mask)
        recalls = recall_score(truth[labelled], top1[labelled], labels=range(head.size),
                               average=None, zero_division=np.nan)
        present = set(truth[labelled].tolist())
        m["recall"] = {head.classes[c]: float(recalls[c]) for c in sorted(present)}
        for label, probs in (("before", raw), ("after", calibrated)):
            confidence = probs.max(axis=1)[labelled]
            correct = (probs.argmax(axis=1) == truth)[labelled]
            m[f"ece_{label}"] = calibration_lib.expected_calibration_error(confidence, correct)
            plot[label] = (*calibration_lib.reliability(confidence, correct), m[f"ece_{label}"])
        # How far the calibrated ECE could move with other patients, and what sampling alone
        # gives a perfectly calibrated model on this many series.
        m["ece_after_ci"] = ece_interval(calibrated.max(axis=1)[labelled], hit1[labelled] > 0,
                                         slice_patient[labelled], resamples, rng)
        floor = calibration_lib.ece_noise_floor(calibrated[labelled], groups["series"][labelled],
                                                resamples, rng)
        if len(floor):
            m["ece_floor"], m["ece_floor_p95"] = float(floor.mean()), float(np.percentile(floor, 95))
        plot["confusion"] = confusion_matrix(truth[labelled], top1[labelled], labels=range(head.size))
    # Series: the mean of the slice probabilities, scored against the commonest slice truth.
    s_truth, s_hit1, s_hit2 = [], [], []
    for rows in series_rows:
        labelled_rows = [int(truth[i]) for i in rows if truth[i] >= 0]
        t = commonest([head.classes[c] for c in labelled_rows])
        mean = calibrated[rows].mean(axis=0)
        ranked = np.argsort(-mean, kind="stable")
        s_truth.append(head.classes.index(t) if t is not None else -1)
        s_hit1.append(float(s_truth[-1] >= 0 and ranked[0] == s_truth[-1]))
        s_hit2.append(float(s_truth[-1] >= 0 and s_truth[-1] in ranked[:2]))
    s_mask = (np.array(s_truth) >= 0).astype(np.float64)
    if s_mask.sum():
        scores = metrics.summarise(head, metrics.categorical_sums(s_mask > 0, np.array(s_hit1) > 0,
                                                                  np.array(s_hit2) > 0))
        m["series"] = int(scores["count"])
        m["series_top1"], m["series_top2"] = scores["top1"], scores["top2"]
        m["series_top1_ci"] = interval(np.array(s_hit1), series_patient, s_mask)
    return m, plot


def _continuous(head, table, headers, series_rows, slice_patient, series_patient, interval):
    predicted = np.asarray(table.column(head.name).to_numpy(), np.float64)
    truth = metrics.label_values(head, headers)
    valid = np.isfinite(truth)
    m: dict[str, Any] = {"kind": "continuous", "unit": head.unit, "slices": int(valid.sum())}
    plot: dict[str, Any] = {}
    if valid.any():
        error = np.where(valid, predicted - truth, 0.0)
        scores = metrics.summarise(head, metrics.continuous_sums(predicted, truth))
        m["mae"], m["r2"] = scores["mae"], scores["r2"]
        m["bias"] = float(error[valid].mean())
        m["mae_ci"] = interval(np.abs(error), slice_patient, valid.astype(np.float64))
        plot["true"], plot["predicted"] = truth[valid], predicted[valid]
    s_pred = np.array([np.median(predicted[rows]) for rows in series_rows])
    s_true = np.array([np.median(truth[rows][valid[rows]]) if valid[rows].any() else math.nan
                       for rows in series_rows])
    s_valid = np.isfinite(s_true)
    if s_valid.any():
        s_error = np.where(s_valid, s_pred - s_true, 0.0)
        m["series"] = int(s_valid.sum())
        m["series_mae"] = metrics.summarise(head, metrics.continuous_sums(s_pred, s_true))["mae"]
        m["series_mae_ci"] = interval(np.abs(s_error), series_patient, s_valid.astype(np.float64))
    return m, plot


# --- the report -------------------------------------------------------------------------

def _ci(m: dict, key: str, digits: int = 3) -> str:
    value = m.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    low, high = m.get(f"{key}_ci", (math.nan, math.nan))
    text = f"{value:.{digits}f}"
    return text + (f" [{low:.{digits}f}, {high:.{digits}f}]" if not math.isnan(low) else "")


def _number(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def main_table_rows(metrics: dict) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(header, rows) of the categorical table and of the continuous one."""
    cat_header = ["IAP", "classes", "slices", "slice top-1 [95% CI]", "slice top-2",
                  "series top-1 [95% CI]", "series top-2", "calibrator", "ECE before",
                  "ECE after [95% CI]", "ECE floor (mean, p95)"]
    cont_header = ["IAP", "slices", "MAE [95% CI]", "bias", "R2", "series MAE [95% CI]"]
    cat, cont = [], []
    calibrators = {k: calibration_lib.HeadCalibration.from_json(v)
                   for k, v in metrics.get("calibrators", {}).items()}
    for name, m in metrics["heads"].items():
        if m["kind"] == "categorical":
            cat.append([name, str(m["classes"]), str(m["slices"]), _ci(m, "top1"),
                        _number(m.get("top2")), _ci(m, "series_top1"), _number(m.get("series_top2")),
                        calibrators[name].describe() if name in calibrators else "none",
                        _number(m.get("ece_before")),
                        _ci(m, "ece_after"),
                        f"{_number(m.get('ece_floor'))}, {_number(m.get('ece_floor_p95'))}"
                        if "ece_floor" in m else "-"])
        else:
            unit = f" {m['unit']}" if m.get("unit") else ""
            cont.append([name, str(m["slices"]), _ci(m, "mae") + unit, _number(m.get("bias")) + unit,
                         _number(m.get("r2")), _ci(m, "series_mae") + unit])
    return cat_header, cat, cont_header, cont


def _markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_plots(metrics: dict, out_dir: str) -> dict[str, list[str]]:
    plot_dir = os.path.join(out_dir, "plots")
    written: dict[str, list[str]] = {"confusion": [], "reliability": [], "scatter": []}
    confusions = {name: p["confusion"] for name, p in metrics["_plots"].items() if "confusion" in p}
    if confusions:
        encoding = metrics["_encoding"]
        written["confusion"] = plots.write_confusion_matrices(confusions, encoding, plot_dir)
    for name, p in metrics["_plots"].items():
        if "before" in p:
            curves = {"before calibration": p["before"]}
            if metrics["calibrated"]:
                curves["after calibration"] = p["after"]
            written["reliability"].append(plots.write_reliability(
                curves, name, os.path.join(plot_dir, f"reliability_{name}.png")))
        if "true" in p:
            m = metrics["heads"][name]
            written["scatter"].append(plots.write_scatter(
                p["true"], p["predicted"], name, m["unit"], os.path.join(plot_dir, f"scatter_{name}.png"),
                title=f"{name}: MAE {m['mae']:.3g} {m['unit']}, R2 {m['r2']:.3f}"))
    return written


MAX_FLAGGED_SHOWN = 48


def flagged_series(pred_dir: str) -> list[dict]:
    """Series of series.parquet with header-QA flags (none when it has no qa_flags)."""
    path = os.path.join(pred_dir, "series.parquet")
    if not epath.Path(path).exists() or "qa_flags" not in predictions.read_schema(path).names:
        return []
    rows = predictions.read_table(path).to_pylist()
    return [r for r in rows if r["qa_flags"]]


def middle_slices(pred_dir: str, series_keys) -> dict[str, np.ndarray]:
    """The stored middle slice of each of these series, read back from the input through the
    prediction's paths.local.json (none without it; each TFRecord shard scanned once).
    A series whose slice cannot be read has no entry: a thumbnail is a courtesy, the flag is
    listed either way."""
    wanted = set(series_keys)
    if not wanted:
        return {}
    try:
        kept = local_paths.read(pred_dir)
    except FileNotFoundError:
        return {}
    report = read_json(os.path.join(pred_dir, "predict_report.json"))
    table = predictions.read_table(os.path.join(pred_dir, "slices.parquet"),
                                   columns=["series_key", "slice_index", "file_key", "frame"])
    by_series: dict[str, list] = {}
    for row in table.to_pylist():
        if row["series_key"] in wanted:
            by_series.setdefault(row["series_key"], []).append(row)
    middle = {k: sorted(rows, key=lambda r: r["slice_index"])[len(rows) // 2]
              for k, rows in by_series.items()}
    root, kind = kept["root"], report["input"]["kind"]
    spec = PixelSpec.from_json(report["checkpoint"]["pixel_spec"])
    images: dict[str, np.ndarray] = {}
    if kind == "tfrecord":
        for file in sorted({r["file_key"] for r in middle.values()}):
            targets = {(k, r["frame"]): k for k, r in middle.items() if r["file_key"] == file}
            source = sources.TfrecordSource(root, [os.path.join(root, kept["files"][file])], spec)
            unit = source.plan()[0]
            for s in source.read(unit, []):
                if (s.series_key, s.frame) in targets:
                    images[s.series_key] = s.image
        return images
    for key, row in middle.items():
        path = os.path.join(root, kept["files"][row["file_key"]])
        try:
            if kind == "dicom":
                images[key] = read_prepared_frame(path, row["frame"], spec.stored_size, spec.resize).image
            else:
                array = sources._load_image(path)
                images[key] = array[row["frame"]] if array.ndim == 3 else array
        except (DicomError, OSError, ValueError):
            continue
    return images


def write_report(metrics: dict, out_dir: str, pred_dir: str | None = None) -> dict[str, str]:
    makedirs(out_dir)
    written = write_plots(metrics, out_dir)
    flagged = flagged_series(pred_dir) if pred_dir else []
    images = middle_slices(pred_dir, [r["series_key"] for r in flagged[:MAX_FLAGGED_SHOWN]])
    thumbnails = {key: plots.write_thumbnail(image, os.path.join(out_dir, "plots", "qa", f"{key}.png"))
                  for key, image in images.items()}
    cat_header, cat, cont_header, cont = main_table_rows(metrics)
    title = (f"Evaluation of step {metrics['step']} on {metrics['slices']} slices, "
             f"{metrics['series']} series, {metrics['patients']} patients")
    calibrated = ("through each head's calibrator (column calibrator), fitted on the validation "
                  "split; top-1 is the calibrated argmax" if metrics["calibrated"]
                  else "not calibrated (no calibration.json for this step)")
    notes = (f"Intervals: 95% bootstrap over patients ({metrics['bootstrap_resamples']} resamples). "
             f"Probabilities {calibrated}. Series answer: argmax of the mean slice probabilities.")
    calibration_note = (
        _selection_note(metrics.get("calibration_selection")) +
        f"ECE: top-label, {calibration_lib.ECE_BINS} equal-width bins, with its bootstrap interval "
        f"(biased upwards, like the ECE itself). ECE floor: the ECE of labels drawn from the "
        f"calibrated probabilities themselves ({metrics['bootstrap_resamples']} draws, one per "
        f"series shared by its slices), what a perfectly calibrated model scores on this many "
        f"series: an ECE within it is no evidence of miscalibration.")
    qa_header = ["series", "flags", "header", "predicted"]
    qa_rows = [[r["series_key"], ", ".join(r["qa_flags"]),
                "; ".join(f"{f.split(':')[-1]}={r.get(f.split(':')[-1] + '_header')}" for f in r["qa_flags"]),
                "; ".join(f"{f.split(':')[-1]}={r.get(f.split(':')[-1])} ({r.get(f.split(':')[-1] + '_prob', 0):.2f})"
                          for f in r["qa_flags"])] for r in flagged]
    qa_note = (f"{len(flagged)} series with a header that contradicts a confident prediction"
               if pred_dir and flagged else "No series flagged" if pred_dir else "")
    md = [f"# {title}", "", notes, "", "## Categorical IAPs", "", _markdown_table(cat_header, cat), "",
          calibration_note, "",
          "## Continuous IAPs", "", _markdown_table(cont_header, cont), "",
          "## Model's domain", "", domain_note(metrics) + ".", "",
          "## Header QA", "", qa_note + ".", ""]
    if qa_rows:
        md += [_markdown_table(qa_header, qa_rows), ""]
    md += ["## Plots", ""]
    md += [f"![{os.path.basename(p)}]({relative(p, out_dir)})" for kind in written.values() for p in kind]

    write_text_atomic(os.path.join(out_dir, "report.md"), "\n".join(md) + "\n")

    def html_table(header, rows):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def image(path):
        data = base64.b64encode(epath.Path(path).read_bytes()).decode()
        return f'<img src="data:image/png;base64,{data}" alt="{html.escape(os.path.basename(path))}">'

    qa_cards = "".join(
        f"<figure class='qa'>{image(thumbnails[r['series_key']]) if r['series_key'] in thumbnails else ''}"
        f"<figcaption>{html.escape(row[0])}<br>{html.escape(row[2])}<br>predicted {html.escape(row[3])}"
        f"</figcaption></figure>" for r, row in zip(flagged[:MAX_FLAGGED_SHOWN], qa_rows))
    qa_section = (f"<h2>Header QA</h2><p>{html.escape(qa_note)}.</p><div class='grid'>{qa_cards}</div>"
                  if pred_dir else "")
    sections = "".join(f"<h2>{html.escape(kind.capitalize())}</h2><div class='grid'>" +
                       "".join(f"<figure>{image(p)}</figure>" for p in paths) + "</div>" for kind, paths in written.items() if paths)
    template = string.Template(
        importlib.resources.files("iap_jax").joinpath("templates", "report.html").read_text())
    page = template.substitute(
        title=html.escape(title), notes=html.escape(notes),
        categorical_table=html_table(cat_header, cat), calibration_note=html.escape(calibration_note),
        continuous_table=html_table(cont_header, cont),
        domain_note=html.escape(domain_note(metrics), quote=False),
        qa_section=qa_section, plot_sections=sections)
    write_text_atomic(os.path.join(out_dir, "report.html"), page)
    public = {k: v for k, v in metrics.items() if not k.startswith("_")}
    write_json_atomic(os.path.join(out_dir, "metrics.json"), public)
    return {"report.md": os.path.join(out_dir, "report.md"),
            "report.html": os.path.join(out_dir, "report.html"),
            "metrics.json": os.path.join(out_dir, "metrics.json")}


# --- calibration ------------------------------------------------------------------------

def calibration_selection(calibration: dict | None) -> dict | None:
    """How a calibration chose its heads' families (None for one from before the choice):
    {"selection": its settings, "heads": {IAP: {"family", "cv"}}}."""
    if not calibration or "selection" not in calibration:
        return None
    heads = (calibration.get("fitted_on") or {}).get("heads", {})
    return {"selection": calibration["selection"],
            "heads": {k: {"family": v.get("family"), "cv": v.get("cv", {})} for k, v in heads.items()}}


def _selection_note(selection: dict | None) -> str:
    if not selection or len(selection["selection"]["families"]) < 2:
        return ""
    s = selection["selection"]
    abbreviations = {"temperature": "T", "bcts": "BCTS", "vector": "V"}
    families = s["families"]
    per_head = "; ".join(
        f"{name} {h['family']} (" + ", ".join(f"{abbreviations.get(f, f)} {h['cv'][f]['ece']:.3f}"
                                             for f in families if f in h["cv"]) + ")"
        for name, h in selection["heads"].items() if h.get("cv"))
    return (f"Calibrator family per head by {s['folds']}-fold cross-validation over validation "
            f"patients ({s['repeats']} repeats), {s['rule']}; chosen (out-of-fold ECE): "
            f"{per_head}. ")


# --- command ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iap-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", required=True, help="an iap-predict --out folder")
    parser.add_argument("--out", required=True, help="report folder (report.md, report.html, ...)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None) -> int:
    console.quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        metrics = evaluate(args.predictions, args.bootstrap, args.seed)
        files = write_report(metrics, args.out, args.predictions)
        flagged = flagged_series(args.predictions)
        if flagged:
            print(f"header QA: {len(flagged)} series flagged (listed in the report)")
        if metrics["out_of_domain_series"]:
            print(domain_note(metrics))
        cat_header, cat, cont_header, cont = main_table_rows(metrics)
        print(_markdown_table(cat_header, cat) + "\n\n" + _markdown_table(cont_header, cont))
        print("report: " + ", ".join(files.values()))
    except (ValueError, FileNotFoundError) as err:
        print(f"iap-eval: error: {err}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """Console script entry (iap-eval)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
