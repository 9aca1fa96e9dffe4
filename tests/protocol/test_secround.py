"""One round of secure aggregation between sans-IO members and an aggregator
(protocol.secround): the sum, dropouts, an aggregator that crashes after collecting
masked inputs (the next attempt starts afresh), orders from the wrong key or attempt,
a second request for the other kind of shares, and bad shares all fail safely."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest

from protocol import secagg
from protocol.errors import ProtocolError
from protocol.secround import SecureAggregator, SecureMember, Unmask, exchange, through_masked

AGG = hashlib.sha256(b"aggregator").digest()
LENGTH = 129


def members_of(n: int, attempt: int = 0, seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    keys = sorted(hashlib.sha256(b"m%d" % i).digest() for i in range(n))
    inputs = {k: rng.normal(0, 5, LENGTH) for k in keys}
    members = {k: SecureMember(k, AGG, 3, attempt, secagg.quantize(inputs[k])) for k in keys}
    return members, inputs


def aggregator(n: int, attempt: int = 0, degree: int = 4) -> SecureAggregator:
    return SecureAggregator(3, attempt, quorum=max(2, n // 2 + 1), degree=degree,
                            length=LENGTH)


def close(got: np.ndarray, inputs: dict, who) -> bool:
    want = np.sum([inputs[k] for k in who], axis=0)
    return bool(np.max(np.abs(secagg.dequantize(got) - want))
                <= secagg.quantization_error_bound(len(who)))


def test_a_round_gives_the_sum_of_every_input():
    members, inputs = members_of(6)
    assert close(exchange(members, aggregator(6)), inputs, members)


def test_dropouts_before_and_after_masking():
    members, inputs = members_of(9)
    keys = sorted(members)
    sent = set(keys) - {keys[4]}                 # dropped before its masked input
    answering = sent - {keys[0]}                 # sent it, then vanished
    got = exchange(members, aggregator(9, degree=6), sent_masked=sent, answering=answering)
    assert close(got, inputs, sent)


def test_an_aggregator_crash_after_masked_inputs_leads_to_a_fresh_correct_attempt():
    members, inputs = members_of(5, attempt=0)
    through_masked(members, aggregator(5))
    # ... the aggregator dies here, holding every masked input. The next one runs attempt 1 with fresh secrets:
    retry, _ = members_of(5, attempt=1)
    got = exchange(retry, aggregator(5, attempt=1))
    assert close(got, inputs, members)
    # and no member of attempt 0 reveals anything for attempt 1, or to another key
    member = next(iter(members.values()))
    with pytest.raises(ProtocolError, match="another round or attempt"):
        member.on_unmask(AGG, Unmask(3, 1, tuple(sorted(members))))
    with pytest.raises(ProtocolError, match="another key"):
        member.on_unmask(b"\x01" * 32, Unmask(3, 0, tuple(sorted(members))))


def test_a_member_never_reveals_both_kinds_for_one_member():
    members, _ = members_of(4)
    agg = aggregator(4, degree=3)
    exchange(members, agg)
    keys = sorted(members)
    member = members[keys[0]]
    # the same aggregator (or a replay) now claims keys[1] dropped
    with pytest.raises(ProtocolError, match="both kinds"):
        member.on_unmask(AGG, Unmask(3, 0, tuple(k for k in keys if k != keys[1])))


def test_a_share_that_does_not_open_stops_the_recipient():
    members, _ = members_of(4)
    agg = aggregator(4, degree=3)
    for key, member in members.items():
        agg.on_keys(key, member.keys())
    roster = agg.roster()
    for key, member in members.items():
        shares = member.on_roster(AGG, roster)
        if key == sorted(members)[0]:
            to, sealed = shares.shares[0]
            shares = replace(shares, shares=((to, sealed[:-1] + bytes([sealed[-1] ^ 1])),)
                             + shares.shares[1:])
        agg.on_shares(key, shares)
    deliveries = agg.deliveries()
    victim, shares_victim = None, ""
    for key, delivery in deliveries.items():
        if any(s == sorted(members)[0] for s, _ in delivery.shares):
            try:
                members[key].on_deliver(AGG, delivery)
            except ProtocolError as exc:
                victim, shares_victim = key, str(exc)
                break
    assert victim is not None and "does not open" in shares_victim


def test_bad_shares_fail_the_round_instead_of_a_wrong_sum(monkeypatch):
    members, _ = members_of(5)
    cheat = sorted(members)[2]
    # the cheater splits a seed other than the one it masks with
    real = members[cheat].secrets
    members[cheat].secrets = replace(real, self_seed=bytes(32))
    keys = members[cheat].keys()
    members[cheat].secrets = real
    agg = aggregator(5)
    for key, member in members.items():
        agg.on_keys(key, keys if key == cheat else member.keys())
    with pytest.raises(ProtocolError, match="does not hold our keys"):
        members[cheat].on_roster(AGG, agg.roster())  # its own check catches the mix-up
    # a cheater that commits to its real seed but hands out shares of another one
    members, _ = members_of(5)
    real = members[cheat].secrets
    orig_split = secagg.split

    def split(secret, t, points):
        return orig_split(bytes(32) if secret == real.self_seed else secret, t, points)

    monkeypatch.setattr(secagg, "split", split)
    with pytest.raises(ProtocolError, match="does not match its commitment"):
        exchange(members, aggregator(5))


def test_orders_from_another_key_are_refused():
    members, _ = members_of(3)
    agg = aggregator(3, degree=2)
    for key, member in members.items():
        agg.on_keys(key, member.keys())
    member = next(iter(members.values()))
    with pytest.raises(ProtocolError, match="another key"):
        member.on_roster(b"\x02" * 32, agg.roster())


def test_below_quorum_the_aggregator_stops():
    members, _ = members_of(5)
    agg = SecureAggregator(3, 0, quorum=4, degree=4, length=LENGTH)
    for key in sorted(members)[:3]:
        agg.on_keys(key, members[key].keys())
    with pytest.raises(ProtocolError, match="a quorum of 4 needed"):
        agg.roster()
