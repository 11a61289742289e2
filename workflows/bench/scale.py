"""`rmac bench scale --count N`: the cost curve of a database of N synthetic distractors + the dev set.

One run, side by side: build time per stage and the peak resident memory of every process (client,
scheduler, each worker: ``VmHWM`` from /proc, reset before each stage by ``/proc/self/clear_refs``);
bytes per image on disk; filtering per query (p50 / p95) exact on the workers that hold the shards,
exact in the client (the old path; skipped above 200k images, where it would load every shard into
one process), and the approximate indexes (pq per ``--pq-m``, ``--pq-dim`` and ``--pq-nlist`` at a few ``k_factor``
(and ``nprobe`` behind IVF lists), IVF at a few
``nprobe``; flat16 on request; one shard per worker unless ``--approx-shard-rows``) with their
recall@1000 against exact, each also timed inside the workers (FAISS alone, without Dask's round
trip); AML re-ranking of the top 1000 read from the store, QE and the end-to-end query time (query
extraction included), the queries filtered by the fastest approximate setting whose recall reaches
``RECALL_TARGET`` (exact when none does); the
similarity of the real queries to real distractor photos against synthetic distractors (quantiles of
MAC, R-MAC and the AML score); and a last line ``SCALE key=value ...`` for scripts.

Queries and the real database part are the embedded `landmarks-dev` (extracted once per run, or
reused from ``--workdir``, as are the distractors and their index when they are already there). Everything written goes under a temporary work folder removed at the end
unless ``--keep``; the run refuses to start when the disk cannot hold it (it says how much it needs).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rmac.data import LANDMARKS_DEV
from rmac.workflows.bench.machine import machine

CLIENT_SIDE_LIMIT = 200_000
NPROBES = (8, 32, 128)
K_FACTORS = (1, 2, 4)
DISTRACTOR_PARTITION = 128  # images per distractor partition: 8x fewer files and tasks than the dev set's 16;
# with per-image frames a re-ranking read of one map costs the same in any partition size
APPROXIMATE = ("pq", "ivf")  # `rmac index --index-type`s measured against exact (flat16 may be added)
QUANTILES = (0.5, 0.9, 0.99, 1.0)
RECALL_TARGET = 0.95  # recall@1000 of an approximate filtering against exact (the target)


# -- memory --------------------------------------------------------------------------------------
def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> int:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS; returns the pid."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not permitted: the peak then covers the process's life, an upper bound
    return os.getpid()


def peak_rss() -> tuple[int, int]:
    """(pid, peak resident bytes since the last `reset_peak`) of this process."""
    return os.getpid(), _vm("VmHWM")


class Peaks:
    """Peak RSS of the client, the scheduler and every worker, per stage."""

    def __init__(self, client):
        self.client = client
        self.stages: dict[str, dict[str, float]] = {}

    def reset(self) -> None:
        reset_peak()
        self.client.run(reset_peak)
        self.client.run_on_scheduler(reset_peak)

    def read(self, stage: str) -> dict[str, float]:
        me = peak_rss()
        sched = self.client.run_on_scheduler(peak_rss)
        workers = self.client.run(peak_rss)
        out = {}
        if sched[0] == me[0]:
            out["client+scheduler"] = max(me[1], sched[1])
        else:
            out["client"], out["scheduler"] = me[1], sched[1]
        for i, (_, (_, b)) in enumerate(sorted(workers.items())):
            out[f"worker{i}"] = b
        self.stages[stage] = {k: round(v / 2**20, 1) for k, v in out.items()}
        return self.stages[stage]


# -- disk ----------------------------------------------------------------------------------------
def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


APPROX_BYTES_PER_DIM = {"pq": 1.25, "ivf": 4.0, "flat16": 2.0}  # bytes per row and dimension (R-MAC only)


def image_bytes(map_bytes: float, channels: int, dim: int, approximate=APPROXIMATE) -> float:
    """Disk per distractor: its maps (as measured on the real store), MAC (K floats), R-MAC and whitened
    MAC (D floats each) and their exact shards, the approximate shards, and ~100 bytes of the rest."""
    return map_bytes + 4 * channels + 16 * dim + sum(APPROX_BYTES_PER_DIM[a] * dim for a in approximate) + 100


def bytes_needed(per_image: float, count: int) -> int:
    """Disk for ``count`` distractors of ``per_image`` bytes (`image_bytes`), and 25 % margin."""
    return int(1.25 * per_image * count)


def check_disk(root: Path, need: int, count: int) -> None:
    """Refuse (one line, SystemExit) when ``root``'s file system has less than ``need`` bytes free."""
    free = shutil.disk_usage(root).free
    if need > free:
        raise SystemExit(f"rmac bench scale: {count} distractors need about {need / 2**30:.1f} GiB under {root}, "
                         f"only {free / 2**30:.1f} GiB free: use --workdir elsewhere or a smaller --count")


