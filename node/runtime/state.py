"""What a node keeps in its state dir between runs (identity lives in protocol.identity).

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

SEQ_FILE = "seq.json"


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync of the dir."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
