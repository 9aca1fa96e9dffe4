"""What a ``RoundMachine`` asks its node to do: the actions in its outbox."""

from __future__ import annotations

from dataclasses import dataclass, field

from .messages import Delta, Model, Share, Update


@dataclass(frozen=True)
class StartTraining:
    """Train round ``round`` locally from the model we hold (``base`` is its digest);
    ``offline``: an offline step (the result is shared and averaged, not sent to an
    aggregator)."""

    round: int
    base: bytes
    offline: bool = False


@dataclass(frozen=True)
class SendUpdate:
    """Send our update to ``to`` (the aggregator we elected)."""

    to: bytes
    update: Update = field(repr=False)


@dataclass(frozen=True)
class Aggregate:
    """Run the aggregation strategy over ``updates`` (sender key -> update, in full or as
    a compressed delta from the round's base model)."""

    round: int
    attempt: int
    updates: dict[bytes, Update | Delta] = field(repr=False)


@dataclass(frozen=True)
class ShareModel:
    """Offline: send ``share`` (our freshly trained model) to each member in ``to``."""

    to: tuple[bytes, ...]
    share: Share = field(repr=False)


@dataclass(frozen=True)
class Average:
    """Offline: average ``models`` (ours and the peers' latest, sender key -> share)
    weighted by their examples, adopt the result, then call ``average_done``."""

    round: int
    step: int
    models: dict[bytes, Share] = field(repr=False)


@dataclass(frozen=True)
class PublishModel:
    """Sign ``model`` as ours and send it to every member."""

    model: Model = field(repr=False)


@dataclass(frozen=True)
class Commit:
    """Apply ``model`` as the global model of ``model.round``."""

    model: Model = field(repr=False)
    source: bytes


@dataclass(frozen=True)
class Note:
    """Something worth logging or showing: ``kind`` is a short stable word."""

    kind: str
    detail: str


Action = (StartTraining | SendUpdate | Aggregate | PublishModel | Commit | ShareModel
          | Average | Note)
