"""The trust store: the public keys a node accepts model traffic from.

A key enters the store by pairing (a QR code or pairing URI carrying the full key, see
``node.trust.pairing``) or by hand. The store lives in ``<state_dir>/trust.json``; every change
is written at once, atomically (temp file, fsync, rename, fsync of the dir), mode 0600.

File format (version 1), UTF-8 JSON::

    {
      "version": 1,
      "peers": [
        {
          "key": "<32-byte Ed25519 public key, base64url without padding (43 chars)>",
          "node_id": "ABCD-EFGH-IJKL-MNOP-Q",
          "name": "alice",
          "source": "pairing",
          "added_at": 1700000000.0
        }
      ]
    }

- ``key`` uses the same encoding as the ``key`` field of a pairing URI, so a key can be
  copied between the two. It must be canonical base64url (no padding, no whitespace).
- ``node_id`` is informational (for people reading the file) and optional when the file is
  edited by hand; when present it must match the key.
- ``name``: 1-64 characters, no control or formatting characters (it is shown in terminals).
- ``source``: how the key was added, a short lowercase word such as ``pairing`` or ``manual``.
- ``added_at``: unix seconds (float) of the first time the key was added.
- A key appears at most once. Unknown fields are refused.

A file that cannot be read or does not follow this format raises ``ValueError`` naming the
file and the problem: the store is never silently emptied, since that would drop every peer.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import threading
import time
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from node.common.files import atomic_write
from protocol.identity import PUBLIC_KEY_LEN, node_id_from_key

TRUST_FILE = "trust.json"
FORMAT_VERSION = 1
MAX_NAME_LEN = 64
MIN_PREFIX_LEN = 4

_SOURCE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_ENTRY_FIELDS = frozenset({"key", "node_id", "name", "source", "added_at"})
_REQUIRED_FIELDS = frozenset({"key", "name", "source", "added_at"})
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def encode_key(public_key: bytes) -> str:
    """A 32-byte key as base64url without padding (43 characters)."""
    return base64.urlsafe_b64encode(public_key).rstrip(b"=").decode("ascii")


def decode_key(text: str) -> bytes:
    """Parse canonical unpadded base64url into a 32-byte key; ValueError says what is wrong."""
    if not isinstance(text, str) or not _B64URL_RE.fullmatch(text):
        raise ValueError("key is not base64url (letters, digits, '-' and '_', no padding)")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("key is not valid base64url") from None
    if len(raw) != PUBLIC_KEY_LEN:
        raise ValueError(f"key has {len(raw)} bytes, expected {PUBLIC_KEY_LEN}")
    if encode_key(raw) != text:
        raise ValueError("key is not canonical base64url")
    return raw


def check_name(name: object) -> str:
    """Return ``name`` if it is a 1-64 character string without control characters."""
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, not {type(name).__name__}")
    if not 1 <= len(name) <= MAX_NAME_LEN:
        raise ValueError(f"name must have 1-{MAX_NAME_LEN} characters, not {len(name)}")
    if any(unicodedata.category(ch) in _BAD_CATEGORIES for ch in name):
        raise ValueError(f"name {name!r} contains control or formatting characters")
    return name


def _check_key(public_key: object) -> bytes:
    if not isinstance(public_key, (bytes, bytearray, memoryview)):
        raise ValueError(f"public key must be bytes, not {type(public_key).__name__}")
    key = bytes(public_key)
    if len(key) != PUBLIC_KEY_LEN:
        raise ValueError(f"public key has {len(key)} bytes, expected {PUBLIC_KEY_LEN}")
    return key


def _check_source(source: object) -> str:
    if not isinstance(source, str) or not _SOURCE_RE.fullmatch(source):
        raise ValueError(f"source {source!r}: expected a short lowercase word such as 'pairing'")
    return source


def _check_time(added_at: object) -> float:
    if isinstance(added_at, bool) or not isinstance(added_at, (int, float)):
        raise ValueError(f"added_at must be a number, not {type(added_at).__name__}")
    value = float(added_at)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"added_at {added_at!r} is not a valid time")
    return value


@dataclass(frozen=True)
class TrustedPeer:
    """One trusted key and what the node knows about it."""

    public_key: bytes
    name: str
    source: str
    added_at: float

    def __post_init__(self) -> None:
        _check_key(self.public_key)
        check_name(self.name)
        _check_source(self.source)
        _check_time(self.added_at)

    @property
    def node_id(self) -> str:
        """The readable node id derived from the key."""
        return node_id_from_key(self.public_key)

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored in ``trust.json`` for this peer."""
        return {
            "key": encode_key(self.public_key),
            "node_id": self.node_id,
            "name": self.name,
            "source": self.source,
            "added_at": self.added_at,
        }

    @classmethod
    def from_json(cls, obj: object) -> TrustedPeer:
        """Parse and validate one entry of ``trust.json``; ValueError says what is wrong."""
        if not isinstance(obj, dict):
            raise ValueError(f"expected an object, not {type(obj).__name__}")
        unknown = set(obj) - _ENTRY_FIELDS
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        missing = _REQUIRED_FIELDS - set(obj)
        if missing:
            raise ValueError(f"missing field(s) {', '.join(sorted(missing))}")
        peer = cls(
            public_key=decode_key(obj["key"]),
            name=check_name(obj["name"]),
            source=_check_source(obj["source"]),
            added_at=_check_time(obj["added_at"]),
        )
        if "node_id" in obj and obj["node_id"] != peer.node_id:
            raise ValueError(f"node_id {obj['node_id']!r} does not match the key ({peer.node_id})")
        return peer


