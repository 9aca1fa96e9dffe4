"""Live events for the dashboard's WebSockets: the node publishes, every socket gets its
own bounded queue, and none can make the node wait or grow without bound."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The event type of the periodic status snapshot: the one a full queue may drop.
STATUS_UPDATE = "status_update"
#: Events a subscriber may have queued before the drop policy applies.
DEFAULT_QUEUE_SIZE = 256


@dataclass(frozen=True, slots=True)
class HubEvent:
    """One published event: its type and its WebSocket message, serialised once."""

    type: str
    text: str


class SubscriberLagging(Exception):
    """The subscriber fell so far behind that events had to be lost; it must resync."""


class Subscription:
    """One WebSocket's bounded queue of hub events.

    A deque and an Event rather than an ``asyncio.Queue``: the drop policy removes the
    oldest ``status_update`` from the middle of the queue, which a Queue cannot do.
    When the queue is full, the oldest status update goes (a newer one is queued anyway);
    with none to drop, a new status update is discarded, and any other event marks the
    subscriber as lagging: its queue is cleared and ``get`` raises ``SubscriberLagging``,
    so the socket closes and the browser reconnects and reloads the history.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self.lagging = False
        #: Status updates dropped so far, for tests and logs.
        self.dropped = 0
        self._items: collections.deque[HubEvent] = collections.deque()
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, event: HubEvent) -> None:
        """Queue an event without ever blocking; apply the drop policy when full."""
        if self.lagging:
            return
        if len(self._items) >= self.maxsize and not self._drop_oldest_status():
            if event.type == STATUS_UPDATE:
                self.dropped += 1
                return
            self.lagging = True
            self._items.clear()
            self._ready.set()
            return
        self._items.append(event)
        self._ready.set()

    def _drop_oldest_status(self) -> bool:
        for item in self._items:
            if item.type == STATUS_UPDATE:
                self._items.remove(item)
                self.dropped += 1
                return True
        return False

    async def get(self) -> HubEvent:
        """The next event, waiting for one; raises SubscriberLagging once lagging."""
        while not self._items:
            if self.lagging:
                raise SubscriberLagging
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


def message(type_: str, data: Any, ts: float | None = None) -> str:
    """A WebSocket message as the page expects it: ``{"type", "data", "ts"}`` (now by
    default) in JSON."""
    return json.dumps({"type": type_, "data": data, "ts": time.time() if ts is None else ts})


class EventHub:
    """Fans the node's live events out to every connected WebSocket.

    Call ``publish`` from the node's event loop only (it is not thread-safe). It never
    blocks and never grows without bound: each subscriber has its own bounded queue (see
    ``Subscription``), and a subscriber that lags is dropped from the hub.
    """

    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self.queue_size = queue_size
        self._subscribers: set[Subscription] = set()

    @property
    def subscriber_count(self) -> int:
        """How many subscriptions receive events now."""
        return len(self._subscribers)

    def subscribe(self) -> Subscription:
        """A new subscription; pair it with ``unsubscribe``."""
        sub = Subscription(self.queue_size)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop delivering to ``sub`` (idempotent)."""
        self._subscribers.discard(sub)

    def publish(self, type: str, data: Mapping[str, Any], ts: float | None = None) -> None:
        """Send ``{"type", "data", "ts"}`` to every subscriber (``ts``: now by default).

        ``data`` must be JSON-serialisable; it is serialised here, once.
        """
        event = HubEvent(type, message(type, dict(data), ts))
        for sub in list(self._subscribers):
            sub.put(event)
            if sub.lagging:
                self._subscribers.discard(sub)
