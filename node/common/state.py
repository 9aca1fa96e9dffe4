"""What a node keeps in its state dir between runs: its key, API token and sequence numbers.

Sequence numbers must never go backwards, or peers would drop a restarted node as a
replayer. Writing the counter on every message would cost an fsync per message, so the
node *reserves* blocks: it persists "next free = n + BLOCK" before using numbers up to it,
and a restart resumes from the reserved mark, skipping at most one block.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from pathlib import Path

from node.common.files import atomic_write
from protocol.identity import Identity

SEQ_FILE = "seq.json"
KEY_FILE = "node.key"


def load_or_create_identity(state_dir: str | os.PathLike[str]) -> Identity:
    """Load ``state_dir/node.key`` (the 32-byte Ed25519 seed) or create it (mode 0600) on
    first start. A key file readable by others is tightened to 0600."""
    path = Path(state_dir) / KEY_FILE
    if path.exists():
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        seed = path.read_bytes()
        if len(seed) != 32:
            raise ValueError(f"{path}: corrupt key file ({len(seed)} bytes, expected 32)")
        return Identity.from_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    ident = Identity.generate()
    atomic_write(path, ident.seed, mode=0o600)
    return ident


API_TOKEN_FILE = "api.token"


def load_or_create_api_token(state_dir: str | os.PathLike[str]) -> str:
    """The node's API token (``state_dir/api.token``, mode 0600), made at first start.

    Local tools (`fl-node pair`, later the dashboard) read it from the state dir; anyone
    who can read that file can control the node, exactly like the node's key."""
    path = Path(state_dir) / API_TOKEN_FILE
    if path.exists():
        token = path.read_text().strip()
        if len(token) < 32:
            raise ValueError(f"{path}: corrupt API token file")
        return token
    token = secrets.token_hex(32)
    atomic_write(path, token.encode())
    return token


class SequenceCounter:
    """Monotonic per-sender sequence numbers that survive restarts and crashes."""

    BLOCK = 1000

    def __init__(self, state_dir: str | os.PathLike[str] | None) -> None:
        self._path = Path(state_dir) / SEQ_FILE if state_dir is not None else None
        self._lock = threading.Lock()
        self._next = 1
        if self._path is not None and self._path.exists():
            try:
                self._next = int(json.loads(self._path.read_text())["reserved"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{self._path}: corrupt sequence file ({exc})") from None
        self._reserved = self._next
        self._reserve()

    def _reserve(self) -> None:
        self._reserved = self._next + self.BLOCK
        if self._path is not None:
            atomic_write(self._path, json.dumps({"reserved": self._reserved}).encode())

    def next(self) -> int:
        """The next sequence number (thread-safe)."""
        with self._lock:
            if self._next >= self._reserved:
                self._reserve()
            n = self._next
            self._next += 1
            return n
