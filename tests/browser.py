"""Headless Chromium for tests: render an HTML file to a PNG, or dump its DOM after loading.

Uses Debian's ``chromium`` (``/usr/bin/chromium`` or ``chromium`` on PATH; deploy/install.sh --test
installs it). Each call gets a fresh profile and flags that keep it off the network, which is
closed here (background connections would be refused and slow the start down).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1", "--mute-audio")


class BrowserError(RuntimeError):
    """Chromium is missing, failed, or did not finish in time."""


def chromium() -> str:
    """Path of the Chromium executable."""
    for candidate in (shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BrowserError("headless tests need Chromium: `apt-get install -y chromium` "
                       "(Debian; deploy/install.sh --test installs it)")


def _run(args: list[str], timeout: float) -> str:
    with tempfile.TemporaryDirectory(prefix="rmac-chromium-") as profile:
        cmd = [chromium(), *FLAGS, f"--user-data-dir={profile}", *args]
        # own session, so that a timeout can end chromium's helper processes too
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise BrowserError(f"chromium did not finish in {timeout} s: {' '.join(cmd)}") from None
    if proc.returncode != 0:
        raise BrowserError(f"chromium exited with {proc.returncode}: {err[-2000:]}")
    return out


def _url(html_path: str | os.PathLike) -> str:
    path = Path(html_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(path)
    return path.as_uri()


def render(html_path: str | os.PathLike, out_png: str | os.PathLike, width: int = 1400,
           height: int = 2400, timeout: float = 60) -> Path:
    """Screenshot the page at ``width`` x ``height`` CSS pixels (device scale 1) into ``out_png``."""
    out = Path(out_png).resolve()
    out.unlink(missing_ok=True)
    _run([f"--screenshot={out}", f"--window-size={width},{height}", _url(html_path)], timeout)
    if not out.is_file():
        raise BrowserError(f"chromium wrote no screenshot to {out}")
    return out


def dump_dom(html_path: str | os.PathLike, timeout: float = 60) -> str:
    """The serialised DOM once the page has loaded (scripts run, images fetched)."""
    return _run(["--dump-dom", _url(html_path)], timeout)
