"""One failure policy: what is broken in a running node, for status and ``/healthz``.

Every supervised part of a node (the worker, the checkpointer, discovery, announcements,
dialers, the event log) reports an unexpected failure here. The first failure of a
component is logged with its traceback; repeats of the same failure are counted, not
logged again, so a loop that keeps failing cannot flood the log. The node is ``degraded``
while any component is failing, and ``ok`` again when each has recovered (status and
``/healthz`` say which, and why). Whether the node keeps serving or stops is decided by
the supervisor (node.runtime.supervisor), not here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: How much of an exception's text status shows.
REASON_CHARS = 200


def describe(exc: BaseException) -> str:
    """A one-line reason for ``exc``: its type and message, shortened."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:REASON_CHARS] if text else type(exc).__name__


@dataclass
class Problem:
    """A component that is failing: why, since when, and how often."""

    reason: str
    since: float
    count: int = 1

    def as_json(self) -> dict[str, object]:
        return {"reason": self.reason, "since": self.since, "count": self.count}


class Health:
    """The failing components of one node (empty: healthy)."""

    def __init__(self) -> None:
        self.problems: dict[str, Problem] = {}

    @property
    def state(self) -> str:
        """``ok`` or ``degraded``."""
        return "degraded" if self.problems else "ok"

    def failed(self, component: str, exc: BaseException, *, action: str = "") -> None:
        """``component`` failed with ``exc``. Logged with its traceback the first time
        (and whenever the reason changes); ``action`` says what the node does about it."""
        reason = describe(exc)
        problem = self.problems.get(component)
        if problem is not None and problem.reason == reason:
            problem.count += 1
            log.debug("%s failed again (%d times): %s", component, problem.count, reason)
            return
        self.problems[component] = Problem(reason, time.time())
        log.error("%s failed: %s%s", component, reason, f"; {action}" if action else "",
                  exc_info=(type(exc), exc, exc.__traceback__))

    def recovered(self, component: str) -> None:
        """``component`` works again."""
        problem = self.problems.pop(component, None)
        if problem is not None:
            log.warning("%s works again (after %d failure(s): %s)", component, problem.count,
                        problem.reason)

    def as_json(self) -> dict[str, object]:
        """``{"state": "ok"|"degraded", "problems": {component: {...}}}``."""
        return {"state": self.state,
                "problems": {k: p.as_json() for k, p in sorted(self.problems.items())}}
