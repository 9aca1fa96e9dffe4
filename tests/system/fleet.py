"""Real `fl-node start` processes on namespace hosts (see netns.Hosts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e.cluster import REPO, fixed_identity, poll_until
from tests.system.netns import Hosts

PEER_PORT = 7700
WEB_PORT = 7800
SECRET = "system test federation secret"

GET = ("import sys, urllib.request; print(urllib.request.urlopen("
       f"'http://127.0.0.1:{WEB_PORT}' + sys.argv[1], timeout=3).read().decode())")


@dataclass
class HostNode:
    """A node running on one namespace host."""

    hosts: Hosts
    host: str
    name: str
    state_dir: Path

    @property
    def log(self) -> str:
        path = self.state_dir / "node.log"
        return path.read_text() if path.exists() else ""

    def get(self, path: str) -> Any:
        """GET a JSON document from the node's web API, from inside its host."""
        res = self.hosts.run(self.host, [sys.executable, "-I", "-S", "-c", GET, path],
                             timeout=20)
        if res.returncode != 0:
            raise OSError(f"{self.name}: {path} unavailable: {res.stderr.strip()[-300:]}")
        return json.loads(res.stdout)

    def status(self) -> dict[str, Any]:
        return self.get("/api/status")

    def metrics(self) -> list[dict[str, Any]]:
        return self.get("/api/metrics")["rounds"]


def start_node(hosts: Hosts, host: str, base: Path, *args: str, secret: str | None = SECRET,
               label: str | None = None, mdns_interface: bool = True) -> HostNode:
    """Start `fl-node start` on ``host`` with mDNS on its eth0 address (or, without
    ``mdns_interface``, on every interface of its namespace: the default)."""
    name = label or f"node-{host}"
    sd = base / name
    fixed_identity(sd, name)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("FL_NODE_FEDERATION_SECRET", None)
    if secret is not None:
        env["FL_NODE_FEDERATION_SECRET"] = secret
    cmd = [sys.executable, "-m", "node.cli.main", "start", "--name", name, "--state-dir", str(sd),
           "--host", "0.0.0.0", "--port", str(PEER_PORT), "--web-port", str(WEB_PORT),
           *(("--mdns-interface", hosts.ip(host)) if mdns_interface else ()),
           "--log-file", str(sd / "node.log"), "--dataset", "digits", *args]
    with open(sd / "stderr.log", "wb") as err:
        hosts.popen(host, cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    return HostNode(hosts, host, name, sd)


def wait(pred, timeout: float, what: str, nodes: list[HostNode]) -> None:  # noqa: ANN001
    """Poll ``pred`` (see tests.e2e.cluster.poll_until) every 0.3 s."""
    poll_until(pred, timeout, what, nodes, interval=0.3)
