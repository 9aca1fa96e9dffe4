"""Secure aggregation's cryptographic core (protocol.secagg), run in memory as a whole
round: the unmasked sum equals the plain sum within the stated quantization bound,
dropouts before and after masking within the threshold still give the right sum, more
fail safely, inconsistent shares are caught, a member never gives both kinds of shares
for one member, and a masked input looks uniform and uncorrelated with the update."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from protocol import secagg
from protocol.errors import ProtocolError
from protocol.secagg import RoundSecrets

CONTEXT = secagg.CONTEXT + b"/round 7/attempt 0"


def keys(n: int) -> list[bytes]:
    return sorted(hashlib.sha256(b"member %d" % i).digest() for i in range(n))


def run_round(updates: dict[bytes, np.ndarray], degree: int, *, sent: set[bytes] | None = None,
              answering: set[bytes] | None = None, tamper: bytes | None = None) -> np.ndarray:
    """One round between ``updates``' members: ``sent`` sent their masked input (default
    all), ``answering`` answer the unmask request (default: those that sent). Shares
    travel sealed to their recipient and are opened there. Returns the dequantized sum."""
    members = sorted(updates)
    sent = set(members) if sent is None else sent
    answering = sent if answering is None else answering
    index = {m: i + 1 for i, m in enumerate(members)}
    secrets = {m: RoundSecrets.generate() for m in members}
    graph = {m: secagg.neighbours(members, m, degree, CONTEXT) for m in members}
    t = secagg.threshold(min(degree, len(members) - 1))
    # share distribution: held[v][u] = (seed share, mask share) that v holds of u
    held: dict[bytes, dict[bytes, tuple[bytes, bytes]]] = {m: {} for m in members}
    for u in members:
        xs = [index[v] for v in graph[u]]
        seed_shares = secagg.split(secrets[u].self_seed, t, xs)
        mask_shares = secagg.split(secrets[u].mask_secret, t, xs)
        for v in graph[u]:
            payload = seed_shares[index[v]] + mask_shares[index[v]]
            if u == tamper and v == graph[u][0]:
                payload = bytes(66) + payload[66:]  # one wrong seed share
            ctx = CONTEXT + u + v
            sealed = secagg.seal_share(secagg.share_key(secrets[u].share_secret,
                                                        secrets[u].share_public,
                                                        secrets[v].share_public), ctx, payload)
            opened = secagg.open_share(secagg.share_key(secrets[v].share_secret,
                                                        secrets[v].share_public,
                                                        secrets[u].share_public), ctx, sealed)
            held[v][u] = (opened[:66], opened[66:])
    # masked inputs
    total = np.zeros(next(iter(updates.values())).size, dtype=np.uint64)
    for u in sorted(sent):
        masks = {v: secrets[v].mask_public for v in graph[u]}
        total = total + secagg.masked_input(secagg.quantize(updates[u]), secrets[u], u, masks)
    # unmasking: each answering member gives one kind per neighbour
    seeds, dropped = {}, {}
    for u in members:
        kind = 0 if u in sent else 1
        shares = {index[v]: held[v][u][kind] for v in graph[u] if v in answering}
        secret = secagg.combine(shares, t)
        (seeds if kind == 0 else dropped)[u] = secret
    publics = {m: secrets[m].mask_public for m in members}
    return secagg.dequantize(secagg.unmask(total, sorted(sent), dropped, seeds, publics, graph))


def updates_of(n: int, size: int = 257, seed: int = 0) -> dict[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 3, size) * rng.integers(1, 500) for k in keys(n)}


def plain_sum(updates, who) -> np.ndarray:
    return np.sum([updates[k] for k in who], axis=0)


@pytest.mark.parametrize("n,degree", [(3, 2), (5, 4), (10, 4), (12, 6)])
def test_the_unmasked_sum_is_the_plain_sum_within_the_quantization_bound(n, degree):
    updates = updates_of(n)
    got = run_round(updates, degree)
    err = np.max(np.abs(got - plain_sum(updates, updates)))
    assert err <= secagg.quantization_error_bound(n), err
    assert err > 0 or n == 0  # it is a real rounding, not an exact copy


def test_a_member_that_drops_before_masking_is_left_out_of_the_sum():
    updates = updates_of(6)
    gone = keys(6)[2]
    sent = set(updates) - {gone}
    got = run_round(updates, 4, sent=sent)
    assert np.max(np.abs(got - plain_sum(updates, sent))) <= secagg.quantization_error_bound(5)


def test_dropouts_after_masking_up_to_what_the_threshold_allows_still_give_the_sum():
    n = 7  # complete graph: 6 neighbours each, threshold 4, so 2 may vanish
    updates = updates_of(n)
    assert secagg.threshold(n - 1) == 4
    members = keys(n)
    for vanished in ({members[0]}, {members[1], members[5]}):
        got = run_round(updates, n - 1, answering=set(members) - vanished)
        assert np.max(np.abs(got - plain_sum(updates, members))) \
            <= secagg.quantization_error_bound(n)


def test_more_dropouts_than_the_threshold_allows_fail_safely():
    members = keys(7)
    with pytest.raises(ProtocolError, match="shares, 4 needed"):
        run_round(updates_of(7), 6, answering=set(members[3:]))


def test_inconsistent_shares_make_the_round_fail_not_a_wrong_sum():
    members = keys(5)
    with pytest.raises(ProtocolError, match="inconsistent shares"):
        run_round(updates_of(5), 4, tamper=members[1])


def test_a_member_never_gives_both_kinds_of_shares_for_one_member():
    book = secagg.Unmasking()
    other = keys(2)[1]
    assert book.answer(other, survived=True) == "seed"
    assert book.answer(other, survived=True) == "seed"  # the same request again is fine
    with pytest.raises(ProtocolError, match="both kinds"):
        book.answer(other, survived=False)  # a second aggregator claiming it dropped


def test_a_masked_input_is_uniform_and_uncorrelated_with_the_update():
    members = keys(4)
    me = members[0]
    secrets = {m: RoundSecrets.generate() for m in members}
    update = np.linspace(-100, 100, 200_000)
    q = secagg.quantize(update)
    y = secagg.masked_input(q, secrets[me], me, {v: secrets[v].mask_public for v in members[1:]})
    # in the ring, and uniform: the 256 values of its top byte are equally frequent
    # (chi-square, 255 dof; 330.5 is the 0.1% critical value)
    assert int(y.max()) < 1 << secagg.RING_BITS
    counts = np.bincount((y >> np.uint64(secagg.RING_BITS - 8)).astype(np.int64),
                         minlength=256)
    expected = y.size / 256
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 330.5, chi2
    # uncorrelated with the update (|r| < 0.01 for 200,000 points: 4.5 sigma)
    r = np.corrcoef(update, y.astype(np.float64))[0, 1]
    assert abs(r) < 0.01, r
    # while the quantized update itself is perfectly correlated
    assert np.corrcoef(update, secagg.dequantize(q))[0, 1] > 0.999


def test_the_sparse_graph_is_symmetric_and_of_the_given_degree():
    members = keys(50)
    graph = {m: secagg.neighbours(members, m, 8, CONTEXT) for m in members}
    assert all(len(v) == 8 for v in graph.values())
    assert all(u in graph[v] for u in members for v in graph[u])
    # another round or attempt gives another graph
    other = {m: secagg.neighbours(members, m, 8, CONTEXT + b"x") for m in members}
    assert other != graph


def test_a_round_of_50_with_a_sparse_graph_and_dropouts():
    updates = updates_of(50, size=64, seed=3)
    members = keys(50)
    sent = set(members) - {members[7], members[30]}
    answering = sent - {members[11]}
    got = run_round(updates, 8, sent=sent, answering=answering)
    assert np.max(np.abs(got - plain_sum(updates, sent))) <= secagg.quantization_error_bound(48)


def test_pairwise_seeds_agree_and_shares_do_not_open_elsewhere():
    a, b, c = (RoundSecrets.from_seed(bytes([i]) * 32) for i in range(3))
    assert secagg.pair_seed(a.mask_secret, a.mask_public, b.mask_public) == \
        secagg.pair_seed(b.mask_secret, b.mask_public, a.mask_public)
    key_ab = secagg.share_key(a.share_secret, a.share_public, b.share_public)
    sealed = secagg.seal_share(key_ab, b"ctx", b"share")
    with pytest.raises(ProtocolError):
        secagg.open_share(secagg.share_key(c.share_secret, c.share_public, a.share_public),
                          b"ctx", sealed)
    with pytest.raises(ProtocolError):
        secagg.open_share(key_ab, b"another round", sealed)


def test_quantize_refuses_what_it_cannot_sum():
    with pytest.raises(ValueError, match="finite"):
        secagg.quantize(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="over what secure aggregation can sum"):
        secagg.quantize(np.array([secagg.MEMBER_LIMIT]))
    assert secagg.dequantize(secagg.quantize(np.array([-1.5, 0.25])))[0] == -1.5


def test_shamir_rebuilds_from_any_t_shares_only():
    secret = bytes(range(32))
    shares = secagg.split(secret, 3, range(1, 6))
    for pick in ([1, 2, 3], [2, 4, 5], [1, 3, 5]):
        assert secagg.combine({x: shares[x] for x in pick}, 3) == secret
    with pytest.raises(ProtocolError, match="2 shares, 3 needed"):
        secagg.combine({1: shares[1], 2: shares[2]}, 3)


def test_ring_elements_travel_as_six_bytes_each():
    values = secagg.quantize(np.array([-3.25, 0.0, 2.5, 524_287.0]))
    data = secagg.pack(values)
    assert len(data) == 6 * 4  # 1.5 times float32
    assert np.array_equal(secagg.unpack(data, 4), values)
    assert secagg.dequantize(secagg.unpack(data, 4)).tolist() == [-3.25, 0.0, 2.5, 524_287.0]
    with pytest.raises(ProtocolError, match="25 bytes for 4 ring elements"):
        secagg.unpack(data + b"x", 4)
