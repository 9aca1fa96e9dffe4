"""Model registry: built-ins, shapes, clear errors, user-registered models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ml import models
from ml.learner import TorchLearner
from ml.models import available_models, build_model, register_model

SHAPES = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "tabular": (20,),
}


def test_registry_lists_the_builtin_models() -> None:
    assert {"cnn", "mlp", "linear"} <= set(available_models())
    assert available_models() == sorted(available_models())


@pytest.mark.parametrize(("model_name", "shape_name"), [
    (m, s) for m in ("cnn", "mlp", "linear") for s in SHAPES
    if not (m == "cnn" and s == "tabular")  # see test_cnn_on_tabular_data_is_a_clear_error
])
def test_builtin_models_output_one_column_per_class(model_name: str, shape_name: str) -> None:
    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    model = build_model(model_name, shape, 7)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_cnn_on_tabular_data_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"image input.*\(20,\).*mlp or linear"):
        build_model("cnn", (20,), 10)


def test_unknown_model_error_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet9000'") as info:
        build_model("resnet9000", (1, 8, 8), 10)
    for name in ("cnn", "linear", "mlp"):
        assert name in str(info.value)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_cnn_uses_groupnorm_not_batchnorm(shape: tuple[int, ...]) -> None:
    # BatchNorm breaks Opacus per-sample gradients and mixes examples within a batch.
    model = build_model("cnn", shape, 10)
    kinds = [type(m) for m in model.modules()]
    assert nn.GroupNorm in kinds
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    # No running-statistics buffers either: the state dict is parameters only.
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}


def test_user_registered_model_builds_and_trains_in_torchlearner() -> None:
    calls: list[tuple[tuple[int, ...], int]] = []
    try:
        @register_model("mine")
        def mine(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
            calls.append((input_shape, num_classes))
            return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

        assert "mine" in available_models()
        assert build_model("mine", (1, 8, 8), 10)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)

        learner = TorchLearner(dataset="digits", model="mine", local_epochs=1, seed=0)
        assert calls[-1] == ((1, 8, 8), 10)
        assert learner.describe()["model"] == "mine"
        assert learner.describe()["num_parameters"] == 64 * 10 + 10
        start = learner.initial_weights()
        assert set(start) == {"1.weight", "1.bias"}
        result = learner.train(start, round_number=1)
        assert result.num_examples == learner.num_examples
        assert learner.evaluate(result.weights).accuracy > 0.8
    finally:
        models._MODELS.pop("mine", None)
    assert "mine" not in available_models()


def test_registering_a_nameless_or_non_callable_model_is_an_error() -> None:
    from ml.models import register_model_factory

    with pytest.raises(ValueError, match="non-empty"):
        register_model_factory("", lambda shape, classes: nn.Linear(1, classes))
    with pytest.raises(ValueError, match="not callable"):
        register_model_factory("broken", "cnn")  # type: ignore[arg-type]
    assert "" not in available_models() and "broken" not in available_models()
