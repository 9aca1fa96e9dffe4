"""What every aggregation strategy shares: the update format, ``fedavg``, strategy-state
tensors (``fl.opt.*``), the ``Strategy`` protocol, and ``Round``, a round's updates
validated against its base model.

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

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

Weights = dict[str, np.ndarray]

STATE_PREFIX = "fl.opt."
"""Name prefix of strategy-state tensors: ``fl.opt.<slot>.<tensor name>`` (the protocol
checks the same prefix, ``protocol.rounds.STATE_PREFIX``)."""


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
        for (weights, _), n in zip(updates, counts, strict=True):
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


class Round:
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
        for i, ((weights, _), n) in enumerate(zip(updates, counts, strict=True)):
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


def check_number(who: str, name: str, value: object, *, low: float, high: float = math.inf,
                 low_open: bool = False, high_open: bool = True) -> float:
    """``value`` as a finite float within the bounds, else ``ValueError`` naming ``who``'s
    parameter ``name`` and the range (a strategy's constructor checks its parameters)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{who}: {name} must be a number, got {value!r}")
    x = float(value)
    ok = (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
    if not math.isfinite(x) or not ok:
        lo = f"{name} {'>' if low_open else '>='} {low:g}"
        hi = "" if high == math.inf else f" and {'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{who}: need {lo}{hi}, got {name}={value!r}")
    return x


def check_count(who: str, name: str, value: object, *, low: int) -> int:
    """``value`` if it is an integer of at least ``low`` (not a bool), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{who}: {name} must be an integer >= {low}, got {value!r}")
    return value


def proximal_mu(strategy: object) -> float:
    """The FedProx ``mu`` members should train with: the strategy's ``mu``, else 0."""
    mu = getattr(strategy, "mu", 0.0)
    return float(mu) if isinstance(mu, (int, float)) and not isinstance(mu, bool) else 0.0
