"""What a large frame costs its receiver in memory: RSS per MB received (issue 12).

A sender process sends one signed ``model`` frame of ``--mb`` MB over a real WebSocket on
127.0.0.1 to a receiver process, which joins it, decodes and verifies it (the envelope,
the tensors) and turns its tensors into numpy arrays, as a node does with a model. The
receiver reports the growth of its peak RSS over its baseline, per MB of frame. Two
runs in the same script:

* ``pieces``: the link framing of docs/protocol.md section 1 (64 KiB pieces joined by
  protocol.pieces.Reassembler), what fl-node does;
* ``whole``: the reference, the frame as one WebSocket message (aiohttp buffers it, then
  hands over a copy), the framing fl-node used before.

    .venv/bin/python scripts/bench_frames.py [--mb 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import numpy as np
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol.envelope import decode, encode  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.messages import Model  # noqa: E402
from protocol.pieces import WS_MESSAGE_MAX, Reassembler, split  # noqa: E402
from protocol.tensors import Tensor, weights_digest  # noqa: E402

CAP = 1 << 30


def _reset_peak() -> float:
    """Start a new peak RSS at the current RSS (Linux: clear_refs 5); the current MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


async def _receive(mode: str) -> None:
    done: asyncio.Future[dict[str, float]] = asyncio.get_running_loop().create_future()

    async def link(request: web.Request) -> web.StreamResponse:
        limit = WS_MESSAGE_MAX + 1 if mode == "pieces" else CAP
        ws = web.WebSocketResponse(max_msg_size=limit, compress=False)
        await ws.prepare(request)
        base = _reset_peak()
        joiner = Reassembler(CAP)
        frame: bytes | bytearray | None = None
        async for msg in ws:
            frame = joiner.feed(msg.data) if mode == "pieces" else msg.data
            if frame is not None:
                break
        assert frame is not None
        env = decode(frame, max_size=CAP)
        assert isinstance(env.message, Model)
        arrays = [np.frombuffer(t.data, dtype=t.dtype).reshape(t.shape)
                  for t in env.message.weights]
        mb = len(frame) / 1e6
        del frame, env
        done.set_result({"frame_mb": mb, "rss_growth_mb": _peak_mb() - base,
                         "arrays": len(arrays)})
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/link", link)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    result = await done
    await runner.cleanup()
    print(json.dumps(result), flush=True)


def _frame(mb: int) -> bytearray:
    ident = Identity.from_seed(bytes(32))
    data = np.random.default_rng(0).normal(size=mb * 250_000).astype(np.float32)
    tensors = [Tensor("w", "float32", (data.size,), data.tobytes())]
    model = Model(round=1, attempt=0, aggregator=ident.public_key, contributors=(),
                  num_examples=1, digest=weights_digest(tensors), weights=tensors)
    return encode(ident, model, seq=1, ts_ms=1, federation="bench")


async def _send(port: int, frame: bytearray, mode: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://127.0.0.1:{port}/link") as ws:
            for piece in (split(frame) if mode == "pieces" else [bytes(frame)]):
                await ws.send_bytes(piece)
            await ws.receive()


def run(mode: str, frame: bytearray) -> dict[str, float]:
    child = subprocess.Popen([sys.executable, __file__, "--receive", mode],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    port = int(child.stdout.readline())
    asyncio.run(_send(port, frame, mode))
    result: dict[str, float] = json.loads(child.stdout.readline())
    child.wait(30)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--receive", choices=("pieces", "whole"))
    args = parser.parse_args()
    if args.receive:
        asyncio.run(_receive(args.receive))
        return
    frame = _frame(args.mb)
    print(f"receiver's peak RSS growth for one {len(frame) / 1e6:.1f} MB model frame"
          " (joined, verified, decoded to arrays):")
    results = {mode: run(mode, frame) for mode in ("whole", "pieces")}
    for mode, r in results.items():
        print(f"  {mode:6s} {r['rss_growth_mb']:7.1f} MB  = {r['rss_growth_mb'] / r['frame_mb']:.2f}"
              " MB of RSS per MB received")
    ratio = results["pieces"]["rss_growth_mb"] / results["whole"]["rss_growth_mb"]
    print(f"  pieces / whole: {ratio:.2f}")


if __name__ == "__main__":
    main()
