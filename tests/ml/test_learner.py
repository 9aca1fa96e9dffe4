"""TorchLearner: the node's real learner, and a small in-process federation on digits."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from ml.learner import TorchLearner
from ml.weights import Weights, weights_to_bytes


def as_bytes(w: Weights) -> bytes:
    return weights_to_bytes(w)


def test_initial_weights_are_identical_for_the_same_seed() -> None:
    a = TorchLearner(dataset="digits", num_partitions=3, partition_index=0, seed=0)
    b = TorchLearner(dataset="digits", num_partitions=3, partition_index=2, seed=0)
    assert as_bytes(a.initial_weights()) == as_bytes(b.initial_weights())


def test_initial_weights_differ_for_another_seed() -> None:
    a = TorchLearner(dataset="digits", seed=0)
    b = TorchLearner(dataset="digits", seed=1)
    assert as_bytes(a.initial_weights()) != as_bytes(b.initial_weights())


def test_initial_weights_are_a_fresh_copy_each_time() -> None:
    learner = TorchLearner(dataset="digits", seed=0)
    w = learner.initial_weights()
    for v in w.values():
        v[...] = 0
    assert any(np.any(v != 0) for v in learner.initial_weights().values())


def test_training_is_deterministic() -> None:
    kw = dict(dataset="digits", num_partitions=2, partition_index=1, seed=3, local_epochs=1)
    a, b = TorchLearner(**kw), TorchLearner(**kw)
    start = a.initial_weights()
    ra, rb = a.train(start, round_number=4), b.train(start, round_number=4)
    assert as_bytes(ra.weights) == as_bytes(rb.weights)
    assert ra.loss == rb.loss and ra.num_examples == rb.num_examples == a.num_examples
    assert as_bytes(a.train(start, round_number=4).weights) == as_bytes(ra.weights)
    # Each round shuffles differently.
    assert as_bytes(a.train(start, round_number=5).weights) != as_bytes(ra.weights)


def test_train_does_not_modify_the_weights_it_was_given() -> None:
    learner = TorchLearner(dataset="digits", seed=0, local_epochs=1)
    start = learner.initial_weights()
    before = as_bytes(start)
    learner.train(start, round_number=1)
    assert as_bytes(start) == before


def test_train_with_stop_already_set_returns_the_start_weights() -> None:
    learner = TorchLearner(dataset="digits", seed=0)
    start = learner.initial_weights()
    stop = threading.Event()
    stop.set()
    result = learner.train(start, round_number=1, stop=stop)
    assert as_bytes(result.weights) == as_bytes(start)


def test_describe_reports_data_and_model_facts() -> None:
    learner = TorchLearner(dataset="digits", model="mlp", partition="dirichlet", alpha=0.5,
                           num_partitions=3, partition_index=1, seed=0)
    d = learner.describe()
    assert d["dataset"] == "digits" and d["model"] == "mlp"
    assert d["num_examples"] == learner.num_examples == len(learner.y)
    assert d["num_parameters"] == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    assert d["partition"] == "dirichlet" and d["alpha"] == 0.5
    assert d["partition_index"] == 1 and d["num_partitions"] == 3
    assert d["test_examples"] == 360
    assert d["input_shape"] == [1, 8, 8] and d["num_classes"] == 10
    assert len(d["label_counts"]) == 10 and sum(d["label_counts"]) == d["num_examples"]
    assert TorchLearner(dataset="digits", seed=0).describe()["alpha"] is None  # iid


def test_shards_of_all_learners_cover_the_training_set() -> None:
    learners = [TorchLearner(dataset="digits", partition="dirichlet", num_partitions=3,
                             partition_index=i, seed=0) for i in range(3)]
    assert sum(lrn.num_examples for lrn in learners) == len(learners[0].data.train_y)
    counts = np.sum([lrn.describe()["label_counts"] for lrn in learners], axis=0)
    np.testing.assert_array_equal(counts, np.bincount(learners[0].data.train_y.numpy()))


def test_bad_configuration_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        TorchLearner(dataset="digits", model="nope")
    with pytest.raises(ValueError, match="unknown dataset"):
        TorchLearner(dataset="nope")
    with pytest.raises(ValueError, match="partition index"):
        TorchLearner(dataset="digits", num_partitions=2, partition_index=2)


@pytest.mark.parametrize("partition", ["dirichlet", "iid"])
def test_three_node_federation_on_digits_reaches_90_percent(partition: str) -> None:
    learners = [TorchLearner(dataset="digits", num_partitions=3, partition_index=i,
                             partition=partition, alpha=0.5, seed=0) for i in range(3)]
    global_weights = learners[0].initial_weights()
    start_accuracy = learners[0].evaluate(global_weights).accuracy
    for round_number in range(1, 6):
        updates = [(lrn.train(global_weights, round_number).weights, lrn.num_examples)
                   for lrn in learners]
        global_weights = learners[0].aggregate(global_weights, updates)
    results = [lrn.evaluate(global_weights) for lrn in learners]
    # Every node evaluates on the same test split, so they agree exactly.
    assert len({(r.accuracy, r.loss) for r in results}) == 1
    assert results[0].num_examples == 360
    assert start_accuracy < 0.3
    assert results[0].accuracy >= 0.90
    assert torch.get_num_threads() == 1


def test_building_a_learner_leaves_the_global_torch_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    TorchLearner(dataset="digits", seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"local_epochs": 0}, "local_epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"lr": -0.1}, "lr must be > 0"),
    ({"partition": "shards"}, "unknown partition scheme"),
    ({"partition": "dirichlet", "alpha": 0.0}, "alpha must be > 0"),
    ({"model": "cnn", "dataset": "synthetic"}, "mlp or linear"),
])
def test_bad_hyperparameters_are_value_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TorchLearner(**{"dataset": "digits", **kwargs})


def test_mlp_federation_on_synthetic_data_learns() -> None:
    learners = [TorchLearner(dataset="synthetic", model="mlp", num_partitions=2,
                             partition_index=i, seed=0, local_epochs=1) for i in range(2)]
    global_weights = learners[0].initial_weights()
    for round_number in (1, 2):
        global_weights = learners[0].aggregate(
            global_weights,
            [(lrn.train(global_weights, round_number).weights, lrn.num_examples)
             for lrn in learners])
    assert learners[1].evaluate(global_weights).accuracy > 0.8
    assert learners[0].describe()["input_shape"] == [20]


def test_a_fedadam_federation_carries_its_optimizer_state_in_the_model() -> None:
    from ml.strategies import STATE_PREFIX, parse_strategy

    learners = [TorchLearner(dataset="synthetic", model="mlp", num_partitions=2,
                             partition_index=i, seed=0, local_epochs=1,
                             strategy=parse_strategy("fedadam", eta=0.05)) for i in range(2)]
    global_weights = learners[0].initial_weights()
    for round_number in (1, 2, 3):
        updates = [(lrn.train(global_weights, round_number).weights, lrn.num_examples)
                   for lrn in learners]
        # the aggregator alternates: each uses the state the last one left in the model
        global_weights = learners[round_number % 2].aggregate(global_weights, updates)
        assert any(k.startswith(STATE_PREFIX) for k in global_weights)
    # training and evaluation see only the model's tensors
    assert learners[1].evaluate(global_weights).accuracy > 0.6
    assert not any(k.startswith(STATE_PREFIX) for k in
                   learners[0].train(global_weights, 4).weights)


def test_dp_learner_refuses_training_once_the_budget_would_be_exceeded(tmp_path) -> None:
    from ml.privacy import DPConfig

    make = lambda: TorchLearner(  # noqa: E731
        dataset="digits", model="mlp", local_epochs=1, rounds=10,
        dp=DPConfig(target_epsilon=1.0, noise_multiplier=1.5),
        ledger_path=tmp_path / "privacy.json")
    learner = make()
    weights = learner.initial_weights()
    rounds = 0
    while learner.can_train() is None:
        weights = learner.train(weights, rounds + 1).weights
        rounds += 1
        assert rounds < 20
    spent = learner.privacy()
    assert rounds == 3 and spent["epsilon"] <= 1.0 and spent["exhausted"]  # 0.92, then 1.04
    assert "privacy budget" in learner.can_train()
    # a new learner on the same ledger (a restart) refuses too, with the same epsilon
    again = make()
    assert again.can_train() is not None
    assert again.privacy()["epsilon"] == spent["epsilon"]
    assert learner.describe()["label_counts"] is None  # not published under DP
