"""`iap-synth`: write a synthetic breast DCE-MRI DICOM cohort, its cohort.csv and a contact sheet."""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from data_prep.synthetic import cohort
from data_prep.synthetic.contact_sheet import write_contact_sheet

from iap_jax.core import console


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="iap-synth", description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--patients", type=positive_int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(cohort.PRESETS), default="small")
    parser.add_argument("--phases", choices=("pre", "all"), default="pre",
                        help="pre: T1 non-fat-sat + pre-contrast DCE; all: also post-contrast phases")
    parser.add_argument("--slices", type=positive_int, default=None,
                        help="slices per series, spread evenly over the slab (default: 20 for "
                             "small, every slice for full)")
    parser.add_argument("--enhanced", type=share, default=0.0, metavar="FRACTION",
                        help="share of series written as one Enhanced MR multi-frame file each "
                             "(as current Siemens, Philips and Canon scanners do), drawn per "
                             "series from the seed; 1: every series (default 0: a file per slice)")
    parser.add_argument("--workers", type=positive_int, default=1)
    parser.add_argument("--contact-sheet", type=Path, default=None,
                        help="PNG path (default OUT/contact_sheet.png)")
    return parser.parse_args(argv)


def summary_table(rows: list[dict], results: list, seconds: float) -> str:
    per_scanner = defaultdict(lambda: {"series": 0, "slices": 0, "patients": 0, "field": "",
                                        "seconds": 0.0})
    for row in rows:
        entry = per_scanner[row["scanner"]]
        entry["series"] += 1
        entry["slices"] += row["n_slices"]
        entry["field"] = row["MagneticFieldStrength"]
    for result in results:
        per_scanner[result.scanner_key]["patients"] += 1
        per_scanner[result.scanner_key]["seconds"] += result.seconds
    lines = [f"{'scanner':<20} {'field':>7} {'patients':>8} {'series':>6} {'slices':>7} "
             f"{'cpu s':>7} {'slices/s':>9}"]
    for key in sorted(per_scanner):
        e = per_scanner[key]
        rate = e["slices"] / e["seconds"] if e["seconds"] > 0 else 0.0
        lines.append(f"{key:<20} {e['field']:>7} {e['patients']:>8} {e['series']:>6} "
                     f"{e['slices']:>7} {e['seconds']:>7.1f} {rate:>9.1f}")
    written = sum(r.slices_written for r in results)
    total_slices = sum(row["n_slices"] for row in rows)
    lines.append(f"{'total':<20} {'':>7} {len(results):>8} {len(rows):>6} {total_slices:>7} "
                 f"{seconds:>7.1f} {written / seconds if seconds > 0 else 0.0:>9.1f}"
                 f"  (wall; {written} slices written this run)")
    return "\n".join(lines)


def main(argv=None) -> int:
    console.quiet_libraries()
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        rows, results = cohort.run_cohort(args.out, args.patients, args.seed, args.preset,
                                          args.phases, args.workers, progress=cohort.StderrProgress(),
                                          slices=args.slices, enhanced=args.enhanced)
    except ValueError as error:
        print(f"iap-synth: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(summary_table(rows, results, seconds))
    sheet = write_contact_sheet(args.out, args.contact_sheet or args.out / "contact_sheet.png")
    print(f"cohort: {args.out / cohort.CSV_NAME}\ncontact sheet: {sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
