"""The round state machine: training rounds under an elected aggregator, without I/O.

One ``RoundMachine`` per node. It is fed with what happens (peers coming and going,
decoded messages, the end of local training or aggregation, the clock) and answers with
actions in ``outbox`` for the node to carry out (train, send, aggregate, commit). It never
touches a socket, a thread or a clock of its own, so many machines can run in one process
against a fake clock (see node.runtime.sim).

Rules (docs/protocol.md, "Rounds" is the normative text):

* Round ``r`` starts from the global model of round ``r-1`` (round 0 is the genesis model,
  identical on every member because it is built from the shared seed).
* Each member trains locally, then sends its ``Update`` to the aggregator of ``r``: the
  highest-ranked (``election.ranking``) contributor of the model of ``r-1`` that takes
  part and is not excluded in this round (every member holds that model, so members
  agree whatever they know of a newcomer); the participants if no contributor is left.
* The aggregator collects updates from every participant (the members that took part
  when it started the round and hold its base model; not one that arrived since), or
  until the collect deadline, aggregates and publishes the ``Model`` of ``r``.
* Joining: a node sits a round out (``JOINING``, reported at once) when a member has
  completed it already (its model will come), or when a contributor of its model that
  it has never seen outranks those it sees (it cannot know whom the others elect); the
  round's model, or the model deadline, ends that.
* A member waiting for the model excludes the aggregator when it goes down or when the
  model deadline passes, re-elects and re-sends its update to the new aggregator.
* A node applies at most one model per round, and only rounds above its own; a model for a
  later round lets a node that fell behind jump ahead (catch-up).
* Quorum: an elected round needs ``quorum`` live members (this node included).
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

Phases: ``protocol.phases`` holds the table of the moves between them (with a diagram);
every phase change goes through ``RoundMachine._enter``, which checks it. The machine's
state changes only through its constructor and methods (``resume``, ``resume_offline``,
``set_timeouts`` and ``set_quorum`` for a node restoring a checkpoint or reconfigured at
run time; ``protocol.roundstate`` holds that state and its views). The actions of the
outbox are in ``protocol.actions``, the deadlines in ``protocol.deadlines``; this module
re-exports them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from .actions import (
    Action,
    Aggregate,
    Average,
    Commit,
    Note,
    PublishModel,
    SendUpdate,
    ShareModel,
    StartTraining,
)
from .deadlines import Deadlines, RoundTimeouts
from .errors import ProtocolError
from .identity import node_id_from_key
from .messages import Delta, Model, Share, Update
from .phases import TRANSITIONS, IllegalTransition, Phase
from .roundstate import NON_PARTICIPATING, NOT_PUBLISHING, PeerView, RoundState
from .tensors import Tensor, weights_digest

__all__ = [
    "NON_PARTICIPATING", "NOT_PUBLISHING", "STATE_PREFIX", "TRANSITIONS", "Action",
    "Aggregate", "Average", "Commit", "Deadlines", "IllegalTransition", "Note", "Phase",
    "PublishModel", "RoundMachine", "RoundState", "RoundTimeouts", "SendUpdate",
    "ShareModel", "StartTraining",
]

#: Name prefix of strategy-state tensors a global model may carry (``check_spec``).
STATE_PREFIX = "fl.opt."


class RoundMachine(RoundState):
    """Rounds and aggregator election for one node (sans-IO)."""

    # -- inputs -----------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin taking part: wait for ``wait_peers``, then train round 1 (or resume)."""
        self._started = True
        self._paused = False
        if self.completed >= self.rounds_total:
            self._finish()
            return
        if self.completed > 0 or len(self.peers) >= self._wait_peers:
            self._begin_round(now)
        else:
            self._enter(Phase.WAITING_START)
            self._deadline = now + self.timeouts.start
            self._note("waiting_for_peers", f"{len(self.peers)}/{self._wait_peers} peers")

    def pause(self, now: float) -> None:
        """Stop taking part after the current step; state is kept (``start`` resumes)."""
        self._paused = True
        if self.phase not in (Phase.DONE,):
            self._enter(Phase.STOPPED)
            self._deadline = None
            self._my_update = None

    def peer_up(self, key: bytes, now: float, *, round: int = 0, state: str = "unknown") -> None:
        """A member's link is up (after its handshake)."""
        self._peers[key] = PeerView(round=round, state=state)
        self._seen.add(key)
        if (self._started and self.phase is Phase.WAITING_START
                and len(self.peers) >= self._wait_peers):
            self._begin_round(now)

    def peer_status(self, key: bytes, now: float, *, round: int, state: str) -> None:
        """A heartbeat from a member: its completed round and its state."""
        if key not in self._peers:
            return
        self._peers[key] = PeerView(round=round, state=state)
        if (self.phase is Phase.WAITING_MODEL and key == self.aggregator
                and state in NOT_PUBLISHING):
            # Our aggregator stepped down (below quorum), stopped or finished: it will
            # publish nothing this round, so do not wait out the model deadline.
            self._aggregator_failed(now, f"is {state}")
            return
        self._rejoin_if_needed(now)
        self._check_collect(now)

    def peer_down(self, key: bytes, now: float) -> None:
        """A member's link went down."""
        if key not in self.peers:
            return
        if self.phase is Phase.TRAINING and key == self.elect():
            # It was to aggregate this round: whoever saw it go does not elect it again
            # this round, even if it comes back (it restarts without our updates).
            self._excluded.add(key)
        del self._peers[key]
        self._shares.pop(key, None)
        if key == self.aggregator and self.phase is Phase.WAITING_MODEL:
            self._aggregator_failed(now, "went down")
        else:
            self._rejoin_if_needed(now)
            self._check_collect(now)

    def on_update(self, sender: bytes, update: Update | Delta, now: float) -> None:
        """An update from a member, in full or as a compressed delta (checked when it is
        decoded against the base model). Raises ProtocolError if it cannot be valid."""
        if isinstance(update, Update):
            self.check_spec(update.weights, "update")
        started = self._collect_started.get(update.round)
        if update.round == self.completed and started is not None:
            self._deadlines.lags.append(now - started)  # came after we aggregated
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
        self._updates.setdefault(update.round, {})[sender] = update
        if update.round == self.current and self.phase is Phase.COLLECTING:
            self._deadlines.lags.append(now - (started if started is not None else now))
        self._saw_round(sender, update.round - 1)
        self._check_collect(now)

    def on_share(self, sender: bytes, share: Share, now: float) -> None:
        """An offline peer's model. Raises ProtocolError if it cannot be valid."""
        self.check_spec(share.weights, "share")
        if share.round != self.current or sender not in self.peers:
            return  # another round: catch-up (heartbeats, models) brings us together
        self._shares[sender] = share

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
        if model.round == self.current and len(self.live() | settled) < self.quorum:
            # The round in progress, seen from a minority: its aggregator may have been
            # cut off from the rest, who elect another. A round that members we see have
            # finished (catch-up) is taken; this one is served again once we see a quorum.
            self._note("model_deferred", f"round {model.round}: no quorum to accept it")
            return
        self._commit(model, sender, now)
        self._saw_round(sender, model.round)

    def training_done(self, round_number: int, weights: list[Tensor], num_examples: int,
                      loss: float, seconds: float, now: float) -> None:
        """Our local training of ``round_number`` finished."""
        if (self.phase not in (Phase.TRAINING, Phase.OFFLINE) or round_number != self.current
                or self._my_update is not None):
            self._note("training_discarded", f"round {round_number} is no longer current")
            return
        self._my_update = Update(
            round=round_number, attempt=self.attempt, base=self.base_digest,
            num_examples=num_examples, loss=loss, train_seconds=seconds, weights=weights,
        )
        if self.phase is Phase.OFFLINE:
            self._share_and_average()
            return
        self._updates.setdefault(round_number, {})[self.self_key] = self._my_update
        self._route_update(now)

    def average_done(self, round_number: int, step: int, digest: bytes, now: float) -> None:
        """Our offline average of ``step`` is adopted as the model we hold (``digest``)."""
        if self.phase is not Phase.OFFLINE or round_number != self.current or step != self._step:
            return
        self._local_digest = digest
        self._offline_steps += 1
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
        self._outbox.append(PublishModel(model))
        self._commit(model, self.self_key, now)

    def aggregation_failed(self, round_number: int, reason: str, now: float) -> None:
        """Our aggregation of ``round_number`` could not be done: step down for this round
        and hand our update to the next candidate."""
        if self.phase is not Phase.AGGREGATING or round_number != self.current:
            return
        self._step_down(now, f"aggregation failed ({reason})")

    def tick(self, now: float) -> None:
        """The clock reached ``next_deadline()`` (or later)."""
        if self._deadline is None or now < self._deadline:
            return
        self._deadline = None
        if self.phase is Phase.WAITING_START:
            self._note("start_timeout", f"starting with {len(self.peers)} peers")
            self._begin_round(now)
        elif self.phase is Phase.JOINING:
            # No model came: take part with the members we see rather than wait forever.
            self._note("join_timeout", f"round {self.current}: no model came; taking part")
            self._begin_round(now, sit_out=False)
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

    def check_spec(self, weights: list[Tensor], what: str, *, state: bool = False) -> None:
        """ProtocolError unless ``weights`` have the federation's names, dtypes, shapes.

        ``state``: a global model may also carry its aggregation strategy's state after
        the model's tensors: float32 tensors named ``fl.opt.<slot>.<tensor name>`` with
        that tensor's shape (FedAdam and FedYogi keep their moments there)."""
        got = [(t.name, t.dtype, t.shape) for t in weights]
        n = len(self._spec)
        if got[:n] != self._spec or (got[n:] and not state):
            raise ProtocolError(f"{what}: tensors do not match the federation's model")
        shapes = {name: shape for name, _, shape in self._spec}
        for name, dtype, shape in got[n:]:
            slot, _, of = name[len(STATE_PREFIX):].partition(".")
            if (not name.startswith(STATE_PREFIX) or not slot.isalnum() or dtype != "float32"
                    or shapes.get(of) != shape):
                raise ProtocolError(f"{what}: tensor {name[:60]!r} is neither the model's nor"
                                    " strategy state")

    def _begin_round(self, now: float, *, sit_out: bool = True) -> None:
        if self._paused:
            return
        if self.completed >= self.rounds_total:
            self._finish()
            return
        was_offline = self.phase is Phase.OFFLINE
        self._deadline = None
        self._excluded = set()
        self._aggregator = None
        self._my_update = None
        for r in [r for r in self.updates if r < self.current]:
            del self._updates[r]
        if not self.has_quorum():
            if not was_offline:
                self._note("offline", f"{len(self.live())} of {self.quorum} members"
                           " needed for a round: training and averaging with reachable peers")
            self._enter(Phase.OFFLINE)
            self._step += 1
            self._outbox.append(StartTraining(self.current, self.base_digest, offline=True))
            return
        if sit_out and self._sit_out(now):
            return
        if self.phase is Phase.JOINING:
            self._note("taking_part", f"round {self.current}: taking part")
        self._round_members = frozenset(self.taking_part())
        if was_offline:
            self._note("online", f"quorum again ({len(self.live())} members):"
                       f" round {self.current} merges the offline models")
        self._enter(Phase.TRAINING)
        self._outbox.append(StartTraining(self.current, self.base_digest))

    def _sit_out(self, now: float) -> bool:
        """Sit the current round out (JOINING) if taking part could stall it: a member
        has completed it already (we wait for its model), or a contributor of our model
        that we have never seen outranks those we see (we could elect another aggregator
        than the rest), unless we have no member (nobody can wait for us) or the members
        we see sit out too. The round's model, or the model deadline, ends the wait
        (docs/protocol.md 9.2)."""
        if self.behind():
            why = f"a member completed round {self.current} already: waiting for its model"
        elif (self.peers and not self._nobody_else_takes_part()
              and self.unseen_contributor_first()):
            why = "the best-ranked contributor of its model not seen yet"
        else:
            return False
        self._enter(Phase.JOINING)
        self._deadline = now + self.timeouts.model
        self._note("joining", f"round {self.current}: sitting out ({why});"
                   " taking part from the next round")
        return True

    def _nobody_else_takes_part(self) -> bool:
        """We see a quorum of live members, but too few of them take part to hold a
        round without us: they sit out too (all restarted at once, say)."""
        me = {self.self_key}
        return (len(self.live() - me) >= self.quorum
                and len(self.taking_part() - me) < self.quorum)

    def _rejoin_if_needed(self, now: float) -> None:
        """Sitting out while the others sit out too would wait for a model nobody makes:
        take part (unless a member holds the round's model: it will be served)."""
        if (self.phase is Phase.JOINING and not self.behind()
                and self._nobody_else_takes_part()):
            self._begin_round(now, sit_out=False)

    def _share_and_average(self) -> None:
        assert self._my_update is not None
        mine = self._my_update
        share = Share(round=mine.round, step=self._step, base=mine.base,
                      num_examples=mine.num_examples, loss=mine.loss, weights=mine.weights)
        reachable = tuple(sorted(k for k in self.taking_part() if k != self.self_key))
        if reachable:
            self._outbox.append(ShareModel(reachable, share))
        models = {self.self_key: share}
        models.update((k, v) for k, v in self._shares.items() if k in self.peers)
        self._shares = {}
        self._enter(Phase.OFFLINE)
        self._deadline = None
        self._outbox.append(Average(self.current, self._step, models))

    def _route_update(self, now: float) -> None:
        assert self._my_update is not None
        if not self.has_quorum():
            # Quorum lost during the round: what we trained becomes an offline step.
            if self.phase is not Phase.OFFLINE:
                self._note("offline", f"{len(self.live())} of {self.quorum} members"
                           " needed for a round: training and averaging with reachable peers")
            self._enter(Phase.OFFLINE)
            self._step += 1
            self._share_and_average()
            return
        agg = self.elect()
        self._aggregator = agg
        if agg is None:  # everyone was excluded this round: start it over
            self._note("round_restarted", f"round {self.current}: no aggregator left")
            self._begin_round(now)
            return
        if agg == self.self_key:
            self._enter(Phase.COLLECTING)
            self._collect_started[self.current] = now
            for r in [r for r in self._collect_started if r < self.current - 1]:
                del self._collect_started[r]
            early = len(self.updates.get(self.current, {})) - 1
            self._deadlines.lags.extend([0.0] * max(0, early))
            self._deadline = now + self.deadlines.collect()
            self._note("aggregating", f"elected aggregator of round {self.current}"
                       f" (attempt {self.attempt})")
            self._check_collect(now)
        else:
            self._enter(Phase.WAITING_MODEL)
            self._deadline = now + self.timeouts.model
            if self._my_update.attempt != self.attempt:
                self._my_update = replace(self._my_update, attempt=self.attempt)
            self._outbox.append(SendUpdate(agg, self._my_update))

    def _step_down(self, now: float, why: str) -> None:
        """We cannot aggregate this round: exclude ourselves and hand our update on."""
        self._excluded.add(self.self_key)
        self._note("aggregator_failed", f"round {self.current}: {why}; stepping down")
        self._route_update(now)

    def _aggregator_failed(self, now: float, why: str) -> None:
        failed = self.aggregator
        if failed is not None:
            self._excluded.add(failed)
            self._note("aggregator_failed", f"round {self.current}: aggregator {why}"
                       f" ({node_id_from_key(failed)})")
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
        self._enter(Phase.AGGREGATING)
        self._deadline = None
        self._note("aggregate", f"round {self.current}: {len(updates)} updates ({reason})")
        self._outbox.append(Aggregate(self.current, self.attempt, updates))

    def _commit(self, model: Model, source: bytes, now: float) -> None:
        if self.local_digest is not None and model.round > self.current:
            self._note("offline_superseded", f"the federation's round {model.round} replaces"
                       " our offline model")
        self._completed = model.round
        self._model_digest = model.digest
        self._local_digest = None
        self._shares = {}
        self._last_aggregator = model.aggregator
        self._contributors = frozenset(model.contributors)
        self._seen = (self._seen & self._contributors) | set(self._peers)
        self._outbox.append(Commit(model, source))
        for key, view in list(self._peers.items()):
            # Members that took part in this round received the same broadcast: assume
            # they are with us, and that its contributors take part in the next round (a
            # state they reported before they completed this round is older than their
            # update). Others (a member that arrived during the round, or is behind) must
            # tell us themselves.
            if view.round >= model.round:
                continue
            if key in self._contributors:
                self._peers[key] = PeerView(round=model.round, state=Phase.TRAINING.value)
            elif view.round == model.round - 1 and key in self._round_members:
                self._peers[key] = replace(view, round=model.round)
        if self._paused:
            self._enter(Phase.STOPPED)
            return
        if not self._started:
            return
        self._begin_round(now)

    def _finish(self) -> None:
        self._enter(Phase.DONE)
        self._deadline = None
        self._note("done", f"completed {self.completed} rounds")
