"""Round deadlines: the configured timeouts and the adaptive collect deadline."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class RoundTimeouts:
    """Deadlines, in seconds.

    ``collect``: the most an aggregator waits for updates after its own is ready.
    ``model``: the most a member waits for the global model after sending its update.
    ``start``: how long a fresh node waits for ``wait_peers`` before starting anyway.
    ``floor``: the least either adaptive deadline can shrink to.
    """

    collect: float = 60.0
    model: float = 90.0
    start: float = 60.0
    floor: float = 5.0


class Deadlines:
    """The collect deadline, fitted to how late updates come, capped by ``RoundTimeouts``.

    It is ``2 x p90 + floor`` of the recent lateness samples (the last 32), between
    ``floor`` and ``collect``; with fewer than 3 samples it is ``collect``. A sample is how
    long after our own update a peer's update came to us as aggregator (0 if before),
    including updates that came after we aggregated, so stragglers cut off once push the
    deadline up again. The model deadline (how long a member waits for the model) stays
    ``model``: it must outlast any aggregator's collect deadline, or members would abandon
    an aggregator that is only waiting for a straggler.
    """

    WINDOW = 32
    MIN_SAMPLES = 3

    def __init__(self, timeouts: RoundTimeouts) -> None:
        self.timeouts = timeouts
        self.lags: deque[float] = deque(maxlen=self.WINDOW)

    def collect(self) -> float:
        """Seconds an aggregator waits for updates once its own is ready."""
        cap = self.timeouts.collect
        if len(self.lags) < self.MIN_SAMPLES:
            return cap
        ordered = sorted(self.lags)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        floor = min(self.timeouts.floor, cap)
        return min(cap, max(floor, 2.0 * p90 + floor))
