"""Test view of outputs that name files by salted key: the same entries by input path,
through the run's paths.local.json (the one file that maps keys to paths)."""
from __future__ import annotations

from iap_jax.io import local_paths


def by_path(entries, folder) -> dict:
    """{input path (relative to the input root): entry} for entries with a "file" key."""
    files = local_paths.read(str(folder))["files"]
    return {files[e["file"]]: e for e in entries}


def path_of(key: str, folder) -> str:
    return local_paths.read(str(folder))["files"][key]


def slice_paths(out) -> list[str]:
    """The input path of each row of a prediction's slices.parquet, in row order."""
    import pyarrow.parquet as pq

    files = local_paths.read(str(out))["files"]
    return [files[k] for k in pq.read_table(f"{out}/slices.parquet").column("file_key").to_pylist()]
