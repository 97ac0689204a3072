"""A progress line with the time left, for every run longer than a few seconds (bench, check, examples).

On a terminal the line is redrawn in place (at most five times a second); elsewhere (CI logs, pipes) a
line is printed every ``interval`` seconds. The estimate is elapsed time scaled by the work left over the
work done, in whatever units the caller weighs its steps by (FLOPs, steps, cases).
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    def __init__(self, total: float, *, label: str = "", enabled: bool = True, stream: Optional[TextIO] = None,
                 interval: float = 15.0):
        self.total = max(float(total), 1e-12)
        self.done = 0.0
        self.label = label
        self.text = ""
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval
        self.start = time.perf_counter()
        self._last = 0.0 if self.tty else self.start
        self._drawn = False

    def eta(self) -> Optional[float]:
        if self.done <= 0:
            return None
        elapsed = time.perf_counter() - self.start
        return elapsed * (self.total - self.done) / self.done

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        eta = self.eta()
        left = "estimating time left" if eta is None else f"~{format_seconds(eta)} left"
        pct = 100.0 * min(1.0, self.done / self.total)
        head = f"{self.label}: " if self.label else ""
        return f"{head}{pct:3.0f}%  {format_seconds(elapsed)} elapsed, {left}  {self.text}"

    def _show(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if force or now - self._last >= 0.2:
                width = 118
                self.stream.write("\r" + self.line()[:width].ljust(width))
                self.stream.flush()
                self._drawn = True
                self._last = now
        elif force or now - self._last >= self.interval:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last = now

    def describe(self, text: str) -> None:
        self.text = text
        self._show()

    def update(self, work: float = 1.0) -> None:
        self.done += work
        self._show()

    def clear(self) -> None:
        """Erases the progress line on a terminal (before other output goes to the screen); the next update
        draws it again."""
        if self.tty and self._drawn:
            self.stream.write("\r" + " " * 118 + "\r")
            self.stream.flush()
            self._drawn = False

    def write(self, text: str) -> None:
        """A message on its own line (above the progress line on a terminal)."""
        if self.tty and self._drawn:
            self.stream.write("\r" + " " * 118 + "\r")
        print(text, file=self.stream, flush=True)
        if self.tty and self._drawn:
            self._show(force=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tty and self._drawn:
            self.stream.write("\r" + " " * 118 + "\r")
        elapsed = time.perf_counter() - self.start
        head = f"{self.label}: " if self.label else ""
        self.stream.write(f"{head}done in {format_seconds(elapsed)}\n")
        self.stream.flush()
