"""Enhanced MR multi-frame files beside classic ones: the same synthetic series written both
ways (iap-synth --enhanced 1 and 0), and the per-frame cost of reading their selected slices
as iap-prep's builder and iap-predict's DICOM source do (decode, resize, to uint16; the
header discovery before it is not timed). Used by bench/prep.py and bench/predict.py.

  python bench/multiframe.py [--patients 1] [--slices N] [--workers 1] [--image-size 224]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time

KINDS = ("classic", "enhanced")


def write_both(work: str, patients: int, seed: int, preset: str = "full", slices: int | None = None,
               workers: int = 1) -> dict[str, str]:
    """The same cohort written a file per slice and a multi-frame file per series."""
    from data_prep.synthetic.cohort import generate_cohort

    roots = {}
    for kind in KINDS:
        roots[kind] = os.path.join(work, f"dicom_{kind}")
        generate_cohort(roots[kind], patients, seed, preset=preset, phases="pre", workers=workers,
                        slices=slices, enhanced=1.0 if kind == "enhanced" else 0.0)
    return roots


def predictor_reader(root: str, image_size: int, workers: int):
    """A timed read of every selected slice through iap-predict's DicomSource."""
    from iap_jax.core.preprocess import PixelSpec
    from iap_jax.io.sources import DicomSource

    source = DicomSource(root, PixelSpec(stored_size=image_size), salt="bench", workers=workers,
                         progress=False)
    units = source.plan()

    def read() -> int:
        skips: list = []
        count = sum(1 for unit in units for _ in source.read(unit, skips))
        assert not skips, skips[:3]
        return count

    return read, source.close


def prep_reader(root: str, image_size: int, workers: int):
    """A timed decode of every selected slice through iap-prep's builder (local workers)."""
    from data_prep.builder import IapDataset, make_config
    from data_prep.examples import make_examples

    data_dir = tempfile.mkdtemp(prefix="bench_multiframe_")
    config = make_config(image_size=image_size)
    predefined = {c.name for c in IapDataset.BUILDER_CONFIGS}  # passed by name, as prepare() does
    dataset = IapDataset(config=config.name if config.name in predefined else config, data_dir=data_dir,
                         workers=workers, progress=False, salt="bench")
    _, plan = dataset._plan_work(root)
    items = [item for split in plan.items.values() for item in split]
    make = functools.partial(make_examples, image_size=image_size, resize_mode="resize")

    def read() -> int:
        examples = sum(1 for _ in dataset._generate_locally(items, make))
        assert examples == len(items), (examples, len(items))
        return examples

    return read, functools.partial(shutil.rmtree, data_dir, ignore_errors=True)


READERS = {"predict": predictor_reader, "prep": prep_reader}


def compare(roots: dict[str, str], reader: str, image_size: int, workers: int,
            repeats: int = 2) -> dict:
    """Best of `repeats` (classic and enhanced interleaved) per kind, and the ratio of the
    enhanced per-frame cost to the classic one (the goal: at most 2)."""
    readers = {kind: READERS[reader](roots[kind], image_size, workers) for kind in KINDS}
    best: dict[str, dict] = {}
    try:
        for _ in range(repeats):
            for kind in KINDS:
                read, _ = readers[kind]
                start = time.perf_counter()
                frames = read()
                seconds = time.perf_counter() - start
                if kind not in best or seconds < best[kind]["seconds"]:
                    best[kind] = {"frames": frames, "seconds": seconds,
                                  "ms_per_frame": 1000 * seconds / frames,
                                  "frames_per_s": frames / seconds}
    finally:
        for _, close in readers.values():
            close()
    assert best["classic"]["frames"] == best["enhanced"]["frames"]
    return {"reader": reader, "workers": workers, "image_size": image_size, **best,
            "ratio_enhanced_to_classic": best["enhanced"]["ms_per_frame"] / best["classic"]["ms_per_frame"]}


def table(result: dict) -> str:
    lines = [f"{'read (' + result['reader'] + ', ' + str(result['workers']) + ' worker(s))':<32}"
             f"{'frames':>8}{'seconds':>10}{'ms/frame':>10}{'frames/s':>10}"]
    for kind in KINDS:
        row = result[kind]
        lines.append(f"{kind:<32}{row['frames']:>8}{row['seconds']:>10.2f}{row['ms_per_frame']:>10.2f}"
                     f"{row['frames_per_s']:>10.1f}")
    lines.append(f"{'enhanced / classic per frame':<32}{result['ratio_enhanced_to_classic']:>38.2f}"
                 "  (goal: at most 2)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=1)
    parser.add_argument("--slices", type=int, default=None, help="slices per series (default: all)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--readers", default="prep,predict")
    parser.add_argument("--out", default=os.path.join("bench", "results", "multiframe.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    work = tempfile.mkdtemp(prefix="bench_multiframe_")
    try:
        roots = write_both(work, args.patients, args.seed, slices=args.slices)
        results = [compare(roots, reader, args.image_size, args.workers)
                   for reader in args.readers.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for result in results:
        print(table(result) + "\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"patients": args.patients, "slices": args.slices, "results": results}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
