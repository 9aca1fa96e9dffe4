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
* Quorum: an elected round needs ``quorum`` participating members (this node included).
  An aggregator publishes only with updates from a quorum and while it still sees a
  quorum; at its collect deadline without one it steps down (excludes itself) and hands
  its update to the next in the ranking. A node below quorum does not accept a model for
  the round in progress (it may come from an aggregator cut off from the majority); a
  model for a later round (catch-up) it accepts.
* Offline: below quorum a node trains locally and averages with the members it can reach
  (``Share`` messages, weighted by examples), step after step, and returns to elected
  rounds as soon as it sees a quorum again. Its first update after that is trained from
  its offline model, and an aggregator accepts updates whatever model they were trained
  from (updates are full weights, so FedAvg over them merges diverged models): that is the
  reconcile rule after a partition heals, and after two models were published for one
  round (the next round merges both lines). A node never applies two models for a round.
* Deadlines adapt: the collect deadline follows the lateness of the updates observed
  (late ones included), between ``RoundTimeouts.floor`` and ``collect`` (``Deadlines``).
  An update for a round that is over is answered with that round's model by the node
  layer (the straggler catches up; its data counts again from the next round).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from .election import ranking
from .errors import ProtocolError
from .messages import Delta, Model, Share, Update
from .tensors import Tensor, weights_digest

#: Name prefix of strategy-state tensors a global model may carry (``check_spec``).
STATE_PREFIX = "fl.opt."

#: Peer states (reported in heartbeats) in which a member does not take part in rounds.
NON_PARTICIPATING = frozenset({"stopped", "done"})
#: Peer states in which an aggregator publishes nothing in the round: those, and offline.
NOT_PUBLISHING = NON_PARTICIPATING | {"offline"}


class Phase(enum.Enum):
    """Where a node stands in the current round."""

    WAITING_START = "waiting"
    TRAINING = "training"
    WAITING_MODEL = "waiting_model"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    OFFLINE = "offline"
    STOPPED = "stopped"
    DONE = "done"


@dataclass(frozen=True)
class RoundTimeouts:
    """Deadlines, in seconds.

    ``collect``: the most an aggregator waits for updates after its own is ready.
    ``model``: the most a member waits for the global model after sending its update.
    ``start``: how long a fresh node waits for ``wait_peers`` before starting anyway.
    ``floor``: the least either adaptive deadline can shrink to.
    """

    collect: float = 60.0
    model: float = 90.0
    start: float = 60.0
    floor: float = 5.0


class Deadlines:
    """The collect deadline, fitted to how late updates come, capped by ``RoundTimeouts``.

    It is ``2 x p90 + floor`` of the recent lateness samples (the last 32), between
    ``floor`` and ``collect``; with fewer than 3 samples it is ``collect``. A sample is how
    long after our own update a peer's update came to us as aggregator (0 if before),
    including updates that came after we aggregated, so stragglers cut off once push the
    deadline up again. The model deadline (how long a member waits for the model) stays
    ``model``: it must outlast any aggregator's collect deadline, or members would abandon
    an aggregator that is only waiting for a straggler.
    """

    WINDOW = 32
    MIN_SAMPLES = 3

    def __init__(self, timeouts: RoundTimeouts) -> None:
        self.timeouts = timeouts
        self.lags: deque[float] = deque(maxlen=self.WINDOW)

    def collect(self) -> float:
        """Seconds an aggregator waits for updates once its own is ready."""
        cap = self.timeouts.collect
        if len(self.lags) < self.MIN_SAMPLES:
            return cap
        ordered = sorted(self.lags)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        floor = min(self.timeouts.floor, cap)
        return min(cap, max(floor, 2.0 * p90 + floor))


# ---- actions (the outbox) -------------------------------------------------------------


@dataclass(frozen=True)
class StartTraining:
    """Train round ``round`` locally from the model we hold (``base`` is its digest);
    ``offline``: an offline step (the result is shared and averaged, not sent to an
    aggregator)."""

    round: int
    base: bytes
    offline: bool = False


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
class ShareModel:
    """Offline: send ``share`` (our freshly trained model) to each member in ``to``."""

    to: tuple[bytes, ...]
    share: Share = field(repr=False)


@dataclass(frozen=True)
class Average:
    """Offline: average ``models`` (ours and the peers' latest, sender key -> share)
    weighted by their examples, adopt the result, then call ``average_done``."""

    round: int
    step: int
    models: dict[bytes, Share] = field(repr=False)


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


