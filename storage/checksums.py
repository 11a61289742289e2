"""Checksums of what a partition holds and presence of the chunk files behind it.

A Zarr read of a chunk whose file is missing returns the fill value (zeros, ``False``), so a deleted
file would silently read as "no image". Two checks, both independent of which arrays a partition has
(they enumerate the group):

* `missing_chunks`: the chunk (or shard) files covering a row range, for every array whose first
  dimension is the row axis — cheap (``stat`` calls), done before a task reads a partition;
* `digest_each_row` / `digest_rows`: SHA-256 of each decoded row (extraction: a damaged image is named)
  or of a partition's rows (index vectors) of every such array — written per partition when it is
  extracted / indexed, recomputed by ``rmac verify`` (all partitions or a ``--sample``) and by the
  re-ranking reads (`Store.read_checked`).
"""
from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Iterable

import numpy as np
import zarr


def digest(a: np.ndarray) -> str:
    """SHA-256 (hex, 32 chars) of an array's dtype, shape and bytes."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:32]


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def digest_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


def row_arrays(group: zarr.Group, n_rows: int, names: Iterable[str] | None = None,
               exclude: Iterable[str] = ()) -> list[str]:
    """Names of the arrays of ``group`` indexed by row (first dimension ``n_rows``), sorted."""
    skip = set(exclude)
    pick = set(names) if names is not None else None
    out = []
    for name in sorted(group.array_keys()):
        if name in skip or (pick is not None and name not in pick):
            continue
        if group[name].ndim >= 1 and group[name].shape[0] == n_rows:
            out.append(name)
    return out


def digest_rows(group: zarr.Group, start: int, stop: int, names: Iterable[str]) -> dict[str, str]:
    """``{name: digest}`` of rows ``[start, stop)`` of each named array (decoded values)."""
    return {name: digest(group[name][start:stop]) for name in names}


def digest_each_row(group: zarr.Group, start: int, stop: int, names: Iterable[str]) -> dict[str, list[str]]:
    """``{name: [digest of row r for r in [start, stop)]}`` (decoded values): a damaged row is named."""
    out = {}
    for name in names:
        block = group[name][start:stop]
        out[name] = [digest(row) for row in block]
    return out


def chunk_files(array: zarr.Array, root: Path, start: int, stop: int) -> list[Path]:
    """The files that hold rows ``[start, stop)`` of ``array`` stored under folder ``root``."""
    if stop <= start:
        return []
    grid = array.shards or array.chunks  # a sharded array stores one file per shard
    first, last = start // grid[0], (stop - 1) // grid[0]
    rest = [range((n + c - 1) // c) for n, c in zip(array.shape[1:], grid[1:])]
    enc = array.metadata.chunk_key_encoding
    return [root / enc.encode_chunk_key((i, *tail))
            for i in range(first, last + 1) for tail in itertools.product(*rest)]


def missing_chunks(group_path: Path, start: int, stop: int, names: Iterable[str] | None = None,
                   exclude: Iterable[str] = (), n_rows: int | None = None) -> list[str]:
    """``array/key`` of each chunk file covering rows ``[start, stop)`` that does not exist."""
    group = zarr.open_group(group_path, mode="r")
    out = []
    for name in sorted(group.array_keys()):
        if name in set(exclude) or (names is not None and name not in set(names)):
            continue
        a = group[name]
        if a.ndim < 1 or (n_rows is not None and a.shape[0] != n_rows):
            continue
        for f in chunk_files(a, Path(group_path) / name, start, min(stop, a.shape[0])):
            if not f.is_file():
                out.append(f"{name}/{f.relative_to(Path(group_path) / name)}")
    return out
