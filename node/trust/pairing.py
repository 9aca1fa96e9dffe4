"""Pairing codes: a URI (shown as a QR code) that carries a node's full public key.

Pairing is how two nodes come to trust each other's keys (see ``node.trust.store``). Node A
issues a one-time token (``TokenBook.issue``) and shows a pairing code with its key, name,
federation, peer addresses and the token. Node B reads the code, trusts A's key, connects to
one of the addresses and presents the token; A redeems it (``TokenBook.redeem``) and trusts
B's key. The addresses are only hints: the handshake still proves possession of the key.

The pairing URI, version 1 (one line; every value percent-encoded with ``urllib.parse``)::

    fl-node://pair?v=1&key=KEY&name=NAME&fed=FEDERATION&addr=H1:P1,H2:P2&token=TOKEN&exp=EXP

- ``v``: format version, ``1``.
- ``key``: the 32-byte Ed25519 public key, base64url without padding (43 characters).
- ``name``: the node's name, ``fed``: its federation; both 1-64 letters, digits, ``.``,
  ``_``, ``-``, starting with a letter or digit (the rule of ``--name`` / ``--federation``).
- ``addr``: 1-8 comma-separated peer-port addresses ``HOST:PORT``: IPv4, a host name or an
  IPv6 address in brackets (``[fd00::1]:7700``); port 1-65535.
- ``token``: the one-time pairing token, 22-64 characters of ``A-Z a-z 0-9 - _``.
- ``exp``: when the code expires, unix seconds (integer). The issuing node enforces expiry
  too (its token expires at the same time), so a reader's clock only gives an early refusal.

Fields are required and may appear once; unknown fields are ignored, so later minor
additions stay readable by this version. The token is a credential: whoever holds an
unexpired, unused code can get their key trusted, so show codes only to the intended peer.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import qrcode
from qrcode.image.pil import PilImage

from node.common.files import atomic_write
from node.trust.store import decode_key, encode_key
from protocol.identity import PUBLIC_KEY_LEN, node_id_from_key

SCHEME = "fl-node"
URI_VERSION = "1"
MAX_URI_LEN = 2048
MAX_ADDRESSES = 8
DEFAULT_TTL_S = 600.0

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # same rule as node.config
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{22,64}$")
_EXP_RE = re.compile(r"^(0|[1-9][0-9]{0,11})$")
_ADDR_RE = re.compile(r"^(?P<host>\[[^\[\]]*\]|[^:\[\]]+):(?P<port>[0-9]{1,5})$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_FIELDS = ("v", "key", "name", "fed", "addr", "token", "exp")


class PairingError(ValueError):
    """A pairing code or token was refused; ``reason`` says why, in words for people."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _b64url(data: bytes) -> str:
    return encode_key(data)


def _key_from_b64url(text: str) -> bytes:
    try:
        return decode_key(text)
    except ValueError as exc:
        # "key is not ..." / "key has N bytes ..." -> "bad key: not ..." / "bad key: N bytes ..."
        detail = str(exc).removeprefix("key is ").removeprefix("key has ")
        raise PairingError(f"bad key: {detail}") from None


