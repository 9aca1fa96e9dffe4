"""What the network sees of peer links (issue 13): three namespace hosts train three rounds
while tcpdump records every packet to or from the peer port on the bridge that joins them.
No plaintext marker of the protocol appears in it: not the federation name, not a node's
name or key, not a msgpack field name, not a tensor name. The search runs over the raw TCP
payloads and over the WebSocket messages unmasked (a WebSocket client masks what it sends
with a random key, so the dialer's side of a link would hide plaintext from a raw search).

What the network does see, by design (docs/trust.md): the HTTP upgrade request (its path
``GET /fl/v2/link`` and its headers), the two 32-byte ephemeral keys, and the size and
timing of every record. The test checks that it sees those: the upgrade request line proves
that the capture holds the peer traffic, in a form where plaintext would show."""

from __future__ import annotations

import signal
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.system.fleet import PEER_PORT, start_node, wait
from tests.system.netns import Hosts, require_root_and_tools

FEDERATION = "capture-federation-x7"
SECRET = "capture-secret-k2v9"  # only proven (an HMAC), never sent: it must not show either
NAMES = {"a": "capture-alpha-q3", "b": "capture-bravo-q3", "c": "capture-charlie-q3"}
ROUNDS = 3
#: msgpack keys and values of the protocol that any plaintext message would carry.
FIELDS = (b"heartbeat", b"genesis", b"weights", b"contributors", b"aggregator", b"hello",
          b"announce", b"float32")
LINK_REQUEST = b"GET /fl/v2/link"


