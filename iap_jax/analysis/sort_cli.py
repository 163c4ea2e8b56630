"""iap-sort: series -> domains -> the downstream model to run (the paper's application).

  iap-sort --predictions PRED_DIR [--rules RULES.json] --out MANIFEST.csv
           [--min-confidence 0.8] [--link-into DIR]

The rules, the manifest and the links are described in iap_jax.analysis.sort.
"""
from __future__ import annotations

import argparse
import json
import sys

from iap_jax.analysis.sort import DEFAULT_MIN_CONFIDENCE, sort_series
from iap_jax.core import console
from iap_jax.io.storage import read_json


def main(argv=None) -> int:
    console.quiet_libraries()
    parser = argparse.ArgumentParser(prog="iap-sort", description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", required=True, help="an iap-predict --out folder")
    parser.add_argument("--rules", default=None, help="JSON rules (default: manufacturer x field)")
    parser.add_argument("--out", required=True, help="the manifest (CSV) to write")
    parser.add_argument("--min-confidence", type=float, default=None,
                        help=f"below it a series is unknown (default: the rules', else {DEFAULT_MIN_CONFIDENCE})")
    parser.add_argument("--link-into", default=None, help="folder of symbolic links per domain")
    args = parser.parse_args(argv)
    try:
        rules = None
        if args.rules:
            rules = read_json(args.rules)
            if not isinstance(rules.get("domains"), list):
                raise ValueError(f"{args.rules}: expected {{\"domains\": [...]}}")
        summary = sort_series(args.predictions, rules, args.out, args.min_confidence, args.link_into)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as err:
        print(f"iap-sort: error: {err}", file=sys.stderr)
        return 2
    print(f"sorted {summary['series']} series: " + ", ".join(
        f"{k} {v}" for k, v in sorted(summary["domains"].items())) + f"\nmanifest: {args.out}")
    if "links" in summary:
        print(f"links in {args.link_into}: {summary['links']}")
    return 0


def run() -> None:
    """Console script entry (iap-sort)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
