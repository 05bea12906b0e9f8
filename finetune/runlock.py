"""One run per output folder: ``<output.dir>/train.lock``.

The lock is an advisory ``flock`` on that file, so the kernel releases it when the holding
process dies, however it dies; the file's text (PID, host, start time) only serves to name the
holder in the error and to notice a lock left behind by a run that did not finish. Written by
hand because the lock libraries on PyPI either poll with timeouts or do not say who holds a lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from finetune.errors import RunLocked

LOCK_FILE = "train.lock"


class RunLock:
    """Context manager holding the lock on ``run_dir`` (created if missing).

    Raises RunLocked naming the PID of a live run that holds it. A lock file left by a process
    that is gone is taken over, with a note through ``note``.
    """

    def __init__(self, run_dir: str | Path, note: Callable[[str], None] = print):
        self.path = Path(run_dir) / LOCK_FILE
        self.note = note
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            pid = holder.get("pid", "unknown")
            since = f", started {holder['started']}" if holder.get("started") else ""
            host = f" on {holder['host']}" if holder.get("host") else ""
            raise RunLocked(
                f"output.dir={self.path.parent} is in use by another training run (PID {pid}{host}{since}; lock file "
                f"{self.path}); wait for it to finish or stop it (kill -TERM {pid} saves a checkpoint), or pass "
                f"another output.dir=..."
            ) from None
        left = _read_holder(fd)
        if left.get("pid") is not None:
            self.note(f"note: took over {self.path}, left by PID {left['pid']} which is no longer running "
                      f"(that run did not finish; its last checkpoint is kept)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the file (a clean exit leaves no holder to report) and drop the lock."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    """The JSON a holder wrote, or {} for an empty or unreadable file."""
    raw = os.pread(fd, 4096, 0)
    try:
        data = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