@pytest.mark.slow
@pytest.mark.system
def test_three_nodes_train_and_a_capture_of_the_peer_port_holds_no_plaintext(tmp_path):
    require_root_and_tools("tcpdump")
    pcap = tmp_path / "peers.pcap"
    tcpdump_err = tmp_path / "tcpdump.log"
    with Hosts(tuple(NAMES)) as hosts:
        # On the bridge, in promiscuous mode: every frame between any two hosts, peer port
        # only (the web API that the test polls listens on each host's 127.0.0.1 and never
        # crosses the bridge anyway). -Z root: write the file as root, into our temp dir.
        with open(tcpdump_err, "wb") as err:
            dump = subprocess.Popen(
                ["ip", "netns", "exec", hosts.bridge_ns, "tcpdump", "-i", "br0", "-n", "-U",
                 "-Z", "root", "-s", "0", "-w", str(pcap), f"tcp port {PEER_PORT}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True)
        hosts.defer(lambda: _stop(dump))
        _await_text(tcpdump_err, "listening on br0", dump, 20)
        nodes = []
        for i, (h, name) in enumerate(NAMES.items()):
            peers = [a for o in NAMES if o != h for a in ("--peer", f"{hosts.ip(o)}:{PEER_PORT}")]
            nodes.append(start_node(
                hosts, h, tmp_path, "--federation", FEDERATION, "--no-mdns", *peers,
                "--wait-peers", "2", "--num-partitions", "3", "--partition-index", str(i),
                "--rounds", str(ROUNDS), "--seed", "0", "--start-timeout", "60",
                secret=SECRET, label=name, mdns_interface=False))
        tensor_names = _tensor_names()  # torch loads here while the nodes start
        wait(lambda: all(n.status()["evaluated_round"] >= ROUNDS for n in nodes), 150,
             f"{ROUNDS} rounds on every host", nodes)
        statuses = [n.status() for n in nodes]
        _stop(dump)
        assert dump.returncode == 0, tcpdump_err.read_text()
        stats = tcpdump_err.read_text()
        ips = {hosts.ip(h): h for h in NAMES}
    assert "\n0 packets dropped by kernel" in stats, stats
    assert {s["round"] for s in statuses} == {ROUNDS}, statuses
    assert len({s["model_hash"] for s in statuses}) == 1, statuses
    assert {s["federation"] for s in statuses} == {FEDERATION}, statuses

    flows = reassemble(read_pcap(pcap))
    raw = b"".join(f.data for f in flows.values())
    links = [(key, flow) for key, flow in flows.items() if flow.data.startswith(LINK_REQUEST)]
    # Every pair of hosts has a link, and the capture holds each link's upgrade request in
    # the clear: the network sees the path and the headers, and so would see any plaintext.
    # Visible by design (docs/trust.md): that request (path, Host, aiohttp's User-Agent),
    # the two ephemeral keys, and the size and timing of every packet and record.
    assert {frozenset((ips[k[0]], ips[k[2]])) for k, _ in links} == {
        frozenset("ab"), frozenset("bc"), frozenset("ac")}, sorted(flows)
    assert raw.count(LINK_REQUEST) == len(links)
    messages: list[bytes] = []
    for (src, sport, dst, dport), request in links:
        answer = flows.get((dst, dport, src, sport))
        assert answer is not None and answer.data.startswith(b"HTTP/1.1 101 "), (src, dst)
        for flow, masked in ((request, True), (answer, False)):
            sent = websocket_messages(flow.data, masked=masked)
            # Each side's first message is its ephemeral X25519 key; then sealed records.
            assert sent and len(sent[0]) == 32, [len(m) for m in sent[:3]]
            messages += sent
    clear = b"".join(messages)  # what the WebSocket messages carry, unmasked
    print(f"capture: {len(flows)} TCP flows, {len(raw)} bytes of TCP payload, "
          f"{len(links)} links, {len(messages)} WebSocket messages ({len(clear)} bytes)")
    # The three rounds' model updates (38,378 float32 each, ~150 KB) went over these links.
    assert len(raw) > 50_000 and len(clear) > 50_000, (len(raw), len(clear))

    markers = [FEDERATION.encode(), SECRET.encode(), *FIELDS, *tensor_names]
    for s in statuses:
        markers += [s["name"].encode(), s["node_id"].encode()]
    markers += [_public_key(tmp_path / name / "node.key") for name in NAMES.values()]
    found = find_markers(markers, raw, clear)
    assert not found, f"plaintext on the wire: {found}"


# --------------------------------------------------------------------------- helpers

def find_markers(markers: list[bytes], *buffers: bytes) -> list[bytes]:
    """The markers that occur in any of ``buffers``."""
    return [m for m in markers if any(m in b for b in buffers)]


def _tensor_names() -> list[bytes]:
    """The names of the digits model's tensors, as the nodes send them (state_dict order)."""
    from ml.datasets import load_dataset
    from ml.models import build_model

    data = load_dataset("digits")
    model = build_model("cnn", data.input_shape, data.num_classes)
    names = [k.encode() for k in model.state_dict()]
    assert b"head.1.weight" in names, names
    return names


def _public_key(key_file: Path) -> bytes:
    from protocol.identity import Identity

    return Identity.from_seed(key_file.read_bytes()).public_key


def _await_text(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    end = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > end:
            raise AssertionError(f"tcpdump did not start: {path.read_text(errors='replace')}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT: tcpdump writes what it has (-U: every packet already), its statistics, and
    exits 0."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- a pcap reader: the classic libpcap format, Ethernet, IPv4, TCP

@dataclass
class Segment:
    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    syn: bool
    payload: bytes


def read_pcap(path: Path) -> list[Segment]:
    """The TCP segments of a libpcap file (24-byte file header, then 16-byte record
    headers: seconds, micro- or nanoseconds, captured length, original length)."""
    data = path.read_bytes()
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        order = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        order = ">"
    else:
        raise ValueError(f"{path}: not a pcap file (magic {magic.hex()})")
    (linktype,) = struct.unpack_from(order + "I", data, 20)
    assert linktype == 1, f"link type {linktype}, expected Ethernet (1)"
    segments = []
    off = 24
    while off + 16 <= len(data):
        _, _, caplen, origlen = struct.unpack_from(order + "IIII", data, off)
        off += 16
        frame = data[off:off + caplen]
        off += caplen
        assert caplen == origlen == len(frame), "a packet was cut short (snaplen)"
        if frame[12:14] != b"\x08\x00":  # not IPv4 (the filter lets only TCP through)
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        (total,) = struct.unpack_from("!H", ip, 2)
        if ip[9] != 6:
            continue
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack_from("!HHI", tcp)
        doff = (tcp[12] >> 4) * 4
        segments.append(Segment(_ip4(ip[12:16]), sport, _ip4(ip[16:20]), dport, seq,
                                bool(tcp[13] & 0x02), bytes(tcp[doff:])))
    assert off == len(data), "the pcap file ends inside a record"
    return segments


def _ip4(b: bytes) -> str:
    return ".".join(str(x) for x in b)


@dataclass
class Flow:
    """One direction of one TCP connection: its bytes in sequence order."""

    isn: int | None = None
    chunks: list[tuple[int, bytes]] = field(default_factory=list)
    data: bytes = b""


def reassemble(segments: list[Segment]) -> dict[tuple[str, int, str, int], Flow]:
    """Each direction's byte stream, by (src, sport, dst, dport). Retransmissions overlap
    and are written once; a hole (a lost packet in the capture) fails."""
    flows: dict[tuple[str, int, str, int], Flow] = {}
    for s in segments:
        flow = flows.setdefault((s.src, s.sport, s.dst, s.dport), Flow())
        if s.syn:
            flow.isn = s.seq
        if s.payload:
            flow.chunks.append((s.seq, s.payload))
    for key, flow in flows.items():
        if not flow.chunks:  # a refused dial (a RST), or a bare close
            continue
        assert flow.isn is not None, f"{key}: no SYN (started before the capture?)"
        buf = bytearray()
        for offset, payload in sorted(((seq - flow.isn - 1) % 2**32, p)
                                      for seq, p in flow.chunks):
            assert offset <= len(buf), f"{key}: {offset - len(buf)} bytes missing at {len(buf)}"
            buf += payload[len(buf) - offset:]
        flow.data = bytes(buf)
    return flows


def websocket_messages(stream: bytes, *, masked: bool) -> list[bytes]:
    """The payloads of the data frames (text, binary, continuation) after the HTTP
    upgrade, unmasked; a frame cut off by the end of the capture is left out."""
    _, sep, rest = stream.partition(b"\r\n\r\n")
    assert sep, "no end of the HTTP upgrade"
    out = []
    i = 0
    while i + 2 <= len(rest):
        opcode, length = rest[i] & 0x0F, rest[i + 1] & 0x7F
        assert bool(rest[i + 1] & 0x80) == masked, f"mask bit at {i}"
        i += 2
        if length >= 126:
            width = 2 if length == 126 else 8
            length = int.from_bytes(rest[i:i + width], "big")
            i += width
        key = rest[i:i + 4] if masked else b""
        i += len(key)
        payload = rest[i:i + length]
        i += length
        if len(payload) < length:
            break
        if opcode <= 2:
            out.append(_unmask(payload, key))
    return out


def _unmask(payload: bytes, key: bytes) -> bytes:
    if not key:
        return payload
    n = len(payload)
    pad = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(pad, "big")).to_bytes(n, "big")


def test_the_capture_readers_find_plaintext_in_masked_websocket_frames(tmp_path):
    """The readers above (fast tier: no root, no processes), on a pcap this test writes: a
    masked client frame and an unmasked server frame, both carrying a marker, are found
    (raw, the masked one is not)."""
    client = ("10.0.0.1", 40000)
    server = ("10.0.0.2", PEER_PORT)
    key = bytes([1, 2, 3, 4])
    secret = FEDERATION.encode()
    masked = bytes([0x82, 0x80 | len(secret)]) + key + _unmask(secret, key)
    plain = bytes([0x82, len(secret)]) + secret
    request = LINK_REQUEST + b" HTTP/1.1\r\n\r\n"
    answer = b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
    packets = [_packet(client, server, 100, b"", syn=True),
               _packet(server, client, 500, b"", syn=True),
               _packet(client, server, 101, request),
               _packet(server, client, 501, answer),
               # out of order, and a retransmission: reassembled once, in order
               _packet(client, server, 101 + len(request) + 3, masked[3:]),
               _packet(client, server, 101 + len(request), masked),
               _packet(server, client, 501 + len(answer), plain)]
    pcap = tmp_path / "t.pcap"
    pcap.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
                     + b"".join(struct.pack("<IIII", 0, 0, len(p), len(p)) + p for p in packets))
    flows = reassemble(read_pcap(pcap))
    up = flows[(*client, *server)].data
    down = flows[(*server, *client)].data
    assert up == request + masked and down == answer + plain
    assert find_markers([secret], up) == []  # masking hides it from a raw search...
    assert websocket_messages(up, masked=True) == [secret]  # ...not from ours
    assert websocket_messages(down, masked=False) == [secret]
    assert find_markers([secret, b"hello"], down) == [secret]


def _packet(src: tuple[str, int], dst: tuple[str, int], seq: int, payload: bytes, *,
            syn: bool = False) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", src[1], dst[1], seq, 0, 5 << 4, 0x02 if syn else 0x18,
                      65535, 0, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0,
                     bytes(map(int, src[0].split("."))), bytes(map(int, dst[0].split("."))))
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp

