"""Files written whole or not at all, and the few path helpers every reader and writer shares.

Paths are local paths or URIs (gs://bucket/...), read and written through etils.epath (for
gs://, gcsfs: iap_jax/__init__.py keeps epath off TensorFlow's GCS file system). POSIX-style joins (os.path.join, dirname, basename)
are correct for both; what is not (abspath, relpath, normpath, open, os.replace) goes
through the helpers here.

A file is written to a temporary path beside its target and renamed onto it. Locally that
is os.replace (atomic). On GCS the rename is a server-side copy then a delete: the copy
appears whole or not at all, so readers still never see half a file, but a kill between the
two can leave the temporary object behind (<file>.tmp.<pid>: never read, safe to
delete). Writing to the temporary path first matters on GCS too: a GCS file closed by an
exception is uploaded with what it holds by then.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import IO, Any, Iterator

from etils import epath


def is_remote(path: epath.PathLike) -> bool:
    """A URI (gs://, s3://, ...) rather than a local path."""
    return "://" in os.fspath(path)


def absolute(path: epath.PathLike) -> str:
    """os.path.abspath for a local path; a URI as it is."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def relative(path: epath.PathLike, root: epath.PathLike) -> str:
    """os.path.relpath for local paths; for a URI, the part below `root` (which it must be
    under)."""
    path, root = os.fspath(path), os.fspath(root)
    if not (is_remote(path) or is_remote(root)):
        return os.path.relpath(path, root)
    return os.fspath(epath.Path(path).relative_to(epath.Path(root)))


def files_under(root: epath.PathLike) -> list[str]:
    """Every file under root (hidden folders included), sorted, relative to root: a local
    walk follows linked directories, and a folder reached a second time (a link loop, or two
    links to one folder) is not listed again; a bucket is listed through etils.epath."""
    root = os.fspath(root)
    found = []
    if is_remote(root):
        scheme = root.split("://", 1)[0] + "://"
        for parent, _, files in epath.Path(root).walk():
            parent = os.fspath(parent)
            parent = parent if is_remote(parent) else scheme + parent.lstrip("/")  # gcsfs drops it
            found += [relative(os.path.join(parent, name), root) for name in files]
        return sorted(found)
    visited = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        found += [os.path.relpath(os.path.join(folder, name), root) for name in files]
    return sorted(found)


def makedirs(path: epath.PathLike) -> None:
    """os.makedirs(path, exist_ok=True), for a URI too."""
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def open_file(path: epath.PathLike, mode: str = "r") -> IO:
    """open(path, mode) (UTF-8 in text mode), for a URI too."""
    return epath.Path(path).open(mode)


@contextlib.contextmanager
def replacing(path: epath.PathLike) -> Iterator[str]:
    """Yields a temporary path beside `path` to write; renames it onto `path` when the block
    ends, removes it if the block fails. Readers (and a rerun after a kill) never see half a
    file."""
    path = os.fspath(path)
    temporary = f"{path}.tmp.{os.getpid()}"
    try:
        yield temporary
        epath.Path(temporary).replace(path)
    finally:
        leftover = epath.Path(temporary)
        if leftover.exists():
            leftover.unlink()


def write_bytes_atomic(path: epath.PathLike, data: bytes) -> None:
    with replacing(path) as temporary, open_file(temporary, "wb") as f:
        f.write(data)


def write_json_atomic(path: epath.PathLike, data: Any, sort_keys: bool = False) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=1, sort_keys=sort_keys) + "\n").encode())


def write_text_atomic(path: epath.PathLike, text: str) -> None:
    """UTF-8, line ends as given (as open(..., newline="") writes them)."""
    write_bytes_atomic(path, text.encode())


def read_json(path: epath.PathLike) -> Any:
    with open_file(path) as f:
        return json.load(f)
