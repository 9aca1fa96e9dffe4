"""Pairing codes (node/pairing.py): URI round trips, strict parsing, QR output, one-time tokens."""

from __future__ import annotations

import base64
import io
import stat
from dataclasses import replace
from urllib.parse import quote

import pytest
from PIL import Image

from node.trust.pairing import (
    PairingError,
    PairingOffer,
    TokenBook,
    make_offer,
    qr_matrix,
    qr_png,
    qr_text,
    split_address,
)
from protocol.identity import Identity, node_id_from_key

NOW = 1_700_000_000
KEY = Identity.from_seed(bytes(range(32))).public_key
TOKEN = "AbCdEfGhIjKlMnOpQrStUv"  # 22 url-safe characters, like secrets.token_urlsafe(16)
B64KEY = base64.urlsafe_b64encode(KEY).rstrip(b"=").decode()


def offer(**changes: object) -> PairingOffer:
    fields: dict[str, object] = {
        "public_key": KEY, "name": "alice", "federation": "lab",
        "addresses": ("192.168.1.20:7700", "[fd00::1]:7700", "alice-pc.local:7701"),
        "token": TOKEN, "expires_at": NOW + 600,
    }
    fields.update(changes)
    return PairingOffer(**fields)  # type: ignore[arg-type]


def uri_with(**fields: str | None) -> str:
    """A pairing URI built by hand, with fields replaced (None drops the field)."""
    base = {"v": "1", "key": B64KEY, "name": "alice", "fed": "lab",
            "addr": "10.0.0.1:7700", "token": TOKEN, "exp": str(NOW + 600)}
    base.update(fields)
    return "fl-node://pair?" + "&".join(f"{k}={v}" for k, v in base.items() if v is not None)


