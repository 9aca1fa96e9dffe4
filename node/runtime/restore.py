"""Resuming after a restart: the newest good checkpoint, then the offline model after it.

A checkpoint holds a signed frame, so it is verified as strictly as a model from a peer
(federation, signer, round, digest, the federation's tensors). The daemon reads files
(node.runtime.checkpoints.CheckpointStore); the simulation reads its memory store through
the same ``CheckpointSource`` protocol, with the same checks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from node.common.weights import from_tensors
from node.runtime.checkpoints import Checkpoint, CheckpointError
from node.runtime.learner import Weights
from protocol.envelope import decode
from protocol.errors import ProtocolError
from protocol.messages import Model, Share
from protocol.rounds import RoundMachine
from protocol.tensors import Tensor, weights_digest

log = logging.getLogger(__name__)

Verify = Callable[[int, bytes, bytes], None]


class CheckpointSource(Protocol):
    """What restoring needs of a checkpoint store."""

    def load_latest(self, verify: Verify) -> Checkpoint | None: ...

    def load_offline(self, verify: Verify) -> Checkpoint | None: ...


@dataclass(frozen=True)
class Restored:
    """What a restart resumes from (round 0: genesis)."""

    round: int
    weights: Weights | None = None
    frame: bytes | None = None
    offline_step: int = 0
    offline_weights: Weights | None = None


def restore(store: CheckpointSource, machine: RoundMachine, *, max_size: int) -> Restored:
    """Resume ``machine`` (before its start) from the newest good checkpoint in ``store``
    and from the offline model that continues it, if any."""
    ckpt = store.load_latest(_verify_model(machine, max_size))
    weights, frame, round_number = None, None, 0
    if ckpt is not None:
        msg = decode(ckpt.frame, max_size=max_size).message
        assert isinstance(msg, Model)
        machine.resume(ckpt.round, ckpt.digest, msg.aggregator, msg.contributors)
        weights, frame, round_number = _copy(msg.weights), ckpt.frame, ckpt.round
        log.info("resuming from the checkpoint of round %d (%s)", ckpt.round, ckpt.path.name)
    offline = store.load_offline(_verify_offline(machine, max_size))
    if offline is None:
        return Restored(round_number, weights, frame)
    share = decode(offline.frame, max_size=max_size).message
    assert isinstance(share, Share)
    machine.resume_offline(offline.digest, share.step)
    log.info("resuming the offline model of step %d (round %d)", share.step, offline.round)
    return Restored(round_number, weights, frame, share.step, _copy(share.weights))


def _copy(tensors: list[Tensor]) -> Weights:
    return {k: np.array(v) for k, v in from_tensors(tensors).items()}


def _verify_model(m: RoundMachine, max_size: int) -> Verify:
    def verify(round_number: int, digest: bytes, frame: bytes) -> None:
        try:
            env = decode(frame, max_size=max_size)
            msg = env.message
            if env.federation != m.federation:
                raise ProtocolError("from another federation")
            if not isinstance(msg, Model) or msg.round != round_number:
                raise ProtocolError("does not hold the model of its round")
            if msg.digest != digest or weights_digest(msg.weights) != digest:
                raise ProtocolError("weights do not match their digest")
            m.check_spec(msg.weights, "checkpoint", state=True)
        except ProtocolError as exc:
            raise CheckpointError(exc.reason) from None
        if round_number > m.rounds_total:
            raise CheckpointError(f"round {round_number} is beyond --rounds {m.rounds_total}")

    return verify


def _verify_offline(m: RoundMachine, max_size: int) -> Verify:
    def verify(round_number: int, digest: bytes, frame: bytes) -> None:
        try:
            env = decode(frame, max_size=max_size)
            msg = env.message
            if env.federation != m.federation or env.sender != m.self_key:
                raise ProtocolError("not ours")
            if not isinstance(msg, Share) or weights_digest(msg.weights) != digest:
                raise ProtocolError("weights do not match their digest")
            m.check_spec(msg.weights, "offline checkpoint")
        except ProtocolError as exc:
            raise CheckpointError(exc.reason) from None
        if round_number != m.current or msg.base != m.model_digest:
            raise CheckpointError(f"stale (round {round_number}, resumed round {m.completed})")

    return verify
