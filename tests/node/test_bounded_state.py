"""State kept for anyone not trusted is bounded (issue 12): stranger records, and
rejection counts by a fixed set of kinds."""

from __future__ import annotations

import hashlib

import pytest

from node.peers.membership import MAX_STRANGERS, STRANGER_TTL_S, PeerTable
from node.peers.peerstats import REJECT_KINDS, Counters, reject_kind
from node.trust.policy import TrustPolicy
from protocol.rounds import RoundMachine
from protocol.tensors import Tensor


def key(i: int) -> bytes:
    return hashlib.sha256(f"key {i}".encode()).digest()


def table() -> PeerTable:
    machine = RoundMachine(self_key=key(-1), federation="f", rounds_total=3,
                           genesis=[Tensor("w", "float32", (1,), b"\0\0\0\0")])
    return PeerTable(machine, TrustPolicy(), member_timeout=6.0)


def test_strangers_are_capped_and_the_least_recently_seen_go_first():
    peers = table()
    peers.stats(key(0)).trusted = True  # a trusted peer is never evicted
    for i in range(1, 1000):
        peers.note_untrusted(key(i), f"s{i}", "10.0.0.1:1", now=float(i))
    strangers = [k for k, st in peers.known.items() if not st.trusted]
    assert len(strangers) == MAX_STRANGERS
    assert set(strangers) == {key(i) for i in range(1000 - MAX_STRANGERS, 1000)}
    assert key(0) in peers.known


def test_silent_strangers_expire():
    peers = table()
    peers.note_untrusted(key(1), "old", "", now=0.0)
    peers.note_untrusted(key(2), "new", "", now=STRANGER_TTL_S)
    peers.expire(STRANGER_TTL_S + 1.0)
    assert key(1) not in peers.known and key(2) in peers.known


@pytest.mark.parametrize(("reason", "kind"), [
    ("bad signature", "signature"),
    ("replayed sequence number 7", "replay"),
    ("stale timestamp (+400 s from our clock)", "replay"),
    ("federation 'x1' is not ours", "federation"),
    ("message of 9000000 bytes exceeds the cap of 65536", "size"),
    ("model: tensor 'w' holds NaN or infinite values", "poison"),
    ("peer trains another model (genesis hash differs: check ...)", "incompatible"),
    ("update from ABCD, not a member", "not_member"),
    ("hello does not answer our challenge", "handshake"),
    ("malformed msgpack (ValueError: ...)", "malformed"),
    ("duplicate map key 'round'", "malformed"),
    ("something nobody foresaw", "other"),
])
def test_rejections_are_counted_by_kind(reason, kind):
    assert reject_kind(reason) == kind


def test_a_thousand_distinct_reasons_make_a_handful_of_keys():
    counters = Counters()
    for i in range(1000):
        counters.count_reject(f"federation 'fed-{i}' is not ours", None, float(i))
        counters.count_reject(f"stale sequence number {i} (latest {i + 5000})", None, float(i))
    assert counters.rejected_reasons == {"federation": 1000, "replay": 1000}
    assert set(counters.rejected_reasons) <= set(REJECT_KINDS)
    assert len(counters.recent_rejections) == 20
    assert counters.recent_rejections[-1]["reason"].startswith("stale sequence number 999")


def test_refusing_what_unknown_keys_signed_makes_no_records():
    """A member can relay models signed by fresh keys: they are refused and reported,
    but no record (and no cut-off entry) is kept for keys nobody trusts."""
    peers = table()
    reported = []
    peers.on_strike = lambda key, reason, cut: reported.append(cut)
    for i in range(1000):
        peers.refuse(key(i), "model: tensor 'w' holds NaN or infinite values", now=1.0)
        peers.refuse(key(i), "model: tensor 'w' holds NaN or infinite values", now=2.0)
    assert peers.known == {} and len(reported) == 2000 and not any(reported)
    peers.stats(key(5000)).trusted = True
    peers.refuse(key(5000), "bad", now=3.0)
    peers.refuse(key(5000), "bad", now=4.0)
    assert peers.banned(key(5000)) and reported[-2:] == [False, True]
