"""`rmac bench aml | extract | search`: speed goals measured side by side in one run, printed as ratios.

Benchmarks are not timed tests: each prints what it measured on this machine, and docs/benchmarks.md
records the figures with the command and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from rmac.data import LANDMARKS_DEV


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


# -- extract -------------------------------------------------------------------------------------
def plain_loop(items: list[tuple[str, str]], backbone: str, max_size: int, random_weights: bool) -> float:
    """Seconds for a plain single-process torch loop: load, forward, MAC (torch's own threading)."""
    from rmac.ops.backbones import activations
    from rmac.ops.pooling import mac
    from rmac.storage.images import BadImage, load_image
    from rmac.storage.weights import load_backbone

    model, spec = load_backbone(backbone, random_weights=random_weights)
    activations(model, spec, load_image(items[0][1]), max_size=max_size)  # warm-up, like the workers'
    t = time.perf_counter()
    for _, path in items:
        try:
            mac(activations(model, spec, load_image(path), max_size=max_size))
        except BadImage:
            pass
    return time.perf_counter() - t


def bench_extract(n_images: int = 96, backbone: str = "efficientnet-lite0", max_size: int = 1024,
                  workers: int | None = None, random_weights: bool = False) -> dict:
    """Images/s of the Dask extraction (store writes included) against a plain torch loop."""
    from rmac.storage.images import list_images
    from rmac.workflows.cluster import get_client
    from rmac.workflows.extract import ModelChoice, extract, worker_model

    items = list_images(str(LANDMARKS_DEV / "jpg"))[:n_images]
    plain_s = plain_loop(items, backbone, max_size, random_weights)
    tmp = Path(tempfile.mkdtemp(prefix="rmac-bench-"))
    try:
        choice = ModelChoice(backbone, random_weights=random_weights)
        with get_client(n_workers=workers, quiet=True) as client:
            client.run(worker_model, choice)  # model load is start-up, not throughput: as in the loop
            t = time.perf_counter()
            summary = extract(items, str(tmp / "store"), client, choice, max_size, progress=False)
            dask_s = time.perf_counter() - t
            n_workers = len(client.scheduler_info()["workers"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = len(items)
    return {"machine": machine(), "backbone": backbone, "max_size": max_size, "images": n,
            "workers": n_workers, "plain_images_per_s": round(n / plain_s, 2),
            "dask_images_per_s": round(n / dask_s, 2), "ratio_dask_over_plain": round(plain_s / dask_s, 3),
            "map_bytes_per_image": summary["map_bytes_per_image"]}


# -- search --------------------------------------------------------------------------------------
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)
    from rmac.workflows import bench_aml, bench_quality

    bench_aml.add_arguments(sub.add_parser("aml", help="AML vs exhaustive (Table 1), integral "
                                                       "approximation (Fig. 3), re-ranking speed"))
    bench_quality.add_arguments(sub.add_parser("quantisation", help="re-ranking mAP with float vs quantised "
                                                                    "maps, and bytes per image"))
    p = sub.add_parser("extract", help="Dask extraction vs a plain torch loop")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--max-size", type=int, default=1024)
    p.add_argument("--workers", type=int)
    p.add_argument("--random-weights", action="store_true")
    p = sub.add_parser("search", help="filter / re-rank / QE times, 1 vs 2 workers")
    p.add_argument("--top-n", type=int, default=1000)
    p.add_argument("--queries", type=int, default=5)
    for name in ("extract", "search"):
        sub.choices[name].add_argument("--json", dest="json_out", help="also write the figures to this JSON file")


def main(args: argparse.Namespace) -> int:
    if args.bench in ("aml", "quantisation"):
        from rmac.workflows import bench_aml, bench_quality

        return (bench_aml if args.bench == "aml" else bench_quality).main(args)
    if args.bench == "extract":
        res = bench_extract(args.images, args.backbone, args.max_size, args.workers, args.random_weights)
    else:
        res = bench_search(args.top_n, args.queries)
    print(json.dumps(res, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1))
    return 0
