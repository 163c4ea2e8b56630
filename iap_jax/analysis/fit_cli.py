"""iap-fit: what prediction applies, fitted after training from the checkpoint alone and
stored beside it (in the training workdir, for the checkpoint step it was fitted for).

  iap-fit --predictions VALIDATION_PRED_DIR [--workdir TRAIN_WORKDIR] [--no-ood]

VALIDATION_PRED_DIR: iap-predict's tables of the validation split, predicted without a
calibration (`iap-predict ... --split validation --no-calibration`). From them:
- calibration.json: one calibrator per categorical head (temperature, bias-corrected
  temperature or vector scaling, iap_jax.prediction.calibration), its family chosen per head by
  patient-grouped cross-validation on these predictions, with the scores; and the header-QA
  thresholds they give (iap_jax.prediction.header_qa);
- ood.json (with ood.npz): the out-of-distribution model (iap_jax.prediction.ood), fitted on
  the features of the train split, with the validation split's scores that give its p-values
  and, at --false-unknown-rate, its decision (--no-ood leaves it as it is).
iap-predict applies both from then on; iap-eval reports on predictions, never fits.
"""
from __future__ import annotations

import argparse
import os
import sys

from iap_jax.analysis.fit import fit_calibration
from iap_jax.core import console
from iap_jax.prediction import calibration as calibration_lib
from iap_jax.prediction import header_qa, ood


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iap-fit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", required=True,
                        help="iap-predict's --out of the validation split, without calibration")
    parser.add_argument("--workdir", default=None,
                        help="the training workdir (default: the predictions' checkpoint's)")
    parser.add_argument("--calibration-families", default=",".join(calibration_lib.FAMILIES),
                        help="calibrator families to choose from per head, the first the default")
    parser.add_argument("--qa-iaps", default=",".join(header_qa.QA_IAPS),
                        help="categorical IAPs whose headers are checked")
    parser.add_argument("--qa-false-flag-rate", type=float, default=header_qa.QA_FALSE_FLAG_RATE,
                        help="share of correctly labelled validation series allowed a flag")
    parser.add_argument("--no-ood", action="store_true", help="fit the calibration only")
    parser.add_argument("--ood-score", default=ood.DEFAULT_SCORE, choices=ood.SCORES,
                        help="the out-of-distribution score (iap_jax.prediction.ood)")
    parser.add_argument("--false-unknown-rate", type=float, default=ood.FALSE_UNKNOWN_RATE,
                        help="share of known series allowed to be called out of domain")
    parser.add_argument("--batch-size", type=int, default=256, help="OOD features: batch size")
    return parser


def main(argv=None) -> int:
    console.quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        path, data = fit_calibration(args.predictions, args.workdir,
                                     tuple(filter(None, args.qa_iaps.split(","))),
                                     args.qa_false_flag_rate,
                                     tuple(filter(None, args.calibration_families.split(","))))
        print(f"calibration for step {data['step']}: " + ", ".join(
            f"{k} {calibration_lib.HeadCalibration.from_json(v).describe()}"
            for k, v in data["calibrators"].items()) + f"\n  -> {path}")
        if not args.no_ood:
            workdir = os.path.dirname(path)
            fitted = ood.fit(workdir, step=data["step"], batch_size=args.batch_size,
                             kind=args.ood_score, rate=args.false_unknown_rate)
            print(f"out-of-distribution model for step {fitted['step']}: {fitted['score']} score "
                  f"over {len(fitted['groups'])} scanner models ({fitted['features']} features); "
                  f"a series is out of domain at an unknown probability of at least "
                  f"{1 - fitted['false_unknown_rate']:g} (score above {fitted['threshold']:.2f}, "
                  f"against {fitted['validation_series']} validation series)\n"
                  f"  -> {os.path.join(workdir, ood.OOD_FILE)}")
    except (ValueError, FileNotFoundError) as err:
        print(f"iap-fit: error: {err}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """Console script entry (iap-fit)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
