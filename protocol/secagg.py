"""Secure aggregation, the cryptographic core (issue 13, build point 2; not yet wired).

In the family of SecAgg+ (Bonawitz et al., CCS 2017; Bell et al., CCS 2020), with
libsodium primitives only. A round's members are a sorted list of public keys; each
member ``u``:

1. quantizes its example-weighted update ``n_u * delta_u`` (and ``n_u`` itself, as one
   more coordinate) to fixed point in the ring Z/2^48 (``quantize``), which travels as 6
   bytes an element (``pack``): 1.5 times a float32 update;
2. makes, for this round and attempt only, a *mask* key pair and a *share* key pair
   (X25519) and a 32-byte self-mask seed ``b_u`` (``RoundSecrets``);
3. agrees a pairwise seed with each neighbour ``v`` of a sparse graph (``neighbours``: k
   nearest in a ring ordered by a hash of the round, so the cost grows with k, not N):
   ``s_uv = BLAKE2b-256(X25519(mask_u, Mask_v) || Mask_lo || Mask_hi)``, the same on both
   sides (``pair_seed``);
4. sends ``y_u = q_u + PRG(b_u) + sum over neighbours v of sign(u, v) * PRG(s_uv)``, where
   ``sign`` is +1 when ``u`` sorts before ``v`` and -1 after, so each pair cancels in the
   sum (``masked_input``);
5. splits ``b_u`` and its mask secret key into Shamir shares, threshold ``t`` of its
   neighbours (``split`` / ``combine`` over GF(2^521 - 1)), and seals each share to its
   neighbour's share key (``seal_share``), so no one on the way can read it.

The aggregator learns who sent a masked input (survivors S) and who did not (dropped D),
asks each survivor, once per round and attempt, for one kind of share per neighbour: the
self-seed share of a survivor, the mask-key share of a dropped member (``Unmasking``
refuses to give both kinds for one member), rebuilds those secrets from ``t`` shares
each, and removes the masks (``unmask``): it obtains the sum of the survivors' quantized
inputs and nothing more. ``PRG(seed)`` is libsodium's ``randombytes_buf_deterministic``
(ChaCha20-IETF keystream under key ``seed``, nonce "LibsodiumDRG"), read as
little-endian u64 and taken modulo 2^48. Arithmetic runs in uint64 (modulo 2^64) and is
reduced modulo 2^48 where a value leaves a party: 2^48 divides 2^64, so that is exact.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import nacl.bindings as sodium
import numpy as np
from nacl.exceptions import CryptoError

from protocol.errors import ProtocolError

#: The ring: Z/2^RING_BITS.
RING_BITS = 48
RING_MASK = np.uint64((1 << RING_BITS) - 1)
#: Fixed point: a value v is round(v * 2^SCALE_BITS) in two's complement modulo 2^48.
SCALE_BITS = 20
#: The sum of all members' |n_u * delta_u| per coordinate must stay below 2^(47 -
#: SCALE_BITS) (about 1.3e8) to read back unambiguously; ``quantize`` refuses a member's
#: value of ``MEMBER_LIMIT`` (2^19 = 524,288) or more, so that up to 2^MAX_MEMBERS_BITS
#: (256) members cannot overflow.
MAX_MEMBERS_BITS = 8
MEMBER_LIMIT = 2.0 ** (RING_BITS - 1 - SCALE_BITS - MAX_MEMBERS_BITS)
#: The Shamir field: the Mersenne prime 2^521 - 1 (a 32-byte secret is far below it).
PRIME = (1 << 521) - 1
SHARE_BYTES = 66
SEED_BYTES = 32
CONTEXT = b"fl-node/v2/secagg"
_PAIR_PERSON = b"fl-secagg-pair\x00\x00"  # BLAKE2b personalisation: 16 bytes
_SHARE_PERSON = b"fl-secagg-share\x00"
_GRAPH_PERSON = b"fl-secagg-graph\x00"


# -- quantization ---------------------------------------------------------------------


def quantize(values: np.ndarray) -> np.ndarray:
    """``values`` (float) as fixed-point elements of Z/2^48 (uint64); ValueError if any is
    not finite or too large for a member (``MEMBER_LIMIT``)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("secure aggregation takes finite values only")
    if values.size and float(np.max(np.abs(values))) >= MEMBER_LIMIT:
        raise ValueError(f"a value of magnitude {float(np.max(np.abs(values))):.3g} is over"
                         f" what secure aggregation can sum ({MEMBER_LIMIT:.3g})")
    return np.rint(values * 2.0 ** SCALE_BITS).astype(np.int64).view(np.uint64) & RING_MASK


