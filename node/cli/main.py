"""``fl-node``: the command line. The one place that wires the real pieces together."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from node.common.endpoint import endpoint_url, read_endpoint
from node.config import (
    DATASETS,
    LOG_LEVELS,
    PARTITIONS,
    ConfigError,
    NodeConfig,
    build_config,
    is_loopback,
)

EXIT_USAGE = 2
#: Set in the node process that ``fl-node start --tui`` runs, so that it never runs a UI.
TUI_CHILD_ENV = "FL_NODE_TUI_CHILD"


class _Parser(argparse.ArgumentParser):
    """argparse that exits with 2 and a one-line reason (its default, kept explicit), and
    takes no abbreviated options (``start --tui`` re-runs its own arguments)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def add_node_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `start` (all) and `demo` (the training ones)."""
    d = NodeConfig()
    g = p.add_argument_group("training")
    g.add_argument("--dataset", choices=DATASETS, help=f"data set (default {d.dataset})")
    g.add_argument("--data-dir", help="where mnist / fashion-mnist / cifar10 files live")
    g.add_argument("--download", action="store_true", default=None,
                   help="download a torchvision data set into --data-dir if missing")
    g.add_argument("--model", help=f"model name from the registry: cnn, mlp, linear"
                   f" (default {d.model})")
    g.add_argument("--partition", choices=PARTITIONS, help=f"how data is split (default"
                   f" {d.partition})")
    g.add_argument("--alpha", type=float, help=f"Dirichlet concentration (default {d.alpha})")
    g.add_argument("--seed", type=int, help=f"shared seed: genesis model, partitions"
                   f" (default {d.seed})")
    g.add_argument("--rounds", type=int, help=f"rounds to train (default {d.rounds})")
    g.add_argument("--local-epochs", type=int, help=f"local epochs per round (default"
                   f" {d.local_epochs})")
    g.add_argument("--batch-size", type=int, help=f"batch size (default {d.batch_size})")
    g.add_argument("--lr", type=float, help=f"learning rate (default {d.lr})")
    g.add_argument("--round-timeout", type=float, help=f"seconds an aggregator waits for"
                   f" updates (default {d.round_timeout:g})")
    g.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                   help=f"(default {d.log_level})")
    g.add_argument("--log-file", help="also write the log to this file")


def build_parser() -> argparse.ArgumentParser:
    """The `fl-node` argument parser."""
    parser = _Parser(prog="fl-node", description="Peer-to-peer federated-learning node.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = NodeConfig()

    start = sub.add_parser("start", help="run one node")
    start.add_argument("--config", help="TOML file with the same keys as these flags")
    start.add_argument("--name", help=f"human name of this node (default {d.name})")
    start.add_argument("--state-dir", help="key, sequence numbers, endpoint file (default"
                       " ~/.local/state/fl-node/NAME)")
    start.add_argument("--federation", help=f"federation name (default {d.federation})")
    start.add_argument("--host", help=f"address for peer traffic (default {d.host})")
    start.add_argument("--port", type=int, help=f"peer port, 0 = any free (default {d.port})")
    start.add_argument("--web-host", help=f"address of the web API (default {d.web_host})")
    start.add_argument("--web-port", type=int, help=f"web API port, 0 = any free (default"
                       f" {d.web_port})")
    start.add_argument("--peer", action="append", dest="peers", metavar="[KEY@]HOST:PORT",
                       help="a peer to connect to (repeatable); with KEY (node id or public"
                       " key) that key is required of it, and trusted")
    start.add_argument("--federation-secret-file", metavar="FILE",
                       help="file holding the federation secret (or set"
                       " FL_NODE_FEDERATION_SECRET); members prove it without sending it")
    start.add_argument("--open", action="store_true", default=None,
                       help="trust every node of the same federation name (INSECURE: local"
                       " demos only)")
    start.add_argument("--no-mdns", dest="mdns", action="store_false", default=None,
                       help="do not announce or discover nodes by mDNS")
    start.add_argument("--mdns-interface", dest="mdns_interfaces", action="append",
                       metavar="IP", help="address of an interface for mDNS (repeatable;"
                       " default all)")
    start.add_argument("--announce-interval", type=float, help="seconds between gossiped"
                       " announcements (default 2)")
    start.add_argument("--fanout", type=int, help="peers each gossip message is forwarded to"
                       " (default 4)")
    start.add_argument("--min-peers", type=_positive_int,
                       help="peers an elected round needs; below that the node trains offline"
                       " and averages with the peers it reaches (default: a majority of the"
                       " --peer federation, (peers+1)//2; 0 without --peer)")
    start.add_argument("--wait-peers", type=_positive_int,
                       help="peers a fresh node waits for before round 1 (default: every"
                       " --peer, at least --min-peers)")
    start.add_argument("--start-timeout", type=float, help=f"seconds to wait for --wait-peers"
                       f" before starting anyway (default {d.start_timeout:g})")
    start.add_argument("--num-partitions", type=int, help="how many shards the data is"
                       " split into (one per node)")
    start.add_argument("--partition-index", type=int, help="which shard this node trains on")
    start.add_argument("--plugin", dest="plugins", action="append", metavar="MODULE",
                       help="import MODULE first: it may register data sets and models"
                       " (docs/extending.md; repeatable)")
    ml = start.add_argument_group("aggregation, compression and privacy (docs/strategies.md)")
    ml.add_argument("--strategy", help="fedavg (default), fedprox, fedadam, fedyogi, median,"
                    " trimmed-mean, krum, multi-krum, or package.module:Name (your own)")
    ml.add_argument("--mu", type=float, help="FedProx proximal term (default 0.01)")
    ml.add_argument("--trim-beta", type=float, help="trimmed mean: fraction cut at each end"
                    " (default 0.2)")
    ml.add_argument("--krum-f", type=int, help="Krum/Multi-Krum: attackers tolerated"
                    " (default 1)")
    ml.add_argument("--multi-krum-m", type=int, help="Multi-Krum: updates averaged"
                    " (default n - f)")
    ml.add_argument("--server-lr", type=float, help="FedAdam/FedYogi server learning rate")
    ml.add_argument("--clip-norm", type=float, help="clip each update's change to this L2"
                    " norm before aggregating")
    ml.add_argument("--compress", help="updates on the wire: none (default), fp16, int8,"
                    " topk:FRACTION (with error feedback)")
    ml.add_argument("--dp", action="store_true", default=None, help="local DP-SGD (Opacus)"
                    " with a lifetime privacy budget")
    ml.add_argument("--target-epsilon", type=float, help="the budget: training stops before"
                    " it would be exceeded")
    ml.add_argument("--delta", type=float, help="DP delta (default 1e-5)")
    ml.add_argument("--max-grad-norm", type=float, help="DP per-sample gradient clip"
                    " (default 1.0)")
    ml.add_argument("--noise-multiplier", type=float, help="DP noise (default: derived from"
                    " --target-epsilon for the planned rounds)")
    start.add_argument("--web-public", action="store_true", default=None,
                       help="allow --web-host to be a non-loopback address (the API token"
                       " still guards every change; a warning is logged)")
    start.add_argument("--web-allowed-host", dest="web_allowed_hosts", action="append",
                       metavar="HOST[:PORT]", help="another Host/Origin name the web API"
                       " answers to (repeatable; e.g. a reverse proxy's name)")
    start.add_argument("--tui", action="store_true", default=None, help="show the terminal"
                       " UI in this terminal while the node runs (the node logs to a file)")
    start.add_argument("--max-message-size", type=int, help="largest accepted frame, bytes")
    add_node_options(start)

    demo = sub.add_parser("demo", help="run several nodes on this machine and report")
    demo.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3)")
    demo.add_argument("--base-dir", help="state dirs go here (default: a temporary dir)")
    add_node_options(demo)

    pair = sub.add_parser("pair", help="pairing codes and the trust store",
                          description="fl-node pair: show a pairing code (QR, URI);"
                          " fl-node pair add URI: pair with the node whose code it is;"
                          " fl-node pair list; fl-node pair remove ID.")
    pair.add_argument("action", nargs="?", default="show",
                      choices=("show", "add", "list", "remove"))
    pair.add_argument("value", nargs="?", help="the URI (add) or node id (remove)")
    pair.add_argument("--state-dir", help="state dir of the local node (default: that of"
                      " --name)")
    pair.add_argument("--name", default=d.name, help="name of the local node (default"
                      f" {d.name})")
    pair.add_argument("--png", metavar="FILE", help="also write the QR code as a PNG")
    pair.add_argument("--ttl", type=float, default=600.0,
                      help="seconds the code stays valid (default 600)")
    pair.add_argument("--json", action="store_true", help="print JSON")

    token = sub.add_parser("token", help="print the local node's API token")
    _local_node_options(token, d.name)

    tui = sub.add_parser("tui", help="watch and steer a running node in the terminal")
    tui.add_argument("url", nargs="?", help="the node's web address (default: the local"
                     " node of --name / --state-dir)")
    tui.add_argument("--token", help="the node's API token (default: read from the state"
                     " dir; see fl-node token)")
    _local_node_options(tui, d.name)

    status = sub.add_parser("status", help="print a running node's status")
    status.add_argument("url", nargs="?", default=f"http://127.0.0.1:{d.web_port}",
                        help="the node's web address")
    status.add_argument("--json", action="store_true", help="print the raw status object")
    return parser


def _local_node_options(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--state-dir", help="state dir of the local node (default: that of"
                        " --name)")
    parser.add_argument("--name", default=name, help=f"name of the local node (default"
                        f" {name})")


def _state_dir(args: argparse.Namespace) -> str:
    from node.config import default_state_dir

    return args.state_dir or default_state_dir(args.name)


def setup_logging(level: str, log_file: str | None, name: str = "") -> None:
    """Log to stderr (and to ``log_file``) with the node name on every line."""
    fmt = f"%(asctime)s %(levelname)-7s {name + ' ' if name else ''}%(name)s: %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level, format=fmt, handlers=handlers, force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _flags(args: argparse.Namespace, skip: set[str]) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in skip and v is not None}


def cmd_start(args: argparse.Namespace) -> int:
    """Run one node until SIGINT/SIGTERM."""
    try:
        flags = _flags(args, {"command", "config", "tui"})
        for key in ("peers", "mdns_interfaces", "web_allowed_hosts", "plugins"):
            if key in flags:
                flags[key] = tuple(flags[key])
        config = build_config(flags, config_file=args.config)
    except ConfigError as exc:
        print(f"fl-node start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.tui and not os.environ.get(TUI_CHILD_ENV):
        return _start_with_tui(config)
    setup_logging(config.log_level, config.log_file, config.name)
    if not is_loopback(config.web_host):
        logging.getLogger("fl-node").warning(
            "--web-public: the web API listens on %s, reachable from other machines; every"
            " change needs the API token, but anyone there can read the status",
            config.web_host)
    # `kill -USR1 PID` prints every thread's stack to stderr: for a node that seems stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    import torch

    from ml.learner import TorchLearner
    from ml.privacy import DPConfig
    from ml.strategies import parse_strategy
    from node.runtime.build import build_node
    from node.runtime.supervisor import NodeFailed, install_signal_handlers

    torch.set_num_threads(1)
    try:
        load_plugins(config.plugins)
        strategy = parse_strategy(config.strategy, mu=config.mu, beta=config.trim_beta,
                                  f=config.krum_f, m=config.multi_krum_m, eta=config.server_lr,
                                  clip_norm=config.clip_norm)
        dp = DPConfig(target_epsilon=config.target_epsilon, delta=config.delta,
                      max_grad_norm=config.max_grad_norm,
                      noise_multiplier=config.noise_multiplier) if config.dp else None
        learner = TorchLearner(
            dataset=config.dataset, model=config.model, data_dir=config.data_dir,
            download=config.download, partition=config.partition, alpha=config.alpha,
            num_partitions=config.num_partitions, partition_index=config.partition_index,
            seed=config.seed, local_epochs=config.local_epochs, batch_size=config.batch_size,
            lr=config.lr, strategy=strategy, dp=dp, rounds=config.rounds,
            ledger_path=Path(config.resolved_state_dir) / "privacy.json",
        )
    except (ValueError, OSError) as exc:  # bad data files, unknown model, ...
        print(f"fl-node start: {exc}", file=sys.stderr)
        return EXIT_USAGE

    try:
        node = build_node(config, learner)
    except (ValueError, OSError) as exc:  # corrupt trust store, unreadable secret, ...
        print(f"fl-node start: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def main() -> None:
        install_signal_handlers(node)
        await node.run()

    try:
        asyncio.run(main())
    except NodeFailed as exc:
        print(f"fl-node start: stopped: {exc.reason}", file=sys.stderr)
        return 1
    return 0


def _start_with_tui(config: Any) -> int:
    """``fl-node start --tui``: the node runs as a child process logging to a file, and
    the terminal UI attaches to it; quitting the UI stops the node (SIGTERM)."""
    import subprocess
    import time as _time

    from node.common.state import load_or_create_api_token

    state_dir = Path(config.resolved_state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    argv = [a for a in sys.argv[1:] if a != "--tui"]
    if not config.log_file:
        argv += ["--log-file", str(state_dir / "node.log")]
    with open(os.devnull, "wb") as quiet:
        # Detached from the terminal (no stdin, its own session): the UI owns the terminal,
        # and this process stops the node when the UI ends or the terminal goes away.
        child = subprocess.Popen([sys.executable, "-m", "node.cli.main", *argv],
                                 stdin=subprocess.DEVNULL, stdout=quiet, stderr=quiet,
                                 start_new_session=True,
                                 env={**os.environ, TUI_CHILD_ENV: "1"})

    def hang_up(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # the terminal closed: stop the node (finally)

    signal.signal(signal.SIGHUP, hang_up)
    try:
        deadline = _time.monotonic() + 120
        while True:
            if child.poll() is not None:
                print(f"fl-node start: the node exited with code {child.returncode}; see"
                      f" {config.log_file or state_dir / 'node.log'}", file=sys.stderr)
                return child.returncode or 1
            try:
                info = read_endpoint(state_dir)
                if info.get("pid") == child.pid:
                    break
            except (OSError, ValueError):
                pass
            if _time.monotonic() > deadline:
                print("fl-node start: the node did not come up in 120 s", file=sys.stderr)
                return 1
            _time.sleep(0.1)
        from tui.app import run_tui

        return run_tui(endpoint_url(info), load_or_create_api_token(state_dir))
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=60)  # a graceful stop under load can take ~20 s
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def load_plugins(modules: tuple[str, ...]) -> None:
    """Import each ``--plugin`` module (its decorators register data sets and models);
    ValueError naming the module if it cannot be imported."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 (any failure of a user's module)
            raise ValueError(f"--plugin {name}: cannot import it ({type(exc).__name__}:"
                             f" {exc})") from None


