"""The link, relay, trust and membership rules of docs/protocol.md (sections 6.3 to 9.8),
exercised through NodeCore without sockets."""

from __future__ import annotations

import random

import pytest

from node.common.state import SequenceCounter
from node.peers.core import NodeCore, TrustPolicy
from node.peers.handshake import socketless_hellos
from protocol.envelope import decode
from protocol.errors import ProtocolError
from protocol.gossip import federation_key, federation_proof, frame_id
from protocol.messages import Announce, Model, Relay, Update
from protocol.rounds import Commit, RoundMachine, RoundTimeouts
from protocol.tensors import weights_digest

from .wire import FED, TS, genesis, identity, weights

FED_KEY = federation_key(b"a federation secret of some length", FED)


class _Store:
    def __init__(self, keys: set[bytes]) -> None:
        self.keys = keys

    def is_trusted(self, public_key: bytes) -> bool:
        return public_key in self.keys


def core(n: int, trust: TrustPolicy | None = None, **kw) -> NodeCore:
    ident = identity(n)
    machine = RoundMachine(self_key=ident.public_key, federation=FED, rounds_total=5,
                           genesis=genesis(), timeouts=RoundTimeouts())
    return NodeCore(identity=ident, name=f"n{n}", federation=FED, port=7700 + n,
                    machine=machine, seq=SequenceCounter(None), wall_ms=lambda: TS,
                    trust=trust or TrustPolicy(federation_key=FED_KEY),
                    rng=random.Random(n), **kw)


def link(a: NodeCore, b: NodeCore, now: float = 0.0) -> None:
    """The hellos, then admission on both sides (as node.peers.transport does)."""
    (_, h2, ends_a), (_, h3, ends_b) = socketless_hellos(a.handshake, b.handshake)
    trust_b = a.handshake.admit(b.key, h2, ends_a.ours)
    trust_a = b.handshake.admit(a.key, h3, ends_b.ours)
    assert trust_a and trust_b
    a.link_up(b.key, h2, "b", trust_b, now)
    b.link_up(a.key, h3, "a", trust_a, now)


def feed(receiver: NodeCore, sender: NodeCore, frame: bytes | bytearray, now: float = 1.0):
    frame = bytes(frame)
    return receiver.dispatch(sender.key, receiver.decode(frame), frame, now)


def model_frame(aggregator: NodeCore, round_number: int = 1) -> bytes:
    w = weights(0.5 + round_number)
    return aggregator.publish(Model(round=round_number, attempt=0, aggregator=aggregator.key,
                                    contributors=(aggregator.key,), num_examples=10,
                                    digest=weights_digest(w), weights=w))


def relays(sends, to: bytes) -> list[Relay]:
    """The relays among ``sends`` (link key, frame) that go to ``to``."""
    out = []
    for key, frame in sends:
        if key == to:
            msg = decode(bytes(frame)).message
            if isinstance(msg, Relay):
                out.append(msg)
    return out


# -- trust and admission (6.3, 6.4) ---------------------------------------------------


def test_the_handshake_proof_is_bound_to_our_ephemeral_key():
    a, b = core(1), core(2)
    (_, h2, ends_a), _ = socketless_hellos(a.handshake, b.handshake)
    assert h2.proof == federation_proof(FED_KEY, FED, b.key, ends_a.ours)
    assert a.handshake.admit(b.key, h2, ends_a.ours) == "federation-secret"
    assert a.handshake.admit(b.key, h2, bytes(32)) is None  # a proof for another link
    assert core(3, TrustPolicy()).handshake.admit(b.key, h2, ends_a.ours) is None  # no secret


def test_static_trust_reasons_in_order():
    b = identity(2).public_key
    assert TrustPolicy(pinned={b}, store=_Store({b}), open=True).static(b) == "pinned"
    assert TrustPolicy(pinned_ids={identity(2).node_id}).static(b) == "pinned"
    assert TrustPolicy(store=_Store({b}), open=True).static(b) == "paired"
    assert TrustPolicy(open=True).static(b) == "open"
    assert TrustPolicy(federation_key=FED_KEY).static(b) is None