def dequantize(total: np.ndarray) -> np.ndarray:
    """A sum of quantized values, back to float (two's complement read as signed)."""
    ring = np.asarray(total, dtype=np.uint64) & RING_MASK
    signed = ring.astype(np.int64) - np.where(ring >> np.uint64(RING_BITS - 1),
                                              np.int64(1 << RING_BITS), np.int64(0))
    return signed.astype(np.float64) / 2.0 ** SCALE_BITS


def pack(values: np.ndarray) -> bytes:
    """Elements of Z/2^48 as 6 little-endian bytes each (the wire form)."""
    ring = (np.asarray(values, dtype=np.uint64) & RING_MASK).astype("<u8")
    return ring.view(np.uint8).reshape(-1, 8)[:, :6].tobytes()


def unpack(data: bytes, length: int) -> np.ndarray:
    """``pack``'s inverse (ProtocolError unless ``data`` holds exactly ``length`` elements)."""
    if len(data) != 6 * length:
        raise ProtocolError(f"{len(data)} bytes for {length} ring elements of 6 bytes")
    wide = np.zeros((length, 8), dtype=np.uint8)
    wide[:, :6] = np.frombuffer(data, dtype=np.uint8).reshape(length, 6)
    return wide.view("<u8").reshape(length).astype(np.uint64)


def quantization_error_bound(members: int) -> float:
    """The most a dequantized sum of ``members`` inputs can differ from the exact sum, per
    coordinate: each input is rounded to the nearest 2^-SCALE_BITS."""
    return members * 0.5 / 2.0 ** SCALE_BITS


# -- the pseudo-random generator --------------------------------------------------------


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random elements of Z/2^64 from a 32-byte ``seed``."""
    if len(seed) != SEED_BYTES:
        raise ValueError("a mask seed is 32 bytes")
    raw: bytes = sodium.randombytes_buf_deterministic(8 * length, seed)
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


# -- per-round secrets and agreements -------------------------------------------------


@dataclass
class RoundSecrets:
    """One member's secrets for one round and attempt (never reused)."""

    mask_public: bytes
    mask_secret: bytes = field(repr=False)
    share_public: bytes
    share_secret: bytes = field(repr=False)
    self_seed: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> RoundSecrets:
        mask_public, mask_secret = sodium.crypto_kx_keypair()
        share_public, share_secret = sodium.crypto_kx_keypair()
        return cls(mask_public, mask_secret, share_public, share_secret, os.urandom(SEED_BYTES))

    @classmethod
    def from_seed(cls, seed: bytes) -> RoundSecrets:
        """Deterministic secrets (test vectors only)."""
        h = hashlib.blake2b(seed, digest_size=64, person=b"fl-secagg-test\x00\x00").digest()
        mask_public, mask_secret = sodium.crypto_kx_seed_keypair(h[:32])
        share_public, share_secret = sodium.crypto_kx_seed_keypair(h[32:])
        return cls(mask_public, mask_secret, share_public, share_secret,
                   hashlib.blake2b(seed, digest_size=32, person=_PAIR_PERSON).digest())


def _agree(secret: bytes, ours: bytes, theirs: bytes, person: bytes) -> bytes:
    try:
        shared: bytes = sodium.crypto_scalarmult(secret, theirs)
    except (CryptoError, ValueError, TypeError):
        raise ProtocolError("unusable secure-aggregation key") from None
    low, high = sorted((ours, theirs))
    return hashlib.blake2b(shared + low + high, digest_size=32, person=person).digest()


