"""Real Node daemons over real sockets on 127.0.0.1, in one event loop, with a fake learner."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp

from node.config import NodeConfig
from node.runtime.build import build_node
from node.runtime.checkpoints import decode_checkpoint
from node.runtime.supervisor import Node
from protocol.envelope import decode

from .fakes import FakeLearner


async def _wait(pred, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(nodes: list[Node]):
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    try:
        await _wait(lambda: all(n.web_port for n in nodes))
        yield tasks
    finally:
        for n in nodes:
            n.request_shutdown()
        await asyncio.gather(*tasks, return_exceptions=True)


def make_node(tmp_path, i: int, count: int, rounds: int = 4, peers=()) -> Node:
    return build_node(NodeConfig(name=f"n{i}", state_dir=str(tmp_path / f"n{i}"), host="127.0.0.1",
                           port=0, web_port=0, rounds=rounds, wait_peers=count - 1,
                           heartbeat_interval=0.2, mdns=False,
                           peers=tuple(f"127.0.0.1:{p.peer_port}" for p in peers)),
                FakeLearner(i))


async def test_three_nodes_train_to_the_same_model(tmp_path, no_leaked_tasks, monkeypatch):
    monkeypatch.setenv("FL_NODE_FEDERATION_SECRET", "in-process test federation secret")
    first = make_node(tmp_path, 0, 3)
    async with running([first]):
        second = make_node(tmp_path, 1, 3, peers=[first])
        async with running([second]):
            third = make_node(tmp_path, 2, 3, peers=[first, second])
            async with running([third]):
                nodes = [first, second, third]
                await _wait(lambda: all(n.state == "done" and len(n.executor.history) == 4
                                        for n in nodes))
                async with aiohttp.ClientSession() as s:
                    async with s.get(f"http://127.0.0.1:{first.web_port}/api/status") as r:
                        status = await r.json()
    assert len({n.model_hash() for n in nodes}) == 1
    assert status["round"] == 4 and status["state"] == "done"
    assert status["model_hash"] == nodes[1].model_hash()
    assert {p["node_id"] for p in status["peers"]} == {nodes[1].node_id, nodes[2].node_id}
    assert all(p["trusted"] and p["trust"] == "federation-secret" for p in status["peers"])
    # every node took part in every round
    assert all(n.learner.trained_rounds == [1, 2, 3, 4] for n in nodes)
    assert all(r.contributors == 3 for r in first.executor.history)


async def test_a_node_below_quorum_trains_offline_and_resumes_its_offline_model(
        tmp_path, no_leaked_tasks):
    def lone() -> Node:
        # a quorum of 2 and nobody else: offline from the start
        return build_node(NodeConfig(name="lone", state_dir=str(tmp_path / "lone"), host="127.0.0.1",
                               port=0, web_port=0, rounds=4, min_peers=1, wait_peers=0,
                               mdns=False, open=True), FakeLearner(0, delay=0.05))

    node = lone()
    async with running([node]):
        await _wait(lambda: node.executor.offline_checkpoint_step >= 3)
        status = node.status()
        node.request_shutdown()
    assert status["mode"] == "offline" and status["state"] == "offline"
    assert status["quorum"] == {"need": 2, "have": 1} and status["members"] == [node.node_id]
    assert status["round"] == 0 and status["model_hash"] != status["global_model_hash"]
    path = tmp_path / "lone" / "checkpoints" / "offline.ckpt"
    round_number, digest, frame = decode_checkpoint(path.read_bytes())
    step = decode(frame).message.step
    assert round_number == 1 and step >= 3
    again = lone()  # a restart on the same state dir
    assert again.resumed_offline_step == step and again.machine.offline_steps == step
    assert again.model_hash() == digest.hex() and again.machine.completed == 0
    # a corrupt offline checkpoint is reported and the global model (genesis) is used
    path.write_bytes(path.read_bytes()[:-5])
    third = lone()
    assert third.resumed_offline_step == 0 and third.machine.local_digest is None


async def test_a_stopped_node_is_left_out_and_rejoins_when_started(tmp_path, no_leaked_tasks,
                                                                    monkeypatch):
    monkeypatch.setenv("FL_NODE_FEDERATION_SECRET", "in-process test federation secret")

    # The nodes start one after the other, so round 1 (no contributors yet to elect
    # from) can see two aggregators elected from different views, a documented limit
    # (docs/protocol.md 15) that the model deadline resolves: 5 s here (about 1 run in
    # 4 meets it), not the default 60 s, which would outlast the waits below.
    def member(i: int, peers=()) -> Node:
        return build_node(NodeConfig(name=f"n{i}", state_dir=str(tmp_path / f"n{i}"),
                               host="127.0.0.1", port=0, web_port=0, rounds=40, wait_peers=i,
                               min_peers=1, heartbeat_interval=0.1, mdns=False,
                               round_timeout=5,
                               peers=tuple(f"127.0.0.1:{p.peer_port}" for p in peers)),
                    FakeLearner(i, delay=0.05))

    first = member(0)
    async with running([first]):
        second = member(1, [first])
        async with running([second]):
            third = member(2, [first, second])
            async with running([third]):
                nodes = [first, second, third]
                await _wait(lambda: all(n.machine.completed >= 2 for n in nodes))
                await third.control.stop_training()
                assert third.state == "stopped"
                stopped_at = third.machine.completed
                # the others see it stopped and carry on as two (still a quorum of 2)
                await _wait(lambda: first.machine.completed >= stopped_at + 3)
                late = [r for r in first.executor.history if r.round > stopped_at + 1]
                assert late and all(r.contributors == 2 for r in late)
                # it trained no more (it still follows the global model, so a start
                # resumes from the federation's latest round)
                assert max(third.learner.trained_rounds) <= stopped_at + 1
                assert third.state == "stopped"
                await third.control.start_training()
                target = first.machine.completed + 2
                await _wait(lambda: all(n.machine.completed >= target for n in nodes))
                await _wait(lambda: any(r.contributors == 3 for r in first.executor.history
                                        if r.round >= target), 30)
                kinds = [e["kind"] for e in await third.control.events(100)]
    assert "training_stopped" in kinds and "training_started" in kinds


async def _federation_bytes(tmp_path, compress: str) -> tuple[list[Node], float]:
    """Three nodes, 3 rounds, with this --compress; (nodes, mean update frame bytes)."""
    nodes: list[Node] = []
    for i in range(3):
        nodes.append(build_node(NodeConfig(
            name=f"{compress}{i}", state_dir=str(tmp_path / compress / f"n{i}"),
            host="127.0.0.1", port=0, web_port=0, rounds=3, wait_peers=2, min_peers=2,
            compress=compress, heartbeat_interval=0.2, mdns=False, open=True,
            peers=tuple(f"127.0.0.1:{p.peer_port}" for p in nodes)), FakeLearner(i, dim=4000)))
        await asyncio.sleep(0)
        task = asyncio.create_task(nodes[-1].run())
        nodes[-1]._task = task  # type: ignore[attr-defined]
        await _wait(lambda n=nodes[-1]: n.peer_port)
    try:
        await _wait(lambda: all(n.state == "done" and len(n.executor.history) == 3 for n in nodes))
    finally:
        for n in nodes:
            n.request_shutdown()
        await asyncio.gather(*(n._task for n in nodes), return_exceptions=True)  # type: ignore[attr-defined]
    sizes = [r.update_bytes for n in nodes for r in n.executor.history if r.update_bytes]
    return nodes, sum(sizes) / len(sizes)


async def test_int8_compressed_updates_train_the_same_federation_with_fewer_bytes(
        tmp_path, no_leaked_tasks):
    # Real signed frames of a 4,001-parameter model: int8 payloads are a quarter of fp32,
    # plus a few hundred bytes of envelope, names and scales.
    plain, full = await _federation_bytes(tmp_path, "none")
    small, packed = await _federation_bytes(tmp_path, "int8")
    assert len({n.model_hash() for n in small}) == 1  # one model, from deltas
    assert all(r.contributors == 3 for r in small[0].executor.history)
    assert packed <= 0.30 * full, (packed, full)
    # the compressed federation learns as well: same final loss within a few percent
    final = [n.executor.accuracy for n in plain][0], [n.executor.accuracy for n in small][0]
    assert abs(final[0] - final[1]) < 0.02, final
