"""Local differential privacy: DP-SGD with Opacus and one lifetime accountant per node.

A node's privacy loss is the composition of every DP-SGD step it has ever taken on its
shard, across rounds and restarts. ``PrivacyLedger`` holds that history in exactly the
format of Opacus' ``RDPAccountant.history`` (``(noise_multiplier, sample_rate, steps)``
entries) and is saved as JSON next to the node's other state, so epsilon never resets
and never decreases. ``train_local_dp`` runs one round of DP-SGD through a fresh
``PrivacyEngine`` whose accountant *continues* the ledger; a per-round engine's own
epsilon would understate the loss by the factor of rounds run.

Sampling is Poisson, as the RDP analysis assumes. Opacus samples each example with
probability ``1 / ceil(N / batch_size)`` (about ``batch_size / N``) and takes
``int(1 / rate)`` steps per epoch; ``poisson_schedule`` gives those figures, so budgets
are planned with the rate that is really used.
"""

from __future__ import annotations

import copy
import json
import math
import os
import secrets
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ml.training import EpochRun, check_train_args, run_epochs

LEDGER_FORMAT = "fl-node/privacy-ledger"
LEDGER_VERSION = 1
MAX_LEDGER_BYTES = 4 * 1024 * 1024
"""A ledger file larger than this is refused as corrupt (a real one is a few hundred bytes)."""

