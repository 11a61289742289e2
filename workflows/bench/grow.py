"""`rmac bench grow`: what indexing the images a store grew by costs, against a full index.

A store of the embedded photos is extracted without the last ``--new`` fraction and indexed; it then
grows by that fraction and `rmac index` runs incrementally (whitening kept, vectors and FAISS shards of
the new partitions only); finally a full re-index (``--refit``) of the grown store is timed in the same
run. The goal: the incremental index costs about the fraction added, not a full index.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from rmac.data import LANDMARKS_DEV
from rmac.workflows.bench.machine import machine


def bench_grow(n_images: int = 0, new: float = 0.1, max_size: int = 512, partition_size: int = 4,
               shard_rows: int = 16, workers: int | None = None) -> dict:
    from rmac.storage.images import list_images
    from rmac.storage.store import Store
    from rmac.workflows.cluster import get_client
    from rmac.workflows.extract import ModelChoice, extract
    from rmac.workflows.index import build_index

    items = list_images(str(LANDMARKS_DEV / "jpg"))
    items = items[:n_images] if n_images else items
    n_old = len(items) - max(1, round(new * len(items)))
    tmp = Path(tempfile.mkdtemp(prefix="rmac-bench-grow-"))
    store_path = tmp / "store"
    out: dict = {"machine": machine(), "images": len(items), "added": len(items) - n_old,
                 "max_size": max_size, "partition_size": partition_size}
    try:
        with get_client(n_workers=workers, quiet=True) as client:
            extract(items[:n_old], str(store_path), client, ModelChoice(), max_size, partition_size,
                    progress=False)
            build_index(Store(store_path), client, shard_rows=shard_rows, progress=False)
            extract(items, str(store_path), client, ModelChoice(), max_size, partition_size, progress=False)
            runs = {}
            for name, refit in (("incremental", False), ("full", True)):
                t = time.perf_counter()
                info = build_index(Store(store_path), client, shard_rows=shard_rows, progress=False, refit=refit)
                runs[name] = {"seconds": round(time.perf_counter() - t, 3), "timings": info["timings"],
                              "partitions_indexed": info["partitions_indexed"],
                              "shards_built": info["shards_built"]}
            out["workers"] = len(client.scheduler_info()["workers"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out.update(runs)
    out["fraction_added"] = round(out["added"] / len(items), 3)
    out["ratio_incremental_over_full"] = round(runs["incremental"]["seconds"] / runs["full"]["seconds"], 3)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=0, help="photos of the embedded set used (default: all)")
    p.add_argument("--new", type=float, default=0.1, help="fraction added by the growth (default 0.1)")
    p.add_argument("--max-size", type=int, default=512)
    p.add_argument("--partition-size", type=int, default=4)
    p.add_argument("--shard-rows", type=int, default=16)
    p.add_argument("--workers", type=int)


def run(args: argparse.Namespace) -> dict:
    return bench_grow(args.images, args.new, args.max_size, args.partition_size, args.shard_rows, args.workers)
