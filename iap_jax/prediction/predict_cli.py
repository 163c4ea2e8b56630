"""iap-predict: a trained checkpoint -> predictions over TFRecord archives, DICOM or PNG folders.

  iap-predict --workdir TRAIN_WORKDIR [--step best|latest|N] --input SPEC [--split NAME]
              --out OUT_DIR [--batch-size N] [--top-k K] [--salt S] [--csv]

The model comes from the checkpoint alone (parameters, batch statistics, label encoding,
pixel spec and config; never the optimizer state), restored onto this process's devices
and rebuilt with a convolution and dtype fit for this machine. One jitted forward of a
fixed global batch shape (the last batch padded and masked) runs over batches sharded on
the local devices while a reader thread decodes the next ones. Several processes
(jax.distributed) each predict their own share of the input's units and write their own
part files; process 0 writes the merged tables and the report.

When the workdir holds a calibration (iap-fit: a calibrator per
categorical head, header-QA thresholds) or an out-of-distribution model (iap-fit) fitted for
the step, they are applied (probabilities, qa_flags, ood_score, unknown_probability and
out_of_domain, at --false-unknown-rate) and recorded; --no-calibration skips both.

Output (OUT_DIR): slices.parquet, series.parquet (iap_jax.prediction.tables), predict_report.json
(inputs, counts, every skipped input with its reason, checkpoint, devices, speed), and
parts/ (one Parquet file per unit of input, the plan and the run's signature: what a
killed run resumes from; delete it once the tables are written if space matters). None of
them holds a path or a file or folder name of the input: files are named by salted keys.
paths.local.json maps the keys to the input's paths (personal data: real archives name
files after patients and UIDs; iap_jax.io.local_paths); --no-local-paths leaves it out.
Exit status: 0; 1 when nothing could be predicted (or, with --strict, when anything was
skipped); 2 on bad arguments or an unusable checkpoint or input.
"""
from __future__ import annotations

import argparse
import os
import sys

from iap_jax.core import console, distributed
from iap_jax.prediction import tables
from iap_jax.prediction.job import REPORT_FILE, predict


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iap-predict", description=__doc__.split("\n\n")[0],
        epilog="SPEC: a TFDS dataset dir (with --split), a glob of TFRecord shards, a DICOM "
               "folder, or a folder or glob of PNG / .npy images.")
    parser.add_argument("--workdir", required=True, help="the training run's --workdir")
    parser.add_argument("--step", default="best",
                        help="best (by validation; the latest if none), latest, or a step number")
    parser.add_argument("--input", required=True, metavar="SPEC", help="what to predict")
    parser.add_argument("--split", default=None, help="split of a TFDS dataset dir (e.g. test)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="global batch (rounded up to a multiple of the devices)")
    parser.add_argument("--top-k", type=int, default=2, help="classes kept per categorical IAP")
    parser.add_argument("--salt", default=None,
                        help="DICOM input: salt of the series/patient keys, as given to iap-prep "
                             "(default: $IAP_PREP_SALT, else the training data dir's prep_salt, "
                             "else one generated and kept in OUT_DIR/prep_salt)")
    parser.add_argument("--series-filter", default=None,
                        help="DICOM input: regex on SeriesDescription (default: as the "
                             "checkpoint's training data was selected)")
    parser.add_argument("--phases", choices=("pre", "all"), default=None,
                        help="DICOM input: phases to predict (default: as in training)")
    parser.add_argument("--slices", default=None,
                        help="DICOM input: all | central:F | stride:K (default: as in training)")
    parser.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 1))),
                        help="DICOM decoding processes")
    parser.add_argument("--conv-impl", default=None,
                        choices=("auto", "xla", "cpu_fast", "onednn"),
                        help="convolution (default: auto, the fastest here)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="compute dtype (default: the trained one; float32 on a CPU)")
    parser.add_argument("--csv", action="store_true", help="also write slices.csv and series.csv")
    parser.add_argument("--no-local-paths", action="store_true",
                        help="do not write OUT_DIR/paths.local.json (the input paths of the "
                             "files' salted keys; iap-sort --link-into and iap-eval's "
                             "thumbnails read it)")
    parser.add_argument("--no-calibration", action="store_true",
                        help="ignore the workdir's calibration.json and ood.json (iap-fit)")
    parser.add_argument("--false-unknown-rate", type=float, default=None,
                        help="share of known series allowed to be called out of domain "
                             "(default: the one ood.json was fitted with, 0.05 unless set)")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard part files of a different earlier run in OUT_DIR")
    parser.add_argument("--strict", action="store_true", help="exit 1 if anything was skipped")
    parser.add_argument("--coordinator", default="",
                        help="multi-process: host:port of process 0 (jax.distributed)")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=-1)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    console.quiet_libraries()
    try:
        distributed.initialise(args.coordinator, args.num_processes, args.process_id)
        report = predict(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        print(f"iap-predict: error: {err}", file=sys.stderr)
        return 2
    if not report:  # not process 0
        return 0

    counts = report["counts"]
    run = report["run"]
    if run["images_this_run"]:
        speed = (f"{run['images_this_run']} this run at {run['images_per_s']} images/s on "
                 f"{run['devices']} {run['backend']} device(s), {run['convolutions']}; input wait "
                 f"{run['input_wait_share']:.0%}")
    else:
        speed = f"all {counts['units']} units predicted by an earlier run into this --out"
    print(f"predicted {counts['slices']} slices in {counts['series']} series ({speed}); skipped "
          f"{counts['skipped_inputs']} input(s)"
          + (f": {report['skipped_by_reason']}" if counts["skipped_inputs"] else ""))
    table = tables.summary_table(os.path.join(args.out, "slices.parquet"),
                                      os.path.join(args.out, "series.parquet"))
    if table:
        print(table)
    if counts.get("out_of_domain_series"):
        print(f"{counts['out_of_domain_series']} series outside the model's domain "
              f"(out_of_domain): their predictions are not to be trusted and got no header QA")
    print(f"predictions: {os.path.join(args.out, 'slices.parquet')}, "
          f"{os.path.join(args.out, 'series.parquet')}\nreport:      "
          f"{os.path.join(args.out, REPORT_FILE)}")
    if counts["slices"] == 0:
        return 1
    return 1 if args.strict and counts["skipped_inputs"] else 0


def run() -> None:
    """Console script entry (iap-predict)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
