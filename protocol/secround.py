"""One round of secure aggregation between members and the round's aggregator, sans-IO
(issue 13, build point 2; the round machine does not drive it yet: docs/notes).

Both sides are fed the messages of one (round, attempt) and answer with the next ones;
nothing here touches a socket or a clock (the caller owns the deadlines: it calls
``SecureAggregator.roster`` / ``deliveries`` / ``unmask_request`` / ``result`` when all
expected messages are in or a deadline passed). The cryptography is protocol.secagg.
Every message names its round and attempt; a member takes orders only from the aggregator
it elected for them, and gives one kind of share per member per attempt, so a second
aggregator of the same attempt cannot unmask anyone, and a new attempt starts from fresh
secrets (nothing of an earlier attempt is ever revealed).

The flow (A: the aggregator; the wire format will be docs/protocol.md's):
keys (member -> A) -> roster (A -> members) -> shares (member -> A) -> deliver (A ->
members) -> masked input (member -> A) -> unmask (A -> members) -> reveal (member -> A).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from protocol import secagg
from protocol.errors import ProtocolError
from protocol.secagg import RoundSecrets

SeedShare = bytes
MaskShare = bytes


@dataclass(frozen=True)
class Keys:
    round: int
    attempt: int
    mask_public: bytes
    share_public: bytes
    #: secagg.commit_seed of the self seed: a seed rebuilt from shares must match it.
    seed_commitment: bytes


@dataclass(frozen=True)
class Roster:
    round: int
    attempt: int
    degree: int
    #: (member key, mask public key, share public key, seed commitment), sorted by key.
    members: tuple[tuple[bytes, bytes, bytes, bytes], ...]


@dataclass(frozen=True)
class Shares:
    round: int
    attempt: int
    #: (recipient, sealed seed share || mask share)
    shares: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class Deliver:
    round: int
    attempt: int
    #: The members whose shares went out (U1), sorted.
    members: tuple[bytes, ...]
    #: (sender, sealed shares for this recipient)
    shares: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class Masked:
    round: int
    attempt: int
    values: np.ndarray


@dataclass(frozen=True)
class Unmask:
    round: int
    attempt: int
    survivors: tuple[bytes, ...]


@dataclass(frozen=True)
class Reveal:
    round: int
    attempt: int
    seeds: tuple[tuple[bytes, SeedShare], ...]
    masks: tuple[tuple[bytes, MaskShare], ...]


def context(round_number: int, attempt: int) -> bytes:
    """What binds the graph and the sealed shares to one round and attempt."""
    return secagg.CONTEXT + round_number.to_bytes(4, "big") + attempt.to_bytes(4, "big")


def _share_context(ctx: bytes, sender: bytes, recipient: bytes) -> bytes:
    return ctx + sender + recipient


class SecureMember:
    """A member's side: its quantized input (``quantized``, in Z/2^48), fresh secrets."""

    def __init__(self, me: bytes, aggregator: bytes, round_number: int, attempt: int,
                 quantized: np.ndarray, secrets: RoundSecrets | None = None) -> None:
        self.me, self.aggregator = me, aggregator
        self.round, self.attempt = round_number, attempt
        self.ctx = context(round_number, attempt)
        self.quantized = quantized
        self.secrets = secrets or RoundSecrets.generate()
        self.roster: Roster | None = None
        self.graph: list[bytes] = []
        self.index: dict[bytes, int] = {}
        self.delivered: tuple[bytes, ...] | None = None
        #: The shares we hold of our neighbours: sender -> (seed share, mask share).
        self.held: dict[bytes, tuple[SeedShare, MaskShare]] = {}
        self.book = secagg.Unmasking()

    def _check(self, sender: bytes, msg: Roster | Deliver | Unmask) -> None:
        if sender != self.aggregator:
            raise ProtocolError("secure aggregation message from another key than the"
                                " round's aggregator")
        if (msg.round, msg.attempt) != (self.round, self.attempt):
            raise ProtocolError("secure aggregation message for another round or attempt")

    def keys(self) -> Keys:
        return Keys(self.round, self.attempt, self.secrets.mask_public,
                    self.secrets.share_public,
                    secagg.commit_seed(self.ctx, self.secrets.self_seed))

    def on_roster(self, sender: bytes, roster: Roster) -> Shares:
        """Check the roster, split our secrets among our neighbours and seal them."""
        self._check(sender, roster)
        if self.roster is not None:
            raise ProtocolError("a second roster for one attempt")
        keys = [m[0] for m in roster.members]
        if keys != sorted(set(keys)):
            raise ProtocolError("roster not sorted or with a repeated member")
        mine = dict((m[0], m[1:]) for m in roster.members).get(self.me)
        if mine != (self.secrets.mask_public, self.secrets.share_public,
                    secagg.commit_seed(self.ctx, self.secrets.self_seed)):
            raise ProtocolError("the roster does not hold our keys")
        if not 2 <= roster.degree:
            raise ProtocolError("roster degree below 2")
        self.roster = roster
        self.index = {k: i + 1 for i, k in enumerate(keys)}
        self.graph = secagg.neighbours(keys, self.me, roster.degree, self.ctx)
        t = secagg.threshold(len(self.graph))
        points = [self.index[v] for v in self.graph]
        seed_shares = secagg.split(self.secrets.self_seed, t, points)
        mask_shares = secagg.split(self.secrets.mask_secret, t, points)
        share_keys = {m[0]: m[2] for m in roster.members}
        out = []
        for v in self.graph:
            key = secagg.share_key(self.secrets.share_secret, self.secrets.share_public,
                                   share_keys[v])
            payload = seed_shares[self.index[v]] + mask_shares[self.index[v]]
            out.append((v, secagg.seal_share(key, _share_context(self.ctx, self.me, v),
                                             payload)))
        return Shares(self.round, self.attempt, tuple(out))

    def on_deliver(self, sender: bytes, deliver: Deliver) -> Masked:
        """Open the shares sent to us and answer with our masked input (ProtocolError if
        any share does not open or the delivery contradicts the roster: then we send
        nothing, and the round fails rather than sum a wrong input)."""
        self._check(sender, deliver)
        if self.roster is None or self.delivered is not None:
            raise ProtocolError("delivery out of order")
        members = set(deliver.members)
        if self.me not in members or not members <= set(self.index) \
                or list(deliver.members) != sorted(members):
            raise ProtocolError("delivery names members outside the roster")
        expected = {v for v in self.graph if v in members}
        senders = [s for s, _ in deliver.shares]
        if sorted(senders) != sorted(expected):
            raise ProtocolError("delivery does not hold exactly our neighbours' shares")
        share_keys = {m[0]: m[2] for m in self.roster.members}
        for v, sealed in deliver.shares:
            key = secagg.share_key(self.secrets.share_secret, self.secrets.share_public,
                                   share_keys[v])
            payload = secagg.open_share(key, _share_context(self.ctx, v, self.me), sealed)
            if len(payload) != 2 * secagg.SHARE_BYTES:
                raise ProtocolError("a share of the wrong size")
            self.held[v] = (payload[:secagg.SHARE_BYTES], payload[secagg.SHARE_BYTES:])
        self.delivered = deliver.members
        masks = {m[0]: m[1] for m in self.roster.members if m[0] in expected}
        values = secagg.masked_input(self.quantized, self.secrets, self.me, masks)
        return Masked(self.round, self.attempt, values)

    def on_unmask(self, sender: bytes, request: Unmask) -> Reveal:
        """One kind of share per neighbour: its self-seed share if it survived, its
        mask-key share if it did not; never both, whatever is asked later."""
        self._check(sender, request)
        if self.delivered is None:
            raise ProtocolError("unmask before delivery")
        survivors = set(request.survivors)
        if self.me not in survivors or not survivors <= set(self.delivered):
            raise ProtocolError("unmask names survivors outside the delivery")
        seeds, masks = [], []
        for v, (seed_share, mask_share) in sorted(self.held.items()):
            kind = self.book.answer(v, v in survivors)
            if kind == "seed":
                seeds.append((v, seed_share))
            else:
                masks.append((v, mask_share))
        return Reveal(self.round, self.attempt, tuple(seeds), tuple(masks))