HistoryEntry = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, steps)``, as in ``RDPAccountant.history``."""


def poisson_schedule(num_examples: int, batch_size: int) -> tuple[float, int]:
    """``(sample_rate, steps_per_epoch)`` of Opacus' Poisson sampling for this shard.

    ``make_private`` samples at ``1 / len(loader) = 1 / ceil(N / batch_size)`` and its
    sampler runs ``int(1 / sample_rate)`` batches per epoch (one fewer than
    ``ceil(N / batch_size)`` for some sizes, through float rounding); this mirrors both.
    """
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need num_examples >= 1 (got {num_examples}) and batch_size >= 1"
                         f" (got {batch_size})")
    rate = 1 / math.ceil(num_examples / batch_size)
    return rate, int(1 / rate)


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not value > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_entry(noise_multiplier: object, sample_rate: object, steps: object) -> HistoryEntry:
    noise = _positive("noise_multiplier", noise_multiplier)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) \
            or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    return noise, float(sample_rate), steps


def _check_delta(delta: float) -> None:
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _rdp_epsilon(history: Iterable[HistoryEntry], delta: float) -> float:
    entries = [e for e in history if e[2] > 0]
    if not entries:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = entries
    return float(accountant.get_epsilon(delta))


class PrivacyLedger:
    """The node's lifetime RDP accountant: every DP-SGD step it ever took.

    ``history`` has Opacus' ``RDPAccountant.history`` format, so
    ``RDPAccountant().history = ledger.history`` reproduces ``epsilon``. RDP composes by
    addition, so merging consecutive entries with equal noise and rate is exact and the
    epsilon after rounds recorded one by one equals that of one entry with all steps.
    Thread-safe: a training thread records while the event loop reads epsilon.
    """

    def __init__(self, history: Iterable[tuple[float, float, int]] = ()) -> None:
        self._lock = threading.Lock()
        self._history: list[HistoryEntry] = []
        for entry in history:
            if len(entry) != 3:
                raise ValueError(f"a history entry has 3 numbers, got {entry!r}")
            self.record(*entry)

    @property
    def history(self) -> list[HistoryEntry]:
        """A copy of ``[(noise_multiplier, sample_rate, steps), ...]``."""
        with self._lock:
            return list(self._history)

    @property
    def total_steps(self) -> int:
        """DP-SGD steps recorded over the node's lifetime."""
        with self._lock:
            return sum(e[2] for e in self._history)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add ``steps`` steps of the sampled Gaussian mechanism (merged with the last
        entry when noise and rate are equal, as ``RDPAccountant.step`` does)."""
        entry = _check_entry(noise_multiplier, sample_rate, steps)
        with self._lock:
            if self._history and self._history[-1][:2] == entry[:2]:
                last = self._history.pop()
                entry = (last[0], last[1], last[2] + entry[2])
            self._history.append(entry)

    def epsilon(self, delta: float) -> float:
        """The (epsilon, ``delta``)-DP guarantee spent so far (0.0 before any step)."""
        _check_delta(delta)
        return _rdp_epsilon(self.history, delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int,
                      delta: float) -> float:
        """What ``epsilon(delta)`` would be after ``steps`` more steps; records nothing."""
        _check_delta(delta)
        return _rdp_epsilon(self.history + [_check_entry(noise_multiplier, sample_rate, steps)],
                            delta)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrivacyLedger):
            return NotImplemented
        return self.history == other.history

    def __repr__(self) -> str:
        return f"PrivacyLedger({self.history!r})"

    def to_json(self) -> str:
        """The ledger as JSON (floats written with ``repr`` precision, so exact)."""
        return json.dumps({"format": LEDGER_FORMAT, "version": LEDGER_VERSION,
                           "accountant": "rdp", "history": [list(e) for e in self.history]})

    @classmethod
    def from_json(cls, text: str | bytes) -> PrivacyLedger:
        """Parse ``to_json`` output strictly: ``ValueError`` on anything else (no NaN or
        Infinity, no extra keys, 3-number entries with finite positive noise, rate in
        (0, 1] and an integer step count >= 0)."""

        def no_constants(name: str) -> object:
            raise ValueError(f"{name} is not allowed")

        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"not UTF-8 text: {e}") from None
        if len(text) > MAX_LEDGER_BYTES:
            raise ValueError(f"larger than {MAX_LEDGER_BYTES} bytes")
        try:
            doc = json.loads(text, parse_constant=no_constants)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"not JSON: {e}") from None
        keys = {"format", "version", "accountant", "history"}
        if not isinstance(doc, dict) or set(doc) != keys:
            raise ValueError(f"expected an object with keys {sorted(keys)}")
        if doc["format"] != LEDGER_FORMAT or doc["version"] != LEDGER_VERSION:
            raise ValueError(f"not a {LEDGER_FORMAT} version {LEDGER_VERSION} ledger:"
                             f" format {doc['format']!r}, version {doc['version']!r}")
        if doc["accountant"] != "rdp":
            raise ValueError(f"unknown accountant {doc['accountant']!r}")
        history = doc["history"]
        if not isinstance(history, list):
            raise ValueError("history must be a list")
        ledger = cls()
        for i, entry in enumerate(history):
            if not isinstance(entry, list) or len(entry) != 3:
                raise ValueError(f"history[{i}]: expected [noise_multiplier, sample_rate,"
                                 f" steps], got {entry!r}")
            try:
                ledger.record(*entry)
            except ValueError as e:
                raise ValueError(f"history[{i}]: {e}") from None
        return ledger

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ledger atomically (temp file, fsync, rename, fsync of the folder),
        readable by the owner only (mode 0600). A crash leaves the old or the new file."""
        path = Path(path)
        data = self.to_json().encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Read a saved ledger; a missing file is an empty ledger (a new node). A corrupt
        file is a ``ValueError`` naming the path: never silently reset the budget."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_LEDGER_BYTES + 1)
        except FileNotFoundError:
            return cls()
        try:
            return cls.from_json(data)
        except ValueError as e:
            raise ValueError(f"privacy ledger {path} is corrupt: {e}") from None


