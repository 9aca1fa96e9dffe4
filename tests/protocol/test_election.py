"""Aggregator election by rendezvous hashing: same answer everywhere, rotating role."""

from __future__ import annotations

import hashlib
import random
import struct
from collections import Counter

import pytest

from protocol.election import ELECTION_DOMAIN, elect, election_score, ranking

from .wire import identity

KEYS = [identity(n).public_key for n in range(1, 6)]


def test_the_score_is_sha256_of_domain_federation_round_and_key():
    expected = hashlib.sha256(b"fl-node/v1/elect\x00" + "fed".encode() + b"\x00"
                              + struct.pack(">Q", 7) + KEYS[0]).digest()
    assert ELECTION_DOMAIN == b"fl-node/v1/elect\x00"
    assert election_score("fed", 7, KEYS[0]) == expected


def test_the_highest_score_wins():
    winner = elect("fed", 3, KEYS)
    assert election_score("fed", 3, winner) == max(election_score("fed", 3, k) for k in KEYS)


def test_election_is_deterministic_and_independent_of_candidate_order():
    rng = random.Random(5)
    for r in range(1, 30):
        want = elect("fed", r, KEYS)
        for _ in range(5):
            shuffled = KEYS[:]
            rng.shuffle(shuffled)
            assert elect("fed", r, shuffled) == want
            assert elect("fed", r, iter(shuffled)) == want
            assert ranking("fed", r, shuffled) == ranking("fed", r, KEYS)


def test_duplicate_candidates_do_not_change_the_result():
    assert ranking("fed", 4, KEYS + KEYS) == ranking("fed", 4, KEYS)


def test_the_role_rotates_every_candidate_wins_some_round_in_fifty():
    wins = Counter(elect("fed", r, KEYS) for r in range(1, 51))
    assert set(wins) == set(KEYS)
    assert max(wins.values()) < 30  # no candidate is the aggregator most of the time


def test_another_federation_elects_differently():
    assert [elect("a", r, KEYS) for r in range(1, 21)] != [elect("b", r, KEYS)
                                                          for r in range(1, 21)]


def test_ranking_is_consistent_with_elect():
    for r in range(1, 30):
        ranked = ranking("fed", r, KEYS)
        assert ranked[0] == elect("fed", r, KEYS)
        assert sorted(ranked) == sorted(KEYS)
        scores = [election_score("fed", r, k) for k in ranked]
        assert scores == sorted(scores, reverse=True)


def test_excluding_the_winner_elects_the_runner_up():
    for r in range(1, 20):
        ranked = ranking("fed", r, KEYS)
        assert elect("fed", r, set(KEYS) - {ranked[0]}) == ranked[1]
        assert elect("fed", r, set(KEYS) - set(ranked[:2])) == ranked[2]


def test_a_candidate_leaving_does_not_change_the_order_of_the_others():
    for r in range(1, 20):
        full = ranking("fed", r, KEYS)
        without = ranking("fed", r, KEYS[1:])
        assert without == [k for k in full if k != KEYS[0]]


def test_electing_among_no_candidates_is_an_error():
    with pytest.raises(ValueError):
        elect("fed", 1, [])
    assert ranking("fed", 1, []) == []
