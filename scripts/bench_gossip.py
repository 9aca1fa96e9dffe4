"""How far and how fast one gossip broadcast spreads over a random partial mesh.

Builds an in-memory network of real ``NodeCore``s (node.runtime.sim) where every node links to
about ``k`` random others, has one node broadcast a signed ``Announce`` (the real gossip
payload), and records, without touching node/ code, when and with how much ``ttl`` left
each node first received it, and how many relay frames each node sent for it.

Per N and fan-out it prints: coverage (fraction of nodes reached, and how many of the
broadcasts reached every node), max and mean hops, relay frames sent in total and per node
(each node must send at most ``fanout`` per broadcast), next to log2(N) and log_fanout(N).

    .venv/bin/python scripts/bench_gossip.py                   # N = 10, 50, 200; fan-out 4, 6
    .venv/bin/python scripts/bench_gossip.py --sizes 10,50 --k 6 --fanouts 4 --trials 3
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.runtime.sim import SimNode, Simulation  # noqa: E402
from protocol.gossip import DEFAULT_TTL, frame_id  # noqa: E402
from protocol.messages import Announce, Relay  # noqa: E402

#: Settles handshakes before a broadcast, and bounds one broadcast (simulated seconds).
#: Latency is 5-50 ms a hop and ttl allows 9 hops, so a broadcast is over in < 0.5 s.
SETTLE = 1.0
HORIZON = 5.0


def random_graph(n: int, k: int, rng: random.Random) -> set[tuple[int, int]]:
    """A connected graph: a ring, plus random edges between nodes with fewer than ``k``
    links until no more can be added (so degrees end up at ``k``, or just under)."""
    edges: set[tuple[int, int]] = set()
    degree = [0] * n
    if n < 2:
        return edges

    def add(a: int, b: int) -> None:
        edges.add((min(a, b), max(a, b)))
        degree[a] += 1
        degree[b] += 1

    for i in range(n):
        j = (i + 1) % n
        if (min(i, j), max(i, j)) not in edges and i != j:
            add(i, j)
    k = min(k, n - 1)
    stuck: set[int] = set()  # short of k, but already linked to every other short node
    while True:
        short = [i for i in range(n) if degree[i] < k and i not in stuck]
        if len(short) < 2:
            return edges
        a = rng.choice(short)
        candidates = [b for b in short if b != a and (min(a, b), max(a, b)) not in edges]
        if candidates:
            add(a, rng.choice(candidates))
        else:
            stuck.add(a)


def build(n: int, k: int, seed: int, fanout: int) -> tuple[Simulation, set[tuple[int, int]]]:
    """A started simulation on a random k-regular-ish graph, with rounds and periodic
    announcements pushed out of the way (so only the measured broadcast makes traffic)."""
    sim = Simulation(n, rounds=1000, seed=seed, announce_interval=1e9, wait_peers=0,
                     train_time=(1e6, 1e6), fanout=fanout)
    edges = random_graph(n, k, random.Random(f"graph/{seed}/{n}/{k}"))
    for a, b in sorted(edges):
        sim.connect(a, b)
    assert len(sim.links) == len(edges), "a link failed its handshake"
    sim.start(full_mesh=False)
    sim.run(sim.now + SETTLE)
    return sim, edges


@dataclass
class Probe:
    """Instrumentation of every node's ``_on_relay`` for one inner frame id."""

    sim: Simulation
    fid: bytes = b""
    first: dict[int, tuple[int, float]] = field(default_factory=dict)  # node: (ttl, time)
    best: dict[int, int] = field(default_factory=dict)  # node: highest ttl of any copy
    sent: Counter[int] = field(default_factory=Counter)  # node: relay frames sent

    def install(self) -> None:
        for node in self.sim.nodes:
            self._wrap(node)

    def _wrap(self, node: SimNode) -> None:
        core = node.core
        original = core._on_relay

        def on_relay(link: bytes, relay: Relay, now: float) -> None:
            fid = frame_id(relay.frame)
            if fid != self.fid:
                return original(link, relay, now)
            if node.index not in self.first:
                self.first[node.index] = (relay.ttl, now)
            self.best[node.index] = max(self.best.get(node.index, -1), relay.ttl)
            before = len(core._sends)
            try:
                return original(link, relay, now)
            finally:
                self.sent[node.index] += len(core._sends) - before

        core._on_relay = on_relay  # type: ignore[method-assign]


