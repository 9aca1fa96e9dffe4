"""Link encryption (issue 13): the key agreement and the record layer.

Every peer link runs it (node.peers.channel); docs/protocol.md section 1.1 describes it
byte for byte. The design, SIGMA-style over the existing signed hellos:

* each side of a link makes a fresh X25519 key pair (``Ephemeral``) and sends its public
  half; the dialer first, in the clear, the acceptor's with its encrypted hello;
* both derive two directional keys with libsodium's ``crypto_kx`` (the dialer is the
  client): ``rx || tx = BLAKE2b-512(X25519(e, E_peer) || E_dialer || E_acceptor)``;
* each hello carries its own ephemeral key as ``nonce`` and the peer's as ``echo`` and is
  signed by the node's Ed25519 identity: the signature binds the identity to both
  ephemeral keys, so a man in the middle that substitutes its own key is caught (the echo
  differs, or the signature does not verify);
* every record after the dialer's key is XChaCha20-Poly1305 (IETF) under the direction's
  key, with an implicit counter nonce (``Sealer`` / ``Opener``): a replayed, reordered,
  dropped or altered record fails to open. The key is replaced every ``REKEY_RECORDS``
  records by ``BLAKE2b-256(key = old key, "fl-node/v2/rekey")``, and the old one dropped.

Forward secrecy: the ephemeral secret keys live only in the ``Ephemeral`` object, which
the handshake drops when the keys are derived (Python cannot promise the bytes are
overwritten; nothing refers to them after).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nacl.bindings as sodium

# pynacl's own cffi binding of libsodium (what nacl.bindings calls): ``seal_into`` and
# ``open_into`` call it directly to write records and plaintexts in place, where the
# nacl.bindings functions allocate, zero and copy a buffer per call. cffi releases the GIL
# for the call, so several threads seal or open at once.
from nacl._sodium import ffi, lib  # type: ignore[import-not-found]  # compiled, no stub
from nacl.exceptions import CryptoError

from protocol.errors import ProtocolError

KEY_BYTES = sodium.crypto_kx_SESSION_KEY_BYTES  # 32
PUBLIC_BYTES = sodium.crypto_kx_PUBLIC_KEY_BYTES  # 32
TAG_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES  # 16
NONCE_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # 24
#: Records under one key before both sides move to the next.
REKEY_RECORDS = 1 << 20
REKEY_CONTEXT = b"fl-node/v2/rekey"


@dataclass
class Ephemeral:
    """One link's X25519 key pair."""

    public: bytes
    secret: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> Ephemeral:
        public, secret = sodium.crypto_kx_keypair()
        return cls(public, secret)

    @classmethod
    def from_seed(cls, seed: bytes) -> Ephemeral:
        """A key pair from 32 bytes (test vectors only: links use ``generate``)."""
        public, secret = sodium.crypto_kx_seed_keypair(seed)
        return cls(public, secret)


def session_keys(ours: Ephemeral, theirs: bytes, *, dialer: bool) -> tuple[bytes, bytes]:
    """``(send key, receive key)`` of one side of a link; ProtocolError if ``theirs`` is
    not a usable X25519 public key (libsodium refuses low-order points)."""
    if len(theirs) != PUBLIC_BYTES:
        raise ProtocolError(f"ephemeral key of {len(theirs)} bytes (32 expected)")
    try:
        if dialer:
            rx, tx = sodium.crypto_kx_client_session_keys(ours.public, ours.secret, theirs)
        else:
            rx, tx = sodium.crypto_kx_server_session_keys(ours.public, ours.secret, theirs)
    except (CryptoError, ValueError, TypeError):
        raise ProtocolError("unusable ephemeral key") from None
    return tx, rx


def next_key(key: bytes) -> bytes:
    """The key that follows ``key`` after ``REKEY_RECORDS`` records."""
    new: bytes = sodium.crypto_generichash_blake2b_salt_personal(
        REKEY_CONTEXT, digest_size=KEY_BYTES, key=key)
    return new


def _nonce(counter: int) -> bytes:
    return bytes(NONCE_BYTES - 8) + counter.to_bytes(8, "big")


