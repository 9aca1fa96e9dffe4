"""Training, aggregation and evaluation run on a worker thread: the event loop never blocks.

The loop runs in asyncio debug mode, which logs every callback that holds the loop longer
than ``slow_callback_duration``, set to half of what one round of training is measured to
take here: training on the loop would be reported, while everything else the loop does is
far shorter.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from node.config import NodeConfig
from node.runtime.build import build_node

pytestmark = pytest.mark.slow


def test_real_training_never_blocks_the_event_loop(tmp_path, caplog):
    torch = pytest.importorskip("torch")
    from ml.learner import TorchLearner

    torch.set_num_threads(1)
    learner = TorchLearner(dataset="digits", local_epochs=25)
    # What one round of training costs here: training on the loop would hold it that long.
    one_round = learner.train(learner.initial_weights(), 1).seconds
    threshold = max(0.5, one_round / 2)
    node = build_node(NodeConfig(name="solo", state_dir=str(tmp_path), host="127.0.0.1", port=0,
                           web_port=0, rounds=2, min_peers=0, mdns=False), learner)
    pings: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.slow_callback_duration = threshold
        task = asyncio.create_task(node.run())
        async with asyncio.timeout(120):
            while node.state != "done" or node.executor.accuracy is None or len(node.executor.history) < 2:
                t0 = loop.time()
                await asyncio.sleep(0.01)
                pings.append(loop.time() - t0)
        node.request_shutdown()
        await task

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        asyncio.run(main(), debug=True)
    slow = [r.getMessage() for r in caplog.records if "Executing" in r.getMessage()]
    assert not slow, slow
    assert node.executor.history[-1].train_seconds > threshold  # the work was real and long
    assert len(pings) > 50  # the loop kept serving timers all along
