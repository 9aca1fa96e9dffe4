"""What the web API and the dashboard may see and change on a running node.

``NodeControl`` implements node.web.dashboard's ``Controllable`` for a ``Node``: the event
history, the configuration (which keys apply at runtime), start and stop. ``NodeEvents``
is the node's event sink: the event log (written to the database by the checkpointer,
off the loop) and the live events pushed to WebSocket clients through the ``EventHub``.

Runtime keys (``POST /api/config``) take effect at once: ``round_timeout`` (from the next
deadline), ``min_peers`` (the quorum, from the next round start), ``local_epochs``, ``lr``
and ``batch_size`` (from the next training), ``fanout`` (next gossip), ``log_level``.
Every other key is shown but needs a restart (the error says so).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from node.common.health import Health
from node.config import FIELD_TYPES, ConfigError, coerce
from node.peers.transport import now
from node.runtime.checkpoints import NodeDB
from node.web.hub import EventHub
from protocol.identity import node_id_from_key
from protocol.rounds import Phase, RoundTimeouts

if TYPE_CHECKING:
    from node.runtime.supervisor import Node

log = logging.getLogger(__name__)

RUNTIME_KEYS = frozenset({"round_timeout", "min_peers", "local_epochs", "lr", "batch_size",
                          "fanout", "log_level"})
#: Learner attributes that a config key of the same name sets.
_LEARNER_KEYS = ("local_epochs", "lr", "batch_size")
#: Members whose first refusal was logged (the set starts over beyond this many).
MAX_WARNED = 1024
#: Events kept in memory while the database refuses them (disk full): the oldest go first.
MAX_PENDING_EVENTS = 10_000


def round_timeouts(round_timeout: float, start: float) -> RoundTimeouts:
    """The machine's deadlines for ``--round-timeout`` and ``--start-timeout``."""
    return RoundTimeouts(collect=round_timeout, model=round_timeout * 1.5, start=start,
                         floor=min(5.0, round_timeout))


class NodeEvents:
    """The node's ``EventSink``: the event log (database) and live events (hub)."""

    def __init__(self, db: NodeDB, hub: EventHub, health: Health) -> None:
        self.db = db
        self.hub = hub
        self.health = health
        self.pending: list[tuple[float, str, str]] = []
        self._warned: set[str] = set()
        #: Called when events wait to be written (the supervisor wakes its checkpointer).
        self.on_write: Callable[[], None] = lambda: None

    def note(self, kind: str, detail: str) -> None:
        """Record an event (database, via the checkpointer) and push it to clients."""
        ts = time.time()
        self.pending.append((ts, kind, detail))
        del self.pending[:-MAX_PENDING_EVENTS]
        self.on_write()
        self.hub.publish("event", {"ts": ts, "kind": kind, "detail": detail}, ts=ts)

    def member_failed_check(self, key: bytes, reason: str, cut: bool) -> None:
        """A member sent something that failed a check (node.peers.checks): logged once
        per member (and when it is cut off), always in the event log."""
        who = node_id_from_key(key)
        if cut:
            log.warning("cut off %s after repeated failed checks: %s", who, reason)
            self.note("member_cut_off", f"{who}: {reason}")
            self.hub.publish("peer_left", {"node_id": who})
            return
        if who not in self._warned:
            if len(self._warned) >= MAX_WARNED:
                self._warned.clear()  # bounded: some member may be warned about twice
            self._warned.add(who)
            log.warning("refused what %s sent: %s", who, reason)
        self.note("member_refused", f"{who}: {reason}")

    def publish(self, event: str, data: dict[str, Any]) -> None:
        """Push a live event to WebSocket clients."""
        self.hub.publish(event, data)

    def flush(self) -> None:
        """Write pending events (blocking: off the loop). A database that refuses them
        (disk full) shows in health; they are kept and written when it works again."""
        events, self.pending = self.pending, []
        if not events:
            return
        try:
            self.db.add_events(events)
        except (sqlite3.Error, OSError) as exc:
            self.pending = (events + self.pending)[-MAX_PENDING_EVENTS:]
            self.health.failed("event log", exc, action="events kept in memory; retrying")
            return
        self.health.recovered("event log")