def split_address(address: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (IPv4, host name or ``[IPv6]``) into (host, port).

    The host comes back without brackets. Raises PairingError("bad address ...").
    """
    m = _ADDR_RE.fullmatch(address) if isinstance(address, str) else None
    if m is None:
        raise PairingError(f"bad address {address!r}: expected HOST:PORT (IPv6 in brackets)")
    host, port_text = m.group("host"), m.group("port")
    port = int(port_text)
    if not 1 <= port <= 65535 or port_text != str(port):
        raise PairingError(f"bad address {address!r}: port must be 1-65535")
    if host.startswith("["):
        inner = host[1:-1]
        try:
            if "%" in inner:
                raise ValueError
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise PairingError(f"bad address {address!r}: not an IPv6 address") from None
        return inner, port
    if all(ch.isdigit() or ch == "." for ch in host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise PairingError(f"bad address {address!r}: not an IPv4 address") from None
        return host, port
    if len(host) > 253 or not all(_LABEL_RE.fullmatch(label) for label in host.split(".")):
        raise PairingError(f"bad address {address!r}: not a valid host name")
    return host, port


@dataclass(frozen=True)
class PairingOffer:
    """What a pairing code carries. Constructing one validates every field (not expiry)."""

    public_key: bytes
    name: str
    federation: str
    addresses: tuple[str, ...]
    token: str
    expires_at: int

    def __post_init__(self) -> None:
        if not isinstance(self.public_key, (bytes, bytearray, memoryview)):
            raise PairingError("bad key: not bytes")
        object.__setattr__(self, "public_key", bytes(self.public_key))
        if len(self.public_key) != PUBLIC_KEY_LEN:
            raise PairingError(f"bad key: {len(self.public_key)} bytes, expected {PUBLIC_KEY_LEN}")
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise PairingError(f"bad name {self.name!r}: 1-64 letters, digits, '.', '_', '-',"
                               " starting with a letter or digit")
        if not isinstance(self.federation, str) or not _NAME_RE.fullmatch(self.federation):
            raise PairingError(f"bad federation name {self.federation!r}: 1-64 letters, digits,"
                               " '.', '_', '-', starting with a letter or digit")
        if isinstance(self.addresses, str) or not isinstance(self.addresses, (tuple, list)):
            raise PairingError("bad addresses: expected a sequence of HOST:PORT strings")
        object.__setattr__(self, "addresses", tuple(self.addresses))
        if not 1 <= len(self.addresses) <= MAX_ADDRESSES:
            raise PairingError(f"bad addresses: expected 1-{MAX_ADDRESSES},"
                               f" got {len(self.addresses)}")
        for address in self.addresses:
            split_address(address)
        if not isinstance(self.token, str) or not _TOKEN_RE.fullmatch(self.token):
            raise PairingError("bad token: expected 22-64 characters from A-Z a-z 0-9 - _")
        if (isinstance(self.expires_at, bool) or not isinstance(self.expires_at, int)
                or not 0 <= self.expires_at < 10**12):
            raise PairingError(f"bad expiry {self.expires_at!r}: expected unix seconds")

    @property
    def node_id(self) -> str:
        """The readable node id of the offering node."""
        return node_id_from_key(self.public_key)

    def is_expired(self, now: float | None = None) -> bool:
        """True once ``now`` (default: the clock) is past ``expires_at``."""
        return self.expires_at < (time.time() if now is None else now)

    def to_uri(self) -> str:
        """The ``fl-node://pair?...`` URI (format in the module docstring)."""
        query = urlencode(
            [("v", URI_VERSION), ("key", _b64url(self.public_key)), ("name", self.name),
             ("fed", self.federation), ("addr", ",".join(self.addresses)),
             ("token", self.token), ("exp", str(self.expires_at))],
            quote_via=quote, safe=":,",
        )
        return f"{SCHEME}://pair?{query}"

    @classmethod
    def from_uri(cls, uri: str, now: float | None = None, *,
                 check_expiry: bool = True) -> PairingOffer:
        """Parse a pairing URI strictly; raise PairingError saying what is wrong.

        Surrounding whitespace is ignored. With ``check_expiry`` an expired code (``exp``
        before ``now``, default the clock) is refused with "pairing code expired".
        """
        if not isinstance(uri, str):
            raise PairingError("not a pairing code: expected text")
        uri = uri.strip()
        if len(uri) > MAX_URI_LEN:
            raise PairingError(f"pairing code too long ({len(uri)} characters,"
                               f" at most {MAX_URI_LEN})")
        try:
            parts = urlsplit(uri)
        except ValueError as exc:
            raise PairingError(f"not a pairing code: {exc}") from None
        if parts.scheme != SCHEME:
            raise PairingError(f"not a pairing code: scheme {parts.scheme or '(none)'!r},"
                               f" expected {SCHEME!r}")
        if parts.netloc != "pair" or parts.path not in ("", "/") or parts.fragment:
            raise PairingError(f"not a pairing code: expected {SCHEME}://pair?...")
        try:
            pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True,
                              errors="strict", max_num_fields=32)
        except ValueError as exc:
            raise PairingError(f"malformed pairing code: {exc}") from None
        fields: dict[str, str] = {}
        for key, value in pairs:
            if key in fields:
                raise PairingError(f"duplicate field {key!r}")
            fields[key] = value
        if "v" not in fields:
            raise PairingError("missing field 'v'")
        if fields["v"] != URI_VERSION:
            raise PairingError(f"unsupported pairing code version {fields['v']!r}"
                               f" (this node reads version {URI_VERSION})")
        for name in _FIELDS:
            if name not in fields:
                raise PairingError(f"missing field {name!r}")
        if not _EXP_RE.fullmatch(fields["exp"]):
            raise PairingError(f"bad expiry {fields['exp']!r}: expected unix seconds")
        offer = cls(
            public_key=_key_from_b64url(fields["key"]),
            name=fields["name"],
            federation=fields["fed"],
            addresses=tuple(fields["addr"].split(",")) if fields["addr"] else (),
            token=fields["token"],
            expires_at=int(fields["exp"]),
        )
        if check_expiry and offer.is_expired(now):
            raise PairingError("pairing code expired")
        return offer


def _qr(uri: str, border: int, box_size: int = 10) -> qrcode.QRCode:
    if not isinstance(uri, str) or not uri:
        raise ValueError("a QR code needs non-empty text")
    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M,
                       box_size=box_size, border=border)
    qr.add_data(uri)
    qr.make(fit=True)
    return qr


def qr_matrix(uri: str, border: int = 2) -> list[list[bool]]:
    """The QR code's modules (True = dark), including a ``border`` of light modules."""
    return [[bool(m) for m in row] for row in _qr(uri, border).get_matrix()]


