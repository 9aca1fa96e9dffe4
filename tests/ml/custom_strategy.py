"""User-defined strategies for the ``--strategy package.module:Name`` tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ml.strategies import Weights, split_state


class KeepFirst:
    """Keeps the first update's model as it is; the base's state passes through.

    Takes ``mu`` and nothing else, so ``parse_strategy`` must drop other parameters.
    """

    name = "keep-first"

    def __init__(self, mu: float = 0.0) -> None:
        self.mu = mu

    def aggregate(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> Weights:
        """The first update's tensors, in the base's order, then the base's state."""
        model, state = split_state(base)
        first = updates[0][0]
        return {**{k: np.array(first[k]) for k in model}, **state}


class TakesAll:
    """Accepts any parameter through ``**params``."""

    def __init__(self, **params: object) -> None:
        self.params = params

    def aggregate(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> Weights:
        """The base, unchanged."""
        return dict(base)


class NoAggregate:
    """Not a strategy: no ``aggregate`` method."""

    name = "no-aggregate"


class RefusesToStart:
    """A strategy whose constructor rejects its configuration."""

    def __init__(self) -> None:
        raise ValueError("needs a GPU")

    def aggregate(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> Weights:
        """Never reached."""
        return dict(base)
