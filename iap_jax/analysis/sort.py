"""Sorting series into domains, each with the downstream model to run (the paper's
application; the `iap-sort` command is sort_cli).

Each series of iap-predict's series.parquet gets a domain, the downstream model of that
domain and a confidence (the lowest series probability among the IAPs the domain is decided
by); below the threshold, or out of distribution (iap_jax.prediction.ood), it is `unknown`. By default the domain is the predicted
manufacturer and field strength. A rules file decides otherwise, first match wins:

  {"min_confidence": 0.8,
   "domains": [
     {"name": "ge_1.5T", "model": "seg_ge15",
      "when": {"Manufacturer": "GE MEDICAL SYSTEMS", "MagneticFieldStrength": ["1.5"]}},
     {"name": "short_te", "model": "seg_short_te", "when": {"EchoTime": {"max": 2.0}}}]}

`when` takes a class (or a list of them) for a categorical IAP and {"min", "max"} for a
continuous one; a series no rule matches is `unknown`. --link-into DIR keeps DIR/<domain>/
<series_key> symbolic links to each series' folder (file inputs, whose paths the prediction
kept in paths.local.json; the manifest names no path): a rerun adds what is
new, moves a series whose domain changed, and never duplicates or deletes anything else.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
from typing import Any

from iap_jax.io import local_paths
from iap_jax.io.storage import absolute, is_remote, makedirs, read_json, write_text_atomic
from iap_jax.prediction.tables import read_table

UNKNOWN = "unknown"
DEFAULT_MIN_CONFIDENCE = 0.8
MANIFEST_COLUMNS = ("series_key", "patient", "domain", "model", "confidence",
                    "unknown_probability", "reason")


def default_rules() -> dict:
    """Manufacturer x field strength, each pair a domain of its own."""
    return {"domains": None, "by": ["Manufacturer", "MagneticFieldStrength"]}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "blank"


def _matches(condition: Any, value: Any) -> bool:
    if isinstance(condition, dict):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        return condition.get("min", -math.inf) <= value <= condition.get("max", math.inf)
    options = condition if isinstance(condition, list) else [condition]
    return value in options


def assign(series: dict, rules: dict, min_confidence: float) -> tuple[str, str, float, str]:
    """(domain, model, confidence, reason) of one series row."""
    # The predictor decided it (tables.series_table); tables written before the column
    # was named out_of_domain call it `unknown`.
    if series.get("out_of_domain", series.get("unknown")):
        probability = series.get("unknown_probability")
        return UNKNOWN, "", math.nan, (
            f"out of distribution (score {series['ood_score']:.2f}"
            + (f", unknown probability {probability:.3f})" if probability is not None else ")"))
    def confidence_of(names):
        probs = [series.get(f"{n}_prob") for n in names]
        probs = [p for p in probs if p is not None]
        return min(probs) if probs else 1.0

    if rules.get("domains") is None:
        names = rules["by"]
        confidence = confidence_of(names)
        domain = "_".join(_slug(str(series[n])) + ("T" if n == "MagneticFieldStrength" else "")
                          for n in names)
        model = domain
    else:
        for rule in rules["domains"]:
            names = list(rule["when"])
            unknown = [n for n in names if n not in series]
            if unknown:
                raise ValueError(f"rule {rule['name']!r} names IAPs {unknown} the predictions lack")
            if all(_matches(rule["when"][n], series[n]) for n in names):
                domain, model, confidence = rule["name"], rule.get("model", rule["name"]), confidence_of(names)
                break
        else:
            return UNKNOWN, "", math.nan, "no rule matches"
    if confidence < min_confidence:
        return UNKNOWN, "", confidence, f"confidence {confidence:.3f} below {min_confidence}"
    return domain, model, confidence, ""


def _series_folders(pred_dir: str) -> tuple[dict[str, str], str]:
    """Each series' folder relative to the input root (common parent of its files) and the
    input root, from the run's paths.local.json (the only file that names input paths)."""
    report = read_json(os.path.join(pred_dir, "predict_report.json"))
    if report["input"]["kind"] == "tfrecord":
        raise ValueError("--link-into needs predictions of DICOM or image files, not TFRecords")
    try:
        kept = local_paths.read(pred_dir)
    except FileNotFoundError as err:
        raise ValueError(f"--link-into needs the input's paths: {err}") from None
    table = read_table(os.path.join(pred_dir, "slices.parquet"), columns=["series_key", "file_key"])
    folders: dict[str, set] = {}
    for key, file in zip(table.column("series_key").to_pylist(), table.column("file_key").to_pylist()):
        folders.setdefault(key, set()).add(os.path.dirname(kept["files"][file]) or ".")
    return {k: os.path.commonpath(sorted(v)) if len(v) > 1 else next(iter(v))
            for k, v in folders.items()}, kept["root"]


