"""Sharded FAISS indexes over the store's vectors (cosine = inner product of l2-normalised rows).

A shard indexes one contiguous row range ``[start, stop)`` of a vector array (one or more store
partitions) and returns *global* row numbers as ids. Rows that failed extraction (all zeros, or not
finite) are left out of the shard, so they can never be returned. A folder of shards::

    index/
      manifest.json     {"format", "metric", "d", "shards": [{"file", "start", "stop", "kind", "d",
                         "ntotal"}, ...], "meta": {...}}   written last: its presence marks the folder done
      shard_000.faiss   faiss.write_index files (no pickle)

`ShardedIndex` searches every shard and merges the per-shard top-k with `faiss.merge_knn_results`
(measured against `faiss.IndexShards`: as fast serially, faster than its threaded mode on few
cores, and it lets per-call search parameters such as ``nprobe`` reach every shard).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import faiss
import numpy as np

FORMAT = "rmac-faiss-shards/1"
MANIFEST = "manifest.json"
KINDS = ("flat", "flat16", "ivf", "pq")
TRAINED_KINDS = ("ivf", "pq")  # built from a template trained once on a sample (`rmac.workflows.ivf`)
_ENTRY_KEYS = ("file", "start", "stop", "kind", "d", "ntotal")


def shard_file(i: int) -> str:
    """File name of shard ``i`` inside an index folder."""
    return f"shard_{i:03d}.faiss"


def valid_rows(vectors: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows that can be indexed: finite and not all zeros (failed images)."""
    vectors = np.asarray(vectors)
    return np.isfinite(vectors).all(axis=1) & (vectors != 0).any(axis=1)


