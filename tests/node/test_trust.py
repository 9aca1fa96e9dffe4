"""TrustStore (node/trust.py): persistence, lookup by node id, and refusing corrupt files."""

from __future__ import annotations

import hashlib
import json
import stat
import threading
from pathlib import Path

import pytest

from node.trust.store import TRUST_FILE, TrustedPeer, TrustStore, decode_key, encode_key
from protocol.identity import Identity, node_id_from_key

NOW = 1_700_000_000.0


def key(i: int) -> bytes:
    """A deterministic 32-byte public key."""
    return Identity.from_seed(hashlib.sha256(f"peer-{i}".encode()).digest()).public_key


def raw_id(public_key: bytes) -> str:
    return node_id_from_key(public_key).replace("-", "")


def two_keys_sharing_a_prefix(length: int = 4) -> tuple[bytes, bytes]:
    """Two keys whose node ids start with the same ``length`` characters (birthday search)."""
    seen: dict[str, bytes] = {}
    for i in range(100_000):
        k = hashlib.sha256(f"collide-{i}".encode()).digest()
        prefix = raw_id(k)[:length]
        if prefix in seen:
            return seen[prefix], k
        seen[prefix] = k
    raise AssertionError("no collision found")


# --- values -----------------------------------------------------------------------------


def test_trusted_peer_has_the_node_id_of_its_key():
    peer = TrustedPeer(key(1), "alice", "pairing", NOW)
    assert peer.node_id == node_id_from_key(key(1))


@pytest.mark.parametrize("kwargs, words", [
    ({"public_key": b"\x01" * 31}, "31 bytes"),
    ({"name": ""}, "1-64"),
    ({"name": "x" * 65}, "1-64"),
    ({"name": "evil\x1b[2J"}, "control"),
    ({"source": "Pairing!"}, "source"),
    ({"source": "manual\n"}, "source"),
    ({"added_at": float("nan")}, "added_at"),
])
def test_trusted_peer_rejects_bad_fields(kwargs, words):
    fields = {"public_key": key(1), "name": "alice", "source": "pairing", "added_at": NOW}
    fields.update(kwargs)
    with pytest.raises(ValueError, match=words):
        TrustedPeer(**fields)


def test_key_encoding_round_trips_and_is_strict():
    k = key(3)
    text = encode_key(k)
    assert len(text) == 43 and "=" not in text
    assert decode_key(text) == k
    for bad in (text + "=", text[:-1], text[:-1] + "!", text + "AAAA", text + "\n"):
        with pytest.raises(ValueError):
            decode_key(bad)


# --- add / get / entries ------------------------------------------------------------------


def test_add_get_is_trusted_and_entries_sorted_by_name(tmp_path):
    store = TrustStore(tmp_path)
    carol = store.add(key(3), "carol", "manual", now=NOW + 2)
    alice = store.add(key(1), "alice", "pairing", now=NOW)
    bob = store.add(key(2), "Bob", "pairing", now=NOW + 1)
    assert [p.name for p in store.entries()] == ["alice", "Bob", "carol"]
    assert store.get(key(1)) == alice == TrustedPeer(key(1), "alice", "pairing", NOW)
    assert store.get(key(2)) is bob and store.get(key(3)) is carol
    assert store.is_trusted(key(1)) and not store.is_trusted(key(4))
    assert store.get(key(4)) is None
    assert not store.is_trusted(b"short")
    assert len(store) == 3


def test_adding_again_updates_the_name_and_keeps_the_rest(tmp_path):
    store = TrustStore(tmp_path)
    first = store.add(key(1), "alice", "pairing", now=NOW)
    again = store.add(key(1), "alice-laptop", "manual", now=NOW + 50)
    assert again == TrustedPeer(key(1), "alice-laptop", "pairing", NOW)
    assert store.add(key(1), "alice-laptop", "manual", now=NOW + 99) == again
    assert len(store) == 1 and first.name == "alice"
    assert TrustStore(tmp_path).get(key(1)) == again


def test_add_refuses_bad_input_without_changing_anything(tmp_path):
    store = TrustStore(tmp_path)
    store.add(key(1), "alice", "pairing", now=NOW)
    for args in ((b"x" * 33, "bob", "manual"), (key(2), "x" * 65, "manual"),
                 (key(2), "bob", ""), ("not bytes", "bob", "manual")):
        with pytest.raises(ValueError):
            store.add(*args, now=NOW)  # type: ignore[arg-type]
    assert [p.name for p in TrustStore(tmp_path).entries()] == ["alice"]


