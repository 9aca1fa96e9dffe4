"""Logs that a peer cannot flood: per-source rate limits with a summary line.

A source (an address, a node id) may log ``burst`` lines per ``window`` seconds; further
lines in that window are counted, not written, and the next line after the window (from
any source) writes one summary per source: ``N more rejected from X in the last 60 s``.
At most ``max_sources`` sources are tracked (the least recently heard are forgotten,
their count summarised first), so the limiter's own memory is bounded too.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Window:
    start: float
    written: int = 0
    suppressed: int = 0


class RateLimitedLog:
    """Rate-limited logging per source (see the module docstring)."""

    def __init__(self, logger: logging.Logger, *, what: str = "rejected", burst: int = 5,
                 window: float = 60.0, max_sources: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.what = what
        self.burst = burst
        self.window = window
        self.max_sources = max_sources
        self.clock = clock
        self._sources: OrderedDict[str, _Window] = OrderedDict()
        self._next_sweep = float("-inf")

    def log(self, level: int, source: str, msg: str, *args: object) -> None:
        """Log ``msg % args`` unless ``source`` used up its lines for this window."""
        now = self.clock()
        self._summarise(now)
        win = self._sources.get(source)
        if win is None:
            win = self._sources[source] = _Window(now)
            while len(self._sources) > self.max_sources:
                old, gone = self._sources.popitem(last=False)
                self._summary(old, gone)
        self._sources.move_to_end(source)
        if win.written < self.burst:
            win.written += 1
            self.logger.log(level, msg, *args)
        else:
            win.suppressed += 1

    def warning(self, source: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, source, msg, *args)

    def info(self, source: str, msg: str, *args: object) -> None:
        self.log(logging.INFO, source, msg, *args)

    def _summarise(self, now: float) -> None:
        """Close the windows that are over, writing a summary for each that suppressed
        (at most once a second: a flood costs a sweep per second, not per line)."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        for source, win in list(self._sources.items()):
            if now - win.start >= self.window:
                self._summary(source, win)
                del self._sources[source]

    def _summary(self, source: str, win: _Window) -> None:
        if win.suppressed:
            self.logger.warning("%d more %s from %s in the last %.0f s", win.suppressed,
                                self.what, source, self.window)
