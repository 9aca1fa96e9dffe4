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
from typing import TYPE_CHECKING, Any

from node.cli.parser import EXIT_USAGE, build_parser
from node.common.endpoint import endpoint_url, read_endpoint
from node.common.statelock import StateDirBusy, StateLock
from node.config import ConfigError, NodeConfig, build_config, is_loopback

if TYPE_CHECKING:
    from node.runtime.learner import Learner

#: Set in the node process that ``fl-node start --tui`` runs, so that it never runs a UI.
TUI_CHILD_ENV = "FL_NODE_TUI_CHILD"


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
    """Run one node until SIGINT/SIGTERM. Exit 2 at once, writing nothing, if a running
    node holds the state dir (its lock, node/common/statelock.py, lives as long as it)."""
    try:
        flags = _flags(args, {"command", "config", "tui"})
        for key in ("peers", "mdns_interfaces", "web_allowed_hosts", "plugins"):
            if key in flags:
                flags[key] = tuple(flags[key])
        config = build_config(flags, config_file=args.config)
    except ConfigError as exc:
        print(f"fl-node start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    lock = StateLock(config.resolved_state_dir)
    tui_parent = args.tui and not os.environ.get(TUI_CHILD_ENV)
    try:
        if tui_parent:
            lock.check()  # the node, our child, takes the lock: here only a clear refusal
        else:
            lock.acquire()  # before anything is written to the state dir (log, key, ...)
    except StateDirBusy as exc:
        print(f"fl-node start: {exc}; stop it first or use another --state-dir",
              file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"fl-node start: cannot lock the state dir: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if tui_parent:
        return _start_with_tui(config)
    try:
        return _run_node(config)
    finally:
        lock.release()


def _run_node(config: NodeConfig) -> int:
    """Build the node of ``config`` and run it until it stops; the exit code."""
    setup_logging(config.log_level, config.log_file, config.name)
    if not is_loopback(config.web_host):
        logging.getLogger("fl-node").warning(
            "--web-public: the web API listens on %s, reachable from other machines; every"
            " change needs the API token, but anyone there can read the status",
            config.web_host)
    # `kill -USR1 PID` prints every thread's stack to stderr: for a node that seems stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    learner = _torch_learner(config)
    if learner is None:
        return EXIT_USAGE
    from node.runtime.build import build_node
    from node.runtime.supervisor import NodeFailed, install_signal_handlers

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


def _torch_learner(config: NodeConfig) -> Learner | None:
    """The PyTorch learner for ``config`` (None after printing why it cannot be made)."""
    import torch

    from ml.learner import TorchLearner
    from ml.privacy import DPConfig
    from ml.strategies import parse_strategy

    torch.set_num_threads(1)
    try:
        load_plugins(config.plugins)
        strategy = parse_strategy(config.strategy, mu=config.mu, beta=config.trim_beta,
                                  f=config.krum_f, m=config.multi_krum_m, eta=config.server_lr,
                                  clip_norm=config.clip_norm)
        dp = DPConfig(target_epsilon=config.target_epsilon, delta=config.delta,
                      max_grad_norm=config.max_grad_norm,
                      noise_multiplier=config.noise_multiplier) if config.dp else None
        return TorchLearner(
            dataset=config.dataset, model=config.model, data_dir=config.data_dir,
            download=config.download, partition=config.partition, alpha=config.alpha,
            num_partitions=config.num_partitions, partition_index=config.partition_index,
            seed=config.seed, local_epochs=config.local_epochs, batch_size=config.batch_size,
            lr=config.lr, strategy=strategy, dp=dp, rounds=config.rounds,
            ledger_path=Path(config.resolved_state_dir) / "privacy.json",
        )
    except (ValueError, OSError) as exc:  # bad data files, unknown model, ...
        print(f"fl-node start: {exc}", file=sys.stderr)
        return None


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
