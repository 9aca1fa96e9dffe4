"""Codec throughput with link encryption (issue 13): a 10-million-parameter float32 update
(40 MB), measured as a node moves it over an encrypted link (link protocol 2):

* send: encode + sign (``protocol.envelope.encode``, as ``NodeCore.frame`` does) and
  ``Channel.send``, which seals the frame's 64 KiB pieces into records, the bytes that go
  on the wire (handed to a WebSocket stand-in that drops them);
* receive: ``Channel.take`` of every record, as the link's reader does (open, reassemble),
  then verify + decode on a worker thread, as the transport's ``_handle`` does.

The references, measured in the same runs and interleaved with them (the machine is
shared: compare ratios, not absolute figures across runs): the plain codec without
encryption (encode + sign, verify + decode, what scripts/bench.py reports), the channel's
stages alone (``Channel.send`` of a frame already encoded, ``Channel.take`` of its
records), and the raw record layer on one thread, piece after piece (``Sealer.seal`` of
``split(frame)``, ``Opener.open`` of each record: the path of ``Channel.seal`` and
``Channel.open``, all the channel had before it pipelined large frames). The ratio is
each side's throughput with encryption over the plain codec's. Throughput is parameter
bytes (40 MB) per second, as in scripts/bench.py; in brackets, the CPU time of all
threads over the wall time (how many cores a step kept busy: below 2 on 2 idle cores, it
waited, on the GIL or on another process).

    .venv/bin/python scripts/bench_channel.py [--params 10000000] [--reps 9]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.common.weights import to_tensors  # noqa: E402
from node.peers.channel import Channel  # noqa: E402
from protocol.envelope import Envelope, decode, encode  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.linkcrypto import Opener, Sealer  # noqa: E402
from protocol.messages import Update  # noqa: E402
from protocol.pieces import split  # noqa: E402


class _Wire:
    """The WebSocket a channel sends on: counts the records' bytes and drops them."""

    def __init__(self) -> None:
        self.bytes = 0
        self.records = 0

    async def send_bytes(self, data: bytes) -> None:
        self.bytes += len(data)
        self.records += 1


class _Clock:
    """Wall and CPU time (all threads) of timed sections, per name, over the runs."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}
        self.counting = False

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        gc.collect()
        cpu0, t0 = _cpu(), time.perf_counter()
        yield
        wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
        if self.counting:
            self.wall.setdefault(name, []).append(wall)
            self.cpu.setdefault(name, []).append(cpu)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def bench(params: int, reps: int) -> None:
    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal(params, dtype=np.float32)}
    update = Update(1, 0, bytes(32), 100, 0.5, 1.0, to_tensors(weights))
    ident = Identity.generate()
    raw = params * 4
    cap = raw + (1 << 20)
    k_ab, k_ba = os.urandom(32), os.urandom(32)
    wire = _Wire()
    sender = Channel(wire, bytes(32), bytes(32), (k_ab, k_ba), cap)  # type: ignore[arg-type]
    receiver = Channel(_Wire(), bytes(32), bytes(32), (k_ba, k_ab), cap)  # type: ignore[arg-type]
    # What puts A's records on the wire for B, untimed: the records ``sender`` makes (same
    # key, same counters), sealed one piece after the other.
    replay = Sealer(k_ab)
    seq = 0
    clock = _Clock()

    def frame() -> bytearray:
        nonlocal seq
        seq += 1
        return encode(ident, update, seq=seq, ts_ms=time.time_ns() // 1_000_000,
                      federation="bench")

    async def take(records: list[bytes]) -> bytearray:
        done = None
        for record in records:
            done = await receiver.take(record)
        assert done is not None
        return done

    def check(env: Envelope) -> None:
        assert isinstance(env.message, Update) and env.message.weights[0].nbytes == raw

    frame_bytes = 0
    for rep in range(reps + 1):  # the first round warms up and is not counted
        clock.counting = rep > 0
        # The plain codec.
        with clock("encode"):
            plain = frame()
        with clock("decode"):
            check(decode(plain, max_size=cap))
        frame_bytes = len(plain)
        # Encrypted, as a node does it: A encodes, signs and seals into records (the
        # stand-in wire drops them); B takes the same records (sealed again here, untimed)
        # one by one, as the link's reader does, then decodes the frame on a thread, as
        # the transport's _handle does.
        with clock("send"):
            await sender.send(frame())
        records = [replay.seal(piece) for piece in split(frame())]
        with clock("receive"):
            check(await asyncio.to_thread(decode, await take(records), max_size=cap))
        # The record layer alone: the channel's stages, and the raw primitives on one
        # thread, piece after piece.
        with clock("channel send"):
            await sender.send(plain)
        records = [replay.seal(piece) for piece in split(plain)]
        with clock("channel take"):
            await take(records)
        key = os.urandom(32)
        sealer, opener = Sealer(key), Opener(key)
        with clock("seal"):
            sealed = [sealer.seal(piece) for piece in split(plain)]
        with clock("open"):
            for record in sealed:
                opener.open(record)
        del plain, records, sealed
    assert receiver.records[1] == sender.records[0] == wire.records

    def rate(name: str, pick: Callable[[list[float]], float]) -> float:
        return raw / pick(clock.wall[name]) / 1e9

    def line(label: str, name: str) -> str:
        pairs = zip(clock.cpu[name], clock.wall[name], strict=True)
        cores = statistics.median(cpu / wall for cpu, wall in pairs)
        return (f"  {label:<36} best {rate(name, min):.2f} GB/s  median"
                f" {rate(name, statistics.median):.2f} GB/s  ({cores:.1f} cores)")

    def ratio(a: str, b: str) -> str:
        medians = rate(a, statistics.median) / rate(b, statistics.median)
        return f"{medians:.2f} (medians), {rate(a, min) / rate(b, min):.2f} (bests)"

    per_frame = wire.bytes / (2 * (reps + 1))
    print(f"codec over an encrypted link, {params / 1e6:.0f}M float32 parameters"
          f" ({raw / 1e6:.0f} MB), {reps} runs, {os.cpu_count()} cores (median CPU time"
          " over wall time in brackets):")
    print(line("send: encode+sign+seal", "send"))
    print(line("receive: open+join+verify+decode", "receive"))
    print("  references, same runs:")
    print(line("encode+sign, no encryption", "encode"))
    print(line("verify+decode, no encryption", "decode"))
    print(line("Channel.send alone (seal)", "channel send"))
    print(line("Channel.take alone (open+join)", "channel take"))
    print(line("seal, one thread, piece by piece", "seal"))
    print(line("open, one thread, piece by piece", "open"))
    print(f"  encrypted / plain: send {ratio('send', 'encode')}")
    print(f"                     receive {ratio('receive', 'decode')}")
    print(f"  records {per_frame - frame_bytes:.0f} bytes over the frame"
          f" ({(per_frame - frame_bytes) / frame_bytes:.4%}: flags and tags)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    asyncio.run(bench(args.params, args.reps))


if __name__ == "__main__":
    main()
