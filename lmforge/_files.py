"""Files several processes share: atomic writes, an exclusive lock on a file, and whether a pid lives.

Atomic writes give the result the mode a plain open() gives (0666 & ~umask): `tempfile.mkstemp` creates
0600 files, and an atomic write that renames one into place would leave metrics, configs and weights
unreadable to the rest of a group even under umask 022. Here the temporary file is opened with open()
under a name unique to the process and thread, so it gets the usual mode.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows has no flock: no lock is taken there
    fcntl = None


def temp_path(path: Path) -> Path:
    """A temporary name beside `path`, unique to this process and thread (hidden, ends in .tmp)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def write_text_atomic(path: Path, text: str, *, fsync: bool = True) -> None:
    """Write `text` to `path` atomically: a crash leaves the old file or the new one, never a part."""
    tmp = temp_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def new_file_mode(tmp: Path) -> int:
    """The mode open() gives a new file beside `tmp` (0666 & ~umask), read off a file created at `tmp`;
    reading the umask itself means setting it process-wide, which another thread could create a file under."""
    with open(tmp, "w"):
        pass
    return tmp.stat().st_mode & 0o777


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (signal 0 only checks). On Windows os.kill would terminate
    it instead: there every pid counts as alive."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class LockHeld(Exception):
    """Another process holds the lock; `holder` says which ("process PID on host HOST")."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


class FileLock:
    """An exclusive, non-blocking `flock` on `path`, held until `release` (or the end of a `with`).

    Raises LockHeld when another open file description holds it. The kernel drops the lock when its
    process ends in any way, SIGKILL included, so a lock file left behind never blocks the next taker;
    the pid and host written into it only serve the message. On NFS, flock is emulated with byte-range
    locks (Linux >= 2.6.12), which the server arbitrates. Without fcntl (Windows) no lock is taken."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            raise LockHeld(f"process {holder[0]} on host {holder[1]}" if len(holder) == 2
                           else "another process") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no stale pid for the next reader (and a prepared folder's bytes stay fixed)
            os.close(self._fd)  # closing the only descriptor drops the lock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
