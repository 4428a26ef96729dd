"""A small progress display shared by the `lb` CLI and the benchmarks.

On a terminal it redraws one line in place (a bar when the total is known, with the rate); when the
stream is not a terminal, or CI=true, it writes a plain line now and then instead, so logs stay
readable. It never uses colour. Callers on a hot path should call update() every few hundred items
rather than per item: update() looks at the clock each time.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import TextIO

REDRAW_INTERVAL_S = 0.1  # a terminal redraw at most 10 times a second
PLAIN_INTERVAL_S = 10.0  # a plain log line at most every 10 s
MIN_BAR_WIDTH = 10


def is_interactive(stream: TextIO) -> bool:
    """True when the stream is a terminal a person watches (and not a CI log that only looks like one)."""
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def human_count(n: float) -> str:
    return f"{n:,.0f}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Counts items (and optionally bytes) and shows how far along they are.

    mode: "auto" picks "bar" on a terminal and "plain" otherwise; "tty" shows a bar on a terminal and
    nothing otherwise (the benchmarks: their output is JSON for machines); "off" shows nothing.
    """

    def __init__(self, label: str, total: int | None = None, unit: str = "records", *,
                 stream: TextIO | None = None, mode: str = "auto",
                 plain_interval_s: float = PLAIN_INTERVAL_S) -> None:
        if mode not in ("auto", "tty", "off"):
            raise ValueError(f"mode must be 'auto', 'tty' or 'off', got {mode!r}")
        self.label = label
        self.total = total
        self.unit = unit
        self.count = 0
        self.nbytes = 0
        self._stream = stream if stream is not None else sys.stderr
        interactive = mode != "off" and is_interactive(self._stream)
        self._style = "bar" if interactive else ("plain" if mode == "auto" else "off")
        self._interval = REDRAW_INTERVAL_S if self._style == "bar" else plain_interval_s
        self._started = time.monotonic()
        self._next_draw = self._started + self._interval
        self._drawn = False

    def update(self, items: int = 1, nbytes: int = 0) -> None:
        self.count += items
        self.nbytes += nbytes
        if self._style == "off":
            return
        now = time.monotonic()
        if now >= self._next_draw:
            self._next_draw = now + self._interval
            self._draw(now)

    def close(self) -> None:
        """Draw the final state (on a terminal) and end the line, so later output starts clean."""
        if self._style == "bar" and self._drawn:
            self._draw(time.monotonic())
            self._write("\n")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rate(self, now: float | None = None) -> float:
        elapsed = (now if now is not None else time.monotonic()) - self._started
        return self.count / elapsed if elapsed > 0 else 0.0

    def text(self, now: float, width: int | None = None) -> str:
        """The status line; with a width (a terminal), a bar fills what the numbers leave free."""
        elapsed = max(now - self._started, 1e-9)
        parts = [f"{human_count(self.count)}"
                 + (f"/{human_count(self.total)}" if self.total else "") + f" {self.unit}",
                 f"{human_count(self.count / elapsed)} {self.unit}/s"]
        if self.nbytes:
            parts.append(f"{self.nbytes / elapsed / 1e6:.1f} MB/s")
        if self.total and self.count:
            left = (self.total - self.count) / (self.count / elapsed)
            parts.append(f"{max(left, 0):.0f}s left")
        numbers = "  ".join(parts)
        if width is None or not self.total:
            return f"{self.label}: {numbers}"
        fraction = min(self.count / self.total, 1.0)
        room = width - len(self.label) - len(numbers) - 12  # brackets, percentage, spaces
        if room < MIN_BAR_WIDTH:
            return f"{self.label} {fraction:4.0%}  {numbers}"[:width - 1]
        filled = int(room * fraction)
        bar = "#" * filled + "-" * (room - filled)
        return f"{self.label} [{bar}] {fraction:4.0%}  {numbers}"

    def _draw(self, now: float) -> None:
        if self._style == "bar":
            width = shutil.get_terminal_size((80, 24)).columns
            # \r and clear-to-end-of-line redraw in place; no colour codes.
            self._write("\r" + self.text(now, width) + "\x1b[K")
        else:
            self._write(self.text(now) + "\n")
        self._drawn = True

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            self._style = "off"  # the stream went away (closed terminal, broken pipe): stop drawing
