"""RoundMachine in isolation: a few machines driven by hand with a fake clock.

The test plays the node: it carries each machine's actions to the others (SendUpdate to
the elected aggregator, PublishModel to everyone), finishes training and aggregation when
told to, and moves ``now`` forward by hand.
"""

from __future__ import annotations

import struct
from dataclasses import replace as dc_replace

import pytest

from protocol.election import ranking
from protocol.errors import ProtocolError
from protocol.messages import Model, Update
from protocol.rounds import (
    Aggregate,
    Commit,
    Note,
    Phase,
    PublishModel,
    RoundMachine,
    RoundTimeouts,
    SendUpdate,
    StartTraining,
)
from protocol.tensors import Tensor, weights_digest

from .wire import FED, f32, genesis, identity, weights

T = RoundTimeouts(collect=10.0, model=20.0, start=30.0)
KEYS = [identity(n).public_key for n in range(1, 6)]
GENESIS_DIGEST = weights_digest(genesis())


def machine(key: bytes, *, rounds: int = 5, wait_peers: int = 0, timeouts: RoundTimeouts = T,
            **kw) -> RoundMachine:
    return RoundMachine(self_key=key, federation=FED, rounds_total=rounds, genesis=genesis(),
                        wait_peers=wait_peers, timeouts=timeouts, **kw)


def of(actions, cls) -> list:
    return [a for a in actions if isinstance(a, cls)]


def notes(actions) -> list[str]:
    return [a.kind for a in of(actions, Note)]


def mean(updates: dict[bytes, Update]) -> list[Tensor]:
    out = []
    for i, t in enumerate(genesis()):
        n = len(t.data) // 4
        cols = [struct.unpack(f"<{n}f", u.weights[i].data) for u in updates.values()]
        avg = [sum(c[j] for c in cols) / len(cols) for j in range(n)]
        out.append(f32(t.name, avg, t.shape))
    return out


class Cluster:
    """A few machines and a hand-cranked network between them."""

    def __init__(self, n: int, **kw) -> None:
        self.keys = KEYS[:n]
        self.m = {k: machine(k, **kw) for k in self.keys}
        self.down: set[bytes] = set()  # crashed: their actions are lost, nothing reaches them
        self.log: list[tuple[bytes, object]] = []

    def connect_all(self, now: float) -> None:
        for a in self.keys:
            for b in self.keys:
                if a != b:
                    self.m[a].peer_up(b, now)

    def start_all(self, now: float) -> None:
        for k in self.keys:
            self.m[k].start(now)
        self.pump(now)

    def pump(self, now: float) -> None:
        """Deliver updates and models until no machine has anything left to say."""
        busy = True
        while busy:
            busy = False
            for k in self.keys:
                actions = self.m[k].take_actions()
                if k in self.down:
                    continue
                for a in actions:
                    busy = True
                    self.log.append((k, a))
                    if isinstance(a, SendUpdate) and a.to not in self.down:
                        self.m[a.to].on_update(k, a.update, now)
                    elif isinstance(a, PublishModel):
                        for other in self.keys:
                            if other != k and other not in self.down:
                                self.m[other].on_model(k, a.model, now)

    def actions(self, key: bytes, cls=object) -> list:
        return [a for k, a in self.log if k == key and isinstance(a, cls)]

    def train(self, key: bytes, value: float, now: float) -> None:
        m = self.m[key]
        m.training_done(m.current, weights(value), 10, 0.5, 1.0, now)
        self.pump(now)

    def finish_aggregation(self, key: bytes, now: float) -> Model:
        agg = self.actions(key, Aggregate)[-1]
        self.m[key].aggregation_done(agg.round, agg.attempt, mean(agg.updates), agg.updates,
                                     10 * len(agg.updates), now)
        self.pump(now)
        return self.actions(key, PublishModel)[-1].model

    def rank(self, r: int, among=None) -> list[bytes]:
        return ranking(FED, r, among if among is not None else self.keys)


# ---- starting ---------------------------------------------------------------------------


