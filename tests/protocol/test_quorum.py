"""Quorum, offline averaging, stepping down and adaptive deadlines in the RoundMachine."""

from __future__ import annotations

import pytest

from protocol.errors import ProtocolError
from protocol.messages import Model, Share, Update
from protocol.rounds import (
    Aggregate,
    Average,
    Deadlines,
    Phase,
    RoundTimeouts,
    SendUpdate,
    ShareModel,
    StartTraining,
)
from protocol.tensors import weights_digest

from .test_rounds import GENESIS_DIGEST, KEYS, Cluster, T, machine, notes, of
from .wire import f32, weights

ME, A, B, C = KEYS[:4]


def share(value: float, *, round: int = 1, step: int = 1, n: int = 10) -> Share:
    return Share(round=round, step=step, base=GENESIS_DIGEST, num_examples=n, loss=0.1,
                 weights=weights(value))


def offline_machine(peers=(A,), quorum: int = 3):
    m = machine(ME, quorum=quorum)
    for p in peers:
        m.peer_up(p, 0.0)
    m.start(0.0)
    return m


def test_below_quorum_a_node_trains_offline_and_says_so():
    m = offline_machine()
    acts = m.take_actions()
    assert of(acts, StartTraining) == [StartTraining(1, GENESIS_DIGEST, offline=True)]
    assert "offline" in notes(acts)
    assert m.phase is Phase.OFFLINE and m.offline and not m.has_quorum()
    assert m.next_deadline() is None  # nothing to wait for: it just keeps training


def test_an_offline_step_shares_with_reachable_peers_and_averages_their_latest_models():
    m = offline_machine(peers=(A, B), quorum=4)
    m.take_actions()
    m.on_share(A, share(2.0, n=30), 0.5)
    m.on_share(A, share(3.0, n=30), 0.6)  # a newer share from A replaces the older one
    m.training_done(1, weights(1.0), 10, 0.4, 1.0, 1.0)
    acts = m.take_actions()
    [sent] = of(acts, ShareModel)
    assert sent.to == tuple(sorted((A, B))) and sent.share.num_examples == 10
    assert sent.share.round == 1 and sent.share.base == GENESIS_DIGEST
    [avg] = of(acts, Average)
    assert set(avg.models) == {ME, A} and avg.models[A].weights == weights(3.0)
    assert of(acts, SendUpdate) == [] and of(acts, Aggregate) == []
    # the driver averages and reports the digest of what it adopted
    local = weights_digest(weights(2.5))
    m.average_done(1, avg.step, local, 2.0)
    acts = m.take_actions()
    assert of(acts, StartTraining) == [StartTraining(1, local, offline=True)]
    assert m.offline_steps == 1 and m.base_digest == local and m.model_digest == GENESIS_DIGEST
    assert m.completed == 0  # offline steps are not global rounds
    # the shares were used up: the next step averages only what arrives meanwhile
    m.training_done(1, weights(4.0), 10, 0.4, 1.0, 3.0)
    [avg] = of(m.take_actions(), Average)
    assert set(avg.models) == {ME}


def test_shares_for_another_round_or_from_strangers_are_not_averaged():
    m = offline_machine(peers=(A,))
    m.take_actions()
    m.on_share(A, share(2.0, round=2), 0.5)
    m.on_share(B, share(2.0), 0.5)  # not a member
    m.training_done(1, weights(1.0), 10, 0.4, 1.0, 1.0)
    [avg] = of(m.take_actions(), Average)
    assert set(avg.models) == {ME}


def test_a_share_with_the_wrong_tensors_is_refused():
    m = offline_machine()
    bad = Share(round=1, step=1, base=GENESIS_DIGEST, num_examples=1, loss=0.0,
                weights=[f32("w", [0.0] * 6, (3, 2)), f32("b", [0.0, 0.0])])
    with pytest.raises(ProtocolError, match="share"):
        m.on_share(A, bad, 0.5)


def test_back_at_quorum_the_node_returns_to_elected_rounds_from_its_offline_model():
    m = offline_machine(peers=(A,), quorum=3)
    m.take_actions()
    m.training_done(1, weights(1.0), 10, 0.4, 1.0, 1.0)
    [avg] = of(m.take_actions(), Average)
    m.peer_up(B, 1.5)  # the partition heals while we average
    local = weights_digest(weights(1.0))
    m.average_done(1, avg.step, local, 2.0)
    acts = m.take_actions()
    assert of(acts, StartTraining) == [StartTraining(1, local)]
    assert "online" in notes(acts) and m.phase is Phase.TRAINING
    m.training_done(1, weights(2.0), 10, 0.4, 1.0, 3.0)
    update = m.my_update
    assert update is not None and update.base == local  # merged by the aggregator


