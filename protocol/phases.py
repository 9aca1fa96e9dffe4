"""The phases of a round and the only moves between them (``RoundMachine`` checks each).

``TRANSITIONS`` maps each phase to the phases a node may enter from it; every phase change
of ``protocol.rounds.RoundMachine`` goes through its ``_enter``, which checks this table
and raises ``IllegalTransition`` for any other move. The table is what the machine really
does (a move it lacks is a bug in the machine, not something a peer can cause)::

                          our update sent to the elected aggregator
     WAITING_START --> TRAINING ------------------------> WAITING_MODEL <-+
          |              |   |  we are elected              |  ^   |      | it failed:
          |              |   +-----------> COLLECTING <-----+  |   +------+ another one
          |              |                  |     |            | we step down
          |              |                  |     +------------+
          |              |                  v                  |
          |              |             AGGREGATING ------------+
          v              v
       OFFLINE <---- (below quorum, from any of the elected-round phases)
          |  ^
          +--+ the next offline step; quorum again: TRAINING

  A commit (the aggregator's model, ours, or a catch-up) from any phase but STOPPED and
  DONE starts the next round: TRAINING, JOINING, OFFLINE, or DONE after the last round.
  JOINING sits a round out instead of TRAINING wherever a round starts with a quorum: a
  member has completed that round already, or we caught up and do not yet see every
  contributor of our model; the round's model (or the model deadline) ends it.
  pause(): any phase but DONE -> STOPPED; start(): STOPPED -> WAITING_START, JOINING,
  TRAINING, OFFLINE or DONE. DONE is final.

The self-loops are exactly those the machine makes: ``start()`` on a fresh machine arms
the start deadline (WAITING_START), a model committed while training starts the next
round (TRAINING), a failed aggregator is replaced by another peer (WAITING_MODEL), each
offline step (OFFLINE), a model that leaves us sitting out the next round too (JOINING),
and a pause or a commit while paused (STOPPED). An aggregator never re-enters COLLECTING
in a round: it steps down by excluding itself, or commits.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType


class Phase(enum.Enum):
    """Where a node stands in the current round."""

    WAITING_START = "waiting"
    JOINING = "joining"
    TRAINING = "training"
    WAITING_MODEL = "waiting_model"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    OFFLINE = "offline"
    STOPPED = "stopped"
    DONE = "done"


class IllegalTransition(RuntimeError):
    """The round machine tried a phase change its table forbids: a bug in the machine.

    Deliberately not a ``ProtocolError``: transports catch those (garbage from a peer) and
    drop the peer, and must never swallow this."""

    def __init__(self, source: Phase, target: Phase) -> None:
        super().__init__(f"illegal round phase change {source.name} -> {target.name}")
        self.source = source
        self.target = target


_P = Phase

#: Phase -> the phases a node may enter from it (itself included only where listed).
TRANSITIONS: Mapping[Phase, frozenset[Phase]] = MappingProxyType({
    # start() (loop), peer_up / start deadline (begin round 1), pause, resumed at the end.
    _P.WAITING_START: frozenset({_P.WAITING_START, _P.JOINING, _P.TRAINING, _P.OFFLINE,
                                 _P.STOPPED, _P.DONE}),
    # Sitting a round out (behind, or caught up without seeing the model's contributors):
    # its model starts the next round, sitting out again (loop) or taking part; or the
    # model deadline passes and we take part anyway.
    _P.JOINING: frozenset({_P.JOINING, _P.TRAINING, _P.OFFLINE, _P.STOPPED, _P.DONE}),
    # Our update goes to an aggregator (maybe us), or becomes an offline step; a commit
    # starts the next round (loop) or ends the run.
    _P.TRAINING: frozenset({_P.TRAINING, _P.JOINING, _P.COLLECTING, _P.WAITING_MODEL,
                            _P.OFFLINE, _P.STOPPED, _P.DONE}),
    # The aggregator failed: re-elect another (loop) or ourselves; or commit its model.
    _P.WAITING_MODEL: frozenset({_P.WAITING_MODEL, _P.COLLECTING, _P.TRAINING, _P.JOINING,
                                 _P.OFFLINE, _P.STOPPED, _P.DONE}),
    # Aggregate, or step down (to another aggregator, or offline), or commit another's.
    _P.COLLECTING: frozenset({_P.AGGREGATING, _P.WAITING_MODEL, _P.TRAINING, _P.JOINING,
                              _P.OFFLINE, _P.STOPPED, _P.DONE}),
    # Publish and commit, or step down / lose quorum.
    _P.AGGREGATING: frozenset({_P.WAITING_MODEL, _P.TRAINING, _P.JOINING, _P.OFFLINE,
                               _P.STOPPED, _P.DONE}),
    # The next offline step (loop), quorum again, a commit (catch-up).
    _P.OFFLINE: frozenset({_P.OFFLINE, _P.TRAINING, _P.JOINING, _P.STOPPED, _P.DONE}),
    # start() resumes; pause() again or a commit while paused stays (loop).
    _P.STOPPED: frozenset({_P.STOPPED, _P.WAITING_START, _P.JOINING, _P.TRAINING,
                           _P.OFFLINE, _P.DONE}),
    _P.DONE: frozenset(),
})


def check_transition(source: Phase, target: Phase) -> None:
    """IllegalTransition unless ``TRANSITIONS`` lets a node go from ``source`` to
    ``target``."""
    if target not in TRANSITIONS[source]:
        raise IllegalTransition(source, target)
