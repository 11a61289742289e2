"""Filtering scattered like re-ranking: the workers hold the FAISS shards and search them in place.

`rmac index` writes each store's shards as files (`index/<kind>/shard_XXX.faiss`). Instead of the
client loading every shard (5 GB at 1M x 1280-D), `ScatteredFilter` pins each shard to one worker
(round-robin over the workers at construction, in shard order); one task per worker and query batch
searches that worker's shards, merges them there (`faiss.merge_knn_results`) and returns only its top
k; the client merges the per-worker top k the same way. A worker loads a shard file once and keeps it
(`_held`, keyed by path + mtime + size, so a re-indexed shard is read afresh). Tasks are pinned with
``allow_other_workers=True``: if a worker dies its shards are loaded by another one.

Searches go through one Dask actor per worker (`ShardHolder`), called directly from the client: a
task's round trip through the scheduler cost 32 ms p50 against 6.7 ms for an actor call on the loaded
2-core box (tasks 0 ms of work each), more than the FAISS search itself at 100k. A search of a few
query rows (up to ``INLINE_ROWS``) runs on the worker's event loop instead of the actor's thread: two
thread hand-offs less, 7 ms instead of 10 ms p50 for a call to two workers on the loaded box (a no-op
each). Shards are loaded in the actor's thread first (`ShardHolder.load`), so the loop is never held by a
read from disk; larger batches search in the thread too. When a worker is gone the call falls back to
the tasks above (which another worker may take) and new actors are made.

Faster still, such a query goes over each worker's direct line (`rmac.workflows.filterline`: a plain
socket the actor opens, binary frames, no event loop on either side): 9.8 ms against 16.7 ms p50 through
the actors at 1M on the 2-core box. Any trouble on a line (a worker gone, an error in the search) closes
the lines and asks again through the actors, which give the error its own type or find the dead worker.

Results equal the client-side `ShardedIndex` search (exact shards: the same top k up to ties).
"""
from __future__ import annotations

import functools
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmac.storage.index import MANIFEST
from rmac.workflows.filterline import MAX_ROWS

INLINE_ROWS = 4  # query rows searched on the worker's event loop (more: in the actor's thread)


@dataclass(frozen=True)
class ShardRef:
    """One shard file and the global row offset of its store (hashable: part of the cache key)."""

    path: str
    mtime_ns: int
    size: int
    offset: int
    kind: str


@functools.lru_cache(maxsize=256)
def _held(path: str, mtime_ns: int, size: int):
    from rmac.storage.index import load_shard

    return load_shard(path)


def held_shards() -> int:
    """How many shards this process holds (for tests and the bench)."""
    return _held.cache_info().currsize


def release_held() -> int:
    """Drop every shard this process holds (``client.run(release_held)``); returns how many."""
    n = _held.cache_info().currsize
    _held.cache_clear()
    return n


