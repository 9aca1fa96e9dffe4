"""The ``fl-node`` argument parser: every command, flag, help text and default.

Defaults shown in help come from ``NodeConfig`` (node/config.py), which also reads TOML
and the environment; a new flag needs a ``NodeConfig`` field and an entry here.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from node.config import DATASETS, LOG_LEVELS, PARTITIONS, NodeConfig

EXIT_USAGE = 2


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
    _start_parser(sub, d)
    demo = sub.add_parser("demo", help="run several nodes on this machine and report")
    demo.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3)")
    demo.add_argument("--base-dir", help="state dirs go here (default: a temporary dir)")
    add_node_options(demo)
    _local_parsers(sub, d)
    return parser


def _start_parser(sub: Any, d: NodeConfig) -> None:
    """``fl-node start``: every option of a node."""
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
    _learning_options(start)
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


def _learning_options(start: argparse.ArgumentParser) -> None:
    """Aggregation, compression and privacy options of ``start``."""
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


def _local_parsers(sub: Any, d: NodeConfig) -> None:
    """The commands that talk to a local or running node: pair, token, tui, status."""
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


def _local_node_options(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--state-dir", help="state dir of the local node (default: that of"
                        " --name)")
    parser.add_argument("--name", default=name, help=f"name of the local node (default"
                        f" {name})")