def link_into(manifest: list[dict], link_dir: str, pred_dir: str) -> dict[str, int]:
    """DIR/<domain>/<series_key> -> the series folder; moves changed series, adds new ones.
    Symbolic links are local: DIR, and the input they point into, are local folders."""
    folders, root = _series_folders(pred_dir)
    for folder in (link_dir, root):
        if is_remote(folder):
            raise ValueError(f"--link-into: {folder} is not local; symbolic links need a local "
                             f"folder and a local input")
    wanted = {row["series_key"]: os.path.join(link_dir, _slug(row["domain"]), row["series_key"])
              for row in manifest if row["series_key"] in folders}
    counts = {"added": 0, "moved": 0, "kept": 0}
    existing = {}
    if os.path.isdir(link_dir):
        for domain in os.listdir(link_dir):
            folder = os.path.join(link_dir, domain)
            if os.path.isdir(folder) and not os.path.islink(folder):
                for name in os.listdir(folder):
                    if os.path.islink(os.path.join(folder, name)):
                        existing.setdefault(name, []).append(os.path.join(folder, name))
    for row in manifest:
        key = row["series_key"]
        if key not in wanted:
            continue
        target = os.path.join(root, folders[key])
        path = wanted[key]
        stale = [p for p in existing.get(key, []) if p != path]
        for p in stale:
            os.unlink(p)
        if os.path.islink(path) and os.readlink(path) == target:
            counts["kept"] += 1
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.lexists(path):
            os.unlink(path)
        os.symlink(target, path)
        counts["moved" if stale else "added"] += 1
    return counts


def sort_series(pred_dir: str, rules: dict | None, out: str, min_confidence: float | None = None,
                link_dir: str | None = None) -> dict[str, Any]:
    table = read_table(os.path.join(pred_dir, "series.parquet"))
    rules = rules or default_rules()
    threshold = min_confidence if min_confidence is not None else rules.get(
        "min_confidence", DEFAULT_MIN_CONFIDENCE)
    manifest = []
    for series in table.to_pylist():
        domain, model, confidence, reason = assign(series, rules, threshold)
        manifest.append({"series_key": series["series_key"], "patient": series["patient"],
                         "domain": domain, "model": model,
                         "confidence": "" if math.isnan(confidence) else f"{confidence:.4f}",
                         "unknown_probability": ("" if series.get("unknown_probability") is None
                                                 else f"{series['unknown_probability']:.4f}"),
                         "reason": reason})
    makedirs(os.path.dirname(absolute(out)))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=MANIFEST_COLUMNS)
    writer.writeheader()
    writer.writerows(manifest)
    write_text_atomic(out, text.getvalue())
    summary = {"series": len(manifest), "domains": {}}
    for row in manifest:
        summary["domains"][row["domain"]] = summary["domains"].get(row["domain"], 0) + 1
    if link_dir:
        summary["links"] = link_into(manifest, link_dir, pred_dir)
    return summary
