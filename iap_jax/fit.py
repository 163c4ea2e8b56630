"""iap-fit: what prediction applies, fitted after training from the checkpoint alone and
stored beside it (in the training workdir, for the checkpoint step it was fitted for).

  iap-fit --predictions VALIDATION_PRED_DIR [--workdir TRAIN_WORKDIR] [--no-ood]

VALIDATION_PRED_DIR: iap-predict's tables of the validation split, predicted without a
calibration (`iap-predict ... --split validation --no-calibration`). From them:
- calibration.json: one calibrator per categorical head (temperature, bias-corrected
  temperature or vector scaling, iap_jax.calibration), its family chosen per head by
  patient-grouped cross-validation on these predictions, with the scores; and the header-QA
  thresholds they give (iap_jax.header_qa);
- ood.json: the out-of-distribution model (iap_jax.ood), fitted on the features of the
  train split and thresholded on the validation split's (--no-ood leaves it as it is).
iap-predict applies both from then on; iap-eval reports on predictions, never fits.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from iap_jax import calibration as calibration_lib
from iap_jax import console, evaluate, header_qa, ood, predictions
from iap_jax.atomic import absolute
from iap_jax.labels import LabelEncoding, class_indices


def fit_calibration(pred_dir: str, workdir: str | None = None, qa_iaps=header_qa.QA_IAPS,
                    false_flag_rate: float = header_qa.QA_FALSE_FLAG_RATE,
                    families=calibration_lib.FAMILIES) -> tuple[str, dict]:
    """A calibrator per categorical head fitted on these predictions (and the header-QA
    thresholds they give), saved into the training workdir. Each head's family is chosen
    among `families` by patient-grouped cross-validation on these predictions (the first,
    temperature, unless another is significantly better: calibration.cross_validate and
    select_family) and then fitted on all of them. The QA budget
    is shared by the QA IAPs, so that at most `false_flag_rate` of correctly labelled
    validation series get any flag."""
    slices_path = os.path.join(pred_dir, "slices.parquet")
    metadata = predictions.read_metadata(slices_path)
    encoding = LabelEncoding.from_json(metadata["label_encoding"])
    workdir = workdir or os.path.dirname(os.path.dirname(metadata["checkpoint"]))
    table = predictions.read_table(slices_path)
    if f"{encoding.heads[0].name}_header" not in table.column_names:
        raise ValueError(f"{pred_dir}: the input carried no headers to calibrate against")
    families = tuple(families)
    for family in families:
        calibration_lib.check_family(family)
    patients = evaluate.slice_patients(table)
    calibrators, fitted = {}, {}
    for head in encoding.heads:
        if not head.categorical:
            continue
        truth = class_indices(head, table.column(f"{head.name}_header").to_pylist())
        rows = np.flatnonzero(truth >= 0)
        labels = truth[rows]
        logits = predictions.slice_logits(table, head)[rows]
        scores = (calibration_lib.cross_validate(logits, labels, patients[rows], families)
                  if len(families) > 1 and len(rows) else {})
        family = calibration_lib.select_family(scores) if scores else families[0]
        calibrator = calibration_lib.fit(logits, labels, family)
        calibrators[head.name] = calibrator
        fitted[head.name] = {"slices": int(len(rows)), "patients": int(len(np.unique(patients[rows]))),
                             "family": family, "cv": scores}
        if len(rows):
            for when, c in (("before", None), ("after", calibrator)):
                fitted[head.name][f"nll_{when}"] = calibration_lib.negative_log_likelihood(logits, labels, c)
                fitted[head.name][f"top_label_loss_{when}"] = calibration_lib.top_label_loss(logits, labels, c)
            calibrated_top1 = calibration_lib.calibrated_logits(logits, calibrator).argmax(axis=1)
            fitted[head.name]["top1_changed"] = float(np.mean(logits.argmax(axis=1) != calibrated_top1))
    _, series_rows = predictions.series_groups(table)
    qa_heads = [h for h in encoding.heads if h.categorical and h.name in qa_iaps]
    thresholds = header_qa.fit_thresholds(
        qa_heads, {h.name: predictions.slice_probabilities(table, h, calibrators[h.name]) for h in qa_heads},
        {h.name: table.column(f"{h.name}_header").to_pylist() for h in qa_heads}, series_rows,
        false_flag_rate)
    data = {"step": metadata["step"], "checkpoint": metadata["checkpoint"],
            "calibrators": {k: c.to_json() for k, c in calibrators.items()},
            "selection": {"families": list(families), "folds": calibration_lib.CV_FOLDS,
                          "repeats": calibration_lib.CV_REPEATS, "groups": "patient",
                          "l2": calibration_lib.L2, "seed": calibration_lib.CV_SEED,
                          "temperature_objective": calibration_lib.TEMPERATURE_OBJECTIVE,
                          "rule": f"{families[0]} unless another family has a lower "
                                  "out-of-fold ECE with the 95% bootstrap interval of the "
                                  f"difference below -{calibration_lib.CV_MIN_GAIN:g}"},
            "qa": {"iaps": [h.name for h in qa_heads], "false_flag_rate": false_flag_rate,
                   "thresholds": thresholds, "series": len(series_rows)},
            "fitted_on": {"predictions": absolute(pred_dir), "heads": fitted}}
    return calibration_lib.save_calibration(workdir, data), data


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
            fitted = ood.fit(workdir, step=data["step"], batch_size=args.batch_size)
            print(f"out-of-distribution model for step {fitted['step']}: {len(fitted['groups'])} "
                  f"scanner models, {fitted['features']} features, threshold "
                  f"{fitted['threshold']:.2f} (the {fitted['quantile']:g}th percentile of "
                  f"{fitted['validation_slices']} validation slices)\n"
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
