"""`rmac bench frames`: the maps arrays with one zstd frame per image (`FRAMES_ENCODING`) against the
layout before (`JOINT_ENCODING`: one zstd stream per partition), side by side in one run, on one
thread: reading the maps of N random rows the way re-ranking reads them (`read_partition(select=)`:
a short-list spread over a large store needs about one map per partition), reading their partitions
whole, the bytes per image, and the read of k maps of a partition against the whole partition for a
few k (what the quarter rule of `rmac.workflows.search.rerank_rows` trades); and the frames reads again
with each partition's metadata held (`rmac.storage.maps.partition_meta`, as on a worker that has served
queries) against parsed at every read (all the other timings).

The store given is only read: the partitions the rows fall in are decoded and written again, in both
encodings, to a temporary folder (so any format-2 store serves, whichever encoding it holds), and
both copies are checked to decode to the same maps before anything is timed. Reads are from the page
cache (the copies were just written): they time the decompression and decoding, not the disk.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from rmac.workflows.args import existing_dir, positive_int
from rmac.workflows.bench.machine import machine

ENCODINGS = ("joint", "frames")


def _copy_partitions(store, parts: list[int], root: Path) -> dict[str, Path]:
    """Partitions ``parts`` of ``store`` written again in each encoding under ``root/<encoding>``."""
    from rmac.storage import maps as M

    writers = {"joint": M.write_partition_maps_joint, "frames": M.write_partition_maps}
    out = {e: root / e for e in ENCODINGS}
    K = store.config.channels
    for p in parts:
        part = store.read_sparse(p)
        maps = [part.maps.dense(i) for i in range(part.maps.n_maps)]
        for e in ENCODINGS:
            writers[e](out[e], p, maps, part.image_hw, K)
    return out


def _same(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in a._fields[1:])


def _best(fn, repeat: int) -> float:
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_frames(store_path: Path, n_rows: int = 1000, seed: int = 0, repeat: int = 3, sweep_parts: int = 100,
                 tmp: Path | None = None, keep: bool = False) -> dict:
    """See the module docstring."""
    from rmac.storage import maps as M
    from rmac.storage.store import Store

    store = Store(store_path)
    valid = np.flatnonzero(store.valid_rows())
    if not len(valid):
        raise ValueError(f"{store_path}: no extracted image to read")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(valid, min(n_rows, len(valid)), replace=False))
    plan: dict[int, list[int]] = {}
    for r in rows:
        p = store.partition_of(int(r))
        plan.setdefault(p, []).append(int(r) - store.partition_rows(p).start)
    plan_sel = {p: np.asarray(v, np.int64) for p, v in plan.items()}
    P = store.config.partition_size
    root = Path(tempfile.mkdtemp(prefix="rmac-bench-frames-", dir=tmp))
    try:
        t = time.perf_counter()
        arrays = _copy_partitions(store, sorted(plan), root)
        copy_s = time.perf_counter() - t
        n_images = sum(len(store.partition_rows(p)) for p in plan)
        res: dict = {"machine": machine(), "store": str(store_path), "rows": len(rows), "partitions": len(plan),
                     "partition_size": P, "images_in_partitions": n_images, "copy_s": round(copy_s, 1)}
        for p, sel in plan_sel.items():  # both copies decode alike (and numba's cache is loaded)
            if not _same(M.read_partition(arrays["joint"], p, sel).maps, M.read_partition(arrays["frames"], p, sel).maps):
                raise AssertionError(f"partition {p}: the two encodings decode differently")
        for e in ENCODINGS:
            files = [M.chunk_file(arrays[e], p) for p in plan]
            res[f"{e}_bytes_per_image"] = round(sum(f.stat().st_size for f in files if f.exists()) / n_images, 1)
            res[f"{e}_metadata_bytes_per_image"] = round(
                sum((M.partition_path(arrays[e], p) / "zarr.json").stat().st_size for p in plan) / n_images, 1)
        for e in ENCODINGS:  # each pass parses every partition's metadata, as a first read does
            a = arrays[e]
            res[f"{e}_select_s"] = round(_best(lambda: [M.clear_meta_cache()] + [
                M.read_partition(a, p, s) for p, s in plan_sel.items()], repeat), 4)
            res[f"{e}_whole_s"] = round(_best(lambda: [M.clear_meta_cache()] + [
                M.read_partition(a, p) for p in plan], repeat), 4)
        res["select_joint_over_frames"] = round(res["joint_select_s"] / res["frames_select_s"], 2)
        res["whole_joint_over_frames"] = round(res["joint_whole_s"] / res["frames_whole_s"], 2)
        # the same reads with the metadata held (`partition_meta`), as a worker that has served queries reads:
        # the copies are dated back past `RACY_NS` (else just-written files are never kept), one pass fills it
        old = time.time_ns() - 10 * M.RACY_NS
        for p in plan:
            os.utime(M.partition_path(arrays["frames"], p) / "zarr.json", ns=(old, old))
        M.clear_meta_cache()
        [M.read_partition(arrays["frames"], p, s) for p, s in plan_sel.items()]
        res["frames_select_meta_held_s"] = round(_best(lambda: [M.read_partition(arrays["frames"], p, s)
                                                                for p, s in plan_sel.items()], repeat), 4)
        res["select_parsed_over_held"] = round(res["frames_select_s"] / res["frames_select_meta_held_s"], 2)
        M.clear_meta_cache()
        # k maps of a partition against the whole of it, per partition (ms): where reading whole stops costing more
        some = [p for p in sorted(plan) if len(store.partition_rows(p)) == P][:sweep_parts]
        sweep = []
        for k in sorted({1, 2, max(1, P // 8), max(1, P // 4), max(1, P // 2), P}):
            sels = {p: np.sort(rng.choice(P, k, replace=False)) for p in some}
            row = {"k": k}
            for e in ENCODINGS:
                a = arrays[e]
                row[f"{e}_ms"] = round(_best(lambda: [M.clear_meta_cache()] + [
                    M.read_partition(a, p, s) for p, s in sels.items()], repeat)
                                       / max(1, len(some)) * 1e3, 3)
            sweep.append(row)
        res["per_partition_select_k"] = sweep
        return res
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=existing_dir, required=True, help="a format-2 store (only read)")
    p.add_argument("--rows", type=positive_int, default=1000, help="random rows to read (default 1000: a short-list)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=positive_int, default=3, help="best of this many passes (default 3)")
    p.add_argument("--sweep-partitions", type=positive_int, default=100,
                   help="partitions timed per k in the k-of-P sweep (default 100)")
    p.add_argument("--tmp", type=existing_dir, help="folder for the two temporary copies (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the temporary copies")


def run(args: argparse.Namespace) -> dict:
    return bench_frames(args.store, args.rows, args.seed, args.repeat, args.sweep_partitions, args.tmp, args.keep)
