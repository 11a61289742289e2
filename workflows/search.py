"""`rmac search`: filter by cosine over the FAISS shards, scatter AML re-ranking of the top N over the
Dask workers, gather, then QE.

Re-ranking reads scale: a query's short-list is grouped by store partition and each partition is sent
to the same worker every time (one task per (store, worker) holds all its partitions); a task reads each
partition's sparse codes once and decodes them straight into the kernel's form, through a bounded LRU
cache of decoded partitions per worker process (`RMAC_MAP_CACHE_MB`, default 512), which repeated
queries and evaluation hit. Workers load the numba kernels in the background as soon as a search starts
(`KernelWarmup`), so a single query does not wait for them.

A database is one store or several (a dataset plus distractor stores): rows are numbered globally in
store order. All its stores must share backbone and whitening.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rmac.ops import whitening as wh
from rmac.ops.aml import box_to_pixels, exhaustive_search
from rmac.ops.integral import integral_lut, take_maps
from rmac.ops.pooling import l2n, mac, rmac
from rmac.ops.rerank import query_expansion, rerank as rerank_maps, rescore
from rmac.storage.images import BadImage, load_image
from rmac.storage.maps import PartitionCache
from rmac.storage.store import Store, StoreError
from rmac.workflows.extract import ModelChoice, worker_model
from rmac.workflows.index import Whitenings, load_whitenings, require_indexed
from rmac.workflows.args import (existing_file, finite_float, nonnegative_int, positive_int, query_scales,
                                 writable_file)
from rmac.workflows.text import printable


class QueryError(ValueError):
    """The query cannot be used: unreadable image, box outside it or empty."""


@dataclass(frozen=True)
class SearchParams:
    """How a query is answered (the paper's defaults)."""

    top_n: int = 1000
    rerank: bool = True
    qe: int = 5
    # "rmac": R-MAC filtering, the AML box re-scored by its R-MAC; "mac": whitened-MAC filtering, the
    # AML box re-scored by its whitened approximate MAC. AML always localises with the plain MAC.
    filter: str = "rmac"
    t: int = 3
    s: float = 1.1
    L: int = 3
    exact: bool = False  # float integral images instead of the LUT path
    nprobe: int | None = None  # IVF lists probed per shard (None: the shard's own)
    k_factor: float | None = None  # pq shards: candidates re-scored per result (None: the shard's own)
    # Multi-scale localisation (an extension; (1.0,) is the paper): the query is also described at
    # these scales (`QueryVectors.scale_macs`), AML runs once per scale on each short-listed map and
    # the window whose `scale_pick` score is best is kept: "aml" its AML cosine with the MAC of the
    # scale that found it; "score" its re-ranking score (against the scale-1 query's R-MAC / whitened
    # MAC, the same for all scales); "own" its re-ranking vector against the R-MAC / whitened MAC of
    # the query at the scale that found it. The re-ranking score itself is always the "score" one.
    # "score" measured best (`rmac bench localisation`, docs/benchmarks.md issue 8): the raw AML cosines
    # of different scales are not comparable (a smaller query scores lower on its own object than the
    # scale-1 query does on the whole scene), a common reference is.
    query_scales: tuple[float, ...] = (1.0,)
    scale_pick: str = "score"


@dataclass
class QueryVectors:
    """What a query is compared with: plain MAC (for AML), whitened MAC and R-MAC (for filtering)."""

    mac: np.ndarray
    macw: np.ndarray
    rmac: np.ndarray
    aspect: float
    image_hw: tuple[int, int]
    bbox: tuple[float, float, float, float]
    # multi-scale localisation: the l2-normalised MAC of the query at each of `scales` (S, K); None: the
    # paper's single scale (`mac`). Filtering and the re-ranking scores always use the scale-1 vectors.
    scales: tuple[float, ...] = (1.0,)
    scale_macs: np.ndarray | None = None
    scale_macws: np.ndarray | None = None  # (S, D): each scale's whitened MAC
    scale_rmacs: np.ndarray | None = None  # (S, D): each scale's R-MAC

    def localisation_macs(self) -> np.ndarray:
        """The query MACs AML localises with: (S, K), one row per scale."""
        return self.mac[None] if self.scale_macs is None else self.scale_macs


def query_maps(path: str, bbox: tuple[float, float, float, float] | None, choice: ModelChoice,
               max_size: int, scale: float = 1.0, all_cores: bool = False
               ) -> tuple[np.ndarray, tuple[int, int], tuple[float, float, float, float]]:
    """Load the query, check its box, resize the whole photo as `extract` resizes a database image
    (times ``scale``) and crop the scaled box; return its (K, h, w) maps (runs on a worker).
    ``all_cores``: the forward pass uses every core of the worker's machine instead of the worker's one
    thread (a single interactive query, which nothing else competes with; a batch of queries keeps one
    thread per worker)."""
    import torch

    from rmac.ops.backbones import activations, crop_query

    try:
        image = load_image(path)
    except BadImage as e:
        raise QueryError(f"query image {path}: {e.reason}: {e.detail}") from None
    W, H = image.size
    if bbox is None:
        bbox = (0.0, 0.0, float(W), float(H))
    x1, y1, x2, y2 = bbox
    if not (x2 > x1 and y2 > y1):
        raise QueryError(f"query box {bbox} is empty (need x1 < x2 and y1 < y2)")
    if x2 <= 0 or y2 <= 0 or x1 >= W or y1 >= H:
        raise QueryError(f"query box {bbox} lies outside the {W}x{H} image")
    bbox = (max(0.0, x1), max(0.0, y1), min(float(W), x2), min(float(H), y2))
    if bbox[2] - bbox[0] < 2 or bbox[3] - bbox[1] < 2:
        raise QueryError(f"query box {bbox} is too small inside the {W}x{H} image")
    model, spec = worker_model(choice)
    threads = torch.get_num_threads()
    if all_cores:
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:  # the whole photo at the database's scale, then the (scaled) box: never the crop alone
        maps = activations(model, spec, crop_query(image, bbox, max_size, scale), max_size=max_size)
    except ValueError as e:
        raise QueryError(f"query box {bbox}: {e}") from None
    finally:
        torch.set_num_threads(threads)
    return maps, (H, W), bbox


def query_scale_maps(path: str, bbox: tuple[float, float, float, float], choice: ModelChoice, max_size: int,
                     scales: tuple[float, ...]) -> tuple[tuple[float, ...], list[np.ndarray]]:
    """The query's (K, h, w) maps at each scale of ``scales`` other than 1 (a worker task): the scales
    kept and their maps. The query was already described at scale 1, so a scale that fails here has a
    crop too small for the backbone: it is left out (the other scales localise)."""
    kept, maps = [], []
    for sc in scales:
        if sc == 1.0:
            continue
        try:
            m, _, _ = query_maps(path, bbox, choice, max_size, sc)
        except QueryError:
            continue
        kept.append(float(sc))
        maps.append(m)
    return tuple(kept), maps


def with_scales(qv: QueryVectors, scales: tuple[float, ...], kept: tuple[float, ...], maps: list[np.ndarray],
                whitening: "Whitenings | wh.Whitening", L: int) -> QueryVectors:
    """``qv`` described at ``scales`` too (``kept``/``maps`` from `query_scale_maps`; scale 1 is ``qv``
    itself): each scale's MAC (AML localises with it), whitened MAC and R-MAC (the rule "own" of
    `SearchParams.scale_pick`). ``scales == (1.0,)`` gives ``qv`` unchanged (the paper)."""
    from dataclasses import replace

    if tuple(scales) == (1.0,):
        return qv
    by_scale = {sc: query_vectors(m, whitening, L, qv.image_hw, qv.bbox) for sc, m in zip(kept, maps)}
    if 1.0 in scales:
        by_scale[1.0] = qv
    order = tuple(float(sc) for sc in scales if sc in by_scale)
    if not order:
        raise QueryError(f"query box {qv.bbox} is too small at every scale of {scales}")

    def rows(name: str) -> np.ndarray:
        return np.stack([getattr(by_scale[sc], name) for sc in order]).astype(np.float32)

    return replace(qv, scales=order, scale_macs=rows("mac"), scale_macws=rows("macw"), scale_rmacs=rows("rmac"))


def describe_at_scales(client, qvs: list[QueryVectors], paths: list[str], choice: ModelChoice, max_size: int,
                       scales: tuple[float, ...], whitening: "Whitenings | wh.Whitening", L: int) -> list[QueryVectors]:
    """Each query of ``qvs`` (photo ``paths[i]``) also described at ``scales`` on the workers; unchanged
    for the paper's single scale."""
    if tuple(scales) == (1.0,):
        return qvs
    futures = [client.submit(query_scale_maps, p, qv.bbox, choice, max_size, tuple(scales), pure=False)
               for qv, p in zip(qvs, paths)]
    return [with_scales(qv, scales, *f.result(), whitening, L) for qv, f in zip(qvs, futures)]


def _pair(whitening: Whitenings | wh.Whitening) -> tuple[wh.Whitening, wh.Whitening]:
    """(regional, mac) whitenings; a single whitening serves both (older callers, benchmarks)."""
    return tuple(whitening) if isinstance(whitening, Whitenings) else (whitening, whitening)


def query_vectors(maps: np.ndarray, whitening: Whitenings | wh.Whitening, L: int, image_hw, bbox) -> QueryVectors:
    """The query's vectors: R-MAC whitened with the regional whitening, MAC with the MAC whitening."""
    w_regional, w_mac = _pair(whitening)
    m = l2n(mac(maps))
    return QueryVectors(mac=m, macw=l2n(wh.apply(w_mac, m[None])[0]), rmac=rmac(maps, L, w_regional),
                        aspect=(bbox[2] - bbox[0]) / (bbox[3] - bbox[1]), image_hw=tuple(image_hw),
                        bbox=tuple(bbox))


class Database:
    """One or more indexed stores searched as one, with global row numbers."""

    def __init__(self, stores: list[Store]):
        if not stores:
            raise StoreError("no store to search")
        first = stores[0]
        for s in stores:
            require_indexed(s)
            c, f = s.config, first.config
            if (c.backbone, c.max_size, c.weights) != (f.backbone, f.max_size, f.weights):
                raise StoreError(f"{s.path} was extracted with {c.backbone}/{c.max_size} ({c.weights} weights), "
                                 f"{first.path} with {f.backbone}/{f.max_size} ({f.weights} weights)")
        self.stores = stores
        self.offsets = np.cumsum([0] + [s.n_images for s in stores])
        self.whitenings = load_whitenings(first)
        self.whitening = self.whitenings.regional  # R-MAC's
        for s in stores[1:]:
            if not all(np.array_equal(a.proj, b.proj) for a, b in zip(load_whitenings(s), self.whitenings)):
                raise StoreError(f"{s.path} is indexed with another whitening than {first.path}: "
                                 f"re-index it with `rmac index {s.path} --whiten-on {first.path}`")
        self._indexes: dict[str, list] = {}
        self.scattered = None  # a ScatteredFilter once `scatter_filtering` is called

    def hold_metadata(self, client) -> int:
        """Have each worker parse and keep the metadata of the partitions it re-ranks (`reranking_worker`, as
        `rerank_many`), before the queries: a short-list's first read of a partition then skips its
        ``zarr.json`` (at 1M, ~950 partitions per query, most never read before by a fresh worker: 500
        maps cold in 1.37 s, 0.54 s with the metadata held). For a cluster that serves many queries.
        Returns how many partitions are held in all."""
        workers = sorted(client.scheduler_info()["workers"])
        futures = [client.submit(hold_partition_meta, s,
                                 [p for p in range(s.n_partitions) if reranking_worker(si, p, len(workers)) == wi],
                                 workers=[w], pure=False)
                   for si, s in enumerate(self.stores) for wi, w in enumerate(workers)]
        return int(sum(client.gather(futures)))

    def scatter_filtering(self, client) -> "Database":
        """Let the workers of ``client`` hold the FAISS shards and filter where they live
        (`rmac.workflows.filtering`); the client no longer loads any shard."""
        from rmac.workflows.filtering import ScatteredFilter

        self.scattered = ScatteredFilter(client, [s.path for s in self.stores], self.offsets[:-1].tolist())
        return self

    @property
    def n_images(self) -> int:
        return int(self.offsets[-1])

    def position(self, g: int) -> tuple[int, int]:
        """(index of the store, row in it) of global row ``g``."""
        i = int(np.searchsorted(self.offsets, g, side="right") - 1)
        return i, int(g - self.offsets[i])

    def locate(self, g: int) -> tuple[Store, int]:
        i, r = self.position(g)
        return self.stores[i], r

    def record(self, g: int) -> tuple[str, str]:
        store, r = self.locate(g)
        return store.ids[r], store.paths[r]

    def index(self, kind: str) -> list:
        from rmac.storage.index import ShardedIndex

        if kind not in self._indexes:
            self._indexes[kind] = [ShardedIndex(s.path / "index" / kind) for s in self.stores]
        return self._indexes[kind]

    def filter(self, kind: str, q: np.ndarray, k: int, nprobe: int | None = None,
               k_factor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` (scores, global rows) of every query row of ``q`` by cosine, best first."""
        q = np.atleast_2d(q).astype(np.float32)
        if self.scattered is not None:
            return self.scattered.search(kind, q, k, nprobe, k_factor)
        parts_s, parts_i = [], []
        for index, off in zip(self.index(kind), self.offsets):
            s, i = index.search(q, min(k, index.ntotal) if index.ntotal else 1, nprobe=nprobe, k_factor=k_factor)
            parts_s.append(np.where(i >= 0, s, -np.inf))
            parts_i.append(np.where(i >= 0, i + off, -1))
        scores, ids = np.concatenate(parts_s, 1), np.concatenate(parts_i, 1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


_MAP_CACHE: PartitionCache | None = None
_MAP_CACHE_LOCK = threading.Lock()
DEFAULT_MAP_CACHE_MB = 512


def worker_map_cache() -> PartitionCache:
    """This process's cache of decoded partitions (created on first use; `RMAC_MAP_CACHE_MB` bounds it)."""
    global _MAP_CACHE
    with _MAP_CACHE_LOCK:
        if _MAP_CACHE is None:
            mb = float(os.environ.get("RMAC_MAP_CACHE_MB", DEFAULT_MAP_CACHE_MB))
            _MAP_CACHE = PartitionCache(int(mb * 2**20))
        return _MAP_CACHE


def reranking_worker(store_index: int, p: int, n_workers: int) -> int:
    """Which of the sorted workers re-ranks partition ``p`` of the database's store ``store_index``: always
    the same one, so that its caches (decoded partitions, partition metadata) serve the next queries."""
    return (p + store_index) % n_workers


def hold_partition_meta(store: Store, partitions: list[int]) -> int:
    """A task: this worker keeps the metadata of ``partitions`` of ``store`` (`maps.hold_meta`)."""
    from rmac.storage.maps import hold_meta

    return hold_meta(store.path / "arrays", partitions)


def rerank_rows(store: Store, jobs: list[tuple[QueryVectors, list[int]]],
                whitening: Whitenings | wh.Whitening, params: SearchParams, cache: bool = True) -> list[dict]:
    """AML re-ranking of rows of one store (a Dask task): for each (query, rows) job, the rows' scores,
    pixel boxes and localised vectors, in the order of its rows. Each partition the jobs touch is read
    once: decoded whole and kept in this worker's cache when more than a quarter of its maps are needed (or
    it is cached already), otherwise only the needed maps are read, and decoded all together (a
    short-list spread over a large store needs about one map per partition; with per-image frames,
    `storage/maps.py`, reading k of a partition's P maps costs about k/P of reading it whole, so the
    quarter is a caching choice: below it a partition is unlikely to serve the next queries enough to pay
    for reading it whole). Every read is hinted to the kernel first (`Store.prefetch_maps`).

    A store whose data files for these rows are not all there is refused (`StoreError`, even where the
    re-ranking itself would not read the missing ones): the check (stat calls only, ~6 a partition, ~50 ms
    at 1M where the short-list spans ~500 partitions per worker) runs in a thread beside the reads and
    kernels, and its verdict comes before any answer or other error."""
    part_of = {r: store.partition_of(r) for _, rows in jobs for r in rows}
    checked = _CHECKS.submit(store.missing_partition_chunks, sorted(set(part_of.values())))
    try:
        return _rerank_rows(store, jobs, whitening, params, cache, part_of)
    finally:  # damage found is the answer, over the rows' scores or the reads' own error
        _refuse_missing(store, checked.result())


_CHECKS = ThreadPoolExecutor(4, thread_name_prefix="rmac-chunk-check")  # tasks of a many-thread worker check side by side


def _refuse_missing(store: Store, missing: list[str]) -> None:
    if missing:  # a deleted data file means damage
        raise StoreError(f"{store.path}: data missing ({', '.join(missing[:5])}): the store is damaged; "
                         f"run `rmac verify {store.path}`")


def _rerank_rows(store: Store, jobs: list[tuple[QueryVectors, list[int]]], whitening: Whitenings | wh.Whitening,
                 params: SearchParams, cache: bool, part_of: dict[int, int]) -> list[dict]:
    c = worker_map_cache() if cache else None
    first = {p: store.partition_rows(p).start for p in set(part_of.values())}
    needed: dict[int, set[int]] = defaultdict(set)
    for r, p in part_of.items():
        needed[p].add(r - first[p])
    arrays = store.path / "arrays"
    held = {p for p in needed if c is not None and c.holds(arrays, p)}
    whole = held | {p for p, local in needed.items() if c is not None and 4 * len(local) > store.config.partition_size}
    select = {p: np.array(sorted(local), dtype=np.int64) for p, local in needed.items() if p not in whole}
    store.prefetch_maps({p: select.get(p) for p in needed if p not in held})  # reads in flight together
    parts, at = {}, {}  # at[p]: offset in the partition -> position in parts[p] (None: the whole partition)
    for p in sorted(whole):
        parts[p], at[p] = store.read_sparse(p, c), None  # whole, and kept for the next queries
    if select:  # a few maps of each partition (a short-list spread over a large store): only those, decoded together
        select = dict(sorted(select.items()))
        few, start = store.read_sparse_many(select), 0
        for p, sel in select.items():
            parts[p], at[p] = few, {int(o): start + j for j, o in enumerate(sel)}
            start += len(sel)
    out = []
    for qv, rows in jobs:
        rows = [int(r) for r in rows]
        order = sorted(range(len(rows)), key=lambda i: part_of[rows[i]])  # partition by partition
        by_part: dict[int, list[int]] = defaultdict(list)
        for i in order:
            p = part_of[rows[i]]
            o = rows[i] - first[p]
            by_part[p].append(o if at[p] is None else at[p][o])
        runs: list[tuple[object, list[int]]] = []  # (decoded maps, positions): one run per source in a row
        for p, local in by_part.items():
            if runs and runs[-1][0] is parts[p]:
                runs[-1][1].extend(local)
            else:
                runs.append((parts[p], list(local)))
        sp = take_maps([(src.maps, np.asarray(pos, np.int64)) for src, pos in runs])
        image_hw = np.concatenate([src.image_hw[np.asarray(pos, np.int64)] for src, pos in runs])
        res = rerank_scales(sp, qv, whitening, params, store.config.levels)
        back = np.empty(len(rows), np.int64)
        back[np.asarray(order, np.int64)] = np.arange(len(rows))  # result of rows[i] is at back[i]
        boxes = [box_to_pixels(res.boxes[j], sp.map_hw[j], image_hw[j], cell_geometry(store, image_hw[j]))
                 for j in back]
        out.append({"rows": rows, "scores": res.scores[back], "boxes": boxes, "vectors": res.vectors[back],
                    "windows": res.n_scored[back], "scale": res.scale[back]})
    return out


@dataclass
class Localised:
    """`rerank_scales`' answer per map: re-ranking score, AML box (cells), localised vector, AML cosine,
    windows scored (all scales together) and the index in ``qv.scales`` of the scale that was kept."""

    scores: np.ndarray
    boxes: np.ndarray
    vectors: np.ndarray
    aml_scores: np.ndarray
    n_scored: np.ndarray
    scale: np.ndarray


def rerank_scales(sp, qv: QueryVectors, whitening: Whitenings | wh.Whitening, params: SearchParams,
                  levels: int = 31) -> Localised:
    """AML re-ranking of every map of ``sp`` (`SparseMaps`) for one query: once per query scale
    (`QueryVectors.localisation_macs`), keeping per map the window of the scale whose
    ``params.scale_pick`` score is best; with one scale, the paper's re-ranking. The score is that
    window's R-MAC against the query's R-MAC (R-MAC filtering), or its approximate MAC l2 -> whiten
    -> l2 against the query's whitened MAC (MAC filtering, which ranks whitened MACs)."""
    use_rmac = params.filter == "rmac"
    w_regional, w_mac = _pair(whitening)
    if params.scale_pick not in ("aml", "score", "own"):
        raise ValueError(f"scale_pick must be 'aml', 'score' or 'own', got {params.scale_pick!r}")
    got, keys = [], []
    for j, q_mac in enumerate(qv.localisation_macs()):
        res = rerank_maps(sp, q_mac, qv.aspect, q_rmac=qv.rmac if use_rmac else None,
                          whitening=w_regional if use_rmac else None, L=params.L, levels=levels,
                          t=params.t, s=params.s)
        scores, vectors = res.scores, res.vectors
        if not use_rmac:  # AML itself used the plain MAC
            vectors = l2n(wh.apply(w_mac, vectors))
            scores = vectors @ qv.macw
        got.append(Localised(scores, res.boxes, vectors, res.aml_scores, res.n_scored,
                             np.zeros(len(scores), np.int64)))
        if params.scale_pick == "own" and qv.scale_macs is not None:
            keys.append(vectors @ (qv.scale_rmacs if use_rmac else qv.scale_macws)[j])
        else:
            keys.append(res.aml_scores if params.scale_pick == "aml" else scores)
    if len(got) == 1:
        return got[0]
    key = np.stack(keys)
    pick = np.argmax(key, axis=0)  # ties keep the first scale listed
    idx = np.arange(key.shape[1])

    def take(name: str) -> np.ndarray:
        return np.stack([getattr(g, name) for g in got])[pick, idx]

    return Localised(take("scores"), take("boxes"), take("vectors"), take("aml_scores"),
                     np.sum([g.n_scored for g in got], axis=0), pick)


def warm_kernels() -> float:
    """Load (or compile) every numba kernel of the re-ranking path by running it on a tiny map; returns
    the seconds it took. Goes through the same calls, with the same argument types, as `rerank_rows`."""
    from rmac.storage.maps import decode_partition, encode_maps

    t = time.perf_counter()
    rng = np.random.default_rng(0)
    K = 8
    q = (rng.integers(0, 32, (K, 4, 5)) * (rng.random((K, 4, 5)) < 0.5)).astype(np.uint8)
    buf, attrs = encode_maps([q, q])
    sp = take_maps([(decode_partition(buf, attrs), np.array([1, 0]))])
    sp.dense(0)
    q_mac = np.ones(K, np.float32)
    rerank_maps(sp, q_mac, 1.0, q_rmac=np.ones(K, np.float32))  # the kernels do not see the whitening
    rerank_maps(sp, q_mac, 1.0)
    exhaustive_search(integral_lut(q), q_mac)
    return time.perf_counter() - t


class KernelWarmup:
    """A worker plugin: on a worker's start (or when registered) load the re-ranking kernels in a
    background thread, so that they are ready when the first query's re-ranking arrives (the query's
    own extraction takes seconds). A task that needs them first simply waits on numba's lock."""

    name = "rmac-kernel-warmup"
    idempotent = True

    def setup(self, worker=None) -> None:
        threading.Thread(target=_warm_quietly, name="rmac-warmup", daemon=True).start()

    def teardown(self, worker=None) -> None:
        pass


def _warm_quietly() -> None:
    try:
        warm_kernels()
    except Exception:  # a warm-up is an optimisation: the real task reports any real problem
        pass


def warm_workers(client) -> None:
    """Register `KernelWarmup` (once per cluster): every current and future worker warms its kernels."""
    from distributed.diagnostics.plugin import WorkerPlugin

    plugin = type("RmacKernelWarmup", (KernelWarmup, WorkerPlugin), {})()
    try:
        client.register_plugin(plugin, name=KernelWarmup.name)
    except Exception:  # e.g. a scheduler that refuses plugins: the kernels then load on first use
        pass


def localise_exhaustive(store: Store, row: int, qv: "QueryVectors | np.ndarray",
                        whitening: "Whitenings | wh.Whitening | None" = None, scale_pick: str = "aml",
                        L: int = 3) -> tuple[float, float, float, float]:
    """The exhaustive optimum window of the query's MAC in ``row``'s map, in image pixels (a Dask
    task). ``qv`` is the query (or its MAC alone). With query scales, each scale's optimum, and the one
    kept by ``scale_pick`` as `rerank_scales` keeps AML's windows, with R-MAC scores ("score", "own":
    they need ``whitening``)."""
    from rmac.ops.rerank import localised_rmac

    (q, _), = store.read_maps([row])
    ii = integral_lut(q, store.config.levels)
    macs = qv.localisation_macs() if isinstance(qv, QueryVectors) else np.atleast_2d(qv)
    found = [exhaustive_search(ii, m) for m in macs]
    if len(found) == 1 or scale_pick == "aml":
        best = max(found, key=lambda r: r.score)  # ties: the first scale
    else:
        w_regional = _pair(whitening)[0]
        refs = qv.scale_rmacs if scale_pick == "own" else [qv.rmac] * len(found)
        keys = [localised_rmac(ii, r.box, ref, w_regional, L)[0] for r, ref in zip(found, refs)]
        best = found[int(np.argmax(keys))]
    image_hw = tuple(int(v) for v in store.arrays["image_hw"][row])
    return box_to_pixels(best.box, q.shape[1:], image_hw, cell_geometry(store, image_hw))


def cell_geometry(store: Store, image_hw) -> tuple[float, float, float, float]:
    """Where the cells of a stored image of ``image_hw`` pixels lie in its pixels (its backbone's
    measured stride and offset at the store's max size): the ``geometry`` of `box_to_pixels`."""
    return _cell_geometry(store.config.backbone, int(image_hw[0]), int(image_hw[1]), store.config.max_size)


@functools.lru_cache(maxsize=4096)
def _cell_geometry(backbone: str, h: int, w: int, max_size: int) -> tuple[float, float, float, float]:
    from rmac.ops.backbones import cell_centres, get_spec  # a short-list's photos share a few sizes

    return cell_centres(get_spec(backbone), (h, w), max_size)


@dataclass
class Ranking:
    """One query's answer: global rows best first, their scores and (for re-ranked rows) boxes."""

    rows: np.ndarray
    scores: np.ndarray
    initial_rank: dict[int, int]
    boxes: dict[int, tuple] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    reranked: dict | None = None


def rerank_many(db: Database, client, qvs: list[QueryVectors], rows: list[np.ndarray], params: SearchParams,
                whitening_future=None) -> list[dict[int, tuple[float, tuple, np.ndarray]]]:
    """Scatter AML re-ranking of each query's global ``rows`` over the workers; gather
    {row: (score, box, vector)} per query.

    A store partition always goes to the same worker (partition number modulo the sorted worker list),
    so that worker's cache of decoded partitions serves the next queries; one task per (store, worker)
    holds every query's rows in its partitions (few tasks: the scheduler's cost per task is ~ms). A
    task may still run elsewhere if its worker is gone."""
    workers = sorted(client.scheduler_info()["workers"]) or [None]
    groups: dict[tuple[int, int], list[tuple[int, list[int], list[int]]]] = defaultdict(list)
    for qi, qrows in enumerate(rows):
        per_task: dict[tuple[int, int], tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        for g in np.asarray(qrows).tolist():
            si, r = db.position(g)
            gs, rs = per_task[(si, reranking_worker(si, db.stores[si].partition_of(r), len(workers)))]
            gs.append(g)
            rs.append(r)
        for key, (gs, rs) in per_task.items():
            groups[key].append((qi, gs, rs))
    w = whitening_future if whitening_future is not None else client.scatter(db.whitenings, broadcast=True, hash=False)
    futures = {key: client.submit(rerank_rows, db.stores[key[0]], [(qvs[qi], rs) for qi, _, rs in members],
                                  w, params, pure=False, retries=2,
                                  workers=[workers[key[1]]] if workers[key[1]] else None, allow_other_workers=True)
               for key, members in groups.items()}
    out: list[dict] = [{} for _ in qvs]
    for key, fut in futures.items():
        for (qi, gs, _), res in zip(groups[key], fut.result()):
            for g, score, box, vec in zip(gs, res["scores"], res["boxes"], res["vectors"]):
                out[qi][g] = (float(score), tuple(float(v) for v in box), vec)
    return out


def rerank(db: Database, client, qv: QueryVectors, rows: np.ndarray, params: SearchParams,
           whitening_future=None) -> dict[int, tuple[float, tuple, np.ndarray]]:
    """Scatter AML re-ranking of one query's global ``rows``; gather {row: (score, box, vector)}."""
    return rerank_many(db, client, [qv], [rows], params, whitening_future)[0]


def answer(db: Database, client, qv: QueryVectors, params: SearchParams, whitening_future=None,
           k: int | None = None, reranked: dict | None = None) -> Ranking:
    """Filter, re-rank the top N and apply QE; ``k`` rows are returned (default top N).

    ``reranked`` reuses the re-ranking of an earlier call with the same filter (e.g. with and without
    QE); the returned ranking keeps its own in ``.reranked``."""
    kind = "rmac" if params.filter == "rmac" else "macw"
    qf = qv.rmac if params.filter == "rmac" else qv.macw
    timings = {}
    t = time.perf_counter()
    scores, rows = db.filter(kind, qf, max(k or 0, params.top_n), params.nprobe, params.k_factor)
    valid = rows[0] >= 0
    scores, rows = scores[0][valid], rows[0][valid]
    timings["filter_s"] = time.perf_counter() - t
    initial = {int(g): i for i, g in enumerate(rows)}
    ranking = Ranking(rows=rows, scores=scores, initial_rank=initial, timings=timings)
    if not params.rerank or params.top_n == 0:
        return _cut(ranking, k or params.top_n)
    n = min(params.top_n, len(rows))
    top = rows[:n]
    t = time.perf_counter()
    got = reranked if reranked is not None else rerank(db, client, qv, top, params, whitening_future)
    timings["rerank_s"] = time.perf_counter() - t
    top_scores = np.array([got[int(g)][0] for g in top], np.float32)
    order = np.argsort(-top_scores, kind="stable")
    if params.qe:
        t = time.perf_counter()
        vectors = np.stack([got[int(g)][2] for g in top]).astype(np.float32)
        q0 = qv.rmac if params.filter == "rmac" else qv.macw
        top_scores = rescore(query_expansion(q0, vectors, order, k=params.qe), vectors)
        order = np.argsort(-top_scores, kind="stable")
        timings["qe_s"] = time.perf_counter() - t
    ranking.rows = np.concatenate([top[order], rows[n:]])
    ranking.scores = np.concatenate([top_scores[order], scores[n:]])
    ranking.boxes = {int(g): got[int(g)][1] for g in top}
    ranking.reranked = got
    return _cut(ranking, k or params.top_n)


def _cut(r: Ranking, k: int) -> Ranking:
    r.rows, r.scores = r.rows[:k], r.scores[:k]
    return r


def to_json(db: Database, qv: QueryVectors, ranking: Ranking, query_path: str, limit: int) -> dict:
    hits = []
    for rank, (g, s) in enumerate(zip(ranking.rows[:limit].tolist(), ranking.scores[:limit].tolist())):
        store, r = db.locate(g)
        hits.append({"rank": rank, "initial_rank": ranking.initial_rank.get(g), "id": store.ids[r],
                     "path": store.paths[r], "store": str(store.path), "score": round(float(s), 6),
                     "box": [round(v, 1) for v in ranking.boxes[g]] if g in ranking.boxes else None,
                     "image_hw": [int(v) for v in store.arrays["image_hw"][r]]})
    return {"query": {"image": query_path, "bbox": list(qv.bbox), "image_hw": list(qv.image_hw)},
            "timings": {k: round(v, 4) for k, v in ranking.timings.items()}, "hits": hits}


def search(store_paths: list[str], client, query_path: str, bbox=None, params: SearchParams = SearchParams(),
           choice: ModelChoice | None = None, k: int | None = None) -> dict:
    """The whole search for one query image; returns the JSON-able result."""
    db = Database([Store(p) for p in store_paths]).scatter_filtering(client)
    cfg = db.stores[0].config
    if cfg.weights == "random":
        raise StoreError(f"{db.stores[0].path} holds random-weight features (benchmarks only)")
    choice = choice or ModelChoice(cfg.backbone)
    if choice.backbone != cfg.backbone:
        raise StoreError(f"{db.stores[0].path} was built with {cfg.backbone}, not {choice.backbone}")
    if params.rerank:
        warm_workers(client)  # the kernels load while the query is extracted
    t = time.perf_counter()
    maps, image_hw, bbox = client.submit(query_maps, query_path, bbox, choice, cfg.max_size, all_cores=True,
                                         pure=False).result()
    qv = query_vectors(maps, db.whitenings, params.L, image_hw, bbox)
    if params.rerank:
        qv, = describe_at_scales(client, [qv], [query_path], choice, cfg.max_size, params.query_scales,
                                 db.whitenings, params.L)
    extract_s = time.perf_counter() - t
    ranking = answer(db, client, qv, params, k=k)
    ranking.timings = {"extract_s": extract_s, **ranking.timings}
    return to_json(db, qv, ranking, query_path, k or params.top_n)


def _json_out(text: str) -> str:
    return text if text == "-" else writable_file(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="an indexed store")
    parser.add_argument("query", nargs="?", help="the query image (or --queries FILE)")
    parser.add_argument("--queries", metavar="FILE", type=existing_file,
                        help="many queries in one job: lines `IMAGE [X1 Y1 X2 Y2]` (relative paths from the "
                             "file's folder); answers go to --json OUT as JSON Lines, one per query")
    parser.add_argument("--bbox", type=finite_float, nargs=4, metavar=("X1", "Y1", "X2", "Y2"),
                        help="the object's box in the query image, in pixels (default: whole image)")
    parser.add_argument("--distractors", action="append", default=[], help="more indexed stores to search")
    parser.add_argument("--top-n", type=positive_int, default=1000, help="images re-ranked (default %(default)s)")
    parser.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--qe", type=nonnegative_int, default=5, help="query expansion with the top QE (0: off)")
    parser.add_argument("--filter", choices=("rmac", "mac"), default="rmac")
    add_filter_arguments(parser)
    add_query_scales_argument(parser)
    parser.add_argument("--show", type=positive_int, default=20,
                        help="hits printed / drawn / written per query (default %(default)s)")
    parser.add_argument("--json", nargs="?", const="-", metavar="OUT", type=_json_out,
                        help="JSON instead of a table, to stdout or OUT (with --queries: JSON Lines)")
    parser.add_argument("--png", type=writable_file, help="draw the query and top hits with their boxes into this PNG")
    parser.add_argument("--html", type=writable_file, help="write a self-contained HTML page of the hits")


QUERY_SCALES_HELP = (
    "multi-scale localisation (an extension of the paper): also describe the query photo resized by "
    "each of these factors (comma-separated, in [0.1, 2], e.g. 1,0.71,0.5), run AML with each scale's "
    "MAC on every short-listed image and keep the window that scores best against the scale-1 query "
    "(which still filters and scores). Costs one query extraction per scale and re-ranking time x the "
    "number of scales; the stored maps are unchanged. Default 1: the paper's single scale. Measured on "
    "self-paste views (docs/benchmarks.md, issue 8): IoU 0.38 -> 0.43, rmac+aml mAP 75.8 -> 80.8")


def add_filter_arguments(parser: argparse.ArgumentParser) -> None:
    """The approximate filtering indexes' per-query settings (`rmac index --ivf / --pq`)."""
    from rmac.workflows.args import float_range, positive_int

    parser.add_argument("--nprobe", type=positive_int,
                        help="IVF lists probed per shard (indexes built with --ivf, or --index-type pq --nlist)")
    parser.add_argument("--k-factor", type=float_range(1, 1000), metavar="F",
                        help="indexes built with --pq: the fast-scan stage keeps F x top-n candidates, re-scored "
                             "with the 8-bit vectors (default: the one stored in the index, 4; 2 in indexes built before 2026-12)")


def add_query_scales_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--query-scales", type=query_scales, default=(1.0,), metavar="S1,S2,...",
                        help=QUERY_SCALES_HELP)


def main(args: argparse.Namespace, client) -> int:
    params = SearchParams(top_n=args.top_n, rerank=args.rerank, qe=args.qe if args.rerank else 0,
                          filter=args.filter, nprobe=args.nprobe, k_factor=args.k_factor,
                          query_scales=args.query_scales)
    if args.queries or args.query is None:
        return _main_batch(args, client, params)
    result = search([args.store, *args.distractors], client, args.query, args.bbox, params,
                    k=max(args.show, 1))
    if args.json and args.json != "-":
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    elif args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"query {printable(args.query)} box {result['query']['bbox']}; timings {result['timings']}")
        print(f"{'rank':>4} {'was':>4} {'score':>8}  {'box (x1 y1 x2 y2)':<26} id")
        for h in result["hits"][:args.show]:
            box = " ".join(f"{v:.0f}" for v in h["box"]) if h["box"] else "-"
            print(f"{h['rank']:>4} {h['initial_rank']:>4} {h['score']:8.4f}  {box:<26} {printable(h['id'])}")
    _pictures(result, args)
    return 0


def _main_batch(args: argparse.Namespace, client, params: SearchParams) -> int:
    from rmac.workflows.queries import search_many

    if args.queries is None or args.query is not None:
        raise QueryError("give either one QUERY image or --queries FILE")
    if args.bbox or args.png or args.html:
        raise QueryError("--queries takes the boxes from its lines and writes JSON Lines only "
                         "(no --bbox, --png, --html)")
    if not args.json:
        raise QueryError("--queries needs --json OUT (JSON Lines, one per query; `-` for stdout)")
    search_many([args.store, *args.distractors], client, args.queries, args.json, params, k=max(args.show, 1))
    return 0


def _pictures(result: dict, args) -> None:
    if not (args.png or args.html):
        return
    from rmac.workflows.report import draw_hits_png, write_html_report

    q = {"name": Path(args.query).stem, **result["query"]}
    hits = [{**h, "positive": None} for h in result["hits"][:args.show]]
    if args.png:
        draw_hits_png(q, hits, args.png)
        print(f"wrote {args.png}", file=sys.stderr)
    if args.html:
        write_html_report(args.html, f"rmac search: {q['name']}", {}, [{**q, "hits": hits}])
        print(f"wrote {args.html}", file=sys.stderr)
