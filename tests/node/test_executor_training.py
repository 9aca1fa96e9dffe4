"""What the shared executor does with a training's result (node.runtime.executor): a
training cut short is dropped, never reported as trained nor sent (a joiner's first round
used to log "trained ... (loss nan)": its training of round 1 was stopped by the catch-up
model before a batch ran, and the mean loss of no batch is 0/0); and a node never sends
an update its peers would refuse (NaN or infinite loss or weights)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from node.runtime.jobs import advance
from node.runtime.sim import Simulation
from node.runtime.simparts import VectorLearner, VectorTrained
from protocol.rounds import Phase, SendUpdate, StartTraining


def test_a_training_cut_short_is_dropped_and_the_round_trained_again(caplog):
    sim = Simulation(2, rounds=3, seed=1)
    sim.connect(0, 1)
    node = sim.nodes[0]
    ex, m = node.executor, node.core.machine
    m.start(0.0)
    [train] = [a for a in m.take_actions() if isinstance(a, StartTraining)]
    job = ex._train(train)
    assert advance(job, first=True).kind == "io"  # the privacy budget check
    assert advance(job, None).kind == "train"  # the training runs on the worker ...
    # ... while the operator stops the node, and starts it again: the round is the
    # current one again, and a new training of it is queued
    ex.halt("stopped by the operator", reason="operator", kind="training_stopped",
            detail="test")
    m.start(0.5)
    ex.drain()
    assert m.phase is Phase.TRAINING and m.current == train.round
    # the stopped training returns what ml.training returns when no batch ran
    stopped = VectorTrained(dict(ex.weights), 100, float("nan"), 0.0)
    with caplog.at_level(logging.INFO, logger="node.runtime.executor"):
        assert advance(job, stopped) is None
    assert m.my_update is None and not [a for a in m.outbox if isinstance(a, SendUpdate)]
    assert "cut short" in caplog.text and "loss nan" not in caplog.text
    assert [j.kind for j in ex._jobs].count("train") == 1  # the round is trained anew


class Diverging(VectorLearner):
    """Trains into NaN or infinite values, or reports a NaN loss."""

    def __init__(self, index: int, how: str) -> None:
        super().__init__(index)
        self.how = how

    def train(self, weights, round_number, stop=None):
        out = super().train(weights, round_number, stop)
        if self.how == "loss":
            return VectorTrained(out.weights, out.num_examples, float("nan"), out.seconds)
        bad = np.nan if self.how == "nan" else np.inf
        return VectorTrained({k: np.full_like(v, bad) for k, v in out.weights.items()},
                             out.num_examples, out.loss, out.seconds)


@pytest.mark.parametrize("how", ["loss", "nan", "inf"])
def test_a_node_never_sends_an_update_its_peers_would_refuse(how):
    sim = Simulation(4, rounds=4, seed=2, quorum=3)
    bad = sim.nodes[0]
    bad.learner = bad.executor.learner = Diverging(0, how)  # type: ignore[misc]
    sim.start()
    honest = sim.nodes[1:]
    sim.run(10_000, stop=lambda: all(n.core.machine.completed >= 4 for n in honest))
    # it stopped training with the reason, as after any failed training ...
    assert bad.core.machine.phase is Phase.STOPPED
    assert "diverged" in (bad.executor.stopped_reason or "")
    assert "diverged" in bad.health.problems["training"].reason
    # ... and sent nothing its peers refused: no rejection, no strike, no cut-off
    assert not any(n.rejected for n in honest)
    assert not any(k in ("member_refused", "member_cut_off") for n in honest
                   for _, k, _ in n.notes)
    assert all(n.core.machine.completed == 4 for n in honest)