# -- frames on a link (8.1) -----------------------------------------------------------


def test_every_frame_on_a_link_must_be_signed_by_the_links_peer():
    a, b, c = core(1), core(2), core(3)
    link(a, b)
    link(c, a)
    for frame in (bytes(c.heartbeat("training")), model_frame(c)):
        with pytest.raises(ProtocolError, match="another key"):
            feed(a, b, frame)  # b passes on c's frame directly: refused, even a model
    assert a.machine.completed == 0


# -- relay handling (8.2) -------------------------------------------------------------


def test_a_relayed_heartbeat_is_refused_and_never_forwarded():
    a, b, c = core(1), core(2), core(3)
    link(a, b)
    link(b, c)
    b.take_sends()
    hb = bytes(a.heartbeat("training"))
    with pytest.raises(ProtocolError, match="heartbeats are not relayed"):
        feed(b, a, a.frame(Relay(ttl=3, to=b"", frame=hb)))
    assert not b.take_sends()
    # the copies that follow are duplicates: dropped without a word
    feed(b, a, a.frame(Relay(ttl=3, to=b"", frame=hb)))
    assert b.counters.duplicates == 1 and not b.take_sends()


def test_a_relayed_model_is_applied_whatever_its_signer():
    a, b = core(1), core(2)
    link(a, b)
    stranger = core(9, TrustPolicy())  # never linked, not trusted by anyone
    frame = model_frame(stranger)
    feed(b, a, a.frame(Relay(ttl=2, to=b"", frame=frame)))
    assert b.machine.completed == 1 and b.latest_model_frame == frame


def test_a_broadcast_is_processed_once_and_forwarded_once_with_ttl_minus_one():
    a, b, c, d = core(1), core(2), core(3), core(4)
    link(a, b)
    link(b, c)
    link(b, d)
    b.take_sends()
    frame = model_frame(a)
    feed(b, a, a.frame(Relay(ttl=5, to=b"", frame=frame)))
    sends = b.take_sends()
    assert {k for k, _ in sends} == {c.key, d.key}  # never back to a, the link and signer
    assert all(r.ttl == 4 and r.to == b"" and r.frame == frame
               for r in relays(sends, c.key) + relays(sends, d.key))
    feed(b, d, d.frame(Relay(ttl=4, to=b"", frame=frame)))
    assert not b.take_sends() and b.counters.duplicates == 1
    assert b.machine.completed == 1


def test_a_model_received_directly_is_forwarded_when_its_relayed_copy_arrives():
    a, b, c = core(1), core(2), core(3)
    link(a, b)
    link(b, c)
    b.take_sends()
    frame = model_frame(a)
    feed(b, a, frame)
    assert b.machine.completed == 1 and not b.take_sends()
    feed(b, a, a.frame(Relay(ttl=8, to=b"", frame=frame)))
    assert [r.ttl for r in relays(b.take_sends(), c.key)] == [7]
    commits = [x for x in b.machine.take_actions() if isinstance(x, Commit)]
    assert len(commits) == 1  # applied once, when it came directly


def test_ttl_zero_is_processed_but_not_forwarded():
    a, b, c = core(1), core(2), core(3)
    link(a, b)
    link(b, c)
    b.take_sends()
    feed(b, a, a.frame(Relay(ttl=0, to=b"", frame=model_frame(a))))
    assert b.machine.completed == 1 and not b.take_sends()


