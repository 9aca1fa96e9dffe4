"""Joining a running federation never stalls a round (docs/protocol.md 9.1, 9.2, 9.4):
members agree on the candidates for aggregator (the contributors of the model they hold),
an aggregator waits only for the members that took part when it started the round, and
a node sits a round out (``joining``) while taking part could make the others wait."""

from __future__ import annotations

from protocol.election import ranking
from protocol.messages import Model
from protocol.rounds import Aggregate, Note, Phase, RoundMachine, SendUpdate, StartTraining
from protocol.tensors import weights_digest

from .test_rounds import KEYS, T, machine, of
from .wire import FED, weights


def model(r: int, aggregator: bytes, contributors: tuple[bytes, ...]) -> Model:
    w = weights(float(r))
    return Model(round=r, attempt=0, aggregator=aggregator, contributors=contributors,
                 num_examples=10 * len(contributors), digest=weights_digest(w), weights=w)


def kinds(m: RoundMachine) -> list[str]:
    return [a.kind for a in of(m.take_actions(), Note)]


def a_round_where(first: bytes, among: list[bytes]) -> int:
    """A round (from 2) for which ``first`` ranks first among ``among``."""
    return next(r for r in range(2, 500) if ranking(FED, r, among)[0] == first)


def trained(m: RoundMachine, now: float) -> None:
    m.training_done(m.current, weights(1.0), 10, 0.5, 1.0, now)


# ---- who is elected, who is waited for --------------------------------------------------


def test_a_newcomer_is_never_elected_before_it_contributed():
    old, newcomer = KEYS[:3], KEYS[3]
    r = a_round_where(newcomer, [*old, newcomer])  # the newcomer would win round r
    m = machine(old[0], rounds=r + 1, completed=r - 2, model_digest=b"\x01" * 32)
    for k in old[1:]:
        m.peer_up(k, 0.0, round=r - 2)
    m.start(0.0)
    m.on_model(old[1], model(r - 1, old[1], tuple(old)), 1.0)
    m.peer_up(newcomer, 1.5, round=r - 1, state="training")  # it holds the model too
    assert m.current == r and m.phase is Phase.TRAINING
    # every member elects among the contributors of round r - 1: the same winner
    assert m.elect() == ranking(FED, r, old)[0] != newcomer


def test_round_one_without_contributors_elects_among_the_participants():
    m = machine(KEYS[0])
    for k in KEYS[1:3]:
        m.peer_up(k, 0.0)
    m.start(0.0)
    assert m.contributors is None
    assert m.elect() == ranking(FED, 1, KEYS[:3])[0]


def test_a_member_arriving_mid_round_is_not_waited_for():
    first, other, late = ranking(FED, 1, KEYS[:2])[0], ranking(FED, 1, KEYS[:2])[1], KEYS[2]
    m = machine(first)
    m.peer_up(other, 0.0)
    m.start(0.0)
    m.take_actions()
    m.peer_up(late, 0.5, round=0, state="training")  # after we started the round
    trained(m, 1.0)
    assert m.phase is Phase.COLLECTING
    m.on_update(other, SendUpdate(first, _update(other)).update, 1.2)
    aggregate = of(m.take_actions(), Aggregate)
    assert aggregate and set(aggregate[0].updates) == {first, other}


def test_a_member_that_is_behind_is_not_waited_for_after_a_commit():
    keys = ranking(FED, 2, KEYS[:3])
    agg, member, behind = keys
    m = machine(agg, rounds=5)
    m.peer_up(member, 0.0)
    m.peer_up(behind, 0.0)
    m.start(0.0)
    m.take_actions()
    # "behind" says it is still at round 0 after we applied round 1's model: it may
    # be catching up, so round 2 does not wait for it (nor assumes it has the model)
    m.on_model(member, model(1, member, (agg, member)), 1.0)
    assert m.current == 2
    m.peer_status(behind, 1.5, round=0, state="waiting")
    assert behind not in m.participants() and m.peers[behind].round == 0
    assert m.peers[member].round == 1  # the contributor was in the round: assumed with us
    trained(m, 2.0)
    m.on_update(member, _update(member, 2), 2.1)
    assert of(m.take_actions(), Aggregate)


