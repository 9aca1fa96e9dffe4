"""A user-defined strategy, as docs/strategies.md shows: loaded by the tests with
``--strategy tests.ml.custom_strategy:KeepFirst``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Weights = dict[str, np.ndarray]


class KeepFirst:
    """Keeps the first update as the next global model (a toy, to show the interface)."""

    name = "keep-first"

    def aggregate(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> Weights:
        return {k: np.array(v) for k, v in updates[0][0].items()}
