"""The ``fl-node`` argument parser: every command, flag, help text and default.

The options are tables, one row per flag, which a small loop turns into ``add_argument``
calls. Defaults shown in help come from ``NodeConfig`` (node/config.py), which also reads
TOML and the environment; a new flag needs a ``NodeConfig`` field and a row here.
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


#: An option: its argument group (None: the command's own options), its flag, and the
#: keywords of ``add_argument``. A ``help`` text may show a default as ``{d.FIELD}``,
#: filled in from ``NodeConfig()``.
Option = tuple[str | None, str, dict[str, Any]]

TRAINING = "training"
LEARNING = "aggregation, compression and privacy (docs/strategies.md)"

#: The training options, shared by ``start`` (all of them) and ``demo``.
TRAINING_OPTIONS: tuple[Option, ...] = (
    (TRAINING, "--dataset", {"choices": DATASETS, "help": "data set (default {d.dataset})"}),
    (TRAINING, "--data-dir", {"help": "where mnist / fashion-mnist / cifar10 files live"}),
    (TRAINING, "--download", {"action": "store_true", "default": None,
                              "help": "download a torchvision data set into --data-dir if"
                              " missing"}),
    (TRAINING, "--model", {"help": "model name from the registry: cnn, mlp, linear"
                           " (default {d.model})"}),
    (TRAINING, "--partition", {"choices": PARTITIONS, "help": "how data is split (default"
                               " {d.partition})"}),
    (TRAINING, "--alpha", {"type": float, "help": "Dirichlet concentration (default"
                           " {d.alpha})"}),
    (TRAINING, "--seed", {"type": int, "help": "shared seed: genesis model, partitions"
                          " (default {d.seed})"}),
    (TRAINING, "--rounds", {"type": int, "help": "rounds to train (default {d.rounds})"}),
    (TRAINING, "--local-epochs", {"type": int, "help": "local epochs per round (default"
                                  " {d.local_epochs})"}),
    (TRAINING, "--batch-size", {"type": int, "help": "batch size (default {d.batch_size})"}),
    (TRAINING, "--lr", {"type": float, "help": "learning rate (default {d.lr})"}),
    (TRAINING, "--round-timeout", {"type": float, "help": "seconds an aggregator waits for"
                                   " updates (default {d.round_timeout:g})"}),
    (TRAINING, "--log-level", {"type": str.upper, "choices": LOG_LEVELS,
                               "help": "(default {d.log_level})"}),
    (TRAINING, "--log-file", {"help": "also write the log to this file"}),
)

#: ``fl-node start``: every option of a node, in the order ``--help`` shows them.
START_OPTIONS: tuple[Option, ...] = (
    (None, "--config", {"help": "TOML file with the same keys as these flags"}),
    (None, "--name", {"help": "human name of this node (default {d.name})"}),
    (None, "--state-dir", {"help": "key, sequence numbers, endpoint file (default"
                           " ~/.local/state/fl-node/NAME)"}),
    (None, "--federation", {"help": "federation name (default {d.federation})"}),
    (None, "--host", {"help": "address for peer traffic (default {d.host})"}),
    (None, "--port", {"type": int, "help": "peer port, 0 = any free (default {d.port})"}),
    (None, "--web-host", {"help": "address of the web API (default {d.web_host})"}),
    (None, "--web-port", {"type": int, "help": "web API port, 0 = any free (default"
                          " {d.web_port})"}),
    (None, "--peer", {"action": "append", "dest": "peers", "metavar": "[KEY@]HOST:PORT",
                      "help": "a peer to connect to (repeatable); with KEY (node id or"
                      " public key) that key is required of it, and trusted"}),
    (None, "--federation-secret-file", {"metavar": "FILE",
                                        "help": "file holding the federation secret (or set"
                                        " FL_NODE_FEDERATION_SECRET); members prove it"
                                        " without sending it"}),
    (None, "--open", {"action": "store_true", "default": None,
                      "help": "trust every node of the same federation name (INSECURE:"
                      " local demos only)"}),
    (None, "--no-mdns", {"dest": "mdns", "action": "store_false", "default": None,
                         "help": "do not announce or discover nodes by mDNS"}),
    (None, "--mdns-interface", {"dest": "mdns_interfaces", "action": "append",
                                "metavar": "IP", "help": "address of an interface for mDNS"
                                " (repeatable; default all)"}),
    (None, "--announce-interval", {"type": float, "help": "seconds between gossiped"
                                   " announcements (default 2)"}),
    (None, "--fanout", {"type": int, "help": "peers each gossip message is forwarded to"
                        " (default 4)"}),
    (None, "--min-peers", {"type": _positive_int,
                           "help": "peers an elected round needs; below that the node trains"
                           " offline and averages with the peers it reaches (default: a"
                           " majority of the --peer federation, (peers+1)//2; 0 without"
                           " --peer)"}),
    (None, "--wait-peers", {"type": _positive_int,
                            "help": "peers a fresh node waits for before round 1 (default:"
                            " every --peer, at least --min-peers)"}),
    (None, "--start-timeout", {"type": float, "help": "seconds to wait for --wait-peers"
                               " before starting anyway (default {d.start_timeout:g})"}),
    (None, "--num-partitions", {"type": int, "help": "how many shards the data is split"
                                " into (one per node)"}),
    (None, "--partition-index", {"type": int, "help": "which shard this node trains on"}),
    (None, "--plugin", {"dest": "plugins", "action": "append", "metavar": "MODULE",
                        "help": "import MODULE first: it may register data sets and models"
                        " (docs/extending.md; repeatable)"}),
    (LEARNING, "--strategy", {"help": "fedavg (default), fedprox, fedadam, fedyogi, median,"
                              " trimmed-mean, krum, multi-krum, or package.module:Name (your"
                              " own)"}),
    (LEARNING, "--mu", {"type": float, "help": "FedProx proximal term (default 0.01)"}),
    (LEARNING, "--trim-beta", {"type": float, "help": "trimmed mean: fraction cut at each"
                               " end (default 0.2)"}),
    (LEARNING, "--krum-f", {"type": int, "help": "Krum/Multi-Krum: attackers tolerated"
                            " (default 1)"}),
    (LEARNING, "--multi-krum-m", {"type": int, "help": "Multi-Krum: updates averaged"
                                  " (default n - f)"}),
    (LEARNING, "--server-lr", {"type": float, "help": "FedAdam/FedYogi server learning"
                               " rate"}),
    (LEARNING, "--clip-norm", {"type": float, "help": "clip each update's change to this L2"
                               " norm before aggregating"}),
    (LEARNING, "--update-norm-bound", {
        "type": float, "help": "refuse an update whose change from the global model has an L2"
        " norm over this multiple of the global model's (at least 1); its sender gets a"
        " strike (default {d.update_norm_bound:g})"}),
    (LEARNING, "--compress", {"help": "updates on the wire: none (default), fp16, int8,"
                              " topk:FRACTION (with error feedback)"}),
    (LEARNING, "--dp", {"action": "store_true", "default": None,
                        "help": "local DP-SGD (Opacus) with a lifetime privacy budget"}),
    (LEARNING, "--target-epsilon", {"type": float, "help": "the budget: training stops"
                                    " before it would be exceeded"}),
    (LEARNING, "--delta", {"type": float, "help": "DP delta (default 1e-5)"}),
    (LEARNING, "--max-grad-norm", {"type": float, "help": "DP per-sample gradient clip"
                                   " (default 1.0)"}),
    (LEARNING, "--noise-multiplier", {"type": float, "help": "DP noise (default: derived"
                                      " from --target-epsilon for the planned rounds)"}),
    (None, "--web-public", {"action": "store_true", "default": None,
                            "help": "allow --web-host to be a non-loopback address (the API"
                            " token still guards every change; a warning is logged)"}),
    (None, "--web-allowed-host", {"dest": "web_allowed_hosts", "action": "append",
                                  "metavar": "HOST[:PORT]", "help": "another Host/Origin"
                                  " name the web API answers to (repeatable; e.g. a reverse"
                                  " proxy's name)"}),
    (None, "--tui", {"action": "store_true", "default": None,
                     "help": "show the terminal UI in this terminal while the node runs (the"
                     " node logs to a file)"}),
    (None, "--max-message-size", {"type": int, "help": "largest accepted frame, bytes"}),
    *TRAINING_OPTIONS,
)

#: ``fl-node demo``: several nodes on this machine.
DEMO_OPTIONS: tuple[Option, ...] = (
    (None, "--nodes", {"type": int, "default": 3, "help": "how many nodes (default 3)"}),
    (None, "--base-dir", {"help": "state dirs go here (default: a temporary dir)"}),
    *TRAINING_OPTIONS,
)


def add_options(parser: argparse.ArgumentParser, options: tuple[Option, ...],
                defaults: NodeConfig) -> None:
    """Add each option of the table to ``parser`` (or to its group, made on first use),
    with the defaults its help shows taken from ``defaults``."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for group, flag, kwargs in options:
        target: argparse._ActionsContainer = parser
        if group is not None:
            if group not in groups:
                groups[group] = parser.add_argument_group(group)
            target = groups[group]
        if "help" in kwargs:
            kwargs = {**kwargs, "help": kwargs["help"].format(d=defaults)}
        target.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The `fl-node` argument parser."""
    parser = _Parser(prog="fl-node", description="Peer-to-peer federated-learning node.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = NodeConfig()
    add_options(sub.add_parser("start", help="run one node"), START_OPTIONS, d)
    add_options(sub.add_parser("demo", help="run several nodes on this machine and report"),
                DEMO_OPTIONS, d)
    _local_parsers(sub, d)
    return parser


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
