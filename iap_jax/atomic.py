"""Files written whole or not at all: a temporary file beside the target, then a rename."""
from __future__ import annotations

import json
import os
from typing import Any


def write_json_atomic(path: str, data: Any, sort_keys: bool = False) -> None:
    """Readers (and a rerun after a kill) never see half a file."""
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump(data, f, indent=1, sort_keys=sort_keys)
        f.write("\n")
    os.replace(temporary, path)
