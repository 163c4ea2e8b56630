"""What the commands print: their own progress lines, summaries, warnings and errors, not the
notices libraries print on every start.

Every console entry point calls quiet_libraries() first, before TensorFlow (the prep's) is
imported. It removes:
- TensorFlow's start-up lines (absl's "All log messages before absl::InitializeLog() ..." and
  "oneDNN custom operations are on ..."): TensorFlow 2.21 prints them at import whatever
  TF_CPP_MIN_LOG_LEVEL says, unless its oneDNN graph rewrites are off. TensorFlow only writes
  and reads the prep's records (no floating-point arithmetic), so turning them off changes no
  number; training and prediction do not use TensorFlow at all.
- Orbax's warnings on every read-only restore (prediction and iap-ood restore a checkpoint
  without writing to its folder, as they should) and TFDS's "Using custom data configuration"
  on every prep (the prep names its options itself).
- JAX's INFO lines about accelerator backends that are not installed (iap-train logs at INFO).
Other warnings and every error stay visible. Setting TF_CPP_MIN_LOG_LEVEL or
TF_ENABLE_ONEDNN_OPTS in the environment overrides the defaults here.
"""
from __future__ import annotations

import logging
import os

# Substrings of library log messages that say nothing about the run.
LIBRARY_NOTICES = (
    "CheckpointManagerOptions.read_only=True",  # Orbax, every read-only CheckpointManager
    "Given directory is read only",  # Orbax, the same
    "Using custom data configuration",  # TFDS, every builder config
)
# Loggers whose INFO lines are library start-up chatter (shown from WARNING up).
QUIET_LOGGERS = ("jax._src.xla_bridge",)


class _LibraryNoticeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        return not any(notice in message for notice in LIBRARY_NOTICES)


_FILTER = _LibraryNoticeFilter()


def quiet_libraries() -> None:
    """Call first in a command's entry point (idempotent)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO and WARNING
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # see the module docstring
    # Orbax and TFDS log through absl, whose messages all go to the "absl" logger.
    absl_logger = logging.getLogger("absl")
    if _FILTER not in absl_logger.filters:
        absl_logger.addFilter(_FILTER)
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)
