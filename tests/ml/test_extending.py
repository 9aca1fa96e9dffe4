"""The extension points of docs/extending.md, with its worked example."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml.datasets import available_datasets
from ml.learner import TorchLearner
from ml.models import available_models
from node.cli.main import load_plugins
from node.config import ConfigError, build_config

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def test_the_example_plugin_registers_a_dataset_and_a_model_that_train(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    load_plugins(("blobs_plugin",))
    assert "blobs" in available_datasets() and "tiny-mlp" in available_models()
    learners = [TorchLearner(dataset="blobs", model="tiny-mlp", num_partitions=2,
                             partition_index=i, lr=0.1) for i in range(2)]
    weights = learners[0].initial_weights()
    for r in (1, 2, 3):
        weights = learners[0].aggregate(weights, [
            (lrn.train(weights, r).weights, lrn.num_examples) for lrn in learners])
    assert learners[1].evaluate(weights).accuracy > 0.9


def test_a_plugin_that_cannot_be_imported_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="--plugin no_such_plugin_mod: cannot import"):
        load_plugins(("no_such_plugin_mod",))


def test_an_unknown_dataset_needs_a_plugin_to_be_accepted() -> None:
    with pytest.raises(ConfigError, match="--plugin"):
        build_config({"dataset": "blobs"}, environ={})
    config = build_config({"dataset": "blobs", "plugins": ("blobs_plugin",)}, environ={})
    assert config.plugins == ("blobs_plugin",)
