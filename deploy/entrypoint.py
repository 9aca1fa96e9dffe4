#!/usr/bin/env python3
"""The container's entry point: `fl-node start` with its state on the /data volume.

    fl-node-entrypoint [FLAGS...]        # exec `fl-node start FLAGS...` (what the image runs)
    fl-node-entrypoint COMMAND [ARGS...] # exec another command (`fl-node token ...`, `sh`)
    fl-node-entrypoint --healthcheck     # exit 0 if the node's /healthz answers 200

Configuration is fl-node's own: flags > FL_NODE_* variables > a TOML file > defaults. The
TOML file is the one given with --config, else $FL_NODE_CONFIG, else /etc/fl-node/node.toml
when it exists (mount one there). On top of fl-node's defaults the image changes three, each
only when none of the three sources sets it:

- the web API listens on 0.0.0.0 (--web-public), so that a port can be published; it still
  answers only to the Host names 127.0.0.1:PORT, localhost:PORT and --web-allowed-host;
- mDNS runs on the container's own addresses (one per attached network), not on loopback;
- the state dir is a *slot* of /data: /data/node-0, /data/node-1, ... The container takes
  the first slot that no other running container holds, by an exclusive flock on
  <slot>/.lock that the node keeps (the lock's file descriptor survives the exec) until it
  exits. With one volume per container that is always node-0, so the node keeps its key,
  trust store and checkpoints across restarts, `docker compose down`/`up` and image
  upgrades. When replicas share a volume (`docker compose up --scale`), each one gets a
  slot, hence its own identity; slot N > 0 also appends "-N" to the node's name.

The entry point refuses the placeholder secret of deploy/federation.env.example.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import urllib.error
import urllib.request
from typing import Any

DATA = "/data"
DEFAULT_CONFIG = "/etc/fl-node/node.toml"
MAX_SLOTS = 256
PLACEHOLDER = "replace-me"  # deploy/federation.env.example's secret starts with this
IMAGE_DEFAULTS = {"web_host": "0.0.0.0", "web_public": "true"}


def fail(message: str) -> None:
    """Stop the container with a one-line reason (exit 2, like a bad fl-node option)."""
    print(f"fl-node-entrypoint: {message}", file=sys.stderr)
    sys.exit(2)


def config_file(flags: dict[str, Any]) -> str | None:
    """The TOML file fl-node will read, if any."""
    if flags.get("config"):
        return str(flags["config"])
    if os.environ.get("FL_NODE_CONFIG"):
        return os.environ["FL_NODE_CONFIG"]
    return DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None


def file_settings(path: str | None) -> dict[str, Any]:
    """The keys set in the TOML file (fl-node reports a bad file itself, so: {} then)."""
    if path is None:
        return {}
    from node.config import ConfigError, from_toml

    try:
        return from_toml(path)
    except ConfigError:
        return {}


def parse_flags(args: list[str]) -> dict[str, Any]:
    """The `fl-node start` flags given (argparse exits 2 with the reason if they are bad)."""
    from node.cli.main import build_parser

    ns = build_parser().parse_args(["start", *args])
    return {k: v for k, v in vars(ns).items() if v is not None and k != "command"}


def claim_slot(root: str) -> tuple[int, str]:
    """Lock the first free slot under ``root``; the lock is held by our open descriptor,
    which is inherited by the node process (exec keeps it)."""
    for index in range(MAX_SLOTS):
        slot = os.path.join(root, f"node-{index}")
        try:
            os.makedirs(slot, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(slot, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except PermissionError:
            fail(f"cannot write {root} as uid {os.getuid()}: mount a volume there that this"
                 f" user can write (e.g. chown -R {os.getuid()} on a bind-mounted directory)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                continue  # a running replica holds this slot
            raise
        os.set_inheritable(fd, True)
        return index, slot
    fail(f"all {MAX_SLOTS} state slots in {root} are in use")
    raise AssertionError  # unreachable


def container_addresses() -> list[str]:
    """This container's non-loopback IPv4 addresses (one per attached network)."""
    import socket

    import psutil

    return sorted(a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family == socket.AF_INET and not a.address.startswith("127."))


def healthcheck() -> int:
    """0 if GET /healthz on the node's web port (in this container) answers 200."""
    port = os.environ.get("FL_NODE_WEB_PORT") or file_settings(config_file({})).get(
        "web_port", 7800)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except (OSError, urllib.error.URLError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str]) -> None:
    """Exec `fl-node start` (or the command given) with the image's defaults applied."""
    if argv[:1] == ["--healthcheck"]:
        sys.exit(healthcheck())
    if argv and not argv[0].startswith("-"):
        os.execvp(argv[0], argv)  # e.g. `docker run IMAGE fl-node token --state-dir ...`
    if os.environ.get("FL_NODE_FEDERATION_SECRET", "").startswith(PLACEHOLDER):
        fail("FL_NODE_FEDERATION_SECRET is still the example's placeholder: put a real"
             " secret in the env file (openssl rand -hex 32)")
    args = list(argv)
    flags = parse_flags(args)
    settings = file_settings(config_file(flags))

    def given(key: str) -> bool:
        return key in flags or f"FL_NODE_{key.upper()}" in os.environ or key in settings

    for key, value in IMAGE_DEFAULTS.items():
        if not given(key):
            os.environ[f"FL_NODE_{key.upper()}"] = value
    if not given("mdns_interfaces") and (addresses := container_addresses()):
        # mDNS on the container's own networks, never on its loopback. (Also: fl-node
        # without --mdns-interface passes "all" to zeroconf, which zeroconf 0.154 rejects.)
        os.environ["FL_NODE_MDNS_INTERFACES"] = ",".join(addresses)
    if not given("state_dir"):
        index, slot = claim_slot(DATA)
        os.environ["FL_NODE_STATE_DIR"] = slot
        if index > 0:
            base = flags.get("name") or os.environ.get("FL_NODE_NAME") or settings.get(
                "name", "node")
            args += ["--name", f"{base}-{index}"]
        print(f"fl-node-entrypoint: state dir {slot}", file=sys.stderr, flush=True)
    if "config" not in flags and (path := config_file(flags)):
        args = ["--config", path, *args]
    os.execvp("fl-node", ["fl-node", "start", *args])


if __name__ == "__main__":
    main(sys.argv[1:])
