"""Shared fixtures: fixed seeds, one torch thread, and no leaked tasks or threads."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)


@pytest.fixture(autouse=True)
def _no_leaked_threads():
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate()
              if t not in before and t.is_alive() and not t.daemon
              and not t.name.startswith(("asyncio_", "ThreadPoolExecutor"))]
    assert not leaked, f"threads leaked: {leaked}"


@pytest.fixture
async def no_leaked_tasks():
    """Fail a test that leaves tasks running on its loop."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before
              if not t.done() and t is not asyncio.current_task()]
    assert not leaked, f"tasks leaked: {leaked}"