def test_add_uses_the_clock_when_now_is_not_given(tmp_path):
    peer = TrustStore(tmp_path).add(key(1), "alice", "pairing")
    assert peer.added_at > NOW


# --- persistence ------------------------------------------------------------------------


def test_store_survives_a_restart(tmp_path):
    store = TrustStore(tmp_path)
    store.add(key(1), "alice", "pairing", now=NOW)
    store.add(key(2), "bob", "manual", now=NOW + 1)
    store.remove(raw_id(key(2)))
    reopened = TrustStore(tmp_path)  # "restart": a new instance reads the file
    assert reopened.entries() == [TrustedPeer(key(1), "alice", "pairing", NOW)]
    assert not reopened.is_trusted(key(2))


def test_file_is_mode_0600_and_documented_json(tmp_path):
    TrustStore(tmp_path).add(key(1), "alice", "pairing", now=NOW)
    path = tmp_path / TRUST_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc == {"version": 1, "peers": [{
        "key": encode_key(key(1)), "node_id": node_id_from_key(key(1)),
        "name": "alice", "source": "pairing", "added_at": NOW}]}
    assert not list(tmp_path.glob(".*.tmp"))


def test_missing_file_is_an_empty_store_and_nothing_is_written_until_a_change(tmp_path):
    store = TrustStore(tmp_path / "fresh")
    assert store.entries() == [] and len(store) == 0
    assert not (tmp_path / "fresh" / TRUST_FILE).exists()
    store.add(key(1), "alice", "pairing", now=NOW)
    assert (tmp_path / "fresh" / TRUST_FILE).exists()