def test_a_node_waits_for_wait_peers_before_training():
    m = machine(KEYS[0], wait_peers=2)
    m.start(0.0)
    acts = m.take_actions()
    assert of(acts, StartTraining) == [] and "waiting_for_peers" in notes(acts)
    assert m.phase is Phase.WAITING_START and m.next_deadline() == 30.0
    m.peer_up(KEYS[1], 1.0)
    assert of(m.take_actions(), StartTraining) == []
    m.peer_up(KEYS[2], 2.0)
    assert of(m.take_actions(), StartTraining) == [StartTraining(1, GENESIS_DIGEST)]
    assert m.phase is Phase.TRAINING and m.next_deadline() is None


def test_a_node_starts_with_the_peers_it_has_after_the_start_timeout():
    m = machine(KEYS[0], wait_peers=3)
    m.start(0.0)
    m.peer_up(KEYS[1], 1.0)
    m.take_actions()
    m.tick(29.9)
    assert m.take_actions() == [] and m.phase is Phase.WAITING_START
    m.tick(30.0)
    acts = m.take_actions()
    assert of(acts, StartTraining) == [StartTraining(1, GENESIS_DIGEST)]
    assert "start_timeout" in notes(acts)


def test_with_no_wait_peers_training_starts_at_once():
    m = machine(KEYS[0])
    m.start(0.0)
    assert of(m.take_actions(), StartTraining) == [StartTraining(1, GENESIS_DIGEST)]


def test_a_node_resuming_after_a_restart_does_not_wait_for_peers():
    digest = weights_digest(weights(0.5))
    m = machine(KEYS[0], wait_peers=4, completed=2, model_digest=digest)
    m.start(0.0)
    assert of(m.take_actions(), StartTraining) == [StartTraining(3, digest)]


def test_a_node_that_completed_every_round_is_done_at_start():
    m = machine(KEYS[0], rounds=3, completed=3, model_digest=b"\x01" * 32)
    m.start(0.0)
    assert m.phase is Phase.DONE and "done" in notes(m.take_actions())


def test_peers_arriving_before_start_do_not_start_training():
    m = machine(KEYS[0], wait_peers=1)
    m.peer_up(KEYS[1], 0.0)
    assert of(m.take_actions(), StartTraining) == []


# ---- a normal round ---------------------------------------------------------------------


def test_the_aggregator_aggregates_as_soon_as_every_participant_has_sent_its_update():
    c = Cluster(3)
    c.connect_all(0.0)
    c.start_all(0.0)
    agg, *members = c.rank(1)
    c.train(agg, 3.0, 1.0)
    assert c.m[agg].phase is Phase.COLLECTING and c.m[agg].next_deadline() == 11.0
    c.train(members[0], 6.0, 2.0)
    assert c.actions(agg, Aggregate) == []  # one update still missing
    assert c.m[members[0]].phase is Phase.WAITING_MODEL
    c.train(members[1], 9.0, 3.0)
    (aggregate,) = c.actions(agg, Aggregate)
    assert (aggregate.round, aggregate.attempt) == (1, 0)
    assert set(aggregate.updates) == set(c.keys)
    assert all(u.base == GENESIS_DIGEST for u in aggregate.updates.values())
    # each member sent its update to the elected aggregator, and to nobody else
    for k in members:
        assert [a.to for a in c.actions(k, SendUpdate)] == [agg]

    model = c.finish_aggregation(agg, 4.0)
    assert model.digest == weights_digest(mean(aggregate.updates))
    assert model.aggregator == agg and model.contributors == tuple(sorted(c.keys))
    for k in c.keys:
        commits = c.actions(k, Commit)
        assert [x.model.digest for x in commits] == [model.digest]
        assert c.m[k].completed == 1 and c.m[k].model_digest == model.digest
        # round 2 starts from the new global model
        assert c.actions(k, StartTraining)[-1] == StartTraining(2, model.digest)


def test_the_aggregator_aggregates_what_it_has_at_the_collect_deadline():
    c = Cluster(3)
    c.connect_all(0.0)
    c.start_all(0.0)
    agg, fast, slow = c.rank(1)
    c.train(agg, 1.0, 5.0)
    c.train(fast, 2.0, 6.0)
    c.m[agg].tick(14.9)
    c.pump(14.9)
    assert c.actions(agg, Aggregate) == []
    assert c.m[agg].next_deadline() == 15.0
    c.m[agg].tick(15.0)
    c.pump(15.0)
    (aggregate,) = c.actions(agg, Aggregate)
    assert set(aggregate.updates) == {agg, fast}
    c.finish_aggregation(agg, 16.0)
    # the slow member's training is now moot: it takes the model and moves on
    assert c.m[slow].completed == 1 and c.m[slow].current == 2
    c.m[slow].training_done(1, weights(9.0), 10, 0.5, 1.0, 17.0)
    assert "training_discarded" in notes(c.m[slow].take_actions())


