"""Argument types for the command line: every value is checked where it enters (argparse ``type=``),
so a bad one ends as argparse's one-line ``rmac CMD: error: argument --x: ...`` (exit status 2),
never as a traceback from deep inside a job.

Use them in any ``add_arguments``::

    parser.add_argument("--top-n", type=positive_int, default=1000)
    parser.add_argument("--qe", type=nonnegative_int, default=5)
    parser.add_argument("--levels", type=int_range(1, 31), default=31)
    parser.add_argument("store", type=existing_dir)
    parser.add_argument("--json", type=writable_file)
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable

__all__ = ["positive_int", "nonnegative_int", "int_range", "positive_float", "float_range", "existing_dir",
           "existing_file", "existing_path", "new_or_existing_dir", "writable_file", "creatable_file",
           "comma_list", "finite_float", "plain_text", "query_scales"]

_Error = argparse.ArgumentTypeError


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except (ValueError, AttributeError):
        raise _Error(f"{text!r} is not a whole number") from None


def _float(text: str) -> float:
    try:
        v = float(text.strip())
    except (ValueError, AttributeError):
        raise _Error(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise _Error(f"{text!r} is not a finite number")
    return v


def positive_int(text: str) -> int:
    """A whole number >= 1 (counts, sizes)."""
    v = _int(text)
    if v < 1:
        raise _Error(f"must be a whole number >= 1, got {v}")
    return v


def nonnegative_int(text: str) -> int:
    """A whole number >= 0 (0 usually switches the feature off)."""
    v = _int(text)
    if v < 0:
        raise _Error(f"must be a whole number >= 0, got {v}")
    return v


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    """A whole number in ``lo..hi`` (both included)."""
    def check(text: str) -> int:
        v = _int(text)
        if not lo <= v <= hi:
            raise _Error(f"must be a whole number in {lo}..{hi}, got {v}")
        return v

    check.__name__ = f"int in {lo}..{hi}"  # argparse names the type in some messages
    return check


def positive_float(text: str) -> float:
    """A finite number > 0."""
    v = _float(text)
    if v <= 0:
        raise _Error(f"must be a number > 0, got {v:g}")
    return v


def float_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """A finite number between ``lo`` and ``hi`` (each end included unless ``*_open``)."""
    def check(text: str) -> float:
        v = _float(text)
        if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            raise _Error(f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, got {v:g}")
        return v

    check.__name__ = f"number in {lo:g}..{hi:g}"
    return check


def comma_list(item: Callable[[str], object], length: int | None = None) -> Callable[[str], str]:
    """A comma-separated list whose every entry passes ``item`` (and, if given, exactly ``length``
    entries). Returns the text unchanged, for code that splits it itself."""
    def check(text: str) -> str:
        items = [t for t in text.split(",") if t.strip()]
        if not items:
            raise _Error(f"expected a comma-separated list, got {text!r}")
        if length is not None and len(items) != length:
            raise _Error(f"expected {length} comma-separated values, got {len(items)} in {text!r}")
        for t in items:
            try:
                item(t)
            except _Error as e:
                raise _Error(f"{t.strip()!r} in {text!r}: {e}") from None
        return text

    check.__name__ = "comma-separated list"
    return check


MAX_QUERY_SCALES = 8


def query_scales(text: str) -> tuple[float, ...]:
    """Query scales for multi-scale localisation: 1 to 8 distinct numbers in [0.1, 2], comma-separated
    (e.g. ``1,0.71,0.5``); returned as a tuple of floats in the order given."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise _Error(f"expected comma-separated scales such as 1,0.71,0.5, got {text!r}")
    if len(items) > MAX_QUERY_SCALES:
        raise _Error(f"at most {MAX_QUERY_SCALES} scales, got {len(items)} in {text!r}")
    check = float_range(0.1, 2.0)
    out = []
    for t in items:
        try:
            out.append(check(t))
        except _Error as e:
            raise _Error(f"scale {t.strip()!r} in {text!r}: {e}") from None
    if len(set(out)) != len(out):
        raise _Error(f"a scale is listed twice in {text!r}")
    return tuple(out)


def finite_float(text: str) -> float:
    """Any finite number (not nan, not inf)."""
    return _float(text)


def plain_text(text: str) -> str:
    """A string the rest of the system can print and store: no control characters (newlines...),
    no undecodable bytes (which Python passes through as lone surrogates)."""
    bad = [c for c in text if ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF]
    if bad:
        raise _Error(f"{_show(text)} holds control characters or bytes that are not UTF-8")
    return text


def _show(text: str) -> str:
    return ascii(text) if any(ord(c) < 32 or ord(c) >= 0xD800 for c in text) else repr(text)


def _path(text: str) -> Path:
    plain_text(text)
    if not text:
        raise _Error("an empty path")
    return Path(text)


def _existing(text: str, what: str) -> Path:
    p = _path(text)
    if not p.exists():
        raise _Error(f"{text}: no such {what}")
    return p


def existing_path(text: str) -> str:
    """A path that exists (file or folder)."""
    _existing(text, "file or folder")
    return text


def existing_dir(text: str) -> str:
    """A folder that exists."""
    if not _existing(text, "folder").is_dir():
        raise _Error(f"{text}: not a folder")
    return text


def existing_file(text: str) -> str:
    """A regular file that exists and can be read."""
    p = _existing(text, "file")
    if p.is_dir():
        raise _Error(f"{text}: is a folder, expected a file")
    if not os.access(p, os.R_OK):
        raise _Error(f"{text}: cannot be read (permission denied)")
    return text


def new_or_existing_dir(text: str) -> str:
    """A folder that exists or can be created: not a file, and not below a file."""
    p = _path(text)
    if p.exists() and not p.is_dir():
        raise _Error(f"{text}: is a file, expected a folder")
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise _Error(f"{text}: {parent} is a file, not a folder")
            break
    return text


def writable_file(text: str) -> str:
    """A file path to write: not a folder, and its folder exists."""
    p = _path(text)
    if p.is_dir():
        raise _Error(f"{text}: is a folder, expected a file name")
    parent = p.absolute().parent
    if not parent.is_dir():
        raise _Error(f"{text}: folder {parent} does not exist")
    return text


def creatable_file(text: str) -> str:
    """A file path to write whose missing folders will be created: not a folder, nothing above it a file."""
    p = _path(text)
    if p.is_dir():
        raise _Error(f"{text}: is a folder, expected a file name")
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise _Error(f"{text}: {parent} is a file, not a folder")
            break
    return text