def reason(uri: str, **kwargs: object) -> str:
    with pytest.raises(PairingError) as info:
        PairingOffer.from_uri(uri, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert str(info.value) == info.value.reason
    return info.value.reason


# --- URI round trips ---------------------------------------------------------------------


def test_uri_has_the_documented_shape():
    uri = offer().to_uri()
    assert uri == (
        f"fl-node://pair?v=1&key={B64KEY}&name=alice&fed=lab"
        "&addr=192.168.1.20:7700,%5Bfd00::1%5D:7700,alice-pc.local:7701"
        f"&token={TOKEN}&exp={NOW + 600}"
    )
    assert len(B64KEY) == 43 and "=" not in uri.split("key=")[1].split("&")[0]


@pytest.mark.parametrize("changes", [
    {},
    {"addresses": ("10.0.0.1:1",)},
    {"addresses": ("[::1]:65535", "h:2", "a.b-c_d.example:3")},
    {"name": "n" * 64, "federation": "F.e_d-1"},
    {"token": "-_" * 32, "expires_at": 0},
    {"public_key": b"\xff" * 32},
])
def test_offer_round_trips_through_its_uri(changes):
    original = offer(**changes)
    parsed = PairingOffer.from_uri(original.to_uri(), now=0)
    assert parsed == original
    assert parsed.node_id == node_id_from_key(original.public_key)


def test_from_uri_tolerates_surrounding_whitespace_and_percent_encoded_values():
    uri = uri_with(name=quote("alice"), addr=quote("10.0.0.1:7700,[::1]:7700", safe=""))
    parsed = PairingOffer.from_uri(f"  {uri}\n", now=NOW)
    assert parsed.addresses == ("10.0.0.1:7700", "[::1]:7700")


def test_unknown_fields_are_ignored():
    assert PairingOffer.from_uri(uri_with() + "&hint=later", now=NOW).name == "alice"


def test_offer_accepts_a_list_of_addresses_and_stores_a_tuple():
    assert offer(addresses=["h:1", "h:2"]).addresses == ("h:1", "h:2")


# --- every refusal ------------------------------------------------------------------------


@pytest.mark.parametrize("uri, words", [
    ("https://pair?v=1", "not a pairing code: scheme 'https'"),
    ("pair?v=1", "not a pairing code: scheme '(none)'"),
    ("fl-node://other?v=1", "not a pairing code: expected fl-node://pair?"),
    ("fl-node://pair/extra?v=1", "not a pairing code"),
    (uri_with() + "#frag", "not a pairing code"),
    ("fl-node://pair?v=1&key", "malformed pairing code"),
    (uri_with() + "&key=" + B64KEY, "duplicate field 'key'"),
    (uri_with(v=None), "missing field 'v'"),
    (uri_with(v="2"), "unsupported pairing code version '2'"),
    (uri_with(v=""), "unsupported pairing code version ''"),
    (uri_with(key=None), "missing field 'key'"),
    (uri_with(name=None), "missing field 'name'"),
    (uri_with(fed=None), "missing field 'fed'"),
    (uri_with(addr=None), "missing field 'addr'"),
    (uri_with(token=None), "missing field 'token'"),
    (uri_with(exp=None), "missing field 'exp'"),
    (uri_with(key=B64KEY[:-1]), "bad key: 31 bytes, expected 32"),
    (uri_with(key=B64KEY + "AAAA"), "bad key: 35 bytes, expected 32"),
    (uri_with(key=B64KEY + "="), "bad key: not base64url"),
    (uri_with(key="a+b/" * 10 + "abc"), "bad key: not base64url"),
    (uri_with(key="A"), "bad key: not valid base64url"),
    (uri_with(key=B64KEY[:-1] + "B"), "bad key: not canonical base64url"),
    (uri_with(key=""), "bad key"),
    (uri_with(addr="10.0.0.1:0"), "bad address '10.0.0.1:0': port must be 1-65535"),
    (uri_with(addr="10.0.0.1:65536"), "port must be 1-65535"),
    (uri_with(addr="10.0.0.1:99999"), "port must be 1-65535"),
    (uri_with(addr="10.0.0.1:0080"), "port must be 1-65535"),
    (uri_with(addr="10.0.0.1"), "bad address '10.0.0.1': expected HOST:PORT"),
    (uri_with(addr="10.0.0.1:"), "expected HOST:PORT"),
    (uri_with(addr="::1:7700"), "expected HOST:PORT (IPv6 in brackets)"),
    (uri_with(addr="[zz::1]:7700"), "not an IPv6 address"),
    (uri_with(addr=quote("[fe80::1%eth0]:7700")), "not an IPv6 address"),
    (uri_with(addr="300.1.2.3:7700"), "not an IPv4 address"),
    (uri_with(addr="-bad.example:7700"), "not a valid host name"),
    (uri_with(addr="a..b:7700"), "not a valid host name"),
    (uri_with(addr="h:1,,h:2"), "bad address ''"),
    (uri_with(addr=""), "bad addresses: expected 1-8, got 0"),
    (uri_with(addr=",".join(f"h:{p}" for p in range(1, 10))), "expected 1-8, got 9"),
    (uri_with(fed="-lab"), "bad federation name '-lab'"),
    (uri_with(fed="l" * 65), "bad federation name"),
    (uri_with(fed="my+lab"), "bad federation name 'my lab'"),
    (uri_with(fed=""), "bad federation name ''"),
    (uri_with(name="a/b"), "bad name 'a/b'"),
    (uri_with(name=quote("\x1b[31m")), "bad name"),
    (uri_with(token="short"), "bad token: expected 22-64 characters"),
    (uri_with(token="A" * 65), "bad token"),
    (uri_with(token=quote("AbCdEfGhIjKlMnOpQrStU=")), "bad token"),
    (uri_with(name="alice%0A"), "bad name 'alice\\n'"),
    (uri_with(fed="lab%0A"), "bad federation name"),
    (uri_with(token=TOKEN + "%0A"), "bad token"),
    (uri_with(exp="5%0A"), "bad expiry"),
    (uri_with(addr="h:1%0A"), "bad address"),
    (uri_with(key=B64KEY + "%0A"), "bad key"),
    (uri_with(exp="soon"), "bad expiry 'soon'"),
    (uri_with(exp="-1"), "bad expiry '-1'"),
    (uri_with(exp="1.5"), "bad expiry"),
    (uri_with(exp="1" * 13), "bad expiry"),
    ("fl-node://pair?" + "&".join(f"x{i}=1" for i in range(40)), "malformed pairing code"),
    ("fl-node://pair?v=1&pad=" + "x" * 3000, "pairing code too long"),
])
def test_bad_codes_are_refused_with_a_clear_reason(uri, words):
    assert words in reason(uri, now=NOW)


def test_non_text_is_refused():
    assert reason(b"fl-node://pair?v=1", now=NOW).startswith("not a pairing code")


def test_expired_code_is_refused_and_the_last_second_is_still_valid():
    assert PairingOffer.from_uri(uri_with(exp=str(NOW)), now=NOW).expires_at == NOW
    assert reason(uri_with(exp=str(NOW)), now=NOW + 0.5) == "pairing code expired"
    assert reason(uri_with(exp=str(NOW - 1)), now=NOW) == "pairing code expired"


def test_expiry_check_can_be_skipped_and_defaults_to_the_clock():
    old = uri_with(exp="1000")
    assert PairingOffer.from_uri(old, now=NOW, check_expiry=False).expires_at == 1000
    assert reason(old) == "pairing code expired"  # now=None: the real clock, long past 1000
    assert offer(expires_at=1000).is_expired() and not offer().is_expired(now=NOW)


@pytest.mark.parametrize("changes, words", [
    ({"public_key": KEY[:31]}, "bad key: 31 bytes"),
    ({"public_key": "text"}, "bad key: not bytes"),
    ({"name": ""}, "bad name"),
    ({"federation": "a b"}, "bad federation name"),
    ({"addresses": "h:1"}, "bad addresses"),
    ({"addresses": ()}, "bad addresses"),
    ({"addresses": ("h:0",)}, "bad address 'h:0'"),
    ({"token": "x" * 21}, "bad token"),
    ({"expires_at": 1.5}, "bad expiry"),
    ({"expires_at": True}, "bad expiry"),
    ({"expires_at": -1}, "bad expiry"),
])
def test_offers_validate_their_fields_when_built(changes, words):
    with pytest.raises(PairingError, match=words):
        offer(**changes)


def test_split_address():
    assert split_address("10.0.0.1:7700") == ("10.0.0.1", 7700)
    assert split_address("[fd00::1]:1") == ("fd00::1", 1)
    assert split_address("node-a:65535") == ("node-a", 65535)
    with pytest.raises(PairingError, match="bad address"):
        split_address("node-a")


# --- QR output ----------------------------------------------------------------------------

_BITS = {" ": (False, False), "\u2580": (True, False), "\u2584": (False, True),
         "\u2588": (True, True)}


def decode_text(text: str, invert: bool) -> list[list[bool]]:
    """Turn half-block text back into the module matrix (True = dark)."""
    rows: list[list[bool]] = []
    for line in text.split("\n"):
        pairs = [_BITS[ch] for ch in line]
        rows.append([t != invert for t, _ in pairs])
        rows.append([b != invert for _, b in pairs])
    return rows


@pytest.mark.parametrize("invert", [True, False])
def test_qr_text_is_exactly_the_matrix_two_rows_per_line(invert):
    uri = offer().to_uri()
    matrix = qr_matrix(uri)
    n = len(matrix)
    text = qr_text(uri, invert=invert)
    lines = text.split("\n")
    assert len(lines) == (n + 1) // 2 and all(len(line) == n for line in lines)
    assert set(text) <= set(_BITS) | {"\n"} and not text.endswith("\n")
    decoded = decode_text(text, invert)
    assert decoded[:n] == matrix
    assert all(m is invert for m in decoded[n])  # odd size: the extra half row is blank


def test_qr_matrix_has_a_light_border_and_finder_patterns():
    matrix = qr_matrix(offer().to_uri(), border=2)
    n = len(matrix)
    assert all(len(row) == n for row in matrix) and (n - 4 - 17) % 4 == 0
    for i in range(n):
        for j in (0, 1, n - 2, n - 1):
            assert not matrix[i][j] and not matrix[j][i]
    finder = [row[2:9] for row in matrix[2:9]]
    assert finder[0] == [True] * 7 and finder[3] == [True, False, True, True, True, False, True]


def test_qr_text_is_deterministic_and_fits_a_terminal():
    uri = offer().to_uri()
    assert qr_text(uri) == qr_text(uri)
    assert qr_text(uri) != qr_text(offer(token="Z" * 22).to_uri())
    assert max(len(line) for line in qr_text(uri).split("\n")) <= 80


def test_qr_refuses_empty_text():
    with pytest.raises(ValueError):
        qr_text("")


def test_qr_png_writes_a_valid_png(tmp_path):
    uri = offer().to_uri()
    path = qr_png(uri, tmp_path / "pair.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 100
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.format == "PNG"
        n = len(qr_matrix(uri, border=4))
        assert img.size == (n * 8, n * 8)
        # module (4, 4) is the dark corner of the top-left finder pattern, (0, 0) the quiet zone
        gray = img.convert("L")
        assert gray.getpixel((4 * 8 + 4, 4 * 8 + 4)) == 0
        assert gray.getpixel((4, 4)) == 255


# --- one-time tokens ----------------------------------------------------------------------


def test_token_is_redeemed_once():
    book = TokenBook()
    token, expires_at = book.issue(600, now=NOW)
    assert expires_at == NOW + 600 and 22 <= len(token) <= 64
    book.redeem(token, now=NOW + 1)
    with pytest.raises(PairingError, match="^pairing token already used$"):
        book.redeem(token, now=NOW + 2)


def test_tokens_are_random_and_fit_a_pairing_offer():
    book = TokenBook()
    tokens = {book.issue(now=NOW)[0] for _ in range(20)}
    assert len(tokens) == 20
    for token in tokens:
        assert offer(token=token).token == token


def test_expired_token_is_refused_and_the_last_second_is_valid():
    book = TokenBook()
    late, _ = book.issue(10, now=NOW)
    on_time, _ = book.issue(10, now=NOW)
    book.redeem(on_time, now=NOW + 10)
    with pytest.raises(PairingError, match="^pairing token expired$"):
        book.redeem(late, now=NOW + 10.5)


def test_fractional_expiry_is_rounded_up():
    assert TokenBook().issue(0.2, now=NOW + 0.5)[1] == NOW + 1


@pytest.mark.parametrize("bad", ["", "nope", "A" * 22, "A" * 22 + "\n", "A" * 100, "ü" * 22, None, 42])
def test_unknown_token_is_refused(bad):
    book = TokenBook()
    book.issue(now=NOW)
    with pytest.raises(PairingError, match="^unknown pairing token$"):
        book.redeem(bad, now=NOW)  # type: ignore[arg-type]


def test_used_and_expired_tokens_are_forgotten_after_the_retention():
    book = TokenBook()
    used, exp = book.issue(10, now=NOW)
    book.redeem(used, now=NOW)
    late, _ = book.issue(10, now=NOW)
    later = exp + TokenBook.RETAIN_S + 1
    for token in (used, late):
        with pytest.raises(PairingError, match="^unknown pairing token$"):
            book.redeem(token, now=later)


def test_at_most_64_live_tokens_the_oldest_is_evicted():
    book = TokenBook()
    tokens = [book.issue(600, now=NOW + i)[0] for i in range(TokenBook.MAX_LIVE + 3)]
    assert book.live_count(now=NOW + 70) == TokenBook.MAX_LIVE
    for evicted in tokens[:3]:
        with pytest.raises(PairingError, match="^unknown pairing token$"):
            book.redeem(evicted, now=NOW + 70)
    for kept in tokens[3:]:
        book.redeem(kept, now=NOW + 70)
    assert book.live_count(now=NOW + 70) == 0


def test_records_stay_bounded():
    book = TokenBook()
    for i in range(1000):
        token, _ = book.issue(5, now=NOW + i)
        if i % 2:
            book.redeem(token, now=NOW + i)
    assert len(book._slots) <= TokenBook.MAX_RECORDS
    assert book.live_count(now=NOW + 999) <= TokenBook.MAX_LIVE


def test_expired_tokens_do_not_count_as_live():
    book = TokenBook()
    book.issue(10, now=NOW)
    assert book.live_count(now=NOW + 10) == 1
    assert book.live_count(now=NOW + 11) == 0


@pytest.mark.parametrize("ttl", [0, -1, float("inf"), float("nan"), True])
def test_issue_refuses_a_bad_ttl(ttl):
    with pytest.raises(ValueError, match="ttl"):
        TokenBook().issue(ttl, now=NOW)


def test_make_offer_issues_a_redeemable_token():
    book = TokenBook()
    made = make_offer(book, KEY, "alice", "lab", ["10.0.0.1:7700"], ttl_s=300, now=NOW)
    assert made.expires_at == NOW + 300 and made.addresses == ("10.0.0.1:7700",)
    assert PairingOffer.from_uri(made.to_uri(), now=NOW) == made
    book.redeem(made.token, now=NOW + 299)
    with pytest.raises(PairingError, match="bad federation"):
        make_offer(book, KEY, "alice", "bad fed", ["h:1"], now=NOW)
    assert book.live_count(now=NOW) == 0  # a refused offer wasted no token
    assert replace(made, name="bob").name == "bob"
