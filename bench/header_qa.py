"""Header QA on held-out patients: alter the Manufacturer, the field strength or the model
tag of a share of the test split's DICOM series on purpose, predict the folder with the
calibrated checkpoint, and measure the recall of altered series and the flags on untouched
ones (goal: recall >= 0.9, false flags <= 2%).

  python bench/header_qa.py --workdir runs/demo/train --dicom-root runs/demo/dicom \
      --dataset-dir runs/demo/data/iap_dataset/pre_64/1.0.0 --salt synthetic-demo

The workdir needs a calibration (iap-fit on validation predictions,
as `make demo` does). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

ALTERATIONS = ("Manufacturer", "MagneticFieldStrength", "ManufacturerModelName")
SWAPS = {"Manufacturer": {"GE MEDICAL SYSTEMS": "SIEMENS", "SIEMENS": "GE MEDICAL SYSTEMS"},
         "MagneticFieldStrength": {"1.5": "3", "3": "1.5", "1.494": "2.8936", "2.8936": "1.494"}}


def test_series_keys(dataset_dir: str) -> set[str]:
    from iap_jax.training.input_pipeline import split_examples

    return {example.series for example in split_examples(dataset_dir, "test")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo/train")
    parser.add_argument("--dicom-root", default="runs/demo/dicom")
    parser.add_argument("--dataset-dir", default="runs/demo/data/iap_dataset/pre_64/1.0.0")
    parser.add_argument("--salt", default="synthetic-demo")
    parser.add_argument("--fraction", type=float, default=0.5, help="share of series altered")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("bench", "results", "header_qa.json"))
    args = parser.parse_args()

    import pydicom
    import pyarrow.parquet as pq

    from iap_jax.prediction.calibration import load_calibration
    from iap_jax.io.checkpoints import Checkpointer, resolve_step
    from iap_jax.prediction.job import predict
    from iap_jax.prediction.predict_cli import build_parser
    from iap_jax.io.salt import salted_hash
    from iap_jax.io.series import SeriesSelection, discover

    step = resolve_step(Checkpointer(args.workdir, read_only=True), "best")
    if load_calibration(args.workdir, step) is None:
        sys.exit(f"{args.workdir}: no calibration for step {step}; run iap-fit first")
    keys = test_series_keys(args.dataset_dir)
    found = discover(args.dicom_root, workers=2, progress=False)
    selection = SeriesSelection()
    chosen = [s for s in found.series if selection.rejection(s) is None
              and salted_hash(args.salt, "series", s.key) in keys]
    models: dict[str, set] = {}
    for s in chosen:
        ds = pydicom.dcmread(s.slices[0].path, stop_before_pixels=True)
        models.setdefault(str(ds.Manufacturer), set()).add(str(ds.ManufacturerModelName))
    rng = np.random.default_rng(args.seed)
    altered_index = set(rng.choice(len(chosen), int(round(args.fraction * len(chosen))), replace=False).tolist())
    root = tempfile.mkdtemp(prefix="iap_header_qa_")
    truth: dict[str, str | None] = {}
    for i, series in enumerate(chosen):
        target = os.path.join(root, "dicom", f"series_{i:04d}")
        os.makedirs(target)
        change = ALTERATIONS[len([j for j in altered_index if j < i]) % 3] if i in altered_index else None
        first = pydicom.dcmread(series.slices[0].path, stop_before_pixels=True)
        if change == "ManufacturerModelName":
            others = sorted(models[str(first.Manufacturer)] - {str(first.ManufacturerModelName)})
            new_value = others[int(rng.integers(len(others)))] if others else None
            change = change if new_value else None
        elif change:
            new_value = SWAPS[change][str(first.get(change))] if change == "Manufacturer" else \
                SWAPS[change][f"{float(first.MagneticFieldStrength):g}"]
        for ref in series.slices:
            destination = os.path.join(target, os.path.basename(ref.path))
            if change:
                ds = pydicom.dcmread(ref.path)
                setattr(ds, change, new_value)
                ds.save_as(destination)
            else:
                shutil.copy(ref.path, destination)
        truth[salted_hash(args.salt, "series", series.key)] = change
    out = os.path.join(root, "predict")
    predict(build_parser().parse_args(["--workdir", args.workdir, "--input", os.path.join(root, "dicom"),
                                       "--out", out, "--salt", args.salt, "--quiet"]))
    rows = pq.read_table(os.path.join(out, "series.parquet")).to_pylist()
    flagged = {r["series_key"]: [f for f in r["qa_flags"] if not f.startswith("missing_header")]
               for r in rows}
    result = {"series": len(rows), "altered": {}, "untouched": 0, "false_flags": 0}
    for key, change in truth.items():
        if change is None:
            result["untouched"] += 1
            result["false_flags"] += bool(flagged.get(key))
        else:
            counts = result["altered"].setdefault(change, {"series": 0, "caught": 0})
            counts["series"] += 1
            counts["caught"] += change in flagged.get(key, [])
    altered = sum(c["series"] for c in result["altered"].values())
    caught = sum(c["caught"] for c in result["altered"].values())
    result["recall"] = caught / max(altered, 1)
    result["false_flag_rate"] = result["false_flags"] / max(result["untouched"], 1)
    print(f"{'altered tag':<24} {'series':>7} {'caught':>7} {'recall':>7}")
    for change, c in sorted(result["altered"].items()):
        print(f"{change:<24} {c['series']:>7} {c['caught']:>7} {c['caught'] / c['series']:>7.3f}")
    print(f"{'all altered':<24} {altered:>7} {caught:>7} {result['recall']:>7.3f}")
    print(f"untouched series flagged: {result['false_flags']} of {result['untouched']} "
          f"({result['false_flag_rate']:.1%})")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    shutil.rmtree(root)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
