"""Where a running node can be reached: its endpoint file, and URLs for local tools.

A running node writes ``state_dir/endpoint.json`` (pid, node id, peer and web ports, web
host) once its ports are bound, and removes it on exit. ``fl-node tui``, ``pair``,
``start --tui`` and the demo read it to find the node's web API on this machine.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from pathlib import Path
from typing import Any

from node.common.files import atomic_write

ENDPOINT_FILE = "endpoint.json"
#: Bind addresses that mean "every interface": a local client connects to loopback.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


def local_host(bind_host: str) -> str:
    """The host a client on this machine uses for a server bound to ``bind_host``, as it
    goes in a URL (IPv6 in brackets): ``0.0.0.0`` gives 127.0.0.1, ``::`` gives [::1]."""
    host = bind_host.strip("[]")
    if bind_host in WILDCARD_HOSTS:
        return "[::1]" if ":" in host else "127.0.0.1"
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    except ValueError:
        pass  # a host name
    return host


def local_url(bind_host: str, port: int) -> str:
    """``http://HOST:PORT`` of a server bound to ``bind_host`` on this machine."""
    return f"http://{local_host(bind_host)}:{port}"


def write_endpoint(state_dir: Path, *, node_id: str, peer_port: int, web_port: int,
                   web_host: str) -> None:
    """Publish where this node listens (atomically, readable by local tools)."""
    atomic_write(state_dir / ENDPOINT_FILE, json.dumps({
        "pid": os.getpid(), "node_id": node_id, "peer_port": peer_port,
        "web_port": web_port, "web_host": web_host,
    }).encode(), mode=0o644)


def read_endpoint(state_dir: Path) -> dict[str, Any]:
    """The endpoint of the node running on ``state_dir`` (OSError or ValueError if none)."""
    data = json.loads((state_dir / ENDPOINT_FILE).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("web_port"), int):
        raise ValueError(f"{state_dir / ENDPOINT_FILE}: not an endpoint file")
    return data


def endpoint_url(endpoint: dict[str, Any]) -> str:
    """The web API's base URL for a client on this machine."""
    return local_url(str(endpoint.get("web_host", "127.0.0.1")), int(endpoint["web_port"]))


def local_addresses() -> list[str]:
    """This host's non-loopback IPv4 addresses (for announcements), else 127.0.0.1."""
    import psutil

    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                out.append(a.address)
    return sorted(out) or ["127.0.0.1"]


def advertised_addresses(bind_host: str, port: int, limit: int = 8) -> tuple[str, ...]:
    """``HOST:PORT`` strings peers may dial for a peer port bound to ``bind_host``."""
    hosts = local_addresses() if bind_host in WILDCARD_HOSTS else [bind_host]
    return tuple(f"{h}:{port}" for h in hosts[:limit])
