"""Every kind of bad input, sent over a real link to a running node: each is rejected with
a logged reason, and the node goes on training."""

from __future__ import annotations

import asyncio
import hashlib
import time

import aiohttp
import msgpack
import pytest

from node.peers.channel import open_dialer
from node.peers.transport import LINK_PATH
from protocol.envelope import DOMAIN, encode
from protocol.gossip import federation_key, federation_proof
from protocol.identity import Identity
from protocol.messages import Heartbeat, Hello, Update
from protocol.tensors import Tensor

from .cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

CAP = 200_000
SECRET = "e2e test federation secret"  # a member gone rogue knows it


class Raw(bytes):
    """One record sealed as it is, not split into pieces (before the handshake: one
    WebSocket message as it is)."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def signed(ident: Identity, payload: object) -> bytes:
    """Sign any payload exactly as protocol.envelope does, so only the check under test
    can reject it."""
    packed = msgpack.packb(payload, use_bin_type=True)
    sig = ident.sign(DOMAIN + hashlib.sha256(packed).digest())
    return msgpack.packb([packed, sig], use_bin_type=True)


def payload(ident: Identity, seq: int, mtype: str, body: object, **over) -> dict:
    p = {"v": 1, "type": mtype, "from": ident.public_key, "seq": seq, "ts": now_ms(),
         "fed": "default", "body": body}
    p.update(over)
    return p


class Attacker:
    """A client that completes the real handshake, then misbehaves."""

    def __init__(self, port: int, genesis: bytes, secret: bytes = SECRET.encode()) -> None:
        self.port = port
        self.genesis = genesis
        self.secret = secret
        self.ident = Identity.generate()
        self.seq = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def frame(self, message) -> bytes:
        return bytes(encode(self.ident, message, seq=self.next_seq(), ts_ms=now_ms(),
                            federation="default"))

    async def session(self, frames, handshake: bool = True) -> None:
        """Open a link and send ``frames(self)``; without ``handshake``, send them before
        anything else (no key exchange, no hello)."""
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"http://127.0.0.1:{self.port}{LINK_PATH}") as ws:
                if handshake:
                    channel = await open_dialer(ws)
                    await channel.receive_frame()  # the node's hello
                    proof = federation_proof(federation_key(self.secret, "default"), "default",
                                             self.ident.public_key, channel.theirs)
                    await channel.send(self.frame(Hello("mallory", channel.ours, channel.theirs,
                                                        1, self.genesis, 0, proof)))
                for f in frames(self):
                    if isinstance(f, str):
                        await ws.send_str(f)
                    elif isinstance(f, Raw):
                        await ws.send_bytes(channel.seal([f])[0] if handshake else f)
                    else:
                        await channel.send(f)
                await asyncio.sleep(0.3)


def _heartbeat(a: Attacker) -> bytes:
    return a.frame(Heartbeat(0, "training", now_ms(), 0))


def _heartbeat_list(a: Attacker) -> list[bytes]:
    return [_heartbeat(a)]


def _bad_signature(a: Attacker) -> list[bytes]:
    f = bytearray(_heartbeat(a))
    f[-1] ^= 0xFF
    return [bytes(f)]


def _tampered(a: Attacker) -> list[bytes]:
    f = bytearray(_heartbeat(a))
    i = f.index(b"training")
    f[i : i + 8] = b"trainin9"
    return [bytes(f)]


def _replayed(a: Attacker) -> list[bytes]:
    f = _heartbeat(a)
    return [f, f]


def _stale(a: Attacker) -> list[bytes]:
    body = {"round": 0, "state": "x", "ping_ts": 1, "echo_ts": 0}
    return [signed(a.ident, payload(a.ident, a.next_seq(), "heartbeat", body,
                                    ts=now_ms() - 3_600_000))]


def _tensor_update(a: Attacker, tensor: dict) -> bytes:
    body = {"round": 1, "attempt": 0, "base": bytes(32), "n": 10, "loss": 0.5, "secs": 1.0,
            "weights": [tensor]}
    return signed(a.ident, payload(a.ident, a.next_seq(), "update", body))


CASES = {
    "garbage": (lambda a: [b"\x00\xffnot msgpack at all" * 3], "frame must be a msgpack array"),
    "oversize": (lambda a: [b"\x92" + b"\x00" * (CAP + 2000)], "exceeds the cap"),
    "bad_signature": (_bad_signature, "bad signature"),
    "tampered_body": (_tampered, "bad signature"),
    "replay": (_replayed, "replayed sequence number"),
    "stale_timestamp": (_stale, "stale timestamp"),
    "unknown_version": (lambda a: [signed(a.ident, payload(a.ident, a.next_seq(), "heartbeat",
                                                           {}, v=99))],
                        "unsupported protocol version"),
    "unknown_type": (lambda a: [signed(a.ident, payload(a.ident, a.next_seq(), "gimme", {}))],
                     "unknown message type"),
    "extension_type": (lambda a: [signed(a.ident, payload(a.ident, a.next_seq(), "heartbeat",
                                                          msgpack.ExtType(5, b"boom")))],
                       "extension type"),
    "bad_dtype": (lambda a: [_tensor_update(a, {"name": "w", "dtype": "object", "shape": [1],
                                                "data": b"\0" * 8})], "not allowed"),
    "shape_mismatch": (lambda a: [_tensor_update(a, {"name": "w", "dtype": "float32",
                                                     "shape": [4, 4], "data": b"\0" * 60})],
                       "shape [4, 4] x 4 = 64 bytes, got 60"),
    "wrong_spec": (lambda a: [a.frame(Update(1, 0, bytes(32), 10, 0.5, 1.0,
                                             [Tensor("w", "float32", (2,), b"\0" * 8)]))],
                   "tensors do not match the federation's model"),
    "wrong_federation": (lambda a: [signed(a.ident, payload(
        a.ident, a.next_seq(), "heartbeat", {"round": 0, "state": "x", "ping_ts": 1,
                                            "echo_ts": 0}, fed="other"))], "is not ours"),
    "text_frame": (lambda a: ["hello?"], "unexpected websocket frame type TEXT"),
    "unsplit_frame": (lambda a: [Raw(_heartbeat(a))], "bad piece flag 0x92 (a whole frame"),
    "short_piece": (lambda a: [Raw(b"\x00" + _heartbeat(a))], "must be full"),
}
# Records that do not open (altered, replayed, reordered, truncated) are in
# tests/node/test_channel.py; the garbage below is no ephemeral key.


def test_bad_input_is_rejected_with_a_reason_and_training_goes_on(tmp_path):
    with Cluster(tmp_path) as cluster:
        node = cluster.start("target", "--dataset", "digits", "--rounds", "200",
                             "--local-epochs", "1", "--min-peers", "0",
                             "--max-message-size", str(CAP))
        cluster.wait(lambda: node.status()["round"] >= 2, 120, "first rounds")
        genesis = bytes.fromhex(node.status()["genesis_hash"])

        async def attack() -> None:
            # garbage instead of a key exchange
            await Attacker(node.endpoint["peer_port"], genesis).session(
                lambda a: [Raw(b"\xc1garbage")], handshake=False)
            for frames, _ in CASES.values():
                await Attacker(node.endpoint["peer_port"], genesis).session(frames)
            # a stranger without the secret completes the handshake but is not admitted
            await Attacker(node.endpoint["peer_port"], genesis,
                           secret=b"a wrong guess at the secret").session(_heartbeat_list)

        asyncio.run(attack())
        after_attacks = node.status()["round"]
        cluster.wait(lambda: node.status()["round"] >= after_attacks + 3, 120,
                     "training after the attacks")
        status = node.status()
        log = node.log
    assert status["state"] in ("training", "collecting", "aggregating", "done")
    assert "refused link from 127.0.0.1: expected a 32-byte ephemeral key" in log
    assert "is not trusted (no pairing, federation secret or --open)" in log
    missing = [name for name, (_, reason) in CASES.items() if reason not in log]
    assert not missing, f"no logged reason for {missing}\n{log[-4000:]}"
    assert status["traffic"]["rejected"] >= len(CASES)
