"""The skip report (prep_report.json) and the readable summary printed after a run.

The report names files by their salted keys (iap_jax.io.local_paths), never by a path: file
and folder names of real archives hold patients' names and UIDs. It is written beside
(never inside) the dataset dir, with paths.local.json, which maps its keys to the paths.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import re
from typing import Any, Callable, Mapping, Sequence

from etils import epath

from iap_jax.core.iaps import IAP_NAMES, SPECS, Kind
from iap_jax.io.storage import read_json


@dataclasses.dataclass(frozen=True)
class FileSkip:
    """A skipped file (or frames of it) as the report lists it: by its salted key."""

    file: str
    reason: str
    detail: str = ""


def discovery_skips(found, key_of: Callable[[str], str]) -> list[FileSkip]:
    """Discovery's skips (iap_jax.io.series.Skip, by relative path) by file key."""
    return [FileSkip(*skip.keyed(key_of)) for skip in found.skips]


def new_report(found, skips: Sequence[FileSkip], rejected: Mapping[str, int],
               used_files: Sequence[str], items: Mapping[str, Sequence], config_name: str,
               notes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What discovery and selection decided, before any pixel is decoded (skips: discovery's,
    by key). `notes` are facts about used series that are not skips (e.g. series without
    PatientID)."""
    skipped = sorted((dataclasses.asdict(s) for s in skips), key=lambda s: s["file"])
    return {
        "config": config_name,
        "archive_fingerprint": found.fingerprint,
        "files": {"found": found.num_files, "used": len(used_files), "skipped": len(skipped),
                  "in_series_not_selected": found.num_files - len(used_files) - len(skipped),
                  "partly_skipped": 0},
        "skipped_by_reason": dict(sorted(collections.Counter(s["reason"] for s in skipped).items())),
        "series": {"found": len(found.series), "selected": len(found.series) - sum(rejected.values()),
                   "not_selected_by_reason": dict(sorted(rejected.items()))},
        # IAP -> vendor-private origin -> files whose value came from there, not the standard element
        "iap_origins": dict(found.iap_origins),
        "slices": {"selected": {name: len(v) for name, v in items.items()}, "skipped_at_decode": 0},
        "notes": dict(notes or {}),
        "skipped": skipped,
        "partly_skipped": [],
    }


def finish_report(report: dict[str, Any], decode_skips: Sequence,
                  slices_per_file: Mapping[str, int]) -> None:
    """Adds the slices whose pixels failed to decode (FileSkip, by file key). A file counts
    as skipped when every selected slice (frame) of it failed, else as used and partly
    skipped."""
    failed: dict[str, list] = {}
    for skip in decode_skips:
        failed.setdefault(skip.file, []).append(skip)
    whole, partly = [], []
    for path, skips in sorted(failed.items()):
        entry = dataclasses.asdict(skips[0])
        if len(skips) >= slices_per_file.get(path, 1):
            whole.append(entry)
        else:
            partly.append({**entry, "slices_skipped": len(skips),
                           "slices_selected": slices_per_file[path]})
    report["slices"]["skipped_at_decode"] = len(decode_skips)
    report["files"]["used"] -= len(whole)
    report["files"]["skipped"] += len(whole)
    report["files"]["partly_skipped"] = len(partly)
    report["skipped"] = sorted(report["skipped"] + whole, key=lambda s: s["file"])
    report["partly_skipped"] = partly
    report["skipped_by_reason"] = dict(sorted(
        collections.Counter(s["reason"] for s in report["skipped"]).items()))


def named_files(report: Mapping[str, Any], keys: Mapping[str, str]) -> dict[str, str]:
    """The entries of `keys` (file key -> path) whose key the report names anywhere (a skip's
    file, the file a duplicate copies, a note): what paths.local.json must map."""
    named = set(re.findall(r"[0-9a-f]{16}", json.dumps(report)))
    return {key: path for key, path in keys.items() if key in named}


def load_report(path) -> dict[str, Any] | None:
    """The report at `path`, or None when there is none yet."""
    return read_json(path) if epath.Path(path).exists() else None


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
        partly = f", {files['partly_skipped']} with some frames skipped" if files.get("partly_skipped") else ""
        lines.append(f"files: {files['found']} found, {files['used']} used{partly}, {files['skipped']} "
                     f"skipped ({reasons}), {files['in_series_not_selected']} in series not selected")
        no_id = report.get("notes", {}).get("no_patient_id")
        if no_id:
            lines.append(f"note: {no_id['series']} selected series without PatientID, grouped by "
                         + ", ".join(f"{k}: {n}" for k, n in no_id["keyed_by"].items()))
    return "\n".join(lines)