def test_a_routed_frame_is_only_processed_by_its_addressee_and_goes_towards_it():
    a, b, c, d = core(1), core(2), core(3), core(4)
    link(a, b)
    link(b, c)
    link(b, d)
    link(c, d)
    # b learns from c's announcement that c links to d ... and from d's that d links to c
    for x in (c, d):
        x.announce("training")
        for key, frame in x.take_sends():
            if key == b.key:
                feed(b, x, frame)
    b.take_sends()
    target = identity(7).public_key  # not linked to b; c announces a link to it
    b.known[c.key].links = (target,)
    frame = model_frame(a)
    feed(b, a, a.frame(Relay(ttl=3, to=target, frame=frame)))
    assert b.machine.completed == 0  # not addressed to b: not processed
    sends = b.take_sends()
    assert [k for k, _ in sends] == [c.key]  # the neighbour that announces the target
    assert relays(sends, c.key)[0].to == target
    # to a linked addressee, the relay goes on its own link
    feed(b, a, a.frame(Relay(ttl=3, to=d.key, frame=model_frame(a, 2))))
    assert [k for k, _ in b.take_sends()] == [d.key]


# -- membership (8.4) -----------------------------------------------------------------


def _announce_via(sender: NodeCore, relayer: NodeCore, receiver: NodeCore, now: float,
                  credential: bytes | None = None) -> None:
    msg = Announce(name=sender.name, addresses=("10.0.0.1:7700",), links=(relayer.key,),
                   round=0, state="training",
                   credential=sender._credential if credential is None else credential)
    inner = bytes(sender.frame(msg))
    feed(receiver, relayer, relayer.frame(Relay(ttl=7, to=b"", frame=inner)), now)


def test_a_relayed_member_needs_a_credential_and_expires_after_member_timeout():
    a, b, c = core(1, member_timeout=6.0), core(2), core(3)
    link(a, b)
    # a bad credential: ignored (not an error of b's, so nothing is counted against b)
    _announce_via(c, b, a, 1.0, credential=bytes(32))
    assert c.key not in a.machine.peers
    assert a.peers.peer_state(c.key, 1.0) == "untrusted" and a.known[b.key].rejected == 0
    _announce_via(c, b, a, 2.0)
    assert c.key in a.machine.peers and a.peers.peer_state(c.key, 2.0) == "relayed"
    assert a.known[c.key].trust == "federation-secret"
    assert a.peers.peer_state(c.key, 6.0) == "suspect"
    a.tick(8.0)
    assert c.key in a.machine.peers
    a.tick(8.5)
    assert c.key not in a.machine.peers and a.peers.peer_state(c.key, 8.5) == "gone"


def test_a_link_drop_removes_a_member_until_a_newer_announcement():
    a, b, c = core(1), core(2), core(3)
    link(a, b)
    link(a, c, now=0.5)
    _announce_via(c, b, a, 1.0)
    a.link_down(c.key, 2.0)
    assert c.key not in a.machine.peers  # the announcement at 1.0 is older than the drop
    _announce_via(c, b, a, 3.0)
    assert c.key in a.machine.peers and a.peers.peer_state(c.key, 3.0) == "relayed"


def test_a_relayed_update_is_accepted_from_members_only():
    a, b, c = core(1), core(2), core(3)
    link(a, b)
    w = weights(1.0)
    update = Update(round=1, attempt=0, base=a.machine.model_digest, num_examples=5,
                    loss=0.1, train_seconds=1.0, weights=w)
    with pytest.raises(ProtocolError, match="not a member"):
        feed(a, b, b.frame(Relay(ttl=3, to=a.key, frame=bytes(c.frame(update)))))
    _announce_via(c, b, a, 2.0)
    feed(a, b, b.frame(Relay(ttl=3, to=a.key, frame=bytes(c.frame(update)))), 2.5)
    assert c.key in a.machine.updates[1]


# -- spreading and serving models (9.3, 9.8) ------------------------------------------


def test_a_model_goes_directly_to_links_and_by_gossip_only_with_relayed_members():
    a, b, c = core(1), core(2), core(3)
    link(a, b)
    link(a, c)
    a.take_sends()
    frame = model_frame(a)
    a.spread_model(frame)
    sends = a.take_sends()
    assert sorted(k for k, _ in sends) == sorted([b.key, c.key])
    assert all(bytes(f) == frame for _, f in sends)  # the plain frame, no relays
    _announce_via(core(4), b, a, 1.0)  # a now has a relayed member
    a.take_sends()  # (a forwarded that announcement)
    frame2 = model_frame(a, 2)
    a.spread_model(frame2)
    sends = a.take_sends()
    assert sum(bytes(f) == frame2 for _, f in sends) == 2
    assert relays(sends, b.key) + relays(sends, c.key)
    assert all(r.ttl == 8 and r.to == b"" for r in relays(sends, b.key) + relays(sends, c.key))


