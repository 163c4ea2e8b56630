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
fitted by iap-fit (iap_jax/analysis/fit_cli.py) and applied by iap-predict.
"""
from __future__ import annotations

import argparse
import sys

from iap_jax.analysis.evaluate import domain_note, evaluate
from iap_jax.analysis.report import flagged_series, main_table_rows, markdown_table, write_report
from iap_jax.core import console


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
        print(markdown_table(cat_header, cat) + "\n\n" + markdown_table(cont_header, cont))
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
