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

This module holds the averaging strategies (FedAvg, FedProx, FedAdam, FedYogi) and the
``--strategy`` registry and parser; ``ml.aggregation`` what they all share (the rules every
built-in follows are there), ``ml.robust`` the robust ones.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from .aggregation import (
    STATE_PREFIX,
    Round,
    Strategy,
    Weights,
    check_number,
    fedavg,
    proximal_mu,
    split_state,
)
from .robust import Clipped, Krum, Median, MultiKrum, TrimmedMean

__all__ = [
    "STATE_PREFIX", "BUILTIN_STRATEGIES", "Clipped", "FedAdam", "FedAvg", "FedProx",
    "FedYogi", "Krum", "Median", "MultiKrum", "Strategy", "TrimmedMean", "Weights",
    "available_strategies", "fedavg", "parse_strategy", "proximal_mu", "split_state",
]

log = logging.getLogger(__name__)


# -- averaging strategies ---------------------------------------------------------------

class FedAvg:
    """FedAvg (McMahan et al. 2017): the example-weighted mean of the updates, as
    ``fedavg`` computes it. No parameters. The best choice when every member is honest."""

    name = "fedavg"

    def aggregate(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> Weights:
        """``fedavg`` of the updates; the base's ``fl.opt.*`` state passes through."""
        rnd = Round(self.name, base, updates)
        return rnd.result(fedavg(list(zip(rnd.weights, rnd.counts, strict=True))))


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg aggregation, plus a proximal term in local training.

    ``mu`` (default 0.01, >= 0; the paper tries 0.001 to 1): members add
    ``mu / 2 * ||w - w_global||^2`` to their training loss (``ml.training.train_local``'s
    ``prox_mu``), which keeps local models near the global one when data is skewed across
    nodes. ``mu = 0`` is plain FedAvg. The node reads it with ``proximal_mu(strategy)``.
    """

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        self.mu = check_number(self.name, "mu", mu, low=0.0)


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
        self.eta = check_number(self.name, "eta", eta, low=0.0, low_open=True)
        self.b1 = check_number(self.name, "b1", b1, low=0.0, high=1.0)
        self.b2 = check_number(self.name, "b2", b2, low=0.0, high=1.0)
        self.tau = check_number(self.name, "tau", tau, low=0.0, low_open=True)

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _moment(self, rnd: Round, slot: str, key: str) -> np.ndarray:
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
        rnd = Round(self.name, base, updates)
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