def test_a_participant_that_stops_is_not_waited_for():
    c = Cluster(3)
    c.connect_all(0.0)
    c.start_all(0.0)
    agg, member, quitter = c.rank(1)
    c.train(agg, 1.0, 1.0)
    c.train(member, 2.0, 2.0)
    c.m[agg].peer_status(quitter, 3.0, round=0, state="stopped")
    c.pump(3.0)
    (aggregate,) = c.actions(agg, Aggregate)
    assert set(aggregate.updates) == {agg, member}


def test_a_peer_that_goes_down_is_not_waited_for():
    c = Cluster(3)
    c.connect_all(0.0)
    c.start_all(0.0)
    agg, member, gone = c.rank(1)
    c.train(agg, 1.0, 1.0)
    c.train(member, 2.0, 2.0)
    c.m[agg].peer_down(gone, 3.0)
    c.pump(3.0)
    assert set(c.actions(agg, Aggregate)[0].updates) == {agg, member}


def test_an_update_for_the_next_round_is_kept_for_it():
    c = Cluster(2)
    c.connect_all(0.0)
    c.start_all(0.0)
    agg = c.rank(1)[0]
    other = c.rank(1)[1]
    early = Update(round=2, attempt=0, base=b"\x07" * 32, num_examples=1, loss=0.0,
                   train_seconds=0.0, weights=weights(1.0))
    c.m[agg].on_update(other, early, 0.5)
    assert c.m[agg].updates[2] == {other: early}


def test_an_update_for_a_past_round_is_ignored():
    m = machine(KEYS[0], completed=3, model_digest=b"\x01" * 32)
    m.start(0.0)
    m.take_actions()
    old = Update(round=3, attempt=0, base=b"\x01" * 32, num_examples=1, loss=0.0,
                 train_seconds=0.0, weights=weights(1.0))
    m.on_update(KEYS[1], old, 1.0)
    assert "update_ignored" in notes(m.take_actions())
    assert 3 not in m.updates


def test_an_update_trained_from_another_model_is_merged():
    # The reconcile rule: after a partition or a split round, members hold different
    # models; the aggregator averages their updates whatever they were trained from.
    c = Cluster(2)
    c.connect_all(0.0)
    c.start_all(0.0)
    agg, member = c.rank(1)
    c.train(agg, 1.0, 1.0)
    other = Update(round=1, attempt=0, base=b"\x99" * 32, num_examples=10, loss=0.0,
                   train_seconds=0.0, weights=weights(3.0))
    c.m[agg].on_update(member, other, 2.0)
    acts = c.m[agg].take_actions()
    [aggregate] = of(acts, Aggregate)
    assert set(aggregate.updates) == {agg, member}
    assert aggregate.updates[member].base == b"\x99" * 32


def test_an_early_update_for_the_next_round_waits_for_that_round():
    c = Cluster(3)
    c.connect_all(0.0)
    c.start_all(0.0)
    agg2 = c.rank(2)[0]
    early_sender = [k for k in c.rank(2) if k != agg2][0]
    early = Update(round=2, attempt=0, base=b"\x99" * 32, num_examples=10, loss=0.0,
                   train_seconds=0.0, weights=weights(3.0))
    c.m[agg2].on_update(early_sender, early, 0.5)
    assert [a.round for a in of(c.m[agg2].take_actions(), Aggregate)] == []
    for k in c.rank(1)[::-1]:
        c.train(k, 1.0, 1.0)
    c.finish_aggregation(c.rank(1)[0], 2.0)
    assert all(c.m[k].completed == 1 for k in c.keys)
    for k in c.keys:
        if k != early_sender:
            c.train(k, 2.0, 3.0)
    [aggregate] = [a for a in c.actions(agg2, Aggregate) if a.round == 2]
    assert set(aggregate.updates) == set(c.keys)


