"""Jobs: how the executor's blocking work is written, and what it writes to.

A job is a generator that yields ``Blocking`` calls and receives their results (or has
their exceptions thrown in). ``advance`` resumes one; the daemon runs each call on a
worker thread (node.runtime.supervisor), the simulation runs it at once (``run_now``,
node.runtime.sim). The protocols say what the executor needs of the disk and the event
log, so the simulation can give it memory instead.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Blocking:
    """A call that may block, yielded by a job: ``fn(*args)``, of a ``kind`` (``train``,
    ``aggregate``, ``average``, ``evaluate``, ``encode``, ``io``) that lets a simulation
    charge it a duration."""

    kind: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


#: A unit of work: yields blocking calls, receives their results.
Job = Generator[Blocking, Any, None]


def advance(job: Job, result: Any = None, error: Exception | None = None,
            *, first: bool = False) -> Blocking | None:
    """Resume ``job`` with the result (or exception) of its last blocking call; the next
    call it wants, or None when it is done. An exception the job does not handle
    propagates: that is the job's failure."""
    try:
        if first:
            return next(job)
        if error is not None:
            return job.throw(error)
        return job.send(result)
    except StopIteration:
        return None


def run_now(job: Job) -> None:
    """Run ``job`` to its end on this thread (the simulation, and small jobs)."""
    call = advance(job, first=True)
    while call is not None:
        try:
            result = call.fn(*call.args)
        except Exception as exc:  # noqa: BLE001 (thrown into the job, which decides)
            call = advance(job, error=exc)
        else:
            call = advance(job, result)


@dataclass
class QueuedJob:
    """A job waiting for the worker, with the action it carries out."""

    kind: str
    action: object
    job: Job = field(repr=False)


class CheckpointWriter(Protocol):
    """Where checkpoints go (node.runtime.checkpoints.CheckpointStore, or memory)."""

    def save(self, round_number: int, digest: bytes, frame: bytes) -> object: ...

    def save_offline(self, round_number: int, digest: bytes, frame: bytes) -> object: ...


class RoundLog(Protocol):
    """Where per-round records go (node.runtime.checkpoints.NodeDB, or memory)."""

    def record_round(self, row: dict[str, Any]) -> None: ...


class EventSink(Protocol):
    """Where events go: ``note`` for the event log, ``publish`` for live clients."""

    def note(self, kind: str, detail: str) -> None: ...

    def publish(self, event: str, data: dict[str, Any]) -> None: ...
