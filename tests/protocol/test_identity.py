"""Node identity: readable ids with a check character, and the key file on disk."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat

import pytest

from node.common.state import KEY_FILE, load_or_create_identity
from protocol.errors import ProtocolError
from protocol.identity import Identity, is_valid_node_id, node_id_from_key, verify

from .wire import identity

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
NODE_ID = re.compile(r"^[A-Z2-7]{4}-[A-Z2-7]{4}-[A-Z2-7]{4}-[A-Z2-7]{4}-[A-Z2-7]$")


def test_node_id_is_four_groups_of_four_and_a_check_character():
    for n in range(20):
        node_id = identity(n).node_id
        assert NODE_ID.match(node_id), node_id
        assert is_valid_node_id(node_id)


def test_node_id_is_the_base32_sha256_of_the_public_key_cut_to_sixteen():
    key = identity(1).public_key
    expected = base64.b32encode(hashlib.sha256(key).digest()).decode()[:16]
    assert node_id_from_key(key).replace("-", "")[:16] == expected


def test_the_zero_seed_identity_has_the_documented_node_id():
    # The test vector in docs/protocol.md ("Test vectors").
    ident = Identity.from_seed(bytes(32))
    assert ident.public_key.hex() == (
        "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29")
    assert ident.node_id == "COPD-SQHG-JNKJ-C4RA-4"


def test_any_single_changed_character_fails_the_check():
    node_id = identity(3).node_id
    raw = node_id.replace("-", "")
    for i, ch in enumerate(raw):
        for other in ALPHABET:
            if other == ch:
                continue
            changed = raw[:i] + other + raw[i + 1 :]
            assert not is_valid_node_id(changed), (i, other)


def test_swapping_two_adjacent_different_characters_fails_the_check():
    raw = identity(4).node_id.replace("-", "")
    for i in range(len(raw) - 1):
        if raw[i] != raw[i + 1]:
            swapped = raw[:i] + raw[i + 1] + raw[i] + raw[i + 2 :]
            assert not is_valid_node_id(swapped), i


def test_node_ids_are_accepted_without_dashes_and_in_lower_case():
    node_id = identity(5).node_id
    assert is_valid_node_id(node_id.replace("-", ""))
    assert is_valid_node_id(node_id.lower())


@pytest.mark.parametrize("text", ["", "ABCD", "ABCD-EFGH-IJKL-MNOP", "ABCD-EFGH-IJKL-MNOP-QR",
                                  "ABCD-EFGH-IJKL-MNO1-A", "ABCD-EFGH-IJKL-MNO0-A"])
def test_malformed_node_ids_are_invalid(text):
    assert not is_valid_node_id(text)


def test_node_id_refuses_a_key_that_is_not_32_bytes():
    with pytest.raises(ValueError):
        node_id_from_key(bytes(31))


def test_first_start_creates_the_key_file_readable_only_by_its_owner(tmp_path):
    state = tmp_path / "state"
    ident = load_or_create_identity(state)
    path = state / KEY_FILE
    assert path.exists()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(path.read_bytes()) == 32
    assert Identity.from_seed(path.read_bytes()).public_key == ident.public_key


def test_a_restart_reloads_the_same_key(tmp_path):
    first = load_or_create_identity(tmp_path)
    again = load_or_create_identity(tmp_path)
    assert again.public_key == first.public_key
    assert again.node_id == first.node_id
    # and the reloaded key signs for the same identity
    verify(first.public_key, b"msg", again.sign(b"msg"))


def test_two_state_dirs_get_different_keys(tmp_path):
    a = load_or_create_identity(tmp_path / "a")
    b = load_or_create_identity(tmp_path / "b")
    assert a.public_key != b.public_key


@pytest.mark.parametrize("content", [b"", b"x" * 31, b"x" * 33, b"x" * 64])
def test_a_corrupt_key_file_is_refused_not_replaced(tmp_path, content):
    (tmp_path / KEY_FILE).write_bytes(content)
    with pytest.raises(ValueError, match="corrupt key file"):
        load_or_create_identity(tmp_path)
    assert (tmp_path / KEY_FILE).read_bytes() == content  # the operator's file is left alone


def test_verify_raises_protocol_error_for_a_bad_signature():
    ident = identity(1)
    sig = ident.sign(b"hello")
    verify(ident.public_key, b"hello", sig)
    with pytest.raises(ProtocolError):
        verify(ident.public_key, b"hellO", sig)
    with pytest.raises(ProtocolError):
        verify(identity(2).public_key, b"hello", sig)
    with pytest.raises(ProtocolError):
        verify(ident.public_key, b"hello", sig[:63])
    with pytest.raises(ProtocolError):
        verify(bytes(32), b"hello", sig)  # not a valid curve point for this signature


def _luhn_mod32_as_documented(chars: str) -> str:
    # docs/protocol.md, "Node id": walk from the rightmost character leftwards, doubling
    # every other value starting with the rightmost; add quotient and remainder by 32.
    total = 0
    for i, ch in enumerate(reversed(chars)):
        v = ALPHABET.index(ch) * (2 if i % 2 == 0 else 1)
        total += v // 32 + v % 32
    return ALPHABET[(32 - total % 32) % 32]


def test_the_check_character_follows_the_documented_luhn_mod_32():
    for n in range(50):
        raw = identity(n).node_id.replace("-", "")
        assert raw[16] == _luhn_mod32_as_documented(raw[:16])