def test_a_contributor_is_assumed_to_take_part_again_whatever_it_said_before():
    a, b = KEYS[:2]
    m = machine(a, rounds=5)
    m.peer_up(b, 0.0)
    m.start(0.0)
    m.peer_status(b, 0.5, round=0, state="joining")  # an old report: it sat a round out
    assert b not in m.taking_part()
    m.on_model(b, model(1, b, (a, b)), 1.0)  # its update is in round 1's model
    assert (m.peers[b].round, m.peers[b].state) == (1, "training")
    assert b in m.taking_part() and b in m.participants()
    # a report as new as the model wins over the assumption
    m.peer_status(b, 1.5, round=1, state="stopped")
    assert b not in m.participants()


def test_a_member_sitting_out_is_not_waited_for_and_its_aggregator_is_replaced():
    first, second, third = ranking(FED, 1, KEYS[:3])
    m = machine(first)
    m.peer_up(second, 0.0)
    m.peer_up(third, 0.0)
    m.start(0.0)
    trained(m, 1.0)
    m.on_update(second, _update(second), 1.1)
    assert not of(m.take_actions(), Aggregate)
    m.peer_status(third, 1.2, round=0, state="joining")
    assert set(of(m.take_actions(), Aggregate)[0].updates) == {first, second}
    # a member waiting for a model from an aggregator that says it sits out re-elects
    w = machine(second)
    w.peer_up(first, 0.0)
    w.peer_up(third, 0.0)
    w.start(0.0)
    trained(w, 1.0)
    assert w.aggregator == first
    w.peer_status(first, 1.5, round=0, state="joining")
    assert w.excluded == {first} and w.aggregator == ranking(FED, 1, [second, third])[0]


# ---- sitting a round out ----------------------------------------------------------------


def test_a_node_behind_its_peers_sits_out_instead_of_training_a_finished_round():
    m = machine(KEYS[3], rounds=10, wait_peers=1)
    m.start(0.0)
    m.take_actions()
    m.peer_up(KEYS[0], 1.0, round=5, state="training")  # the federation is at round 6
    acts = m.take_actions()
    assert of(acts, StartTraining) == [] and m.phase is Phase.JOINING
    assert [a.kind for a in of(acts, Note)] == ["joining"]
    assert m.next_deadline() == 1.0 + T.model
    # its model is served: nobody it does not know outranks the aggregator; it trains
    m.on_model(KEYS[0], model(5, KEYS[0], (KEYS[0],)), 2.0)
    acts = m.take_actions()
    assert of(acts, StartTraining) == [StartTraining(6, model(5, KEYS[0], ()).digest)]
    assert "taking_part" in [a.kind for a in of(acts, Note)]


def test_after_catching_up_a_node_sits_out_while_it_cannot_know_the_aggregator():
    joiner, seen, unseen = KEYS[3], KEYS[0], KEYS[1]
    contributors = (KEYS[0], KEYS[1], KEYS[2])
    r = a_round_where(unseen, list(contributors))  # an unseen contributor wins round r
    m = machine(joiner, rounds=r + 2, quorum=2)
    m.peer_up(seen, 0.0, round=r - 1)
    m.peer_up(KEYS[2], 0.0, round=r - 1)
    m.on_model(seen, model(r - 1, seen, contributors), 0.5)  # caught up before start
    m.start(1.0)
    acts = m.take_actions()
    assert m.phase is Phase.JOINING and of(acts, StartTraining) == []
    assert "not seen yet" in of(acts, Note)[-1].detail
    # it hears of the missing contributor, then round r's model comes: it takes part
    m.peer_up(unseen, 2.0, round=r - 1)
    m.on_model(seen, model(r, seen, contributors), 3.0)
    assert m.phase is Phase.TRAINING and of(m.take_actions(), StartTraining)


def test_a_node_that_sees_the_best_ranked_contributor_takes_part_at_once():
    joiner, contributors = KEYS[3], (KEYS[0], KEYS[1], KEYS[2])
    r = a_round_where(KEYS[0], list(contributors))
    m = machine(joiner, rounds=r + 2, quorum=2)
    m.peer_up(KEYS[0], 0.0, round=r - 1)  # only the winner of round r is known
    m.peer_up(KEYS[2], 0.0, round=r - 1)
    m.on_model(KEYS[0], model(r - 1, KEYS[0], contributors), 0.5)
    m.start(1.0)
    assert m.phase is Phase.TRAINING and m.elect() == KEYS[0]