def _normalize_ident(ident: str) -> str:
    return ident.strip().replace("-", "").upper()


class TrustStore:
    """The keys a node trusts, persisted in ``<state_dir>/trust.json`` (thread-safe).

    ``state_dir=None`` keeps the store in memory only (tests, simulations).
    """

    def __init__(self, state_dir: str | os.PathLike[str] | None) -> None:
        self._path = Path(state_dir) / TRUST_FILE if state_dir is not None else None
        self._lock = threading.Lock()
        self._peers: dict[bytes, TrustedPeer] = {}
        if self._path is not None and os.path.lexists(self._path):
            self._peers = self._load(self._path)

    @property
    def path(self) -> Path | None:
        """Where the store is kept (None when in memory only)."""
        return self._path

    @staticmethod
    def _load(path: Path) -> dict[bytes, TrustedPeer]:
        def corrupt(what: str) -> ValueError:
            return ValueError(f"{path}: corrupt trust store ({what})")

        try:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)  # readable or writable by others: tighten it
        except OSError:
            pass  # not ours to change; reading it below reports any real problem
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise ValueError(f"{path}: cannot read the trust store ({why})") from None
        except UnicodeDecodeError:
            raise corrupt("not UTF-8 text") from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise corrupt(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        if not isinstance(doc, dict):
            raise corrupt(f"expected a JSON object, not {type(doc).__name__}")
        version = doc.get("version")
        if isinstance(version, bool) or version != FORMAT_VERSION:
            raise corrupt(f"unsupported version {version!r}, expected {FORMAT_VERSION}")
        unknown = set(doc) - {"version", "peers"}
        if unknown:
            raise corrupt(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        entries = doc.get("peers")
        if not isinstance(entries, list):
            raise corrupt("'peers' must be a list")
        peers: dict[bytes, TrustedPeer] = {}
        for index, obj in enumerate(entries):
            try:
                peer = TrustedPeer.from_json(obj)
            except ValueError as exc:
                raise corrupt(f"peer #{index}: {exc}") from None
            if peer.public_key in peers:
                raise corrupt(f"peer #{index}: key {peer.node_id} listed twice")
            peers[peer.public_key] = peer
        return peers

    def _save(self, peers: dict[bytes, TrustedPeer]) -> None:
        """Persist ``peers``; the caller holds the lock and installs them only on success."""
        if self._path is None:
            return
        ordered = sorted(peers.values(), key=_sort_key)
        doc = {"version": FORMAT_VERSION, "peers": [p.to_json() for p in ordered]}
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self._path, (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode())

    def add(self, public_key: bytes, name: str, source: str,
            now: float | None = None) -> TrustedPeer:
        """Trust ``public_key`` and persist it; return the entry.

        Idempotent: adding a key already trusted updates its name and keeps its source and
        ``added_at``. Raises ValueError for a key that is not 32 bytes, a bad name or source.
        """
        key = _check_key(public_key)
        check_name(name)
        _check_source(source)
        with self._lock:
            old = self._peers.get(key)
            if old is not None:
                if old.name == name:
                    return old
                peer = replace(old, name=name)
            else:
                peer = TrustedPeer(key, name, source, time.time() if now is None else now)
            updated = {**self._peers, key: peer}
            self._save(updated)
            self._peers = updated
            return peer

    def find(self, ident: str) -> TrustedPeer | None:
        """The peer whose node id is ``ident`` or starts with it (see ``remove``)."""
        with self._lock:
            return self._find(ident)

    def _find(self, ident: str) -> TrustedPeer | None:
        wanted = _normalize_ident(ident)
        if len(wanted) < MIN_PREFIX_LEN:
            raise ValueError(f"node id {ident!r}: give the full id or at least "
                             f"{MIN_PREFIX_LEN} characters of it")
        matches = [p for p in self._peers.values()
                   if p.node_id.replace("-", "").startswith(wanted)]
        if len(matches) > 1:
            listed = ", ".join(f"{p.node_id} ({p.name})" for p in sorted(matches, key=_sort_key))
            raise ValueError(f"node id prefix {ident!r} is ambiguous: it matches {listed}")
        return matches[0] if matches else None

    def remove(self, ident: str) -> TrustedPeer | None:
        """Stop trusting the peer named by ``ident``; return it, or None if there is none.

        ``ident`` is a node id, with or without dashes, in any case, or a prefix of at least
        4 characters of it that matches one trusted peer. Raises ValueError for a prefix that
        is too short or matches several peers (the message lists them).
        """
        with self._lock:
            peer = self._find(ident)
            if peer is None:
                return None
            updated = {k: v for k, v in self._peers.items() if k != peer.public_key}
            self._save(updated)
            self._peers = updated
            return peer

    def is_trusted(self, public_key: bytes) -> bool:
        """True when ``public_key`` is in the store."""
        return self.get(public_key) is not None

    def get(self, public_key: bytes) -> TrustedPeer | None:
        """The entry for ``public_key``, or None."""
        if not isinstance(public_key, (bytes, bytearray, memoryview)):
            return None
        with self._lock:
            return self._peers.get(bytes(public_key))

    def entries(self) -> list[TrustedPeer]:
        """Every trusted peer, sorted by name (then node id)."""
        with self._lock:
            return sorted(self._peers.values(), key=_sort_key)

    def __len__(self) -> int:
        """The number of trusted peers."""
        with self._lock:
            return len(self._peers)


def _sort_key(peer: TrustedPeer) -> tuple[str, str, str]:
    return (peer.name.casefold(), peer.name, peer.node_id)
