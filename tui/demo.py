"""A made-up node for trying the dashboard without one (``python -m tui --demo``).

:class:`DemoSource` is a :class:`~tui.source.DataSource` that plays a fixed story: node
``alpha`` of federation ``lab`` with three peers (``delta`` reached through ``charlie``)
has completed 5 of 10 rounds. ``s`` and ``x`` change its state as a node would; ``p`` shows
a pairing code that no node will accept. The same story makes the screenshot in
docs/tui.svg (scripts/tui_screenshot.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from .source import connection_message

_IDS = {"alpha": "KQ7M-3XRT-P2VD-N8WA-5", "bravo": "B4HD-ZL2C-8YKE-QW6M-T",
        "charlie": "CX9P-RT4N-M2LS-7VBA-K", "delta": "D3WF-6HQJ-YN8C-2ZRE-P"}
_ACCURACY = (0.412, 0.655, 0.781, 0.846, 0.889)
_LOSS = (1.871, 1.122, 0.743, 0.521, 0.398)


def _peer(name: str, state: str, trust: str, round_: int, rtt_ms: float | None,
          links: tuple[str, ...]) -> dict[str, Any]:
    return {"node_id": _IDS[name], "name": name, "address": None, "state": state,
            "trusted": True, "trust": trust, "round": round_, "peer_state": "training",
            "last_seen": None, "rtt_ms": rtt_ms,
            "links": [_IDS[x] for x in links]}


def demo_status(state: str = "training") -> dict[str, Any]:
    """alpha's status object once the story's rounds are done (contract shape)."""
    completed = len(_ACCURACY)
    return {
        "node_id": _IDS["alpha"], "name": "alpha", "federation": "lab", "state": state,
        "mode": "elected", "quorum": {"need": 3, "have": 4},
        "round": completed, "rounds_total": 10, "current_round": completed + 1,
        "aggregator": _IDS["bravo"], "is_aggregator": False, "attempt": 0,
        "model_hash": "9f2c4e1a7b3d", "accuracy": _ACCURACY[completed - 1],
        "loss": _LOSS[completed - 1], "evaluated_round": completed,
        "peer_port": 7700, "web_port": 7800, "uptime_s": 312.0,
        "peers": [_peer("bravo", "connected", "paired", completed, 1.8, ("alpha", "charlie")),
                  _peer("charlie", "connected", "secret", completed, 3.2,
                        ("alpha", "bravo", "delta")),
                  _peer("delta", "relayed", "secret", completed, None, ("charlie",))],
        "resources": {"cpu_percent": 87.5, "memory_rss": 412_000_000,
                      "memory_percent": 2.6, "net_bytes_sent": 48_200_000,
                      "net_bytes_recv": 51_900_000},
        "traffic": {"bytes_sent": 41_300_000, "bytes_received": 44_800_000},
        "privacy": {"epsilon": 1.37, "delta": 1e-5, "target_epsilon": 3.0},
    }


def demo_story(epoch: float) -> list[dict[str, Any]]:
    """The story's messages, in order: start-up at ``epoch``, five rounds, the sixth begun."""
    t = epoch
    messages: list[dict[str, Any]] = [
        {"type": "event", "ts": t, "data": {"kind": "start",
                                            "detail": "alpha listening on 0.0.0.0:7700"}},
        {"type": "peer_joined", "ts": t + 2, "data": {"node_id": _IDS["bravo"],
                                                     "name": "bravo"}},
        {"type": "peer_joined", "ts": t + 3, "data": {"node_id": _IDS["charlie"],
                                                     "name": "charlie"}},
        {"type": "event", "ts": t + 5, "data": {"kind": "relay",
                                                "detail": "delta reachable through charlie"}},
        {"type": "event", "ts": t + 6, "data": {"kind": "quorum",
                                                "detail": "4 nodes present, 3 needed"}},
    ]
    aggregators = ("alpha", "bravo", "charlie", "delta", "alpha")
    for i, (accuracy, loss) in enumerate(zip(_ACCURACY, _LOSS, strict=True), start=1):
        ts = t + 6 + 55 * i
        done = {"round": i, "model_hash": f"{i}f2c4e1a7b3d",
                "aggregator": _IDS[aggregators[i - 1]]}
        messages += [
            {"type": "training_started", "ts": ts - 50, "data": {"round": i}},
            {"type": "metrics_update", "ts": ts, "data": {
                **done, "contributors": 4, "accuracy": accuracy, "loss": loss, "ts": ts}},
            {"type": "round_completed", "ts": ts, "data": done},
        ]
    messages += [
        {"type": "event", "ts": t + 300, "data": {"kind": "election",
                                                  "detail": "bravo aggregates round 6"}},
        {"type": "training_started", "ts": t + 301, "data": {"round": 6}},
        {"type": "status_update", "ts": t + 312, "data": demo_status()},
    ]
    # The status comes first so that names resolve in the lines that follow.
    return [{"type": "hello", "ts": t, "data": demo_status()}, connection_message(True),
            *messages]


class DemoSource:
    """A :class:`~tui.source.DataSource` that plays :func:`demo_story`, then obeys s/x.

    The story starts ``epoch`` (unix time; by default 320 s ago) and ends 312 s later.
    ``played`` is set once every message of the story has been taken by the consumer.
    """

    def __init__(self, epoch: float | None = None) -> None:
        self.epoch = time.time() - 320 if epoch is None else epoch
        self.played = asyncio.Event()
        self._pending: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The story, then what the commands make the node say."""
        for message in demo_story(self.epoch):
            yield message
        self.played.set()
        while True:
            yield await self._pending.get()

    def _switch(self, state: str, message: dict[str, Any]) -> str:
        self._pending.put_nowait(message)
        self._pending.put_nowait({"type": "status_update", "data": demo_status(state)})
        return state

    async def start(self) -> str:
        """Resume training round 6."""
        return self._switch("training", {"type": "training_started", "data": {"round": 6}})

    async def stop(self) -> str:
        """Stop training in round 6."""
        return self._switch("stopped", {"type": "training_stopped",
                                        "data": {"round": 6, "reason": "stopped by operator"}})

    async def pairing_uri(self) -> str:
        """A well-formed pairing URI with a token no node has issued."""
        return ("fl-node://pair?v=1&key=Xq3b8Jm2Yt5Vw7Kp9Lr4Nd6Fh1Gs0Ac3Ez8Qu2Io5Py"
                "&name=alpha&fed=lab&addr=192.168.1.20:7700"
                "&token=demo-7Hk2Pq9Wx4Zr6Tn1Vb8Ms3&exp=1767272400")
