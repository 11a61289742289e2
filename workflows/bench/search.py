"""`rmac bench search`: AML re-ranking of the top N, end to end (reads included), with the sparse map
format (store format 2) side by side with the dense padded format it replaced (`dense_baseline`), on 1
and 2 workers, in one run; plus filter and QE times, decode time per map, bytes per image, the first
query on fresh workers with and without the kernel warm-up, and a check that both paths give the same
scores and boxes. The last line printed is a one-line JSON summary (`"rerank_2_workers_s"`, ...).

The database is the embedded photos (extracted once into a temporary store) with their rows replicated
to at least N, so that N images are really re-ranked.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from rmac.data import LANDMARKS_DEV
from rmac.workflows.args import positive_int
from rmac.workflows.bench.machine import machine
from rmac.workflows.args import positive_int


def replicate_store(src, dst: Path, reps: int):
    """A store holding ``reps`` copies of every row of ``src`` (real maps; no re-extraction)."""
    from rmac.storage.store import Store

    ids = [f"{k}/{i}" for k in range(reps) for i in src.ids]
    out = Store.create(dst, ids, src.paths * reps, src.config)
    g, n = src.arrays, src.n_images
    arrays = {k: g[k][:] for k in ("mac", "scale", "map_hw", "image_hw")}  # small: read once
    P = src.config.partition_size
    parts = [src.read_sparse(p).maps for p in range(src.n_partitions)]
    maps = [parts[r // P].dense(r % P) for r in range(n)]
    for p in range(out.n_partitions):
        sel = np.asarray([r % n for r in out.partition_rows(p)])
        recs = [{"id": out.ids[r], "path": out.paths[r], "status": "done", "reason": None}
                for r in out.partition_rows(p)]
        out.write_partition(p, recs, arrays["mac"][sel], [maps[i] for i in sel], arrays["scale"][sel],
                            arrays["map_hw"][sel], arrays["image_hw"][sel])
    return out


def _clear_cache() -> int:
    from rmac.workflows.search import worker_map_cache

    worker_map_cache().clear()
    return 0


def _decode_times(store, dense_path: Path, repeat: int = 3) -> dict:
    """Per map, in this process (one thread): read + decode of the sparse codes (whole partitions),
    decode alone (codes already in memory), and format 1's padded read (a partition's slice)."""
    from rmac.storage import maps as M
    from rmac.workflows.bench import dense_baseline

    arrays = store.path / "arrays"
    parts = range(store.n_partitions)
    n = store.n_images
    M.read_partition(arrays, 0)  # numba cache load outside the timings
    best = {"read_decode_ms": np.inf, "decode_ms": np.inf, "dense_read_ms": np.inf}
    import zarr

    raw = []
    for p in parts:
        arr = zarr.open_array(M.partition_path(arrays, p), mode="r")
        raw.append((arr[:], arr.attrs.asdict()))
    for _ in range(repeat):
        t = time.perf_counter()
        for p in parts:
            M.read_partition(arrays, p)
        best["read_decode_ms"] = min(best["read_decode_ms"], (time.perf_counter() - t) / n * 1e3)
        t = time.perf_counter()
        for codes, attrs in raw:
            M.decode_partition(codes, attrs)
        best["decode_ms"] = min(best["decode_ms"], (time.perf_counter() - t) / n * 1e3)
        t = time.perf_counter()
        for p in parts:
            dense_baseline.read_padded(store, dense_path, list(store.partition_rows(p)))
        best["dense_read_ms"] = min(best["dense_read_ms"], (time.perf_counter() - t) / n * 1e3)
    return {k: round(v, 4) for k, v in best.items()}


def _compare(a: dict, b: dict) -> dict:
    """Largest differences between two re-rankings {row: (score, box, vector)} of the same rows."""
    assert sorted(a) == sorted(b)
    return {"max_score_diff": max(abs(a[g][0] - b[g][0]) for g in a),
            "boxes_equal": all(np.allclose(a[g][1], b[g][1], rtol=0, atol=1e-9) for g in a),
            "max_vector_diff": float(max(np.abs(np.asarray(a[g][2]) - np.asarray(b[g][2])).max() for g in a))}


def _first_query(db, ds, q, params, warm: bool) -> dict:
    """`rmac search`'s steps on a fresh 2-worker cluster: optional warm-up, query extraction, filter +
    re-ranking; the seconds of each."""
    from rmac.workflows.cluster import get_client
    from rmac.workflows.extract import ModelChoice
    from rmac.workflows.search import answer, query_maps, query_vectors, warm_workers

    with get_client(n_workers=2, quiet=True, dashboard=False) as client:
        client.wait_for_workers(2)
        t = time.perf_counter()
        if warm:
            warm_workers(client)
        maps, hw, bbox = client.submit(query_maps, str(ds.image_paths[q.image]), q.bbox, ModelChoice(),
                                       db.stores[0].config.max_size, pure=False).result()
        qv = query_vectors(maps, db.whitenings, params.L, hw, bbox)
        extract_s = time.perf_counter() - t
        r = answer(db, client, qv, params)
        return {"extract_s": round(extract_s, 3), "rerank_s": round(r.timings["rerank_s"], 3)}


def bench_search(top_n: int = 1000, n_queries: int = 5, workers=(1, 2), cold: bool = True) -> dict:
    """See the module docstring. Medians over ``n_queries`` queries."""
    from rmac.storage.datasets import load_dataset
    from rmac.storage.store import Store
    from rmac.workflows.bench import dense_baseline
    from rmac.workflows.cluster import get_client
    from rmac.workflows.extract import ModelChoice, extract
    from rmac.workflows.index import build_index
    from rmac.workflows.search import (Database, SearchParams, answer, query_maps, query_vectors, rerank,
                                       warm_workers)

    ds = load_dataset(str(LANDMARKS_DEV))
    tmp = Path(tempfile.mkdtemp(prefix="rmac-bench-"))
    out: dict = {"machine": machine(), "top_n": top_n, "queries": n_queries}
    params = SearchParams(top_n=top_n, rerank=True, qe=5)
    try:
        db = qvs = None
        per: dict[int, dict] = {}
        for n_workers in sorted(workers, reverse=True):  # extract once, on the most workers
            with get_client(n_workers=n_workers, quiet=True, dashboard=False) as client:
                client.wait_for_workers(n_workers)
                if db is None:
                    extract([(i, str(ds.image_paths[i])) for i in ds.images], str(tmp / "one"), client,
                            progress=False)
                    reps = max(1, -(-top_n // len(ds.images)))
                    store = replicate_store(Store(tmp / "one"), tmp / "store", reps)
                    build_index(store, client, progress=False)
                    db = Database([Store(tmp / "store")])
                    dense = [dense_baseline.write_dense(db.stores[0], tmp / "dense.zarr")]
                    n_ok = int(db.stores[0].valid_rows().sum())
                    out["db_images"] = db.n_images
                    out["bytes_per_image"] = {"sparse": round(db.stores[0].map_bytes() / n_ok),
                                              "dense_padded": round(dense_baseline.dense_bytes(dense[0]) / n_ok)}
                    out["per_map_ms"] = _decode_times(db.stores[0], dense[0])
                    qvs = []
                    for q in ds.queries[:n_queries]:
                        maps, hw, bbox = client.submit(query_maps, str(ds.image_paths[q.image]), q.bbox,
                                                       ModelChoice(), db.stores[0].config.max_size,
                                                       pure=False).result()
                        qvs.append(query_vectors(maps, db.whitenings, params.L, hw, bbox))
                w = client.scatter(db.whitenings, broadcast=True, hash=False)
                warm_workers(client)
                tops = [db.filter("rmac", qv.rmac, top_n)[1][0] for qv in qvs]
                tops = [t[t >= 0] for t in tops]
                rerank(db, client, qvs[0], tops[0], params, w)  # warm-up: kernels, file cache
                dense_baseline.rerank(db, client, qvs[0], tops[0], params, w, dense)
                times: dict[str, list] = {"dense_s": [], "sparse_s": [], "sparse_cached_s": [], "filter_s": [],
                                          "qe_s": []}
                checks = []
                for qv, top in zip(qvs, tops):
                    t = time.perf_counter()
                    old = dense_baseline.rerank(db, client, qv, top, params, w, dense)
                    times["dense_s"].append(time.perf_counter() - t)
                    client.run(_clear_cache)
                    t = time.perf_counter()
                    new = rerank(db, client, qv, top, params, w)
                    times["sparse_s"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    rerank(db, client, qv, top, params, w)
                    times["sparse_cached_s"].append(time.perf_counter() - t)
                    checks.append(_compare(old, new))
                    r = answer(db, client, qv, params, w, reranked=new)
                    times["filter_s"].append(r.timings["filter_s"])
                    times["qe_s"].append(r.timings["qe_s"])
                per[n_workers] = {k: round(float(np.median(v)), 4) for k, v in times.items()}
                per[n_workers]["max_score_diff"] = max(c["max_score_diff"] for c in checks)
                per[n_workers]["boxes_equal"] = all(c["boxes_equal"] for c in checks)
                per[n_workers]["max_vector_diff"] = max(c["max_vector_diff"] for c in checks)
        out["workers"] = {str(k): v for k, v in per.items()}
        if cold:
            q = ds.queries[0]
            out["first_query_fresh_workers"] = {
                "no_warmup": _first_query(db, ds, q, params, warm=False),
                "warmup_plugin": _first_query(db, ds, q, params, warm=True)}
        two, one = per.get(2), per.get(1)
        out["summary"] = {
            "bench": "search", "top_n": top_n,
            "rerank_2_workers_s": two["sparse_s"] if two else None,
            "rerank_1_worker_s": one["sparse_s"] if one else None,
            "rerank_cached_2_workers_s": two["sparse_cached_s"] if two else None,
            "dense_2_workers_s": two["dense_s"] if two else None,
            "dense_1_worker_s": one["dense_s"] if one else None,
            "speedup_2_workers": round(two["dense_s"] / two["sparse_s"], 2) if two else None,
            "decode_ms_per_map": out["per_map_ms"]["read_decode_ms"],
            "bytes_per_image": out["bytes_per_image"]["sparse"],
            "same_results": all(v["boxes_equal"] and v["max_score_diff"] < 1e-6 for v in per.values()),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-n", type=positive_int, default=1000)
    p.add_argument("--queries", type=positive_int, default=5)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default %(default)s)")
    p.add_argument("--no-cold", action="store_true", help="skip the first query on fresh workers")
    p.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")


def _print(r: dict) -> None:
    print(f"machine: {r['machine']}")
    print(f"database: {r['db_images']} images (dev photos replicated), top {r['top_n']} re-ranked, "
          f"{r['queries']} queries, medians per query")
    b = r["bytes_per_image"]
    print(f"stored maps per image: sparse {b['sparse']} B, dense padded (format 1) {b['dense_padded']} B")
    m = r["per_map_ms"]
    print(f"per map, one thread: sparse read+decode {m['read_decode_ms']:.3f} ms (decode alone "
          f"{m['decode_ms']:.3f} ms); dense padded read {m['dense_read_ms']:.3f} ms")
    print(f"{'workers':>7} {'dense (old)':>12} {'sparse':>9} {'sparse cached':>14} {'ratio':>6} "
          f"{'filter':>8} {'QE':>8}  same results (max score diff, boxes)")
    for k, v in r["workers"].items():
        print(f"{k:>7} {v['dense_s']:>11.3f}s {v['sparse_s']:>8.3f}s {v['sparse_cached_s']:>13.3f}s "
              f"{v['dense_s'] / v['sparse_s']:>6.2f} {v['filter_s'] * 1e3:>6.1f}ms {v['qe_s'] * 1e3:>6.1f}ms  "
              f"{v['max_score_diff']:.1e}, {'equal' if v['boxes_equal'] else 'DIFFERENT'}")
    if "first_query_fresh_workers" in r:
        f = r["first_query_fresh_workers"]
        print("first query on fresh workers (2): query extraction / re-ranking: "
              f"no warm-up {f['no_warmup']['extract_s']:.2f} / {f['no_warmup']['rerank_s']:.2f} s, "
              f"warm-up plugin {f['warmup_plugin']['extract_s']:.2f} / {f['warmup_plugin']['rerank_s']:.2f} s")


def main(args: argparse.Namespace) -> int:
    workers = tuple(int(v) for v in str(args.workers).split(",") if v.strip())
    r = bench_search(args.top_n, args.queries, workers, cold=not args.no_cold)
    _print(r)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(r, indent=1))
    print(json.dumps(r["summary"]))
    return 0
