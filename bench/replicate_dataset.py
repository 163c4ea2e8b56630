"""A prepared dataset whose every split holds its records `copies` times: the same shard
files again (hard links where the file system allows), under the names and counts its
dataset_info.json then declares. For measuring throughput at batches larger than a small
dataset holds (the accelerator bundle carries 240 slices); the label statistics and prep
options are the source's (the vocabularies do not change when every record repeats).

  python bench/replicate_dataset.py SRC DST --min-train N   (prints DST)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iap_jax.io.dataset_info import DatasetInfo, shard_file_name  # noqa: E402


def replicate(source: str, target: str, copies: int) -> str:
    info = DatasetInfo.load(source)
    with open(os.path.join(source, "dataset_info.json")) as f:
        metadata = json.load(f)
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    for split in metadata["splits"]:
        files = info.split(split["name"]).files
        count = len(files) * copies
        for copy in range(copies):
            for i, path in enumerate(files):
                name = shard_file_name(split.get("filepathTemplate"), metadata["name"],
                                       split["name"], copy * len(files) + i, count)
                try:
                    os.link(path, os.path.join(target, name))
                except OSError:
                    shutil.copy(path, os.path.join(target, name))
        split["shardLengths"] = [str(n) for n in split["shardLengths"]] * copies
        split["numBytes"] = str(int(split.get("numBytes", 0)) * copies)
    for name in os.listdir(source):
        if name.endswith(".json") and name != "dataset_info.json":
            shutil.copy(os.path.join(source, name), target)
    with open(os.path.join(target, "dataset_info.json"), "w") as f:
        json.dump(metadata, f, indent=2)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--min-train", type=int, required=True,
                        help="copies enough for at least this many train slices (at least 2)")
    args = parser.parse_args()
    train = DatasetInfo.load(args.source).split("train").num_examples
    copies = max(2, math.ceil(args.min_train / max(train, 1)))
    print(replicate(args.source, args.target, copies))
    return 0


if __name__ == "__main__":
    sys.exit(main())
