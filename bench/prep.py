"""Prep throughput: iap-prep with 1 and 2 workers against the paper's reference extractor.

The reference extractor (the paper's PyTorch repository) reads each DICOM serially with
pydicom, scales every image by its own maximum to 8 bits and writes a PNG. Both sides
process the same files: the pre-contrast fat-sat DCE series of a synthetic cohort
(full preset: real matrix sizes and slice counts). iap-prep's time includes header
discovery, decoding, anti-aliased resizing, TFRecord writing and the statistics pass.

Then the same series written as classic files and as Enhanced MR multi-frame files
(bench/multiframe.py): the builder's per-frame decode cost for each, side by side, and
their ratio (goal: at most 2).

  python bench/prep.py [--patients 2] [--workers 1,2] [--image-size 224] [--out FILE]
                       [--multiframe-patients 1 (0: none)] [--multiframe-slices N]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/multiframe.py


def reference_extractor(files: list[str], out_dir: str) -> int:
    """Serial pydicom read, per-image max scaling to uint8, PNG write (the paper's recipe)."""
    import pydicom
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    for number, path in enumerate(files):
        pixels = pydicom.dcmread(path).pixel_array.astype(np.float32)
        peak = pixels.max()
        scaled = (pixels / peak * 255 if peak > 0 else pixels).astype(np.uint8)
        Image.fromarray(scaled).save(os.path.join(out_dir, f"{number:06d}.png"))
    return len(files)


def selected_files(dicom_root: str) -> list[str]:
    """The files iap-prep selects by default (pre-contrast fat-sat DCE)."""
    from iap_jax.io.series import SeriesSelection, discover

    selection = SeriesSelection()
    found = discover(dicom_root, workers=1, progress=False)
    return [ref.path for s in found.series if selection.rejection(s) is None for ref in s.slices]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=2)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--multiframe-patients", type=int, default=1,
                        help="patients of the enhanced-vs-classic comparison (0: none)")
    parser.add_argument("--multiframe-slices", type=int, default=None,
                        help="slices per series there (default: every slice)")
    parser.add_argument("--out", default=os.path.join("bench", "results", "prep.json"),
                        help="results JSON (relative to the current directory)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow_datasets as tfds

    from data_prep.builder import prepare
    from data_prep.synthetic.cohort import generate_cohort

    tfds.disable_progress_bar()
    work = tempfile.mkdtemp(prefix="bench_prep_")
    try:
        root = os.path.join(work, "dicom")
        generate_cohort(root, args.patients, args.seed, preset="full", phases="pre",
                        workers=max(int(w) for w in args.workers.split(",")))
        files = selected_files(root)
        start = time.perf_counter()
        count = reference_extractor(files, os.path.join(work, "png"))
        reference_s = time.perf_counter() - start
        results = {"patients": args.patients, "slices": count, "image_size": args.image_size,
                   "cpus": os.cpu_count(),
                   "reference": {"seconds": reference_s, "slices_per_s": count / reference_s}}
        for workers in (int(w) for w in args.workers.split(",")):
            start = time.perf_counter()
            dataset_dir = prepare(root, os.path.join(work, f"tfds_{workers}"), image_size=args.image_size,
                                  salt="bench", workers=workers, progress=False)
            seconds = time.perf_counter() - start
            written = sum(s.num_examples for s in tfds.builder_from_directory(dataset_dir).info.splits.values())
            assert written == count, (written, count)
            results[f"iap_prep_workers_{workers}"] = {
                "seconds": seconds, "slices_per_s": written / seconds,
                "ratio_to_reference": (written / seconds) / (count / reference_s)}
        multiframe = None
        if args.multiframe_patients > 0:
            from multiframe import compare, write_both

            roots = write_both(os.path.join(work, "multiframe"), args.multiframe_patients, args.seed,
                               slices=args.multiframe_slices)
            multiframe = compare(roots, "prep", args.image_size, workers=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'method':<24}{'seconds':>10}{'slices/s':>12}{'x reference':>13}")
    for name, row in results.items():
        if isinstance(row, dict):
            ratio = row.get("ratio_to_reference", 1.0)
            print(f"{name:<24}{row['seconds']:>10.2f}{row['slices_per_s']:>12.1f}{ratio:>13.2f}")
    print(f"({count} slices, {args.patients} patients, full preset, {os.cpu_count()} CPUs)")
    if multiframe:
        from multiframe import table

        results["multiframe"] = multiframe
        print("\n" + table(multiframe))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