@dataclass(frozen=True)
class DPConfig:
    """How a node runs DP-SGD, and its lifetime budget.

    ``target_epsilon``: the budget; the node stops training before a round would take its
    ledger past it (``within_budget``). ``None`` means no cap (``noise_multiplier`` must
    then be given). ``delta``: the delta of the (epsilon, delta) guarantee; 1e-5 by
    default, and it should stay well below 1/N for a shard of N examples (1/(10 N) is the
    usual guidance; ``check_delta``). ``max_grad_norm``: the per-example gradient clip C.
    ``noise_multiplier``: sigma (noise std = sigma * C); ``None`` means derived from
    ``target_epsilon`` for the planned run (``resolve_noise_multiplier``).
    """

    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        if self.target_epsilon is not None:
            _positive("target_epsilon", self.target_epsilon)
        _check_delta(self.delta)
        _positive("max_grad_norm", self.max_grad_norm)
        if self.noise_multiplier is not None:
            _positive("noise_multiplier", self.noise_multiplier)
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError("DP needs a target_epsilon (budget) or a noise_multiplier")

    def check_delta(self, num_examples: int) -> None:
        """``ValueError`` unless ``delta < 1 / num_examples``: a larger delta allows a
        mechanism that publishes a whole example outright."""
        if num_examples >= 1 and not self.delta < 1 / num_examples:
            raise ValueError(f"delta {self.delta} is not below 1/N = {1 / num_examples:.3g}"
                             f" for {num_examples} examples; use at most"
                             f" {1 / (10 * num_examples):.3g}")

    def resolve_noise_multiplier(self, *, sample_rate: float, planned_steps: int) -> float:
        """``noise_multiplier`` if given, else the smallest sigma (to Opacus' 0.01 epsilon
        tolerance) for which ``planned_steps`` steps at ``sample_rate`` spend at most
        ``target_epsilon``. Deterministic, so a restarted node derives the same sigma."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        _check_entry(1.0, sample_rate, planned_steps)
        if planned_steps < 1:
            raise ValueError(f"planned_steps must be >= 1, got {planned_steps}")
        assert self.target_epsilon is not None
        with warnings.catch_warnings():
            # The binary search visits small sigmas whose best RDP order is the largest
            # one Opacus tries; that warning concerns those probes, not the answer.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(get_noise_multiplier(target_epsilon=self.target_epsilon,
                                              target_delta=self.delta, sample_rate=sample_rate,
                                              steps=planned_steps, accountant="rdp"))

    def within_budget(self, ledger: PrivacyLedger, *, noise_multiplier: float,
                      sample_rate: float, steps: int) -> bool:
        """Whether ``steps`` more steps keep ``ledger`` within ``target_epsilon``."""
        if self.target_epsilon is None:
            return True
        after = ledger.epsilon_after(noise_multiplier, sample_rate, steps, self.delta)
        return after <= self.target_epsilon


_HINTS = {"BatchNorm": "use GroupNorm", "SyncBatchNorm": "use GroupNorm",
          "InstanceNorm": "set track_running_stats=False or use GroupNorm",
          "LSTM": "use opacus.layers.DPLSTM", "GRU": "use opacus.layers.DPGRU",
          "RNN": "use opacus.layers.DPRNN",
          "MultiheadAttention": "use opacus.layers.DPMultiheadAttention"}


def _hint(module: nn.Module) -> str:
    name = type(module).__name__
    for prefix, hint in _HINTS.items():
        if name.startswith(prefix):
            return hint
    return "see opacus.validators.ModuleValidator.fix"


def check_model_for_dp(model: nn.Module) -> None:
    """``ValueError`` naming each layer Opacus cannot train with per-example gradients,
    e.g. "layer 'features.1' (BatchNorm2d) is not compatible with DP-SGD: use GroupNorm".

    Runs the validators that ``ModuleValidator.validate(strict=False)`` runs, one
    trainable layer at a time so that each error names its layer; unlike ``validate`` it
    does not require train mode (training uses a train-mode copy) and leaves the model's
    mode alone. fl-node's built-in models use GroupNorm and pass.
    """
    problems = []
    for name, module in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(module))
        errors = validator(module) if validator is not None else []
        if errors:
            first = str(errors[0]).split(". ")[0].strip().rstrip(".")
            problems.append(f"layer {name or '<root>'!r} ({type(module).__name__}) is not"
                            f" compatible with DP-SGD: {_hint(module)} ({first})")
    if not any(True for _ in trainable_modules(model)):
        problems.append("the model has no trainable parameters")
    if problems:
        raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class DPTrainStats:
    """What one call of ``train_local_dp`` did, and the ledger's epsilon afterwards."""

    num_examples: int
    loss: float
    steps: int
    seconds: float
    stopped: bool
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float


def _generator(seed: int | None, stream: int, device: torch.device) -> torch.Generator:
    if seed is None:
        value = secrets.randbits(63)
    else:
        value = int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(value)


