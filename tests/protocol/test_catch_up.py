"""Catch-up through NodeCore (sans-IO): a lagging node applies a re-served model frame.

The daemon re-serves ``NodeCore.latest_model_frame`` (the aggregator's original signed
frame) to a peer whose hello shows a lower round. These tests feed that frame through the
same NodeCore path the daemon uses, without sockets.
"""

from __future__ import annotations

import pytest

from node.common.state import SequenceCounter
from node.peers.core import NodeCore
from node.peers.handshake import LinkEnds, socketless_hellos
from protocol.errors import ProtocolError
from protocol.linkcrypto import Ephemeral
from protocol.messages import Model, Relay
from protocol.rounds import Commit, RoundMachine, RoundTimeouts
from protocol.tensors import Tensor, weights_digest

from .wire import FED, TS, genesis, identity, weights


def core(n: int, seed_model: list[Tensor] | None = None) -> NodeCore:
    ident = identity(n)
    machine = RoundMachine(self_key=ident.public_key, federation=FED, rounds_total=5,
                           genesis=seed_model or genesis(), timeouts=RoundTimeouts())
    return NodeCore(identity=ident, name=f"n{n}", federation=FED, port=7700 + n,
                    machine=machine, seq=SequenceCounter(None), wall_ms=lambda: TS)


def handshake(a: NodeCore, b: NodeCore) -> None:
    """The hellos of node.peers.transport, without the socket."""
    (_, h2, _), (_, h3, _) = socketless_hellos(a.handshake, b.handshake)
    a.link_up(b.key, h2, "b", "pinned", 0.0)
    b.link_up(a.key, h3, "a", "pinned", 0.0)


def publish_round_one(aggregator: NodeCore) -> bytes:
    w = weights(0.5)
    model = Model(round=1, attempt=0, aggregator=aggregator.key, contributors=(aggregator.key,),
                  num_examples=10, digest=weights_digest(w), weights=w)
    return aggregator.publish(model)


def test_a_hello_that_names_other_ephemeral_keys_is_refused():
    a, b = core(1), core(2)
    e_a, e_b, e_m = (Ephemeral.generate().public for _ in range(3))
    ends_a = LinkEnds(ours=e_a, theirs=e_b)
    for ends_b in (LinkEnds(ours=e_b, theirs=e_m),   # b's hello echoes another key
                   LinkEnds(ours=e_m, theirs=e_a)):  # b's hello names another key as its own
        with pytest.raises(ProtocolError, match="other ephemeral keys"):
            a.handshake.accept(bytes(b.handshake.hello(ends_b)), ends_a)
    a.handshake.accept(bytes(b.handshake.hello(LinkEnds(ours=e_b, theirs=e_a))), ends_a)


def test_a_hello_from_a_node_with_another_genesis_is_refused():
    a, b = core(1), core(2, seed_model=weights(9.0))
    assert b.machine.genesis_digest != a.machine.genesis_digest
    with pytest.raises(ProtocolError, match="genesis"):
        socketless_hellos(a.handshake, b.handshake)


def test_a_lagging_node_applies_the_model_frame_re_served_by_its_aggregator():
    a, lag = core(1), core(3)
    handshake(a, lag)
    frame = publish_round_one(a)
    lag.dispatch(a.key, lag.decode(frame), frame, 1.0)
    assert lag.machine.completed == 1
    assert [x.model.round for x in lag.machine.take_actions() if isinstance(x, Commit)] == [1]
    assert lag.latest_model_frame == frame  # and it re-serves the same signed frame in turn


def test_a_re_served_model_frame_is_applied_once_even_when_relayed_twice():
    a, b, lag = core(1), core(2), core(3)
    handshake(a, b)
    handshake(a, lag)
    handshake(b, lag)
    frame = publish_round_one(a)
    lag.dispatch(a.key, lag.decode(frame), frame, 1.0)
    for relayer in (a, b, b):  # re-served by others, inside relays
        wrapped = bytes(relayer.frame(Relay(ttl=0, to=lag.key, frame=frame)))
        lag.dispatch(relayer.key, lag.decode(wrapped), wrapped, 1.0)
    commits = [x for x in lag.machine.take_actions() if isinstance(x, Commit)]
    assert len(commits) == 1


def test_a_lagging_node_catches_up_from_a_peer_when_the_aggregator_is_gone():
    a, b, lag = core(1), core(2), core(3)
    handshake(a, b)
    frame = publish_round_one(a)
    b.dispatch(a.key, b.decode(frame), frame, 1.0)
    assert b.machine.completed == 1 and b.latest_model_frame == frame
    # a leaves; lag joins and links only to b, which sees round 0 < 1 in its hello and
    # re-serves a's signed frame inside a relay
    handshake(b, lag)
    sends = [f for k, f in b.take_sends() if k == lag.key]
    assert sends
    served = bytes(sends[-1])
    lag.dispatch(b.key, lag.decode(served), served, 2.0)
    assert lag.machine.completed == 1 and lag.latest_model_frame == frame
