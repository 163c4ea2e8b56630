"""The report iap-eval writes from the scores (iap_jax.analysis.evaluate): report.md, laid
out like the paper's results table; report.html, one self-contained page from
templates/report.html; metrics.json; confusion matrices, TE/TR scatter plots, reliability
diagrams and the header-QA thumbnails as PNG."""
from __future__ import annotations

import base64
import html
import importlib.resources
import math
import os
import string

import numpy as np
from etils import epath

from iap_jax.analysis.evaluate import domain_note
from iap_jax.core.preprocess import PixelSpec
from iap_jax.io import local_paths, plots, sources
from iap_jax.io.dicom import DicomError, read_prepared_frame
from iap_jax.io.storage import (makedirs, read_json, relative, write_json_atomic,
                                write_text_atomic)
from iap_jax.prediction import calibration as calibration_lib
from iap_jax.prediction import tables

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


def markdown_table(header, rows) -> str:
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
    if not epath.Path(path).exists() or "qa_flags" not in tables.read_schema(path).names:
        return []
    rows = tables.read_table(path).to_pylist()
    return [r for r in rows if r["qa_flags"]]


def out_of_domain_rows(pred_dir: str) -> list[list[str]]:
    """The series marked out of the model's domain, the least known first: series key,
    patient, score and unknown probability (none without an out-of-distribution model)."""
    path = os.path.join(pred_dir, "series.parquet")
    if not epath.Path(path).exists() or "out_of_domain" not in tables.read_schema(path).names:
        return []
    rows = [r for r in tables.read_table(path).to_pylist() if r["out_of_domain"]]
    rows.sort(key=lambda r: -r["ood_score"])
    return [[r["series_key"], r["patient"] or "", f"{r['ood_score']:.2f}",
             "-" if r.get("unknown_probability") is None else f"{r['unknown_probability']:.3f}"]
            for r in rows]


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
    table = tables.read_table(os.path.join(pred_dir, "slices.parquet"),
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
    domain_header = ["series", "patient", "score", "unknown probability"]
    domain_rows = out_of_domain_rows(pred_dir) if pred_dir else []
    shown = domain_rows[:MAX_FLAGGED_SHOWN]
    domain_more = (f"The first {len(shown)} of {len(domain_rows)}, the least known first."
                   if len(domain_rows) > len(shown) else "")
    qa_header = ["series", "flags", "header", "predicted"]
    qa_rows = [[r["series_key"], ", ".join(r["qa_flags"]),
                "; ".join(f"{f.split(':')[-1]}={r.get(f.split(':')[-1] + '_header')}" for f in r["qa_flags"]),
                "; ".join(f"{f.split(':')[-1]}={r.get(f.split(':')[-1])} ({r.get(f.split(':')[-1] + '_prob', 0):.2f})"
                          for f in r["qa_flags"])] for r in flagged]
    qa_note = (f"{len(flagged)} series with a header that contradicts a confident prediction"
               if pred_dir and flagged else "No series flagged" if pred_dir else "")
    md = [f"# {title}", "", notes, "", "## Categorical IAPs", "", markdown_table(cat_header, cat), "",
          calibration_note, "",
          "## Continuous IAPs", "", markdown_table(cont_header, cont), "",
          "## Model's domain", "", domain_note(metrics) + ".", ""]
    if shown:
        md += [markdown_table(domain_header, shown), ""] + ([domain_more, ""] if domain_more else [])
    md += ["## Header QA", "", qa_note + ".", ""]
    if qa_rows:
        md += [markdown_table(qa_header, qa_rows), ""]
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
        importlib.resources.files("iap_jax.analysis").joinpath("templates", "report.html").read_text())
    page = template.substitute(
        title=html.escape(title), notes=html.escape(notes),
        categorical_table=html_table(cat_header, cat), calibration_note=html.escape(calibration_note),
        continuous_table=html_table(cont_header, cont),
        domain_note=html.escape(domain_note(metrics), quote=False),
        domain_table=(html_table(domain_header, shown) if shown else "")
        + (f"<p>{html.escape(domain_more)}</p>" if domain_more else ""),
        qa_section=qa_section, plot_sections=sections)
    write_text_atomic(os.path.join(out_dir, "report.html"), page)
    public = {k: v for k, v in metrics.items() if not k.startswith("_")}
    write_json_atomic(os.path.join(out_dir, "metrics.json"), public)
    return {"report.md": os.path.join(out_dir, "report.md"),
            "report.html": os.path.join(out_dir, "report.html"),
            "metrics.json": os.path.join(out_dir, "metrics.json")}


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
