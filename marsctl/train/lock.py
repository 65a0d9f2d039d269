"""One training run per run directory: an advisory ``fcntl.flock`` on ``<run>/train.lock``.

The kernel drops the lock when the process ends, however it ends (a SIGKILLed run leaves no
stale lock behind: re-running the command resumes). A second run into the same ``--out``
while the first is alive is refused with one line naming the directory and the holder's pid.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from marsctl.errors import MarsctlError

LOCK_FILE = "train.lock"


class RunLock:
    """The lock of one folder; ``data build`` takes it too (``name`` build.lock, ``what`` "data build")."""

    def __init__(self, run_dir: str | Path, name: str = LOCK_FILE, what: str = "training run"):
        self.path = Path(run_dir) / name
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise MarsctlError(f"{self.path.parent}: another {self.what}{who} is writing here; wait for it to end or use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