@dataclass
class Result:
    """One broadcast: who got it after how many hops, and who sent how many frames."""

    n: int
    origin: int
    fanout: int
    hops: dict[int, int]  # node (origin excluded): hops of the copy that arrived first
    shortest: dict[int, int]  # node (origin excluded): fewest hops of any copy received
    processed: int  # nodes, origin excluded, whose seen-cache holds the frame
    sent: Counter[int]
    traffic: int  # frames put on links during the measurement (all kinds)
    rejected: list[str]
    duration: float  # simulated seconds from broadcast to the last first-arrival
    #: Each node the broadcast missed: its neighbours' fates, as "forwarded elsewhere"
    #: (reached, sent its fan-out to others), "ttl 0" (reached, every copy had ttl 0,
    #: so it could not forward) or "missed" (not reached either).
    why: dict[int, Counter[str]] = field(default_factory=dict)

    @property
    def coverage(self) -> float:
        return (len(self.hops) + 1) / self.n

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())


def broadcast(sim: Simulation, probe: Probe, origin: int) -> Result:
    """Have ``origin`` gossip a fresh signed announcement and follow it to the end."""
    node = sim.nodes[origin]
    core = node.core
    frame = bytes(core.frame(Announce(
        name=core.name, addresses=(), links=tuple(sorted(core.links)),
        round=core.machine.completed, state="bench", credential=core._credential,
    )))
    probe.fid, probe.first, probe.best, probe.sent = frame_id(frame), {}, {}, Counter()
    t0, traffic0 = sim.now, len(sim.traffic)
    rejected0 = [len(n.rejected) for n in sim.nodes]
    before = len(core._sends)
    core.broadcast(frame)
    probe.sent[origin] += len(core._sends) - before
    sim._drain(node)
    sim.run(t0 + HORIZON)
    ttl = core.ttl
    hops = {i: ttl - left + 1 for i, (left, _) in probe.first.items() if i != origin}
    traffic = [t for t in sim.traffic[traffic0:] if t0 <= t[0] <= t0 + HORIZON]
    return Result(
        n=len(sim.nodes), origin=origin, fanout=core.fanout, hops=hops,
        shortest={i: ttl - left + 1 for i, left in probe.best.items() if i != origin},
        processed=sum(probe.fid in n.core.seen for n in sim.nodes if n.index != origin),
        sent=probe.sent, traffic=len(traffic),
        rejected=[r for n, r0 in zip(sim.nodes, rejected0, strict=True) for r in n.rejected[r0:]],
        duration=max((t for _, t in probe.first.values()), default=t0) - t0,
        why={i: Counter(_fate(probe, j.index, origin) for j in sim._linked(sim.nodes[i]))
             for i in range(len(sim.nodes)) if i != origin and i not in hops},
    )


def _fate(probe: Probe, j: int, origin: int) -> str:
    if j != origin and j not in probe.first:
        return "missed"
    if probe.sent[j] == 0:
        return "ttl 0" if probe.best.get(j) == 0 else "sent nothing"
    return "forwarded elsewhere"


@dataclass
class Row:
    n: int
    fanout: int
    k: int
    degree: float
    results: list[Result]
    seconds: float

    def problems(self) -> list[str]:
        out = []
        for r in self.results:
            over = {i: c for i, c in r.sent.items() if c > r.fanout}
            if over:
                out.append(f"N={r.n} origin {r.origin}: nodes sent > fanout frames: {over}")
            if r.traffic != r.total_sent:
                out.append(f"N={r.n} origin {r.origin}: {r.traffic} frames on links but"
                           f" {r.total_sent} relays counted (other traffic?)")
            if r.processed != len(r.hops):
                out.append(f"N={r.n} origin {r.origin}: {len(r.hops)} received,"
                           f" {r.processed} processed")
            if r.rejected:
                out.append(f"N={r.n} origin {r.origin}: rejected {Counter(r.rejected)}")
        return out


def measure(n: int, k: int, fanout: int, trials: int, origins: int, seed: int) -> Row:
    """``trials`` random graphs (one seed each), ``origins`` broadcasts on each."""
    t0 = time.perf_counter()
    results, degrees = [], []
    for t in range(trials):
        sim, edges = build(n, k, seed + t, fanout)
        degrees.append(2 * len(edges) / n)
        probe = Probe(sim)
        probe.install()
        pick = random.Random(f"origin/{seed + t}")
        for origin in pick.sample(range(n), min(origins, n)):
            results.append(broadcast(sim, probe, origin))
    return Row(n, fanout, k, statistics.fmean(degrees), results, time.perf_counter() - t0)


def ttl_check() -> dict[int, int]:
    """Hops on a line 0-1-...-11 broadcast from 0: node i must be i hops away, and the
    frame must stop after ttl + 1 hops (received with ttl 0, not forwarded)."""
    n = 12
    sim = Simulation(n, rounds=1000, seed=0, announce_interval=1e9, wait_peers=0,
                     train_time=(1e6, 1e6))
    for i in range(n - 1):
        sim.connect(i, i + 1)
    sim.start(full_mesh=False)
    sim.run(SETTLE)
    probe = Probe(sim)
    probe.install()
    return broadcast(sim, probe, 0).hops


