"""A worked example of fl-node's extension points (docs/extending.md): a data set and a
model, registered when the module is imported.

    PYTHONPATH=docs/examples fl-node start --plugin blobs_plugin --dataset blobs \
        --model tiny-mlp ...

(the module may live anywhere on PYTHONPATH). Every node of a federation must load the same
plugin: the genesis model is built from it.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from ml.datasets import DatasetBundle, make_dataset, register_dataset
from ml.models import register_model


@register_dataset("blobs")
def blobs(data_dir: str | None, download: bool, seed: int) -> DatasetBundle:
    """Four Gaussian blobs in 2-D: 800 training and 200 test points, made from ``seed``
    (so every node holds the same data set and partitions it the same way)."""
    rng = np.random.default_rng(seed)
    centers = np.array([[2, 2], [-2, 2], [-2, -2], [2, -2]], np.float32)
    y = rng.integers(0, 4, size=1000)
    x = centers[y] + rng.normal(scale=0.7, size=(1000, 2)).astype(np.float32)
    return make_dataset("blobs", x[:800], y[:800], x[800:], y[800:], num_classes=4)


@register_model("tiny-mlp")
def tiny_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """One hidden layer of 16 units: enough for blobs, and DP-compatible (no BatchNorm)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 16), nn.ReLU(),
                         nn.Linear(16, num_classes))