def test_losing_quorum_during_a_round_turns_the_trained_update_into_an_offline_step():
    m = offline_machine(peers=(A, B), quorum=3)
    assert of(m.take_actions(), StartTraining) == [StartTraining(1, GENESIS_DIGEST)]
    m.peer_down(B, 0.5)
    m.training_done(1, weights(1.0), 10, 0.4, 1.0, 1.0)
    acts = m.take_actions()
    assert of(acts, SendUpdate) == [] and len(of(acts, Average)) == 1
    assert [s.to for s in of(acts, ShareModel)] == [(A,)]
    assert "offline" in notes(acts) and m.phase is Phase.OFFLINE


def test_a_stale_average_is_ignored():
    m = offline_machine()
    m.take_actions()
    m.training_done(1, weights(1.0), 10, 0.4, 1.0, 1.0)
    [avg] = of(m.take_actions(), Average)
    m.average_done(1, avg.step + 1, b"\x01" * 32, 2.0)
    assert m.take_actions() == [] and m.local_digest is None


def test_catching_up_replaces_the_offline_model():
    m = offline_machine(peers=(A,))
    m.take_actions()
    m.training_done(1, weights(1.0), 10, 0.4, 1.0, 1.0)
    [avg] = of(m.take_actions(), Average)
    m.average_done(1, avg.step, b"\x02" * 32, 2.0)
    m.take_actions()
    w = weights(7.0)
    model = Model(round=4, attempt=0, aggregator=A, contributors=(A, B, C), num_examples=30,
                  digest=weights_digest(w), weights=w)
    m.on_model(A, model, 3.0)
    acts = m.take_actions()
    assert "offline_superseded" in notes(acts)
    assert m.completed == 4 and m.local_digest is None and m.base_digest == model.digest


# ---- quorum at the aggregator -------------------------------------------------------------


def test_an_aggregator_without_a_quorum_of_updates_steps_down_at_its_deadline():
    c = Cluster(3, quorum=2)
    c.connect_all(0.0)
    c.start_all(0.0)
    agg, second, third = c.rank(1)
    # the others sent their updates elsewhere (say we restarted): only ours is here
    c.m[agg].training_done(1, weights(1.0), 10, 0.5, 1.0, 1.0)
    assert c.m[agg].phase is Phase.COLLECTING
    c.m[agg].take_actions()
    c.m[agg].tick(1.0 + T.collect)
    acts = c.m[agg].take_actions()
    assert of(acts, Aggregate) == [] and "aggregator_failed" in notes(acts)
    assert agg in c.m[agg].excluded
    [send] = of(acts, SendUpdate)
    assert send.to == second and send.update.attempt == 1


def test_an_aggregator_with_a_quorum_aggregates_at_its_deadline_without_the_straggler():
    c = Cluster(3, quorum=2)
    c.connect_all(0.0)
    c.start_all(0.0)
    agg, second, straggler = c.rank(1)
    c.train(second, 1.0, 0.5)
    c.train(agg, 1.0, 1.0)
    assert c.m[agg].phase is Phase.COLLECTING
    c.m[agg].tick(1.0 + T.collect)
    c.pump(1.0 + T.collect)
    [aggregate] = c.actions(agg, Aggregate)
    assert set(aggregate.updates) == {agg, second}


def test_all_updates_in_is_not_enough_without_a_quorum():
    c = Cluster(3, quorum=3)
    c.connect_all(0.0)
    c.start_all(0.0)
    first, second, third = c.rank(1)
    # the first-ranked aggregator's links dropped while the others trained, and came back:
    # neither elects it again this round, so both move on to the second
    for k in (second, third):
        c.m[k].peer_down(first, 0.5)
        c.m[k].peer_up(first, 0.5)
        assert c.m[k].excluded == {first}
    c.train(third, 1.0, 1.0)
    c.train(second, 1.0, 1.0)
    # participants minus the excluded all sent, but 2 updates are not a quorum of 3
    assert c.actions(second, Aggregate) == []
    assert c.m[second].phase is Phase.COLLECTING


def test_an_aggregator_that_went_down_is_not_elected_again_in_that_round():
    c = Cluster(3)
    c.connect_all(0.0)
    c.start_all(0.0)
    agg, second, third = c.rank(1)
    c.m[third].peer_down(agg, 0.5)
    c.m[third].peer_up(agg, 0.6)  # restarted, without the updates it had
    assert c.m[third].elect() == second
    c.train(third, 1.0, 1.0)
    assert c.actions(third, SendUpdate)[-1].to == second


def waiting_for_the_model():
    """3 members, quorum 2: the third-ranked has trained round 1 and waits for the model
    of the first-ranked (which is still training). Returns the cluster and the ranking."""
    c = Cluster(3, quorum=2)
    c.connect_all(0.0)
    c.start_all(0.0)
    agg, second, third = ranked = c.rank(1)
    c.train(third, 1.0, 1.0)
    assert c.m[third].phase is Phase.WAITING_MODEL and c.m[third].aggregator == agg
    c.m[third].take_actions()
    return c, ranked


