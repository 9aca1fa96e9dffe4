"""The one executor of the round machine's actions, shared by the daemon and the simulation.

The round machine (protocol.rounds) decides; ``Executor`` carries out what it decides:
training, sending updates (compressed when configured), offline shares and averages,
aggregation, publishing, committing, checkpoints, evaluation records and privacy-budget
stops. It owns the node's weights and the order of work: round work runs first and in
order; evaluations wait until the worker is idle, but never for more than one further
training step.

It does no I/O of its own. Work that blocks is written as a *job* (node.runtime.jobs):
a generator that yields ``Blocking`` calls (train, aggregate, encode, write) and receives
their results.
The daemon runs each yielded call on a worker thread; the simulation runs it at once and
resumes the job after a simulated delay. Frames go out through the node core's outbox
(``NodeCore.take_sends``), which each driver flushes its own way. Checkpoints go to a
``CheckpointWriter`` (files in the daemon, memory in the simulation), events to an
``EventSink``. So the simulation's randomized schedules exercise this very code.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Generator
from typing import Any, assert_never

import numpy as np

from node.common.compress import Codec, ErrorFeedback, apply_delta, decode_delta, weights_delta
from node.common.health import Health
from node.common.weights import from_tensors, to_tensors
from node.peers.core import NodeCore
from node.runtime.jobs import (
    Blocking,
    CheckpointWriter,
    EventSink,
    Job,
    QueuedJob,
    RoundLog,
)
from node.runtime.learner import Learner, Weights
from node.runtime.records import RoundRecord
from node.runtime.restore import CheckpointSource, Restored, restore
from node.runtime.values import Decoded, check_trained, l2_norm
from protocol.errors import ProtocolError
from protocol.identity import node_id_from_key
from protocol.messages import Delta, Share, Update
from protocol.rounds import (
    STATE_PREFIX,
    Action,
    Aggregate,
    Average,
    Commit,
    Note,
    Phase,
    PublishModel,
    SendUpdate,
    ShareModel,
    StartTraining,
)
from protocol.tensors import weights_digest

log = logging.getLogger(__name__)

#: Frames with at least this many parameters are encoded on a worker thread.
THREAD_ENCODE_MIN_PARAMS = 256 * 1024
#: Notes logged as warnings (the rest at INFO).
_WARNING_NOTES = frozenset({"aggregator_failed", "model_conflict"})
#: Notes of a change that linked peers hear at once (a heartbeat), not at the next beat:
#: an aggregator must not wait for a node that sits a round out, and may for one that
#: takes part again (docs/protocol.md 9.2).
_TOLD_AT_ONCE = frozenset({"joining", "taking_part"})


class Executor:
    """Carries out one node's round-machine actions (see the module docstring)."""

    def __init__(self, *, core: NodeCore, learner: Learner, checkpoints: CheckpointWriter,
                 round_log: RoundLog, events: EventSink, health: Health,
                 now: Callable[[], float], wall: Callable[[], float], codec: Codec,
                 genesis: Weights, update_norm_bound: float = 10.0) -> None:
        self.core = core
        self.machine = core.machine
        self.learner = learner
        self.checkpoints = checkpoints
        self.round_log = round_log
        self.events = events
        self.health = health
        self.now = now
        self.wall = wall
        self.codec = codec
        #: How far an update may move from the global model, in multiples of its norm.
        self.update_norm_bound = update_norm_bound
        self.feedback = ErrorFeedback(codec) if codec.lossy else None
        #: The model we train from (our offline average while offline), and the last
        #: global model (compressed updates are differences to it).
        self.weights: Weights = genesis
        self.global_weights: Weights = genesis
        self.history: list[RoundRecord] = []
        self.accuracy: float | None = None
        self.loss: float | None = None
        self.evaluated_round = 0
        self.checkpoint_round = 0
        self.offline_checkpoint_step = 0
        self.stopped_reason: str | None = None
        #: Set to cut a training step in progress short (stop, shutdown, a model came).
        self.stop_training = threading.Event()
        #: Called when work is queued, and when checkpoints are wanted.
        self.on_work: Callable[[], None] = lambda: None
        self.on_checkpoint: Callable[[], None] = lambda: None
        self._jobs: collections.deque[QueuedJob] = collections.deque()
        self._background: collections.deque[QueuedJob] = collections.deque()
        self._trains_since_eval = 0
        self._stats: dict[int, dict[str, float]] = {}
        self._ckpt_pending: tuple[int, bytes, bytes] | None = None
        self._offline_pending: tuple[int, bytes, bytes, int] | None = None

    def resume(self, store: CheckpointSource, *, max_size: int) -> Restored:
        """Resume from the newest good checkpoint in ``store`` and the offline model
        after it (node.runtime.restore), before the machine starts: the daemon and the
        simulation restart the same way."""
        restored = restore(store, self.machine, max_size=max_size)
        if restored.weights is not None:
            self.weights = self.global_weights = restored.weights
            self.core.latest_model_frame = restored.frame
            self.checkpoint_round = restored.round
        if restored.offline_weights is not None:
            self.weights = restored.offline_weights
            self.offline_checkpoint_step = restored.offline_step
        return restored

    # -- taking the machine's actions ------------------------------------------------

    def drain(self) -> None:
        """Carry out every action the machine has queued (jobs are queued, not run)."""
        while actions := self.machine.take_actions():
            for action in actions:
                self.dispatch(action)

    def dispatch(self, action: Action) -> None:
        """Carry out one action: at once (commit, note) or as a queued job."""
        match action:
            case StartTraining():
                self._queue("train", action, self._train(action))
            case SendUpdate():
                self._queue("send_update", action, self._send_update(action))
            case ShareModel():
                self._queue("share", action, self._share(action))
            case Average():
                self._queue("average", action, self._average(action))
            case Aggregate():
                self._queue("aggregate", action, self._aggregate(action))
            case PublishModel():
                self._queue("publish", action, self._publish(action))
            case Commit():
                self._commit(action)
            case Note():
                self._note(action)
            case _:
                assert_never(action)

    def _queue(self, kind: str, action: object, job: Job) -> None:
        self._jobs.append(QueuedJob(kind, action, job))
        self.on_work()

    def next_job(self) -> QueuedJob | None:
        """The job the worker runs next: round work in order first; an evaluation when
        there is none, or when one more training step has passed since the last
        evaluation (a node training alone is never idle)."""
        starved = (self._trains_since_eval >= 1 and bool(self._jobs)
                   and self._jobs[0].kind == "train")
        if self._background and (not self._jobs or starved):
            self._trains_since_eval = 0
            return self._background.popleft()
        if self._jobs:
            job = self._jobs.popleft()
            self._trains_since_eval += job.kind == "train"
            return job
        return None

    def has_work(self) -> bool:
        """Whether a job is waiting."""
        return bool(self._jobs or self._background)

    def job_failed(self, queued: QueuedJob, exc: Exception) -> None:
        """The failure policy for a job that raised: the node never stays stuck in the
        step the job was for, and the failure shows in health until a job of that kind
        succeeds again."""
        kind = queued.kind
        if kind == "train":
            self.health.failed("training", exc, action="training stopped (start resumes)")
            self.halt(f"training failed: {self.health.problems['training'].reason}",
                      reason="error", kind="training_failed",
                      detail=self.health.problems["training"].reason)
        elif kind == "aggregate" and isinstance(queued.action, Aggregate):
            self.health.failed("aggregation", exc, action="stepping down for the round")
            self.machine.aggregation_failed(queued.action.round, str(exc)[:200], self.now())
        else:
            self.health.failed(kind.replace("_", " "), exc, action="the node carries on")

    def job_succeeded(self, queued: QueuedJob) -> None:
        """A job ran to its end: a component that failed before works again."""
        component = {"train": "training", "aggregate": "aggregation"}.get(
            queued.kind, queued.kind.replace("_", " "))
        if component in self.health.problems:
            self.health.recovered(component)

    # -- jobs -------------------------------------------------------------------------

    def _stats_of(self, round_number: int) -> dict[str, float]:
        return self._stats.setdefault(round_number, {})

    def _train(self, action: StartTraining) -> Job:
        m = self.machine
        if action.round != m.current or m.phase is not (
                Phase.OFFLINE if action.offline else Phase.TRAINING):
            return
        refusal = yield Blocking("io", self.learner.can_train)
        if refusal is not None:
            # The privacy budget is spent: peers see the node stopped and carry on.
            log.warning("training stopped: %s", refusal)
            self.halt(refusal, reason=refusal, kind="training_refused", detail=refusal)
            return
        self._stats_of(action.round)["started_at"] = self.wall()
        self.stop_training.clear()
        result = yield Blocking("train", self.learner.train, (self.weights, action.round,
                                                              self.stop_training))
        what = (f"offline step {m.offline_steps + 1} (round {action.round})"
                if action.offline else f"round {action.round}")
        if self.stop_training.is_set():
            # Cut short (a model came, a stop, a shutdown): a partial result, maybe of no
            # batch at all (loss 0/0 = NaN), is nobody's update. A round started again
            # meanwhile (stop, then start) has its own training queued.
            log.info("%s: training cut short after %.2f s; its result is dropped", what,
                     result.seconds)
            return
        self._stats_of(action.round)["train_seconds"] = result.seconds
        tensors = to_tensors(result.weights)
        # What peers would refuse (section 12 of docs/protocol.md) never leaves this
        # node: a diverged training is a failed one (the failure policy stops training).
        yield Blocking("encode", check_trained, (tensors, result.loss, what))
        log.info("%s: trained on %d examples in %.2f s (loss %.4f)", what,
                 result.num_examples, result.seconds, result.loss)
        m.training_done(action.round, tensors, result.num_examples,
                        float(result.loss), float(result.seconds), self.now())

    def _send_update(self, action: SendUpdate) -> Job:
        # Delta and codec work on the worker thread, like the encoding of large frames.
        message = yield Blocking("encode", self._compressed, (action.update,))
        frame = yield from self._signed(self.core.frame, message)
        self._stats_of(action.update.round)["update_bytes"] = len(frame)
        if not self.core.send_to(action.to, frame):
            log.warning("no route to aggregator %s", node_id_from_key(action.to))

    def _share(self, action: ShareModel) -> Job:
        frame = yield from self._signed(self.core.frame, action.share)
        for key in action.to:
            self.core.send_to(key, frame)

    def _average(self, action: Average) -> Job:
        m = self.machine
        models = [(from_tensors(s.weights), s.num_examples) for s in action.models.values()]
        merged = yield Blocking("average", self.learner.average, (models,))
        self.weights = {k: np.asarray(v, order="C") for k, v in merged.items()}
        step = m.offline_steps + 1
        log.info("offline step %d: averaged with %d peer(s)", step, len(models) - 1)
        tensors = to_tensors(self.weights)
        digest = weights_digest(tensors)
        # Offline progress survives a crash: our own signed share of what we hold.
        frame = yield from self._signed(self.core.frame, Share(
            round=action.round, step=step, base=m.model_digest, num_examples=0, loss=0.0,
            weights=tensors))
        self._offline_pending = (action.round, digest, bytes(frame), step)
        self.on_checkpoint()
        m.average_done(action.round, action.step, digest, self.now())

    def _aggregate(self, action: Aggregate) -> Job:
        dense = yield Blocking("aggregate", self._bounded, (action.updates,))
        for key, reason in dense.refused.items():
            if key != self.core.key:
                self.core.peers.refuse(key, reason, self.now())
        if len(dense.updates) < self.machine.quorum:
            why = f"{len(dense.updates)} acceptable updates, {self.machine.quorum} needed"
            log.error("round %d: aggregation failed: %s", action.round, why)
            self.machine.aggregation_failed(action.round, why, self.now())
            return
        try:
            merged = yield Blocking("aggregate", self.learner.aggregate,
                                    (self.global_weights, list(dense.updates.values())))
        except (ValueError, ProtocolError) as exc:
            log.error("round %d: aggregation failed: %s", action.round, exc)
            self.machine.aggregation_failed(action.round, str(exc)[:200], self.now())
            return
        merged = {k: np.asarray(v, order="C") for k, v in merged.items()}
        self.machine.aggregation_done(action.round, action.attempt, to_tensors(merged),
                                      dense.updates.keys(),
                                      sum(n for _, n in dense.updates.values()), self.now())

    def _publish(self, action: PublishModel) -> Job:
        frame = yield from self._signed(self.core.publish, action.model)
        self._stats_of(action.model.round)["model_bytes"] = len(frame)
        self.core.spread_model(frame)
        log.info("round %d: published the global model", action.model.round)
        self.checkpoint(action.model.round, action.model.digest, bytes(frame))

    def _evaluate(self, commit: Commit, weights: Weights) -> Job:
        model = commit.model
        result = yield Blocking("evaluate", self.learner.evaluate, (weights,))
        st = self._stats.pop(model.round, {})
        for old in [r for r in self._stats if r < model.round]:
            del self._stats[old]  # rounds we skipped by catching up
        committed = st.get("committed_at", self.wall())
        started = st.get("started_at", committed)  # a round we never trained: its commit
        self.accuracy, self.loss = float(result.accuracy), float(result.loss)
        privacy = self.learner.privacy()
        finished = self.wall()
        record = RoundRecord(
            round=model.round, accuracy=self.accuracy, loss=self.loss,
            aggregator=node_id_from_key(model.aggregator), contributors=len(model.contributors),
            num_examples=model.num_examples, model_hash=model.digest.hex(),
            started_at=started, committed_at=committed, evaluated_at=finished,
            train_seconds=float(st.get("train_seconds", 0.0)), round_seconds=committed - started,
            update_bytes=int(st.get("update_bytes", 0)), model_bytes=int(st.get("model_bytes", 0)),
            epsilon=privacy["epsilon"] if privacy else None,
        )
        self.history.append(record)
        self.evaluated_round = max(self.evaluated_round, record.round)
        self.events.publish("metrics_update", {**record.as_json(), "ts": finished})
        log.info("round %d/%d committed: accuracy %.4f loss %.4f aggregator %s model %s",
                 model.round, self.machine.rounds_total, self.accuracy, self.loss,
                 record.aggregator, record.model_hash[:12])
        yield Blocking("io", self.round_log.record_round, (record.as_json(),))

    def _signed(self, sign: Callable[[Any], bytes | bytearray],
                message: Any) -> Generator[Blocking, Any, bytes | bytearray]:
        """Sign and encode ``message``: on the worker when it is large."""
        params = sum(len(t.data) for t in message.weights) // 4
        if params >= THREAD_ENCODE_MIN_PARAMS:
            frame: bytes | bytearray = yield Blocking("encode", sign, (message,))
            return frame
        return sign(message)

    # -- blocking helpers (run on the worker) -----------------------------------------

    def _compressed(self, update: Update) -> Update | Delta:
        """``update`` as a ``delta`` of the configured codec when it was trained from the
        global model the aggregator holds too; in full otherwise (an offline average)."""
        if self.codec.name == "none" or update.base != self.machine.model_digest:
            return update
        delta = weights_delta(from_tensors(update.weights), self._global_model())
        payload = self.feedback.compress(delta) if self.feedback else self.codec.encode(delta)
        return Delta(round=update.round, attempt=update.attempt, base=update.base,
                     num_examples=update.num_examples, loss=update.loss,
                     train_seconds=update.train_seconds, codec=self.codec.name,
                     weights=to_tensors(payload))

    def _change_limit(self) -> float:
        return self.update_norm_bound * max(1.0, l2_norm(self._global_model().values()))

    def _bounded(self, received: dict[bytes, Update | Delta]) -> Decoded:
        """Decode the round's updates, refusing any whose change from the global model
        exceeds ``update_norm_bound`` times the global model's L2 norm (at least 1), or
        that cannot be decoded (docs/trust.md)."""
        out = Decoded({}, {})
        model = self._global_model()
        limit = self._change_limit()
        for key, update in received.items():
            try:
                weights = self._dense(update)
            except (ValueError, ProtocolError) as exc:
                out.refused[key] = str(getattr(exc, "reason", exc))[:200]
                continue
            change = l2_norm(weights[k] - v for k, v in model.items())
            if not change <= limit:  # NaN fails too
                out.refused[key] = (f"update: its change has L2 norm {change:.3g}, over the"
                                    f" bound {limit:.3g} (--update-norm-bound)")
                continue
            out.updates[key] = (weights, update.num_examples)
        return out

    def _dense(self, update: Update | Delta) -> Weights:
        """Full weights of an update: a delta is added to the global model it was made
        from (the machine took it only if that is ours)."""
        if isinstance(update, Update):
            return from_tensors(update.weights)
        return apply_delta(self._global_model(), decode_delta(update, self.machine.spec))

    def _global_model(self) -> Weights:
        """The last global model's tensors, without strategy state."""
        return {k: v for k, v in self.global_weights.items() if not k.startswith(STATE_PREFIX)}

    # -- at once ----------------------------------------------------------------------

    def _commit(self, action: Commit) -> None:
        model = action.model
        # Copy: the wire buffers are read-only views into the received frame.
        self.weights = {k: np.array(v) for k, v in from_tensors(model.weights).items()}
        self.global_weights = self.weights
        self.stop_training.set()  # a model for the round we train means our work is moot
        self._stats_of(model.round)["committed_at"] = self.wall()
        if action.source != self.core.key:
            # The signed frame we just received; our own model's frame is made (and
            # checkpointed) by its publish job.
            frame = self.core.latest_model_frame
            if frame is not None:
                self.checkpoint(model.round, model.digest, frame)
        self._background.append(QueuedJob("evaluate", action,
                                          self._evaluate(action, self.weights)))
        self.on_work()
        self.events.publish("round_completed", {
            "round": model.round, "model_hash": model.digest.hex(),
            "aggregator": node_id_from_key(model.aggregator),
            "contributors": len(model.contributors)})

    def _note(self, action: Note) -> None:
        if action.kind == "aggregating":
            log.info("%s", action.detail)
            return
        if action.kind in _TOLD_AT_ONCE:
            self.tell_peers()
        self.events.note(action.kind, action.detail)
        if action.kind == "done":
            self.events.publish("training_stopped", {"round": self.machine.completed,
                                                     "reason": "done"})
        level = logging.WARNING if action.kind in _WARNING_NOTES else logging.INFO
        log.log(level, "%s: %s", action.kind.replace("_", " "), action.detail)

    def halt(self, why: str, *, reason: str, kind: str, detail: str) -> None:
        """Stop taking part after the current step, keeping all state (start resumes):
        ``why`` shows in status, ``reason`` in the ``training_stopped`` event, and
        ``kind``/``detail`` in the event log. Peers are told at once."""
        m = self.machine
        m.pause(self.now())
        self.stopped_reason = why
        self.stop_training.set()  # a training step in progress ends early, and is dropped
        self.drain()
        self.tell_peers()  # they stop counting us as a participant now
        self.events.publish("training_stopped", {"round": m.current, "reason": reason})
        self.events.note(kind, detail)

    def tell_peers(self) -> None:
        """Queue a heartbeat with our state to every linked peer (not at the next beat)."""
        links = sorted(self.core.links)
        if links:
            frame = self.core.heartbeat(self.machine.phase.value)
            for key in links:
                self.core.send_to(key, frame)

    # -- checkpoints ------------------------------------------------------------------

    def checkpoint(self, round_number: int, digest: bytes, frame: bytes) -> None:
        """Have the checkpointer write this model (a newer one supersedes a pending one)."""
        pending = self._ckpt_pending
        if pending is None or pending[0] < round_number:
            self._ckpt_pending = (round_number, digest, frame)
            self.on_checkpoint()

    def checkpoints_pending(self) -> bool:
        """Whether a checkpoint waits to be written."""
        return self._ckpt_pending is not None or self._offline_pending is not None

    def write_checkpoints(self) -> Job:
        """Write the pending checkpoints. A failed write (disk full, say) shows in health
        as ``checkpoints``; training goes on, and the write is tried again with the next
        checkpoint or retry, unless a newer one superseded it."""
        pending, self._ckpt_pending = self._ckpt_pending, None
        offline, self._offline_pending = self._offline_pending, None
        try:
            if pending is not None:
                yield Blocking("io", self.checkpoints.save, pending)
                self.checkpoint_round = max(self.checkpoint_round, pending[0])
                pending = None
            if offline is not None:
                yield Blocking("io", self.checkpoints.save_offline, offline[:3])
                self.offline_checkpoint_step = offline[3]
                offline = None
        except OSError as exc:
            self.health.failed("checkpoints", exc, action="training goes on; retrying")
            if pending is not None and (self._ckpt_pending is None
                                        or self._ckpt_pending[0] < pending[0]):
                self._ckpt_pending = pending
            if offline is not None and self._offline_pending is None:
                self._offline_pending = offline
            return
        self.health.recovered("checkpoints")
