"""What the web API and the dashboard may see and change on a running node.

``ControlMixin`` gives ``node.daemon.Node`` the ``Controllable`` side of node.web.dashboard:
the event history, the configuration (which keys apply at runtime), start and stop, and
the live events pushed to WebSocket clients through the node's ``EventHub``.

Runtime keys (``POST /api/config``) take effect at once: ``round_timeout`` (from the next
deadline), ``min_peers`` (the quorum, from the next round start), ``local_epochs``, ``lr``
and ``batch_size`` (from the next training), ``fanout`` (next gossip), ``log_level``.
Every other key is shown but needs a restart (the error says so).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from protocol.rounds import Phase, RoundTimeouts

from node.cli.config import _FIELD_TYPES, ConfigError, _coerce
from node.peers.transport import now

if TYPE_CHECKING:
    from node.runtime.supervisor import Node

log = logging.getLogger(__name__)

RUNTIME_KEYS = frozenset({"round_timeout", "min_peers", "local_epochs", "lr", "batch_size",
                          "fanout", "log_level"})
#: Learner attributes that a config key of the same name sets.
_LEARNER_KEYS = ("local_epochs", "lr", "batch_size")


class ControlMixin:
    """The node's control plane (mixed into node.daemon.Node)."""

    async def metrics(self: Node) -> list[dict[str, Any]]:
        """Every recorded round, oldest first."""
        return await asyncio.to_thread(self.db.rounds)

    async def events(self: Node, limit: int) -> list[dict[str, Any]]:
        """The latest ``limit`` events, oldest first, including those not yet on disk."""
        pending = [{"ts": t, "kind": k, "detail": d} for t, k, d in self._events]
        stored = await asyncio.to_thread(self.db.events, limit)
        return (stored + pending)[-limit:] if limit > 0 else []

    def config_view(self: Node) -> dict[str, Any]:
        """The configuration the node runs with (tuples as lists)."""
        out = {}
        for f in dataclasses.fields(self.config):
            if f.name == "extra":
                continue
            value = getattr(self.config, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def runtime_keys(self: Node) -> frozenset[str]:
        """Keys ``apply_config`` changes without a restart."""
        return RUNTIME_KEYS

    async def apply_config(self: Node, changes: dict[str, Any]) -> list[str]:
        """Validate and apply ``changes``; ValueError (with the reason) changes nothing."""
        if not changes:
            raise ValueError("no keys given")
        values: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in _FIELD_TYPES:
                raise ValueError(f"unknown key {key!r}")
            if key not in RUNTIME_KEYS:
                raise ValueError(f"{key} cannot change while the node runs: restart it with"
                                 f" --{key.replace('_', '-')}")
            values[key] = _coerce(key, value, "config")
        try:
            config = dataclasses.replace(self.config, **values).validated()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        self.config = config
        m = self.machine
        if "round_timeout" in values:
            m.timeouts = RoundTimeouts(collect=config.round_timeout,
                                       model=config.round_timeout * 1.5,
                                       start=m.timeouts.start,
                                       floor=min(5.0, config.round_timeout))
            m.deadlines.timeouts = m.timeouts
        if "min_peers" in values:
            m.quorum = config.quorum
        if "fanout" in values:
            self.core.fanout = config.fanout
        if "log_level" in values:
            logging.getLogger().setLevel(config.log_level)
        for key in _LEARNER_KEYS:
            if key in values and hasattr(self.learner, key):
                setattr(self.learner, key, values[key])
        applied = sorted(values)
        log.info("configuration changed: %s", ", ".join(f"{k}={values[k]!r}" for k in applied))
        self.note("config_changed", ", ".join(applied))
        return applied

    async def start_training(self: Node) -> None:
        """Take part in rounds again (a stopped node resumes where it was)."""
        m = self.machine
        if m.phase is Phase.DONE:
            raise ValueError(f"the run is complete ({m.completed} rounds)")
        if m.phase is not Phase.STOPPED:
            return
        refusal = await asyncio.to_thread(self.learner.can_train)  # an RDP computation
        if refusal is not None:
            raise ValueError(refusal)
        self.stopped_reason = None
        m.start(now())
        self._drain()
        self.broadcast_state()
        self.hub.publish("training_started", {"round": m.current})
        self.note("training_started", f"by the operator, round {m.current}")

    async def stop_training(self: Node) -> None:
        """Stop taking part after the current step; nothing is lost (start resumes)."""
        if self.machine.phase in (Phase.STOPPED, Phase.DONE):
            return
        self.halt("stopped by the operator", reason="operator", kind="training_stopped",
                  detail=f"by the operator, round {self.machine.current}")

    def halt(self: Node, why: str, *, reason: str, kind: str, detail: str) -> None:
        """Stop taking part after the current step, keeping all state (start resumes):
        ``why`` shows in status, ``reason`` in the ``training_stopped`` event, and
        ``kind``/``detail`` in the event log."""
        m = self.machine
        m.pause(now())
        self.stopped_reason = why
        self._stop_training.set()  # a training step in progress ends early, and is dropped
        self._drain()
        self.broadcast_state()  # peers stop counting us as a participant now
        self.hub.publish("training_stopped", {"round": m.current, "reason": reason})
        self.note(kind, detail)

    def note(self: Node, kind: str, detail: str) -> None:
        """Record an event (database, via the checkpointer) and push it to clients."""
        ts = time.time()
        self._events.append((ts, kind, detail))
        self._ckpt_wanted.set()
        self.hub.publish("event", {"ts": ts, "kind": kind, "detail": detail}, ts=ts)
