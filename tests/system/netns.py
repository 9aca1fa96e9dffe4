"""Several "hosts" on one machine: Linux network namespaces on a private bridge, with multicast.

    with Hosts(("a", "b", "c")) as hosts:
        node = hosts.popen("a", [sys.executable, "-m", "node.cli.main", "start", ...])
        hosts.run("b", ["python3", "-c", "..."])
        hosts.block("a", "c")          # line topology a - b - c
        hosts.cut("b")                 # b loses its link; hosts.heal("b") restores it

Layout of one instance (id = 6 random hex chars, from `secrets`, not `random`, which the
test suite seeds):

    fl<id>_br      bridge namespace: br0 (multicast_snooping 0) + one veth v<id><i> per host
    fl<id>-<name>  one namespace per host: lo, eth0 = <subnet>.<i> (i = 1, 2, ...),
                   route 224.0.0.0/4 dev eth0 (multicast), no default route, so traffic to
                   anything outside the subnet fails at once instead of leaving the machine

Every namespace is private, so two instances never collide even with the same subnet; the
subnet is still random (10.77-99.x.0/24) to keep logs of parallel runs apart.

Cleanup (nothing is left behind, even when the test body raises):
1. `__exit__`: callbacks given to `defer()` (last first), SIGTERM to the process group of every `popen` process, SIGKILL after a grace
   period, then SIGKILL to *any* process still inside one of our namespaces (found by the
   namespace inode in /proc/*/ns/net, so daemons that forked away are caught too), reap, then
   `ip netns del` every namespace and remove the owner record.
2. atexit, and SIGTERM/SIGHUP (when no other handler is installed): the same for every live
   instance, then the signal is re-raised with its default action.
3. A reaper process per instance (`python netns.py --reap <prefix>`, own session, stdin pipe
   from us): when the pipe closes without a clean `__exit__` (the test process was SIGKILLed,
   or called os._exit as pytest-timeout's thread method does), it does step 1 itself.
4. `cleanup_stale()` (run by every `Hosts.__enter__`): deletes namespaces named
   `fl<6 hex>[-_]*` whose owner is not a live process. The owner is recorded in
   /run/fl-system-tests/<prefix> as "pid starttime" before any namespace is made, so a
   parallel run's namespaces (owner alive) are never touched, and a crashed run's are removed
   whatever their age.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

OWNER_DIR = Path("/run/fl-system-tests")
NETNS_DIR = Path("/run/netns")
NS_PATTERN = re.compile(r"^(fl[0-9a-f]{6})[-_]")
HOST_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")
NFT_TABLE = "flsys"

_live: dict[str, "Hosts"] = {}
_live_lock = threading.Lock()
_handlers_installed = False


# --------------------------------------------------------------------------- helpers

def require_root_and_tools(*extra: str) -> None:
    """Raise RuntimeError (so a system test fails, never skips) unless we are root and `ip`
    (plus any `extra` tools, e.g. "nft", "avahi-daemon") is installed."""
    problems = []
    if os.geteuid() != 0:
        problems.append(f"system tests need root (euid is {os.geteuid()})")
    missing = [t for t in ("ip", *extra) if _which(t) is None]
    if missing:
        problems.append(f"missing tools: {', '.join(missing)} (run scripts/system-deps)")
    if problems:
        raise RuntimeError("; ".join(problems))


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")


def _sh(cmd: Sequence[str], *, input: str | None = None, check: bool = True,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(cmd), input=input, capture_output=True, text=True,
                         timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()}")
    return res


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: starttime in clock ticks


def _owner_alive(prefix: str) -> bool:
    try:
        pid_s, start = (OWNER_DIR / prefix).read_text().split()
    except (OSError, ValueError):
        return False
    return _proc_start_time(int(pid_s)) == start


def list_namespaces() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def pids_in(namespaces: Iterable[str]) -> dict[str, list[int]]:
    """Processes (by PID) whose network namespace is one of `namespaces` (by name)."""
    want: dict[tuple[int, int], str] = {}
    for ns in namespaces:
        try:
            st = os.stat(NETNS_DIR / ns)
        except OSError:
            continue
        want[(st.st_dev, st.st_ino)] = ns
    found: dict[str, list[int]] = {ns: [] for ns in want.values()}
    if not want:
        return found
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue
        ns = want.get((st.st_dev, st.st_ino))
        if ns is not None:
            found[ns].append(int(entry.name))
    return found


def _kill_all_in(namespaces: Sequence[str], deadline: float = 5.0) -> None:
    """SIGKILL every process inside `namespaces` until none is left (or `deadline` s)."""
    end = time.monotonic() + deadline
    while True:
        pids = [p for ps in pids_in(namespaces).values() for p in ps]
        if not pids or time.monotonic() > end:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def _delete_namespaces(namespaces: Sequence[str]) -> None:
    _kill_all_in(namespaces)
    for ns in namespaces:
        if (NETNS_DIR / ns).exists():
            res = _sh(["ip", "netns", "del", ns], check=False)
            if res.returncode != 0 and (NETNS_DIR / ns).exists():
                # a process (now killed) may still pin it for a moment: retry once
                time.sleep(0.1)
                _sh(["ip", "netns", "del", ns], check=False)


def _cleanup_prefix(prefix: str) -> None:
    """Kill everything in, and delete, every namespace of one instance (used by the reaper
    and by cleanup_stale). Host namespaces go before the bridge."""
    mine = [ns for ns in list_namespaces() if ns.startswith(prefix)]
    mine.sort(key=lambda ns: ns.endswith("_br"))
    _delete_namespaces(mine)
    (OWNER_DIR / prefix).unlink(missing_ok=True)


def cleanup_stale() -> list[str]:
    """Delete namespaces `fl<6 hex>[-_]*` whose owning process is dead (or unrecorded),
    with everything running in them, and stale owner records. Namespaces of live instances,
    in this or another process, are left alone. Returns the namespaces deleted."""
    gone: list[str] = []
    prefixes = {m.group(1) for ns in list_namespaces() if (m := NS_PATTERN.match(ns))}
    if OWNER_DIR.is_dir():
        prefixes |= {p.name for p in OWNER_DIR.iterdir() if re.fullmatch(r"fl[0-9a-f]{6}", p.name)}
    for prefix in sorted(prefixes):
        if prefix in _live or _owner_alive(prefix):
            continue
        gone += [ns for ns in list_namespaces() if ns.startswith(prefix)]
        _cleanup_prefix(prefix)
    return gone


def _cleanup_all_live() -> None:
    with _live_lock:
        live = list(_live.values())
    for hosts in live:
        hosts.close()


def _on_signal(signum: int, frame: Any) -> None:
    _cleanup_all_live()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_cleanup_all_live)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, _on_signal)


# --------------------------------------------------------------------------- Hosts

class Hosts:
    """Hosts on one bridge, as network namespaces. Use as a context manager."""

    def __init__(self, names: Sequence[str] = ("a", "b", "c"), subnet: str | None = None,
                 *, grace: float = 3.0) -> None:
        names = tuple(names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"host names must be non-empty and unique: {names}")
        bad = [n for n in names if not HOST_NAME.match(n)]
        if bad:
            raise ValueError(f"host names must match {HOST_NAME.pattern}: {bad}")
        if subnet is None:
            subnet = f"10.{77 + secrets.randbelow(23)}.{secrets.randbelow(256)}.0/24"
        self.subnet = ipaddress.ip_network(subnet)
        if self.subnet.num_addresses - 2 < len(names):
            raise ValueError(f"subnet {subnet} too small for {len(names)} hosts")
        self.names = names
        self.id = secrets.token_hex(3)
        self.prefix = f"fl{self.id}"
        self.bridge_ns = f"{self.prefix}_br"
        self.grace = grace
        hosts = list(self.subnet.hosts())
        self._ip = {n: str(hosts[i]) for i, n in enumerate(names)}
        self._veth = {n: f"v{self.id}{i}" for i, n in enumerate(names)}
        self._procs: list[subprocess.Popen[Any]] = []
        self._fw_ready: set[str] = set()
        self._blocked: set[frozenset[str]] = set()
        self._reaper: subprocess.Popen[bytes] | None = None
        self._created: list[str] = []
        self._deferred: list[Callable[[], Any]] = []
        self._closed = False

    # ---- topology

    def ns(self, name: str) -> str:
        """Namespace name of host `name` (for `ip -n` / `ip netns exec`)."""
        self._check(name)
        return f"{self.prefix}-{name}"

    def ip(self, name: str) -> str:
        """IPv4 address of host `name` on the bridge."""
        self._check(name)
        return self._ip[name]

    def _check(self, name: str) -> None:
        if name not in self._ip:
            raise KeyError(f"no host {name!r} (hosts: {', '.join(self.names)})")

    def __enter__(self) -> "Hosts":
        require_root_and_tools()
        cleanup_stale()
        _install_handlers()
        OWNER_DIR.mkdir(mode=0o755, exist_ok=True)
        me = os.getpid()
        (OWNER_DIR / self.prefix).write_text(f"{me} {_proc_start_time(me)}\n")
        with _live_lock:
            _live[self.prefix] = self
        self._reaper = subprocess.Popen(
            [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--reap", self.prefix],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        br = self.bridge_ns
        hosts = [self.ns(n) for n in self.names]
        self._created = [*hosts, br]  # deletion order: hosts, then bridge
        _sh(["ip", "-batch", "-"], input="".join(f"netns add {ns}\n" for ns in [br, *hosts]))
        lines = ["link set lo up",
                 "link add br0 type bridge mcast_snooping 0 stp_state 0",
                 "link set br0 up"]
        for n in self.names:
            v = self._veth[n]
            lines += [f"link add {v} type veth peer name eth0 netns {self.ns(n)}",
                      f"link set {v} master br0", f"link set {v} up"]
        _sh(["ip", "-n", br, "-batch", "-"], input="\n".join(lines) + "\n")
        plen = self.subnet.prefixlen
        for n in self.names:
            _sh(["ip", "-n", self.ns(n), "-batch", "-"], input=(
                "link set lo up\n"
                f"addr add {self._ip[n]}/{plen} dev eth0\n"
                "link set eth0 up\n"
                "route add 224.0.0.0/4 dev eth0\n"))

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process, delete every namespace. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            while self._deferred:
                try:
                    self._deferred.pop()()
                except Exception as e:  # cleanup goes on; the namespaces must go
                    print(f"netns: deferred cleanup failed: {e!r}", file=sys.stderr)
            self._stop_processes()
            _delete_namespaces(self._created or [self.ns(n) for n in self.names] + [self.bridge_ns])
            (OWNER_DIR / self.prefix).unlink(missing_ok=True)
        finally:
            with _live_lock:
                _live.pop(self.prefix, None)
            if self._reaper is not None:
                try:
                    self._reaper.stdin.close()  # type: ignore[union-attr]
                    self._reaper.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    self._reaper.kill()
                    self._reaper.wait()

    def _stop_processes(self) -> None:
        running = [p for p in self._procs if p.poll() is None]
        for p in running:
            _signal_group(p, signal.SIGTERM)
        end = time.monotonic() + self.grace
        while time.monotonic() < end and any(p.poll() is None for p in running):
            time.sleep(0.02)
        for p in running:
            if p.poll() is None:
                _signal_group(p, signal.SIGKILL)
        _kill_all_in(self._created)
        for p in self._procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - a process stuck in D state
                pass
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()

    def defer(self, fn: Callable[[], Any]) -> None:
        """Call `fn` at close, before processes are stopped (last deferred runs first)."""
        self._deferred.append(fn)

    # ---- processes

    def exec_prefix(self, name: str) -> list[str]:
        """The argv prefix that runs a command on host `name`."""
        return ["ip", "netns", "exec", self.ns(name)]

    def run(self, name: str, cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run `cmd` on host `name`. Defaults: capture_output=True, text=True,
        timeout=60 (all overridable); check is False unless given."""
        kw.setdefault("text", True)
        if not any(k in kw for k in ("stdout", "stderr", "capture_output")):
            kw["capture_output"] = True
        kw.setdefault("timeout", 60)
        kw.setdefault("stdin", subprocess.DEVNULL if "input" not in kw else None)
        if kw["stdin"] is None:
            del kw["stdin"]
        return subprocess.run([*self.exec_prefix(name), *cmd], **kw)

    def popen(self, name: str, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start `cmd` on host `name` in its own session (process group); it is stopped at
        exit (SIGTERM to the group, SIGKILL after `grace` s). Default stdin is /dev/null."""
        if self._closed or not self._created:
            raise RuntimeError("Hosts is not active (use it as a context manager)")
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen([*self.exec_prefix(name), *cmd], **kw)
        self._procs.append(p)
        return p

    def pids(self, name: str | None = None) -> list[int]:
        """PIDs of every process running on host `name` (or on any of our hosts)."""
        names = [name] if name else list(self.names)
        found = pids_in([self.ns(n) for n in names])
        return sorted(p for ps in found.values() for p in ps)

    # ---- faults

    def cut(self, name: str) -> None:
        """Take host `name`'s link down (its bridge-side veth): it reaches nobody."""
        _sh(["ip", "-n", self.bridge_ns, "link", "set", self._veth[self._c(name)], "down"])

    def heal(self, name: str) -> None:
        """Bring host `name`'s link back up."""
        _sh(["ip", "-n", self.bridge_ns, "link", "set", self._veth[self._c(name)], "up"])

    def _c(self, name: str) -> str:
        self._check(name)
        return name

    def block(self, a: str, b: str) -> None:
        """Drop every IPv4 packet between hosts a and b, both ways (multicast included).
        Rules live in the two hosts' own namespaces (nft, or iptables if nft is missing)."""
        self._check(a), self._check(b)
        if a == b:
            raise ValueError("cannot block a host from itself")
        pair = frozenset((a, b))
        if pair in self._blocked:
            return
        self._fw(a, self._ip[b], add=True)
        self._fw(b, self._ip[a], add=True)
        self._blocked.add(pair)

    def unblock(self, a: str, b: str) -> None:
        """Undo block(a, b)."""
        pair = frozenset((a, b))
        if pair not in self._blocked:
            return
        self._fw(a, self._ip[b], add=False)
        self._fw(b, self._ip[a], add=False)
        self._blocked.discard(pair)

    def _fw(self, host: str, peer_ip: str, *, add: bool) -> None:
        if _which("nft"):
            if host not in self._fw_ready:
                self.run(host, ["nft", "-f", "-"], check=True, input=(
                    f"table inet {NFT_TABLE} {{\n"
                    "  set blocked { type ipv4_addr; }\n"
                    "  chain input { type filter hook input priority -10; policy accept;"
                    " ip saddr @blocked drop; }\n"
                    "  chain output { type filter hook output priority -10; policy accept;"
                    " ip daddr @blocked drop; }\n"
                    "}\n"))
                self._fw_ready.add(host)
            verb = "add" if add else "delete"
            self.run(host, ["nft", verb, "element", "inet", NFT_TABLE, "blocked",
                            f"{{ {peer_ip} }}"], check=True)
        elif _which("iptables"):
            op = "-A" if add else "-D"
            self.run(host, ["iptables", "-w", op, "INPUT", "-s", peer_ip, "-j", "DROP"], check=True)
            self.run(host, ["iptables", "-w", op, "OUTPUT", "-d", peer_ip, "-j", "DROP"], check=True)
        else:
            raise RuntimeError("block() needs nft or iptables (run scripts/system-deps)")

    def __repr__(self) -> str:
        hosts = ", ".join(f"{n}={self._ip[n]}" for n in self.names)
        return f"<Hosts {self.prefix} {self.subnet} {hosts}>"


def _signal_group(p: subprocess.Popen[Any], sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass


def _reap(prefix: str) -> None:
    """Reaper: wait for the owner to close our stdin; clean up if it did not."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except OSError:
        pass
    if (OWNER_DIR / prefix).exists():
        _cleanup_prefix(prefix)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--reap":
        _reap(sys.argv[2])
    elif sys.argv[1:] == ["--cleanup-stale"]:
        print("\n".join(cleanup_stale()))
    else:
        sys.exit("usage: netns.py --reap PREFIX | --cleanup-stale")
