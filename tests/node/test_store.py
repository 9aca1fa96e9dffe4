"""Checkpoints and the node database: atomic, checksummed, corrupt ones skipped."""

from __future__ import annotations

import pytest

from node.runtime.checkpoints import (
    CheckpointError,
    CheckpointStore,
    NodeDB,
    decode_checkpoint,
    encode_checkpoint,
)


def accept_all(round_number: int, digest: bytes, frame: bytes) -> None:
    return None


def test_a_checkpoint_round_trips_and_files_are_private(tmp_path):
    store = CheckpointStore(tmp_path)
    path = store.save(3, b"\x01" * 32, b"frame bytes")
    assert path.stat().st_mode & 0o777 == 0o600
    ckpt = store.load_latest(accept_all)
    assert (ckpt.round, ckpt.digest, ckpt.frame) == (3, b"\x01" * 32, b"frame bytes")


def test_only_the_last_few_checkpoints_are_kept(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    for r in range(1, 8):
        store.save(r, bytes([r]) * 32, b"f%d" % r)
    assert [p.name for p in store.files()] == ["round-000007.ckpt", "round-000006.ckpt",
                                               "round-000005.ckpt"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic", "empty"])
def test_a_corrupt_checkpoint_is_reported_and_the_previous_one_used(tmp_path, caplog, damage):
    store = CheckpointStore(tmp_path)
    store.save(4, b"\x04" * 32, b"model four")
    newest = store.save(5, b"\x05" * 32, b"model five")
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[20] ^= 0xFF
    elif damage == "magic":
        data[:4] = b"XXXX"
    else:
        data = bytearray()
    newest.write_bytes(bytes(data))
    ckpt = store.load_latest(accept_all)
    assert ckpt.round == 4 and ckpt.frame == b"model four"
    assert "round-000005.ckpt is unusable" in caplog.text


def test_a_checkpoint_refused_by_verification_is_skipped(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(1, b"\x01" * 32, b"good")
    store.save(2, b"\x02" * 32, b"forged")

    def verify(r: int, digest: bytes, frame: bytes) -> None:
        if frame == b"forged":
            raise CheckpointError("bad signature")

    assert store.load_latest(verify).round == 1


def test_decode_names_what_is_wrong():
    good = encode_checkpoint(2, b"\x02" * 32, b"x")
    assert decode_checkpoint(good) == (2, b"\x02" * 32, b"x")
    with pytest.raises(CheckpointError, match="checksum"):
        decode_checkpoint(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="truncated"):
        decode_checkpoint(good[:10])


def test_the_database_keeps_rounds_events_and_peers_across_reopen(tmp_path):
    db = NodeDB(tmp_path)
    db.record_round({"round": 1, "accuracy": 0.5, "loss": 1.0, "aggregator": "X"})
    db.record_round({"round": 2, "accuracy": 0.7, "loss": 0.6, "aggregator": "Y"})
    db.event("aggregator_failed", "round 2: aggregator went down")
    db.peer_seen("ABCD", "alpha", "10.0.0.1:7700", True)
    db.close()
    db = NodeDB(tmp_path)
    assert [r["round"] for r in db.rounds()] == [1, 2]
    assert db.rounds()[1]["accuracy"] == 0.7
    assert db.events()[-1]["kind"] == "aggregator_failed"
    db.close()


def test_a_corrupt_database_is_a_clear_error(tmp_path):
    (tmp_path / "node.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="not a usable database"):
        NodeDB(tmp_path)


def test_an_older_database_gains_the_epsilon_column_and_keeps_its_rounds(tmp_path):
    import sqlite3

    from node.runtime.checkpoints import NodeDB

    old = sqlite3.connect(tmp_path / "node.db")
    old.execute("CREATE TABLE rounds (round INTEGER PRIMARY KEY, accuracy REAL, loss REAL,"
                " aggregator TEXT, contributors INTEGER, num_examples INTEGER, model_hash TEXT,"
                " started_at REAL, committed_at REAL, evaluated_at REAL, train_seconds REAL,"
                " round_seconds REAL, update_bytes INTEGER, model_bytes INTEGER)")
    old.execute("INSERT INTO rounds (round, accuracy) VALUES (1, 0.5)")
    old.commit()
    old.close()
    db = NodeDB(tmp_path)
    db.record_round({"round": 2, "accuracy": 0.7, "epsilon": 1.25})
    rows = db.rounds()
    db.close()
    assert [(r["round"], r["accuracy"], r["epsilon"]) for r in rows] == [(1, 0.5, None),
                                                                         (2, 0.7, 1.25)]
