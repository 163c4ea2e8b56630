"""JSON files of the data dir through etils.epath, so that the data dir may be a bucket
(gs://...) as well as a local folder. The DICOM root is read by pydicom and stays local."""
from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def write_json_atomic(path: epath.PathLike, data: Any) -> None:
    """Written beside `path`, then renamed onto it: readers, and a rerun after a kill, never
    see half a file (on a bucket the rename is a copy, and an object appears whole)."""
    path = epath.Path(path)
    temporary = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        temporary.write_text(json.dumps(data, indent=1) + "\n")
        temporary.replace(path)
    finally:
        if temporary.exists():
            temporary.unlink()


def read_json(path: epath.PathLike) -> Any | None:
    """The file's JSON, or None when there is no such file."""
    path = epath.Path(path)
    return json.loads(path.read_text()) if path.exists() else None