@pytest.mark.parametrize("bad", [
    [f32("w", [0.0] * 6, (3, 2)), f32("b", [0.0, 0.0])],                      # shape
    [f32("W", [0.0] * 6, (2, 3)), f32("b", [0.0, 0.0])],                      # name
    [Tensor("w", "int32", (2, 3), bytes(24)), f32("b", [0.0, 0.0])],          # dtype
    [f32("w", [0.0] * 6, (2, 3))],                                            # missing
    [f32("w", [0.0] * 6, (2, 3)), f32("b", [0.0, 0.0]), f32("c", [0.0])],     # extra
    [f32("b", [0.0, 0.0]), f32("w", [0.0] * 6, (2, 3))],                      # order
], ids=["shape", "name", "dtype", "missing", "extra", "order"])
def test_updates_and_models_with_the_wrong_tensors_are_refused(bad):
    m = machine(KEYS[0])
    m.start(0.0)
    update = Update(round=1, attempt=0, base=GENESIS_DIGEST, num_examples=1, loss=0.0,
                    train_seconds=0.0, weights=bad)
    with pytest.raises(ProtocolError, match="update"):
        m.on_update(KEYS[1], update, 1.0)
    model = Model(round=1, attempt=0, aggregator=KEYS[1], contributors=(KEYS[1],),
                  num_examples=1, digest=weights_digest(bad), weights=bad)
    with pytest.raises(ProtocolError, match="model"):
        m.on_model(KEYS[1], model, 1.0)
    assert m.completed == 0


# ---- models -------------------------------------------------------------------------------


def a_model(r: int, aggregator: bytes, value: float = 1.0) -> Model:
    w = weights(value)
    return Model(round=r, attempt=0, aggregator=aggregator, contributors=(aggregator,),
                 num_examples=10, digest=weights_digest(w), weights=w)


def test_a_model_whose_digest_does_not_match_its_weights_is_refused():
    m = machine(KEYS[0])
    m.start(0.0)
    m.take_actions()
    bad = dc_replace(a_model(1, KEYS[1]), digest=weights_digest(weights(2.0)))
    with pytest.raises(ProtocolError, match="digest"):
        m.on_model(KEYS[1], bad, 1.0)
    assert m.completed == 0 and of(m.take_actions(), Commit) == []


def test_a_model_not_signed_by_its_aggregator_is_refused():
    m = machine(KEYS[0])
    m.start(0.0)
    m.take_actions()
    with pytest.raises(ProtocolError, match="aggregator"):
        m.on_model(KEYS[2], a_model(1, KEYS[1]), 1.0)
    assert m.completed == 0 and of(m.take_actions(), Commit) == []


def test_a_model_is_committed_once_and_older_models_are_ignored():
    m = machine(KEYS[0])
    m.start(0.0)
    m.take_actions()
    first = a_model(1, KEYS[1])
    m.on_model(KEYS[1], first, 1.0)
    m.on_model(KEYS[1], first, 2.0)  # relayed again
    m.on_model(KEYS[2], a_model(1, KEYS[2], 5.0), 3.0)  # a second model for round 1
    acts = m.take_actions()
    assert [c.model.digest for c in of(acts, Commit)] == [first.digest]
    assert "model_conflict" in notes(acts)
    assert m.model_digest == first.digest and m.completed == 1
    m.on_model(KEYS[1], a_model(2, KEYS[1], 2.0), 4.0)
    m.on_model(KEYS[1], first, 5.0)  # round 1 again, now two rounds back
    acts = m.take_actions()
    assert [c.model.round for c in of(acts, Commit)] == [2]
    assert m.completed == 2


def test_an_old_model_with_a_wrong_digest_is_ignored_not_refused():
    m = machine(KEYS[0], completed=3, model_digest=b"\x01" * 32)
    bad = dc_replace(a_model(2, KEYS[1]), digest=b"\x00" * 32)
    m.on_model(KEYS[1], bad, 0.0)
    assert m.completed == 3 and of(m.take_actions(), Commit) == []


