"""One writer per store: an exclusive lock file ``STORE/lock`` naming its holder (pid, host, start time).

The exclusion itself is a kernel ``flock`` (released by the kernel when the holding process dies, even on
``kill -9``), so a dead holder's lock is never "stale" in the sense of blocking: the next process takes it
over and says so. The JSON written into the file only names the holder for the one-line refusal message.
``flock`` needs a local file system or one that forwards it (NFSv4 does, with ``local_lock=none``).

Written by hand rather than with ``filelock``: that library gives the exclusion but neither the holder's
identity nor the "previous holder died" report.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from rmac.storage.store import StoreError


class StoreLocked(StoreError):
    """Another live process holds the store's lock."""


LOCK_NAME = "lock"


def _describe(info: dict) -> str:
    return (f"pid {info.get('pid')} on {info.get('host')} ({info.get('command', '?')}, "
            f"since {info.get('started', '?')})")


class StoreLock:
    """``with StoreLock(store_path, "extract", wait=False): ...`` — exclusive, per store folder.

    wait: block until the holder finishes (``True``), or raise `StoreLocked` at once naming it.
    ``took_over`` is the previous holder's record when it died holding the lock (else ``None``).
    """

    def __init__(self, store_path: str | os.PathLike, command: str, wait: bool = False,
                 poll_s: float = 0.5):
        self.path = Path(store_path) / LOCK_NAME
        self.command = command
        self.wait = wait
        self.poll_s = poll_s
        self.took_over: dict | None = None
        self._fd: int | None = None

    def holder(self) -> dict:
        """What the lock file says about its holder ({} when unreadable or empty)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "StoreLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if not self.wait:
                        raise StoreLocked(f"{self.path.parent} is locked by {_describe(self.holder())}: "
                                          "wait for it, or pass --wait") from None
                    time.sleep(self.poll_s)
            previous = self.holder()
            if previous.get("pid") is not None and not previous.get("released"):
                self.took_over = previous  # it held the lock and died without releasing it
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            data = json.dumps(info).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            info = self.holder()
            info["released"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            data = json.dumps(info).encode()
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
