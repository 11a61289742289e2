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
import os
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
    grid = array.shards or array.chunks  # a sharded array stores one file per shard
    return [root / k for k in _chunk_keys(array.shape, grid, array.metadata.chunk_key_encoding, start, stop)]


def missing_chunks(group_path: Path, start: int, stop: int, names: Iterable[str] | None = None,
                   exclude: Iterable[str] = (), n_rows: int | None = None) -> list[str]:
    """``array/key`` of each chunk file covering rows ``[start, stop)`` that does not exist."""
    return missing_chunks_in(group_path, [(start, stop)], names, exclude, n_rows)


def missing_chunks_in(group_path: Path, ranges: Iterable[tuple[int, int]], names: Iterable[str] | None = None,
                      exclude: Iterable[str] = (), n_rows: int | None = None) -> list[str]:
    """`missing_chunks` of several row ranges ``(start, stop)``, the group's layout looked up once."""
    skip = set(exclude)
    pick = set(names) if names is not None else None
    out = []
    layout = [(name, shape, grid, enc) for name, shape, grid, enc in _layout(Path(group_path))
              if name not in skip and (pick is None or name in pick) and shape
              and (n_rows is None or shape[0] == n_rows)]
    for start, stop in ranges:
        for name, shape, grid, enc in layout:
            root = os.path.join(group_path, name)
            for key in _chunk_keys(shape, grid, enc, start, min(stop, shape[0])):
                if not os.path.isfile(os.path.join(root, key)):
                    out.append(f"{name}/{key}")
    return out


_LAYOUTS: dict[tuple, list] = {}


def _layout(group_path: Path) -> list[tuple]:
    """``(name, shape, chunk or shard grid, key encoding)`` of each array of the group, sorted by name.

    Re-ranking checks a store's chunk files before every read: Zarr's metadata reads cost ~1 ms each
    (several per array), the stat calls of this key ~10 us; kept per process, keyed by the arrays'
    metadata files, so a grown or re-indexed store is read afresh."""
    sig = []
    try:
        with os.scandir(group_path) as entries:
            for e in entries:
                try:
                    st = os.stat(os.path.join(e.path, "zarr.json"))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                sig.append((e.name, st.st_mtime_ns, st.st_size))
        key = (str(group_path), tuple(sorted(sig)))
    except FileNotFoundError:
        key = None
    hit = _LAYOUTS.get(key) if key is not None else None
    if hit is not None:
        return hit
    group = zarr.open_group(group_path, mode="r")
    out = []
    for name in sorted(group.array_keys()):
        a = group[name]
        out.append((name, tuple(a.shape), tuple(a.shards or a.chunks), a.metadata.chunk_key_encoding))
    if key is not None:
        if len(_LAYOUTS) > 64:
            _LAYOUTS.clear()
        _LAYOUTS[key] = out
    return out


def _chunk_keys(shape, grid, enc, start: int, stop: int) -> list[str]:
    if stop <= start:
        return []
    first, last = start // grid[0], (stop - 1) // grid[0]
    rest = [range((n + c - 1) // c) for n, c in zip(shape[1:], grid[1:])]
    return [enc.encode_chunk_key((i, *tail)) for i in range(first, last + 1) for tail in itertools.product(*rest)]
