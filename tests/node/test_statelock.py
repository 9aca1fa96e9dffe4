"""The state dir's lock (node/common/statelock.py): one holder at a time across processes,
released on release() or the holder's death (kill -9 included), and a refused acquire
writes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.common.statelock import LOCK_NAME, StateDirBusy, StateLock

REPO = Path(__file__).resolve().parents[2]

#: A process that takes the lock, says so, releases it on "release" and exits on EOF.
HOLDER = """
import sys
from node.common.statelock import StateLock
lock = StateLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
for line in sys.stdin:
    if line.strip() == "release":
        lock.release()
        print("released", flush=True)
"""


class Holder:
    """Another process holding the lock on a state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(state_dir)],
                                     cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.expect("locked")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, word: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == word, f"holder said {line!r}, exit code {self.proc.poll()}"

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("release\n")
        self.proc.stdin.flush()
        self.expect("released")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Holder]:
    h = Holder(tmp_path / "state")
    try:
        yield h
    finally:
        h.stop()


def snapshot(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``directory`` with its mode, mtime and contents."""
    out = {}
    for p in sorted(directory.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(directory))] = (st.st_mode, st.st_mtime_ns,
                                              p.read_bytes() if p.is_file() else b"")
    return out


def test_a_second_acquire_in_another_process_is_refused_with_the_holders_pid(tmp_path, holder):
    lock = StateLock(tmp_path / "state")
    with pytest.raises(StateDirBusy) as refused:
        lock.acquire()
    assert refused.value.pid == holder.pid
    assert str(refused.value) == (f"state dir {tmp_path / 'state'} is in use by a running node"
                                  f" (PID {holder.pid})")
    assert not lock.held


def test_a_second_lock_in_the_same_process_is_refused_too(tmp_path):
    with StateLock(tmp_path) as first:
        with pytest.raises(StateDirBusy) as refused:
            StateLock(tmp_path).acquire()
        assert refused.value.pid == os.getpid()
        assert first.held
    assert not first.held
    with StateLock(tmp_path):  # the context manager released it
        pass


def test_release_lets_the_next_one_in(tmp_path, holder):
    state = tmp_path / "state"
    holder.release()
    assert (state / LOCK_NAME).read_text() == ""  # a released lock names no PID
    lock = StateLock(state)
    lock.acquire()
    try:
        assert lock.held
        assert (state / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()
    assert holder.proc.poll() is None  # it released without exiting


def test_a_lock_whose_holder_was_killed_with_sigkill_is_taken_over(tmp_path, holder):
    state = tmp_path / "state"
    holder.proc.send_signal(signal.SIGKILL)
    assert holder.proc.wait(10) == -signal.SIGKILL
    assert (state / LOCK_NAME).read_text() == f"{holder.pid}\n"  # left behind, not stale
    lock = StateLock(state)
    lock.acquire()
    try:
        assert (state / LOCK_NAME).read_text() == f"{os.getpid()}\n"  # no digits left over
        with pytest.raises(StateDirBusy) as refused:
            StateLock(state).acquire()
        assert refused.value.pid == os.getpid()
    finally:
        lock.release()


def test_the_pid_replaces_a_longer_leftover_whole(tmp_path):
    (tmp_path / LOCK_NAME).write_text("4194303999999\n")  # left by some earlier holder
    with StateLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_a_refused_acquire_writes_nothing(tmp_path, holder):
    state = tmp_path / "state"
    (state / "node.key").write_bytes(b"k" * 32)
    before = snapshot(state)
    dir_mtime = state.stat().st_mtime_ns
    for attempt in (StateLock(state).acquire, StateLock(state).check):
        with pytest.raises(StateDirBusy):
            attempt()
    assert snapshot(state) == before
    assert state.stat().st_mtime_ns == dir_mtime


def test_acquire_creates_a_missing_state_dir_with_mode_0700(tmp_path):
    state = tmp_path / "new" / "state"
    with StateLock(state):
        assert state.stat().st_mode & 0o777 == 0o700 & ~current_umask()
        assert sorted(p.name for p in state.iterdir()) == [LOCK_NAME]
        assert (state / LOCK_NAME).stat().st_mode & 0o777 == 0o600 & ~current_umask()


def test_check_refuses_only_a_held_lock_and_creates_nothing(tmp_path, holder):
    missing = tmp_path / "missing"
    StateLock(missing).check()
    assert not missing.exists()
    free = tmp_path / "free"
    with StateLock(free):
        pass
    StateLock(free).check()
    with StateLock(free):  # check left no lock behind
        pass
    with pytest.raises(StateDirBusy) as refused:
        StateLock(tmp_path / "state").check()
    assert refused.value.pid == holder.pid


def test_an_unreadable_pid_is_reported_as_unknown(tmp_path, monkeypatch):
    import node.common.statelock as statelock

    monkeypatch.setattr(statelock, "PID_WAIT_S", 0.05)
    with StateLock(tmp_path):
        (tmp_path / LOCK_NAME).write_text("")  # as if the holder had not written it yet
        with pytest.raises(StateDirBusy) as refused:
            StateLock(tmp_path).acquire()
    assert refused.value.pid is None
    assert str(refused.value).endswith("(PID unknown)")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
