"""`rmac bench search`: filter / re-rank / QE times of a replicated real store, 1 vs 2 workers."""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from rmac.data import LANDMARKS_DEV
from rmac.workflows.bench.machine import machine
from rmac.workflows.args import positive_int


def replicate_store(src, dst: Path, reps: int):
    """A store holding ``reps`` copies of every row of ``src`` (real maps; no re-extraction)."""
    from rmac.storage.store import Store

    ids = [f"{k}/{i}" for k in range(reps) for i in src.ids]
    out = Store.create(dst, ids, src.paths * reps, src.config)
    g, n = src.arrays, src.n_images
    arrays = {k: g[k][:] for k in ("mac", "maps", "scale", "map_hw", "image_hw")}  # small: read once
    for p in range(out.n_partitions):
        sel = np.asarray([r % n for r in out.partition_rows(p)])
        recs = [{"id": out.ids[r], "path": out.paths[r], "status": "done", "reason": None}
                for r in out.partition_rows(p)]
        out.write_partition(p, recs, *(arrays[k][sel] for k in ("mac", "maps", "scale", "map_hw", "image_hw")))
    return out


def bench_search(top_n: int = 1000, n_queries: int = 5) -> dict:
    """Per-query filter, re-rank (top N) and QE times on a real indexed store, and re-ranking's
    speed-up from 1 to 2 workers. The database is the embedded photos (extracted once into a temp
    store) with their rows replicated to ``top_n`` so that N images are really re-ranked."""
    from rmac.storage.datasets import load_dataset
    from rmac.storage.store import Store
    from rmac.workflows.cluster import get_client
    from rmac.workflows.extract import ModelChoice, extract
    from rmac.workflows.index import build_index
    from rmac.workflows.search import Database, SearchParams, answer, query_maps, query_vectors

    ds = load_dataset(str(LANDMARKS_DEV))
    tmp = Path(tempfile.mkdtemp(prefix="rmac-bench-"))
    out = {"machine": machine(), "top_n": top_n, "queries": n_queries}
    try:
        per_workers = {}
        for n_workers in (1, 2):
            with get_client(n_workers=n_workers, quiet=True) as client:
                if n_workers == 1:
                    extract([(i, str(ds.image_paths[i])) for i in ds.images], str(tmp / "one"), client,
                            progress=False)
                    reps = max(1, -(-top_n // len(ds.images)))
                    store = replicate_store(Store(tmp / "one"), tmp / "store", reps)
                    build_index(store, client, progress=False)
                    db = Database([Store(tmp / "store")])
                    out["db_images"] = db.n_images
                    qvs = []
                    for q in ds.queries[:n_queries]:
                        maps, hw, bbox = client.submit(query_maps, str(ds.image_paths[q.image]), q.bbox,
                                                       ModelChoice(), 1024, pure=False).result()
                        qvs.append(query_vectors(maps, db.whitening, 3, hw, bbox))
                params = SearchParams(top_n=top_n, rerank=True, qe=5)
                w = client.scatter(db.whitening, broadcast=True)
                answer(db, client, qvs[0], params, w)  # warm-up: numba cache load, file cache
                times = {"filter_s": [], "rerank_s": [], "qe_s": []}
                for qv in qvs:
                    r = answer(db, client, qv, params, w)
                    for k in times:
                        times[k].append(r.timings[k])
                per_workers[n_workers] = {k: float(np.median(v)) for k, v in times.items()}
        out.update({f"{k}_median": round(per_workers[2][k], 4) for k in ("filter_s", "rerank_s", "qe_s")})
        out["rerank_1_worker_s"] = round(per_workers[1]["rerank_s"], 4)
        out["rerank_speedup_1_to_2_workers"] = round(per_workers[1]["rerank_s"] / per_workers[2]["rerank_s"], 3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-n", type=positive_int, default=1000)
    p.add_argument("--queries", type=positive_int, default=5)


def run(args: argparse.Namespace) -> dict:
    return bench_search(args.top_n, args.queries)
