"""The store lock with real processes: a second writer is refused at once naming the holder, or waits
(`--wait`); a holder killed with SIGKILL leaves a lock the next process takes over and reports."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rmac.storage.lock import StoreLock, StoreLocked
from rmac.storage.store import StoreError

HOLD = """
import sys, time
from rmac.storage.lock import StoreLock
with StoreLock(sys.argv[1], "holder"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold(store: Path, seconds: float) -> subprocess.Popen:
    """A process holding the lock of ``store`` for ``seconds`` (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(store), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    proc = hold(tmp_path, 30)
    try:
        with pytest.raises(StoreLocked) as e:
            StoreLock(tmp_path, "extract").acquire()
        msg = str(e.value)
        assert f"pid {proc.pid} on {socket.gethostname()} (holder, since " in msg and "--wait" in msg
        assert "\n" not in msg and isinstance(e.value, StoreError)  # one line, a user error (exit 2)
    finally:
        proc.kill()
        proc.wait()


def test_wait_blocks_until_the_holder_finishes(tmp_path):
    proc = hold(tmp_path, 1.5)
    t0 = time.monotonic()
    with StoreLock(tmp_path, "index", wait=True, poll_s=0.05) as lock:
        waited = time.monotonic() - t0
        assert lock.took_over is None  # the holder released it
        assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    assert waited > 1.0, "acquired while the holder still held it"
    proc.wait()


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    proc = hold(tmp_path, 60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((tmp_path / "lock").read_text())["pid"] == proc.pid  # the file still names it
    t0 = time.monotonic()
    with StoreLock(tmp_path, "extract") as lock:  # no wait needed: the kernel released its flock
        assert time.monotonic() - t0 < 1
        assert lock.took_over["pid"] == proc.pid and lock.took_over["command"] == "holder"
    # released cleanly: the next one takes nothing over
    with StoreLock(tmp_path, "extract") as lock:
        assert lock.took_over is None


def test_only_one_of_many_racing_processes_holds_it(tmp_path):
    """Eight processes try at once without waiting: exactly one wins."""
    code = ("import sys, time\nfrom rmac.storage.lock import StoreLock, StoreLocked\n"
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
            "try:\n    l = StoreLock(sys.argv[1], 'x').acquire()\nexcept StoreLocked:\n    sys.exit(3)\n"
            "time.sleep(2)\n")
    start = time.time() + 8  # after every interpreter has started and imported
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(start)]) for _ in range(8)]
    codes = sorted(p.wait() for p in procs)
    assert codes == [0] + [3] * 7
