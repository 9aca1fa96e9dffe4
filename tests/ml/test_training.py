"""Local training and evaluation loops."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ml.models import build_model
from ml.training import evaluate, train_local
from ml.weights import get_weights, weights_to_bytes


def blobs(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    return centres[y] + torch.randn(n, 2, generator=g), y


def fresh_mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", (2,), 3)


def trained_bytes(seed: int) -> bytes:
    x, y = blobs()
    model = fresh_mlp()
    train_local(model, x, y, epochs=2, batch_size=16, lr=0.05, seed=seed)
    return weights_to_bytes(get_weights(model))


def test_same_seed_gives_bit_identical_weights() -> None:
    assert trained_bytes(7) == trained_bytes(7)


def test_different_seed_gives_different_weights() -> None:
    assert trained_bytes(7) != trained_bytes(8)


def test_train_local_reports_examples_steps_and_loss() -> None:
    x, y = blobs(n=100)
    stats = train_local(fresh_mlp(), x, y, epochs=2, batch_size=32, lr=0.05, seed=0)
    assert stats.num_examples == 100
    assert stats.steps == 2 * 4  # ceil(100 / 32) batches per epoch
    assert not stats.stopped
    assert np.isfinite(stats.loss) and stats.loss > 0
    assert stats.seconds >= 0


def test_training_lowers_the_loss_and_learns() -> None:
    x, y = blobs()
    model = fresh_mlp()
    before = evaluate(model, x, y)
    train_local(model, x, y, epochs=5, batch_size=16, lr=0.05, seed=0)
    after = evaluate(model, x, y)
    assert after.loss < before.loss
    assert after.accuracy > 0.95


def test_stop_set_before_training_stops_immediately() -> None:
    x, y = blobs()
    model = fresh_mlp()
    before = weights_to_bytes(get_weights(model))
    stop = threading.Event()
    stop.set()
    stats = train_local(model, x, y, epochs=3, batch_size=16, lr=0.05, seed=0, stop=stop)
    assert stats.stopped and stats.steps == 0
    assert weights_to_bytes(get_weights(model)) == before  # untouched


def test_stop_set_during_training_stops_at_the_next_batch() -> None:
    stop = threading.Event()

    class StopAfterThree(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 3)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 3:
                stop.set()
            return self.fc(x)

    x, y = blobs()
    model = StopAfterThree()
    stats = train_local(model, x, y, epochs=5, batch_size=16, lr=0.05, seed=0, stop=stop)
    assert stats.stopped
    assert stats.steps == 3 and model.calls == 3


def test_evaluate_is_exact_on_a_trivially_separable_case() -> None:
    x = torch.tensor([[-2.0, 0.0], [-1.0, 5.0], [1.0, -5.0], [3.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        model.bias.zero_()
    right = evaluate(model, x, y)
    assert right.accuracy == 1.0 and right.num_examples == 4
    with torch.no_grad():
        expected_loss = float(F.cross_entropy(model(x), y))
    assert right.loss == pytest.approx(expected_loss, rel=1e-6)
    wrong = evaluate(model, x, 1 - y)
    assert wrong.accuracy == 0.0
    half = evaluate(model, x, torch.tensor([0, 1, 1, 0]))
    assert half.accuracy == 0.5


def test_evaluate_accuracy_is_a_fraction_and_independent_of_batch_size() -> None:
    x, y = blobs(n=37)
    model = fresh_mlp()
    big = evaluate(model, x, y)
    small = evaluate(model, x, y, batch_size=5)
    assert 0.0 <= big.accuracy <= 1.0
    assert big.accuracy == small.accuracy and big.num_examples == small.num_examples == 37
    assert big.loss == pytest.approx(small.loss, rel=1e-5)


def test_evaluate_does_not_change_the_model() -> None:
    x, y = blobs()
    model = fresh_mlp()
    before = weights_to_bytes(get_weights(model))
    evaluate(model, x, y)
    assert weights_to_bytes(get_weights(model)) == before
    assert torch.is_grad_enabled()  # no_grad did not leak out


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"lr": 0.0}, "lr > 0"),
    ({"lr": float("nan")}, "lr > 0"),
    ({"momentum": 1.0}, "momentum"),
])
def test_bad_training_arguments_are_value_errors(kwargs: dict, match: str) -> None:
    x, y = blobs(n=20)
    args = {"epochs": 1, "batch_size": 8, "lr": 0.05, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        train_local(fresh_mlp(), x, y, **args)


def test_inputs_and_labels_of_different_length_are_a_value_error() -> None:
    x, y = blobs(n=20)
    with pytest.raises(ValueError, match="20 inputs but 19 labels"):
        train_local(fresh_mlp(), x, y[:19], epochs=1, batch_size=8, lr=0.05, seed=0)
