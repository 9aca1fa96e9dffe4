"""ReplayGuard: each (sender, seq) is accepted once, within a window, with a fresh clock."""

from __future__ import annotations

import pytest

from protocol.envelope import DEFAULT_MAX_CLOCK_SKEW_MS, Envelope, ReplayGuard, decode
from protocol.errors import ProtocolError
from protocol.messages import Heartbeat

from .wire import FED, TS, heartbeat_body, identity, payload, sign_payload

A = identity(1).public_key
B = identity(2).public_key


def env(seq: int, sender: bytes = A, ts: int = TS) -> Envelope:
    return Envelope(1, "heartbeat", sender, seq, ts, FED,
                    Heartbeat(round=0, state="training", ping_ts=ts, echo_ts=0), 100)


def test_increasing_sequence_numbers_are_accepted():
    guard = ReplayGuard()
    for seq in (1, 2, 3, 10, 11, 5000):
        guard.check(env(seq), TS)
    assert guard.latest(A) == 5000


def test_the_same_sequence_number_twice_is_a_replay():
    guard = ReplayGuard()
    guard.check(env(7), TS)
    with pytest.raises(ProtocolError, match="replayed"):
        guard.check(env(7), TS)


def test_a_replayed_real_frame_is_refused_the_second_time():
    frame = sign_payload(identity(1), payload(identity(1), "heartbeat", heartbeat_body(), seq=3))
    guard = ReplayGuard()
    guard.check(decode(frame), TS)
    with pytest.raises(ProtocolError, match="replayed"):
        guard.check(decode(frame), TS)


def test_out_of_order_numbers_inside_the_window_are_accepted_once():
    guard = ReplayGuard(window=1024)
    guard.check(env(2000), TS)
    for seq in (1999, 1500, 977, 1998):  # 977 = 2000 - 1023, the oldest slot in the window
        guard.check(env(seq), TS)
    for seq in (2000, 1999, 1500, 977, 1998):
        with pytest.raises(ProtocolError, match="replayed"):
            guard.check(env(seq), TS)
    assert guard.latest(A) == 2000


def test_a_number_older_than_the_window_is_stale():
    guard = ReplayGuard(window=1024)
    guard.check(env(2000), TS)
    with pytest.raises(ProtocolError, match="stale sequence"):
        guard.check(env(976), TS)  # 2000 - 1024
    with pytest.raises(ProtocolError, match="stale sequence"):
        guard.check(env(1), TS)


def test_a_jump_larger_than_the_window_forgets_everything_below_it():
    guard = ReplayGuard(window=8)
    for seq in range(1, 6):
        guard.check(env(seq), TS)
    guard.check(env(100), TS)
    guard.check(env(95), TS)  # never seen, inside the new window
    with pytest.raises(ProtocolError, match="stale"):
        guard.check(env(5), TS)


def test_the_window_slides_as_the_top_rises():
    guard = ReplayGuard(window=4)
    guard.check(env(4), TS)
    guard.check(env(6), TS)          # window is now 3..6; 4 and 6 seen
    guard.check(env(3), TS)
    with pytest.raises(ProtocolError, match="replayed"):
        guard.check(env(4), TS)
    with pytest.raises(ProtocolError, match="stale"):
        guard.check(env(2), TS)
    guard.check(env(5), TS)


def test_senders_are_tracked_independently():
    guard = ReplayGuard()
    guard.check(env(5, A), TS)
    guard.check(env(5, B), TS)
    guard.check(env(1, B), TS)
    assert (guard.latest(A), guard.latest(B)) == (5, 5)


@pytest.mark.parametrize("offset_ms", [DEFAULT_MAX_CLOCK_SKEW_MS + 1, 3_600_000])
def test_timestamps_beyond_the_allowed_skew_are_refused_both_ways(offset_ms):
    guard = ReplayGuard()
    with pytest.raises(ProtocolError, match="stale timestamp"):
        guard.check(env(1, ts=TS - offset_ms), TS)
    with pytest.raises(ProtocolError, match="stale timestamp"):
        guard.check(env(2, ts=TS + offset_ms), TS)
    assert guard.latest(A) == 0  # a refused frame does not use up its number
    guard.check(env(1), TS)


def test_timestamps_at_exactly_five_minutes_are_accepted():
    assert DEFAULT_MAX_CLOCK_SKEW_MS == 5 * 60 * 1000
    guard = ReplayGuard()
    guard.check(env(1, ts=TS - DEFAULT_MAX_CLOCK_SKEW_MS), TS)
    guard.check(env(2, ts=TS + DEFAULT_MAX_CLOCK_SKEW_MS), TS)


def test_the_number_of_senders_is_bounded_and_the_least_recent_is_forgotten():
    guard = ReplayGuard(max_senders=3)
    keys = [identity(n).public_key for n in range(1, 5)]
    for k in keys[:3]:
        guard.check(env(10, k), TS)
    guard.check(env(11, keys[0]), TS)  # keys[0] is now the most recent
    guard.check(env(10, keys[3]), TS)  # a fourth sender evicts keys[1], the least recent
    assert guard.latest(keys[1]) == 0
    assert [guard.latest(k) for k in (keys[0], keys[2], keys[3])] == [11, 10, 10]
    assert len(guard._state) == 3


def test_an_evicted_sender_starts_over():
    # the price of bounded memory: a forgotten sender's old numbers are accepted again
    guard = ReplayGuard(max_senders=1)
    guard.check(env(10, A), TS)
    guard.check(env(10, B), TS)
    guard.check(env(10, A), TS)
