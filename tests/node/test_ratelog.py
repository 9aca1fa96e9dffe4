"""Logs a peer cannot flood (node.common.ratelog): a few lines per source and window,
then one summary line with the count of what was left out."""

from __future__ import annotations

import logging

from node.common.ratelog import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_flood_from_one_source_writes_a_few_lines_and_a_summary(caplog):
    clock = Clock()
    quiet = RateLimitedLog(logging.getLogger("test.ratelog"), what="rejected messages",
                           burst=5, window=60.0, clock=clock)
    with caplog.at_level(logging.INFO, "test.ratelog"):
        for i in range(1000):
            clock.t = i * 0.01
            quiet.warning("10.0.0.9", "rejected message %d", i)
        quiet.warning("10.0.0.7", "another peer")  # its own budget
        clock.t = 61.0
        quiet.warning("10.0.0.9", "a new window")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:5] == [f"rejected message {i}" for i in range(5)]
    assert "995 more rejected messages from 10.0.0.9 in the last 60 s" in lines
    assert "another peer" in lines and lines[-1] == "a new window"
    assert len(lines) == 8


def test_the_limiter_tracks_a_bounded_number_of_sources(caplog):
    clock = Clock()
    quiet = RateLimitedLog(logging.getLogger("test.ratelog"), burst=1, max_sources=100,
                           clock=clock)
    with caplog.at_level(logging.INFO, "test.ratelog"):
        for i in range(10_000):
            quiet.warning(f"10.0.{i // 256}.{i % 256}", "knock")
            quiet.warning(f"10.0.{i // 256}.{i % 256}", "knock again")
    assert len(quiet._sources) == 100
    # each forgotten source's suppressed line was summarised, never lost silently
    summaries = [r for r in caplog.records if "more rejected" in r.getMessage()]
    assert len(summaries) == 10_000 - 100
