"""A progress bar for long runs on a terminal; silent in logs and pipes.

It appears only when the stream is a terminal and the run has lasted
``delay`` seconds (2 by default), redraws at most ten times a second on one
line (``\\r``), and clears that line when the run ends, so the log and
anything piped never see it.
"""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(self, total: int, what: str = "files", stream=None, delay: float = 2.0, clock=time.monotonic,
                 width: int = 30):
        self.total = max(int(total), 1)
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.delay = delay
        self.clock = clock
        self.width = width
        self.started = clock()
        self.done = 0
        self.reflections = 0
        self._last_drawn = None
        self._shown = False
        try:
            self.enabled = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.enabled = False

    def update(self, files: int = 1, reflections: int = 0) -> None:
        self.done += files
        self.reflections += reflections
        if not self.enabled:
            return
        now = self.clock()
        elapsed = now - self.started
        if elapsed < self.delay or (self._last_drawn is not None and now - self._last_drawn < 0.1
                                    and self.done < self.total):
            return
        self._last_drawn = now
        fraction = min(self.done / self.total, 1.0)
        filled = int(round(fraction * self.width))
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else 0.0
        line = (f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {self.what}, "
                f"{self.reflections / 1e6:.2f} M reflections, {_duration(elapsed)} elapsed, {_duration(eta)} left")
        self.stream.write(line)
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """Clear the bar's line (if it was ever drawn)."""
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False