def search_held(refs: list[ShardRef], q: np.ndarray, k: int, nprobe: int | None,
                k_factor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Search the shards ``refs`` held by this worker; merged top ``k`` with global row numbers."""
    import faiss

    from rmac.storage.index import search_params

    all_d = np.full((max(len(refs), 1), len(q), k), -np.inf, np.float32)
    all_i = np.full(all_d.shape, -1, np.int64)
    for s, ref in enumerate(refs):
        index = _held(ref.path, ref.mtime_ns, ref.size)
        if index.ntotal == 0:
            continue
        d, i = index.search(q, k, params=search_params(ref.kind, nprobe, k_factor, index))
        all_d[s], all_i[s] = d, np.where(i >= 0, i + ref.offset, -1)
    d, i = faiss.merge_knn_results(all_d, all_i, keep_max=True)
    d[i < 0] = -np.inf
    return d, i


def shard_refs(store_paths: list[Path], offsets: list[int], kind: str, index_dir: str = "index") -> list[ShardRef]:
    """Every shard of ``kind`` over ``store_paths`` (global offsets ``offsets``), in row order."""
    refs = []
    for path, off in zip(store_paths, offsets):
        folder = Path(path) / index_dir / kind
        doc = json.loads((folder / MANIFEST).read_text())
        for e in doc["shards"]:
            st = os.stat(folder / e["file"])
            refs.append(ShardRef(str((folder / e["file"]).resolve()), st.st_mtime_ns, st.st_size, int(off),
                                 e["kind"]))
    return refs


class ShardHolder:
    """A Dask actor: the direct line to one worker's held shards (`search_held`)."""

    def load(self, refs: list[ShardRef]) -> int:
        """Read the shards ``refs`` into this worker (if not held already); returns how many."""
        for ref in refs:
            _held(ref.path, ref.mtime_ns, ref.size)
        return len(refs)

    def line(self, refs: list[ShardRef]) -> tuple[str, int, int] | None:
        """(host, port, token) of this worker's `filterline` for ``refs``; None: no line here."""
        from rmac.workflows.filterline import open_line

        return open_line(refs)

    def search(self, refs: list[ShardRef], q: np.ndarray, k: int, nprobe: int | None,
               k_factor: float | None) -> tuple[np.ndarray, np.ndarray]:
        return search_held(refs, q, k, nprobe, k_factor)


class ScatteredFilter:
    """The FAISS shards of a database held by the workers of ``client`` and searched there."""

    def __init__(self, client, store_paths: list[Path], offsets: list[int], index_dir: str = "index",
                 inline_rows: int = INLINE_ROWS, direct: bool = True, line_timeout: float = 60.0):
        self.client, self.index_dir, self.inline_rows = client, index_dir, int(inline_rows)
        self.direct, self.line_timeout = direct, float(line_timeout)
        self._lines: dict[tuple[str, tuple[ShardRef, ...]], object] = {}  # (worker, shards) -> filterline.Line
        self._lock = threading.Lock()
        self.store_paths, self.offsets = list(store_paths), [int(o) for o in offsets]
        self.workers = sorted(client.scheduler_info()["workers"])
        if not self.workers:
            raise RuntimeError("no Dask workers to hold the FAISS shards")
        self._plan: dict[str, dict[str, list[ShardRef]]] = {}
        self._holders: dict[str, object] = {}
        self._loaded: set[tuple[str, tuple[ShardRef, ...]]] = set()  # (worker, shards) loaded through its actor

    def plan(self, kind: str) -> dict[str, list[ShardRef]]:
        """Worker address -> the shards of ``kind`` it holds (round-robin in shard order)."""
        if kind not in self._plan:
            refs = shard_refs(self.store_paths, self.offsets, kind, self.index_dir)
            plan: dict[str, list[ShardRef]] = {w: [] for w in self.workers}
            for j, ref in enumerate(refs):
                plan[self.workers[j % len(self.workers)]].append(ref)
            self._plan[kind] = {w: r for w, r in plan.items() if r}
        return self._plan[kind]

    def warm(self, kind: str) -> None:
        """Load every shard of ``kind`` on its worker now (else the first search does)."""
        mine = {tuple(refs) for refs in self.plan(kind).values()}
        self._loaded = {key for key in self._loaded if key[1] not in mine}  # load again: a worker may have let go
        self.search(kind, np.zeros((1, self._dim(kind)), np.float32), 1)

    def _dim(self, kind: str) -> int:
        return int(json.loads((Path(self.store_paths[0]) / self.index_dir / kind / MANIFEST).read_text())["d"])

    def search(self, kind: str, q: np.ndarray, k: int, nprobe: int | None = None,
               k_factor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` (scores, global rows) of each query row, best first (-inf / -1 where none)."""
        import faiss

        q = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
        plan = self.plan(kind)
        with self._lock:
            single = len(q) <= min(self.inline_rows, MAX_ROWS)
            parts = self._by_lines(plan, q, k, nprobe, k_factor) if self.direct and single else None
            if parts is None:
                parts = self._by_actors(plan, q, k, nprobe, k_factor)
        if parts is None:  # a worker is gone: tasks, which another worker may take
            futures = [self.client.submit(search_held, refs, q, k, nprobe, k_factor, workers=[w],
                                          allow_other_workers=True, pure=False)
                       for w, refs in plan.items()]
            parts = self.client.gather(futures)
        if not parts:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        d, i = faiss.merge_knn_results(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]),
                                       keep_max=True)
        d[i < 0] = -np.inf
        return d, i

    def _hold(self, plan: dict[str, list[ShardRef]]) -> None:
        """Make sure each worker of ``plan`` has its actor and holds its shards (loaded in the actors'
        threads, never on a worker's event loop)."""
        for w in plan:
            if w not in self._holders:
                self._holders[w] = self.client.submit(ShardHolder, workers=[w], actor=True, pure=False).result()
        new = [(w, tuple(refs)) for w, refs in plan.items() if (w, tuple(refs)) not in self._loaded]
        for c in [self._holders[w].load(list(refs)) for w, refs in new]:
            c.result()
        self._loaded.update(new)

    def _by_lines(self, plan: dict[str, list[ShardRef]], q, k, nprobe, k_factor) -> list | None:
        """Each worker's top k over its direct line (`filterline`); None when a worker has no line or
        anything goes wrong on one (every line is then closed: the caller asks through the actors)."""
        from rmac.workflows.filterline import Line

        try:
            self._hold(plan)
            lines = []
            for w, refs in plan.items():
                key = (w, tuple(refs))
                if key not in self._lines:
                    where = self._holders[w].line(list(refs)).result()
                    self._lines[key] = Line(*where, timeout=self.line_timeout) if where else None
                if self._lines[key] is None:  # the worker offers none (not plain TCP): asked once
                    return None
                lines.append(self._lines[key])
            for line in lines:  # every worker searches at once
                line.send(q, k, nprobe, k_factor)
            return [line.receive(len(q), k) for line in lines]
        except Exception:  # noqa: BLE001  (a dead worker, a failed search: the actors' path says which)
            self.close_lines()
            return None

    def close_lines(self) -> None:
        """Hang up every direct line (the next single query opens them again)."""
        for line in self._lines.values():
            if line is not None:
                line.close()
        self._lines.clear()

    def _by_actors(self, plan: dict[str, list[ShardRef]], q, k, nprobe, k_factor) -> list | None:
        """Each worker's top k through its `ShardHolder`; None when a worker of the plan is gone (the
        caller then uses tasks; the next call makes new actors for the workers there are)."""
        try:
            self._hold(plan)
            inline = len(q) <= self.inline_rows
            calls = [self._holders[w].search(refs, q, k, nprobe, k_factor, separate_thread=not inline)
                     for w, refs in plan.items()]
            return [c.result() for c in calls]
        except Exception:
            alive = set(self.client.scheduler_info()["workers"])
            if all(w in alive for w in plan):
                raise  # a real error of the search (a damaged shard, a bad query): the caller sees it
            self._holders.clear()
            self._loaded.clear()
            self.close_lines()
            self.workers = sorted(alive)
            self._plan.clear()
            return None