def pair_seed(mask_secret: bytes, mask_public: bytes, their_mask_public: bytes) -> bytes:
    """The pairwise mask seed of two members (the same computed from either side)."""
    return _agree(mask_secret, mask_public, their_mask_public, _PAIR_PERSON)


def sign(me: bytes, other: bytes) -> int:
    """+1 if ``me`` adds the pair's mask, -1 if it subtracts it (bytewise order)."""
    return 1 if me < other else -1


def neighbours(members: Sequence[bytes], me: bytes, degree: int, context: bytes) -> list[bytes]:
    """``me``'s neighbours in the round's sparse graph: the ``degree // 2`` members before
    and after it in a ring ordered by BLAKE2b(context || key); everyone when the round has
    at most ``degree + 1`` members. ``context`` names the round and attempt."""
    if me not in members:
        raise ValueError("not a member of this round")
    others = [m for m in members if m != me]
    if len(others) <= degree:
        return sorted(others)
    ring = sorted(members, key=lambda k: hashlib.blake2b(context + k, digest_size=32,
                                                         person=_GRAPH_PERSON).digest())
    at, half = ring.index(me), degree // 2
    picked = {ring[(at + d) % len(ring)] for d in range(-half, half + 1) if d}
    return sorted(picked)


def threshold(degree: int) -> int:
    """Shares needed to rebuild a secret among ``degree`` neighbours: more than half, so
    that two disjoint groups cannot each rebuild a different kind of share of one member
    (2/3 of them, at least 2; docs/trust.md says what colluders can do)."""
    return max(2, math.ceil(2 * degree / 3))


def masked_input(quantized: np.ndarray, secrets: RoundSecrets, me: bytes,
                 their_masks: Mapping[bytes, bytes]) -> np.ndarray:
    """``y = q + PRG(b) + sum of sign(me, v) * PRG(s_v)`` over ``their_masks`` (each
    neighbour's mask public key), in Z/2^48."""
    n = quantized.size
    out = quantized.astype(np.uint64) + prg(secrets.self_seed, n)
    for key, public in their_masks.items():
        mask = prg(pair_seed(secrets.mask_secret, secrets.mask_public, public), n)
        out = out + mask if sign(me, key) > 0 else out - mask
    return out & RING_MASK


# -- Shamir secret sharing --------------------------------------------------------------


def split(secret: bytes, t: int, points: Iterable[int]) -> dict[int, bytes]:
    """Shares of ``secret`` (32 bytes) at ``points`` (1 to 2^16), any ``t`` of which
    rebuild it; each share is the 66-byte big-endian value of the polynomial there."""
    xs = list(points)
    if len(secret) != SEED_BYTES or not 2 <= t <= len(xs) or len(set(xs)) != len(xs) \
            or not all(0 < x < 1 << 16 for x in xs):
        raise ValueError("bad secret sharing parameters")
    coeffs = [int.from_bytes(secret, "big")] + [
        int.from_bytes(os.urandom(SHARE_BYTES), "big") % PRIME for _ in range(t - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], t: int) -> bytes:
    """The secret behind ``t`` or more ``shares`` (ProtocolError if they are too few or
    do not describe a 32-byte secret: inconsistent shares never pass for a secret)."""
    if len(shares) < t:
        raise ProtocolError(f"{len(shares)} shares, {t} needed")
    points = [(x, int.from_bytes(y, "big")) for x, y in shares.items()]
    if any(len(y) != SHARE_BYTES or v >= PRIME for (_, v), y in zip(points, shares.values(),
                                                                       strict=True)):
        raise ProtocolError("malformed share")

    def at_zero(subset: list[tuple[int, int]]) -> int:
        total = 0
        for i, (xi, yi) in enumerate(subset):
            num, den = 1, 1
            for j, (xj, _) in enumerate(subset):
                if i != j:
                    num = num * -xj % PRIME
                    den = den * (xi - xj) % PRIME
            total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
        return total

    value = at_zero(points[:t])
    # Every further share must lie on the same polynomial: a member that handed out
    # inconsistent shares makes the round fail rather than unmask a wrong secret.
    if len(points) > t and any(at_zero(points[:t - 1] + [p]) != value for p in points[t:]):
        raise ProtocolError("inconsistent shares")
    if value >= 1 << (8 * SEED_BYTES):
        raise ProtocolError("shares do not describe a secret")
    return value.to_bytes(SEED_BYTES, "big")


