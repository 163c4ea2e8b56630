"""The skip report (prep_report.json) and the readable summary printed after a run.

The report lists skipped files by their path under the DICOM root, which may contain
patient IDs, so it is a local diagnostic written beside (never inside) the dataset dir.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

from iap_jax.features import STATS_FILE
from iap_jax.iaps import IAP_NAMES, SPECS, Kind


def new_report(found, rejected: Mapping[str, int], used_files: Sequence[str],
               items: Mapping[str, Sequence], config_name: str) -> dict[str, Any]:
    """What discovery and selection decided, before any pixel is decoded."""
    skipped = [dataclasses.asdict(s) for s in found.skips]
    return {
        "config": config_name,
        "files": {"found": found.num_files, "used": len(used_files), "skipped": len(skipped),
                  "in_series_not_selected": found.num_files - len(used_files) - len(skipped)},
        "skipped_by_reason": dict(sorted(collections.Counter(s["reason"] for s in skipped).items())),
        "series": {"found": len(found.series), "selected": len(found.series) - sum(rejected.values()),
                   "not_selected_by_reason": dict(sorted(rejected.items()))},
        "slices": {"selected": {name: len(v) for name, v in items.items()}, "skipped_at_decode": 0},
        "skipped": skipped,
    }


def finish_report(report: dict[str, Any], decode_skips: Sequence) -> None:
    """Adds the files whose pixels failed to decode (counted once per file)."""
    by_path = {}
    for skip in decode_skips:
        by_path.setdefault(skip.path, dataclasses.asdict(skip))
    report["slices"]["skipped_at_decode"] = len(decode_skips)
    report["files"]["used"] -= len(by_path)
    report["files"]["skipped"] += len(by_path)
    report["skipped"] = sorted(report["skipped"] + list(by_path.values()), key=lambda s: s["path"])
    report["skipped_by_reason"] = dict(sorted(
        collections.Counter(s["reason"] for s in report["skipped"]).items()))


def load_report(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_stats(dataset_dir: str) -> dict[str, Any]:
    with open(os.path.join(dataset_dir, STATS_FILE)) as f:
        return json.load(f)


def _format_values(name: str, entry: Mapping[str, Any], top: int = 4) -> str:
    """Continuous IAPs as min/mean/max, categorical ones as their commonest values."""
    numeric = entry.get("numeric")
    if numeric and numeric.get("count") and SPECS[name].kind == Kind.CONTINUOUS:
        return (f"n={numeric['count']} min={numeric['min']:.4g} mean={numeric['mean']:.4g} "
                f"max={numeric['max']:.4g}")
    counts = entry["value_counts"]
    shown = ", ".join(f"{v or '-'}:{n}" for v, n in list(counts.items())[:top])
    more = f" (+{len(counts) - top} more)" if len(counts) > top else ""
    missing = sum(n for state, n in entry["states"].items() if state != "PRESENT")
    return shown + more + (f" [masked {missing}]" if missing else "")


def summary_table(stats: Mapping[str, Any], report: Mapping[str, Any] | None) -> str:
    splits = list(stats)
    lines = [f"{'split':<12}{'patients':>10}{'series':>10}{'slices':>10}"]
    for split in splits:
        s = stats[split]
        lines.append(f"{split:<12}{s['num_patients']:>10}{s['num_series']:>10}{s['num_examples']:>10}")
    lines.append("")
    for split in splits:
        lines.append(f"IAPs in {split}:")
        for name in IAP_NAMES:
            lines.append(f"  {name:<22} {_format_values(name, stats[split]['iaps'][name])}")
    if report:
        files = report["files"]
        reasons = ", ".join(f"{r}: {n}" for r, n in report["skipped_by_reason"].items()) or "none"
        lines.append("")
        lines.append(f"files: {files['found']} found, {files['used']} used, {files['skipped']} skipped "
                     f"({reasons}), {files['in_series_not_selected']} in series not selected")
    return "\n".join(lines)
