"""An admitted member that sends poison (NaN, infinite or huge updates and models, or a
model for a far-future round) cannot make the others apply it (node.peers.checks, the
executor's update bound): it is reported, cut off after repeated failures, and the rest
of the federation finishes on one finite model. In memory, through the shared executor."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from node.common.weights import from_tensors, to_tensors
from node.runtime.sim import SimNode, Simulation
from protocol.messages import Model
from protocol.tensors import weights_digest

ROUNDS = 12


def poison(node: SimNode, how: str) -> None:
    """Make ``node`` send poisoned updates and aggregate poison (its own checks cannot
    save it: its update is replaced as it is encoded, after the executor checked what it
    trained, and its aggregate after the aggregation's checks)."""
    learner, executor = node.learner, node.executor
    honest_train, honest_average = learner.train, learner.average
    honest_encode = executor._compressed

    def bad(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if how == "nan":
            return {k: np.full_like(v, np.nan) for k, v in weights.items()}
        if how == "inf":
            return {k: np.full_like(v, np.inf) for k, v in weights.items()}
        return {k: (v + 1e6).astype(np.float32) for k, v in weights.items()}  # huge, finite

    def encode(update):
        out = honest_encode(update)
        return replace(out, weights=to_tensors(bad(from_tensors(out.weights))))

    def train(weights, round_number, stop=None):
        # It keeps training from a clean model after committing its own poison (else its
        # executor would stop it: a diverged training is a failed one).
        clean = {k: v if np.isfinite(v).all() and np.abs(v).max() < 1e3 else np.zeros_like(v)
                 for k, v in weights.items()}
        return honest_train(clean, round_number, stop)

    executor._compressed = encode  # type: ignore[method-assign]
    learner.train = train  # type: ignore[method-assign]
    learner.aggregate = lambda base, updates: bad(honest_average(updates))  # type: ignore[method-assign]


def finite(node: SimNode) -> bool:
    return all(np.isfinite(v).all() and np.abs(v).max() < 1e3 for v in node.weights.values())


@pytest.mark.parametrize("how", ["nan", "inf", "huge"])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_poisoning_member_is_refused_cut_off_and_the_others_finish(how, seed):
    sim = Simulation(5, rounds=ROUNDS, seed=seed, quorum=3)
    bad = sim.nodes[0]
    poison(bad, how)
    sim.start()
    honest = sim.nodes[1:]
    sim.run(20_000, stop=lambda: all(n.core.machine.completed >= ROUNDS for n in honest))
    assert all(n.core.machine.completed == ROUNDS for n in honest)
    assert len({n.core.machine.model_digest for n in honest}) == 1
    assert all(finite(n) for n in honest)
    # nobody honest ever applied a model the poisoner made
    assert not any(r in bad.aggregated and bad.aggregated[r] == d
                   for n in honest for r, d in n.commits.items())
    # it was reported, and cut off by those it kept sending poison to
    refused = [n for n in honest if any(k == "member_refused" for _, k, _ in n.notes)]
    assert refused
    cut = [n for n in honest if n.core.peers.banned(bad.key)]
    assert cut, "no one cut the poisoner off"
    for n in cut:
        assert n.core.peers.peer_state(bad.key, sim.now) == "banned"
        assert bad.key not in n.core.links and bad.key not in n.core.machine.peers


def test_a_far_future_model_is_not_applied_without_evidence():
    sim = Simulation(4, rounds=ROUNDS, seed=3, quorum=3)
    sim.start()
    sim.run(20_000, stop=lambda: all(n.core.machine.completed >= 2 for n in sim.nodes))
    bad = sim.nodes[0]
    target = bad.core.machine.completed + 4
    weights = {k: np.zeros_like(v) for k, v in bad.weights.items()}
    tensors = to_tensors(weights)
    model = Model(round=target, attempt=0, aggregator=bad.key, contributors=(bad.key,),
                  num_examples=1, digest=weights_digest(tensors), weights=tensors)
    frame = bad.core.frame(model)
    for other in sim.nodes[1:]:
        sim._deliver(bad, other, frame)
    sim.run(sim.now + 0.5)
    # the others have seen it and not jumped to its round
    assert all(n.core.machine.completed < target for n in sim.nodes[1:])
    sim.run(20_000, stop=lambda: sim.all_done(ROUNDS))
    assert sim.all_done(ROUNDS)
    assert len({n.core.machine.model_digest for n in sim.nodes}) == 1
    digests = {n.commits.get(target) for n in sim.nodes}
    assert weights_digest(tensors) not in digests
    # honest catch-up with evidence still works: tests/node/test_sim.py's late joiner