_HALF_BLOCKS = {(False, False): " ", (True, False): "\u2580", (False, True): "\u2584",
                (True, True): "\u2588"}


def qr_text(uri: str, *, invert: bool = True, border: int = 2) -> str:
    """The QR code for a terminal, two modules per character row (Unicode half blocks).

    With ``invert`` (default) light modules are drawn and dark ones left blank, which is
    right for light text on a dark background (most terminals); use ``invert=False`` on a
    light background. The result has ``ceil(n / 2)`` lines of ``n`` characters, ``n`` being
    the matrix size with its border, and no trailing newline.
    """
    matrix = qr_matrix(uri, border)
    drawn = [[(not m) if invert else m for m in row] for row in matrix]
    blank = [False] * len(matrix)
    lines = []
    for r in range(0, len(drawn), 2):
        top, bottom = drawn[r], drawn[r + 1] if r + 1 < len(drawn) else blank
        lines.append("".join(_HALF_BLOCKS[(t, b)] for t, b in zip(top, bottom, strict=True)))
    return "\n".join(lines)


def qr_png(uri: str, path: str | Path, *, box_size: int = 8, border: int = 4) -> Path:
    """Write the QR code as a PNG (mode 0600: it holds a pairing token); return the path."""
    img = _qr(uri, border, box_size).make_image(image_factory=PilImage)
    buf = io.BytesIO()
    img.save(buf)
    target = Path(path)
    atomic_write(target, buf.getvalue())
    return target


@dataclass(frozen=True)
class _Slot:
    expires_at: int
    used: bool = False


class TokenBook:
    """One-time pairing tokens, kept in memory only (thread-safe).

    A restarted node forgets the tokens it issued: codes shown before the restart stop
    working and must be issued again. Tokens are stored by SHA-256 hash and looked up by
    hash, so lookups do not leak the tokens by timing. At most ``MAX_LIVE`` unused,
    unexpired tokens exist: issuing one more evicts the oldest (it becomes unknown). Used
    and expired tokens are remembered for ``RETAIN_S`` seconds past their expiry, so that
    redeeming one says why it is refused, then forgotten (then it is "unknown").
    """

    MAX_LIVE = 64
    MAX_RECORDS = 256
    RETAIN_S = 3600.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[bytes, _Slot] = {}  # in issue order

    @staticmethod
    def _hash(token: str) -> bytes:
        return hashlib.sha256(token.encode("ascii")).digest()

    def _purge(self, now: float) -> None:
        for h, slot in list(self._slots.items()):
            if now > slot.expires_at + self.RETAIN_S:
                del self._slots[h]

    def _live(self, now: float) -> list[bytes]:
        return [h for h, s in self._slots.items() if not s.used and now <= s.expires_at]

    def issue(self, ttl_s: float = DEFAULT_TTL_S, now: float | None = None) -> tuple[str, int]:
        """A new token and when it expires (unix seconds, ``now + ttl_s`` rounded up)."""
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) \
                or not math.isfinite(ttl_s) or ttl_s <= 0:
            raise ValueError(f"pairing token ttl {ttl_s!r}: must be a positive number of seconds")
        now = time.time() if now is None else now
        with self._lock:
            self._purge(now)
            live = self._live(now)
            while len(live) >= self.MAX_LIVE:
                del self._slots[live.pop(0)]
            live_set = set(live)
            dead = [h for h in self._slots if h not in live_set]
            while len(self._slots) >= self.MAX_RECORDS and dead:
                del self._slots[dead.pop(0)]
            token = secrets.token_urlsafe(16)
            expires_at = math.ceil(now + ttl_s)
            self._slots[self._hash(token)] = _Slot(expires_at)
            return token, expires_at

    def redeem(self, token: str, now: float | None = None) -> None:
        """Use ``token`` up; raise PairingError if it is unknown, used or expired."""
        if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
            raise PairingError("unknown pairing token")
        now = time.time() if now is None else now
        h = self._hash(token)
        with self._lock:
            self._purge(now)
            slot = self._slots.get(h)
            if slot is None:
                raise PairingError("unknown pairing token")
            if slot.used:
                raise PairingError("pairing token already used")
            if now > slot.expires_at:
                raise PairingError("pairing token expired")
            self._slots[h] = replace(slot, used=True)

    def live_count(self, now: float | None = None) -> int:
        """How many tokens could still be redeemed at ``now``."""
        now = time.time() if now is None else now
        with self._lock:
            return len(self._live(now))


def make_offer(book: TokenBook, public_key: bytes, name: str, federation: str,
               addresses: tuple[str, ...] | list[str], ttl_s: float = DEFAULT_TTL_S,
               now: float | None = None) -> PairingOffer:
    """Issue a token from ``book`` and return the offer that carries it.

    The fields are checked before a token is issued, so a bad offer wastes no token.
    """
    draft = PairingOffer(public_key, name, federation, tuple(addresses), "A" * 22, 0)
    token, expires_at = book.issue(ttl_s, now)
    return replace(draft, token=token, expires_at=expires_at)
