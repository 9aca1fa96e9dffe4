"""The node daemon: one supervisor over the transport, web API, timers and the trainer.

``Node.run()`` owns one ``asyncio.TaskGroup``. The round machine (protocol.rounds) decides;
this module carries out its actions: training, aggregation and evaluation run one at a
time on a worker thread (the event loop never blocks), frames go out through the peer
transport, and the deadline timer is re-armed after every input.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from protocol.envelope import Envelope
from protocol.identity import Identity, node_id_from_key
from protocol.messages import Delta, Heartbeat, Hello, Model, Share, Update
from protocol.rounds import (
    STATE_PREFIX,
    Aggregate,
    Average,
    Commit,
    Note,
    Phase,
    PublishModel,
    RoundMachine,
    RoundTimeouts,
    SendUpdate,
    ShareModel,
    StartTraining,
)

from protocol.envelope import decode
from protocol.errors import ProtocolError
from protocol.gossip import federation_key
from protocol.tensors import weights_digest

from node.runtime.compress import ErrorFeedback, apply_delta, parse_codec, weights_delta
from node.runtime.control import ControlMixin
from node.cli.config import NodeConfig, parse_key, parse_peer, read_federation_secret
from node.peers.core import NodeCore, TrustPolicy
from node.web.dashboard import resources
from node.web.hostguard import allowed_hosts_for
from node.web.hub import EventHub
from node.runtime.learner import Learner, Weights
from node.trust.pair_flow import PAIR_PATH, handle_pair_request
from node.trust.pairing import TokenBook
from node.runtime.state import SequenceCounter, atomic_write, load_or_create_api_token
from node.runtime.checkpoints import CheckpointError, CheckpointStore, NodeDB
from node.trust.store import TrustStore
from node.peers.transport import Link, PeerTransport, close_ws, now
from node.runtime.weights import from_tensors, to_tensors

log = logging.getLogger(__name__)

ENDPOINT_FILE = "endpoint.json"
#: Frames at least this large are encoded on a worker thread.
THREAD_ENCODE_MIN_PARAMS = 256 * 1024


@dataclass
class RoundRecord:
    """What one completed round looked like from this node."""

    round: int
    accuracy: float | None
    loss: float | None
    aggregator: str
    contributors: int
    num_examples: int
    model_hash: str
    started_at: float
    committed_at: float
    evaluated_at: float
    train_seconds: float
    round_seconds: float
    update_bytes: int
    model_bytes: int
    #: Privacy budget spent by this node when the round was recorded (None without DP).
    epsilon: float | None = None

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Node(ControlMixin):
    """A running fl-node: build it with a config and a learner, then ``await run()``."""

    def __init__(self, config: NodeConfig, learner: Learner) -> None:
        self.config = config
        self.learner = learner
        state_dir = Path(config.resolved_state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = state_dir
        self.identity = Identity.load_or_create(state_dir)
        genesis = {k: np.asarray(v, order="C") for k, v in learner.initial_weights().items()}
        self.weights: Weights = genesis
        #: The last global model (``weights`` is our offline average while offline):
        #: compressed updates are differences to it.
        self.global_weights: Weights = genesis
        self.codec = parse_codec(config.compress)
        self.feedback = ErrorFeedback(self.codec) if self.codec.lossy else None
        self.machine = RoundMachine(
            self_key=self.identity.public_key,
            federation=config.federation,
            rounds_total=config.rounds,
            genesis=to_tensors(genesis),
            wait_peers=config.effective_wait_peers,
            quorum=config.quorum,
            timeouts=RoundTimeouts(collect=config.round_timeout,
                                   model=config.round_timeout * 1.5,
                                   start=config.start_timeout,
                                   floor=min(5.0, config.round_timeout)),
        )
        self.trust_store = TrustStore(state_dir)
        self.pairing_tokens = TokenBook()
        self.api_token = load_or_create_api_token(state_dir)
        self.static_peers: list[tuple[bytes | str | None, str]] = []
        pinned_keys: set[bytes] = set()
        pinned_ids: set[str] = set()
        for peer in config.peers:
            key_text, address = parse_peer(peer)
            key = parse_key(key_text) if key_text else None
            if isinstance(key, bytes):
                pinned_keys.add(key)
            elif isinstance(key, str):
                pinned_ids.add(key)
            self.static_peers.append((key, address))
        secret = read_federation_secret(config)
        self.trust = TrustPolicy(
            store=self.trust_store,
            federation_key=federation_key(secret, config.federation) if secret else None,
            open=config.open, pinned=pinned_keys, pinned_ids=pinned_ids,
        )
        self.core = NodeCore(
            identity=self.identity, name=config.name, federation=config.federation,
            port=config.port, machine=self.machine, seq=SequenceCounter(state_dir),
            trust=self.trust, max_message_size=config.max_message_size,
            fanout=config.fanout,
            # Relayed members expire after three silent intervals, and never sooner than
            # 6 s, so a busy node or a slow relay does not drop them spuriously.
            member_timeout=max(3 * config.announce_interval, 6.0),
        )
        self.checkpoints = CheckpointStore(state_dir)
        self.db = NodeDB(state_dir)
        self.resumed_from = self._restore()
        self.checkpoint_round = self.resumed_from
        self.resumed_offline_step = self._restore_offline()
        self.offline_checkpoint_step = self.resumed_offline_step
        self.transport = PeerTransport(self.core, on_frame=self._on_frame,
                                       on_link_up=self._on_link_up,
                                       on_link_down=self._on_link_down)
        self.transport.idle_timeout = max(10.0, 5 * config.heartbeat_interval)
        self.history: list[RoundRecord] = []
        self.evaluated_round = 0
        self.accuracy: float | None = None
        self.loss: float | None = None
        self.started_at = time.time()
        #: Per-round timings and sizes, kept until the round's evaluation is recorded.
        self._round_stats: dict[int, dict[str, float]] = {}
        # Round work (train, send, aggregate, publish) goes first; evaluations wait until
        # the worker has nothing else to do, so they never delay the next round.
        self._jobs: collections.deque[tuple[str, Any]] = collections.deque()
        self._ckpt_pending: tuple[int, bytes, bytes] | None = None
        self._offline_pending: tuple[int, bytes, bytes, int] | None = None
        self._events: list[tuple[float, str, str]] = []
        self._ckpt_wanted = asyncio.Event()
        self._background: collections.deque[tuple[str, Any]] = collections.deque()
        self._work = asyncio.Event()
        self._timer_changed = asyncio.Event()
        self._stop_training = threading.Event()
        self._shutdown = asyncio.Event()
        #: Live events for WebSocket clients (node.web.dashboard), and the Host/Origin names
        #: the web API answers to (filled in once its port is bound).
        self.hub = EventHub()
        self.stopped_reason: str | None = None
        self.allowed_hosts: set[str] = set()
        self.web_port = 0
        self.peer_port = 0
        self._tg: asyncio.TaskGroup | None = None
        self._dials: dict[tuple[str, bytes | str | None], asyncio.Task[None]] = {}

    # -- identity & status ------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def state(self) -> str:
        """The node's state word, as shown in status and heartbeats."""
        return self.machine.phase.value

    def model_hash(self) -> str:
        """The digest of the model this node holds (its offline average when offline)."""
        return self.machine.base_digest.hex()

    def status(self) -> dict[str, Any]:
        """The object served at ``GET /api/status``."""
        m = self.machine
        agg = m.aggregator or m.last_aggregator
        peers = []
        t = now()
        for key, st in self.core.known.items():
            link = self.transport.links.get(key)
            peers.append({
                "node_id": node_id_from_key(key), "name": st.name,
                "address": link.address if link else st.address,
                "state": self.core.peer_state(key, t), "trusted": st.trusted,
                "trust": st.trust or None, "discovered": st.discovered,
                "round": st.rounds, "peer_state": st.state,
                "last_seen": (time.time() - (t - st.last_seen)) if st.last_seen else None,
                "rtt_ms": st.rtt_ms, "rejected": st.rejected,
                "links": [node_id_from_key(k) for k in st.links],
            })
        c = self.core.counters
        return {
            "node_id": self.node_id,
            "name": self.config.name,
            "federation": self.config.federation,
            "state": self.state,
            "round": m.completed,
            "rounds_total": m.rounds_total,
            "current_round": m.current if m.phase not in (Phase.DONE,) else m.completed,
            "aggregator": node_id_from_key(agg) if agg else None,
            "is_aggregator": agg == self.identity.public_key if agg else False,
            "attempt": m.attempt,
            "mode": "offline" if m.offline else "elected",
            "quorum": {"need": m.quorum, "have": len(m.participants())},
            "members": sorted(node_id_from_key(k) for k in m.members()),
            "offline_steps": m.offline_steps,
            "collect_deadline_s": round(m.deadlines.collect(), 3),
            "peers": peers,
            "model_hash": self.model_hash(),
            "global_model_hash": m.model_digest.hex(),
            "genesis_hash": m.genesis_digest.hex(),
            "model_raw_bytes": int(sum(v.nbytes for v in self.weights.values())),
            "accuracy": self.accuracy,
            "loss": self.loss,
            "evaluated_round": self.evaluated_round,
            "resumed_from": self.resumed_from,
            "checkpoint_round": self.checkpoint_round,
            "resumed_offline_step": self.resumed_offline_step,
            "offline_checkpoint_step": self.offline_checkpoint_step,
            "peer_port": self.peer_port,
            "web_port": self.web_port,
            "uptime_s": time.time() - self.started_at,
            "trust": {"federation_secret": self.trust.federation_key is not None,
                      "open": self.trust.open, "paired": len(self.trust_store)},
            "traffic": {
                "bytes_sent": c.bytes_sent, "bytes_received": c.bytes_received,
                "messages_sent": c.messages_sent, "messages_received": c.messages_received,
                "rejected": c.rejected, "rejected_reasons": dict(c.rejected_reasons),
                "duplicates": c.duplicates, "relayed": c.relayed,
            },
            "learner": self.learner.describe(),
            "resources": resources(),
            "privacy": self.learner.privacy(),
            "stopped_reason": self.stopped_reason if m.phase is Phase.STOPPED else None,
        }

    # -- supervision ------------------------------------------------------------------

    def request_shutdown(self) -> None:
        """Ask ``run`` to stop gracefully (signal handlers call this)."""
        self._shutdown.set()
        self._stop_training.set()

    async def run(self) -> None:
        """Serve peers and the web API, and train, until shutdown is requested."""
        peer_app = self.transport.app()
        async def pair(request: web.Request) -> web.StreamResponse:
            return await handle_pair_request(self, request)

        peer_app.router.add_post(PAIR_PATH, pair)
        peer_runner = web.AppRunner(peer_app, handle_signals=False)
        web_runner = web.AppRunner(self._web_app(), handle_signals=False)
        await peer_runner.setup()
        await web_runner.setup()
        try:
            peer_site = web.TCPSite(peer_runner, self.config.host, self.config.port)
            await peer_site.start()
            web_site = web.TCPSite(web_runner, self.config.web_host, self.config.web_port)
            await web_site.start()
            self.peer_port = _bound_port(peer_runner)
            self.web_port = _bound_port(web_runner)
            self.allowed_hosts.update(allowed_hosts_for(self.config.web_host, self.web_port,
                                                        self.config.web_allowed_hosts))
            self.core.port = self.peer_port
            self._write_endpoint()
            log.info("node %s (%s) peer port %d, web http://%s:%d/", self.config.name,
                     self.node_id, self.peer_port, self.config.web_host, self.web_port)
            if self.trust.open:
                log.warning("--open: trusting every node of federation %r; for local demos"
                            " only", self.config.federation)
            self.core.addresses = self._advertised_addresses()
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for key, address in self.static_peers:
                    self.dial(address, key)
                tg.create_task(self._worker(), name="worker")
                tg.create_task(self._checkpointer(), name="checkpointer")
                tg.create_task(self._timer(), name="timer")
                tg.create_task(self._heartbeats(), name="heartbeats")
                tg.create_task(self._announcements(), name="announcements")
                if self.config.mdns:
                    tg.create_task(self._discovery(), name="discovery")
                self.machine.start(now())
                self._drain()
                await self._shutdown.wait()
                raise _Shutdown
        except* _Shutdown:
            pass
        finally:
            self._tg = None
            self._stop_training.set()
            await self.transport.close()
            await web_runner.cleanup()
            await peer_runner.cleanup()
            if self._events:
                self.db.add_events(self._events)  # the loop is stopping: nothing else runs
            self.db.close()
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / ENDPOINT_FILE).unlink()
            log.info("node %s stopped", self.config.name)

    def _restore_offline(self) -> int:
        """Resume the offline model that continues the restored round, if saved (0: none)."""
        m = self.machine

        def verify(round_number: int, digest: bytes, frame: bytes) -> None:
            try:
                env = decode(frame, max_size=self.config.max_message_size)
                msg = env.message
                if env.federation != self.config.federation or env.sender != m.self_key:
                    raise ProtocolError("not ours")
                if not isinstance(msg, Share) or weights_digest(msg.weights) != digest:
                    raise ProtocolError("weights do not match their digest")
                m.check_spec(msg.weights, "offline checkpoint")
            except ProtocolError as exc:
                raise CheckpointError(exc.reason) from None
            if round_number != m.current or msg.base != m.model_digest:
                raise CheckpointError(f"stale (round {round_number}, resumed round"
                                      f" {m.completed})")

        ckpt = self.checkpoints.load_offline(verify)
        if ckpt is None:
            return 0
        share = decode(ckpt.frame).message
        assert isinstance(share, Share)
        self.weights = {k: np.array(v) for k, v in from_tensors(share.weights).items()}
        m.local_digest = ckpt.digest
        m.offline_steps = share.step
        log.info("resuming the offline model of step %d (round %d)", share.step, ckpt.round)
        return share.step

    def _restore(self) -> int:
        """Resume from the newest good checkpoint (0: none, starting from genesis)."""

        def verify(round_number: int, digest: bytes, frame: bytes) -> None:
            try:
                env = decode(frame, max_size=self.config.max_message_size)
                msg = env.message
                if env.federation != self.config.federation:
                    raise ProtocolError("from another federation")
                if not isinstance(msg, Model) or msg.round != round_number:
                    raise ProtocolError("does not hold the model of its round")
                if msg.digest != digest or weights_digest(msg.weights) != digest:
                    raise ProtocolError("weights do not match their digest")
                self.machine.check_spec(msg.weights, "checkpoint", state=True)
            except ProtocolError as exc:
                raise CheckpointError(exc.reason) from None
            if round_number > self.config.rounds:
                raise CheckpointError(f"round {round_number} is beyond --rounds"
                                      f" {self.config.rounds}")

        ckpt = self.checkpoints.load_latest(verify)
        rows = self.db.rounds()
        if ckpt is None:
            return 0
        msg = decode(ckpt.frame, max_size=self.config.max_message_size).message
        assert isinstance(msg, Model)
        self.machine.completed = ckpt.round
        self.machine.model_digest = ckpt.digest
        self.machine.last_aggregator = msg.aggregator
        self.weights = {k: np.array(v) for k, v in from_tensors(msg.weights).items()}
        self.global_weights = self.weights
        self.core.latest_model_frame = ckpt.frame
        done = [r for r in rows if r["round"] <= ckpt.round and r["accuracy"] is not None]
        if done:
            self.accuracy, self.loss = done[-1]["accuracy"], done[-1]["loss"]
            self.evaluated_round = done[-1]["round"]
        log.info("resuming from the checkpoint of round %d (%s)", ckpt.round, ckpt.path.name)
        return ckpt.round

    def _web_app(self) -> web.Application:
        from node.web.api import build_web_app

        return build_web_app(self)

    def _write_endpoint(self) -> None:
        atomic_write(self.state_dir / ENDPOINT_FILE, json.dumps({
            "pid": os.getpid(), "node_id": self.node_id, "peer_port": self.peer_port,
            "web_port": self.web_port, "web_host": self.config.web_host,
        }).encode(), mode=0o644)

    # -- machine driving --------------------------------------------------------------

    def _drain(self) -> None:
        """Carry out the round machine's actions, then re-arm the timer."""
        for action in self.machine.take_actions():
            if isinstance(action, StartTraining):
                self._queue("train", action)
            elif isinstance(action, SendUpdate):
                self._queue("send_update", action)
            elif isinstance(action, ShareModel):
                self._queue("share", action)
            elif isinstance(action, Average):
                self._queue("average", action)
            elif isinstance(action, Aggregate):
                self._queue("aggregate", action)
            elif isinstance(action, PublishModel):
                self._queue("publish", action)
            elif isinstance(action, Commit):
                self._on_commit(action)
            elif isinstance(action, Note) and action.kind == "aggregating":
                log.info("%s", action.detail)
            elif isinstance(action, Note):
                # Written by the checkpointer's thread, not here on the event loop.
                self.note(action.kind, action.detail)
                if action.kind == "done":
                    self.hub.publish("training_stopped", {"round": self.machine.completed,
                                                          "reason": "done"})
                level = logging.WARNING if action.kind in ("aggregator_failed",
                                                           "model_conflict") else logging.INFO
                log.log(level, "%s: %s", action.kind.replace("_", " "), action.detail)
        self._flush()
        self._timer_changed.set()

    def _flush(self) -> None:
        """Put the core's outgoing frames on their links."""
        for key, frame in self.core.take_sends():
            if not self.transport.send(key, frame):
                log.debug("no link to %s: frame dropped", node_id_from_key(key))

    def dial(self, address: str, key: bytes | str | None = None) -> None:
        """Keep a link to ``address`` (once per address), checking the key if one is given."""
        if self._tg is None or (address, key) in self._dials:
            return
        expected = None
        if isinstance(key, bytes):
            expected = key.__eq__
        elif isinstance(key, str):
            expected = lambda k, want=key: node_id_from_key(k) == want  # noqa: E731
        # Keyed by address *and* expected key: another key announced at a known address
        # gets its own check (that is how an impostor is caught).
        self._dials[(address, key)] = self._tg.create_task(
            self.transport.dial(address, expected), name=f"dial {address}")

    def forget(self, key: bytes) -> None:
        """A paired key was removed from the trust store: stop trusting it now."""
        st = self.core.known.get(key)
        if st is None or st.trust != "paired":
            return
        st.trusted, st.trust = False, ""
        link = self.transport.links.get(key)
        if link is not None and self._tg is not None:
            link.closed.set()
            self._tg.create_task(close_ws(link.ws), name="close unpaired link")

    def undial(self, address: str, key: bytes | str | None = None) -> None:
        """Stop keeping a link to ``address`` for ``key`` (a discovered node left)."""
        task = self._dials.pop((address, key), None)
        if task is not None:
            task.cancel()

    def _advertised_addresses(self) -> tuple[str, ...]:
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            addrs = local_addresses()
        else:
            addrs = [host]
        return tuple(f"{a}:{self.peer_port}" for a in addrs[:8])

    def _on_commit(self, action: Commit) -> None:
        model = action.model
        # Copy: the wire buffers are read-only views into the received frame.
        self.weights = {k: np.array(v) for k, v in from_tensors(model.weights).items()}
        self.global_weights = self.weights
        self._stop_training.set()  # a model for the round we train means our work is moot
        self._stats(model.round)["committed_at"] = time.time()
        if action.source != self.identity.public_key:
            # The signed frame we just received; our own model's frame is made (and
            # checkpointed) by its publish job.
            frame = self.core.latest_model_frame
            if frame is not None:
                self._checkpoint(model.round, model.digest, frame)
        self._background.append(("evaluate", (action, self.weights)))
        self._work.set()
        self.hub.publish("round_completed", {
            "round": model.round, "model_hash": model.digest.hex(),
            "aggregator": node_id_from_key(model.aggregator),
            "contributors": len(model.contributors)})

    def _checkpoint(self, round_number: int, digest: bytes, frame: bytes) -> None:
        """Have the checkpointer write this model (a newer one supersedes a pending one)."""
        pending = self._ckpt_pending
        if pending is None or pending[0] < round_number:
            self._ckpt_pending = (round_number, digest, frame)
            self._ckpt_wanted.set()

    async def _checkpointer(self) -> None:
        """Write checkpoints (and queued events) on their own thread, never queued behind
        training and never on the event loop."""
        while True:
            await self._ckpt_wanted.wait()
            self._ckpt_wanted.clear()
            events, self._events = self._events, []
            if events:
                await asyncio.to_thread(self.db.add_events, events)
            pending, self._ckpt_pending = self._ckpt_pending, None
            if pending is not None:
                await asyncio.to_thread(self.checkpoints.save, *pending)
                self.checkpoint_round = max(self.checkpoint_round, pending[0])
            offline, self._offline_pending = self._offline_pending, None
            if offline is not None:
                await asyncio.to_thread(self.checkpoints.save_offline, *offline[:3])
                self.offline_checkpoint_step = offline[3]

    def _stats(self, round_number: int) -> dict[str, float]:
        return self._round_stats.setdefault(round_number, {})

    def _queue(self, kind: str, action: Any) -> None:
        self._jobs.append((kind, action))
        self._work.set()

    async def _worker(self) -> None:
        """Run blocking jobs one at a time on a worker thread: round work in order first,
        then evaluations."""
        trains_since_eval = 0
        while True:
            # Evaluations wait for idle time, but never more than one further round of
            # training (a node training alone is never idle).
            starved = trains_since_eval >= 1 and self._jobs and self._jobs[0][0] == "train"
            if self._background and (not self._jobs or starved):
                kind, action = self._background.popleft()
                trains_since_eval = 0
            elif self._jobs:
                kind, action = self._jobs.popleft()
                trains_since_eval += kind == "train"
            else:
                self._work.clear()
                await self._work.wait()
                continue
            try:
                await self._run_job(kind, action)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s job failed", kind)

    async def _run_job(self, kind: str, action: Any) -> None:
        if kind == "train":
            if action.round != self.machine.current or self.machine.phase is not (
                    Phase.OFFLINE if action.offline else Phase.TRAINING):
                return
            refusal = await asyncio.to_thread(self.learner.can_train)
            if refusal is not None:
                # The privacy budget is spent: peers see the node stopped and carry on.
                log.warning("training stopped: %s", refusal)
                self.halt(refusal, reason=refusal, kind="training_refused", detail=refusal)
                return
            self._stats(action.round)["started_at"] = time.time()
            self._stop_training.clear()
            base = self.weights
            result = await asyncio.to_thread(self.learner.train, base, action.round,
                                             self._stop_training)
            self._stats(action.round)["train_seconds"] = result.seconds
            what = (f"offline step {self.machine.offline_steps + 1} (round {action.round})"
                    if action.offline else f"round {action.round}")
            log.info("%s: trained on %d examples in %.2f s (loss %.4f)", what,
                     result.num_examples, result.seconds, result.loss)
            self.machine.training_done(action.round, to_tensors(result.weights),
                                       result.num_examples, float(result.loss),
                                       float(result.seconds), now())
        elif kind == "send_update":
            # Delta and codec work on the worker thread, like the encoding of large frames.
            message = await asyncio.to_thread(self._compressed, action.update)
            frame = await self._encode(self.core.frame, message)
            self._stats(action.update.round)["update_bytes"] = len(frame)
            if not self.core.send_to(action.to, frame):
                log.warning("no route to aggregator %s", node_id_from_key(action.to))
        elif kind == "share":
            frame = await self._encode(self.core.frame, action.share)
            for key in action.to:
                self.core.send_to(key, frame)
        elif kind == "average":
            models = [(from_tensors(m.weights), m.num_examples) for m in action.models.values()]
            merged = await asyncio.to_thread(self.learner.average, models)
            self.weights = {k: np.asarray(v, order="C") for k, v in merged.items()}
            log.info("offline step %d: averaged with %d peer(s)", self.machine.offline_steps + 1,
                     len(models) - 1)
            tensors = to_tensors(self.weights)
            digest = weights_digest(tensors)
            # Offline progress survives a crash: our own signed share of what we hold.
            step = self.machine.offline_steps + 1
            frame = await self._encode(self.core.frame, Share(
                round=action.round, step=step, base=self.machine.model_digest,
                num_examples=0, loss=0.0, weights=tensors))
            self._offline_pending = (action.round, digest, bytes(frame), step)
            self._ckpt_wanted.set()
            self.machine.average_done(action.round, action.step, digest, now())
        elif kind == "aggregate":
            try:
                updates, merged = await asyncio.to_thread(self._aggregate_updates,
                                                          action.updates.values())
            except (ValueError, ProtocolError) as exc:
                log.error("round %d: aggregation failed: %s", action.round, exc)
                self.machine.aggregation_failed(action.round, str(exc)[:200], now())
                self._drain()
                return
            merged = {k: np.asarray(v, order="C") for k, v in merged.items()}
            self.machine.aggregation_done(action.round, action.attempt, to_tensors(merged),
                                          action.updates.keys(),
                                          sum(n for _, n in updates), now())
        elif kind == "publish":
            frame = await self._encode(self.core.publish, action.model)
            self._stats(action.model.round)["model_bytes"] = len(frame)
            self.core.spread_model(frame)
            log.info("round %d: published the global model", action.model.round)
            self._checkpoint(action.model.round, action.model.digest, bytes(frame))
        elif kind == "evaluate":
            await self._evaluate(action)
        self._drain()

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

    def _aggregate_updates(self, received: Iterable[Update | Delta]
                           ) -> tuple[list[tuple[Weights, int]], Weights]:
        """Decode the round's updates and aggregate them (blocking: on the worker thread)."""
        updates = [(self._dense(u), u.num_examples) for u in received]
        return updates, self.learner.aggregate(self.global_weights, updates)

    def _dense(self, update: Update | Delta) -> Weights:
        """Full weights of an update: a delta is added to the global model it was made
        from (the machine took it only if that is ours)."""
        if isinstance(update, Update):
            return from_tensors(update.weights)
        return apply_delta(self._global_model(), self.core.check_delta(update))

    def _global_model(self) -> Weights:
        """The last global model's tensors, without strategy state."""
        return {k: v for k, v in self.global_weights.items() if not k.startswith(STATE_PREFIX)}

    async def _encode(self, fn: Any, message: Any) -> bytes | bytearray:
        params = sum(t.nbytes for t in message.weights) // 4
        if params >= THREAD_ENCODE_MIN_PARAMS:
            return await asyncio.to_thread(fn, message)
        return fn(message)

    async def _evaluate(self, job: tuple[Commit, Weights]) -> None:
        action, weights = job
        model = action.model
        result = await asyncio.to_thread(self.learner.evaluate, weights)
        st = self._round_stats.pop(model.round, {})
        for old in [r for r in self._round_stats if r < model.round]:
            del self._round_stats[old]  # rounds we skipped by catching up
        committed = st.get("committed_at", time.time())
        # A round we never trained (caught up) counts from its commit.
        started = st.get("started_at", committed)
        self.accuracy, self.loss = float(result.accuracy), float(result.loss)
        privacy = self.learner.privacy()
        finished = time.time()
        record = RoundRecord(
            round=model.round, accuracy=self.accuracy, loss=self.loss,
            aggregator=node_id_from_key(model.aggregator), contributors=len(model.contributors),
            num_examples=model.num_examples, model_hash=model.digest.hex(),
            started_at=started, committed_at=committed, evaluated_at=finished,
            train_seconds=float(st.get("train_seconds", 0.0)),
            round_seconds=committed - started,
            update_bytes=int(st.get("update_bytes", 0)), model_bytes=int(st.get("model_bytes", 0)),
            epsilon=privacy["epsilon"] if privacy else None,
        )
        self.history.append(record)
        self.evaluated_round = max(self.evaluated_round, record.round)
        await asyncio.to_thread(self.db.record_round, record.as_json())
        self.hub.publish("metrics_update", {**record.as_json(), "ts": finished})
        log.info("round %d/%d committed: accuracy %.4f loss %.4f aggregator %s model %s",
                 model.round, self.machine.rounds_total, self.accuracy, self.loss,
                 record.aggregator, record.model_hash[:12])

    async def _timer(self) -> None:
        """Call ``machine.tick`` at its deadlines."""
        while True:
            deadline = self.machine.next_deadline()
            self._timer_changed.clear()
            timeout = None if deadline is None else max(0.0, deadline - now())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._timer_changed.wait()
                    continue
            self.machine.tick(now())
            self._drain()

    async def _heartbeats(self) -> None:
        """Tell every peer our round and state, and measure RTT, once per interval."""
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            if self.transport.links:
                self.transport.broadcast(self.core.heartbeat(self.state))

    async def _announcements(self) -> None:
        """Gossip our announcement and expire silent relayed members, once per interval."""
        while True:
            self.core.announce(self.state)
            self.core.tick(now())
            self._drain()
            await asyncio.sleep(self.config.announce_interval)

    async def _discovery(self) -> None:
        from node.peers.discovery import Discovery

        discovery = Discovery(self)
        await discovery.run()

    # -- transport callbacks ----------------------------------------------------------

    async def _on_frame(self, link: Link, env: Envelope, frame: bytes) -> None:
        self.core.dispatch(link.key, env, frame, now())
        msg = env.message
        if isinstance(msg, Heartbeat) and msg.echo_ts == 0:
            self.transport.send(link.key, self.core.heartbeat(self.state, echo_ts=msg.ping_ts))
        self._drain()

    def _on_link_up(self, link: Link, hello: Hello, trust: str) -> None:
        self.core.link_up(link.key, hello, link.address, trust, now())
        self._drain()
        self.hub.publish("peer_joined", {"node_id": node_id_from_key(link.key),
                                         "name": hello.name})

    def _on_link_down(self, link: Link) -> None:
        self.core.link_down(link.key, now())
        self._drain()
        self.hub.publish("peer_left", {"node_id": node_id_from_key(link.key)})

    def broadcast_state(self) -> None:
        """Tell every linked peer our state now, not at the next heartbeat."""
        if self.transport.links:
            self.transport.broadcast(self.core.heartbeat(self.state))


class _Shutdown(Exception):
    """Raised inside the task group to cancel its tasks on shutdown."""


def _bound_port(runner: web.AppRunner) -> int:
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            return int(server.sockets[0].getsockname()[1])
    raise RuntimeError("site not bound")


def local_addresses() -> list[str]:
    """This host's non-loopback IPv4 addresses (for announcements), else 127.0.0.1."""
    import psutil

    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                out.append(a.address)
    return sorted(out) or ["127.0.0.1"]


def install_signal_handlers(node: Node) -> None:
    """SIGINT, SIGTERM and SIGHUP (its terminal closed) ask the node to shut down
    gracefully."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, node.request_shutdown)
