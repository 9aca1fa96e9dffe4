"""Aggregation strategies: pure functions over (weights, example count) pairs.

Each round one elected node, the aggregator, combines the members' updates into the next
global model. An update is a member's FULL weights after local training (``name -> numpy
array``) with its example count; the aggregator also knows the round's base, the current
global model every member started from. A strategy is anything with a ``name`` and
``aggregate(base, updates) -> next global model`` (the ``Strategy`` protocol). Strategies do
no I/O and keep no state between calls, because the aggregator changes every round: state
that must outlive a round (FedAdam's and FedYogi's moments) travels inside the global model
as float32 tensors named ``fl.opt.<slot>.<tensor name>`` (``STATE_PREFIX``), after the
model's tensors. ``split_state`` separates them before a model is loaded for training.

Rules every built-in follows (docs/strategies.md has the whole picture):

- The result has the base's model tensors, in the base's order and dtypes, then state.
- State comes only from ``base``: a strategy that keeps none (all but FedAdam and FedYogi)
  copies the base's ``fl.opt.*`` tensors through unchanged and never averages them, and any
  ``fl.opt.*`` tensor in an update is ignored, so a member cannot tamper with it.
- Robust rules apply to float tensors. Integer and boolean tensors (counters such as
  BatchNorm's ``num_batches_tracked``, masks) are combined as ``fedavg`` does: the
  example-weighted mean rounded to the nearest integer, or the weighted majority. That is
  over all updates, except for Krum and Multi-Krum, which use only the updates they select.
- An update with 0 examples carries nothing and is left out. ``ValueError`` for no updates,
  a negative count, no examples at all, or an update whose tensor names or shapes differ
  from the base model's.
- Median, trimmed mean and Krum order NaN above every number, so a minority of updates
  holding NaN or infinity is trimmed or never selected like any other outlier.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

Weights = dict[str, np.ndarray]

STATE_PREFIX = "fl.opt."
"""Name prefix of strategy-state tensors: ``fl.opt.<slot>.<tensor name>`` (the protocol
checks the same prefix, ``protocol.rounds.STATE_PREFIX``)."""

log = logging.getLogger(__name__)


def fedavg(updates: Sequence[tuple[Weights, int]]) -> Weights:
    """Mean of the updates weighted by example counts (FedAvg), accumulated in float64.

    Every tensor keeps the dtype of the first update. Float tensors get the weighted mean.
    Integer tensors (counters in buffers, e.g. BatchNorm's ``num_batches_tracked``) get
    the weighted mean rounded to the nearest integer (halves to even), and boolean
    tensors the weighted majority. ``ValueError`` for no updates, a negative or all-zero
    example count, or updates whose tensor names or shapes differ.
    """
    if not updates:
        raise ValueError("fedavg: no updates")
    counts = [int(n) for _, n in updates]
    if any(n < 0 for n in counts):
        raise ValueError(f"fedavg: negative example count in {counts}")
    total = sum(counts)
    if total <= 0:
        raise ValueError("fedavg: the updates carry no examples")
    first = updates[0][0]
    keys = set(first)
    for weights, _ in updates[1:]:
        if set(weights) != keys:
            raise ValueError("fedavg: updates have different tensors:"
                             f" {sorted(keys ^ set(weights))[:3]}")
    out: Weights = {}
    for key in first:
        ref = np.asarray(first[key])
        acc = np.zeros(ref.shape, dtype=np.float64)
        for (weights, _), n in zip(updates, counts):
            arr = np.asarray(weights[key])
            if arr.shape != ref.shape:
                raise ValueError(f"fedavg: {key} has shape {arr.shape}, expected {ref.shape}")
            acc += arr.astype(np.float64) * (n / total)
        if ref.dtype.kind in "biu":
            out[key] = np.rint(acc).astype(ref.dtype)
        else:
            out[key] = acc.astype(ref.dtype)
    return out


def split_state(weights: Weights) -> tuple[Weights, Weights]:
    """``(model tensors, strategy-state tensors)``: the state is every ``fl.opt.*`` tensor.

    A node strips the state before loading a global model for training or evaluation
    (``set_weights`` refuses names the model lacks) and keeps the whole model, state
    included, as the base of the next round.
    """
    model = {k: v for k, v in weights.items() if not k.startswith(STATE_PREFIX)}
    state = {k: v for k, v in weights.items() if k.startswith(STATE_PREFIX)}
    return model, state


@runtime_checkable
class Strategy(Protocol):
    """How the aggregator turns a round's updates into the next global model.

    ``base`` is the current global model (the weights every member trained from, with any
    ``fl.opt.*`` state); ``updates`` are ``(full weights, example count)`` pairs. The
    result is the next global model: the base's tensor names, shapes and dtypes, in the
    base's order, optionally followed by ``fl.opt.<slot>.<tensor name>`` float32 state
    tensors shaped like the tensor they name. ``aggregate`` must be pure (no I/O, inputs
    unmodified): any node may be the aggregator, so the same inputs must give the same
    model everywhere, and anything it must remember goes into the state tensors.
    ``ValueError`` means the round cannot be aggregated (too few updates, say).
    """

    name: str

    def aggregate(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> Weights:
        """The next global model from ``base`` and the round's updates."""
        ...


# -- shared machinery ------------------------------------------------------------------

class _Round:
    """A validated round: the base split into model and state, the non-empty updates."""

    def __init__(self, who: str, base: Weights, updates: Sequence[tuple[Weights, int]]):
        if not updates:
            raise ValueError(f"{who}: no updates")
        self.model, self.state = split_state(base)
        if not self.model:
            raise ValueError(f"{who}: the base model has no tensors")
        for key, ref in self.model.items():
            if np.asarray(ref).dtype.kind not in "biuf":
                raise ValueError(f"{who}: base tensor {key} has unsupported dtype"
                                 f" {np.asarray(ref).dtype}")
        counts = [int(n) for _, n in updates]
        if any(n < 0 for n in counts):
            raise ValueError(f"{who}: negative example count in {counts}")
        if sum(counts) <= 0:
            raise ValueError(f"{who}: the updates carry no examples")
        self.weights: list[Weights] = []
        self.counts: list[int] = []
        for i, ((weights, _), n) in enumerate(zip(updates, counts)):
            own = {k: v for k, v in weights.items() if not k.startswith(STATE_PREFIX)}
            if set(own) != set(self.model):
                raise ValueError(f"{who}: update {i} has different tensors from the base"
                                 f" model: {sorted(set(own) ^ set(self.model))[:3]}")
            for key, ref in self.model.items():
                shape = np.shape(own[key])
                if shape != np.shape(ref):
                    raise ValueError(f"{who}: update {i}: {key} has shape {shape},"
                                     f" expected {np.shape(ref)}")
            if n > 0:
                self.weights.append(own)
                self.counts.append(n)
        self.floats = [k for k, v in self.model.items() if np.asarray(v).dtype.kind == "f"]
        self.others = [k for k in self.model if k not in set(self.floats)]

    @property
    def n(self) -> int:
        return len(self.weights)

    def stack(self, key: str, rows: Sequence[int] | None = None) -> np.ndarray:
        """The updates' values of ``key`` as one float64 array, update index first."""
        chosen = range(self.n) if rows is None else rows
        return np.stack([np.asarray(self.weights[i][key], dtype=np.float64) for i in chosen])

    def fedavg_others(self, rows: Sequence[int] | None = None) -> Weights:
        """Integer and boolean tensors, by ``fedavg``'s rule over ``rows`` (all updates)."""
        chosen = range(self.n) if rows is None else rows
        return fedavg([({k: self.weights[i][k] for k in self.others}, self.counts[i])
                       for i in chosen])

    def weighted_mean(self, key: str, rows: Sequence[int] | None = None) -> np.ndarray:
        chosen = list(range(self.n) if rows is None else rows)
        total = sum(self.counts[i] for i in chosen)
        acc = np.zeros(np.shape(self.model[key]), np.float64)
        for i in chosen:
            acc += np.asarray(self.weights[i][key], np.float64) * (self.counts[i] / total)
        return acc

    def result(self, values: Weights, state: Weights | None = None) -> Weights:
        """The base's model tensors from ``values`` (cast to the base's dtypes, in its
        order), then the state: the base's, with ``state`` replacing or adding tensors."""
        out: Weights = {}
        for key, ref in self.model.items():
            out[key] = np.asarray(values[key]).astype(np.asarray(ref).dtype)
        merged = {k: np.array(v, copy=True) for k, v in self.state.items()}
        merged.update(state or {})
        out.update(merged)
        return out


def _number(who: str, name: str, value: object, *, low: float, high: float = math.inf,
            low_open: bool = False, high_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{who}: {name} must be a number, got {value!r}")
    x = float(value)
    ok = (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
    if not math.isfinite(x) or not ok:
        lo = f"{name} {'>' if low_open else '>='} {low:g}"
        hi = "" if high == math.inf else f" and {'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{who}: need {lo}{hi}, got {name}={value!r}")
    return x


def _count(who: str, name: str, value: object, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{who}: {name} must be an integer >= {low}, got {value!r}")
    return value


# -- averaging strategies ---------------------------------------------------------------

class FedAvg:
    """FedAvg (McMahan et al. 2017): the example-weighted mean of the updates, as
    ``fedavg`` computes it. No parameters. The best choice when every member is honest."""

    name = "fedavg"

    def aggregate(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> Weights:
        """``fedavg`` of the updates; the base's ``fl.opt.*`` state passes through."""
        rnd = _Round(self.name, base, updates)
        return rnd.result(fedavg(list(zip(rnd.weights, rnd.counts))))


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg aggregation, plus a proximal term in local training.

    ``mu`` (default 0.01, >= 0; the paper tries 0.001 to 1): members add
    ``mu / 2 * ||w - w_global||^2`` to their training loss (``ml.training.train_local``'s
    ``prox_mu``), which keeps local models near the global one when data is skewed across
    nodes. ``mu = 0`` is plain FedAvg. The node reads it with ``proximal_mu(strategy)``.
    """

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        self.mu = _number(self.name, "mu", mu, low=0.0)


class _ServerAdaptive:
    """FedOpt (Reddi et al. 2021, Algorithm 2) with an adaptive server optimizer.

    The pseudo-gradient ``d = fedavg(updates) - base`` (float tensors, float64) drives
    ``m = b1 * m + (1 - b1) * d``, a second moment ``v`` (see the subclasses) and
    ``new = base + eta * m / (sqrt(v) + tau)``, without bias correction, as in the paper.
    ``m`` and ``v`` travel in the result as float32 ``fl.opt.m.<name>`` and
    ``fl.opt.v.<name>`` and are read back from ``base`` next round; absent means zeros
    (the first round). Integer and boolean tensors are ``fedavg``'s.
    """

    name = "fedopt"

    def __init__(self, eta: float = 0.01, b1: float = 0.9, b2: float = 0.99,
                 tau: float = 1e-3) -> None:
        self.eta = _number(self.name, "eta", eta, low=0.0, low_open=True)
        self.b1 = _number(self.name, "b1", b1, low=0.0, high=1.0)
        self.b2 = _number(self.name, "b2", b2, low=0.0, high=1.0)
        self.tau = _number(self.name, "tau", tau, low=0.0, low_open=True)

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _moment(self, rnd: _Round, slot: str, key: str) -> np.ndarray:
        name = f"{STATE_PREFIX}{slot}.{key}"
        if name not in rnd.state:
            return np.zeros(np.shape(rnd.model[key]), np.float64)
        value = np.asarray(rnd.state[name])
        if value.shape != np.shape(rnd.model[key]):
            raise ValueError(f"{self.name}: state {name} has shape {value.shape},"
                             f" expected {np.shape(rnd.model[key])}")
        return value.astype(np.float64)

    def aggregate(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> Weights:
        """One server-optimizer step from ``base`` along the mean update."""
        rnd = _Round(self.name, base, updates)
        values = rnd.fedavg_others()
        state: Weights = {}
        for key in rnd.floats:
            w = np.asarray(rnd.model[key], np.float64)
            d = rnd.weighted_mean(key) - w
            m = self.b1 * self._moment(rnd, "m", key) + (1 - self.b1) * d
            v = self._second_moment(self._moment(rnd, "v", key), d * d)
            # v >= 0 by construction; the clamp only guards against a corrupt state.
            values[key] = w + self.eta * m / (np.sqrt(np.maximum(v, 0.0)) + self.tau)
            state[f"{STATE_PREFIX}m.{key}"] = m.astype(np.float32)
            state[f"{STATE_PREFIX}v.{key}"] = v.astype(np.float32)
        return rnd.result(values, state)


class FedAdam(_ServerAdaptive):
    """FedAdam (Reddi et al. 2021): Adam on the server, ``v = b2 * v + (1 - b2) * d^2``.

    ``eta`` server learning rate (default 0.01, > 0), ``b1`` (0.9) and ``b2`` (0.99) moment
    decays in [0, 1), ``tau`` adaptivity (1e-3, > 0). b1 = 0.9 and b2 = 0.99 are the
    paper's; it tunes eta (and tau) per task on logarithmic grids. For the digits MLP, 30
    rounds of 10 nodes reach 87 % test accuracy with eta = 0.001, 94 % with 0.003, 96 %
    with 0.01 and 0.03 (FedAvg: 96 %), hence 0.01. Without bias correction each
    coordinate first moves by about ``eta`` per round whatever the update's scale: lower
    eta for models with small weights or for fine-tuning, raise it to go faster.
    """

    name = "fedadam"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return self.b2 * v + (1 - self.b2) * d2


class FedYogi(_ServerAdaptive):
    """FedYogi (Reddi et al. 2021): Yogi on the server, ``v = v - (1 - b2) d^2 sign(v - d^2)``.

    ``v`` grows additively instead of decaying towards ``d^2``, so a few large updates
    do not shrink the step for long. Parameters and defaults as ``FedAdam``.
    """

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v - (1 - self.b2) * d2 * np.sign(v - d2)


# -- robust strategies -------------------------------------------------------------------

class Median:
    """Coordinate-wise median of the updates (Yin et al. 2018), unweighted.

    No parameters. Tolerates just under half the updates being arbitrary (Byzantine),
    at some cost in accuracy when all are honest, most with skewed data.
    """

    name = "median"

    def aggregate(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> Weights:
        """Per coordinate, the middle value (the mean of the two middle ones for even n)."""
        rnd = _Round(self.name, base, updates)
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
        self.beta = _number(self.name, "beta", beta, low=0.0, high=0.5)

    def aggregate(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> Weights:
        """Per coordinate, the mean of the values left after trimming both ends."""
        rnd = _Round(self.name, base, updates)
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
        self.f = _count(self.name, "f", f, low=0)
        self.m = None if m is None else _count(self.name, "m", m, low=1)

    def scores(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> list[float]:
        """Krum score of each non-empty update, in order (lower is more central)."""
        return self._scores(_Round(self.name, base, updates)).tolist()

    def _scores(self, rnd: _Round) -> np.ndarray:
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

    def _selected(self, rnd: _Round, m: int) -> list[int]:
        # Stable sort: ties go to the earlier update, so every node picks the same ones.
        return sorted(np.argsort(self._scores(rnd), kind="stable")[:m].tolist())

    def aggregate(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> Weights:
        """The weighted mean of the ``m`` best-scoring updates."""
        rnd = _Round(self.name, base, updates)
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
        self.max_norm = _number("clip", "max_norm", max_norm, low=0.0, low_open=True)

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
        _Round(self.name, base, updates)  # validate before touching any tensor
        return self.inner.aggregate(base, [(self.clip(base, w), n) for w, n in updates])


def proximal_mu(strategy: object) -> float:
    """The FedProx ``mu`` members should train with: the strategy's ``mu``, else 0."""
    mu = getattr(strategy, "mu", 0.0)
    return float(mu) if isinstance(mu, (int, float)) and not isinstance(mu, bool) else 0.0


# -- registry and parser -----------------------------------------------------------------

BUILTIN_STRATEGIES: dict[str, type] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi,
    "median": Median, "trimmed-mean": TrimmedMean, "krum": Krum, "multi-krum": MultiKrum,
}
"""Built-in ``--strategy`` names and their classes."""


def available_strategies() -> list[str]:
    """The built-in strategy names, for ``--help`` and error messages."""
    return list(BUILTIN_STRATEGIES)


def _accepted(cls: Any) -> tuple[set[str], bool]:
    """Keyword parameters ``cls(...)`` accepts, and whether it takes ``**kwargs``."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return set(), False
    names = {p.name for p in sig.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def _load_custom(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"strategy {spec!r}: expected package.module:Name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"strategy {spec!r}: cannot import module {module_name!r}"
                         f" ({exc})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"strategy {spec!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


def parse_strategy(spec: str, **params: Any) -> Strategy:
    """The strategy named by ``spec`` (``--strategy``), built with ``params``.

    ``spec`` is a built-in name (``available_strategies()``; case and ``_`` for ``-`` do
    not matter) or ``package.module:Name``, a class importable on the node's path that
    follows the ``Strategy`` protocol. ``params`` come from CLI flags; ``None`` means
    unset (the class default). Known ones:

    - ``mu``: FedProx proximal weight (default 0.01), ``--mu``.
    - ``beta``: trimmed-mean fraction cut at each end (0.2), ``--trim-beta``.
    - ``f``: Byzantine updates Krum and Multi-Krum tolerate (1), ``--krum-f``.
    - ``m``: updates Multi-Krum averages (n - f), ``--multi-krum-m``.
    - ``eta``: FedAdam/FedYogi server learning rate (0.01), ``--server-lr``;
      ``b1`` (0.9), ``b2`` (0.99), ``tau`` (1e-3) too, without flags.
    - ``clip_norm``: when set, wrap the strategy in ``Clipped(strategy, clip_norm)``,
      ``--clip-norm``.

    A built-in given a parameter it does not use is a ``ValueError`` (a likely mistake:
    ``--krum-f`` with ``trimmed-mean``). A custom class gets the parameters its
    ``__init__`` accepts (all of them if it takes ``**kwargs``); the others are dropped
    with a warning. A custom class without a ``name`` attribute is given ``spec``.
    ``ValueError`` with a message for the operator for an unknown name, a module or
    attribute that does not exist, an object without ``aggregate``, or a bad parameter.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("strategy: empty name; known: " + ", ".join(available_strategies()))
    spec = spec.strip()
    given = {k: v for k, v in params.items() if v is not None}
    clip_norm = given.pop("clip_norm", None)
    key = spec.lower().replace("_", "-")
    if key in BUILTIN_STRATEGIES:
        cls = BUILTIN_STRATEGIES[key]
        accepted, _ = _accepted(cls)
        unused = sorted(set(given) - accepted)
        if unused:
            takes = ", ".join(sorted(accepted)) or "none"
            raise ValueError(f"strategy {key!r} does not use {', '.join(unused)}"
                             f" (its parameters: {takes})")
        strategy: Any = cls(**given)
    elif ":" in spec:
        obj = _load_custom(spec)
        if inspect.isclass(obj):
            accepted, takes_all = _accepted(obj)
            passed = given if takes_all else {k: v for k, v in given.items() if k in accepted}
            dropped = sorted(set(given) - set(passed))
            if dropped:
                log.warning("strategy %s does not take %s; ignored", spec, ", ".join(dropped))
            try:
                strategy = obj(**passed)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"strategy {spec!r}: cannot create it: {exc}") from None
        else:
            if given:
                log.warning("strategy %s is an object, not a class; %s ignored", spec,
                            ", ".join(sorted(given)))
            strategy = obj
        if not callable(getattr(strategy, "aggregate", None)):
            raise ValueError(f"strategy {spec!r}: {type(strategy).__name__} has no"
                             " aggregate(base, updates) method")
        if not isinstance(getattr(strategy, "name", None), str):
            try:
                strategy.name = spec
            except (AttributeError, TypeError):
                pass
    else:
        raise ValueError(f"unknown strategy {spec!r}; known: "
                         + ", ".join(available_strategies())
                         + ", or package.module:Name for your own")
    if clip_norm is not None:
        strategy = Clipped(strategy, clip_norm)
    return strategy
