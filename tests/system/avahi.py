"""An independent mDNS browser (Avahi) inside one host namespace, to check what nodes advertise.

    with Hosts(("a", "b")) as hosts, Avahi(hosts, "b") as avahi:
        services = avahi.browse("_fl-node._tcp")          # [{"name", "address", "port", "txt", ...}]
        svc = avahi.wait_for(lambda s: s["txt"].get("id") == "X")

Each instance runs, on host `name`:
- a private D-Bus system bus: `dbus-daemon --config-file=CONF --nofork --nopidfile`, where CONF
  is a <type>system</type> bus listening on unix:path=<tmpdir>/bus with an allow-all policy;
- `avahi-daemon --no-chroot --no-drop-root --no-rlimits -f <tmpdir>/avahi-daemon.conf`
  (allow-interfaces=eth0, use-ipv6=no, no wide-area, own host-name, publishing off unless
  asked), with DBUS_SYSTEM_BUS_ADDRESS pointing at the private bus.
avahi-daemon hardcodes /run/avahi-daemon/ for its pid file and socket and refuses to start
while that pid file names a live process ("Daemon already running on PID n"): a second
instance on the machine fails. So each one runs under `unshare -m` with a fresh tmpfs on /run
(its own /run/avahi-daemon/; the real /run, and any real system bus there, stay invisible).
Both daemons are started through Hosts.popen and close() is registered with Hosts.defer, so
Hosts' cleanup stops them and removes the tmpdir even if this context manager's exit never
runs.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from tests.system.netns import Hosts, require_root_and_tools

BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

AVAHI_CONF = """[server]
host-name={host_name}
use-ipv4=yes
use-ipv6=no
allow-interfaces=eth0
enable-dbus=yes
ratelimit-interval-usec=1000000
ratelimit-burst=1000

[wide-area]
enable-wide-area=no

[publish]
disable-publishing={disable_publishing}
publish-hinfo=no
publish-workstation=no

