"""Progress on stderr, only when stderr is a terminal (or forced), never in --json output."""

from __future__ import annotations

import sys
import time
from types import TracebackType


class Progress:
    """A byte counter that redraws one stderr line at most 10 times a second."""

    def __init__(self, label: str, total: int, enabled: bool | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0
        self._start = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.1:
            self._last = now
            rate = self.done / max(now - self._start, 1e-9) / 1e6
            sys.stderr.write(f"\r{self.label}: {100 * self.done / self.total:5.1f}% ({self.done / 1e6:.0f} MB, {rate:.0f} MB/s)")
            sys.stderr.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        if self.enabled and self._last:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
