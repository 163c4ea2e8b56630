"""The one file of a run that names input files: paths.local.json, salted file keys -> paths.

Real archives name files and folders after patients and UIDs (a Siemens export names every
file `<PATIENT NAME>.MR.<...>.IMA`; an XA export names files by SOPInstanceUID), so no
other output of the project holds a path, file or folder name taken from the input: a file
is named there by its salted key (`file_key`), a slice by its salted series key and slice
index. This file maps the keys back to paths, for the person who runs the job. It is
personal data: it stays beside the outputs (the prep's data dir, outside the dataset dir;
the predictor's OUT_DIR), is never copied into a dataset, and `--no-local-paths` leaves it
out (then nothing links a key back to a file but the salt and the archive itself).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from etils import epath

from iap_jax.io.salt import salted_hash
from iap_jax.io.storage import read_json, write_json_atomic

FILE_NAME = "paths.local.json"
NOTICE = ("Personal data: paths of input files, whose names may hold patients' names, IDs and "
          "UIDs. Keep it private; do not share it with the outputs it sits beside. Written "
          "unless --no-local-paths is given.")


def file_key(salt: str, relative_path: str) -> str:
    """The salted key of an input file (its path relative to the input root)."""
    return salted_hash(salt, "file", relative_path)


def write(folder: str, root: str, files: Mapping[str, str], **extra: Any) -> str:
    """Writes folder/paths.local.json: the input root and key -> path under it."""
    path = os.path.join(os.fspath(folder), FILE_NAME)
    write_json_atomic(path, {"notice": NOTICE, "root": root, **extra,
                             "files": dict(sorted(files.items()))})
    return path


def read(folder: str) -> dict[str, Any]:
    """folder/paths.local.json; FileNotFoundError saying why it may be missing."""
    path = os.path.join(os.fspath(folder), FILE_NAME)
    if not epath.Path(path).exists():
        raise FileNotFoundError(f"{path}: no input paths kept (the run was made with "
                                f"--no-local-paths, or the file was removed)")
    return read_json(path)


def scrub(text: str, *names: str) -> str:
    """text with every occurrence of the given paths (absolute, relative) replaced by
    `<file>`: error messages of readers and decoders may quote the file they failed on."""
    for name in sorted({n for n in names if n and len(n) > 1}, key=len, reverse=True):
        text = text.replace(name, "<file>")
    return text
