"""The id table, one small JSON file per partition (``STORE/ids/p000012.json``), so that a task reads
only its own partition's ids and paths instead of the whole table (tens of MB at a million images).

Also how a source file is identified: two names of one file (a symlink, a path listed twice) resolve to
one ``(device, inode)``, and its ``(size, mtime_ns)`` tell whether it changed since it was extracted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

FOLDER = "ids"


def table_file(store_path: Path, p: int) -> Path:
    return Path(store_path) / FOLDER / f"p{p:06d}.json"


def write_table(store_path: Path, p: int, ids: Sequence[str], paths: Sequence[str]) -> None:
    from rmac.storage.store import _write_json_atomic

    _write_json_atomic(table_file(store_path, p), {"ids": list(ids), "paths": [str(x) for x in paths]})


def read_table(store_path: Path, p: int) -> tuple[list[str], list[str]]:
    """(ids, paths) of partition ``p``."""
    doc = json.loads(table_file(store_path, p).read_text())
    return doc["ids"], doc["paths"]


def source_stat(path: str | os.PathLike) -> dict | None:
    """``{"size", "mtime_ns"}`` of a source file, or None when it does not exist (or is not a file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def file_identity(path: str | os.PathLike) -> tuple:
    """What makes two names one file: ``(dev, inode)`` when it exists, else its resolved path."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def dedupe(items: Sequence[tuple[str, str]], held: dict[tuple, str] | None = None
           ) -> tuple[list[tuple[str, str]], list[dict]]:
    """Drop the items that name a file already listed (earlier in ``items``, or held under another id in
    ``held``: identity -> id). Returns the kept items and one ``{"id", "same_as"}`` per dropped one."""
    seen: dict[tuple, str] = dict(held or {})
    kept, dropped = [], []
    for image_id, path in items:
        key = file_identity(path)
        if key in seen:
            if seen[key] != image_id:
                dropped.append({"id": image_id, "same_as": seen[key]})
            continue
        seen[key] = image_id
        kept.append((image_id, path))
    return kept, dropped
