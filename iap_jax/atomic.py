"""Files written whole or not at all: a temporary file beside the target, then a rename."""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """Yields a temporary path beside `path` to write; renames it onto `path` when the block
    ends, removes it if the block fails. Readers (and a rerun after a kill) never see half a
    file."""
    temporary = f"{path}.tmp.{os.getpid()}"
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json_atomic(path: str, data: Any, sort_keys: bool = False) -> None:
    with replacing(path) as temporary, open(temporary, "w") as f:
        json.dump(data, f, indent=1, sort_keys=sort_keys)
        f.write("\n")


def write_text_atomic(path: str, text: str) -> None:
    with replacing(path) as temporary, open(temporary, "w", newline="") as f:
        f.write(text)
