"""The state dir's lock: one running node per state dir.

Two nodes on one state dir would share an identity, a sequence-number reservation, a
database and checkpoints, and corrupt all of them. ``fl-node start`` therefore takes an
exclusive ``flock`` on ``STATE_DIR/node.lock`` before it writes anything there and holds it
for the node's whole life. A second start on the same dir is refused with the holder's PID,
which the holder writes into the file after locking.

A flock belongs to the open file, not to the file's contents: the kernel drops it when the
holding process exits, however it exits (``kill -9`` included). So a lock is never stale:
a file left behind by a dead node is simply taken over by the next start. The file itself
is never deleted (deleting it would let two processes lock two different files of the same
name).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

LOCK_NAME = "node.lock"
#: How long a refused start waits for the holder's PID when the holder has just taken the
#: lock and not yet written it (a few microseconds in practice).
PID_WAIT_S = 0.5


class StateDirBusy(Exception):
    """Another running process holds the state dir's lock; ``pid`` is that process's PID
    (None if it could not be read)."""

    def __init__(self, state_dir: str | Path, pid: int | None) -> None:
        self.state_dir = str(state_dir)
        self.pid = pid
        who = f"PID {pid}" if pid is not None else "PID unknown"
        super().__init__(f"state dir {self.state_dir} is in use by a running node ({who})")


class StateLock:
    """The exclusive lock on ``state_dir`` (``STATE_DIR/node.lock``).

    ``acquire()`` takes it or raises StateDirBusy; ``release()`` (or the process's exit)
    gives it back. Also a context manager. Locks are per open file: a second StateLock on
    the same dir is refused even in the same process."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, then write our PID into the lock file. Creates the state dir
        (mode 0700) if it is missing, and the lock file if it is missing; a refused acquire
        writes nothing else. StateDirBusy if a running process holds it; OSError if the
        dir cannot be created or the file opened. Does nothing if already held."""
        if self._fd is not None:
            return
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateDirBusy(self.state_dir, self._holder_pid()) from None
            raise
        try:
            data = f"{os.getpid()}\n".encode()
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))  # a reader in between retries (_holder_pid)
        except OSError:
            os.close(fd)  # closing drops the lock
            raise
        self._fd = fd

    def release(self) -> None:
        """Give the lock back (empties the file first, so it names no PID). Does nothing if
        not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # the lock goes with the close all the same
        finally:
            os.close(fd)  # closing the only descriptor of the open file drops the flock

    def check(self) -> None:
        """Raise StateDirBusy if a running process holds the lock; take nothing, create
        nothing (for a process that will start the node elsewhere, ``start --tui``).

        It probes with a shared lock for an instant, so a start racing with this check may
        be refused in that instant: use it only where that cannot happen."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateDirBusy(self.state_dir, self._holder_pid()) from None
            raise
        finally:
            os.close(fd)

    def _holder_pid(self) -> int | None:
        """The PID written in the lock file (waits up to PID_WAIT_S for a holder that has
        only just locked it); None if there is none or it is not a number."""
        deadline = time.monotonic() + PID_WAIT_S
        while True:
            try:
                text = self.path.read_text().strip()
            except OSError:
                text = ""
            if text.isdigit():
                return int(text)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
