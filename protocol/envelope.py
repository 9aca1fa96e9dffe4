"""Signed msgpack envelopes: the only thing that travels between nodes.

Frame on the wire (docs/protocol.md has the byte-level description)::

    frame    = msgpack array [payload: bin, signature: bin(64)]
    payload  = msgpack map {"v", "type", "from", "seq", "ts", "fed", "body"}
    signature = Ed25519(DOMAIN || SHA-256(payload))

Signing the SHA-256 of the payload rather than the payload itself keeps the signature
cost constant: Ed25519 hashes its message twice with SHA-512 (~0.23 GB/s here), while
one SHA-256 pass runs at ~2 GB/s. The domain prefix keeps these signatures from ever being
valid for anything else the key signs.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import ProtocolError
from .identity import Identity, verify
from .messages import DECODERS, Message

PROTOCOL_VERSION = 1
DOMAIN = b"fl-node/v1/envelope\x00"
DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024 * 1024
#: A message whose timestamp is further than this from the receiver's clock is stale.
DEFAULT_MAX_CLOCK_SKEW_MS = 5 * 60 * 1000


@dataclass(frozen=True)
class Envelope:
    """A verified, decoded message and its metadata."""

    version: int
    type: str
    sender: bytes
    seq: int
    ts_ms: int
    federation: str
    message: Message
    size: int


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} not allowed")


def _map_without_duplicates(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """Every map of a payload, at every level: refused if a key appears twice.

    msgpack-python keeps the last value of a repeated key and other decoders keep the
    first, so such a map would read as two different messages under one signature (a
    parser differential). Keys are str or bin here (``strict_map_key``), so hashable.
    """
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[Any] = set()
        for key, _ in pairs:
            if key in seen:
                raise ProtocolError(f"duplicate map key {key!r:.40}")
            seen.add(key)
    return result


#: Binary values at least this long are not copied while packing (see _pack_chunks).
_ZERO_COPY_MIN = 64 * 1024
#: Payloads at least this long are hashed on a second thread while copied or parsed.
_PARALLEL_HASH_MIN = 4 * 1024 * 1024


def _bin_header(n: int) -> bytes:
    if n < 256:
        return b"\xc4" + struct.pack(">B", n)
    if n < 65536:
        return b"\xc5" + struct.pack(">H", n)
    return b"\xc6" + struct.pack(">I", n)


def _container_header(n: int, fix: int, h16: int, h32: int) -> bytes:
    if n < 16:
        return bytes((fix | n,))
    if n < 65536:
        return bytes((h16,)) + struct.pack(">H", n)
    return bytes((h32,)) + struct.pack(">I", n)


def _pack_chunks(obj: Any, out: list[bytes | memoryview]) -> None:
    """Standard msgpack, emitted as chunks: large binaries are referenced, not copied.

    The concatenation of the chunks is ordinary msgpack (what ``msgpack.packb`` would
    write, up to the choice of header widths), so a receiver needs nothing special.
    """
    if isinstance(obj, dict):
        out.append(_container_header(len(obj), 0x80, 0xDE, 0xDF))
        for key, value in obj.items():
            _pack_chunks(key, out)
            _pack_chunks(value, out)
    elif isinstance(obj, list | tuple):
        out.append(_container_header(len(obj), 0x90, 0xDC, 0xDD))
        for value in obj:
            _pack_chunks(value, out)
    elif isinstance(obj, memoryview | bytes | bytearray) and len(obj) >= _ZERO_COPY_MIN:
        view = memoryview(obj).cast("B")
        out.append(_bin_header(view.nbytes))
        out.append(view)
    else:
        out.append(msgpack.packb(obj, use_bin_type=True, datetime=False))


class _Hasher:
    """SHA-256 of the concatenated chunks, on its own thread when the input is large.

    hashlib releases the GIL on large buffers, so the hash overlaps with the copy (encode)
    or the parse (decode) that the calling thread does meanwhile.
    """

    def __init__(self, chunks: list[bytes | memoryview], total: int) -> None:
        self._digest: bytes | None = None
        self._chunks = chunks
        self._thread: threading.Thread | None = None
        if total >= _PARALLEL_HASH_MIN:
            self._thread = threading.Thread(target=self._run, name="fl-hash", daemon=True)
            self._thread.start()
        else:
            self._run()

    def _run(self) -> None:
        h = hashlib.sha256()
        for c in self._chunks:
            h.update(c)
        self._digest = h.digest()

    def digest(self) -> bytes:
        if self._thread is not None:
            self._thread.join()
        assert self._digest is not None
        return self._digest


def encode(identity: Identity, message: Message, *, seq: int, ts_ms: int,
           federation: str) -> bytearray:
    """Pack, hash and sign ``message``; return the frame to send.

    Tensor data is copied exactly once, into the frame, while a second thread hashes it.
    """
    chunks: list[bytes | memoryview] = []
    _pack_chunks(
        {
            "v": PROTOCOL_VERSION,
            "type": message.TYPE,
            "from": identity.public_key,
            "seq": seq,
            "ts": ts_ms,
            "fed": federation,
            "body": message.to_body(),
        },
        chunks,
    )
    size = sum(len(c) if isinstance(c, bytes) else c.nbytes for c in chunks)
    hasher = _Hasher(chunks, size)
    # bytearray.join copies once into uninitialised memory; the signature placeholder is
    # overwritten in place when the hash is ready.
    frame = bytearray().join([b"\x92", _bin_header(size), *chunks, b"\xc4\x40", bytes(64)])
    frame[-64:] = identity.sign(DOMAIN + hasher.digest())
    return frame


def _unpack(data: bytes | memoryview, limit: int) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            object_pairs_hook=_map_without_duplicates,
            max_ext_len=0,
            max_bin_len=limit,
            max_str_len=min(limit, 1 << 20),
            max_array_len=1 << 20,
            max_map_len=1 << 16,
            timestamp=0,
            use_list=True,
        )
    except ProtocolError:
        raise
    except ValueError as exc:
        if "max_ext_len" in str(exc):  # max_ext_len=0 refuses every extension, -1 included
            raise ProtocolError("msgpack extension types are not allowed") from None
        raise ProtocolError(f"malformed msgpack (ValueError: {str(exc)[:80]})") from None
    except Exception as exc:  # msgpack raises many types; all mean "malformed"
        raise ProtocolError(f"malformed msgpack ({type(exc).__name__}: {str(exc)[:80]})") from None


def _split_frame(frame: memoryview) -> tuple[memoryview, bytes]:
    """The payload (zero copy) and signature of a frame ``[bin payload, bin(64) sig]``."""
    n = frame.nbytes
    if n < 4 or frame[0] != 0x92:
        raise ProtocolError("frame must be a msgpack array [payload, signature]")
    tag = frame[1]
    if tag == 0xC4:
        length, off = frame[2], 3
    elif tag == 0xC5 and n >= 4:
        length, off = struct.unpack_from(">H", frame, 2)[0], 4
    elif tag == 0xC6 and n >= 6:
        length, off = struct.unpack_from(">I", frame, 2)[0], 6
    else:
        raise ProtocolError("frame: payload must be msgpack binary")
    end = off + length
    if end + 66 != n or frame[end] != 0xC4 or frame[end + 1] != 64:
        raise ProtocolError("frame: bad length or signature field")
    return frame[off:end], bytes(frame[end + 2 :])


def announced_length(head: bytes | bytearray | memoryview) -> int | None:
    """The length of the frame that begins with ``head`` (its first 6 bytes suffice), as
    its msgpack headers announce it; None if ``head`` does not begin like a frame. Only a
    hint, to size a buffer before the rest arrives (node.peers.channel): ``decode`` checks
    the frame."""
    head = memoryview(head).cast("B")[:6]
    if head.nbytes < 6 or head[0] != 0x92:
        return None
    tag = head[1]
    if tag == 0xC4:
        length, off = head[2], 3
    elif tag == 0xC5:
        length, off = struct.unpack_from(">H", head, 2)[0], 4
    elif tag == 0xC6:
        length, off = struct.unpack_from(">I", head, 2)[0], 6
    else:
        return None
    return int(off + length + 66)


def decode(frame: bytes | bytearray | memoryview, *,
           max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Envelope:
    """Check size, signature, version, type and body of a frame; ProtocolError if bad.

    Freshness (sequence numbers, timestamps) is the ReplayGuard's job, applied after this.
    The payload is parsed (bounded, extension types refused) while it is hashed, but
    nothing in it is used before the signature has been checked.
    """
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise ProtocolError("frame must be binary")
    view = memoryview(frame).cast("B")
    if view.nbytes > max_size:
        raise ProtocolError(f"message of {view.nbytes} bytes exceeds the cap of {max_size}")
    payload, signature = _split_frame(view)
    hasher = _Hasher([payload], payload.nbytes)
    try:
        inner = _unpack(payload, max_size)
    finally:
        digest = hasher.digest()
    if not isinstance(inner, dict):
        raise ProtocolError("payload must be a map")
    sender = inner.get("from")
    if not isinstance(sender, bytes) or len(sender) != 32:
        raise ProtocolError("payload.from: expected a 32-byte public key")
    verify(sender, DOMAIN + digest, signature)
    if set(inner) != {"v", "type", "from", "seq", "ts", "fed", "body"}:
        raise ProtocolError("payload: bad fields")
    version, mtype, seq, ts, fed = (inner[k] for k in ("v", "type", "seq", "ts", "fed"))
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r:.20}")
    if not isinstance(mtype, str) or mtype not in DECODERS:
        raise ProtocolError(f"unknown message type {str(mtype)[:32]!r}")
    if type(seq) is not int or not 0 < seq < 2**63:
        raise ProtocolError("payload.seq: expected a positive integer")
    if type(ts) is not int or not 0 <= ts < 2**63:
        raise ProtocolError("payload.ts: expected milliseconds since the epoch")
    if not isinstance(fed, str) or len(fed) > 128:
        raise ProtocolError("payload.fed: expected a federation name")
    message = DECODERS[mtype](inner["body"])
    return Envelope(version, mtype, sender, seq, ts, fed, message, view.nbytes)


class ReplayGuard:
    """Drops replayed and stale (sender, seq) pairs, and stale timestamps.

    Per sender it keeps the highest sequence number seen and a bitmap of the ``window``
    numbers below it (like IPsec's anti-replay window), so messages relayed along
    different paths may arrive out of order without being lost, while any number seen
    before, or older than the window, is refused. At most ``max_senders`` are tracked
    (least recently heard forgotten first), so memory stays bounded.
    """

    def __init__(self, *, window: int = 1024, max_senders: int = 65536,
                 max_skew_ms: int = DEFAULT_MAX_CLOCK_SKEW_MS) -> None:
        self.window = window
        self.max_senders = max_senders
        self.max_skew_ms = max_skew_ms
        self._state: OrderedDict[bytes, tuple[int, int]] = OrderedDict()

    def check(self, env: Envelope, now_ms: int) -> None:
        """Accept ``env`` (and remember it) or raise ProtocolError."""
        if abs(env.ts_ms - now_ms) > self.max_skew_ms:
            raise ProtocolError(
                f"stale timestamp ({(env.ts_ms - now_ms) / 1000:+.0f} s from our clock)"
            )
        top, bits = self._state.get(env.sender, (0, 0))
        seq = env.seq
        if seq > top:
            shift = seq - top
            bits = ((bits << shift) | 1) & ((1 << self.window) - 1) if shift < self.window else 1
            top = seq
        else:
            offset = top - seq
            if offset >= self.window:
                raise ProtocolError(f"stale sequence number {seq} (latest {top})")
            if bits >> offset & 1:
                raise ProtocolError(f"replayed sequence number {seq}")
            bits |= 1 << offset
        self._state[env.sender] = (top, bits)
        self._state.move_to_end(env.sender)
        while len(self._state) > self.max_senders:
            self._state.popitem(last=False)

    def latest(self, sender: bytes) -> int:
        """Highest sequence number accepted from ``sender`` (0 if none)."""
        return self._state.get(sender, (0, 0))[0]
