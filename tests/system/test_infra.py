"""The system-test infrastructure itself: namespaced hosts, faults, multicast, Avahi, cleanup.

Needs root and scripts/system-deps; without them these tests fail (never skip)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.system.avahi import Avahi, parse_resolved
from tests.system.netns import (
    OWNER_DIR,
    Hosts,
    cleanup_stale,
    list_namespaces,
    require_root_and_tools,
)

pytestmark = [pytest.mark.slow, pytest.mark.system]

PY = [sys.executable, "-I", "-S"]
REPO = Path(__file__).resolve().parents[2]

REACH = textwrap.dedent("""
    import json, socket, sys
    out = {}
    for addr in sys.argv[1:]:
        try:
            socket.create_connection((addr, 9), timeout=0.5).close()
            out[addr] = True
        except ConnectionRefusedError:
            out[addr] = True            # RST came back: the path works both ways
        except OSError:
            out[addr] = False           # timeout, EPERM (local drop), unreachable
    print(json.dumps(out))
""")


def reach(hosts: Hosts, src: str, *dsts: str) -> dict[str, bool]:
    """Which of `dsts` host `src` can open a TCP exchange with."""
    res = hosts.run(src, [*PY, "-c", REACH, *(hosts.ip(d) for d in dsts)], check=True)
    by_ip = json.loads(res.stdout)
    return {d: by_ip[hosts.ip(d)] for d in dsts}


MCAST_RECV = textwrap.dedent("""
    import socket, struct, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("239.7.7.7", 17777))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                 struct.pack("4s4s", socket.inet_aton("239.7.7.7"), socket.inet_aton(sys.argv[1])))
    print("ready", flush=True)
    s.settimeout(1.0)
    try:
        print(s.recv(100).decode(), flush=True)
    except TimeoutError:
        print("nothing", flush=True)
""")
MCAST_SEND = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    for _ in range(3):
        s.sendto(b"hello", ("239.7.7.7", 17777)); time.sleep(0.05)
""")


def multicast_from(hosts: Hosts, src: str, *dsts: str) -> dict[str, bool]:
    """Send UDP multicast from `src` (no interface chosen: the 224/4 route picks eth0)."""
    recv = {d: hosts.popen(d, [*PY, "-c", MCAST_RECV, hosts.ip(d)], stdout=subprocess.PIPE,
                           text=True) for d in dsts}
    for p in recv.values():
        assert p.stdout.readline().strip() == "ready"
    hosts.run(src, [*PY, "-c", MCAST_SEND], check=True)
    return {d: p.communicate(timeout=5)[0].strip() == "hello" for d, p in recv.items()}


@pytest.fixture
def hosts():
    require_root_and_tools("nft")
    with Hosts(("a", "b", "c")) as h:
        yield h


def test_reach_block_and_cut(hosts: Hosts) -> None:
    assert reach(hosts, "a", "b", "c") == {"b": True, "c": True}
    assert reach(hosts, "c", "a", "b") == {"a": True, "b": True}

    hosts.block("a", "c")  # line topology a - b - c
    assert reach(hosts, "a", "b", "c") == {"b": True, "c": False}
    assert reach(hosts, "c", "a", "b") == {"a": False, "b": True}
    assert reach(hosts, "b", "a", "c") == {"a": True, "c": True}
    assert multicast_from(hosts, "a", "b", "c") == {"b": True, "c": False}
    hosts.unblock("a", "c")
    assert reach(hosts, "a", "c") == {"c": True}
    assert reach(hosts, "c", "a") == {"a": True}

    hosts.cut("b")
    assert reach(hosts, "b", "a", "c") == {"a": False, "c": False}
    assert reach(hosts, "a", "b", "c") == {"b": False, "c": True}
    hosts.heal("b")
    assert reach(hosts, "a", "b") == {"b": True}
    assert reach(hosts, "b", "c") == {"c": True}


ZEROCONF_SERVICE = textwrap.dedent("""
    import socket, sys
    from zeroconf import ServiceInfo, Zeroconf
    ip, name = sys.argv[1], sys.argv[2]
    zc = Zeroconf(interfaces=[ip])
    info = ServiceInfo("_fl-node._tcp.local.", f"{name}._fl-node._tcp.local.",
                       addresses=[socket.inet_aton(ip)], port=7361,
                       properties={"id": "X", "fed": "default", "note": 'a "b" c=d;e'})
    zc.register_service(info)
    print("registered", flush=True)
    sys.stdin.read()                    # until the test closes our stdin
    zc.unregister_service(info)
    zc.close()
""")


