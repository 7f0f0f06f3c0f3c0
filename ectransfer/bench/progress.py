"""A one-line progress bar on stderr, for runs long enough to wonder about.

Drawn only when enabled and stderr is a terminal (never into a log or a pipe), at most ten
times a second, and erased when done, so stdout (the table) stays clean either way.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]

_WIDTH = 28


class Progress:
    """``advance(n)`` items out of ``total``; ``label`` names what runs now."""

    def __init__(self, total: int, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.total = max(1, total)
        self.done = 0
        self._label = ""
        self._start = time.monotonic()
        self._last_draw = 0.0

    def label(self, text: str) -> None:
        self._label = text
        self._draw(force=True)

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1 and self.done < self.total:
            return
        self._last_draw = now
        frac = self.done / self.total
        bar = "#" * int(frac * _WIDTH)
        elapsed = now - self._start
        self.stream.write(f"\r[{bar:<{_WIDTH}}] {self.done}/{self.total} items {elapsed:5.1f}s  {self._label[:40]:<40}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * (_WIDTH + 70) + "\r")
            self.stream.flush()
