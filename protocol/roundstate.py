"""The state of a round machine, how it is restored and reconfigured, and its views.

``protocol.rounds.RoundMachine`` derives from ``RoundState`` and adds how it reacts to
what happens; this part holds the fields, checks the values a node restores or changes at
run time, and answers questions about them (``current``, ``participants()``...).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace

from .actions import Action, Note
from .deadlines import Deadlines, RoundTimeouts
from .election import ranking
from .identity import PUBLIC_KEY_LEN
from .messages import Delta, Share, Update
from .phases import Phase, check_transition
from .tensors import Tensor, weights_digest

#: Peer states (reported in heartbeats) in which a member does not take part in rounds:
#: paused, finished, or sitting out the round while it joins (docs/protocol.md 9.2).
NON_PARTICIPATING = frozenset({"stopped", "done", "joining"})
#: Peer states of members that have left the run (a quorum does not count them).
_LEFT = frozenset({"stopped", "done"})
#: Peer states in which an aggregator publishes nothing in the round: those, and offline.
NOT_PUBLISHING = NON_PARTICIPATING | {"offline"}

#: Length of a model digest (SHA-256, ``weights_digest``).
DIGEST_LEN = 32

_DEFAULT_TIMEOUTS = RoundTimeouts()


@dataclass(frozen=True)
class PeerView:
    """What this node knows of a live member: its last completed round and its state
    (frozen: the machine replaces a view when it learns more)."""

    round: int = 0
    state: str = "unknown"


#: A model's tensors as the federation agreed on them: (name, dtype, shape) each.
Spec = list[tuple[str, str, tuple[int, ...]]]


class RoundState:
    """The state of a ``RoundMachine``: built by the constructor, changed only by its
    methods (those here restore a checkpoint or reconfigure it; ``_enter`` changes the
    phase), and read by anyone through the views.

    Every field lives in a private attribute; outside code reads it through a read-only
    property of the same name without the underscore (assigning one raises AttributeError,
    and mypy flags it). Containers are typed as read-only views (``Mapping``, ``Set``,
    ``Sequence``) of the machine's own; ``PeerView`` is frozen and ``spec`` a copy."""

    def __init__(
        self,
        *,
        self_key: bytes,
        federation: str,
        rounds_total: int,
        genesis: list[Tensor],
        wait_peers: int = 0,
        quorum: int = 1,
        timeouts: RoundTimeouts = _DEFAULT_TIMEOUTS,
        completed: int = 0,
        model_digest: bytes | None = None,
    ) -> None:
        if rounds_total < 1:
            raise ValueError("rounds_total must be >= 1")
        _check_quorum(quorum)
        _check_timeouts(timeouts)
        self._self_key = self_key
        self._federation = federation
        self._rounds_total = rounds_total
        self._wait_peers = wait_peers
        self._quorum = quorum
        self._timeouts = timeouts
        self._deadlines = Deadlines(timeouts)
        self._spec: Spec = [(t.name, t.dtype, t.shape) for t in genesis]
        self._genesis_digest = weights_digest(genesis)
        self._completed = completed
        self._model_digest = model_digest or self._genesis_digest
        self._phase = Phase.WAITING_START
        self._peers: dict[bytes, PeerView] = {}
        self._outbox: list[Action] = []
        self._aggregator: bytes | None = None
        self._last_aggregator: bytes | None = None
        #: The contributors of the global model we hold (None: unknown, or genesis): the
        #: candidates for aggregator of the next round (``elect``).
        self._contributors: frozenset[bytes] | None = None
        #: Every key that has been a member (pruned to the contributors at each commit):
        #: a contributor never seen is unknown, one seen leaving is not.
        self._seen: set[bytes] = set()
        #: The members taking part when we started the current round: only they can be
        #: participants of it (a member that arrives later is not waited for).
        self._round_members: frozenset[bytes] = frozenset()
        self._excluded: set[bytes] = set()
        self._my_update: Update | None = None
        self._updates: dict[int, dict[bytes, Update | Delta]] = {}
        self._deadline: float | None = None
        #: Offline: the digest of the averaged model we hold (None: the global one), the
        #: peers' latest shares for the current round, and offline steps done in all.
        self._local_digest: bytes | None = None
        self._shares: dict[bytes, Share] = {}
        self._offline_steps = 0
        self._step = 0
        self._collect_started: dict[int, float] = {}
        self._started = False
        self._paused = False

    # -- restoring and reconfiguring ------------------------------------------------

    def resume(self, completed: int, model_digest: bytes, aggregator: bytes | None,
               contributors: Iterable[bytes] | None = None) -> None:
        """Restore the last global model from a checkpoint, before ``start``: ``completed``
        rounds are done, the model of the last one has ``model_digest``, was published
        by ``aggregator`` and aggregated the updates of ``contributors`` (None: unknown).
        Call it before ``resume_offline`` (that model is trained from this one).
        ValueError for an impossible checkpoint."""
        self._check_not_started("resume")
        if self._local_digest is not None:
            raise RuntimeError("resume: call it before resume_offline")
        if (not isinstance(completed, int) or isinstance(completed, bool)
                or not 0 <= completed <= self.rounds_total):
            raise ValueError(f"resume: completed must be a round in 0..{self.rounds_total},"
                             f" not {completed!r}")
        _check_bytes("resume: model_digest", model_digest, DIGEST_LEN)
        if aggregator is not None:
            _check_bytes("resume: aggregator", aggregator, PUBLIC_KEY_LEN)
        if completed == 0 and (model_digest != self.genesis_digest or aggregator is not None):
            raise ValueError("resume: round 0 is the genesis model, published by nobody")
        keys = None if contributors is None else frozenset(contributors)
        for key in keys or ():
            _check_bytes("resume: contributor", key, PUBLIC_KEY_LEN)
        self._completed = completed
        self._model_digest = model_digest
        self._last_aggregator = aggregator
        self._contributors = keys

    def resume_offline(self, local_digest: bytes, steps: int) -> None:
        """Restore our offline model from a checkpoint, before ``start`` (and after
        ``resume``): the average we held (``local_digest``) after ``steps`` offline steps.
        ValueError for an impossible checkpoint."""
        self._check_not_started("resume_offline")
        _check_bytes("resume_offline: local_digest", local_digest, DIGEST_LEN)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"resume_offline: steps must be an int >= 1, not {steps!r}")
        self._local_digest = local_digest
        self._offline_steps = steps

    def set_timeouts(self, timeouts: RoundTimeouts) -> None:
        """Use ``timeouts`` from now on (a deadline already armed is kept; the next ones
        and the adaptive collect deadline follow the new values). TypeError unless it is
        a RoundTimeouts, ValueError unless every value is finite, ``start`` >= 0 and the
        others > 0."""
        _check_timeouts(timeouts)
        self._timeouts = timeouts
        self._deadlines.timeouts = timeouts

    def set_quorum(self, quorum: int) -> None:
        """Need ``quorum`` participating members (this node included) for an elected round
        from now on. ValueError unless it is an int >= 1."""
        _check_quorum(quorum)
        self._quorum = quorum

    def _check_not_started(self, what: str) -> None:
        if self._started:
            raise RuntimeError(f"{what}: only before start()")

    # -- views ------------------------------------------------------------------------

    @property
    def self_key(self) -> bytes:
        """This node's public key."""
        return self._self_key

    @property
    def federation(self) -> str:
        """The federation's name (it salts the election)."""
        return self._federation

    @property
    def rounds_total(self) -> int:
        """How many rounds the run has."""
        return self._rounds_total

    @property
    def quorum(self) -> int:
        """Participating members (this node included) an elected round needs
        (``set_quorum`` changes it)."""
        return self._quorum

    @property
    def timeouts(self) -> RoundTimeouts:
        """The configured deadlines (``set_timeouts`` changes them)."""
        return self._timeouts

    @property
    def deadlines(self) -> Deadlines:
        """The adaptive collect deadline, fitted to the lateness of updates."""
        return self._deadlines

    @property
    def genesis_digest(self) -> bytes:
        """The digest of the genesis model (round 0)."""
        return self._genesis_digest

    @property
    def completed(self) -> int:
        """The last round whose global model we applied (0: none yet)."""
        return self._completed

    @property
    def model_digest(self) -> bytes:
        """The digest of the last global model we applied."""
        return self._model_digest

    @property
    def last_aggregator(self) -> bytes | None:
        """Who published the last global model we applied (None: genesis)."""
        return self._last_aggregator

    @property
    def contributors(self) -> AbstractSet[bytes] | None:
        """Whose updates the last global model we applied aggregated (None: unknown, or
        genesis; read-only)."""
        return self._contributors

    @property
    def local_digest(self) -> bytes | None:
        """Offline: the digest of the averaged model we hold (None: the global one)."""
        return self._local_digest

    @property
    def offline_steps(self) -> int:
        """Offline steps done in all."""
        return self._offline_steps

    @property
    def aggregator(self) -> bytes | None:
        """The aggregator we elected for the current round (None: not yet)."""
        return self._aggregator

    @property
    def my_update(self) -> Update | None:
        """Our update of the current round, once trained."""
        return self._my_update

    @property
    def spec(self) -> Spec:
        """The federation's tensors (name, dtype, shape), in order (a copy)."""
        return list(self._spec)

    @property
    def peers(self) -> Mapping[bytes, PeerView]:
        """Live members but this node, with what we know of each (read-only)."""
        return self._peers

    @property
    def excluded(self) -> AbstractSet[bytes]:
        """Aggregators that failed in the current round (read-only)."""
        return self._excluded

    @property
    def updates(self) -> Mapping[int, Mapping[bytes, Update | Delta]]:
        """The updates received (ours included), by round then sender (read-only)."""
        return self._updates

    @property
    def outbox(self) -> Sequence[Action]:
        """The actions not yet taken (``take_actions`` drains them; read-only)."""
        return self._outbox

    @property
    def phase(self) -> Phase:
        """Where this node stands in the current round (read-only: see ``_enter``)."""
        return self._phase

    @property
    def current(self) -> int:
        """The round being worked on (one above the last completed round)."""
        return self.completed + 1

    @property
    def attempt(self) -> int:
        """How many aggregators have failed in the current round."""
        return len(self.excluded)

    @property
    def base_digest(self) -> bytes:
        """The digest of the model we train from: the offline average if we hold one."""
        return self.local_digest or self.model_digest

    @property
    def offline(self) -> bool:
        """True while this node is below quorum, training and averaging on its own."""
        return self.phase is Phase.OFFLINE

    def members(self) -> set[bytes]:
        """Live members including this node."""
        return {self.self_key, *self.peers}

    def live(self) -> set[bytes]:
        """Members that have not left the run (not ``stopped`` or ``done`` by their last
        report), and this node unless it is paused: a quorum counts these, a member
        sitting a round out included (it is on our side of any partition)."""
        out = {k for k, v in self.peers.items() if v.state not in _LEFT}
        if not self._paused:
            out.add(self.self_key)
        return out

    def taking_part(self) -> set[bytes]:
        """Live members that take part in rounds: not sitting the round out either
        (``joining``)."""
        return {k for k in self.live()
                if k == self.self_key or self.peers[k].state not in NON_PARTICIPATING}

    def participants(self) -> set[bytes]:
        """The members expected to send an update this round (an aggregator waits for
        them): those that took part when we started the round and still do, and hold its
        base model, because they contributed to it or have completed its round (by their
        reports, or because they were in that round when it ended here). A member that
        arrives or catches up later is not waited for (its update counts if it comes in
        time): docs/protocol.md 9.1."""
        base = self.current - 1
        known = self._contributors or frozenset()
        return {k for k in self.taking_part() if k == self.self_key
                or k in self._round_members and (k in known or self.peers[k].round >= base)}

    def has_quorum(self) -> bool:
        """Whether enough members are live for an elected round."""
        return len(self.live()) >= self.quorum

    def elect(self) -> bytes | None:
        """The aggregator of the current round in this node's view: the best-ranked
        contributor of the model we hold that takes part and is not excluded; if there
        is none (round 1, or all of them failed), the best-ranked participant not
        excluded. Every member holds the same model, so members that see each other
        agree even while their views of newcomers differ (docs/protocol.md 9.4)."""
        known = self._contributors or frozenset()
        first = {k for k in self.taking_part() if k in known and k not in self.excluded}
        candidates = first or {k for k in self.participants() if k not in self.excluded}
        ranked = ranking(self.federation, self.current, candidates)
        return ranked[0] if ranked else None

    def behind(self) -> bool:
        """Whether members report having completed the round we would work on: its model
        exists, so training that round is moot; we wait for it (catch-up). It takes as
        many reports as a catch-up model needs (a quorum of the others, at most as many as
        there are: node/peers/checks.py), so one member claiming a far round in its
        heartbeats cannot make the others sit rounds out (issue 12)."""
        reached = sum(1 for v in self.peers.values() if v.round >= self.current)
        needed = min(max(self.quorum - 1, 1), len(self.peers))
        return needed > 0 and reached >= needed

    def unseen_contributor_first(self) -> bool:
        """Whether a contributor of the model we hold that we have never seen as a member
        outranks, for the current round, every contributor we see taking part: then we
        cannot know whom the others elect (a node that just joined has not heard of
        every member yet). Contributors we saw leave do not count."""
        known = self._contributors or frozenset()
        unseen = known - self._seen - {self.self_key}
        if not unseen:
            return False
        ranked = ranking(self.federation, self.current, unseen | (known & self.taking_part()))
        return ranked[0] in unseen

    def next_deadline(self) -> float | None:
        """When ``tick`` must next be called (None: no timer)."""
        return self._deadline

    def take_actions(self) -> list[Action]:
        """Drain the outbox."""
        out, self._outbox = self._outbox, []
        return out

    # -- for the machine --------------------------------------------------------------

    def _enter(self, phase: Phase) -> None:
        """Move to ``phase``: the only way the phase changes. IllegalTransition unless
        ``protocol.phases.TRANSITIONS`` allows it from the current phase (a bug here)."""
        check_transition(self._phase, phase)
        self._phase = phase

    def _note(self, kind: str, detail: str) -> None:
        self._outbox.append(Note(kind, detail))

    def _saw_round(self, key: bytes, round_number: int) -> None:
        """Member ``key`` (if live) has completed at least ``round_number``."""
        view = self._peers.get(key)
        if view is not None and view.round < round_number:
            self._peers[key] = replace(view, round=round_number)


def _check_quorum(quorum: int) -> None:
    if not isinstance(quorum, int) or isinstance(quorum, bool) or quorum < 1:
        raise ValueError(f"quorum must be an int >= 1, not {quorum!r}")


def _check_timeouts(timeouts: RoundTimeouts) -> None:
    if not isinstance(timeouts, RoundTimeouts):
        raise TypeError(f"timeouts must be RoundTimeouts, not {type(timeouts).__name__}")
    for name in ("collect", "model", "start", "floor"):
        value = getattr(timeouts, name)
        least = ">= 0" if name == "start" else "> 0"
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and math.isfinite(value)
                and (value >= 0 if name == "start" else value > 0)):
            raise ValueError(f"timeouts.{name} must be a finite number {least}, not {value!r}")


def _check_bytes(what: str, value: bytes, length: int) -> None:
    if not isinstance(value, bytes) or len(value) != length:
        raise ValueError(f"{what} must be {length} bytes, not {value!r:.80}")