# -- timing helpers ------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, np.float64), q)) if xs else float("nan")


def time_filter(db, kind: str, queries: np.ndarray, k: int, nprobe=None, repeat: int = 3, k_factor=None):
    """Per-query filtering times (s) and the last top-k rows of each query."""
    times, rows = [], []
    for qrow in queries:
        for _ in range(repeat):
            t = time.perf_counter()
            _, r = db.filter(kind, qrow[None], k, nprobe, k_factor)
            times.append(time.perf_counter() - t)
        rows.append(r[0])
    return times, np.stack(rows)


def time_way(db, way: str, queries: np.ndarray, k: int, nprobe=None, k_factor=None) -> list[float]:
    """`time_filter` of R-MAC the older ways, side by side with the direct lines (`filterline`):
    ``"actor"`` through the workers' actors on their event loops, ``"thread"`` in the actors' threads."""
    f = db.scattered
    before = f.direct, f.inline_rows
    f.direct, f.inline_rows = False, (f.inline_rows if way == "actor" else 0)
    try:
        return time_filter(db, "rmac", queries, k, nprobe, k_factor=k_factor)[0]
    finally:
        f.direct, f.inline_rows = before


def time_in_workers(filt, kind: str, queries: np.ndarray, k: int, nprobe=None, k_factor=None) -> list[float]:
    """Per-query FAISS time inside the workers, without Dask's round trip: each worker times its own
    shards' search of every query (in parallel); a query costs the slowest worker's time."""
    from distributed import wait

    from rmac.workflows.filtering import search_held

    def timed(refs, q):
        out = []
        for row in q:
            t = time.perf_counter()
            search_held(refs, row[None], k, nprobe, k_factor)
            out.append(time.perf_counter() - t)
        return out

    futures = [filt.client.submit(timed, refs, queries, workers=[w], pure=False) for w, refs in filt.plan(kind).items()]
    wait(futures)
    return np.max([f.result() for f in futures], axis=0).tolist()


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top k found in the approximate top k."""
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(e[e >= 0].tolist())) / max(1, (e >= 0).sum())
                          for f, e in zip(found, exact)]))


def quantile_row(x: np.ndarray) -> list[float]:
    return [round(float(np.quantile(x, q)), 4) for q in QUANTILES] if len(x) else [float("nan")] * len(QUANTILES)


# -- the run -------------------------------------------------------------------------------------
def bench_scale(count: int, workdir: str | None = None, keep: bool = False, n_workers: int | None = None,
                scheduler: str | None = None, max_size: int = 1024, shard_rows: int = 100_000,
                top_n: int = 1000, n_queries: int | None = None, nprobes=NPROBES, seed: int = 0,
                similarity_sample: int = 2000, progress: bool = False, approximate=APPROXIMATE,
                k_factors=K_FACTORS, partition_size: int = DISTRACTOR_PARTITION, pq_ms=(None,),
                approx_shard_rows: int | None = None, pq_nlists=(None,), pq_dims=(None,),
                dim: int | None = None) -> dict:
    from rmac.ops import whitening as wh  # noqa: F401  (workers unpickle whitening objects)
    from rmac.storage.datasets import load_dataset
    from rmac.storage.store import Store, StoreError
    from rmac.workflows.cluster import get_client
    from rmac.workflows.distractors import make_distractors
    from rmac.workflows.evaluate import whitening_subset
    from rmac.workflows.extract import ModelChoice, extract
    from rmac.workflows.index import build_index, load_whitenings, require_indexed, shard_ranges
    from rmac.workflows.ivf import TEMPLATE, build_ivf, train_pq_template, train_template
    from rmac.workflows.search import (Database, SearchParams, answer, query_maps, query_vectors,
                                       rerank_many)

    ds = load_dataset(str(LANDMARKS_DEV))
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="rmac-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    out: dict = {"machine": machine(), "count": count, "top_n": top_n, "workdir": str(root),
                 "partition_size": partition_size}
    if dim:
        out["dim_asked"] = dim
    stages: dict[str, float] = {}
    try:
        with get_client(scheduler, n_workers, quiet=True) as client:
            peaks = Peaks(client)
            out["workers"] = len(client.scheduler_info()["workers"])

            # 1. the real part: the embedded dev set, extracted and indexed as `rmac evaluate` does
            peaks.reset()
            t = time.perf_counter()
            extract([(i, str(ds.image_paths[i])) for i in ds.images], str(root / "dev"), client,
                    ModelChoice(), max_size, progress=progress)
            dev = Store(root / "dev")
            try:  # kept from an earlier run (--workdir): its whitening is the one the distractors were indexed with
                require_indexed(dev)
                indexed_at = dev.manifest["index"].get("dim")
            except StoreError:
                indexed_at = None
            if indexed_at != min(dim or dev.config.channels, dev.config.channels):  # none yet, or another --dim
                rows_of = {i: r for r, i in enumerate(dev.ids)}
                subset = whitening_subset(ds, rows_of, dev.n_images) & dev.valid_rows()
                build_index(dev, client, whiten_subset=subset, whiten_label="dev distractors", dim=dim,
                            progress=False)
            stages["dev_extract_index_s"] = time.perf_counter() - t
            peaks.read("dev extract+index")
            w = load_whitenings(dev)
            out["dim"] = int(w.regional.proj.shape[0])
            need = bytes_needed(image_bytes(dev.map_bytes() / dev.n_images, dev.config.channels,
                                            w.regional.proj.shape[0],
                                            [a for a in approximate
                                             for _ in (range(len(pq_ms) * len(pq_nlists) * len(pq_dims))
                                                       if a == "pq" else (None,))]),
                                count)
            if not (root / "distractors" / "manifest.json").exists():
                check_disk(root, need, count)
            out["disk_needed_estimate_gib"] = round(need / 2**30, 2)

            # 2. the distractors, then their index with the dev set's whitening
            peaks.reset()
            t = time.perf_counter()
            make_distractors(str(dev.path), str(root / "distractors"), count, client, seed=seed,
                             pattern="distractor_*", partition_size=partition_size, progress=progress)
            stages["distractors_s"] = time.perf_counter() - t
            peaks.read("distractors")
            d = Store(root / "distractors")
            peaks.reset()
            info = build_index(d, client, whitening=w, whiten_label="dev distractors", shard_rows=shard_rows,
                               progress=progress)
            stages.update({f"index_{k}": v for k, v in info["timings"].items() if k != "whitening_s"})
            out["distractors_indexed"] = {"partitions": info["partitions_indexed"], "of": d.n_partitions}
            peaks.read("index (vectors + exact shards)")

            # 3. approximate indexes of the R-MAC vectors (the only kind the queries below filter by) over
            # both stores: trained once on a sample of the distractors (IVF: k-means; pq: codebooks), shards
            # added in parallel; flat16 needs no training
            out["approximate"] = {}
            # one shard per worker: a top-1000 search pays a fixed cost per shard (its heap of k_factor x k,
            # the refine, the merge): five 100k pq shards took twice the time of one 500k shard
            approx_rows = approx_shard_rows or -(-d.n_images // out["workers"])
            out["approx_shard_rows"] = approx_rows
            variants = [(f"pq{m or ''}{f'_d{pd}' if pd else ''}{f'_ivf{nl}' if nl else ''}" if itype == "pq" else itype,
                         itype, m, nl, pd)
                        for itype in approximate for m in (pq_ms if itype == "pq" else (None,))
                        for pd in (pq_dims if itype == "pq" else (None,))
                        for nl in (pq_nlists if itype == "pq" else (None,))]
            for name, itype, m, nl, pd in variants:
                peaks.reset()
                folder = d.path / f"index-{name}" / "rmac"
                t = time.perf_counter()
                meta = {"index_type": itype}
                if itype == "ivf":
                    meta.update(client.submit(train_template, d, "rmac", None, "flat", seed, str(folder),
                                              pure=False).result())
                elif itype == "pq":
                    meta.update(client.submit(train_pq_template, d, "rmac", m, seed, str(folder), nlist=nl,
                                              dim=pd, pure=False).result())
                stages[f"{name}_train_s"] = time.perf_counter() - t
                t = time.perf_counter()
                template = str(folder / TEMPLATE) if itype in ("ivf", "pq") else None
                for st in (dev, d):
                    build_ivf(client, st, "rmac", template, shard_ranges(st, approx_rows), f"index-{name}",
                              {"vectors": "rmac", itype: meta}, index_type=itype)
                stages[f"{name}_add_s"] = time.perf_counter() - t
                peaks.read(f"{name} train + add")
                out["approximate"][name] = meta

            # 4. disk
            n_total = dev.n_images + d.n_images
            out["bytes"] = {
                "maps_per_image": round(d.map_bytes() / count),
                "store_per_image": round(tree_bytes(d.path / "arrays") / count),
                "exact_index_per_image": round(tree_bytes(d.path / "index") / count),
                **{f"{name}_index_per_image": round(tree_bytes(d.path / f"index-{name}") / count)
                   for name in out["approximate"]},
                "total_gib": round((tree_bytes(d.path) + tree_bytes(dev.path)) / 2**30, 3),
            }
            out["bytes"]["per_image"] = round(tree_bytes(d.path) / count)

            # 5. queries
            queries = ds.queries[:n_queries] if n_queries else ds.queries
            qvs, q_extract = [], []
            choice = ModelChoice()
            client.submit(query_maps, str(ds.image_paths[queries[0].image]), queries[0].bbox, choice, max_size,
                          pure=False).result()  # warm the worker's model
            for q in queries:
                t = time.perf_counter()
                maps, hw, bbox = client.submit(query_maps, str(ds.image_paths[q.image]), q.bbox, choice,
                                               max_size, all_cores=True, pure=False).result()  # as `rmac search`
                qvs.append(query_vectors(maps, w, 3, hw, bbox))
                q_extract.append(time.perf_counter() - t)
            Q = np.stack([qv.rmac for qv in qvs]).astype(np.float32)
            out["queries"] = len(qvs)
            out["db_images"] = n_total

            # 6. filtering: exact on the workers, exact in the client, the approximate indexes
            peaks.reset()
            filt = {}
            db = Database([dev, d]).scatter_filtering(client)
            db.scattered.warm("rmac")  # R-MAC filtering only: the workers hold no MAC shard
            times, exact = time_filter(db, "rmac", Q, top_n)
            inside = time_in_workers(db.scattered, "rmac", Q, top_n)
            filt["exact_workers"] = {"p50_ms": 1e3 * pct(times, 50), "p95_ms": 1e3 * pct(times, 95),
                                     "in_workers_p50_ms": 1e3 * pct(inside, 50),
                                     "actor_p50_ms": 1e3 * pct(time_way(db, "actor", Q, top_n), 50),
                                     "thread_p50_ms": 1e3 * pct(time_way(db, "thread", Q, top_n), 50)}
            if n_total <= CLIENT_SIDE_LIMIT:
                db_client = Database([Store(dev.path), Store(d.path)])
                db_client.filter("rmac", Q[:1], top_n)  # load the shards
                times, exact_c = time_filter(db_client, "rmac", Q, top_n)
                filt["exact_client"] = {"p50_ms": 1e3 * pct(times, 50), "p95_ms": 1e3 * pct(times, 95),
                                        "recall_vs_workers": recall_at(exact_c, exact)}
            from rmac.workflows.filtering import ScatteredFilter, release_held

            peaks.read("filtering exact (exact shards held by workers)")
            client.run(release_held)  # at 1M the exact and approximate shards would not all fit
            how: dict[str, tuple] = {}  # setting -> (index folder, nprobe, k_factor)
            for vname, itype, _, nl, _ in variants:
                peaks.reset()
                adb = Database([dev, d])
                adb.scattered = ScatteredFilter(client, [dev.path, d.path], adb.offsets[:-1].tolist(),
                                                f"index-{vname}")
                adb.scattered.warm("rmac")
                settings = {"ivf": [(f"ivf_nprobe{n}", n, None) for n in nprobes],
                            "pq": [(f"{vname}_k{kf:g}{f'_nprobe{n}' if n else ''}", n, kf) for kf in k_factors
                                   for n in (nprobes if nl else (None,))]}.get(itype, [(itype, None, None)])
                for name, nprobe, kf in settings:
                    times, found = time_filter(adb, "rmac", Q, top_n, nprobe, k_factor=kf)
                    inside = time_in_workers(adb.scattered, "rmac", Q, top_n, nprobe, kf)
                    filt[name] = {"p50_ms": 1e3 * pct(times, 50), "p95_ms": 1e3 * pct(times, 95),
                                  "in_workers_p50_ms": 1e3 * pct(inside, 50),
                                  "actor_p50_ms": 1e3 * pct(time_way(adb, "actor", Q, top_n, nprobe, kf), 50),
                                  "thread_p50_ms": 1e3 * pct(time_way(adb, "thread", Q, top_n, nprobe, kf), 50),
                                  f"recall@{top_n}": recall_at(found, exact)}
                    how[name] = (f"index-{vname}", nprobe, kf)
                peaks.read(f"filtering {vname} (shards held by workers)")
                client.run(release_held)
            out["filtering"] = {k: {a: round(b, 4) for a, b in v.items()} for k, v in filt.items()}

            # 7. re-ranking of the top N read from the store, QE, end to end; filtered as a user at this
            # scale would: by the fastest approximate setting that keeps recall >= 0.95, else exactly
            peaks.reset()
            best_name = best_approximate(out["filtering"], top_n)[0] if how else None
            if best_name and out["filtering"][best_name][f"recall@{top_n}"] >= RECALL_TARGET:
                folder, nprobe, kf = how[best_name]
                db.scattered = ScatteredFilter(client, [dev.path, d.path], db.offsets[:-1].tolist(), folder)
            else:
                best_name, nprobe, kf = "exact_workers", None, None
            out["query_filter"] = best_name
            db.scattered.warm("rmac")
            t = time.perf_counter()  # as a serving cluster would, before its queries
            out["metadata_held"] = {"partitions": db.hold_metadata(client), "s": round(time.perf_counter() - t, 2)}
            params = SearchParams(top_n=top_n, rerank=True, qe=5, nprobe=nprobe, k_factor=kf)
            wf = client.scatter(w, broadcast=True, hash=False)
            answer(db, client, qvs[0], params, wf)  # warm-up: numba caches, file caches
            per = {"filter_s": [], "rerank_s": [], "qe_s": [], "end_to_end_s": []}
            for qv, te in zip(qvs, q_extract):
                r = answer(db, client, qv, params, wf)
                for k in ("filter_s", "rerank_s", "qe_s"):
                    per[k].append(r.timings.get(k, 0.0))
                per["end_to_end_s"].append(te + sum(r.timings.values()))
            out["query"] = {k: {"p50": round(pct(v, 50), 4), "p95": round(pct(v, 95), 4)} for k, v in per.items()}
            out["query"]["extract_s"] = {"p50": round(pct(q_extract, 50), 4), "p95": round(pct(q_extract, 95), 4)}
            peaks.read("queries (filter + re-rank + QE)")

            # 8. do synthetic distractors look like real ones to the real queries?
            out["similarity"] = similarity_table(db, client, qvs, ds, dev, d, wf, similarity_sample, seed)
            out["peak_rss_mib"] = peaks.stages
            out["stages_s"] = {k: round(v, 2) for k, v in stages.items()}
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    out["kept"] = str(root) if keep else None
    return out


def similarity_table(db, client, qvs, ds, dev, d, wf, sample: int, seed: int) -> dict:
    """Quantiles of the real queries' similarity to the real distractor photos of the dev set and to
    a sample of synthetic distractors: whitened MAC, R-MAC, and the AML score after re-ranking."""
    from rmac.workflows.search import SearchParams, rerank_many

    real = np.array([r for r, i in enumerate(dev.ids) if i.startswith("distractor_") and dev.valid_rows()[r]])
    rng = np.random.default_rng(seed)
    synth = np.sort(rng.choice(d.n_images, size=min(sample, d.n_images), replace=False)) + dev.n_images
    vec = {}
    for kind in ("macw", "rmac"):
        vec[("real", kind)] = dev.arrays[kind][:][real]
        arr = d.arrays[kind]
        vec[("synthetic", kind)] = np.stack([arr[int(g - dev.n_images)] for g in synth]) if len(synth) < 5000 \
            else arr[:][synth - dev.n_images]
    table = {}
    for kind, name in (("macw", "MAC"), ("rmac", "R-MAC")):
        Qk = np.stack([qv.macw if kind == "macw" else qv.rmac for qv in qvs])
        for src in ("real", "synthetic"):
            table[f"{name} {src}"] = quantile_row((Qk @ vec[(src, kind)].T).ravel())
    params = SearchParams(filter="rmac", rerank=True, qe=0)
    for src, rows in (("real", real), ("synthetic", synth)):
        got = rerank_many(db, client, qvs, [rows for _ in qvs], params, wf)
        table[f"AML (R-MAC) {src}"] = quantile_row(np.array([s for g in got for s, _, _ in g.values()]))
    return {"quantiles": list(QUANTILES), "n_real": int(len(real)), "n_synthetic": int(len(synth)),
            "n_queries": len(qvs), "rows": table}


def print_report(res: dict) -> None:
    print(f"rmac bench scale: {res['count']} synthetic distractors + dev set = {res['db_images']} images, "
          f"{res.get('dim', '?')}-D, {res['queries']} queries, {res['workers']} workers; {res['machine']}")
    print("build (s):  " + "  ".join(f"{k} {v}" for k, v in res["stages_s"].items()))
    print("peak RSS (MiB) per stage and process:")
    for stage, procs in res["peak_rss_mib"].items():
        print(f"  {stage:<38} " + "  ".join(f"{p} {v:.0f}" for p, v in procs.items()))
    b = res["bytes"]
    print(f"disk: {b['per_image']} B per distractor (maps {b['maps_per_image']}, store {b['store_per_image']}, "
          f"exact index {b['exact_index_per_image']}"
          + "".join(f", {k.split('_')[0]} index {v}" for k, v in b.items()
                    if k.endswith("_index_per_image") and not k.startswith("exact"))
          + f"); total {b['total_gib']} GiB")
    print(f"filtering per query (top {res['top_n']}); approximate indexes (R-MAC only): "
          + "; ".join(f"{t}: " + ", ".join(f"{a} {v}" for a, v in m.items() if a not in ("file", "index_type"))
                      for t, m in res.get("approximate", {}).items()))
    for k, v in res["filtering"].items():
        print(f"  {k:<16} " + "  ".join(f"{a} {c}" for a, c in v.items()))
    held = res.get("metadata_held")
    print(f"query (s, p50 / p95; filtered by {res.get('query_filter', 'exact_workers')}"
          + (f"; metadata of {held['partitions']} partitions held by the workers first, {held['s']} s" if held else "")
          + "): " + "  ".join(f"{k} {v['p50']}/{v['p95']}" for k, v in res["query"].items()))
    sim = res["similarity"]
    print(f"similarity of {sim['n_queries']} real queries to {sim['n_real']} real distractor photos vs "
          f"{sim['n_synthetic']} synthetic distractors (quantiles {sim['quantiles']}):")
    for k, v in sim["rows"].items():
        print(f"  {k:<22} " + "  ".join(f"{x:7.4f}" for x in v))
    print(summary_line(res))


def approximate_entries(filtering: dict, top_n: int = 1000) -> list[tuple[str, dict]]:
    """The filtering rows measured against exact (IVF, pq, flat16 settings)."""
    return [(k, v) for k, v in filtering.items() if not k.startswith("exact") and f"recall@{top_n}" in v]


def best_approximate(filtering: dict, top_n: int = 1000, target: float = RECALL_TARGET) -> tuple[str, dict] | None:
    """The fastest setting with recall >= ``target``, else the one with the best recall; None when the
    run measured no approximate index (``--approximate`` with nothing)."""
    rows = approximate_entries(filtering, top_n)
    if not rows:
        return None
    ok = [(k, v) for k, v in rows if v[f"recall@{top_n}"] >= target]
    return min(ok, key=lambda kv: kv[1]["p50_ms"]) if ok else max(rows, key=lambda kv: kv[1][f"recall@{top_n}"])


def summary_line(res: dict) -> str:
    f = res["filtering"]
    best_k, best = best_approximate(f, res["top_n"]) or ("none", None)
    peak = max(v for procs in res["peak_rss_mib"].values() for v in procs.values())
    build = sum(v for k, v in res["stages_s"].items() if k != "dev_extract_index_s")
    rkey = f"recall@{res['top_n']}"
    return (f"SCALE n={res['db_images']} dim={res.get('dim', 0)} build_s={build:.1f} bytes_per_image={res['bytes']['per_image']} "
            f"exact_p50_ms={f['exact_workers']['p50_ms']:.2f} exact_p95_ms={f['exact_workers']['p95_ms']:.2f} "
            + (f"client_p50_ms={f['exact_client']['p50_ms']:.2f} " if "exact_client" in f else "")
            + (f"approx={best_k} approx_p50_ms={best['p50_ms']:.2f} approx_recall={best[rkey]:.4f} " if best
               else "approx=none ")
            + f"query_filter={res.get('query_filter', 'exact_workers')} "
            f"rerank_p50_s={res['query']['rerank_s']['p50']} qe_p50_s={res['query']['qe_s']['p50']} "
            f"e2e_p50_s={res['query']['end_to_end_s']['p50']} e2e_p95_s={res['query']['end_to_end_s']['p95']} "
            f"peak_rss_max_mib={peak:.0f}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from rmac.workflows.args import positive_int

    p.add_argument("--count", type=positive_int, help="synthetic distractors (10000, 100000, 1000000)")
    p.add_argument("--workdir", help="where the stores go (default: a temporary folder); reused when kept")
    p.add_argument("--keep", action="store_true", help="keep the stores (default: remove them at the end)")
    p.add_argument("--workers", type=int, help="LocalCluster worker processes (default: one per core)")
    p.add_argument("--scheduler", help="tcp://HOST:PORT of a running scheduler instead of a LocalCluster")
    p.add_argument("--max-size", type=int, default=1024)
    p.add_argument("--shard-rows", type=int, default=100_000)
    p.add_argument("--partition-size", type=positive_int, default=DISTRACTOR_PARTITION,
                   help="images per distractor partition (default %(default)s)")
    p.add_argument("--top-n", type=int, default=1000)
    p.add_argument("--dim", type=positive_int,
                   help="whitened dimensions of the whole run (default: D = K, as the paper); a kept workdir "
                        "indexed at another D is indexed again")
    p.add_argument("--queries", type=int, help="use the first QUERIES dev queries (default all)")
    p.add_argument("--nprobe", type=int, nargs="+", default=list(NPROBES),
                   help="nprobe values to measure (IVF, and pq behind IVF lists)")
    p.add_argument("--k-factor", type=float, nargs="+", default=list(K_FACTORS),
                   help="pq k-factors to measure (default %(default)s)")
    p.add_argument("--pq-m", type=positive_int, nargs="+", default=[None], metavar="M",
                   help="pq sub-quantisers, one pq index per value (default: D/2)")
    p.add_argument("--pq-dim", type=int, nargs="+", default=[0], metavar="D",
                   help="pq codes of the vectors' top D principal axes, one pq index per value, 0 for all "
                        "(default: 0)")
    p.add_argument("--pq-nlist", type=int, nargs="+", default=[0], metavar="N",
                   help="IVF lists in front of the pq codes, one pq index per value, 0 for none (measured at each "
                        "--nprobe; default: 0)")
    p.add_argument("--approx-shard-rows", type=positive_int,
                   help="rows per shard of the approximate indexes (default: the distractors over the workers, "
                        "one shard each)")
    p.add_argument("--approximate", nargs="*", choices=("pq", "ivf", "flat16"), default=list(APPROXIMATE),
                   help="approximate indexes measured against exact (default %(default)s; none: skip)")
    p.add_argument("--similarity-sample", type=positive_int, default=2000,
                   help="synthetic distractors compared with the real ones (default %(default)s)")
    p.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    p.add_argument("--from-json", nargs="+", default=[], metavar="FILE",
                   help="earlier runs' --json files, for --plot (with no --count nothing is run)")
    p.add_argument("--plot", metavar="PNG", help="the cost curve against N of these runs as a PNG")


def main(args: argparse.Namespace) -> int:
    if args.count is None and not args.from_json:
        print("rmac bench scale: error: give --count N (or --from-json FILES with --plot)", file=sys.stderr)
        return 2
    runs = [json.loads(Path(f).read_text()) for f in args.from_json]
    if args.count is not None:
        res = bench_scale(args.count, args.workdir, args.keep, args.workers, args.scheduler, args.max_size,
                          args.shard_rows, args.top_n, args.queries, tuple(args.nprobe),
                          similarity_sample=args.similarity_sample, progress=False,
                          approximate=tuple(args.approximate), k_factors=tuple(args.k_factor),
                          partition_size=args.partition_size, pq_ms=tuple(args.pq_m),
                          pq_nlists=tuple(n or None for n in args.pq_nlist),
                          pq_dims=tuple(n or None for n in args.pq_dim),
                          approx_shard_rows=args.approx_shard_rows, dim=args.dim)
        if args.json_out:  # first: the figures of a long run outlive any trouble printing them
            Path(args.json_out).write_text(json.dumps(res, indent=1))
        print_report(res)
        runs.append(res)
    if args.plot:
        plot_curve(runs, args.plot)
        print(f"wrote {args.plot}")
    return 0


def plot_curve(runs: list[dict], png: str) -> None:
    """Per-query seconds (exact and IVF filtering, re-ranking, end to end) and the largest peak RSS of
    any process, against the database size N, one point per run (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(runs, key=lambda r: r["db_images"])
    n = [r["db_images"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    best = [(best_approximate(r["filtering"]) or (None, {"p50_ms": float("nan")}))[1] for r in runs]
    for label, ys in (("filtering, exact on the workers (p50)", [r["filtering"]["exact_workers"]["p50_ms"] / 1e3 for r in runs]),
                      ("filtering, approximate: fastest at recall >= 0.95, else best recall (p50)",
                       [v["p50_ms"] / 1e3 for v in best]),
                      ("AML re-ranking of the top 1000 (p50)", [r["query"]["rerank_s"]["p50"] for r in runs]),
                      ("end to end (p50)", [r["query"]["end_to_end_s"]["p50"] for r in runs])):
        a.plot(n, ys, "o-", label=label)
    a.set(xscale="log", yscale="log", xlabel="database images N", ylabel="seconds per query",
          title="query time against N")
    a.legend(fontsize=8)
    a.grid(True, which="both", alpha=0.3)
    peak = [max(v for stage in r["peak_rss_mib"].values() for v in stage.values()) for r in runs]
    b.plot(n, peak, "o-", label="largest peak RSS of any process")
    b.axhline(4096, color="grey", ls=":", label="4 GB target")
    b.set(xscale="log", xlabel="database images N", ylabel="MiB", ylim=(0, None), title="memory and disk against N")
    disk = b.twinx()
    disk.plot(n, [r["bytes"]["per_image"] / 1e3 for r in runs], "s--", color="tab:orange", label="disk per image")
    disk.set(ylabel="kB per image", ylim=(0, None))
    lines = b.get_legend_handles_labels(), disk.get_legend_handles_labels()
    b.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8, loc="lower right")
    b.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