@pytest.mark.parametrize("state", ["offline", "stopped", "done"])
def test_a_waiting_node_gives_up_on_an_aggregator_that_says_it_will_not_publish(state):
    c, (agg, second, third) = waiting_for_the_model()
    # its heartbeat: the aggregator stepped down below quorum (or was stopped, or is done)
    c.m[third].peer_status(agg, 2.0, round=0, state=state)
    acts = c.m[third].take_actions()
    assert "aggregator_failed" in notes(acts)  # at once, not at the model deadline
    assert agg in c.m[third].excluded
    [send] = of(acts, SendUpdate)  # the update goes to the next in line
    assert send.to == second and c.m[third].phase is Phase.WAITING_MODEL


def test_a_waiting_node_keeps_waiting_for_an_aggregator_that_still_trains():
    c, (agg, second, third) = waiting_for_the_model()
    c.m[third].peer_status(agg, 2.0, round=0, state="training")
    assert "aggregator_failed" not in notes(c.m[third].take_actions())
    assert c.m[third].phase is Phase.WAITING_MODEL and c.m[third].aggregator == agg


# ---- adaptive deadlines -------------------------------------------------------------------


def test_the_collect_deadline_is_the_cap_until_there_are_samples():
    d = Deadlines(RoundTimeouts(collect=60.0, model=90.0, floor=5.0))
    assert d.collect() == 60.0
    d.lags.extend([1.0, 2.0])
    assert d.collect() == 60.0


def test_the_collect_deadline_follows_the_lateness_observed():
    d = Deadlines(RoundTimeouts(collect=60.0, model=90.0, floor=5.0))
    d.lags.extend([0.0] * 8 + [3.0, 4.0])
    assert d.collect() == pytest.approx(2 * 4.0 + 5.0)
    d.lags.extend([0.0] * 32)
    assert d.collect() == 5.0  # never under the floor
    d.lags.extend([100.0] * 32)
    assert d.collect() == 60.0  # never over the cap


def test_an_aggregator_learns_its_deadline_from_the_updates_it_waits_for():
    timeouts = RoundTimeouts(collect=60.0, model=90.0, start=30.0, floor=2.0)
    c = Cluster(2, timeouts=timeouts)
    c.connect_all(0.0)
    c.start_all(0.0)
    now = 0.0
    for r in range(1, 5):
        agg, member = c.rank(r)
        c.train(agg, 1.0, now + 1.0)
        m = c.m[agg]
        deadline = m.next_deadline()
        c.train(member, 1.0, now + 4.0)  # 3 s after the aggregator's own update
        c.finish_aggregation(agg, now + 4.5)
        now += 10.0
    lags = list(c.m[c.keys[0]].deadlines.lags) + list(c.m[c.keys[1]].deadlines.lags)
    assert lags and all(x == pytest.approx(3.0) for x in lags)
    learnt = [k for k in c.keys if len(c.m[k].deadlines.lags) >= 3]
    for k in learnt:
        assert c.m[k].deadlines.collect() == pytest.approx(2 * 3.0 + 2.0)
    assert deadline is not None


def test_a_late_update_pushes_the_deadline_up():
    c = Cluster(3, quorum=2)
    c.connect_all(0.0)
    c.start_all(0.0)
    agg, second, straggler = c.rank(1)
    c.train(second, 1.0, 0.5)
    c.train(agg, 1.0, 1.0)
    c.m[agg].tick(1.0 + T.collect)
    c.pump(1.0 + T.collect)
    c.finish_aggregation(agg, 12.0)
    assert c.m[agg].completed == 1
    before = list(c.m[agg].deadlines.lags)
    # the straggler's update for round 1 arrives after the round is over
    late = Update(round=1, attempt=0, base=GENESIS_DIGEST, num_examples=10, loss=0.5,
                  train_seconds=20.0, weights=weights(1.0))
    c.m[agg].on_update(straggler, late, 25.0)
    assert "update_ignored" in notes(c.m[agg].take_actions())
    assert list(c.m[agg].deadlines.lags) == before + [pytest.approx(24.0)]


def test_an_aggregation_that_fails_steps_the_aggregator_down():
    c = Cluster(3)
    c.connect_all(0.0)
    c.start_all(0.0)
    agg, second, third = c.rank(1)
    for k in (third, second, agg):
        c.train(k, 1.0, 1.0)
    [aggregate] = c.actions(agg, Aggregate)
    c.m[agg].aggregation_failed(aggregate.round, "krum needs more updates", 2.0)
    acts = c.m[agg].take_actions()
    assert "aggregator_failed" in notes(acts) and agg in c.m[agg].excluded
    assert [a.to for a in of(acts, SendUpdate)] == [second]