def test_a_model_for_a_later_round_lets_a_lagging_node_catch_up():
    m = machine(KEYS[0], rounds=10)
    m.peer_up(KEYS[1], 0.0)
    m.start(0.0)
    m.take_actions()
    later = a_model(6, KEYS[1], 4.0)
    m.on_model(KEYS[1], later, 1.0)
    acts = m.take_actions()
    assert of(acts, Commit) == [Commit(later, KEYS[1])]
    assert m.completed == 6 and m.model_digest == later.digest
    assert of(acts, StartTraining) == [StartTraining(7, later.digest)]


def test_catching_up_past_the_last_round_finishes():
    m = machine(KEYS[0], rounds=3)
    m.start(0.0)
    m.take_actions()
    m.on_model(KEYS[1], a_model(3, KEYS[1]), 1.0)
    assert m.phase is Phase.DONE and "done" in notes(m.take_actions())


def test_a_model_received_before_start_is_applied_but_starts_nothing():
    m = machine(KEYS[0])
    m.peer_up(KEYS[1], 0.0)
    m.on_model(KEYS[1], a_model(2, KEYS[1]), 0.0)
    acts = m.take_actions()
    assert m.completed == 2 and of(acts, StartTraining) == []
    m.start(1.0)
    assert of(m.take_actions(), StartTraining)[0].round == 3


# ---- aggregator failure -----------------------------------------------------------------


def test_members_re_elect_and_re_send_when_the_aggregator_goes_down():
    c = Cluster(3)
    c.connect_all(0.0)
    c.start_all(0.0)
    first, second, third = c.rank(1)
    c.down.add(first)
    c.train(second, 2.0, 1.0)
    c.train(third, 3.0, 1.0)
    sent = c.actions(third, SendUpdate)
    assert [a.to for a in sent] == [first]
    for k in (second, third):
        c.m[k].peer_down(first, 2.0)
    c.pump(2.0)
    # the next in the ranking aggregates; the third re-sent the same update to it
    resent = c.actions(third, SendUpdate)[-1]
    # the same update, re-sent with the attempt it now belongs to
    assert resent.to == second and resent.update == dc_replace(sent[0].update, attempt=1)
    assert "aggregator_failed" in [a.kind for a in c.actions(third, Note)]
    assert c.m[second].attempt == 1 and c.m[second].aggregator == second
    (aggregate,) = c.actions(second, Aggregate)
    assert set(aggregate.updates) == {second, third} and aggregate.attempt == 1
    model = c.finish_aggregation(second, 3.0)
    assert model.attempt == 1 and model.aggregator == second
    assert c.m[third].completed == 1


def test_members_re_elect_when_the_model_deadline_passes():
    c = Cluster(3)
    c.connect_all(0.0)
    c.start_all(0.0)
    first, second, third = c.rank(1)
    c.down.add(first)  # hung: the link stays up, nothing comes back
    c.train(second, 2.0, 1.0)
    c.train(third, 3.0, 1.5)
    assert c.m[third].next_deadline() == 21.5
    c.m[third].tick(21.4)
    c.pump(21.4)
    assert [a.to for a in c.actions(third, SendUpdate)] == [first]
    c.m[third].tick(21.5)
    c.pump(21.5)
    assert [a.to for a in c.actions(third, SendUpdate)] == [first, second]
    assert c.m[third].excluded == {first}
    # the second reaches its own deadline and elects itself. The hung aggregator is still
    # linked but excluded for this round, so the second does not wait for its update: with
    # the third's re-sent update in, it aggregates at once.
    c.m[second].tick(21.0)
    c.pump(21.0)
    assert c.m[second].phase is Phase.AGGREGATING
    assert set(c.actions(second, Aggregate)[0].updates) == {second, third}


def test_when_every_other_aggregator_fails_a_member_aggregates_itself():
    c = Cluster(3)
    c.connect_all(0.0)
    c.start_all(0.0)
    ranked = c.rank(1)
    last = ranked[-1]
    c.down.update(ranked[:-1])
    c.train(last, 1.0, 0.0)
    c.m[last].tick(20.0)
    c.pump(20.0)
    c.m[last].tick(40.0)
    c.pump(40.0)
    assert [a.to for a in c.actions(last, SendUpdate)] == ranked[:-1]
    # both others are excluded as silent: nobody is left to wait for
    assert c.m[last].phase is Phase.AGGREGATING and c.m[last].excluded == set(ranked[:-1])
    assert set(c.actions(last, Aggregate)[0].updates) == {last}


