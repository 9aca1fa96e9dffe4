"""The round state machine: training rounds under an elected aggregator, without I/O.

One ``RoundMachine`` per node. It is fed with what happens (peers coming and going,
decoded messages, the end of local training or aggregation, the clock) and answers with
actions in ``outbox`` for the node to carry out (train, send, aggregate, commit). It never
touches a socket, a thread or a clock of its own, so many machines can run in one process
against a fake clock (see node.sim).

Rules (docs/protocol.md, "Rounds" is the normative text):

* Round ``r`` starts from the global model of round ``r-1`` (round 0 is the genesis model,
  identical on every member because it is built from the shared seed).
* Each member trains locally, then sends its ``Update`` to the aggregator of ``r``: the
  highest-ranked live member (``election.ranking``) not excluded in this round.
* The aggregator collects updates from every live, participating member, or until the
  collect deadline, aggregates and publishes the ``Model`` of ``r``.
* A member waiting for the model excludes the aggregator when it goes down or when the
  model deadline passes, re-elects and re-sends its update to the new aggregator.
* A node applies at most one model per round, and only rounds above its own; a model for a
  later round lets a node that fell behind jump ahead (catch-up).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from .election import ranking
from .errors import ProtocolError
from .messages import Model, Update
from .tensors import Tensor, weights_digest

#: Peer states (reported in heartbeats) in which a member does not take part in rounds.
NON_PARTICIPATING = frozenset({"stopped", "done"})


class Phase(enum.Enum):
    """Where a node stands in the current round."""

    WAITING_START = "waiting"
    TRAINING = "training"
    WAITING_MODEL = "waiting_model"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    STOPPED = "stopped"
    DONE = "done"


@dataclass(frozen=True)
class RoundTimeouts:
    """Deadlines, in seconds.

    ``collect``: how long an aggregator waits for updates after its own is ready.
    ``model``: how long a member waits for the global model after sending its update.
    ``start``: how long a fresh node waits for ``min_peers`` before starting anyway.
    """

    collect: float = 60.0
    model: float = 90.0
    start: float = 60.0


# ---- actions (the outbox) -------------------------------------------------------------


@dataclass(frozen=True)
class StartTraining:
    """Train round ``round`` locally from the current global model."""

    round: int
    base: bytes


@dataclass(frozen=True)
class SendUpdate:
    """Send our update to ``to`` (the aggregator we elected)."""

    to: bytes
    update: Update = field(repr=False)


@dataclass(frozen=True)
class Aggregate:
    """Run the aggregation strategy over ``updates`` (sender key -> update)."""

    round: int
    attempt: int
    updates: dict[bytes, Update] = field(repr=False)


@dataclass(frozen=True)
class PublishModel:
    """Sign ``model`` as ours and send it to every member."""

    model: Model = field(repr=False)


@dataclass(frozen=True)
class Commit:
    """Apply ``model`` as the global model of ``model.round``."""

    model: Model = field(repr=False)
    source: bytes


@dataclass(frozen=True)
class Note:
    """Something worth logging or showing: ``kind`` is a short stable word."""

    kind: str
    detail: str


Action = StartTraining | SendUpdate | Aggregate | PublishModel | Commit | Note


# ---- the machine ----------------------------------------------------------------------


@dataclass
class _PeerView:
    round: int = 0
    state: str = "unknown"


class RoundMachine:
    """Rounds and aggregator election for one node (sans-IO)."""

    def __init__(
        self,
        *,
        self_key: bytes,
        federation: str,
        rounds_total: int,
        genesis: list[Tensor],
        min_peers: int = 0,
        timeouts: RoundTimeouts = RoundTimeouts(),
        completed: int = 0,
        model_digest: bytes | None = None,
    ) -> None:
        if rounds_total < 1:
            raise ValueError("rounds_total must be >= 1")
        self.self_key = self_key
        self.federation = federation
        self.rounds_total = rounds_total
        self.min_peers = min_peers
        self.timeouts = timeouts
        self.spec = [(t.name, t.dtype, t.shape) for t in genesis]
        self.genesis_digest = weights_digest(genesis)
        self.completed = completed
        self.model_digest = model_digest or self.genesis_digest
        self.phase = Phase.WAITING_START
        self.peers: dict[bytes, _PeerView] = {}
        self.outbox: list[Action] = []
        self.aggregator: bytes | None = None
        self.last_aggregator: bytes | None = None
        self.excluded: set[bytes] = set()
        self.my_update: Update | None = None
        self.updates: dict[int, dict[bytes, Update]] = {}
        self.deadline: float | None = None
        self._started = False
        self._paused = False

    # -- views ------------------------------------------------------------------------

    @property
    def current(self) -> int:
        """The round being worked on (one above the last completed round)."""
        return self.completed + 1

    @property
    def attempt(self) -> int:
        """How many aggregators have failed in the current round."""
        return len(self.excluded)

    def members(self) -> set[bytes]:
        """Live members including this node."""
        return {self.self_key, *self.peers}

    def participants(self) -> set[bytes]:
        """Live members expected to send an update this round."""
        out = {k for k, v in self.peers.items() if v.state not in NON_PARTICIPATING}
        if not self._paused:
            out.add(self.self_key)
        return out

    def elect(self) -> bytes | None:
        """The aggregator of the current round in this node's view."""
        candidates = {k for k in self.participants() if k not in self.excluded}
        ranked = ranking(self.federation, self.current, candidates)
        return ranked[0] if ranked else None

    def next_deadline(self) -> float | None:
        """When ``tick`` must next be called (None: no timer)."""
        return self.deadline

    def take_actions(self) -> list[Action]:
        """Drain the outbox."""
        out, self.outbox = self.outbox, []
        return out

    # -- inputs -----------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin taking part: wait for ``min_peers``, then train round 1 (or resume)."""
        self._started = True
        self._paused = False
        if self.completed >= self.rounds_total:
            self._finish()
            return
        if self.completed > 0 or len(self.peers) >= self.min_peers:
            self._begin_round(now)
        else:
            self.phase = Phase.WAITING_START
            self.deadline = now + self.timeouts.start
            self._note("waiting_for_peers", f"{len(self.peers)}/{self.min_peers} peers")

    def pause(self, now: float) -> None:
        """Stop taking part after the current step; state is kept (``start`` resumes)."""
        self._paused = True
        if self.phase not in (Phase.DONE,):
            self.phase = Phase.STOPPED
            self.deadline = None
            self.my_update = None

    def peer_up(self, key: bytes, now: float, *, round: int = 0, state: str = "unknown") -> None:
        """A member's link is up (after its handshake)."""
        self.peers[key] = _PeerView(round=round, state=state)
        if (self._started and self.phase is Phase.WAITING_START
                and len(self.peers) >= self.min_peers):
            self._begin_round(now)

    def peer_status(self, key: bytes, now: float, *, round: int, state: str) -> None:
        """A heartbeat from a member: its completed round and its state."""
        view = self.peers.get(key)
        if view is None:
            return
        view.round, view.state = round, state
        self._check_collect(now)

    def peer_down(self, key: bytes, now: float) -> None:
        """A member's link went down."""
        if self.peers.pop(key, None) is None:
            return
        if key == self.aggregator and self.phase is Phase.WAITING_MODEL:
            self._aggregator_failed(now, "went down")
        else:
            self._check_collect(now)

    def on_update(self, sender: bytes, update: Update, now: float) -> None:
        """An update from a member. Raises ProtocolError if it cannot be valid."""
        self.check_spec(update.weights, "update")
        if update.round < self.current or update.round > self.current + 1:
            self._note("update_ignored", f"round {update.round} while at {self.current}")
            return
        if update.round == self.current and update.base != self.model_digest:
            self._note("update_ignored", "trained from another base model")
            return
        self.updates.setdefault(update.round, {})[sender] = update
        view = self.peers.get(sender)
        if view is not None:
            view.round = max(view.round, update.round - 1)
        self._check_collect(now)

    def on_model(self, sender: bytes, model: Model, now: float) -> None:
        """A global model. Raises ProtocolError if it cannot be valid."""
        if model.aggregator != sender:
            raise ProtocolError("model: signer is not its aggregator")
        if model.round > self.rounds_total:
            raise ProtocolError(f"model: round {model.round} is beyond the run's"
                                f" {self.rounds_total} rounds")
        self.check_spec(model.weights, "model")
        if model.round <= self.completed:
            if model.round == self.completed and model.digest != self.model_digest:
                self._note("model_conflict", f"a second model for round {model.round}")
            return
        if weights_digest(model.weights) != model.digest:
            raise ProtocolError("model: digest does not match its weights")
        view = self.peers.get(sender)
        if view is not None:
            view.round = max(view.round, model.round)
        self._commit(model, sender, now)

    def training_done(self, round_number: int, weights: list[Tensor], num_examples: int,
                      loss: float, seconds: float, now: float) -> None:
        """Our local training of ``round_number`` finished."""
        if self.phase is not Phase.TRAINING or round_number != self.current:
            self._note("training_discarded", f"round {round_number} is no longer current")
            return
        self.my_update = Update(
            round=round_number, attempt=self.attempt, base=self.model_digest,
            num_examples=num_examples, loss=loss, train_seconds=seconds, weights=weights,
        )
        self.updates.setdefault(round_number, {})[self.self_key] = self.my_update
        self._route_update(now)

    def aggregation_done(self, round_number: int, attempt: int, weights: list[Tensor],
                         contributors: Iterable[bytes], num_examples: int, now: float) -> None:
        """Our aggregation of ``round_number`` finished: publish and commit."""
        if self.phase is not Phase.AGGREGATING or round_number != self.current:
            self._note("aggregation_discarded", f"round {round_number} is no longer current")
            return
        model = Model(
            round=round_number, attempt=attempt, aggregator=self.self_key,
            contributors=tuple(sorted(contributors)), num_examples=num_examples,
            digest=weights_digest(weights), weights=weights,
        )
        self.outbox.append(PublishModel(model))
        self._commit(model, self.self_key, now)

    def tick(self, now: float) -> None:
        """The clock reached ``next_deadline()`` (or later)."""
        if self.deadline is None or now < self.deadline:
            return
        self.deadline = None
        if self.phase is Phase.WAITING_START:
            self._note("start_timeout", f"starting with {len(self.peers)} peers")
            self._begin_round(now)
        elif self.phase is Phase.WAITING_MODEL:
            self._aggregator_failed(now, "published nothing by the deadline")
        elif self.phase is Phase.COLLECTING:
            self._aggregate(now, reason="deadline")

    # -- internals --------------------------------------------------------------------

    def _note(self, kind: str, detail: str) -> None:
        self.outbox.append(Note(kind, detail))

    def check_spec(self, weights: list[Tensor], what: str) -> None:
        """ProtocolError unless ``weights`` have the federation's names, dtypes, shapes."""
        got = [(t.name, t.dtype, t.shape) for t in weights]
        if got != self.spec:
            raise ProtocolError(f"{what}: tensors do not match the federation's model")

    def _begin_round(self, now: float) -> None:
        if self._paused:
            return
        if self.completed >= self.rounds_total:
            self._finish()
            return
        self.phase = Phase.TRAINING
        self.deadline = None
        self.excluded = set()
        self.aggregator = None
        self.my_update = None
        for r in [r for r in self.updates if r < self.current]:
            del self.updates[r]
        # Updates that arrived early were stored before we knew this round's base model.
        early = self.updates.get(self.current, {})
        for sender in [k for k, u in early.items() if u.base != self.model_digest]:
            del early[sender]
            self._note("update_ignored", "trained from another base model")
        self.outbox.append(StartTraining(self.current, self.model_digest))

    def _route_update(self, now: float) -> None:
        assert self.my_update is not None
        agg = self.elect()
        self.aggregator = agg
        if agg is None:  # cannot happen while we participate; keep the machine total
            return
        if agg == self.self_key:
            self.phase = Phase.COLLECTING
            self.deadline = now + self.timeouts.collect
            self._note("aggregating", f"elected aggregator of round {self.current}"
                       f" (attempt {self.attempt})")
            self._check_collect(now)
        else:
            self.phase = Phase.WAITING_MODEL
            self.deadline = now + self.timeouts.model
            if self.my_update.attempt != self.attempt:
                self.my_update = replace(self.my_update, attempt=self.attempt)
            self.outbox.append(SendUpdate(agg, self.my_update))

    def _aggregator_failed(self, now: float, why: str) -> None:
        failed = self.aggregator
        if failed is not None:
            self.excluded.add(failed)
            self._note("aggregator_failed", f"round {self.current}: aggregator {why}")
        self._route_update(now)

    def _check_collect(self, now: float) -> None:
        if self.phase is not Phase.COLLECTING:
            return
        have = set(self.updates.get(self.current, {}))
        # An aggregator that failed this round is silent: do not wait for its update.
        if self.participants() - self.excluded <= have:
            self._aggregate(now, reason="all updates in")

    def _aggregate(self, now: float, reason: str) -> None:
        updates = dict(self.updates.get(self.current, {}))
        self.phase = Phase.AGGREGATING
        self.deadline = None
        self._note("aggregate", f"round {self.current}: {len(updates)} updates ({reason})")
        self.outbox.append(Aggregate(self.current, self.attempt, updates))

    def _commit(self, model: Model, source: bytes, now: float) -> None:
        self.completed = model.round
        self.model_digest = model.digest
        self.last_aggregator = model.aggregator
        self.outbox.append(Commit(model, source))
        for view in self.peers.values():
            # Everyone live received the same broadcast; assume they are with us.
            view.round = max(view.round, model.round)
        if self._paused:
            self.phase = Phase.STOPPED
            return
        if not self._started:
            return
        self._begin_round(now)

    def _finish(self) -> None:
        self.phase = Phase.DONE
        self.deadline = None
        self._note("done", f"completed {self.completed} rounds")