def test_a_loose_file_mode_is_tightened_on_load(tmp_path):
    TrustStore(tmp_path).add(key(1), "alice", "pairing", now=NOW)
    path = tmp_path / TRUST_FILE
    path.chmod(0o666)
    TrustStore(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_in_memory_store_writes_nothing(tmp_path):
    store = TrustStore(None)
    store.add(key(1), "alice", "pairing", now=NOW)
    assert store.path is None and store.is_trusted(key(1))
    assert store.remove(raw_id(key(1))) is not None and len(store) == 0


def test_a_hand_written_entry_without_node_id_loads(tmp_path):
    (tmp_path / TRUST_FILE).write_text(json.dumps({"version": 1, "peers": [
        {"key": encode_key(key(1)), "name": "alice", "source": "manual", "added_at": 5}]}))
    assert TrustStore(tmp_path).entries() == [TrustedPeer(key(1), "alice", "manual", 5.0)]


def good_entry(**changes: object) -> dict[str, object]:
    entry: dict[str, object] = {"key": encode_key(key(1)), "node_id": node_id_from_key(key(1)),
                                "name": "alice", "source": "pairing", "added_at": NOW}
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


@pytest.mark.parametrize("content, words", [
    (b"{not json", "not JSON"),
    (b"", "not JSON"),
    (b"\xff\xfe\x00garbage", "UTF-8"),
    (b"[]", "JSON object"),
    (json.dumps({"peers": []}).encode(), "version"),
    (json.dumps({"version": 2, "peers": []}).encode(), "version"),
    (json.dumps({"version": True, "peers": []}).encode(), "version"),
    (json.dumps({"version": 1}).encode(), "'peers' must be a list"),
    (json.dumps({"version": 1, "peers": {}}).encode(), "'peers' must be a list"),
    (json.dumps({"version": 1, "peers": [], "extra": 1}).encode(), "unknown field"),
    (json.dumps({"version": 1, "peers": ["alice"]}).encode(), "peer #0: expected an object"),
    (json.dumps({"version": 1, "peers": [good_entry(key=encode_key(b"k" * 16))]}).encode(),
     "peer #0: key has 16 bytes, expected 32"),
    (json.dumps({"version": 1, "peers": [good_entry(key="AAAA====")]}).encode(), "base64url"),
    (json.dumps({"version": 1, "peers": [good_entry(key=123)]}).encode(), "base64url"),
    (json.dumps({"version": 1, "peers": [good_entry(name=7)]}).encode(), "name must be a string"),
    (json.dumps({"version": 1, "peers": [good_entry(name="n" * 65)]}).encode(), "1-64"),
    (json.dumps({"version": 1, "peers": [good_entry(added_at="yesterday")]}).encode(),
     "added_at must be a number"),
    (json.dumps({"version": 1, "peers": [good_entry(source=None)]}).encode(),
     "missing field.*source"),
    (json.dumps({"version": 1, "peers": [good_entry(trusted=True)]}).encode(),
     "unknown field.*trusted"),
    (json.dumps({"version": 1, "peers": [good_entry(node_id="AAAA-AAAA-AAAA-AAAA-A")]}).encode(),
     "does not match"),
    (json.dumps({"version": 1, "peers": [good_entry(), good_entry(name="again")]}).encode(),
     "peer #1: key .* listed twice"),
])
def test_corrupt_trust_file_is_refused_naming_the_file(tmp_path, content, words):
    path = tmp_path / TRUST_FILE
    path.write_bytes(content)
    with pytest.raises(ValueError, match=words) as info:
        TrustStore(tmp_path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == content  # never emptied or rewritten


def test_unreadable_trust_file_is_refused_naming_the_file(tmp_path):
    (tmp_path / TRUST_FILE).mkdir()  # a directory where the file should be
    with pytest.raises(ValueError, match="cannot read") as info:
        TrustStore(tmp_path)
    assert str(tmp_path / TRUST_FILE) in str(info.value)


def test_dangling_symlink_is_refused_not_treated_as_empty(tmp_path):
    (tmp_path / TRUST_FILE).symlink_to(tmp_path / "gone.json")
    with pytest.raises(ValueError, match="cannot read"):
        TrustStore(tmp_path)


# --- remove -------------------------------------------------------------------------------


@pytest.fixture
def three(tmp_path: Path) -> TrustStore:
    store = TrustStore(tmp_path)
    for i, name in ((1, "alice"), (2, "bob"), (3, "carol")):
        store.add(key(i), name, "pairing", now=NOW + i)
    return store


@pytest.mark.parametrize("form", [
    lambda k: node_id_from_key(k),
    lambda k: raw_id(k),
    lambda k: node_id_from_key(k).lower(),
    lambda k: f"  {raw_id(k).lower()}\n",
    lambda k: node_id_from_key(k)[:9],  # "ABCD-EFGH" prefix with its dash
])
def test_remove_by_full_id_dashed_lowercase_or_prefix(three, tmp_path, form):
    others = {raw_id(key(1))[:4], raw_id(key(3))[:4]}
    assert raw_id(key(2))[:4] not in others, "fixture keys must have distinct prefixes"
    removed = three.remove(form(key(2)))
    assert removed == TrustedPeer(key(2), "bob", "pairing", NOW + 2)
    assert [p.name for p in three.entries()] == ["alice", "carol"]
    assert not TrustStore(tmp_path).is_trusted(key(2))


def test_remove_by_a_four_character_prefix(three):
    assert three.remove(raw_id(key(3))[:4].lower()).name == "carol"


def test_remove_unknown_returns_none_and_changes_nothing(three, tmp_path):
    before = (tmp_path / TRUST_FILE).read_bytes()
    assert three.remove(node_id_from_key(key(9))) is None
    assert not any(raw_id(key(i)).startswith("ZZZZ") for i in (1, 2, 3))
    assert three.remove("ZZZZ-ZZZZ") is None
    assert three.remove("0000") is None  # not even base32
    assert len(three) == 3 and (tmp_path / TRUST_FILE).read_bytes() == before


def test_remove_refuses_a_prefix_shorter_than_four(three):
    with pytest.raises(ValueError, match="at least 4"):
        three.remove(raw_id(key(1))[:3])
    with pytest.raises(ValueError, match="at least 4"):
        three.remove("--")
    assert len(three) == 3


def test_ambiguous_prefix_is_refused_listing_the_matches(tmp_path):
    first, second = two_keys_sharing_a_prefix()
    store = TrustStore(tmp_path)
    store.add(first, "one", "manual", now=NOW)
    store.add(second, "two", "manual", now=NOW)
    prefix = raw_id(first)[:4]
    with pytest.raises(ValueError, match="ambiguous") as info:
        store.remove(prefix)
    assert node_id_from_key(first) in str(info.value)
    assert node_id_from_key(second) in str(info.value)
    assert len(store) == 2
    # a longer prefix that tells them apart works (they differ somewhere in 17 characters)
    n = next(i for i in range(5, 18) if raw_id(first)[:i] != raw_id(second)[:i])
    assert store.remove(raw_id(first)[:n]).public_key == first
    assert store.find(prefix).public_key == second


def test_concurrent_adds_are_all_kept(tmp_path):
    store = TrustStore(tmp_path)

    def add_range(start: int) -> None:
        for i in range(start, start + 10):
            store.add(key(i), f"peer{i:03d}", "manual", now=NOW)

    threads = [threading.Thread(target=add_range, args=(s,)) for s in (0, 10, 20, 30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(TrustStore(tmp_path)) == 40
