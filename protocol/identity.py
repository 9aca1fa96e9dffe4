"""Ed25519 node identity (PyNaCl) and human-readable node ids.

The public key IS the identity. The node id shown to people is derived from it: the
SHA-256 of the key in base32, cut to 16 characters, plus one check character (Luhn mod
32, like Syncthing device ids), grouped by four: ``ABCD-EFGH-IJKL-MNOP-Q``.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from .errors import ProtocolError

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64


def _luhn32(chars: str) -> str:
    """Luhn mod N check character over the base32 alphabet."""
    factor, total, n = 2, 0, len(_ALPHABET)
    for ch in reversed(chars):
        addend = factor * _ALPHABET.index(ch)
        factor = 1 if factor == 2 else 2
        total += addend // n + addend % n
    return _ALPHABET[(n - total % n) % n]


def node_id_from_key(public_key: bytes) -> str:
    """Short readable id for a 32-byte Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_LEN:
        raise ValueError("an Ed25519 public key has 32 bytes")
    digest = base64.b32encode(hashlib.sha256(public_key).digest()).decode()[:16]
    full = digest + _luhn32(digest)
    return "-".join(full[i : i + 4] for i in range(0, len(full), 4))


def is_valid_node_id(text: str) -> bool:
    """True when ``text`` is a well-formed node id whose check character matches."""
    raw = text.replace("-", "").upper()
    if len(raw) != 17 or any(c not in _ALPHABET for c in raw):
        return False
    return _luhn32(raw[:16]) == raw[16]


@dataclass(frozen=True)
class Identity:
    """A node's key pair."""

    signing_key: SigningKey

    @property
    def public_key(self) -> bytes:
        """The 32-byte public key."""
        return bytes(self.signing_key.verify_key)

    @property
    def node_id(self) -> str:
        """The readable id derived from the public key."""
        return node_id_from_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """Detached 64-byte Ed25519 signature."""
        return self.signing_key.sign(message).signature

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity."""
        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic identity from a 32-byte seed (tests only)."""
        return cls(SigningKey(seed))

    @property
    def seed(self) -> bytes:
        """The 32-byte private seed (what a key file holds)."""
        return bytes(self.signing_key)


def verify(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Check a detached signature; raise ProtocolError if it does not hold."""
    if len(public_key) != PUBLIC_KEY_LEN or len(signature) != SIGNATURE_LEN:
        raise ProtocolError("malformed key or signature")
    try:
        VerifyKey(public_key).verify(message, signature)
    except BadSignatureError:
        raise ProtocolError("bad signature") from None
    except Exception as exc:  # nacl raises other types for invalid points
        raise ProtocolError(f"bad signature ({type(exc).__name__})") from None