def test_avahi_sees_zeroconf_service() -> None:
    require_root_and_tools("avahi-daemon", "avahi-browse", "dbus-daemon")
    with Hosts(("a", "b")) as hosts, Avahi(hosts, "b") as avahi:
        assert avahi.browse() == []
        name = "node X é"
        svc = hosts.popen("a", [sys.executable, "-c", ZEROCONF_SERVICE, hosts.ip("a"), name],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert svc.stdout.readline().strip() == "registered"
        found = avahi.wait_for(name, timeout=10)
        assert found["address"] == hosts.ip("a")
        assert found["port"] == 7361
        assert found["txt"] == {"id": "X", "fed": "default", "note": 'a "b" c=d;e'}
        assert found["type"] == "_fl-node._tcp" and found["interface"] == "eth0"
        svc.stdin.close()
        assert svc.wait(timeout=10) == 0


def test_two_avahi_daemons_side_by_side() -> None:
    """avahi-daemon's hardcoded /run/avahi-daemon/pid would stop a second one: not here."""
    with Hosts(("a", "b")) as hosts, Avahi(hosts, "a") as a, Avahi(hosts, "b", publish=True) as b:
        assert a.browse() == [] and b.browse() == []
        assert not Path("/run/avahi-daemon/pid").exists()


def test_parse_resolved_line() -> None:
    line = ('=;eth0;IPv4;node\\032x\\059y\\\\z\\032\\195\\169;_fl-node._tcp;local;h.local;'
            '10.0.0.1;7000;"bin=\\001\\255" "bare" "empty=" "q=a \\"b\\" \\\\c d=e;f" "id=X"')
    s = parse_resolved(line)
    assert s is not None
    assert s["name"] == "node x;y\\z é"
    assert s["txt"] == {"id": "X", "q": 'a "b" \\c d=e;f', "empty": "", "bare": None,
                        "bin": "\x01\\xff"}  # undecodable bytes backslash-escaped
    assert s["txt_raw"][0] == b"id=X" and s["txt_raw"][-1] == b"bin=\x01\xff"
    assert parse_resolved("+;eth0;IPv4;x;_fl-node._tcp;local") is None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie that nobody reaped yet counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ours(prefix: str) -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(prefix)]


def test_nothing_left_after_exit_even_on_error() -> None:
    seen: list[int] = []
    avahi_dir = None
    with pytest.raises(RuntimeError, match="on purpose"):
        with Hosts(("a", "b", "c")) as hosts:
            prefix = hosts.prefix
            assert len(_ours(prefix)) == 4
            hosts.popen("a", ["sleep", "300"])
            # escapes its process group and ignores SIGTERM: only the netns sweep catches it
            hosts.run("b", ["sh", "-c", "setsid sh -c 'trap \"\" TERM; sleep 300' "
                                        ">/dev/null 2>&1 &"], check=True)
            hosts.block("a", "c")
            av = Avahi(hosts, "c").__enter__()  # never exited: Hosts must clean it up
            avahi_dir = av.dir
            deadline = time.monotonic() + 5
            while len(hosts.pids()) < 5 and time.monotonic() < deadline:
                time.sleep(0.02)
            seen = hosts.pids()
            assert len(seen) >= 5, seen  # sleep, sh + sleep, dbus-daemon, avahi-daemon
            raise RuntimeError("fail inside the hosts context on purpose")
    assert _ours(prefix) == []
    assert not [p for p in seen if _alive(p)]
    assert not (OWNER_DIR / prefix).exists()
    assert prefix not in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                        text=True).stdout
    assert avahi_dir is not None and not avahi_dir.exists()


def test_reaper_cleans_up_after_a_killed_test_process() -> None:
    code = textwrap.dedent("""
        import os, sys
        sys.path.insert(0, sys.argv[1])
        from tests.system.netns import Hosts
        h = Hosts(("a", "b")).__enter__()
        h.popen("a", ["sleep", "300"])
        print(h.prefix, flush=True)
        os.kill(os.getpid(), 9)
    """)
    res = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == -signal.SIGKILL, res.stderr
    prefix = res.stdout.strip()
    assert prefix.startswith("fl")
    deadline = time.monotonic() + 10
    while _ours(prefix) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ours(prefix) == []
    assert not (OWNER_DIR / prefix).exists()


def test_cleanup_stale_spares_live_instances() -> None:
    dead_owner, no_owner = (f"fl{secrets.token_hex(3)}" for _ in range(2))
    try:
        with Hosts(("a",)) as hosts:
            for prefix in (dead_owner, no_owner):
                subprocess.run(["ip", "netns", "add", f"{prefix}-x"], check=True)
            # a dead owner: the record names a PID that no longer runs
            p = subprocess.Popen(["true"])
            p.wait()
            (OWNER_DIR / dead_owner).write_text(f"{p.pid} 0\n")
            gone = cleanup_stale()
            assert {f"{dead_owner}-x", f"{no_owner}-x"} <= set(gone)
            assert _ours(dead_owner) == [] and _ours(no_owner) == []
            assert not (OWNER_DIR / dead_owner).exists()
            assert len(_ours(hosts.prefix)) == 2  # ours is alive: untouched
            assert reach(hosts, "a", "a") == {"a": True}
    finally:
        for prefix in (dead_owner, no_owner):
            subprocess.run(["ip", "netns", "del", f"{prefix}-x"], capture_output=True)
