"""Atomic file writes whose result has the mode a plain open() gives (0666 & ~umask).

`tempfile.mkstemp` creates 0600 files, and an atomic write that renames one into place would leave
metrics, configs and weights unreadable to the rest of a group even under umask 022. Here the temporary
file is opened with open() under a name unique to the process and thread, so it gets the usual mode.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


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
