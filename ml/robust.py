"""Robust aggregation strategies: coordinate-wise median and trimmed mean, Krum and
Multi-Krum, and norm clipping around any strategy. They bound what a minority of bad
(Byzantine) updates can do to the global model; docs/strategies.md compares them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .aggregation import (
    Round,
    Strategy,
    Weights,
    check_count,
    check_number,
    proximal_mu,
    split_state,
)


class Median:
    """Coordinate-wise median of the updates (Yin et al. 2018), unweighted.

    No parameters. Tolerates just under half the updates being arbitrary (Byzantine),
    at some cost in accuracy when all are honest, most with skewed data.
    """

    name = "median"

    def aggregate(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> Weights:
        """Per coordinate, the middle value (the mean of the two middle ones for even n)."""
        rnd = Round(self.name, base, updates)
        values = rnd.fedavg_others()
        lo, hi = (rnd.n - 1) // 2, rnd.n // 2
        for key in rnd.floats:
            ordered = np.sort(rnd.stack(key), axis=0)  # NaN sorts last, like +inf
            values[key] = (ordered[lo] + ordered[hi]) / 2
        return rnd.result(values)


class TrimmedMean:
    """Coordinate-wise trimmed mean (Yin et al. 2018), unweighted.

    ``beta`` (default 0.2, 0 <= beta < 0.5): per coordinate, the ``floor(beta * n)``
    largest and as many smallest values are dropped and the rest averaged. It tolerates
    that many Byzantine updates; with fewer than ``1 / beta`` updates nothing is dropped.
    ``beta = 0`` is the unweighted mean.
    """

    name = "trimmed-mean"

    def __init__(self, beta: float = 0.2) -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0, high=0.5)

    def aggregate(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> Weights:
        """Per coordinate, the mean of the values left after trimming both ends."""
        rnd = Round(self.name, base, updates)
        values = rnd.fedavg_others()
        k = int(math.floor(self.beta * rnd.n + 1e-9))
        for key in rnd.floats:
            ordered = np.sort(rnd.stack(key), axis=0)  # NaN sorts last, like +inf
            values[key] = ordered[k : rnd.n - k].mean(axis=0)
        return rnd.result(values)


class MultiKrum:
    """Multi-Krum (Blanchard et al. 2017): the example-weighted mean of the ``m`` updates
    with the lowest Krum scores.

    An update's score is the sum of its squared distances (over all float tensors) to
    its ``n - f - 2`` nearest other updates; honest updates sit close together, so an
    outlier scores high. ``f`` (default 1, >= 0) is the number of Byzantine updates to
    tolerate, and a round needs ``n > 2f + 2`` updates (``ValueError`` otherwise). ``m``
    (default ``None``: ``n - f``, >= 1) is how many to average, at most ``n - f`` in
    any round. Integer and boolean tensors come from the selected updates only.
    """

    name = "multi-krum"

    def __init__(self, f: int = 1, m: int | None = None) -> None:
        self.f = check_count(self.name, "f", f, low=0)
        self.m = None if m is None else check_count(self.name, "m", m, low=1)

    def scores(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> list[float]:
        """Krum score of each non-empty update, in order (lower is more central)."""
        return self._scores(Round(self.name, base, updates)).tolist()

    def _scores(self, rnd: Round) -> np.ndarray:
        n, f = rnd.n, self.f
        if n <= 2 * f + 2:
            raise ValueError(f"{self.name}: needs n > 2f + 2 updates, got n={n} with f={f}"
                             f" (at least {2 * f + 3} updates, or a smaller f)")
        dist = np.zeros((n, n), np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            for key in rnd.floats:
                flat = rnd.stack(key).reshape(n, -1)
                for i in range(n):
                    dist[i] += ((flat - flat[i]) ** 2).sum(axis=1)
        dist[~np.isfinite(dist)] = np.inf  # NaN or inf in an update: infinitely far
        np.fill_diagonal(dist, np.inf)  # an update is not its own neighbour
        nearest = np.sort(dist, axis=1)[:, : n - f - 2]
        with np.errstate(invalid="ignore"):
            return nearest.sum(axis=1)

    def _selected(self, rnd: Round, m: int) -> list[int]:
        # Stable sort: ties go to the earlier update, so every node picks the same ones.
        return sorted(np.argsort(self._scores(rnd), kind="stable")[:m].tolist())

    def aggregate(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> Weights:
        """The weighted mean of the ``m`` best-scoring updates."""
        rnd = Round(self.name, base, updates)
        m = rnd.n - self.f if self.m is None else min(self.m, rnd.n - self.f)
        rows = self._selected(rnd, m)
        values = rnd.fedavg_others(rows)
        for key in rnd.floats:
            values[key] = rnd.weighted_mean(key, rows)
        return rnd.result(values)


class Krum(MultiKrum):
    """Krum (Blanchard et al. 2017): the single update with the lowest Krum score.

    ``f`` (default 1, >= 0): Byzantine updates to tolerate; needs ``n > 2f + 2``
    updates. The result is one member's model, so it learns like that member alone:
    noisier than an average, but an outlier never leaks into it.
    """

    name = "krum"

    def __init__(self, f: int = 1) -> None:
        super().__init__(f, 1)


class Clipped:
    """Norm clipping around another strategy: each update's delta ``update - base``, over
    all float tensors together, is scaled down to L2 norm at most ``max_norm`` (> 0)
    before ``inner`` aggregates. Shorter deltas pass unchanged; integer and boolean
    tensors are not touched. An update holding NaN or infinity is replaced by the base
    (a zero delta). Bounds what any one member can move the model per round; pick
    ``max_norm`` near the honest deltas' typical norm. ``mu`` is the inner strategy's.
    """

    def __init__(self, inner: Strategy, max_norm: float) -> None:
        if not callable(getattr(inner, "aggregate", None)):
            raise ValueError(f"clip: the inner strategy {inner!r} has no aggregate method")
        self.inner = inner
        self.name = f"{getattr(inner, 'name', type(inner).__name__)}+clip"
        self.max_norm = check_number("clip", "max_norm", max_norm, low=0.0, low_open=True)

    @property
    def mu(self) -> float:
        """The inner strategy's proximal ``mu`` (0 when it has none)."""
        return proximal_mu(self.inner)

    def clip(self, base: Weights, weights: Weights) -> Weights:
        """``weights`` with its float delta from ``base`` clipped to ``max_norm``."""
        model, _ = split_state(base)
        floats = [k for k, v in model.items() if np.asarray(v).dtype.kind == "f"]
        deltas = {k: np.asarray(weights[k], np.float64) - np.asarray(model[k], np.float64)
                  for k in floats}
        with np.errstate(over="ignore", invalid="ignore"):
            norm = math.sqrt(sum(float((d * d).sum()) for d in deltas.values()))
        if norm <= self.max_norm:
            return weights
        out = dict(weights)
        for k, d in deltas.items():
            ref = np.asarray(model[k], np.float64)
            # A NaN or infinite delta cannot be scaled (0 * inf is NaN): use the base.
            moved = ref + d * (self.max_norm / norm) if math.isfinite(norm) else ref
            out[k] = moved.astype(np.asarray(weights[k]).dtype)
        return out

    def aggregate(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> Weights:
        """The inner strategy's result on the clipped updates."""
        Round(self.name, base, updates)  # validate before touching any tensor
        return self.inner.aggregate(base, [(self.clip(base, w), n) for w, n in updates])