def test_contributors_seen_leaving_do_not_make_a_node_sit_out():
    me, gone = KEYS[0], KEYS[1]
    contributors = (KEYS[0], KEYS[1], KEYS[2])
    r = a_round_where(gone, list(contributors))
    m = machine(me, rounds=r + 2, quorum=2, completed=r - 2, model_digest=b"\x01" * 32)
    for k in contributors[1:]:
        m.peer_up(k, 0.0, round=r - 2)
    m.start(0.0)
    m.peer_down(gone, 0.5)
    m.peer_up(KEYS[3], 0.6, round=r - 2)
    m.on_model(KEYS[2], model(r - 1, KEYS[2], contributors), 1.0)
    assert m.phase is Phase.TRAINING and m.elect() == ranking(FED, r, [me, KEYS[2]])[0]


def test_a_node_alone_does_not_sit_out_for_contributors_it_has_not_seen():
    # a restarted node whose partner is gone for good: nobody can wait for it
    me, gone = KEYS[0], KEYS[1]
    r = a_round_where(gone, [me, gone])
    m = machine(me, rounds=r + 2)
    m.resume(r - 1, b"\x01" * 32, gone, (me, gone))
    m.start(0.0)
    assert m.phase is Phase.TRAINING and m.elect() == me


def test_sitting_out_ends_at_the_model_deadline():
    m = machine(KEYS[3], rounds=10, wait_peers=1)
    m.start(0.0)
    m.peer_up(KEYS[0], 1.0, round=5)
    m.take_actions()
    m.tick(1.0 + T.model)
    acts = m.take_actions()
    assert "join_timeout" in [a.kind for a in of(acts, Note)]
    assert of(acts, StartTraining) and m.phase is Phase.TRAINING


def test_when_everyone_sits_out_they_take_part():
    me, others = KEYS[0], KEYS[1:4]
    contributors = (KEYS[4], *KEYS[:4])
    r = a_round_where(KEYS[4], list(contributors))  # a contributor nobody sees wins
    m = machine(me, rounds=r + 2, quorum=2, completed=r - 2, model_digest=b"\x01" * 32)
    for k in others:
        m.peer_up(k, 0.0, round=r - 2)
    m.on_model(others[0], model(r - 1, others[0], contributors), 0.5)
    m.start(1.0)
    assert m.phase is Phase.JOINING
    m.peer_status(others[0], 1.5, round=r - 1, state="joining")
    assert m.phase is Phase.JOINING  # two others still hold the round without us
    m.peer_status(others[1], 1.6, round=r - 1, state="joining")
    assert m.phase is Phase.TRAINING  # one is not a quorum: sitting out would stall


def test_resume_restores_the_contributors():
    m = machine(KEYS[0], rounds=5)
    m.resume(2, b"\x02" * 32, KEYS[1], (KEYS[1], KEYS[2]))
    assert m.contributors == {KEYS[1], KEYS[2]}


def _update(sender: bytes, r: int = 1):
    from protocol.messages import Update

    return Update(round=r, attempt=0, base=b"\x00" * 32, num_examples=10, loss=0.5,
                  train_seconds=1.0, weights=weights(2.0))


def test_one_member_claiming_a_far_round_cannot_make_the_others_sit_out():
    # quorum 3: a catch-up needs two members' word, and so does sitting a round out
    m = machine(KEYS[0], rounds=100, quorum=3)
    for k in KEYS[1:4]:
        m.peer_up(k, 0.0, round=0)
    m.start(0.0)
    m.take_actions()
    assert m.phase is Phase.TRAINING
    m.peer_up(KEYS[1], 1.0, round=90, state="training")  # a liar (or the only one ahead)
    m.on_model(KEYS[2], model(1, KEYS[2], (KEYS[0], KEYS[2], KEYS[3])), 2.0)
    assert m.current == 2 and m.phase is Phase.TRAINING  # it takes part in round 2
    m.peer_up(KEYS[3], 3.0, round=90, state="training")  # a second member's word
    m.on_model(KEYS[2], model(2, KEYS[2], (KEYS[0], KEYS[2], KEYS[3])), 4.0)
    assert m.current == 3 and m.phase is Phase.JOINING