class SecureAggregator:
    """The aggregator's side of one (round, attempt): it learns the sum of the
    survivors' inputs and nothing else."""

    def __init__(self, round_number: int, attempt: int, *, quorum: int, degree: int,
                 length: int) -> None:
        self.round, self.attempt = round_number, attempt
        self.ctx = context(round_number, attempt)
        self.quorum, self.degree, self.length = quorum, degree, length
        self.keys: dict[bytes, Keys] = {}
        self.the_roster: Roster | None = None
        self.shares: dict[bytes, Shares] = {}
        self.u1: tuple[bytes, ...] = ()
        self.masked: dict[bytes, np.ndarray] = {}
        self.survivors: tuple[bytes, ...] = ()
        self.reveals: dict[bytes, Reveal] = {}

    def _mine(self, msg: Keys | Shares | Masked | Reveal) -> None:
        if (msg.round, msg.attempt) != (self.round, self.attempt):
            raise ProtocolError("secure aggregation message for another round or attempt")

    def _enough(self, who: object, what: str) -> None:
        if len(who) < self.quorum:  # type: ignore[arg-type]
            raise ProtocolError(f"{len(who)} members {what}, a quorum of"  # type: ignore[arg-type]
                                f" {self.quorum} needed")

    def on_keys(self, sender: bytes, keys: Keys) -> None:
        self._mine(keys)
        if self.the_roster is None:
            self.keys.setdefault(sender, keys)

    def roster(self) -> Roster:
        self._enough(self.keys, "sent keys")
        members = tuple((k, v.mask_public, v.share_public, v.seed_commitment)
                        for k, v in sorted(self.keys.items()))
        self.the_roster = Roster(self.round, self.attempt, self.degree, members)
        return self.the_roster

    def on_shares(self, sender: bytes, shares: Shares) -> None:
        self._mine(shares)
        if self.the_roster is None or self.u1 or sender not in self.keys:
            raise ProtocolError("shares out of order or from outside the roster")
        self.shares.setdefault(sender, shares)

    def deliveries(self) -> dict[bytes, Deliver]:
        """What each member that sent its shares gets: the shares sealed for it."""
        self._enough(self.shares, "sent shares")
        self.u1 = tuple(sorted(self.shares))
        inbox: dict[bytes, list[tuple[bytes, bytes]]] = {m: [] for m in self.u1}
        for sender in self.u1:
            for to, sealed in self.shares[sender].shares:
                if to in inbox:
                    inbox[to].append((sender, sealed))
        return {m: Deliver(self.round, self.attempt, self.u1, tuple(sorted(inbox[m])))
                for m in self.u1}

    def on_masked(self, sender: bytes, masked: Masked) -> None:
        self._mine(masked)
        if sender not in self.u1 or self.survivors:
            raise ProtocolError("masked input out of order or from outside the delivery")
        if masked.values.shape != (self.length,) or masked.values.dtype != np.uint64:
            raise ProtocolError("masked input of the wrong length")
        self.masked.setdefault(sender, masked.values)

    def unmask_request(self) -> Unmask:
        self._enough(self.masked, "sent masked inputs")
        self.survivors = tuple(sorted(self.masked))
        return Unmask(self.round, self.attempt, self.survivors)

    def on_reveal(self, sender: bytes, reveal: Reveal) -> None:
        self._mine(reveal)
        if sender not in self.survivors:
            raise ProtocolError("reveal from outside the survivors")
        self.reveals.setdefault(sender, reveal)

    def result(self) -> np.ndarray:
        """The sum of the survivors' quantized inputs (ProtocolError if some secret cannot
        be rebuilt from the reveals, or shares disagree: the round fails, safely)."""
        assert self.the_roster is not None
        keys = [m[0] for m in self.the_roster.members]
        index = {k: i + 1 for i, k in enumerate(keys)}
        graph = {k: secagg.neighbours(keys, k, self.degree, self.ctx) for k in keys}
        publics = {m[0]: m[1] for m in self.the_roster.members}
        commitments = {m[0]: m[3] for m in self.the_roster.members}
        seed_shares: dict[bytes, dict[int, bytes]] = {}
        mask_shares: dict[bytes, dict[int, bytes]] = {}
        for holder, reveal in self.reveals.items():
            for of, share in reveal.seeds:
                seed_shares.setdefault(of, {})[index[holder]] = share
            for of, share in reveal.masks:
                mask_shares.setdefault(of, {})[index[holder]] = share
        alive = set(self.survivors)
        seeds, dropped = {}, {}
        for u in self.u1:
            t = secagg.threshold(len(graph[u]))
            # A rebuilt secret must match what its owner published: shares that were
            # wrong (a member that split garbage) fail the round instead of a wrong sum.
            if u in alive:
                seeds[u] = secagg.combine(seed_shares.get(u, {}), t)
                if secagg.commit_seed(self.ctx, seeds[u]) != commitments[u]:
                    raise ProtocolError("a rebuilt self seed does not match its commitment:"
                                        " bad shares")
            else:
                dropped[u] = secagg.combine(mask_shares.get(u, {}), t)
                if secagg.mask_public_of(dropped[u]) != publics[u]:
                    raise ProtocolError("a rebuilt mask key does not match its public key:"
                                        " bad shares")
        total = np.zeros(self.length, dtype=np.uint64)
        for u in self.survivors:
            total = total + self.masked[u]
        # members of U1 that were not neighbours-in-U1 of anyone are fine: masks only
        # pair members of U1, which is what ``unmask`` takes back.
        graph_u1 = {k: [v for v in graph[k] if v in set(self.u1)] for k in self.u1}
        return secagg.unmask(total, self.survivors, dropped, seeds, publics, graph_u1)