def cmd_token(args: argparse.Namespace) -> int:
    """Print the API token of the local node (made on first use, mode 0600)."""
    from node.common.state import load_or_create_api_token

    print(load_or_create_api_token(Path(_state_dir(args))))
    return 0


def cmd_tui(args: argparse.Namespace) -> int:
    """Attach the terminal UI to a running node (the local one by default)."""
    from tui.app import run_tui

    state_dir = Path(_state_dir(args))
    url = args.url
    if url is None:
        try:
            url = _LocalNode(str(state_dir)).base
        except RuntimeError as exc:
            print(f"fl-node tui: {exc}; or give its URL", file=sys.stderr)
            return 1
    token = args.token
    if token is None:
        try:
            token = (state_dir / "api.token").read_text().strip()
        except OSError:
            print(f"fl-node tui: no API token in {state_dir}: give --token (on the node's"
                  " machine: fl-node token)", file=sys.stderr)
            return EXIT_USAGE
    return run_tui(url, token)


def cmd_status(args: argparse.Namespace) -> int:
    """Fetch /api/status once and print it."""
    url = args.url.rstrip("/") + "/api/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (user-given URL)
            status = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"fl-node status: cannot read {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status))
    return 0


class _LocalNode:
    """The running node of a state dir, reached through its web API and API token."""

    def __init__(self, state_dir: str) -> None:
        self.dir = Path(state_dir)
        try:
            endpoint = read_endpoint(self.dir)
            self.token = (self.dir / "api.token").read_text().strip()
        except (OSError, ValueError):
            raise RuntimeError(f"no running node with state dir {state_dir} (start it with"
                               " `fl-node start`)") from None
        self.base = endpoint_url(endpoint)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (local node)
                return json.load(resp)
        except urllib.error.HTTPError as exc:
            try:
                reason = json.load(exc).get("error", exc.reason)
            except ValueError:
                reason = exc.reason
            raise RuntimeError(reason) from None
        except (urllib.error.URLError, OSError) as exc:
            raise RuntimeError(f"cannot reach the node at {self.base}: {exc}") from None


