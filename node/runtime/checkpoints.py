"""What a node keeps on disk to survive crashes: checkpoints and its database.

Checkpoints (``state_dir/checkpoints/round-NNNNNN.ckpt``) hold the *signed frame* of a
global model, so a restored model is verified exactly like one received from a peer
(aggregator signature, weights digest) and can be re-served to peers for catch-up::

    b"FLCK" | u32be version (1) | u32be meta length | meta (JSON) | frame | SHA-256 of all before

``checkpoints/offline.ckpt`` holds, the same way, the model a node holds while offline
(below quorum): a ``share`` frame signed by the node itself. It is used on restart only if
it continues the newest global checkpoint (its round is the next one, its base that
model).

Each is written atomically (temp file, fsync, rename, fsync of the directory). The last
``keep`` are kept. On start the newest checkpoint that passes every check is used; a
corrupt or truncated one is reported (with the reason) and the previous one is tried.

The SQLite database (``state_dir/node.db``) records every completed round's metrics, the
peers seen and notable events; ``/api/metrics`` reads it, so history survives restarts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.common.files import atomic_write

log = logging.getLogger(__name__)

MAGIC = b"FLCK"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
DB_FILE = "node.db"
#: The model a node holds while offline (below quorum), in the same format.
OFFLINE_FILE = "offline.ckpt"


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, truncated or not ours."""


@dataclass(frozen=True)
class Checkpoint:
    """A restored global model: its round, digest and the signed frame it came in."""

    round: int
    digest: bytes
    frame: bytes
    path: Path


def encode_checkpoint(round_number: int, digest: bytes, frame: bytes) -> bytes:
    """The bytes of a checkpoint file."""
    meta = json.dumps({"round": round_number, "digest": digest.hex(),
                       "saved_at": time.time()}).encode()
    body = MAGIC + struct.pack(">II", VERSION, len(meta)) + meta + frame
    return body + hashlib.sha256(body).digest()