def train_local_dp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
                   batch_size: int, lr: float, seed: int | None, ledger: PrivacyLedger,
                   noise_multiplier: float, max_grad_norm: float, delta: float,
                   stop: threading.Event | None = None,
                   momentum: float = 0.9) -> DPTrainStats:
    """DP-SGD (Opacus, Poisson sampling, flat clipping) on ``(x, y)``; updates ``model``
    in place and records the steps taken in ``ledger``.

    The engine's RDP accountant starts from ``ledger.history``, and every step taken
    (also a round cut short by ``stop``, or one that raises) is recorded there, so
    ``DPTrainStats.epsilon`` is the node's lifetime epsilon at ``delta``. Save the ledger
    before the trained weights leave the process.

    Training runs on a private deep copy wrapped in Opacus' ``GradSampleModule``; only
    the weights are copied back, so ``model`` stays a plain module (no hooks). Each
    expected batch has ``batch_size`` examples; ``epochs`` means ``epochs *
    poisson_schedule(N, batch_size)[1]`` steps. ``seed`` seeds the Poisson sampling and
    the Gaussian noise, so a rerun is bit-identical (on one thread): use it only for
    tests and benchmarks. A peer that knows the seed can subtract the noise, so a node
    must pass ``seed=None`` (fresh OS randomness) or a secret. Noise comes from torch's
    PRNG, not Opacus' ``secure_mode`` CSPRNG (torchcsprng).
    """
    check_train_args(x, y, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum)
    if len(x) == 0:
        raise ValueError("need non-empty data for DP training")
    noise_multiplier = _positive("noise_multiplier", noise_multiplier)
    max_grad_norm = _positive("max_grad_norm", max_grad_norm)
    _check_delta(delta)
    check_model_for_dp(model)
    start = time.perf_counter()
    device = next(model.parameters()).device
    work = copy.deepcopy(model).train()
    sample_rate, steps_per_epoch = poisson_schedule(len(x), batch_size)
    prior = ledger.history
    run = EpochRun()
    try:
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size,
                            generator=_generator(seed, 0, torch.device("cpu")))
        with warnings.catch_warnings():
            # Opacus warns that secure_mode is off (see the docstring), and torch that a
            # full backward hook fires on inputs without gradients: expected here.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            engine = PrivacyEngine(accountant="rdp", secure_mode=False)
            engine.accountant.history = list(prior)
            optimizer = torch.optim.SGD(work.parameters(), lr=lr, momentum=momentum)
            dp_model, dp_optimizer, dp_loader = engine.make_private(
                module=work, optimizer=optimizer, data_loader=loader,
                noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                poisson_sampling=True, noise_generator=_generator(seed, 1, device))
            if len(dp_loader) != steps_per_epoch or dp_loader.sample_rate != sample_rate:
                raise RuntimeError(f"Opacus sampling ({dp_loader.sample_rate}, {len(dp_loader)}"
                                   f" steps) differs from poisson_schedule ({sample_rate},"
                                   f" {steps_per_epoch})")
            loss_fn = nn.CrossEntropyLoss()

            def step(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
                xb, yb = xb.to(device), yb.to(device)
                dp_optimizer.zero_grad(set_to_none=True)
                out = dp_model(xb)
                # An empty Poisson batch still takes a (noise-only) step, as the
                # accounting assumes; its mean loss would be NaN, so use zero.
                loss = loss_fn(out, yb) if len(yb) else out.sum() * 0.0
                loss.backward()
                dp_optimizer.step()
                return loss

            run_epochs(epochs, lambda: dp_loader, step, stop, run)
    finally:
        # Spent even if the round failed or was stopped: over-counting is the safe side.
        if run.steps:
            ledger.record(noise_multiplier, sample_rate, run.steps)
    steps = run.steps
    expected = PrivacyLedger(prior + [(noise_multiplier, sample_rate, steps)] if steps else prior)
    if PrivacyLedger(engine.accountant.history) != expected:
        raise RuntimeError(f"Opacus accounted {engine.accountant.history}, expected"
                           f" {expected.history}")
    with torch.no_grad():
        model.load_state_dict(work.state_dict())
    return DPTrainStats(len(x), run.loss, steps, time.perf_counter() - start, run.stopped,
                        ledger.epsilon(delta), delta, noise_multiplier, sample_rate)
