"""iap-prep: a DICOM archive -> a TFDS dataset of TFRecord shards labelled from headers.

  iap-prep --dicom-root DIR --data-dir OUT [--series-filter REGEX] [--phases pre|all]
           [--image-size 224] [--slices all|central:F|stride:K] [--split 0.7,0.15,0.15]
           [--salt S] [--workers N] [--resize resize|pad] [--image-encoding zlib|none] [--beam-runner DirectRunner]
           [--overwrite] [--no-local-paths]

Prints the dataset dir (for tfds.builder_from_directory) last on stdout. Exit status 2
on bad arguments, an unusable DICOM root or data dir, or a changed archive.
"""
from __future__ import annotations

import argparse
import sys

from iap_jax.core import console


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iap-prep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dicom-root", required=True, help="root folder of the DICOM archive (any layout; a local path or gs://)")
    parser.add_argument("--data-dir", required=True, help="TFDS data dir to write into")
    parser.add_argument("--series-filter", default=None,
                        help="regex searched in SeriesDescription (default: fat-sat DCE series)")
    parser.add_argument("--phases", choices=("pre", "all"), default="pre")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--slices", default="all", help="all | central:F | stride:K")
    parser.add_argument("--split", default="0.7,0.15,0.15", help="train,validation,test fractions")
    parser.add_argument("--salt", default=None,
                        help="salt of the patient/series hashes (default: $IAP_PREP_SALT, else a "
                             "random salt generated once and kept in DATA_DIR/prep_salt)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--resize", choices=("resize", "pad"), default="resize",
                        help="resize: stretch to a square (the paper); pad: keep the aspect ratio")
    parser.add_argument("--image-encoding", choices=("zlib", "none"), default="zlib",
                        help="zlib: compressed images (smaller files); none: raw uint16, half "
                             "the CPU per image to decode for more bytes (bench/input.py)")
    parser.add_argument("--beam-runner", default=None,
                        help="prepare with Apache Beam on this runner (e.g. DirectRunner)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild a dataset of the same options written from an archive that "
                             "has changed since (default: stop with an error)")
    parser.add_argument("--no-local-paths", action="store_true",
                        help="do not write DATA_DIR/paths.local.json (the paths of the files "
                             "prep_report.json names by salted key; personal data)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    console.quiet_libraries()
    import tensorflow_datasets as tfds

    from data_prep.builder import prepare

    tfds.disable_progress_bar()
    try:
        dataset_dir = prepare(args.dicom_root, args.data_dir, series_filter=args.series_filter,
                              phases=args.phases, image_size=args.image_size, slices=args.slices,
                              split=args.split, salt=args.salt, workers=args.workers,
                              resize=args.resize, image_encoding=args.image_encoding,
                              beam_runner=args.beam_runner,
                              overwrite=args.overwrite,
                              write_local_paths=not args.no_local_paths)
    except ValueError as err:
        print(f"iap-prep: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # FileNotFoundError, PermissionError, a full disk...
        where = f"{err.filename}: " if err.filename and str(err.filename) not in str(err) else ""
        print(f"iap-prep: error: {where}{err}", file=sys.stderr)
        return 2
    print(dataset_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