def test_exclusions_last_only_for_the_round():
    c = Cluster(3)
    c.connect_all(0.0)
    c.start_all(0.0)
    first, second, third = c.rank(1)
    c.down.add(first)
    c.train(second, 2.0, 1.0)
    c.train(third, 3.0, 1.0)
    for k in (second, third):
        c.m[k].tick(21.0)
    c.pump(21.0)
    c.m[second].tick(31.0)
    c.pump(31.0)
    c.finish_aggregation(second, 32.0)
    assert c.m[third].completed == 1
    assert c.m[third].excluded == set() and c.m[third].attempt == 0


# ---- pausing and participation ----------------------------------------------------------


def test_members_taking_part_are_live_not_stopped_done_or_joining_and_include_self():
    m = machine(KEYS[0])
    for k in KEYS[1:5]:
        m.peer_up(k, 0.0)
    m.peer_status(KEYS[3], 0.0, round=0, state="stopped")
    m.peer_status(KEYS[4], 0.0, round=0, state="done")
    m.peer_down(KEYS[2], 0.0)
    assert m.members() == {KEYS[0], KEYS[1], KEYS[3], KEYS[4]}
    assert m.live() == m.taking_part() == {KEYS[0], KEYS[1]}
    # a member sitting a round out is live (a quorum counts it) but takes no part
    m.peer_up(KEYS[2], 0.0)
    m.peer_status(KEYS[2], 0.0, round=0, state="joining")
    assert m.live() == {KEYS[0], KEYS[1], KEYS[2]}
    assert m.taking_part() == {KEYS[0], KEYS[1]}
    m.start(0.0)
    assert m.participants() == {KEYS[0], KEYS[1]}


def test_a_paused_node_stops_participating_and_is_not_elected():
    m = machine(KEYS[0])
    m.peer_up(KEYS[1], 0.0)
    m.start(0.0)
    m.take_actions()
    m.pause(1.0)
    assert m.phase is Phase.STOPPED and m.next_deadline() is None
    assert KEYS[0] not in m.participants() and m.participants() == {KEYS[1]}
    assert m.elect() == KEYS[1]
    # a model arriving while paused is applied, but no training starts
    m.on_model(KEYS[1], a_model(1, KEYS[1]), 2.0)
    acts = m.take_actions()
    assert m.completed == 1 and of(acts, StartTraining) == []
    assert m.phase is Phase.STOPPED
    # a peer arriving does not restart it either
    m.peer_up(KEYS[2], 3.0)
    assert of(m.take_actions(), StartTraining) == []
    # training finished while paused is discarded
    m.training_done(2, weights(1.0), 1, 0.0, 0.0, 4.0)
    assert of(m.take_actions(), SendUpdate) == []
    m.start(5.0)
    assert of(m.take_actions(), StartTraining) == [StartTraining(2, m.model_digest)]
    assert KEYS[0] in m.participants()


def test_a_paused_aggregator_is_not_waited_for_by_the_other_aggregator():
    c = Cluster(2)
    c.connect_all(0.0)
    c.start_all(0.0)
    agg, member = c.rank(1)
    c.m[member].pause(0.5)
    c.train(agg, 1.0, 1.0)
    c.m[agg].peer_status(member, 1.0, round=0, state="stopped")
    c.pump(1.0)
    assert set(c.actions(agg, Aggregate)[0].updates) == {agg}


def test_the_last_round_ends_in_done():
    c = Cluster(2, rounds=2)
    c.connect_all(0.0)
    c.start_all(0.0)
    now = 0.0
    for r in (1, 2):
        agg, member = c.rank(r)
        c.train(member, 1.0, now + 1)
        c.train(agg, 2.0, now + 2)
        c.finish_aggregation(agg, now + 3)
        now += 10
    for k in c.keys:
        assert c.m[k].phase is Phase.DONE and c.m[k].completed == 2
        assert "done" in [a.kind for a in c.actions(k, Note)]


def test_rounds_total_must_be_positive():
    with pytest.raises(ValueError):
        machine(KEYS[0], rounds=0)
