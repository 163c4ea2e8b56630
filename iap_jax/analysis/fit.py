"""Fitting what prediction applies, after training, from the checkpoint alone: the
calibrators with their header-QA thresholds, and the out-of-distribution model. The
`iap-fit` command (fit_cli) runs it; its artefacts lie beside the checkpoint."""
from __future__ import annotations

import os

import numpy as np

from iap_jax.analysis import evaluate
from iap_jax.core.labels import LabelEncoding, class_indices
from iap_jax.io.storage import absolute
from iap_jax.prediction import calibration as calibration_lib
from iap_jax.prediction import header_qa, tables


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
    metadata = tables.read_metadata(slices_path)
    encoding = LabelEncoding.from_json(metadata["label_encoding"])
    workdir = workdir or os.path.dirname(os.path.dirname(metadata["checkpoint"]))
    table = tables.read_table(slices_path)
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
        logits = tables.slice_logits(table, head)[rows]
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
    _, series_rows = tables.series_groups(table)
    qa_heads = [h for h in encoding.heads if h.categorical and h.name in qa_iaps]
    thresholds = header_qa.fit_thresholds(
        qa_heads, {h.name: tables.slice_probabilities(table, h, calibrators[h.name]) for h in qa_heads},
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