class NodeControl:
    """The ``Controllable`` of one node (node.web.dashboard)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    @property
    def api_token(self) -> str:
        return self.node.api_token

    @property
    def state(self) -> str:
        return self.node.state

    def status(self) -> dict[str, Any]:
        return self.node.status()

    async def metrics(self) -> list[dict[str, Any]]:
        """Every recorded round, oldest first."""
        return await asyncio.to_thread(self.node.db.rounds)

    async def events(self, limit: int) -> list[dict[str, Any]]:
        """The latest ``limit`` events, oldest first, including those not yet on disk."""
        pending = [{"ts": t, "kind": k, "detail": d} for t, k, d in self.node.events.pending]
        stored = await asyncio.to_thread(self.node.db.events, limit)
        return (stored + pending)[-limit:] if limit > 0 else []

    def config_view(self) -> dict[str, Any]:
        """The configuration the node runs with (tuples as lists)."""
        out = {}
        for f in dataclasses.fields(self.node.config):
            if f.name == "extra":
                continue
            value = getattr(self.node.config, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def runtime_keys(self) -> frozenset[str]:
        """Keys ``apply_config`` changes without a restart."""
        return RUNTIME_KEYS

    async def apply_config(self, changes: dict[str, Any]) -> list[str]:
        """Validate and apply ``changes``; ValueError (with the reason) changes nothing."""
        if not changes:
            raise ValueError("no keys given")
        values: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in FIELD_TYPES:
                raise ValueError(f"unknown key {key!r}")
            if key not in RUNTIME_KEYS:
                raise ValueError(f"{key} cannot change while the node runs: restart it with"
                                 f" --{key.replace('_', '-')}")
            values[key] = coerce(key, value, "config")
        node = self.node
        try:
            config = dataclasses.replace(node.config, **values).validated()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        node.config = config
        if "round_timeout" in values:
            node.machine.set_timeouts(round_timeouts(config.round_timeout,
                                                     node.machine.timeouts.start))
        if "min_peers" in values:
            node.machine.set_quorum(config.quorum)
        if "fanout" in values:
            node.core.fanout = config.fanout
        if "log_level" in values:
            logging.getLogger().setLevel(config.log_level)
        for key in _LEARNER_KEYS:
            if key in values and hasattr(node.learner, key):
                setattr(node.learner, key, values[key])
        applied = sorted(values)
        log.info("configuration changed: %s", ", ".join(f"{k}={values[k]!r}" for k in applied))
        node.events.note("config_changed", ", ".join(applied))
        return applied

    async def start_training(self) -> None:
        """Take part in rounds again (a stopped node resumes where it was)."""
        node, m = self.node, self.node.machine
        if m.phase is Phase.DONE:
            raise ValueError(f"the run is complete ({m.completed} rounds)")
        if m.phase is not Phase.STOPPED:
            return
        refusal = await asyncio.to_thread(node.learner.can_train)  # an RDP computation
        if refusal is not None:
            raise ValueError(refusal)
        node.executor.stopped_reason = None
        m.start(now())
        node.executor.tell_peers()
        node.after_input()
        node.hub.publish("training_started", {"round": m.current})
        node.events.note("training_started", f"by the operator, round {m.current}")

    async def stop_training(self) -> None:
        """Stop taking part after the current step; nothing is lost (start resumes)."""
        node = self.node
        if node.machine.phase in (Phase.STOPPED, Phase.DONE):
            return
        node.executor.halt("stopped by the operator", reason="operator",
                           kind="training_stopped",
                           detail=f"by the operator, round {node.machine.current}")
        node.after_input()
