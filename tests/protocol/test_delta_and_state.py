"""Compressed updates (``delta``) and strategy state carried by global models."""

from __future__ import annotations

import pytest

from protocol.envelope import decode, encode
from protocol.errors import ProtocolError
from protocol.messages import Delta, Model
from protocol.rounds import Aggregate
from protocol.tensors import Tensor, weights_digest

from .test_rounds import GENESIS_DIGEST, Cluster, notes, of
from .wire import FED, TS, f32, identity, weights


def delta(base: bytes = GENESIS_DIGEST, round: int = 1, codec: str = "int8") -> Delta:
    payload = [Tensor("w#q", "int8", (2, 3), bytes(6)), f32("w#s", [0.5]),
               Tensor("b#q", "int8", (2,), bytes(2)), f32("b#s", [0.5])]
    return Delta(round=round, attempt=0, base=base, num_examples=10, loss=0.5,
                 train_seconds=1.0, codec=codec, weights=payload)


def test_a_delta_round_trips_through_a_signed_frame():
    d = delta()
    frame = encode(identity(1), d, seq=1, ts_ms=TS, federation=FED)
    assert decode(frame).message == d


@pytest.mark.parametrize("codec", ["", "x" * 33])
def test_a_delta_with_a_bad_codec_name_is_refused(codec):
    body = delta().to_body() | {"codec": codec}
    with pytest.raises(ProtocolError, match="delta.codec"):
        Delta.from_body(body)


def test_a_delta_missing_a_field_is_refused():
    body = delta().to_body()
    del body["codec"]
    with pytest.raises(ProtocolError, match="delta: bad fields"):
        Delta.from_body(body)


def test_the_aggregator_takes_a_delta_on_its_model_and_hands_it_to_aggregation():
    c = Cluster(2)
    c.connect_all(0.0)
    c.start_all(0.0)
    agg, member = c.rank(1)
    c.train(agg, 1.0, 1.0)
    c.m[agg].on_update(member, delta(), 2.0)
    [aggregate] = of(c.m[agg].take_actions(), Aggregate)
    assert isinstance(aggregate.updates[member], Delta)


def test_a_delta_from_another_base_cannot_be_used_and_is_ignored():
    c = Cluster(2)
    c.connect_all(0.0)
    c.start_all(0.0)
    agg, member = c.rank(1)
    c.train(agg, 1.0, 1.0)
    c.m[agg].on_update(member, delta(base=b"\x07" * 32), 2.0)
    acts = c.m[agg].take_actions()
    assert of(acts, Aggregate) == [] and "update_ignored" in notes(acts)


def _model(extra: list[Tensor]) -> Model:
    w = weights(1.0) + extra
    return Model(round=1, attempt=0, aggregator=identity(2).public_key,
                 contributors=(identity(2).public_key,), num_examples=10,
                 digest=weights_digest(w), weights=w)


def test_a_model_may_carry_strategy_state_for_its_tensors():
    m = Cluster(1).m[Cluster(1).keys[0]]
    state = [f32("fl.opt.m.w", [0.1] * 6, (2, 3)), f32("fl.opt.v.b", [0.2, 0.2])]
    m.on_model(identity(2).public_key, _model(state), 1.0)
    assert m.completed == 1


@pytest.mark.parametrize("extra", [
    [f32("fl.opt.m.w", [0.1] * 2, (2,))],             # wrong shape for w
    [f32("fl.opt.m.nope", [0.1] * 2, (2,))],          # no such tensor
    [f32("other.m.b", [0.1] * 2, (2,))],              # not strategy state
    [Tensor("fl.opt.m.b", "float16", (2,), bytes(4))],  # not float32
    [f32("fl.opt..b", [0.1] * 2, (2,))],              # no slot
])
def test_a_model_with_anything_else_is_refused(extra):
    m = Cluster(1).m[Cluster(1).keys[0]]
    with pytest.raises(ProtocolError, match="model"):
        m.on_model(identity(2).public_key, _model(extra), 1.0)


def test_updates_may_not_carry_strategy_state():
    m = Cluster(1).m[Cluster(1).keys[0]]
    with pytest.raises(ProtocolError, match="update"):
        m.check_spec(weights(1.0) + [f32("fl.opt.m.b", [0.1, 0.1])], "update")