def commit_seed(context: bytes, seed: bytes) -> bytes:
    """What a member publishes of its self seed, so that a seed rebuilt from shares can be
    checked (bad shares cannot pass for the seed)."""
    return hashlib.blake2b(context + seed, digest_size=32, person=b"fl-secagg-commit").digest()


def mask_public_of(mask_secret: bytes) -> bytes:
    """The mask public key of a rebuilt mask secret key (to check it against the roster)."""
    public: bytes = sodium.crypto_scalarmult_base(mask_secret)
    return public


def share_key(share_secret: bytes, share_public: bytes, their_share_public: bytes) -> bytes:
    """The key that seals shares between two members (the same from either side)."""
    return _agree(share_secret, share_public, their_share_public, _SHARE_PERSON)


def seal_share(key: bytes, context: bytes, payload: bytes) -> bytes:
    """``payload`` sealed for one neighbour: a random 24-byte nonce || XChaCha20-Poly1305
    ciphertext, with ``context`` (round, attempt, sender, recipient) as associated data."""
    nonce = os.urandom(24)
    sealed: bytes = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(payload, context, nonce,
                                                                      key)
    return nonce + sealed


def open_share(key: bytes, context: bytes, sealed: bytes) -> bytes:
    """The payload of ``seal_share`` (ProtocolError if it is not for this context)."""
    try:
        plain: bytes = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
            sealed[24:], context, sealed[:24], key)
    except (CryptoError, ValueError, TypeError):
        raise ProtocolError("a sealed share does not open (altered, or not for us)") from None
    return plain


# -- unmasking --------------------------------------------------------------------------


class Unmasking:
    """A member's side of unmasking: for each neighbour it holds both shares of, it gives
    one kind, once per round and attempt (never the self-seed share of a member whose
    mask-key share it gave, nor the reverse), so no aggregator, even a re-elected one,
    can obtain both kinds for one member."""

    def __init__(self) -> None:
        self._given: dict[bytes, str] = {}

    def answer(self, neighbour: bytes, survived: bool) -> str:
        """Which kind to give for ``neighbour``: "seed" if it survived, else "mask"
        (ProtocolError if asked for the other kind after giving one)."""
        kind = "seed" if survived else "mask"
        given = self._given.setdefault(neighbour, kind)
        if given != kind:
            raise ProtocolError("asked for both kinds of shares of one member: refused")
        return kind


def unmask(total: np.ndarray, survivors: Sequence[bytes], dropped_masks: Mapping[bytes, bytes],
           survivor_seeds: Mapping[bytes, bytes], mask_publics: Mapping[bytes, bytes],
           graph: Mapping[bytes, Sequence[bytes]]) -> np.ndarray:
    """Remove the masks from ``total`` (the sum of the survivors' masked inputs):
    ``survivor_seeds`` are the rebuilt self seeds of the survivors, ``dropped_masks`` the
    rebuilt mask secret keys of the members that did not send, ``mask_publics`` every
    member's mask public key and ``graph`` every member's neighbours."""
    n = total.size
    out = np.asarray(total, dtype=np.uint64).copy()
    for key in survivors:
        out = out - prg(survivor_seeds[key], n)
    alive = set(survivors)
    for gone, secret in dropped_masks.items():
        for other in graph[gone]:
            if other not in alive:
                continue
            # ``other`` added sign(other, gone) * PRG(s) for the pair; take it back.
            seed = pair_seed(secret, mask_publics[gone], mask_publics[other])
            mask = prg(seed, n)
            out = out - mask if sign(other, gone) > 0 else out + mask
    return out & RING_MASK