def cmd_pair(args: argparse.Namespace) -> int:
    """Show a pairing code, pair with a code, list or remove paired nodes."""
    from node.config import default_state_dir
    from node.trust.pairing import qr_png, qr_text

    state_dir = args.state_dir or default_state_dir(args.name)
    try:
        if args.action in ("add", "remove") and not args.value:
            raise ValueError(f"fl-node pair {args.action} needs a"
                             f" {'URI' if args.action == 'add' else 'node id'}")
        if args.action in ("show", "list") and args.value:
            raise ValueError(f"fl-node pair {args.action} takes no argument")
    except ValueError as exc:
        print(f"fl-node pair: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.action == "list" or args.action == "remove":
            try:
                node = _LocalNode(state_dir)
            except RuntimeError:
                return _pair_offline(args, state_dir)
            if args.action == "list":
                peers = node.call("GET", "/api/pair")["peers"]
                _print_peers(peers, args.json)
            else:
                from urllib.parse import quote

                gone = node.call("DELETE", f"/api/pair/{quote(args.value, safe='')}")
                print(json.dumps(gone) if args.json else
                      f"removed {gone['name']} ({gone['node_id']})")
            return 0
        node = _LocalNode(state_dir)
        if args.action == "add":
            got = node.call("POST", "/api/pair/add", {"uri": args.value})
            print(json.dumps(got) if args.json else
                  f"paired with {got['name']} ({got['node_id']})")
            return 0
        got = node.call("POST", "/api/pair/offer", {"ttl": args.ttl})
        if args.png:
            qr_png(got["uri"], args.png)
        if args.json:
            print(json.dumps(got))
        else:
            import time as _time

            print(qr_text(got["uri"]))
            print(got["uri"])
            left = int(got["expires_at"] - _time.time())
            print(f"\none-time code for {got['node_id']}, valid for {left} s: on the other"
                  " node run\n  fl-node pair add '<the URI above>'")
            if args.png:
                print(f"QR code written to {args.png}")
        return 0
    except RuntimeError as exc:
        print(f"fl-node pair: {exc}", file=sys.stderr)
        return 1


def _print_peers(peers: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(peers, indent=2))
        return
    if not peers:
        print("no paired nodes")
    for p in peers:
        print(f"{p['node_id']}  {p['name']:<16} {p['source']}")


def _pair_offline(args: argparse.Namespace, state_dir: str) -> int:
    """list/remove on the trust store file when the node is not running."""
    from node.trust.store import TrustStore

    try:
        store = TrustStore(state_dir)
        if args.action == "list":
            _print_peers([{"node_id": p.node_id, "name": p.name, "source": p.source,
                           "added_at": p.added_at} for p in store.entries()], args.json)
            return 0
        gone = store.remove(args.value)
    except ValueError as exc:
        print(f"fl-node pair: {exc}", file=sys.stderr)
        return 1
    if gone is None:
        print(f"fl-node pair: no paired node {args.value!r}", file=sys.stderr)
        return 1
    print(f"removed {gone.name} ({gone.node_id})")
    return 0


def format_status(s: dict[str, Any]) -> str:
    """A short human summary of a status object."""
    acc = "-" if s.get("accuracy") is None else f"{s['accuracy']:.4f}"
    loss = "-" if s.get("loss") is None else f"{s['loss']:.4f}"
    lines = [
        f"{s['name']} ({s['node_id']})  federation {s.get('federation', '?')}",
        f"state {s['state']}  round {s['round']}/{s['rounds_total']}  accuracy {acc}"
        f"  loss {loss}",
        f"aggregator {s.get('aggregator') or '-'}  model {s['model_hash'][:16]}",
        f"mode {s.get('mode', '-')}  quorum {s.get('quorum', {}).get('have', '-')}"
        f"/{s.get('quorum', {}).get('need', '-')}  offline steps {s.get('offline_steps', 0)}",
        f"peers ({len(s['peers'])}):",
    ]
    for p in s["peers"]:
        rtt = "-" if p.get("rtt_ms") is None else f"{p['rtt_ms']:.0f} ms"
        lines.append(f"  {p['name']:<12} {p['node_id']}  {p['address']:<21} {p['state']:<10}"
                     f" rtt {rtt}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fl-node` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "start":
        return cmd_start(args)
    if args.command == "status":
        return cmd_status(args)
    if args.command == "token":
        return cmd_token(args)
    if args.command == "tui":
        return cmd_tui(args)
    if args.command == "pair":
        return cmd_pair(args)
    if args.command == "demo":
        from node.cli.demo import run_demo

        return run_demo(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
