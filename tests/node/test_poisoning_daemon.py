"""Over real links (in-process daemons on 127.0.0.1): a member that sends NaN updates and
NaN models is refused by those it sends them to, shown with its strikes, cut off, and the
others finish on one finite model (node.peers.checks)."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np

from node.common.weights import from_tensors, to_tensors
from node.config import NodeConfig
from node.runtime.build import build_node
from node.runtime.supervisor import Node

from .fakes import FakeLearner
from .test_daemon_inprocess import _wait, running

ROUNDS = 10


class PoisonLearner(FakeLearner):
    """Aggregates honestly, then hands over NaN weights; trains from a clean model after
    committing its own NaN one (else its executor would stop it: a diverged training is a
    failed one)."""

    def train(self, weights, round_number, stop=None):
        clean = {k: v if np.isfinite(v).all() else np.zeros_like(v) for k, v in weights.items()}
        return super().train(clean, round_number, stop)

    def aggregate(self, base, updates):
        return {k: np.full_like(v, np.nan) for k, v in super().aggregate(base, updates).items()}


def send_nan_updates(node: Node) -> None:
    """Make ``node`` send NaN updates: its update is replaced as it is encoded, after its
    executor checked what it trained (which keeps an honest node's NaN at home)."""
    honest = node.executor._compressed

    def encode(update):
        out = honest(update)
        nan = {k: np.full_like(v, np.nan) for k, v in from_tensors(out.weights).items()}
        return replace(out, weights=to_tensors(nan))

    node.executor._compressed = encode  # type: ignore[method-assign]


def member(tmp_path, i: int, peers: list[Node], learner: FakeLearner) -> Node:
    return build_node(NodeConfig(name=f"n{i}", state_dir=str(tmp_path / f"n{i}"),
                                 host="127.0.0.1", port=0, web_port=0, rounds=ROUNDS,
                                 wait_peers=i, min_peers=2, heartbeat_interval=0.1,
                                 round_timeout=2.0, mdns=False,
                                 peers=tuple(f"127.0.0.1:{p.peer_port}" for p in peers)),
                      learner)


async def test_a_member_sending_nan_is_refused_cut_off_and_the_others_finish(
        tmp_path, no_leaked_tasks, monkeypatch):
    monkeypatch.setenv("FL_NODE_FEDERATION_SECRET", "in-process test federation secret")
    nodes: list[Node] = []
    async with contextlib.AsyncExitStack() as stack:
        for i in range(4):  # each dials the ones already running
            learner = PoisonLearner(0, delay=0.02) if i == 0 else FakeLearner(i, delay=0.02)
            nodes.append(member(tmp_path, i, nodes[:], learner))
            if i == 0:
                send_nan_updates(nodes[0])
            await stack.enter_async_context(running(nodes[-1:]))
        bad, honest = nodes[0], nodes[1:]
        await _wait(lambda: all(n.machine.completed >= ROUNDS for n in honest), 120)
        statuses = [n.status() for n in honest]
        kinds = {e["kind"] for n in honest for e in await n.control.events(500)}
    assert len({n.model_hash() for n in honest}) == 1
    assert all(np.isfinite(v).all() for n in honest for v in n.executor.weights.values())
    # Refused by those it sent poison to: the aggregators its updates went to, and all
    # when it published a model (which it may never do: docs/protocol.md 9.4 elects
    # among the contributors of the last model); a member it sent nothing has no strike.
    views = [p for s in statuses for p in s["peers"] if p["node_id"] == bad.node_id]
    assert views and any(p["strikes"] >= 1 for p in views)
    assert any(p["state"] == "banned" for p in views), views
    assert "member_refused" in kinds and "member_cut_off" in kinds