def through_masked(members: Mapping[bytes, SecureMember], aggregator: SecureAggregator,
                   sent_masked: set[bytes] | None = None) -> None:
    """The first steps of a round in memory (tests, the simulation): keys, roster, shares,
    delivery, and the masked inputs of ``sent_masked`` (default: every member)."""
    agg_key = next(iter(members.values())).aggregator
    for key, member in members.items():
        aggregator.on_keys(key, member.keys())
    roster = aggregator.roster()
    for key, member in members.items():
        aggregator.on_shares(key, member.on_roster(agg_key, roster))
    deliveries = aggregator.deliveries()
    sent_masked = set(deliveries) if sent_masked is None else sent_masked
    for key in sorted(sent_masked):
        aggregator.on_masked(key, members[key].on_deliver(agg_key, deliveries[key]))


def exchange(members: Mapping[bytes, SecureMember], aggregator: SecureAggregator, *,
             sent_masked: set[bytes] | None = None, answering: set[bytes] | None = None,
             ) -> np.ndarray:
    """One whole round in memory: ``through_masked``, then the unmasking, answered by
    ``answering`` (default: every member that sent its masked input). Returns the sum."""
    through_masked(members, aggregator, sent_masked)
    agg_key = next(iter(members.values())).aggregator
    request = aggregator.unmask_request()
    answering = set(request.survivors) if answering is None else answering
    for key in sorted(answering):
        aggregator.on_reveal(key, members[key].on_unmask(agg_key, request))
    return aggregator.result()