def table(rows: list[Row]) -> str:
    head = ("   N  f  deg  runs  coverage(min)  full  hops max/mean  log2N  logfN"
            "  short max/mean  frames tot  /node max/mean  dup  t_ms   secs")
    lines = [head, "-" * len(head)]
    for row in rows:
        rs = row.results
        cov = [r.coverage for r in rs]
        hop_max = max((max(r.hops.values(), default=0) for r in rs), default=0)
        hop_mean = statistics.fmean(h for r in rs for h in r.hops.values())
        short_max = max(max(r.shortest.values(), default=0) for r in rs)
        short_mean = statistics.fmean(h for r in rs for h in r.shortest.values())
        totals = [r.total_sent for r in rs]
        per_max = max(max(r.sent.values(), default=0) for r in rs)
        # frames per reached node beyond the one it needed: the cost of redundancy
        dup = statistics.fmean(r.total_sent / max(1, len(r.hops)) for r in rs)
        t_ms = 1000 * statistics.fmean(r.duration for r in rs)
        lines.append(
            f"{row.n:4d} {row.fanout:2d} {row.degree:4.1f} {len(rs):5d}"
            f"  {statistics.fmean(cov):6.1%}({min(cov):6.1%})"
            f"  {sum(c == 1.0 for c in cov):2d}/{len(rs):<2d}"
            f"  {hop_max:4d} /{hop_mean:5.2f}"
            f"  {math.log2(row.n):5.2f}  {math.log(row.n, row.fanout):5.2f}"
            f"  {short_max:5d} /{short_mean:5.2f}"
            f"  {statistics.fmean(totals):10.1f}"
            f"  {per_max:6d} /{statistics.fmean(totals) / row.n:5.2f}"
            f"  {dup:4.2f}  {t_ms:4.0f}  {row.seconds:5.1f}"
        )
    return "\n".join(lines)


def missed(rows: list[Row]) -> list[str]:
    """Who a broadcast missed, and why (their degree, hops cap)."""
    out = []
    for row in rows:
        for r in row.results:
            if r.coverage < 1.0:
                lost = sorted(set(range(r.n)) - set(r.hops) - {r.origin})
                why = "; ".join(f"node {i}: neighbours {dict(r.why[i])}" for i in lost)
                out.append(f"N={r.n} f={r.fanout} origin {r.origin}: missed {lost} ({why})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10,50,200", help="numbers of nodes (comma-separated)")
    p.add_argument("--k", type=int, default=8, help="links per node (target degree)")
    p.add_argument("--fanouts", default="4,6", help="gossip fan-outs (comma-separated)")
    p.add_argument("--trials", type=int, default=5, help="random graphs (seeds) per N")
    p.add_argument("--origins", type=int, default=2, help="broadcasts per graph")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    started = time.perf_counter()

    line = ttl_check()
    want = {i: i for i in range(1, 10)}
    print(f"ttl check, line of 12 from node 0: hops {line}"
          f" -> {'ok' if line == want else 'UNEXPECTED'} (ttl 8 reaches 9 hops)")

    rows = []
    for fanout in [int(f) for f in args.fanouts.split(",")]:
        for n in [int(s) for s in args.sizes.split(",")]:
            rows.append(measure(n, args.k, fanout, args.trials, args.origins, args.seed))
    print(f"k={args.k}, {args.trials} graphs x {args.origins} origins per row;"
          " hops = ttl - ttl_on_first_arrival + 1 (copy acted on);\n"
          "short = fewest hops of any copy received; dup = relay frames per reached node;"
          " t_ms = simulated time to the last first-arrival")
    print(table(rows))
    problems = [x for row in rows for x in row.problems()]
    for x in missed(rows) + problems:
        print("  " + x)
    print("growth: mean hops / log_f(N), first copy (shortest copy); ~constant = O(log N)")
    for fanout in sorted({row.fanout for row in rows}):
        parts = []
        for row in (row for row in rows if row.fanout == fanout and row.n > 1):
            first = statistics.fmean(h for r in row.results for h in r.hops.values())
            short = statistics.fmean(h for r in row.results for h in r.shortest.values())
            base = math.log(row.n, fanout)
            parts.append(f"N={row.n}: {first / base:.2f} ({short / base:.2f})")
        print(f"  f={fanout}: " + ", ".join(parts))
    limit = DEFAULT_TTL + 1
    capped = [f"N={row.n} f={row.fanout}" for row in rows
              if any(h >= limit for r in row.results for h in r.hops.values())]
    if capped:
        print(f"  ttl is nearly binding: some nodes first got the frame on hop {limit},"
              f" the last the ttl allows ({', '.join(capped)})")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 1 if problems or line != want else 0


if __name__ == "__main__":
    sys.exit(main())
