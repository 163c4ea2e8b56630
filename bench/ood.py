"""Unknown-domain detection: train with one scanner model left out (the training config's
input.exclude), fit the out-of-distribution model (iap_jax.prediction.ood), predict every shard, and
score how well `ood_score` tells the held-out scanner's series from unseen patients of the
known scanners (test split). Prints a table and writes JSON.

  python bench/ood.py --dataset-dir runs/demo/data/iap_dataset/pre_64/1.0.0 --hold-out SKYRA

Goal: AUROC at least 0.9 for a held-out model whose manufacturer is seen in training.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", default="runs/demo/data/iap_dataset/pre_64/1.0.0")
    parser.add_argument("--hold-out", default="SKYRA", help="ManufacturerModelName to leave out")
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "synthetic_cpu.py"))
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder")
    parser.add_argument("--out", default=os.path.join("bench", "results", "ood.json"))
    args = parser.parse_args()

    import pyarrow.parquet as pq
    from sklearn.metrics import roc_auc_score

    from iap_jax.io import local_paths

    from iap_jax.prediction import ood

    from iap_jax.training import train
    from iap_jax.prediction.job import predict
    from iap_jax.prediction.predict_cli import build_parser
    from iap_jax.prediction.tables import series_groups

    root = args.workdir or tempfile.mkdtemp(prefix="iap_bench_ood_")
    config = runpy.run_path(args.config)["get_config"]("")
    config.dataset_dir = args.dataset_dir
    config.progress_bar = False
    config.input.exclude = {"ManufacturerModelName": [args.hold_out]}
    if args.epochs:
        config.num_epochs = args.epochs
    workdir = os.path.join(root, "train")
    train.train_and_evaluate(config, workdir)
    fitted = ood.fit(workdir)
    shards = os.path.join(args.dataset_dir, "*.tfrecord*")
    out = os.path.join(root, "predict")
    predict(build_parser().parse_args(["--workdir", workdir, "--input", shards, "--out", out,
                                       "--quiet", "--overwrite"]))
    table = pq.read_table(os.path.join(out, "slices.parquet"))
    keys, groups = series_groups(table)
    slice_scores = table.column("ood_score").to_numpy()
    models = table.column("ManufacturerModelName_header").to_pylist()
    paths = local_paths.read(out)["files"]  # which shard (split) each slice came from
    sources = [paths[key] for key in table.column("file_key").to_pylist()]
    labels, values = {"slice": [], "series": []}, {"slice": [], "series": []}
    for rows in groups:
        model, in_test = models[rows[0]], "-test." in sources[rows[0]]
        if model == args.hold_out:
            label = 1
        elif in_test:
            label = 0
        else:
            continue  # known scanners' train / validation patients: seen or used to fit
        labels["series"].append(label)
        values["series"].append(float(np.median(slice_scores[rows])))
        labels["slice"] += [label] * len(rows)
        values["slice"] += slice_scores[rows].tolist()
    threshold = fitted["threshold"]
    result = {"hold_out": args.hold_out, "threshold": threshold, "groups": fitted["groups"]}
    print(f"held out {args.hold_out}; known scanners {fitted['groups']}; threshold {threshold:.2f}")
    print(f"{'level':<8} {'held-out':>9} {'known':>7} {'AUROC':>7} {'held-out unknown':>17} "
          f"{'known unknown':>14}")
    for level in ("slice", "series"):
        y, s = np.asarray(labels[level]), np.asarray(values[level])
        auroc = float(roc_auc_score(y, s))
        detected = float(np.mean(s[y == 1] > threshold))
        false_unknown = float(np.mean(s[y == 0] > threshold))
        result[level] = {"held_out": int(y.sum()), "known": int((y == 0).sum()), "auroc": auroc,
                         "held_out_unknown_rate": detected, "false_unknown_rate": false_unknown}
        print(f"{level:<8} {int(y.sum()):>9} {int((y == 0).sum()):>7} {auroc:>7.3f} "
              f"{detected:>17.1%} {false_unknown:>14.1%}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
