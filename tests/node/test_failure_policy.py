"""One failure policy for every supervised part of a running node (node.common.health,
node.runtime.supervisor): a failure is reported once, status and /healthz say "degraded"
with the reason, and the node keeps serving, or stops cleanly with a one-line reason."""

from __future__ import annotations

import asyncio
import errno
import logging

import aiohttp
import pytest

from node.config import NodeConfig
from node.runtime import supervisor
from node.runtime.build import build_node
from node.runtime.supervisor import Node, NodeFailed

from .fakes import FakeLearner
from .test_daemon_inprocess import _wait, running


def lone(tmp_path, rounds: int = 30, **kw) -> Node:
    """A node alone in its federation (quorum 1): it runs elected rounds by itself."""
    learner = kw.pop("learner", None) or FakeLearner(0, delay=0.02)
    return build_node(NodeConfig(name="lone", state_dir=str(tmp_path / "lone"),
                                 host="127.0.0.1", port=0, web_port=0, rounds=rounds,
                                 wait_peers=0, mdns=kw.pop("mdns", False), open=True, **kw),
                      learner)


async def healthz(node: Node) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{node.web_port}/healthz") as r:
            assert r.status == 200
            return await r.json()


class FullDisk:
    """The node's checkpoint store, with a switch that makes every write fail as a full
    disk does (ENOSPC)."""

    def __init__(self, store) -> None:
        self.store = store
        self.full = True

    def _check(self) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")

    def save(self, *args):
        self._check()
        return self.store.save(*args)

    def save_offline(self, *args):
        self._check()
        return self.store.save_offline(*args)


async def test_disk_full_checkpoints_fail_training_goes_on_and_they_resume(
        tmp_path, no_leaked_tasks, caplog):
    node = lone(tmp_path)
    disk = FullDisk(node.executor.checkpoints)
    node.executor.checkpoints = disk
    async with running([node]):
        await _wait(lambda: node.machine.completed >= 3)
        status, health = node.status(), await healthz(node)
        assert status["health"]["state"] == "degraded"
        assert "No space left" in status["health"]["problems"]["checkpoints"]["reason"]
        assert health["health"] == "degraded" and "checkpoints" in health["problems"]
        assert node.executor.checkpoint_round == 0  # nothing could be written
        at = node.machine.completed
        await _wait(lambda: node.machine.completed >= at + 2)  # training goes on
        disk.full = False  # space returns: the retry writes the newest model
        await _wait(lambda: node.executor.checkpoint_round >= at + 2, timeout=20)
        await _wait(lambda: node.health.state == "ok")
        assert (await healthz(node))["health"] == "ok"
    files = sorted((tmp_path / "lone" / "checkpoints").glob("round-*.ckpt"))
    assert files, "checkpoints were written once space returned"
    # the failure was logged once with its traceback, not once per attempt
    failures = [r for r in caplog.records if "checkpoints failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


async def test_an_exception_in_discovery_is_reported_and_discovery_restarts(
        tmp_path, no_leaked_tasks, monkeypatch):
    monkeypatch.setattr(supervisor, "RESTART_DELAY", 0.05)
    monkeypatch.setattr(supervisor, "RECOVERY_S", 0.5)
    node = lone(tmp_path, mdns=True)
    calls = []

    async def discovery(_node: Node) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("zeroconf exploded")
        await asyncio.Event().wait()  # the restarted discovery runs until cancelled

    node.discovery_factory = discovery
    async with running([node]):
        await _wait(lambda: "discovery" in node.health.problems)
        assert "zeroconf exploded" in node.status()["health"]["problems"]["discovery"]["reason"]
        await _wait(lambda: len(calls) == 2)
        at = node.machine.completed
        await _wait(lambda: node.machine.completed >= at + 2)  # the node kept training
        await _wait(lambda: node.health.state == "ok")  # the restarted one stayed up


async def test_an_exception_in_training_stops_training_with_the_reason_and_start_resumes(
        tmp_path, no_leaked_tasks):
    learner = FakeLearner(0, delay=0.02)
    node = lone(tmp_path, learner=learner)
    real_train = learner.train
    broken = {"on": True}

    def train(weights, round_number, stop=None):
        if broken["on"] and round_number == 3:
            raise RuntimeError("CUDA error: out of memory")
        return real_train(weights, round_number, stop)

    learner.train = train
    async with running([node]):
        await _wait(lambda: node.state == "stopped")
        status = node.status()
        assert status["round"] == 2 and status["stopped_reason"].startswith("training failed")
        assert "out of memory" in status["health"]["problems"]["training"]["reason"]
        assert (await healthz(node))["health"] == "degraded"
        kinds = [e["kind"] for e in await node.control.events(50)]
        assert "training_failed" in kinds
        broken["on"] = False
        await node.control.start_training()
        await _wait(lambda: node.machine.completed >= 4)
        assert node.health.state == "ok"


async def test_an_exception_in_a_dialer_shows_in_health(tmp_path, no_leaked_tasks,
                                                       monkeypatch):
    node = lone(tmp_path)

    async def broken_dial_once(address, expected=None):
        raise RuntimeError("a bug in the dialer")

    monkeypatch.setattr(node.transport, "_dial_once", broken_dial_once)
    async with running([node]):
        node.dial("127.0.0.1:9")
        await _wait(lambda: "link to 127.0.0.1:9" in node.health.problems)
        assert node.status()["health"]["state"] == "degraded"
        at = node.machine.completed
        await _wait(lambda: node.machine.completed >= at + 1)  # still serving


async def test_a_failure_the_node_cannot_live_without_stops_it_with_one_line(
        tmp_path, no_leaked_tasks, caplog):
    node = lone(tmp_path)
    ticks = []

    def next_deadline() -> float | None:
        ticks.append(1)
        if len(ticks) > 3:
            raise ValueError("the clock went backwards")
        return None

    node.machine.next_deadline = next_deadline  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        with pytest.raises(NodeFailed) as failed:
            async with asyncio.timeout(30):
                await node.run()
    assert failed.value.reason == "the timer failed: ValueError: the clock went backwards"
    assert not (tmp_path / "lone" / "endpoint.json").exists()  # a clean stop
