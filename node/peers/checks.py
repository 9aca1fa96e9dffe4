"""What an admitted member sends is checked before it is believed (docs/trust.md).

* Every tensor of a model, a full update or an offline share is finite (no NaN, no
  infinity) and no value exceeds ``MAX_ABS_WEIGHT`` in magnitude; compressed deltas are
  checked for finiteness when decoded.
* A model for a round beyond the next one (catch-up) is taken only with evidence that
  the federation reached that round: enough members other than its aggregator report a
  completed round at least that high in their signed heartbeats or announcements.
* The aggregator bounds each update's change from the global model (node.runtime.executor,
  ``--max-update-norm``).

A member whose message fails a check gets a strike (node.peers.membership); after
``MAX_STRIKES`` it is cut off for the rest of the run.
"""

from __future__ import annotations

import numpy as np

from node.common.weights import from_tensors
from protocol.errors import ProtocolError
from protocol.messages import Model
from protocol.rounds import RoundMachine
from protocol.tensors import Tensor

#: No weight of a model, update or share may be larger in magnitude: trained networks are
#: orders of magnitude below it; values beyond it are divergence or poison.
MAX_ABS_WEIGHT = 1e5
#: Strikes after which a member is cut off (its link closed, its key no longer trusted).
MAX_STRIKES = 2


def check_finite(tensors: list[Tensor], what: str) -> None:
    """ProtocolError unless every floating-point value in ``tensors`` is finite and at
    most ``MAX_ABS_WEIGHT`` in magnitude."""
    for name, arr in from_tensors(tensors).items():
        if arr.dtype.kind != "f" or not arr.size:
            continue
        # Two reductions and no temporary array (this runs on the event loop): min and
        # max are NaN when any value is, and infinite when any value is.
        lo, hi = float(arr.min()), float(arr.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ProtocolError(f"{what}: tensor {name[:60]!r} holds NaN or infinite values")
        if max(-lo, hi) > MAX_ABS_WEIGHT:
            raise ProtocolError(f"{what}: tensor {name[:60]!r} holds values over"
                                f" {MAX_ABS_WEIGHT:g} in magnitude")


def evidence_needed(machine: RoundMachine, model: Model) -> int:
    """How many members other than the model's aggregator must report having completed
    ``model.round`` before a catch-up model is taken: a quorum of the others, at most as
    many as there are (a node whose only peer is that aggregator cannot check it)."""
    others = [k for k in machine.peers if k != model.aggregator]
    return min(max(machine.quorum - 1, 1), len(others))


def has_evidence(machine: RoundMachine, model: Model) -> bool:
    """Whether a model for a round beyond the next one comes with evidence that the
    federation got there (the next round's model needs none: it is the one we wait for)."""
    if model.round <= machine.current:
        return True
    reached = sum(1 for k, view in machine.peers.items()
                  if k != model.aggregator and view.round >= model.round)
    return reached >= evidence_needed(machine, model)
