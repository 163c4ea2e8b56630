"""A progress line on stderr: items done, rate and ETA.

On a terminal the line is rewritten about once a second; in a log file (a batch job's
stderr) a new line is written every LOG_EVERY_S seconds, so logs stay readable.
"""
from __future__ import annotations

import sys
import time

LOG_EVERY_S = 15.0


def is_terminal(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    def __init__(self, label: str, total: int | None, unit: str = "items", stream=None,
                 every_s: float | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.terminal = is_terminal(self.stream)
        self.every_s = every_s if every_s is not None else (1.0 if self.terminal else LOG_EVERY_S)
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._shown: int | None = None  # the count the last line showed

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._print(end="\r" if self.terminal else "\n")

    def _print(self, end: str) -> None:
        rate = self.rate
        known = self.total is not None
        remaining = (self.total - self.done) / rate if rate > 0 and known else float("nan")
        eta = f"ETA {remaining:5.0f}s" if remaining == remaining else "ETA     ?"
        self.stream.write(f"{self.label}: {self.done}/{self.total if known else '?'} {self.unit} "
                          f"{rate:8.1f} {self.unit}/s {eta}{end}")
        self.stream.flush()
        self._shown = self.done

    def close(self) -> float:
        """Prints the final line, unless the last one already showed it (a terminal's line
        is then ended); returns the elapsed seconds."""
        if self._shown != self.done:
            self._print(end="\n")
        elif self.terminal:
            self.stream.write("\n")
            self.stream.flush()
        return time.monotonic() - self.start
