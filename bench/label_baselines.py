"""What the labels alone predict: reference points for the validation table.

For each categorical IAP of a prepared dataset, the top-1 on an evaluation split of
  majority      always answering the train split's commonest value;
  by scanner    answering the commonest train value among slices of the same scanner
                (model and field strength), read from the true labels.
"By scanner" is what a model could reach by recognising the scanner and nothing else:
an IAP that a model predicts well above it is read from the image itself; one that stays
near it (the contrast agent of pre-contrast images) is known only through the scanner.

  python bench/label_baselines.py --dataset-dir runs/demo/data/iap_dataset/pre_64/1.0.0
"""
from __future__ import annotations

import argparse
import collections
import json
import os

SCANNER = ("ManufacturerModelName", "MagneticFieldStrength")
DEFAULT_OUT = os.path.join("bench", "results", "label_baselines.json")


def read_labels(dataset_dir: str, split: str) -> list[dict[str, str]]:
    """One {IAP: value} per slice; labels that are not PRESENT are kept as their state."""
    from iap_jax.training.input_pipeline import split_examples

    # Labels only: the images stay encoded.
    return [{name: (value.decode() or f"<{state}>")
             for name, (state, value, _) in example.labels.items()}
            for example in split_examples(dataset_dir, split)]


def _commonest(counter: collections.Counter) -> str:
    # Ties go to the alphabetically first value, so the answer does not depend on read order.
    return min(counter.items(), key=lambda item: (-item[1], item[0]))[0]


def baselines(train: list[dict], evaluation: list[dict], names) -> dict[str, dict[str, float]]:
    results = {}
    for name in names:
        overall = collections.Counter(row[name] for row in train)
        by_scanner = collections.defaultdict(collections.Counter)
        for row in train:
            by_scanner[tuple(row[k] for k in SCANNER)][row[name]] += 1
        majority = _commonest(overall)
        hits_majority = hits_scanner = 0
        for row in evaluation:
            counts = by_scanner.get(tuple(row[k] for k in SCANNER))
            hits_majority += row[name] == majority
            hits_scanner += row[name] == (_commonest(counts) if counts else majority)
        results[name] = dict(majority=hits_majority / len(evaluation),
                             by_scanner=hits_scanner / len(evaluation))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", required=True, help="a prepared dataset's version folder")
    parser.add_argument("--split", default="validation", help="the split to score")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()

    from iap_jax.core.iaps import IAPS, Kind

    names = [spec.name for spec in IAPS if spec.kind == Kind.CATEGORICAL]
    train, evaluation = read_labels(args.dataset_dir, "train"), read_labels(args.dataset_dir, args.split)
    if not train or not evaluation:
        raise SystemExit(f"{args.dataset_dir}: the train and {args.split} splits must both hold slices")
    results = baselines(train, evaluation, names)
    print(f"{'IAP':<24} {'majority':>9} {'by scanner':>11}   ({len(evaluation)} {args.split} slices)")
    for name, row in results.items():
        print(f"{name:<24} {row['majority']:>9.3f} {row['by_scanner']:>11.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(dataset_dir=args.dataset_dir, split=args.split, slices=len(evaluation),
                       results=results), f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