class _Direction:
    """One direction's key and record counter (the nonce is the count within a key)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("a record key is 32 bytes")
        self._key = key
        self._counter = 0
        #: Records sealed or opened under all keys of this direction.
        self.records = 0

    def reserve(self) -> tuple[int, bytes, bytes]:
        """Take the next record: its number, key and nonce, for ``seal_into`` or
        ``open_into`` to use on any thread (records taken one after the other get the
        keys and nonces that ``seal`` or ``open`` would have used, rekeys included)."""
        taken = (self.records, self._key, _nonce(self._counter))
        self._advance()
        return taken

    def _advance(self) -> None:
        self._counter += 1
        self.records += 1
        if self._counter == REKEY_RECORDS:
            self._key = next_key(self._key)
            self._counter = 0


class Sealer(_Direction):
    """Encrypts the records one side sends, in order."""

    def seal(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        record: bytes = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
            bytes(plaintext), None, _nonce(self._counter), self._key)
        self._advance()
        return record


class Opener(_Direction):
    """Decrypts the records one side receives; any failure is final (the link closes)."""

    def open(self, record: bytes | bytearray) -> bytes:
        _check_length(record)
        try:
            plaintext: bytes = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                bytes(record), None, _nonce(self._counter), self._key)
        except CryptoError:
            raise ProtocolError(_unreadable(self.records)) from None
        self._advance()
        return plaintext

    def peek(self, record: bytes | bytearray) -> int:
        """The first plaintext byte of ``record`` if it is the next record, *not
        authenticated*: a hint of what it holds (a piece's flag), to choose how to open it;
        ``open`` or ``open_into`` still decide. The record stays the next one.

        The cipher is a stream: the first byte is the first ciphertext byte XOR the first
        key stream byte, which is what sealing a single zero byte under the same key and
        nonce yields (a few microseconds, whatever the record's length)."""
        if not record:
            return -1
        stream = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
            b"\x00", None, _nonce(self._counter), self._key)
        return record[0] ^ stream[0]


def seal_into(record: bytearray | memoryview, key: bytes, nonce: bytes) -> None:
    """Seal ``record`` in place: it holds the plaintext and then ``TAG_BYTES`` spare bytes,
    and ends up as the record ``Sealer.seal`` makes of that plaintext under ``key`` and
    ``nonce`` (from ``Sealer.reserve``). Any thread; the GIL is released while it runs."""
    size = memoryview(record).nbytes - TAG_BYTES
    if size < 0 or len(key) != KEY_BYTES or len(nonce) != NONCE_BYTES:
        raise ValueError("seal_into: a record buffer, a 32-byte key and a 24-byte nonce")
    buf = ffi.from_buffer("unsigned char[]", record, require_writable=True)
    if lib.crypto_aead_xchacha20poly1305_ietf_encrypt(buf, ffi.NULL, buf, size, ffi.NULL, 0,
                                                      ffi.NULL, nonce, key) != 0:
        raise RuntimeError("crypto_aead_xchacha20poly1305_ietf_encrypt failed")


def open_into(out: bytearray, at: int, record: bytes | bytearray,
              taken: tuple[int, bytes, bytes]) -> None:
    """Open ``record`` into ``out[at:at + len(record) - TAG_BYTES]`` with the number, key
    and nonce ``Opener.reserve`` took for it; ProtocolError as ``Opener.open`` raises it
    (the same reasons). Any thread; the GIL is released while it runs. On failure the
    bytes of ``out`` it would have written are undefined."""
    _check_length(record)
    number, key, nonce = taken
    size = len(record) - TAG_BYTES
    if not 0 <= at <= len(out) - size or len(key) != KEY_BYTES or len(nonce) != NONCE_BYTES:
        raise ValueError("open_into: the plaintext must fit in out; a 32-byte key, a 24-byte"
                         " nonce")
    buf = ffi.from_buffer("unsigned char[]", out, require_writable=True)
    sealed = ffi.from_buffer("unsigned char[]", record)
    if lib.crypto_aead_xchacha20poly1305_ietf_decrypt(buf + at, ffi.NULL, ffi.NULL, sealed,
                                                      len(record), ffi.NULL, 0, nonce,
                                                      key) != 0:
        raise ProtocolError(_unreadable(number))


def _check_length(record: bytes | bytearray) -> None:
    if len(record) < TAG_BYTES:
        raise ProtocolError(f"record of {len(record)} bytes (at least 16 expected)")


def _unreadable(number: int) -> str:
    return (f"record {number} does not authenticate (altered, replayed, reordered or from"
            " another link)")
