"""The round machine's phase table (protocol.phases) and the methods a node uses to restore
or reconfigure a machine (resume, resume_offline, set_timeouts, set_quorum)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from protocol.election import ranking
from protocol.errors import ProtocolError
from protocol.rounds import (
    TRANSITIONS,
    IllegalTransition,
    Phase,
    RoundTimeouts,
    SendUpdate,
    StartTraining,
)

from .test_rounds import GENESIS_DIGEST, KEYS, T, machine
from .wire import FED, weights

DIGEST = b"\x07" * 32


def trained(m, now: float) -> None:
    m.training_done(m.current, weights(1.0), 10, 0.5, 1.0, now)


def aggregator_with_a_peer():
    """A machine elected aggregator of round 1, with one peer, training."""
    first, other = ranking(FED, 1, KEYS[:2])
    m = machine(first)
    m.peer_up(other, 0.0)
    m.start(0.0)
    return m


# ---- the table --------------------------------------------------------------------------


def test_the_table_covers_every_phase_and_leads_only_to_phases():
    assert set(TRANSITIONS) == set(Phase)
    for targets in TRANSITIONS.values():
        assert isinstance(targets, frozenset)
        assert all(isinstance(t, Phase) for t in targets)


def test_the_table_stays_in_a_phase_only_where_the_machine_does():
    loops = {p for p in Phase if p in TRANSITIONS[p]}
    assert loops == {Phase.WAITING_START, Phase.TRAINING, Phase.WAITING_MODEL, Phase.OFFLINE,
                     Phase.STOPPED, Phase.JOINING}
    assert TRANSITIONS[Phase.DONE] == frozenset()


@pytest.mark.parametrize("source", list(Phase))
def test_enter_allows_exactly_the_moves_in_the_table(source):
    for target in Phase:
        m = machine(KEYS[0])
        m._phase = source  # set up the source phase: only the test reaches in like this
        if target in TRANSITIONS[source]:
            m._enter(target)
            assert m.phase is target
        else:
            with pytest.raises(IllegalTransition) as err:
                m._enter(target)
            assert (err.value.source, err.value.target) == (source, target)
            assert m.phase is source  # refused moves leave the phase alone


def test_an_illegal_transition_is_a_bug_not_remote_garbage():
    assert issubclass(IllegalTransition, RuntimeError)
    assert not issubclass(IllegalTransition, ProtocolError)
    m = machine(KEYS[0])
    with pytest.raises(IllegalTransition, match="WAITING_START -> AGGREGATING"):
        m._enter(Phase.AGGREGATING)  # aggregating without having collected anything


def test_a_training_machine_cannot_skip_collecting():
    m = machine(KEYS[0])
    m.start(0.0)
    assert m.phase is Phase.TRAINING
    with pytest.raises(IllegalTransition):
        m._enter(Phase.AGGREGATING)
    assert m.phase is Phase.TRAINING


def test_starting_a_running_machine_again_is_caught():
    # Two peers make wait_peers; one goes, and a second start() would send the machine
    # from TRAINING back to WAITING_START, a move no round makes.
    m = machine(KEYS[0], wait_peers=2)
    m.peer_up(KEYS[1], 0.0)
    m.peer_up(KEYS[2], 0.0)
    m.start(0.0)
    assert m.phase is Phase.TRAINING
    m.peer_down(KEYS[2], 1.0)
    with pytest.raises(IllegalTransition, match="TRAINING -> WAITING_START"):
        m.start(2.0)


def test_a_finished_machine_cannot_be_started_again():
    m = machine(KEYS[0], rounds=3, completed=3, model_digest=DIGEST)
    m.start(0.0)
    assert m.phase is Phase.DONE
    with pytest.raises(IllegalTransition, match="DONE -> DONE"):
        m.start(1.0)


def test_pause_and_start_make_the_moves_the_table_lists_for_them():
    # Moves no simulation makes (a pause in the middle of a round, a start after one).
    m = aggregator_with_a_peer()
    trained(m, 1.0)
    assert m.phase is Phase.COLLECTING
    m.pause(2.0)
    assert m.phase is Phase.STOPPED
    m.start(3.0)
    assert m.phase is Phase.TRAINING

    waiting = machine(KEYS[0], wait_peers=2)
    waiting.pause(0.0)  # stopped before it started
    waiting.start(1.0)
    assert waiting.phase is Phase.WAITING_START and waiting.next_deadline() == 1.0 + T.start

    alone = machine(KEYS[0], quorum=2)
    alone.start(0.0)
    assert alone.phase is Phase.OFFLINE
    alone.pause(1.0)
    alone.start(2.0)
    assert alone.phase is Phase.OFFLINE

    finished = machine(KEYS[0], rounds=3, completed=3, model_digest=DIGEST)
    finished.pause(0.0)
    finished.start(1.0)
    assert finished.phase is Phase.DONE


def test_the_phase_cannot_be_assigned_from_outside():
    m = machine(KEYS[0])
    with pytest.raises(AttributeError):
        m.phase = Phase.DONE  # type: ignore[misc]
    assert m.phase is Phase.WAITING_START


# ---- fields: set only by the constructor and the machine's methods ----------------------

#: Every field of the machine that outside code reads: each is a read-only property.
FIELDS = ["phase", "self_key", "federation", "rounds_total", "quorum", "timeouts", "deadlines",
          "spec", "genesis_digest", "completed", "model_digest", "last_aggregator",
          "local_digest", "offline_steps", "aggregator", "excluded", "my_update", "updates",
          "peers", "outbox", "contributors"]


def running_machine():
    """A machine part-way into round 1 (a peer, an update of its own, a deadline)."""
    m = aggregator_with_a_peer()
    trained(m, 1.0)
    assert m.phase is Phase.COLLECTING and m.my_update is not None
    return m


@pytest.mark.parametrize("name", FIELDS)
def test_no_field_can_be_assigned_from_outside(name):
    m = running_machine()
    before = getattr(m, name)
    with pytest.raises(AttributeError):
        setattr(m, name, before)
    with pytest.raises(AttributeError):
        delattr(m, name)
    assert getattr(m, name) == before


def test_assigning_the_rounds_done_raises():
    m = machine(KEYS[0])
    with pytest.raises(AttributeError):
        m.completed = 3  # type: ignore[misc]
    assert (m.completed, m.current) == (0, 1)


def test_the_machine_has_no_public_attribute_left_and_every_property_is_listed():
    m = running_machine()
    assert [k for k in vars(m) if not k.startswith("_")] == []
    props = {k for c in type(m).__mro__ for k, v in vars(c).items()
             if isinstance(v, property) and not k.startswith("_")}
    # the others are derived from the fields: current, attempt, base_digest, offline
    assert props - set(FIELDS) == {"current", "attempt", "base_digest", "offline"}
    assert set(FIELDS) <= props


def test_peer_views_are_replaced_not_changed_in_place():
    m = running_machine()
    [peer] = m.peers
    with pytest.raises(AttributeError):
        m.peers[peer].round = 5  # type: ignore[misc]
    m.peer_status(peer, 2.0, round=0, state="training")
    assert (m.peers[peer].round, m.peers[peer].state) == (0, "training")


def test_the_spec_is_a_copy():
    m = machine(KEYS[0])
    m.spec.clear()
    assert m.spec != []


# ---- resume -----------------------------------------------------------------------------


def test_resume_restores_the_last_global_model():
    m = machine(KEYS[0])
    m.resume(3, DIGEST, KEYS[1])
    assert (m.completed, m.model_digest, m.last_aggregator) == (3, DIGEST, KEYS[1])
    assert m.current == 4
    m.start(0.0)
    assert StartTraining(4, DIGEST) in m.take_actions()


def test_resume_after_start_is_refused():
    m = machine(KEYS[0])
    m.start(0.0)
    with pytest.raises(RuntimeError, match="before start"):
        m.resume(3, DIGEST, KEYS[1])
    assert (m.completed, m.model_digest, m.last_aggregator) == (0, GENESIS_DIGEST, None)


@pytest.mark.parametrize("completed, digest, aggregator", [
    (6, DIGEST, KEYS[1]),            # beyond the run's 5 rounds
    (-1, DIGEST, KEYS[1]),
    (True, DIGEST, KEYS[1]),         # a bool is no round number
    (2, DIGEST[:31], KEYS[1]),       # a digest is 32 bytes
    (2, DIGEST.hex(), KEYS[1]),
    (2, DIGEST, KEYS[1][:16]),       # a key is 32 bytes
    (0, DIGEST, None),               # round 0 is the genesis model
    (0, GENESIS_DIGEST, KEYS[1]),    # which nobody published
])
def test_resume_refuses_an_impossible_checkpoint(completed, digest, aggregator):
    m = machine(KEYS[0])
    with pytest.raises(ValueError, match="resume"):
        m.resume(completed, digest, aggregator)
    assert (m.completed, m.model_digest, m.last_aggregator) == (0, GENESIS_DIGEST, None)


def test_resume_to_genesis_is_allowed():
    m = machine(KEYS[0])
    m.resume(0, GENESIS_DIGEST, None)
    assert (m.completed, m.model_digest) == (0, GENESIS_DIGEST)


# ---- resume_offline ---------------------------------------------------------------------


def test_resume_offline_restores_the_model_we_train_from():
    m = machine(KEYS[0])
    m.resume(2, DIGEST, KEYS[1])
    m.resume_offline(b"\x09" * 32, 4)
    assert (m.local_digest, m.offline_steps, m.base_digest) == (b"\x09" * 32, 4, b"\x09" * 32)
    m.start(0.0)
    assert StartTraining(3, b"\x09" * 32) in m.take_actions()


def test_resume_offline_is_refused_after_start_or_with_bad_values():
    m = machine(KEYS[0])
    for digest, steps in [(b"\x09" * 31, 1), (b"\x09" * 32, 0), (b"\x09" * 32, 1.0)]:
        with pytest.raises(ValueError, match="resume_offline"):
            m.resume_offline(digest, steps)
    assert (m.local_digest, m.offline_steps) == (None, 0)
    m.start(0.0)
    with pytest.raises(RuntimeError, match="before start"):
        m.resume_offline(b"\x09" * 32, 1)
    assert (m.local_digest, m.offline_steps) == (None, 0)


def test_resume_after_resume_offline_is_refused():
    m = machine(KEYS[0])
    m.resume_offline(b"\x09" * 32, 1)
    with pytest.raises(RuntimeError, match="before resume_offline"):
        m.resume(2, DIGEST, KEYS[1])
    assert m.completed == 0


# ---- set_timeouts -----------------------------------------------------------------------


def test_set_timeouts_changes_the_collect_deadline():
    m = aggregator_with_a_peer()
    m.set_timeouts(replace(T, collect=7.0))
    assert m.timeouts.collect == 7.0 and m.deadlines.timeouts.collect == 7.0
    trained(m, 100.0)
    assert m.phase is Phase.COLLECTING
    assert m.next_deadline() == 107.0  # not T.collect (10 s)


def test_set_timeouts_changes_the_model_deadline():
    first, other = ranking(FED, 1, KEYS[:2])
    m = machine(other)
    m.peer_up(first, 0.0)
    m.start(0.0)
    m.set_timeouts(replace(T, model=33.0))
    trained(m, 100.0)
    assert any(isinstance(a, SendUpdate) for a in m.take_actions())
    assert m.next_deadline() == 133.0


@pytest.mark.parametrize("changes", [
    {"collect": 0.0}, {"collect": -1.0}, {"model": float("inf")}, {"floor": float("nan")},
    {"start": -0.5}, {"model": "90"}, {"collect": True},
])
def test_set_timeouts_refuses_bad_values(changes):
    m = machine(KEYS[0])
    with pytest.raises(ValueError, match="timeouts"):
        m.set_timeouts(replace(T, **changes))
    assert m.timeouts == T and m.deadlines.timeouts == T


def test_set_timeouts_takes_only_round_timeouts_and_a_zero_start():
    m = machine(KEYS[0])
    with pytest.raises(TypeError):
        m.set_timeouts({"collect": 5.0})  # type: ignore[arg-type]
    m.set_timeouts(RoundTimeouts(start=0.0))  # no wait for peers is a valid choice
    assert m.timeouts.start == 0.0


# ---- set_quorum -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -2, True, 2.0, "3", None])
def test_set_quorum_refuses_anything_but_a_positive_int(bad):
    m = machine(KEYS[0])
    with pytest.raises(ValueError, match="quorum"):
        m.set_quorum(bad)
    assert m.quorum == 1


def test_set_quorum_applies_to_the_next_round():
    m = machine(KEYS[0])
    m.peer_up(KEYS[1], 0.0)
    assert m.has_quorum()
    m.set_quorum(3)
    assert m.quorum == 3 and not m.has_quorum()
    m.start(0.0)
    assert m.phase is Phase.OFFLINE  # two members of three needed: offline steps
    m.set_quorum(2)
    assert m.has_quorum()