def decode_checkpoint(data: bytes) -> tuple[int, bytes, bytes]:
    """(round, digest, frame) from checkpoint bytes; CheckpointError says what is wrong."""
    if len(data) < 12 + 32:
        raise CheckpointError("truncated (shorter than a header)")
    body, checksum = data[:-32], data[-32:]
    if body[:4] != MAGIC:
        raise CheckpointError("not an fl-node checkpoint (bad magic)")
    if hashlib.sha256(body).digest() != checksum:
        raise CheckpointError("checksum mismatch (truncated or corrupted)")
    version, meta_len = struct.unpack_from(">II", body, 4)
    if version != VERSION:
        raise CheckpointError(f"unsupported checkpoint version {version}")
    try:
        meta = json.loads(body[12 : 12 + meta_len])
        round_number, digest = int(meta["round"]), bytes.fromhex(meta["digest"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"bad metadata ({exc})") from None
    return round_number, digest, bytes(body[12 + meta_len :])


class CheckpointStore:
    """Atomic, checksummed checkpoints of the global model, newest first on load."""

    def __init__(self, state_dir: str | Path, keep: int = 3) -> None:
        self.dir = Path(state_dir) / CHECKPOINT_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def path_for(self, round_number: int) -> Path:
        return self.dir / f"round-{round_number:06d}.ckpt"

    def save(self, round_number: int, digest: bytes, frame: bytes) -> Path:
        """Write a checkpoint atomically and prune old ones. Blocking: call off the loop."""
        path = self.path_for(round_number)
        atomic_write(path, encode_checkpoint(round_number, digest, frame), mode=0o600)
        for old in self.files()[self.keep :]:
            old.unlink(missing_ok=True)
        return path

    @property
    def offline_path(self) -> Path:
        return self.dir / OFFLINE_FILE

    def save_offline(self, round_number: int, digest: bytes, frame: bytes) -> Path:
        """Write the offline checkpoint (the model a node holds while offline: a signed
        ``share`` frame), atomically. Blocking: call off the loop."""
        atomic_write(self.offline_path, encode_checkpoint(round_number, digest, frame),
                     mode=0o600)
        return self.offline_path

    def load_offline(self, verify: Callable[[int, bytes, bytes], None]) -> Checkpoint | None:
        """The offline checkpoint if there is one that decodes and passes ``verify``
        (which raises ValueError to refuse it; a stale one is refused that way too)."""
        path = self.offline_path
        if not path.exists():
            return None
        try:
            round_number, digest, frame = decode_checkpoint(path.read_bytes())
            verify(round_number, digest, frame)
        except (OSError, ValueError) as exc:
            log.warning("offline checkpoint %s not used: %s", path.name, exc)
            return None
        return Checkpoint(round_number, digest, frame, path)

    def files(self) -> list[Path]:
        """Checkpoint files, newest round first."""
        return sorted(self.dir.glob("round-*.ckpt"), reverse=True)

    def load_latest(self, verify: Callable[[int, bytes, bytes], None]) -> Checkpoint | None:
        """The newest checkpoint that decodes and passes ``verify(round, digest, frame)``
        (which raises ValueError to refuse it). Corrupt ones are reported and skipped."""
        for path in self.files():
            try:
                round_number, digest, frame = decode_checkpoint(path.read_bytes())
                verify(round_number, digest, frame)
            except (OSError, ValueError) as exc:
                log.error("checkpoint %s is unusable: %s; trying the previous one", path.name,
                          exc)
                continue
            return Checkpoint(round_number, digest, frame, path)
        return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, accuracy REAL, loss REAL, aggregator TEXT,
    contributors INTEGER, num_examples INTEGER, model_hash TEXT, started_at REAL,
    committed_at REAL, evaluated_at REAL, train_seconds REAL, round_seconds REAL,
    update_bytes INTEGER, model_bytes INTEGER, epsilon REAL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL, kind TEXT, detail TEXT
);
CREATE TABLE IF NOT EXISTS peers (
    node_id TEXT PRIMARY KEY, name TEXT, address TEXT, first_seen REAL, last_seen REAL,
    trusted INTEGER
);
"""
ROUND_FIELDS = ("round", "accuracy", "loss", "aggregator", "contributors", "num_examples",
                "model_hash", "started_at", "committed_at", "evaluated_at", "train_seconds",
                "round_seconds", "update_bytes", "model_bytes", "epsilon")
#: Columns added after the first release, with their types: added to older databases.
_ADDED_COLUMNS = {"epsilon": "REAL"}


class NodeDB:
    """The node's SQLite database. Thread-safe; writes are small, commit per call."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / DB_FILE
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            have = {row[1] for row in self._db.execute("PRAGMA table_info(rounds)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in have:
                    self._db.execute(f"ALTER TABLE rounds ADD COLUMN {column} {kind}")
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{self.path}: not a usable database ({exc}); move it away to"
                             " start a new one") from None

    def record_round(self, row: dict[str, Any]) -> None:
        """Insert or replace one completed round."""
        values = [row.get(k) for k in ROUND_FIELDS]
        with self._lock, self._db:
            self._db.execute(f"INSERT OR REPLACE INTO rounds ({', '.join(ROUND_FIELDS)})"
                             f" VALUES ({', '.join('?' * len(ROUND_FIELDS))})", values)

    def rounds(self) -> list[dict[str, Any]]:
        """Every recorded round, in order."""
        with self._lock:
            cur = self._db.execute(f"SELECT {', '.join(ROUND_FIELDS)} FROM rounds ORDER BY round")
            return [dict(zip(ROUND_FIELDS, r, strict=True)) for r in cur.fetchall()]

    def event(self, kind: str, detail: str) -> None:
        """Append an event."""
        self.add_events([(time.time(), kind, detail)])

    def add_events(self, events: list[tuple[float, str, str]]) -> None:
        """Append events (ts, kind, detail) in one transaction."""
        with self._lock, self._db:
            self._db.executemany("INSERT INTO events (ts, kind, detail) VALUES (?, ?, ?)",
                                 events)

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent events, oldest first."""
        with self._lock:
            cur = self._db.execute("SELECT ts, kind, detail FROM events ORDER BY id DESC"
                                   " LIMIT ?", (limit,))
            rows = cur.fetchall()
        return [{"ts": t, "kind": k, "detail": d} for t, k, d in reversed(rows)]

    def peer_seen(self, node_id: str, name: str, address: str, trusted: bool) -> None:
        """Record that a peer was seen now."""
        now = time.time()
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO peers (node_id, name, address, first_seen, last_seen, trusted)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(node_id) DO UPDATE SET name=excluded.name,"
                " address=excluded.address, last_seen=excluded.last_seen,"
                " trusted=excluded.trusted", (node_id, name, address, now, now, int(trusted)))

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()