Action = (StartTraining | SendUpdate | Aggregate | PublishModel | Commit | ShareModel
          | Average | Note)


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
        wait_peers: int = 0,
        quorum: int = 1,
        timeouts: RoundTimeouts = RoundTimeouts(),
        completed: int = 0,
        model_digest: bytes | None = None,
    ) -> None:
        if rounds_total < 1:
            raise ValueError("rounds_total must be >= 1")
        if quorum < 1:
            raise ValueError("quorum must be >= 1")
        self.self_key = self_key
        self.federation = federation
        self.rounds_total = rounds_total
        self.wait_peers = wait_peers
        self.quorum = quorum
        self.timeouts = timeouts
        self.deadlines = Deadlines(timeouts)
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
        #: Offline: the digest of the averaged model we hold (None: the global one), the
        #: peers' latest shares for the current round, and offline steps done in all.
        self.local_digest: bytes | None = None
        self.shares: dict[bytes, Share] = {}
        self.offline_steps = 0
        self._step = 0
        self._collect_started: dict[int, float] = {}
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

    def participants(self) -> set[bytes]:
        """Live members expected to send an update this round."""
        out = {k for k, v in self.peers.items() if v.state not in NON_PARTICIPATING}
        if not self._paused:
            out.add(self.self_key)
        return out

    def has_quorum(self) -> bool:
        """Whether enough members take part for an elected round."""
        return len(self.participants()) >= self.quorum

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
        """Begin taking part: wait for ``wait_peers``, then train round 1 (or resume)."""
        self._started = True
        self._paused = False
        if self.completed >= self.rounds_total:
            self._finish()
            return
        if self.completed > 0 or len(self.peers) >= self.wait_peers:
            self._begin_round(now)
        else:
            self.phase = Phase.WAITING_START
            self.deadline = now + self.timeouts.start
            self._note("waiting_for_peers", f"{len(self.peers)}/{self.wait_peers} peers")

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
                and len(self.peers) >= self.wait_peers):
            self._begin_round(now)

    def peer_status(self, key: bytes, now: float, *, round: int, state: str) -> None:
        """A heartbeat from a member: its completed round and its state."""
        view = self.peers.get(key)
        if view is None:
            return
        view.round, view.state = round, state
        if (self.phase is Phase.WAITING_MODEL and key == self.aggregator
                and state in NOT_PUBLISHING):
            # Our aggregator stepped down (below quorum), stopped or finished: it will
            # publish nothing this round, so do not wait out the model deadline.
            self._aggregator_failed(now, f"is {state}")
            return
        self._check_collect(now)

    def peer_down(self, key: bytes, now: float) -> None:
        """A member's link went down."""
        if key not in self.peers:
            return
        if self.phase is Phase.TRAINING and key == self.elect():
            # It was to aggregate this round: whoever saw it go does not elect it again
            # this round, even if it comes back (it restarts without our updates).
            self.excluded.add(key)
        del self.peers[key]
        self.shares.pop(key, None)
        if key == self.aggregator and self.phase is Phase.WAITING_MODEL:
            self._aggregator_failed(now, "went down")
        else:
            self._check_collect(now)

    def on_update(self, sender: bytes, update: Update | Delta, now: float) -> None:
        """An update from a member, in full or as a compressed delta (checked when it is
        decoded against the base model). Raises ProtocolError if it cannot be valid."""
        if isinstance(update, Update):
            self.check_spec(update.weights, "update")
        started = self._collect_started.get(update.round)
        if update.round == self.completed and started is not None:
            self.deadlines.lags.append(now - started)  # came after we aggregated
        if update.round < self.current or update.round > self.current + 1:
            self._note("update_ignored", f"round {update.round} while at {self.current}")
            return
        # Whatever model it was trained from (an offline average, the other side of a
        # split): averaging full weights merges the lines (the reconcile rule). A delta
        # can only be added to the model it was computed from.
        if isinstance(update, Delta) and update.round == self.current and (
                update.base != self.model_digest):
            self._note("update_ignored", "a compressed update from another base model")
            return
        self.updates.setdefault(update.round, {})[sender] = update
        if update.round == self.current and self.phase is Phase.COLLECTING:
            self.deadlines.lags.append(now - (started if started is not None else now))
        view = self.peers.get(sender)
        if view is not None:
            view.round = max(view.round, update.round - 1)
        self._check_collect(now)

    def on_share(self, sender: bytes, share: Share, now: float) -> None:
        """An offline peer's model. Raises ProtocolError if it cannot be valid."""
        self.check_spec(share.weights, "share")
        if share.round != self.current or sender not in self.peers:
            return  # another round: catch-up (heartbeats, models) brings us together
        self.shares[sender] = share

    def on_model(self, sender: bytes, model: Model, now: float) -> None:
        """A global model. Raises ProtocolError if it cannot be valid."""
        if model.aggregator != sender:
            raise ProtocolError("model: signer is not its aggregator")
        if model.round > self.rounds_total:
            raise ProtocolError(f"model: round {model.round} is beyond the run's"
                                f" {self.rounds_total} rounds")
        self.check_spec(model.weights, "model", state=True)
        if model.round <= self.completed:
            if model.round == self.completed and model.digest != self.model_digest:
                self._note("model_conflict", f"a second model for round {model.round}"
                           " (kept the first; the next round merges both)")
            return
        if weights_digest(model.weights) != model.digest:
            raise ProtocolError("model: digest does not match its weights")
        settled = {k for k, v in self.peers.items() if v.round >= model.round}
        if model.round == self.current and len(self.participants() | settled) < self.quorum:
            # The round in progress, seen from a minority: its aggregator may have been
            # cut off from the rest, who elect another. A round that members we see have
            # finished (catch-up) is taken; this one is served again once we see a quorum.
            self._note("model_deferred", f"round {model.round}: no quorum to accept it")
            return
        view = self.peers.get(sender)
        if view is not None:
            view.round = max(view.round, model.round)
        self._commit(model, sender, now)

    def training_done(self, round_number: int, weights: list[Tensor], num_examples: int,
                      loss: float, seconds: float, now: float) -> None:
        """Our local training of ``round_number`` finished."""
        if (self.phase not in (Phase.TRAINING, Phase.OFFLINE) or round_number != self.current
                or self.my_update is not None):
            self._note("training_discarded", f"round {round_number} is no longer current")
            return
        self.my_update = Update(
            round=round_number, attempt=self.attempt, base=self.base_digest,
            num_examples=num_examples, loss=loss, train_seconds=seconds, weights=weights,
        )
        if self.phase is Phase.OFFLINE:
            self._share_and_average()
            return
        self.updates.setdefault(round_number, {})[self.self_key] = self.my_update
        self._route_update(now)

    def average_done(self, round_number: int, step: int, digest: bytes, now: float) -> None:
        """Our offline average of ``step`` is adopted as the model we hold (``digest``)."""
        if self.phase is not Phase.OFFLINE or round_number != self.current or step != self._step:
            return
        self.local_digest = digest
        self.offline_steps += 1
        self._begin_round(now)

    def aggregation_done(self, round_number: int, attempt: int, weights: list[Tensor],
                         contributors: Iterable[bytes], num_examples: int, now: float) -> None:
        """Our aggregation of ``round_number`` finished: publish and commit."""
        if self.phase is not Phase.AGGREGATING or round_number != self.current:
            self._note("aggregation_discarded", f"round {round_number} is no longer current")
            return
        if not self.has_quorum():
            # Cut off from the majority while aggregating: the others elect a successor,
            # so publishing now could give the round a second model.
            self._note("aggregation_discarded", f"round {round_number}: lost quorum")
            self._route_update(now)
            return
        model = Model(
            round=round_number, attempt=attempt, aggregator=self.self_key,
            contributors=tuple(sorted(contributors)), num_examples=num_examples,
            digest=weights_digest(weights), weights=weights,
        )
        self.outbox.append(PublishModel(model))
        self._commit(model, self.self_key, now)

    def aggregation_failed(self, round_number: int, reason: str, now: float) -> None:
        """Our aggregation of ``round_number`` could not be done: step down for this round
        and hand our update to the next candidate."""
        if self.phase is not Phase.AGGREGATING or round_number != self.current:
            return
        self._step_down(now, f"aggregation failed ({reason})")

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
            have = len(self.updates.get(self.current, {}))
            if have >= self.quorum:
                self._aggregate(now, reason="deadline")
            else:
                # No quorum of updates came to us: the others elected someone else (we
                # restarted, say) or are gone.
                self._step_down(now, f"{have} of {self.quorum} updates by the deadline")

    # -- internals --------------------------------------------------------------------

    def _note(self, kind: str, detail: str) -> None:
        self.outbox.append(Note(kind, detail))

    def check_spec(self, weights: list[Tensor], what: str, *, state: bool = False) -> None:
        """ProtocolError unless ``weights`` have the federation's names, dtypes, shapes.

        ``state``: a global model may also carry its aggregation strategy's state after
        the model's tensors: float32 tensors named ``fl.opt.<slot>.<tensor name>`` with
        that tensor's shape (FedAdam and FedYogi keep their moments there)."""
        got = [(t.name, t.dtype, t.shape) for t in weights]
        n = len(self.spec)
        if got[:n] != self.spec or (got[n:] and not state):
            raise ProtocolError(f"{what}: tensors do not match the federation's model")
        shapes = {name: shape for name, _, shape in self.spec}
        for name, dtype, shape in got[n:]:
            slot, _, of = name[len(STATE_PREFIX):].partition(".")
            if (not name.startswith(STATE_PREFIX) or not slot.isalnum() or dtype != "float32"
                    or shapes.get(of) != shape):
                raise ProtocolError(f"{what}: tensor {name[:60]!r} is neither the model's nor"
                                    " strategy state")

    def _begin_round(self, now: float) -> None:
        if self._paused:
            return
        if self.completed >= self.rounds_total:
            self._finish()
            return
        was_offline = self.phase is Phase.OFFLINE
        self.deadline = None
        self.excluded = set()
        self.aggregator = None
        self.my_update = None
        for r in [r for r in self.updates if r < self.current]:
            del self.updates[r]
        if not self.has_quorum():
            if not was_offline:
                self._note("offline", f"{len(self.participants())} of {self.quorum} members"
                           " needed for a round: training and averaging with reachable peers")
            self.phase = Phase.OFFLINE
            self._step += 1
            self.outbox.append(StartTraining(self.current, self.base_digest, offline=True))
            return
        if was_offline:
            self._note("online", f"quorum again ({len(self.participants())} members):"
                       f" round {self.current} merges the offline models")
        self.phase = Phase.TRAINING
        self.outbox.append(StartTraining(self.current, self.base_digest))

    def _share_and_average(self) -> None:
        assert self.my_update is not None
        mine = self.my_update
        share = Share(round=mine.round, step=self._step, base=mine.base,
                      num_examples=mine.num_examples, loss=mine.loss, weights=mine.weights)
        reachable = tuple(sorted(k for k in self.participants() if k != self.self_key))
        if reachable:
            self.outbox.append(ShareModel(reachable, share))
        models = {self.self_key: share}
        models.update((k, v) for k, v in self.shares.items() if k in self.peers)
        self.shares = {}
        self.phase = Phase.OFFLINE
        self.deadline = None
        self.outbox.append(Average(self.current, self._step, models))

    def _route_update(self, now: float) -> None:
        assert self.my_update is not None
        if not self.has_quorum():
            # Quorum lost during the round: what we trained becomes an offline step.
            if self.phase is not Phase.OFFLINE:
                self._note("offline", f"{len(self.participants())} of {self.quorum} members"
                           " needed for a round: training and averaging with reachable peers")
            self.phase = Phase.OFFLINE
            self._step += 1
            self._share_and_average()
            return
        agg = self.elect()
        self.aggregator = agg
        if agg is None:  # everyone was excluded this round: start it over
            self._note("round_restarted", f"round {self.current}: no aggregator left")
            self._begin_round(now)
            return
        if agg == self.self_key:
            self.phase = Phase.COLLECTING
            self._collect_started[self.current] = now
            for r in [r for r in self._collect_started if r < self.current - 1]:
                del self._collect_started[r]
            early = len(self.updates.get(self.current, {})) - 1
            self.deadlines.lags.extend([0.0] * max(0, early))
            self.deadline = now + self.deadlines.collect()
            self._note("aggregating", f"elected aggregator of round {self.current}"
                       f" (attempt {self.attempt})")
            self._check_collect(now)
        else:
            self.phase = Phase.WAITING_MODEL
            self.deadline = now + self.timeouts.model
            if self.my_update.attempt != self.attempt:
                self.my_update = replace(self.my_update, attempt=self.attempt)
            self.outbox.append(SendUpdate(agg, self.my_update))

    def _step_down(self, now: float, why: str) -> None:
        """We cannot aggregate this round: exclude ourselves and hand our update on."""
        self.excluded.add(self.self_key)
        self._note("aggregator_failed", f"round {self.current}: {why}; stepping down")
        self._route_update(now)

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
        if self.participants() - self.excluded <= have and len(have) >= self.quorum:
            self._aggregate(now, reason="all updates in")

    def _aggregate(self, now: float, reason: str) -> None:
        updates = dict(self.updates.get(self.current, {}))
        self.phase = Phase.AGGREGATING
        self.deadline = None
        self._note("aggregate", f"round {self.current}: {len(updates)} updates ({reason})")
        self.outbox.append(Aggregate(self.current, self.attempt, updates))

    def _commit(self, model: Model, source: bytes, now: float) -> None:
        if self.local_digest is not None and model.round > self.current:
            self._note("offline_superseded", f"the federation's round {model.round} replaces"
                       " our offline model")
        self.completed = model.round
        self.model_digest = model.digest
        self.local_digest = None
        self.shares = {}
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