def test_a_peer_behind_is_served_the_aggregators_frame_in_a_ttl_zero_relay():
    a, b, lag = core(1), core(2), core(3)
    link(a, b)
    frame = model_frame(a)
    feed(b, a, frame)
    b.take_sends()
    link(b, lag)  # lag's hello says round 0
    served = relays(b.take_sends(), lag.key)
    assert served == [Relay(ttl=0, to=lag.key, frame=frame)]
    hb = bytes(lag.heartbeat("waiting"))
    feed(b, lag, hb)
    assert not relays(b.take_sends(), lag.key)  # once per round
    feed(lag, b, b.frame(served[0]), 2.0)
    assert lag.machine.completed == 1 and frame_id(lag.latest_model_frame) == frame_id(frame)


def test_a_peer_still_behind_is_served_again_after_the_reserve_interval():
    """A node that deferred a catch-up model (no evidence yet, node.peers.checks) keeps
    reporting the old round: it is served again, at most every RESERVE_S."""
    from node.peers.core import RESERVE_S

    a, b, lag = core(1), core(2), core(3)
    link(a, b)
    feed(b, a, model_frame(a))
    b.take_sends()
    link(b, lag, now=1.0)
    assert relays(b.take_sends(), lag.key)
    feed(b, lag, bytes(lag.heartbeat("waiting")), 1.0 + RESERVE_S / 2)
    assert not relays(b.take_sends(), lag.key)
    feed(b, lag, bytes(lag.heartbeat("waiting")), 1.0 + RESERVE_S + 0.1)
    assert relays(b.take_sends(), lag.key)


# -- known gaps (docs/protocol.md, "Limitations"): these fail today ---------------------


def test_a_peer_that_restarts_after_being_served_is_served_again():
    a, lag = core(1), core(3)
    link(a, lag)
    model_frame(a)
    # as if a had committed round 1 after lag linked at round 0 (model_frame's weights)
    a.machine.resume(1, weights_digest(weights(1.5)), a.key)
    feed(a, lag, lag.heartbeat("waiting"))
    assert relays(a.take_sends(), lag.key)  # served once
    a.link_down(lag.key, 2.0)
    restarted = core(3)
    for _ in range(100):
        restarted.seq.next()  # its persisted counter resumes above every number used
    link(a, restarted, now=3.0)  # hello round 0 again
    assert relays(a.take_sends(), lag.key)


def test_a_restarted_aggregator_catches_up_from_its_own_model():
    a, b = core(1), core(2)
    link(a, b)
    frame = model_frame(a)
    feed(b, a, frame)
    b.link_down(a.key, 2.0)
    restarted = core(1)
    for _ in range(100):
        restarted.seq.next()
    link(b, restarted, now=3.0)
    served = relays(b.take_sends(), a.key)
    assert served
    feed(restarted, b, b.frame(served[-1]), 4.0)
    assert restarted.machine.completed == 1


def test_copies_of_a_routed_frame_are_duplicates():
    a, b, c, d = core(1), core(2), core(3), core(4)
    link(a, b)
    link(d, b)
    link(b, c)
    inner = bytes(a.frame(Update(round=1, attempt=0, base=a.machine.model_digest,
                                 num_examples=5, loss=0.1, train_seconds=1.0,
                                 weights=weights(1.0))))
    feed(b, a, a.frame(Relay(ttl=3, to=c.key, frame=inner)))
    feed(b, d, d.frame(Relay(ttl=3, to=c.key, frame=inner)))
    assert b.counters.duplicates == 1
