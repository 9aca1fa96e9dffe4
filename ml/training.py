"""Local training and evaluation loops."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TrainStats:
    """What one call of ``train_local`` did."""

    num_examples: int
    loss: float
    steps: int
    seconds: float
    stopped: bool


@dataclass(frozen=True)
class EvalStats:
    """Mean loss and accuracy on a data set."""

    loss: float
    accuracy: float
    num_examples: int


def train_local(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
                batch_size: int, lr: float, seed: int, momentum: float = 0.9,
                stop: threading.Event | None = None, prox_mu: float = 0.0,
                prox_base: dict[str, torch.Tensor] | None = None) -> TrainStats:
    """SGD (momentum 0.9 by default) over shuffled mini-batches, in place on ``model``.

    Shuffling uses a ``torch.Generator`` seeded with ``seed``, so identical inputs give
    bit-identical weights (on one thread). ``stop`` is checked before every batch, so a
    node can abandon a round promptly; ``loss`` is the mean over the last epoch run.

    FedProx (Li et al. 2020): with ``prox_mu > 0`` the loss minimised is the
    cross-entropy plus ``prox_mu / 2 * sum ||w - w_base||^2`` over the trainable
    parameters, which keeps the local model near the global one. ``prox_base`` maps
    parameter names (``model.named_parameters()``) to the global model's tensors; other
    names (buffers, ``fl.opt.*`` state) are ignored. ``None`` means the parameters as they
    are when training starts, i.e. the global model the node has just loaded. The
    reported ``loss`` is the cross-entropy alone, comparable with and without the term.
    """
    check_train_args(x, y, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum)
    if not 0 <= prox_mu < math.inf:
        raise ValueError(f"prox_mu must be a finite number >= 0, got {prox_mu}")
    anchors = _prox_anchors(model, prox_base) if prox_mu > 0 else []
    start = time.perf_counter()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    n = len(x)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            yield x[idx], y[idx]

    def step(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        if anchors:
            prox = sum(((p - b) ** 2).sum() for p, b in anchors)
            (loss + prox_mu / 2 * prox).backward()
        else:
            loss.backward()
        opt.step()
        return loss

    run = run_epochs(epochs, batches, step, stop)
    return TrainStats(n, run.loss, run.steps, time.perf_counter() - start, run.stopped)


def check_train_args(x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
                     lr: float, momentum: float) -> None:
    """ValueError unless the training arguments make sense (shared by plain and DP)."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs ({epochs}) and batch_size ({batch_size}) must be >= 1")
    if not lr > 0 or not 0 <= momentum < 1:
        raise ValueError(f"need lr > 0 (got {lr}) and 0 <= momentum < 1 (got {momentum})")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} inputs but {len(y)} labels")


@dataclass
class EpochRun:
    """What ``run_epochs`` did: optimizer steps taken, the mean loss over the last epoch
    run (NaN if it saw no example), and whether ``stop`` cut it short."""

    steps: int = 0
    loss: float = float("nan")
    stopped: bool = False


def run_epochs(epochs: int, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
               step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               stop: threading.Event | None = None, run: EpochRun | None = None) -> EpochRun:
    """The training loop every trainer shares: ``epochs`` passes over ``batches()`` (a
    fresh iterable per epoch), one ``step(xb, yb)`` (which returns the batch's mean loss)
    per batch, ``stop`` checked before every batch. ``run`` is updated as it goes, so a
    caller that must account for steps taken sees them even if a step raises."""
    run = run if run is not None else EpochRun()
    for _ in range(epochs):
        total, count = 0.0, 0
        for xb, yb in batches():
            if stop is not None and stop.is_set():
                run.stopped = True
                break
            loss = step(xb, yb)
            run.steps += 1
            total += float(loss.detach()) * len(yb)
            count += len(yb)
        run.loss = total / count if count else float("nan")
        if run.stopped:
            break
    return run


def _prox_anchors(model: nn.Module, base: dict[str, torch.Tensor] | None
                  ) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(trainable parameter, its detached global value) pairs for the proximal term."""
    pairs = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if base is None:
            ref = p.detach().clone()
        else:
            if name not in base:
                raise ValueError(f"prox_base has no tensor for parameter {name}")
            ref = torch.as_tensor(base[name]).detach()
            if tuple(ref.shape) != tuple(p.shape):
                raise ValueError(f"prox_base: {name} has shape {tuple(ref.shape)},"
                                 f" expected {tuple(p.shape)}")
            ref = ref.to(dtype=p.dtype, device=p.device).clone()
        pairs.append((p, ref))
    return pairs


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 512) -> EvalStats:
    """Mean cross-entropy loss and accuracy, in eval mode and without gradients."""
    model.train(False)  # evaluation mode
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size])
        total += float(loss_fn(out, y[i : i + batch_size]))
        correct += int((out.argmax(1) == y[i : i + batch_size]).sum())
    n = len(x)
    return EvalStats(total / n if n else float("nan"), correct / n if n else 0.0, n)