def default_nlist(n: int) -> int:
    """IVF list count for ``n`` training vectors: about 4 sqrt(n), with >= 39 points per centroid."""
    return int(max(1, min(round(4 * np.sqrt(n)), n // 39)))


def build_shard(
    vectors: np.ndarray,
    start: int,
    kind: str = "flat",
    nlist: int | None = None,
    *,
    valid: np.ndarray | None = None,
    train: np.ndarray | None = None,
    nprobe: int | None = None,
    template: faiss.Index | None = None,
) -> faiss.Index:
    """Index rows ``start .. start+len(vectors)`` of a vector array by inner product.

    vectors: float (n, D), l2-normalised rows. Ids are global row numbers ``start + i``.
    valid: optional mask of rows to index; invalid rows (see `valid_rows`) are always left out.
    kind: "flat" (exact, `IndexIDMap(IndexFlatIP)`), "flat16" (exhaustive over half-precision
    vectors, `IndexScalarQuantizer` fp16: half the memory, the same top k up to fp16 rounding of the
    scores), "ivf" (`IndexIVFFlat`, spherical k-means trained on ``train`` if given, e.g. a sample
    shared by all shards, else on the shard itself; ``nlist`` defaults to `default_nlist` of the
    training size; ``nprobe`` is stored in the shard) or "pq" (only from a ``template``).
    template: an already trained, empty index of kind "ivf" or "pq" (trained once on a sample of the
    whole array, see `rmac.workflows.ivf`): the shard is a copy of it with its rows added, so all
    shards share lists and codebooks.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"vectors must be 2-D (n, D), got shape {x.shape}")
    d = x.shape[1]

    if kind == "flat":
        index = faiss.IndexIDMap(faiss.IndexFlatIP(d))
    elif kind == "flat16":
        index = faiss.IndexIDMap(faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16,
                                                            faiss.METRIC_INNER_PRODUCT))
    elif template is not None:
        if not template.is_trained or template.ntotal or template.d != d:
            raise ValueError(f"the {kind} template must be trained, empty and {d}-D")
        index = faiss.clone_index(template)
        if nprobe is not None and kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = int(nprobe)
    elif kind == "pq":
        raise ValueError("a pq shard is built from a trained template (rmac.workflows.ivf.train_template)")
    else:
        sample = x[_rows_to_add(x, valid)] if train is None else np.ascontiguousarray(train, dtype=np.float32)
        sample = sample[valid_rows(sample)]
        if len(sample) == 0:
            raise ValueError("an IVF shard needs training vectors: the shard has no valid rows "
                             "and no `train` sample was given")
        nlist = default_nlist(len(sample)) if nlist is None else min(int(nlist), len(sample))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True  # centroids on the sphere, like the data
        index.train(sample)
        if nprobe is not None:
            index.nprobe = int(nprobe)
    add_rows(index, x, start, valid)
    return index


def _rows_to_add(x: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """Row numbers of ``x`` a shard indexes: valid vectors (`valid_rows`) that ``valid`` keeps."""
    keep = valid_rows(x)
    if valid is not None:
        keep &= np.asarray(valid, dtype=bool)
    return np.flatnonzero(keep)


def add_rows(index: faiss.Index, vectors: np.ndarray, start: int, valid: np.ndarray | None = None) -> int:
    """Add rows ``start .. start+len(vectors)`` to a shard (invalid rows left out, ids the global row
    numbers; `build_shard` adds its rows so); returns how many were added. A shard built chunk by chunk
    this way is the shard built at once, without holding all its vectors."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    rows = _rows_to_add(x, valid)
    if len(rows):
        index.add_with_ids(np.ascontiguousarray(x[rows]), (int(start) + rows).astype(np.int64))
    return int(len(rows))


def search_params(kind: str, nprobe: int | None = None, k_factor: float | None = None,
                  index: faiss.Index | None = None):
    """The per-call FAISS search parameters of a shard of ``kind``: IVF lists probed (``nprobe``) or the
    pq shards' re-ranking depth (``k_factor``: the fast-scan stage keeps ``k_factor * k`` candidates,
    re-scored with the 8-bit vectors) and, for a pq ``index`` with IVF lists in front, ``nprobe`` too.
    None: the shard's own settings."""
    if kind == "ivf" and nprobe:
        return faiss.SearchParametersIVF(nprobe=int(nprobe))
    if kind == "pq":
        ivf = faiss.try_extract_index_ivf(index) if index is not None and nprobe else None
        if ivf is None:
            return faiss.IndexRefineSearchParameters(k_factor=float(k_factor)) if k_factor else None
        if not k_factor:  # the parameters object replaces the shard's own k_factor: keep it
            k_factor = faiss.downcast_index(index.index).k_factor
        return faiss.IndexRefineSearchParameters(k_factor=float(k_factor),
                                                 base_index_params=faiss.SearchParametersIVF(nprobe=int(nprobe)))
    return None


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a new file in ``folder`` durable (POSIX: fsync the directory)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def durable_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write that appears at ``path`` only once every byte is on disk.

    Writes go to ``path.tmp``; on leaving the block it is flushed, fsync'ed and closed (each step
    checked: a full disk raises ``OSError`` here, never passes silently), renamed over ``path`` and
    the folder fsync'ed. On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    f = open(tmp, "wb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            f.close()  # a second failure to flush does not hide the first
        with suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:  # say which file
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise
    fsync_dir(path.parent)


def save_shard(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write a shard with `faiss.write_index` through `durable_file`.

    faiss's own file writer reports a failed ``fclose`` (a full disk) only on stderr; here every
    byte goes through Python's checked writes instead, so the error is raised."""
    with durable_file(path) as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))


def load_shard(path: str | os.PathLike, mmap: bool = False) -> faiss.Index:
    """Read a shard written by `save_shard`; ``mmap`` maps its vectors instead of copying them.
    A missing, truncated or damaged file raises `StoreError` naming it."""
    from rmac.storage.store import StoreError

    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
    except RuntimeError as e:  # faiss reports every read problem as RuntimeError with a C++ trace
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise StoreError(f"{path}: damaged or missing FAISS shard ({first}): run `rmac index` again") from None


def shard_entry(index: faiss.Index, file: str, start: int, stop: int, kind: str) -> dict:
    """The manifest entry describing ``index`` (saved as ``file``) for rows ``[start, stop)``."""
    return {"file": file, "start": int(start), "stop": int(stop), "kind": kind,
            "d": int(index.d), "ntotal": int(index.ntotal)}


def write_manifest(folder: str | os.PathLike, shards: Sequence[dict], meta: dict | None = None,
                   name: str = MANIFEST) -> Path:
    """Write ``folder/manifest.json`` (or ``folder/name``; atomically) for shards already saved in ``folder``.

    shards: ``{"file", "start", "stop", "kind", "d", "ntotal"}`` each, with disjoint row ranges.
    meta: free JSON-serialisable description (which array, whitening, store, ...).
    """
    folder = Path(folder)
    entries = []
    for s in shards:
        missing = [k for k in _ENTRY_KEYS if k not in s]
        if missing:
            raise ValueError(f"shard entry {s!r} lacks {missing}")
        if s["kind"] not in KINDS or not 0 <= s["start"] <= s["stop"]:
            raise ValueError(f"bad shard entry {s!r}")
        if not 0 <= s["ntotal"] <= s["stop"] - s["start"]:
            raise ValueError(f"shard entry {s!r}: ntotal does not fit its row range")
        if not (folder / s["file"]).is_file():
            raise FileNotFoundError(folder / s["file"])
        entries.append({k: s[k] for k in _ENTRY_KEYS})
    entries.sort(key=lambda s: s["start"])
    for a, b in zip(entries, entries[1:]):
        if b["start"] < a["stop"]:
            raise ValueError(f"shards {a['file']} and {b['file']} overlap")
    dims = {s["d"] for s in entries}
    if len(dims) > 1:
        raise ValueError(f"shards disagree on the dimension: {sorted(dims)}")
    doc = {"format": FORMAT, "metric": "inner_product", "d": dims.pop() if dims else None,
           "shards": entries, "meta": meta or {}}
    path = folder / name
    with durable_file(path) as f:
        f.write(json.dumps(doc, indent=1).encode())
    return path


class ShardedIndex:
    """All the shards of an index folder, searched as one index over global row numbers."""

    def __init__(self, folder: str | os.PathLike, nprobe: int | None = None, mmap: bool = False):
        self.folder = Path(folder)
        try:
            doc = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            from rmac.storage.store import StoreError
            raise StoreError(f"{self.folder / MANIFEST}: unreadable index manifest ({e}): "
                             "run `rmac index` again") from None
        if doc.get("format") != FORMAT:
            raise ValueError(f"{self.folder / MANIFEST}: unknown format {doc.get('format')!r}")
        self.entries: list[dict] = doc["shards"]
        self.meta: dict[str, Any] = doc.get("meta", {})
        self.d: int | None = doc.get("d")
        self.nprobe = nprobe
        self.shards: list[faiss.Index] = []
        for e in self.entries:
            index = load_shard(self.folder / e["file"], mmap=mmap)
            if index.d != e["d"] or index.ntotal != e["ntotal"]:
                raise ValueError(f"{e['file']}: holds d={index.d}, ntotal={index.ntotal}; "
                                 f"the manifest says d={e['d']}, ntotal={e['ntotal']}")
            self.shards.append(index)

    @property
    def ntotal(self) -> int:
        """Number of indexed (valid) rows."""
        return sum(e["ntotal"] for e in self.entries)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               k_factor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows for each query, best first: ``(scores (nq, k) float32, ids (nq, k) int64)``.

        Scores are inner products (cosine for l2-normalised queries). Where fewer than ``k`` rows
        are found (k > ntotal, or IVF probing few lists), ids are -1 and scores -inf.
        nprobe: IVF lists visited per shard for this call (default: the index's, else the shard's).
        k_factor: candidates per result re-scored by pq shards for this call (default: the shard's).
        """
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if self.d is not None and q.shape[1] != self.d:  # d is None: a folder without shards
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.d}")
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        nprobe = nprobe if nprobe is not None else self.nprobe
        all_d = np.full((max(len(self.shards), 1), len(q), k), -np.inf, dtype=np.float32)
        all_i = np.full(all_d.shape, -1, dtype=np.int64)
        for s, (e, index) in enumerate(zip(self.entries, self.shards)):
            if index.ntotal == 0:
                continue
            all_d[s], all_i[s] = index.search(q, k, params=search_params(e["kind"], nprobe, k_factor, index))
        scores, ids = faiss.merge_knn_results(all_d, all_i, keep_max=True)
        scores[ids < 0] = -np.inf  # faiss pads with -FLT_MAX
        return scores, ids