[reflector]
enable-reflector=no
"""

# run avahi-daemon with its own /run (see module docstring); "$@" is the daemon's argv
PRIVATE_RUN = "mount -t tmpfs -o mode=755 fl-avahi /run && mkdir /run/avahi-daemon && exec \"$@\""

Service = dict[str, Any]


class Avahi:
    """avahi-daemon + a private D-Bus system bus on one host of `hosts`."""

    def __init__(self, hosts: Hosts, name: str, *, publish: bool = False,
                 start_timeout: float = 10.0) -> None:
        hosts.ip(name)  # KeyError for an unknown host
        self.hosts = hosts
        self.name = name
        self.publish = publish
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self._bus: subprocess.Popen[bytes] | None = None
        self._daemon: subprocess.Popen[bytes] | None = None
        self._logs: list[Any] = []

    # ---- lifecycle

    @property
    def bus_address(self) -> str:
        assert self.dir is not None, "Avahi is not running"
        return f"unix:path={self.dir / 'bus'}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for Avahi clients (avahi-browse, avahi-publish, ...)."""
        return dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.bus_address)

    @property
    def log(self) -> str:
        """avahi-daemon's output so far (and dbus-daemon's, after a marker)."""
        if self.dir is None:
            return ""
        parts = []
        for f in ("avahi-daemon.log", "dbus-daemon.log"):
            p = self.dir / f
            parts.append(f"--- {f}\n" + (p.read_text(errors="replace") if p.exists() else ""))
        return "\n".join(parts)

    def __enter__(self) -> "Avahi":
        require_root_and_tools("dbus-daemon", "avahi-daemon", "avahi-browse", "unshare")
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.hosts.prefix}-avahi-{self.name}-"))
        self.hosts.defer(self.close)
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        assert self.dir is not None
        sock = self.dir / "bus"
        (self.dir / "bus.conf").write_text(BUS_CONF.format(socket=sock))
        (self.dir / "avahi-daemon.conf").write_text(AVAHI_CONF.format(
            host_name=f"{self.hosts.prefix}-{self.name}",
            disable_publishing="no" if self.publish else "yes"))
        blog = open(self.dir / "dbus-daemon.log", "wb")
        alog = open(self.dir / "avahi-daemon.log", "wb")
        self._logs += [blog, alog]
        self._bus = self.hosts.popen(self.name, [
            "dbus-daemon", f"--config-file={self.dir / 'bus.conf'}", "--nofork", "--nopidfile"],
            stdout=blog, stderr=subprocess.STDOUT)
        self._wait(lambda: sock.exists(), self._bus, "dbus-daemon did not create its socket")
        self._daemon = self.hosts.popen(self.name, [
            "unshare", "-m", "--propagation", "private", "sh", "-c", PRIVATE_RUN, "sh",
            "avahi-daemon", "--no-chroot", "--no-drop-root", "--no-rlimits",
            "-f", str(self.dir / "avahi-daemon.conf")],
            env=self.env, stdout=alog, stderr=subprocess.STDOUT)
        log = self.dir / "avahi-daemon.log"
        self._wait(lambda: b"Server startup complete" in log.read_bytes(), self._daemon,
                   "avahi-daemon did not start")

    def _wait(self, ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str) -> None:
        end = time.monotonic() + self.start_timeout
        while not ready():
            if proc.poll() is not None or time.monotonic() > end:
                state = f"exited {proc.returncode}" if proc.poll() is not None else "timed out"
                raise RuntimeError(f"{what} on host {self.name} ({state}):\n{self.log}")
            time.sleep(0.01)

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop avahi-daemon, then the bus; remove the temporary directory. Idempotent."""
        for proc in (self._daemon, self._bus):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._daemon = self._bus = None
        for f in self._logs:
            f.close()
        self._logs.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    # ---- browsing

    def browse(self, service_type: str = "_fl-node._tcp", timeout: float = 10) -> list[Service]:
        """Services of `service_type` on the link, resolved, as avahi-browse -rptk reports
        them once its cache is dumped (about 1 s). Each is a dict: name, address, port (int),
        txt ({key: value}; value None for a bare key), txt_raw (list of bytes), host,
        interface, protocol, type, domain. Sorted by (name, address, port), deduplicated."""
        if self._daemon is None or self._daemon.poll() is not None:
            raise RuntimeError(f"avahi-daemon on host {self.name} is not running:\n{self.log}")
        stype = service_type.removesuffix(".").removesuffix(".local")
        try:
            res = self.hosts.run(self.name, ["avahi-browse", "-rptk", stype],
                                 env=self.env, timeout=timeout)
            out, err, rc = res.stdout, res.stderr, res.returncode
        except subprocess.TimeoutExpired as e:  # keep what it found so far
            out, err, rc = _text(e.stdout), _text(e.stderr), 0
        if rc != 0:
            raise RuntimeError(f"avahi-browse failed ({rc}): {err.strip()}")
        found: dict[tuple[str, str, int], Service] = {}
        for line in out.splitlines():
            svc = parse_resolved(line)
            if svc is not None:
                found[(svc["name"], svc["address"], svc["port"])] = svc
        return [found[k] for k in sorted(found)]

    def wait_for(self, match: Callable[[Service], bool] | str | None = None, *,
                 service_type: str = "_fl-node._tcp", timeout: float = 15) -> Service:
        """Return the first resolved service that matches (`match`: a predicate, an instance
        name, or None for any), as soon as Avahi resolves it: avahi-browse runs without -t
        and is read line by line. AssertionError with what was seen after `timeout` s."""
        if match is None:
            pred: Callable[[Service], bool] = lambda s: True  # noqa: E731
        elif isinstance(match, str):
            pred = lambda s: s["name"] == match  # noqa: E731
        else:
            pred = match
        if self._daemon is None or self._daemon.poll() is not None:
            raise RuntimeError(f"avahi-daemon on host {self.name} is not running:\n{self.log}")
        stype = service_type.removesuffix(".").removesuffix(".local")
        proc = self.hosts.popen(self.name, ["avahi-browse", "-rpk", stype], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        seen: list[Service] = []
        buf = b""
        end = time.monotonic() + timeout
        try:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            while (left := end - time.monotonic()) > 0:
                ready, _, _ = select.select([fd], [], [], left)
                if not ready:
                    break
                chunk = os.read(fd, 65536)
                if not chunk:
                    break  # avahi-browse exited
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    svc = parse_resolved(line.decode("utf-8", "surrogateescape"))
                    if svc is None:
                        continue
                    if pred(svc):
                        return svc
                    seen.append(svc)
        finally:
            proc.kill()
            _, err = proc.communicate()
        raise AssertionError(f"no matching {service_type} service seen by Avahi on host "
                             f"{self.name} in {timeout} s; saw {seen}; "
                             f"avahi-browse: {_text(err).strip()!r}")


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b if isinstance(b, str) else b.decode(errors="replace")


_ESC = re.compile(rb"\\(\d{3}|.)", re.S)


def unescape(field: str) -> bytes:
    r"""Undo avahi's escaping: \DDD (decimal byte), \X (literal X)."""
    def sub(m: re.Match[bytes]) -> bytes:
        g = m.group(1)
        return bytes([int(g)]) if len(g) == 3 else g
    return _ESC.sub(sub, field.encode("utf-8", "surrogateescape"))


def parse_txt(field: str) -> list[bytes]:
    r"""Split avahi-browse -p's TXT field: "k=v" "k2=v2" with \" \\ \DDD escapes inside."""
    items: list[bytes] = []
    i, n = 0, len(field)
    while i < n:
        if field[i] != '"':
            i += 1
            continue
        j = i + 1
        buf = []
        while j < n and field[j] != '"':
            if field[j] == "\\" and j + 1 < n:
                if field[j + 1: j + 4].isdigit() and len(field[j + 1: j + 4]) == 3:
                    buf.append(field[j: j + 4])
                    j += 4
                    continue
                buf.append(field[j: j + 2])
                j += 2
                continue
            buf.append(field[j])
            j += 1
        items.append(unescape("".join(buf)))
        i = j + 1
    return items


def parse_resolved(line: str) -> Service | None:
    """One `=` line of avahi-browse -p into a dict (None for any other line)."""
    if not line.startswith("="):
        return None
    parts = line.split(";", 9)  # the TXT field (last) may hold raw ';'
    if len(parts) < 10:
        return None
    _, iface, proto, name, stype, domain, host, address, port, txt = parts
    raw = parse_txt(txt)
    txt_map: dict[str, str | None] = {}
    for item in reversed(raw):  # avahi lists TXT strings in reverse order
        key, eq, value = item.partition(b"=")
        k = key.decode("utf-8", "replace")
        if k.lower() in (x.lower() for x in txt_map):  # RFC 6763: first one wins
            continue
        txt_map[k] = value.decode("utf-8", "backslashreplace") if eq else None
    return {
        "name": unescape(name).decode("utf-8", "replace"),
        "address": address,
        "port": int(port),
        "txt": txt_map,
        "txt_raw": list(reversed(raw)),
        "host": unescape(host).decode("utf-8", "replace"),
        "interface": iface,
        "protocol": proto,
        "type": stype,
        "domain": domain,
    }
