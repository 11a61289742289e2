"""`rmac index`: PCA-whitening as a Dask tree reduction, R-MAC / MAC global vectors, sharded FAISS.

1. Each partition task turns its stored maps into l2-normalised regional MAC vectors and its images'
   l2-normalised MACs, and returns only the sufficient statistics (count, sum, outer products) of both
   sets; one `dask.bag` tree reduction merges the pairs, so no process ever holds all regional vectors.
   The client fits two whitenings on the merged totals, as the paper's `test.m`: one on the regional
   vectors (for R-MAC), one on the MAC vectors, one per image (for MAC filtering). Both keep D = K
   dimensions unless `--dim` asks for a reduction.
2. Each partition task builds its rows of `rmac` (the paper's R-MAC) and `macw` (l2 → whiten → l2 MAC).
3. Each shard task builds one FAISS index over a contiguous range of partitions and writes it beside
   the store (`index/<kind>/shard_XXX.faiss` + `manifest.json`).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from functools import reduce
from typing import NamedTuple

import numpy as np

from rmac.ops import whitening as wh
from rmac.ops.pooling import l2n, regional_mac, regional_mac_sparse, rmac_aggregate_many
from rmac.ops.quantise import dequantise
from rmac.ops.regions import region_grid, rmac_regions
from rmac.storage import checksums, ids as id_tables
from rmac.storage.index import KINDS, TRAINED_KINDS, shard_file
from rmac.storage.store import Store, StoreError, _write_json_atomic, whitening_set_id
from rmac.workflows.progress import wait_all

DEFAULT_L = 3
DEFAULT_DIM: int | None = None  # the paper keeps D = K; `--dim` reduces (measured cost in --help)
DIM_HELP = ("whitened dimensions (default: all K channels, as the paper). A reduction costs accuracy: "
            "with EfficientNet-Lite0 (K = 1280) on the views of landmarks-dev, 512-D R-MAC scored "
            "50 mAP against 59 at 1280-D (docs/benchmarks.md)")
INDEX_TYPE_HELP = (
    "the filtering index's shards: flat (exact, float32; the default), flat16 (exact over half-precision "
    "vectors: half the memory, the same top 1000 at 100k), ivf (IVF lists, --nlist, --ivf-codec; loses deep "
    "neighbours: recall@1000 0.89 at a quarter of the lists at 100k), pq (every row scanned as a 4-bit PQ "
    "code with SIMD fast-scan, the best k-factor x top-n re-scored with 8-bit vectors: recall@1000 0.98 at "
    "100k and 1M at the default k-factor 4, D + D/4 bytes per row). Measured in docs/benchmarks.md (issue 12); searched with --nprobe / "
    "--k-factor")
DEFAULT_SHARD_ROWS = 100_000
VECTOR_KINDS = ("rmac", "macw")


def regional_vectors(q: np.ndarray, scale: float, L: int = DEFAULT_L) -> np.ndarray:
    """The l2-normalised regional MAC vectors (R, K) of one stored map."""
    x = dequantise(q, scale)
    _, h, w = x.shape
    return l2n(regional_mac(x, rmac_regions(w, h, L)))


def regional_vectors_of(store: Store, rows: list[int], L: int = DEFAULT_L, decoded: dict | None = None
                        ) -> list[np.ndarray]:
    """`regional_vectors` of each stored row of ``rows`` (one `(R, K)` array each), pooled from the stored
    non-zeros (`regional_mac_sparse`, the same numbers) read by `Store.read_sparse_rows` (``decoded``: its
    partitions' maps decoded already)."""
    out = []
    for sp, i, scale in store.read_sparse_rows(rows, decoded):
        h, w = (int(v) for v in sp.map_hw[i])
        out.append(l2n(regional_mac_sparse(sp, i, region_grid(w, h, L), scale)))
    return out


def _partition_rows(store: Store, p: int, subset: np.ndarray | None) -> list[int]:
    part = store.partition_rows(p)
    rows = [r for r, ok in zip(part, store.valid_rows(part)) if ok]
    if subset is not None:
        rows = [r for r in rows if subset[r]]
    return rows


class Whitenings(NamedTuple):
    """The two whitenings of an index: ``regional`` (learned on regional vectors; whitens R-MAC's
    regions) and ``mac`` (learned on one MAC vector per image; whitens MAC for MAC filtering)."""

    regional: wh.Whitening
    mac: wh.Whitening


WHITENING_KINDS = Whitenings._fields


def partition_stats(store: Store, p: int, L: int, subset: np.ndarray | None = None
                    ) -> tuple[wh.WhiteningStats, wh.WhiteningStats]:
    """Whitening statistics of partition ``p``'s regional vectors and of its images' l2-normalised MACs
    (rows in ``subset`` only), as one pair."""
    rows = _partition_rows(store, p, subset)
    regional, macs = wh.empty(store.config.channels), wh.empty(store.config.channels)
    for vectors in regional_vectors_of(store, rows, L):
        regional = wh.merge(regional, wh.stats(vectors))
    if rows:
        macs = wh.stats(l2n(store.arrays["mac"].get_orthogonal_selection(np.asarray(rows))))
    return regional, macs


def _merge_all(items) -> tuple[wh.WhiteningStats, wh.WhiteningStats]:
    return reduce(lambda a, b: (wh.merge(a[0], b[0]), wh.merge(a[1], b[1])), items)


def fit_whitening(source: Store, client, L: int = DEFAULT_L, dim: int | None = DEFAULT_DIM,
                  subset: np.ndarray | None = None, split_every: int = 8,
                  shrinkage: float = wh.DEFAULT_SHRINKAGE) -> Whitenings:
    """Fit both PCA-whitenings of ``source`` (rows in ``subset``) from ONE tree reduction over its
    partitions carrying both sets of statistics: on the regional vectors and on the MAC vectors."""
    import dask.bag as db

    source.require_complete()
    parts = list(range(source.n_partitions))
    bag = db.from_sequence(parts, npartitions=len(parts))
    total = bag.reduction(
        lambda ps: _merge_all([partition_stats(source, p, L, subset) for p in ps]),
        _merge_all, split_every=split_every)
    regional, macs = client.compute(total).result()
    for what, st in (("regional vectors", regional), ("images", macs)):
        if st.count < 2:
            raise StoreError(f"{source.path}: too few {what} ({st.count}) to fit whitening")
    K = source.config.channels
    dim = min(dim or K, K)
    return Whitenings(regional=wh.fit(regional, dim=dim, shrinkage=shrinkage),
                      mac=wh.fit(macs, dim=dim, shrinkage=shrinkage))


def partition_vectors(store: Store, p: int, whitening: Whitenings, L: int, wid: str = "") -> int:
    """Write partition ``p``'s R-MAC and whitened-MAC rows (failed rows stay zero), then
    ``index/parts/p.json``: which record and whitening they were built from, and their checksums."""
    part = store.partition_rows(p)
    rows = list(part)
    D = whitening.regional.proj.shape[0]
    out = {k: np.zeros((len(rows), D), np.float32) for k in VECTOR_KINDS}
    maps = store.verify_partition(p)  # damaged data is refused here, not indexed as zeros
    keep = [i for i, ok in enumerate(store.valid_rows(part)) if ok]
    if keep:
        regional = regional_vectors_of(store, [rows[i] for i in keep], L, {p: maps})
        offsets = np.cumsum([0] + [len(r) for r in regional])
        out["rmac"][keep] = rmac_aggregate_many(np.concatenate(regional), offsets, whitening.regional)
        macs = store.arrays["mac"][rows[0]:rows[-1] + 1][keep]
        out["macw"][keep] = l2n(wh.apply(whitening.mac, l2n(macs)))
    g = store.arrays
    if rows:
        import zarr

        with zarr.config.set({"array.write_empty_chunks": True}):  # a missing file must mean damage
            for k in VECTOR_KINDS:
                g[k][rows[0]:rows[-1] + 1] = out[k]
    record = store.partition_digest(p)
    sums = checksums.digest_rows(g, part.start, part.stop, VECTOR_KINDS)
    _write_json_atomic(vector_part_file(store, p), {"record": record, "whitening": wid, "L": L,
                                                    "checksums": sums})
    return len(keep)


def vector_part_file(store: Store, p: int):
    return store.path / "index" / "parts" / f"p{p:06d}.json"


def vector_part(store: Store, p: int) -> dict | None:
    """What partition ``p``'s vectors were built from (None: never built, or unreadable)."""
    try:
        return json.loads(vector_part_file(store, p).read_text())
    except (OSError, ValueError):
        return None


ADD_ROWS = 65_536  # rows read and added to a FAISS shard at a time (bounds a shard build's memory)


def build_shard_file(store: Store, kind: str, shard: int, start: int, stop: int, index_kind: str,
                     template: str | None = None, index_dir: str = "index") -> dict:
    """Build and save one FAISS shard over rows [start, stop) of ``kind`` vectors as shard ``shard`` of
    ``STORE/index_dir/kind`` (a Dask task); IVF and pq: a copy of the trained ``template`` file with these
    rows added (`rmac.workflows.ivf`). Returns its manifest entry, with the file's checksum."""
    from rmac.storage.index import add_rows, build_shard, load_shard, save_shard, shard_entry

    store.require_chunks(start, stop, names=(kind,), exclude=())
    valid = store.valid_rows(range(start, stop))
    # The rows go in ADD_ROWS at a time: a shard per worker at 1M is 500k x 1280 floats (2.6 GB), and
    # read at once it cost ~3x that in copies. An IVF trained on the shard itself needs it whole.
    step = max(stop - start, 1) if index_kind == "ivf" and not template else ADD_ROWS
    b = min(stop, start + step)
    index = build_shard(store.arrays[kind][start:b], start, kind=index_kind, valid=valid[:b - start],
                        template=load_shard(template) if template else None)
    for a in range(b, stop, step):
        b = min(stop, a + step)
        add_rows(index, store.arrays[kind][a:b], a, valid[a - start:b - start])
    name = shard_file(shard)
    folder = store.path / index_dir / kind
    folder.mkdir(parents=True, exist_ok=True)
    save_shard(index, folder / name)
    return {**shard_entry(index, name, start, stop, index_kind),
            "sha256": checksums.digest_file(folder / name), "bytes": (folder / name).stat().st_size}


def shard_ranges(store: Store, shard_rows: int, parts: list[int] | None = None) -> list[tuple[int, int]]:
    """Contiguous row ranges made of whole partitions, about ``shard_rows`` rows each, over the runs
    of consecutive partitions in ``parts`` (default: all)."""
    P = store.config.partition_size
    per = max(1, round(shard_rows / P))
    parts = sorted(range(store.n_partitions) if parts is None else parts)
    runs: list[list[int]] = []
    for p in parts:
        if runs and p == runs[-1][-1] + 1 and len(runs[-1]) < per:
            runs[-1].append(p)
        else:
            runs.append([p])
    return [(store.partition_rows(r[0]).start, store.partition_rows(r[-1]).stop) for r in runs]


def build_index(store: Store, client, whiten_on: Store | None = None, L: int = DEFAULT_L,
                dim: int | None = DEFAULT_DIM, shard_rows: int = DEFAULT_SHARD_ROWS,
                index_kind: str = "flat", whiten_subset: np.ndarray | None = None,
                whiten_label: str | None = None, whitening: Whitenings | None = None,
                progress: bool = True, refit: bool = False, wait: bool = False, nlist: int | None = None,
                ivf_codec: str = "flat", shrinkage: float = wh.DEFAULT_SHRINKAGE, pq_m: int | None = None,
                pq_dim: int | None = None) -> dict:
    """Whitening, global vectors and FAISS shards for ``store``; returns timings and what was built.

    ``index_kind``: one of `rmac.storage.index.KINDS` (flat, flat16, ivf with ``nlist`` and ``ivf_codec``,
    pq with ``pq_m`` sub-quantisers over the vectors' top ``pq_dim`` principal axes); see `rmac index --help`.

    The whitening is fitted on ``whiten_on`` (default: the store itself), on the rows of
    ``whiten_subset`` only when given; or taken as given (``whitening``, labelled ``whiten_label``),
    which is how distractor stores share the whitening of the dataset they are added to.

    On a store indexed before (same L, dim, index kind; no new whitening asked for, or a ``whitening``
    given that is the very one it was indexed with; no ``refit``), only the partitions added or
    re-extracted since get vectors and new shards; the fitted whitening is kept.
    Commits as one step (`commit_index`): shards are written under new names and the previous index
    stays in use until the store manifest names the new one. Holds the store's lock."""
    from rmac.storage.lock import StoreLock

    with StoreLock(store.path, "index", wait=wait):
        store.reload()  # what the previous holder committed; the caller's handle sees what we commit
        finish_commit(store)
        return _build_index(store, client, whiten_on, L, dim, shard_rows, index_kind, whiten_subset,
                            whiten_label, whitening, progress, refit, nlist, ivf_codec, shrinkage, pq_m, pq_dim)


def _build_index(store, client, whiten_on, L, dim, shard_rows, index_kind, whiten_subset, whiten_label,
                 whitening, progress, refit, nlist=None, ivf_codec="flat",
                 shrinkage=wh.DEFAULT_SHRINKAGE, pq_m=None, pq_dim=None) -> dict:
    from distributed import wait

    store.require_complete()
    for p in range(store.n_partitions):  # stat calls only: a deleted file must not index as zeros
        r = store.partition_rows(p)
        store.require_chunks(r.start, r.stop)
        if not id_tables.table_file(store.path, p).is_file():
            raise StoreError(f"{store.path}: id table of partition {p} is missing: the store is damaged; "
                             f"run `rmac verify {store.path}`")
    source = whiten_on or store
    mine, theirs = store.config, source.config
    if (theirs.backbone, theirs.channels, theirs.weights) != (mine.backbone, mine.channels, mine.weights):
        raise StoreError(f"whitening store {source.path} holds {theirs.backbone} ({theirs.weights} weights) "
                         f"features, the store {mine.backbone} ({mine.weights}): they must match")
    timings = {}
    t = time.perf_counter()
    before = store.manifest.get("index")
    # a whitening given (a distractor store taking its dataset's) that is the one indexed with: nothing to refit
    same_given = (whitening is not None and before is not None and before.get("whitening_id") == whitening_set_id(
        {kind: (wk.mean, wk.proj, wk.eigvals) for kind, wk in zip(WHITENING_KINDS, whitening)}))
    # a trained index (ivf, pq) asked for with other parameters is built again, not extended; an index made
    # before `trained_with` was recorded counts as made with the defaults
    trained_with = ({"nlist": nlist, "ivf_codec": ivf_codec, "pq_m": pq_m, "pq_dim": pq_dim}
                    if index_kind in TRAINED_KINDS else {})
    unrecorded = {**dict.fromkeys(trained_with), "ivf_codec": "flat"} if trained_with else {}
    # the vectors stay valid under the same whitening and L; the shards only under the same index too (another
    # index kind or trained parameters rebuild every shard from the vectors already there)
    keep_vectors = (before is not None and "commit" in before and not refit and (whitening is None or same_given)
                    and whiten_on is None and whiten_subset is None and before.get("L") == L
                    and (dim is None or before.get("dim") == min(dim, store.config.channels)))
    incremental = (keep_vectors and before.get("index_kind") == index_kind
                   and before.get("trained_with", unrecorded) == trained_with)
    if keep_vectors and same_given:
        w, wid, fitted_on = whitening, before["whitening_id"], before["whitening"]
    elif keep_vectors:
        w = load_whitenings(store)  # each checked against its hash
        wid = store.load_whitening()[3]["id"]
        if wid != before.get("whitening_id"):
            raise StoreError(f"{store.path}: the whitening ({wid}) is not the one the index was built with "
                             f"({before.get('whitening_id')}): run `rmac index {store.path} --refit`")
        fitted_on = before["whitening"]
    else:
        w = whitening if whitening is not None else fit_whitening(source, client, L, dim, whiten_subset,
                                                                  shrinkage=shrinkage)
        fitted_on = whiten_label or str(source.path)
        wid = store.save_whitening({kind: (wk.mean, wk.proj, wk.eigvals, {
            "fitted_on": fitted_on, "n_vectors": int(wk.n_fit), "L": L, "dim": int(wk.proj.shape[0]),
            "shrinkage": float(wk.shrinkage),
            "vectors": "regional MACs (R-MAC)" if kind == "regional" else "MACs, one per image (MAC filtering)"})
            for kind, wk in zip(WHITENING_KINDS, w)}, aside=True)
    timings["whitening_s"] = time.perf_counter() - t

    t = time.perf_counter()
    D = w.regional.proj.shape[0]
    g = store.arrays
    P = store.config.partition_size
    rows = store.n_images
    for k in VECTOR_KINDS:
        if keep_vectors and k in g and g[k].shape[1] == D:
            if g[k].shape[0] != rows:
                g[k].resize((rows, D))
        else:
            g.create_array(k, shape=(rows, D), chunks=(P, D), dtype="float32", fill_value=0.0,
                           overwrite=True)
    redo = [p for p in range(store.n_partitions) if not keep_vectors or _stale(store, p, wid, L)]
    w_future = client.scatter(w, broadcast=True, hash=False)
    futures = [client.submit(partition_vectors, store, p, w_future, L, wid, pure=False, retries=2)
               for p in redo]
    wait_all(futures, "vectors", progress)
    timings["vectors_s"] = time.perf_counter() - t

    t = time.perf_counter()
    redone = set(redo)
    kept = {k: [] for k in VECTOR_KINDS}
    if incremental:
        for k in VECTOR_KINDS:
            for e in before["shard_lists"][k]:
                parts = range(store.partition_of(e["start"]), store.partition_of(max(e["stop"] - 1, e["start"])) + 1)
                f = store.path / "index" / k / e["file"]
                intact = f.is_file() and f.stat().st_size == e.get("bytes", -1)  # else: built again
                if intact and e["stop"] > e["start"] and not redone.intersection(parts):
                    kept[k].append(e)
    both = set.intersection(*({(e["start"], e["stop"]) for e in kept[k]} for k in VECTOR_KINDS))
    kept = {k: [e for e in kept[k] if (e["start"], e["stop"]) in both] for k in VECTOR_KINDS}
    covered = {store.partition_of(r) for a, b in both for r in range(a, b)}
    todo = [p for p in range(store.n_partitions) if p not in covered]
    ranges = shard_ranges(store, shard_rows, todo)
    shards = {}
    ivf = {}
    if index_kind in TRAINED_KINDS and ranges:  # trained once per vector kind on a sample; shards add to a copy
        from rmac.workflows.ivf import TEMPLATE, train_pq_template, train_template

        trained = {k: client.submit(train_template, store, k, nlist, ivf_codec, 0,
                                    str(store.path / "index" / index_kind / k), pure=False)
                   if index_kind == "ivf" else
                   client.submit(train_pq_template, store, k, pq_m, 0, str(store.path / "index" / index_kind / k),
                                 nlist=nlist, dim=pq_dim, pure=False)
                   for k in VECTOR_KINDS}
        ivf = {k: f.result() for k, f in trained.items()}
        timings[f"{index_kind}_train_s"] = time.perf_counter() - t
    for k in VECTOR_KINDS:
        template = str(store.path / "index" / index_kind / k / TEMPLATE) if ivf else None
        used = [e["file"] for e in (before or {}).get("shard_lists", {}).get(k, [])]  # never overwrite those
        first = 1 + max([_shard_number(f) for f in used], default=-1)
        futs = [client.submit(build_shard_file, store, k, first + i, a, b, index_kind, template, pure=False,
                              retries=2)
                for i, (a, b) in enumerate(ranges)]
        wait(futs)
        shards[k] = sorted(kept[k] + [f.result() for f in futs], key=lambda e: e["start"])
    timings["faiss_s"] = time.perf_counter() - t
    info = {"store": str(store.path), "whitening": fitted_on, "whitening_id": wid, "L": L, "dim": int(D),
            "shards": len(shards["rmac"]), "index_kind": index_kind, "rows": rows,
            "partitions": store.n_partitions, "revision": int(store.manifest.get("revision", 0)),
            "incremental": incremental, "partitions_indexed": len(redo), "shards_built": len(ranges),
            "timings": {k: round(v, 3) for k, v in timings.items()}}
    if trained_with:
        info["trained_with"] = trained_with
    if ivf:
        info[index_kind] = ivf  # what each vector kind's template was trained on
    commit_index(store, info, shards)
    store.log_run({"command": "index", "version": _version(), "incremental": incremental,
                   "partitions_indexed": len(redo), "shards_built": len(ranges),
                   "seconds": round(sum(timings.values()), 2)})
    return info


def _version() -> str:
    from rmac.workflows.extract import _version as v

    return v()


def _shard_number(name: str) -> int:
    return int(name.split("_")[1].split(".")[0])


def _stale(store: Store, p: int, wid: str, L: int) -> bool:
    """Partition ``p``'s vectors are missing or were built from another record or whitening."""
    got = vector_part(store, p)
    r = store.partition_rows(p)
    return (got is None or store.missing_chunks(r.start, r.stop, names=VECTOR_KINDS, exclude=()) or got.get("whitening") != wid or got.get("L") != L
            or got.get("record") != store.partition_digest(p))


def commit_index(store: Store, info: dict, shards: dict[str, list[dict]]) -> None:
    """Make the new index the store's in one step. Each kind's shard list is written aside
    (``manifest.<token>.json``), then the store manifest's ``index`` entry (the commit point) names it,
    then `finish_commit` moves the staged files in place (redone by any later run if killed there)."""
    from rmac.storage.index import write_manifest

    token = checksums.digest_bytes(json.dumps([info["whitening_id"], shards], sort_keys=True).encode())[:16]
    for k in VECTOR_KINDS:
        folder = store.path / "index" / k
        write_manifest(folder, shards[k], {"vectors": k, "whitening": info["whitening"],
                                           "whitening_id": info["whitening_id"], "commit": token},
                       name=f"manifest.{token}.json")
    store.update_manifest(index={**info, "commit": token, "shard_lists": shards})
    finish_commit(store)


def finish_commit(store: Store) -> None:
    """Roll a committed index forward: staged whitening and shard manifests in place, stale files gone.
    Only under the store's lock (it deletes what an unfinished build left)."""
    info = store.manifest.get("index")
    if not info or "commit" not in info:
        return
    store.install_whitening(info["whitening_id"])
    token = info["commit"]
    for k in VECTOR_KINDS:
        folder = store.path / "index" / k
        staged = folder / f"manifest.{token}.json"
        if staged.exists():
            os.replace(staged, folder / "manifest.json")
        if not folder.is_dir():
            continue
        keep = {e["file"] for e in info["shard_lists"][k]} | {"manifest.json"}
        for f in folder.glob("*"):  # shards and manifests of replaced or unfinished builds
            if f.name not in keep and f.is_file():
                f.unlink(missing_ok=True)
    for f in store.path.glob(".whitening.*"):
        if f.name != f".whitening.{info['whitening_id']}":
            import shutil

            shutil.rmtree(f, ignore_errors=True)


def load_whitening(store: Store, kind: str = "regional") -> wh.Whitening:
    """One whitening saved in ``store`` by `rmac index`: ``regional`` (R-MAC's) or ``mac``."""
    mean, proj, eigvals, attrs = store.load_whitening(kind)
    return wh.Whitening(mean=mean, proj=proj, eigvals=eigvals, n_fit=int(attrs.get("n_vectors", 0)),
                        shrinkage=float(attrs.get("shrinkage", 0.0)))


def load_whitenings(store: Store) -> Whitenings:
    """Both whitenings saved in ``store`` by `rmac index`."""
    return Whitenings(*(load_whitening(store, k) for k in WHITENING_KINDS))


def _staged(store: Store, info: dict) -> bool:
    return (store.path / f".whitening.{info['whitening_id']}").exists() or any(
        (store.path / "index" / k / f"manifest.{info['commit']}.json").exists() for k in VECTOR_KINDS)


def require_indexed(store: Store) -> dict:
    """The store's committed index, checked: the whitening is the one it was built with (by hash), each
    FAISS folder holds that commit's shards, and no partition was re-extracted since."""
    info = store.manifest.get("index")
    if not info:
        raise StoreError(f"{store.path} was never indexed: run `rmac index {store.path}` first")
    if "commit" not in info:
        raise StoreError(f"{store.path}: index from an older rmac: run `rmac index {store.path} --refit`")
    if _staged(store, info):  # killed between the commit and putting its files in place: finish it
        from rmac.storage.lock import StoreLock, StoreLocked

        try:
            with StoreLock(store.path, "search (finishing an index commit)"):
                finish_commit(Store(store.path))
        except StoreLocked:
            raise StoreError(f"{store.path}: an index commit is being finished by another process: "
                             "retry in a moment") from None
    wid = store.load_whitening()[3].get("id")
    if wid != info["whitening_id"]:
        raise StoreError(f"{store.path}: the whitening ({wid}) is not the one the index was built with "
                         f"({info['whitening_id']}): run `rmac index {store.path} --refit`")
    if int(store.manifest.get("revision", 0)) != info.get("revision"):
        raise StoreError(f"{store.path}: images were re-extracted since the index was built: "
                         f"run `rmac index {store.path}`")
    for k in VECTOR_KINDS:
        try:
            meta = json.loads((store.path / "index" / k / "manifest.json").read_text())
        except (OSError, ValueError):
            raise StoreError(f"{store.path}/index/{k}/manifest.json is missing or damaged: "
                             f"run `rmac index {store.path}`") from None
        for e in info["shard_lists"][k]:
            f = store.path / "index" / k / e["file"]
            size = f.stat().st_size if f.is_file() else None
            if size is None or ("bytes" in e and size != e["bytes"]):
                what = "missing" if size is None else f"{size} bytes, not {e['bytes']}"
                raise StoreError(f"{f} is {what}: the index is damaged; run `rmac index {store.path}` to rebuild it")
        if meta.get("meta", {}).get("commit") != info["commit"] or \
                [e["file"] for e in meta.get("shards", [])] != [e["file"] for e in info["shard_lists"][k]]:
            raise StoreError(f"{store.path}/index/{k} does not hold the committed index: "
                             f"run `rmac index {store.path}`")
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rmac.workflows.args import existing_dir, int_range, positive_int

    parser.add_argument("store", type=existing_dir, help="an extracted store")
    parser.add_argument("--whiten-on", type=existing_dir,
                        help="learn whitening on this other store (the paper: Oxford for Paris)")
    parser.add_argument("--levels-l", dest="L", type=int_range(1, 10), default=DEFAULT_L,
                        help="R-MAC scales L (default 3)")
    parser.add_argument("--dim", type=positive_int, default=DEFAULT_DIM, help=DIM_HELP)
    parser.add_argument("--shard-rows", type=positive_int, default=DEFAULT_SHARD_ROWS, help="rows per FAISS shard")
    kinds = parser.add_mutually_exclusive_group()
    kinds.add_argument("--index-type", choices=KINDS, default="flat", help=INDEX_TYPE_HELP)
    kinds.add_argument("--ivf", dest="index_type", action="store_const", const="ivf",
                       help="the same as --index-type ivf")
    kinds.add_argument("--pq", dest="index_type", action="store_const", const="pq",
                       help="the same as --index-type pq")
    parser.add_argument("--pq-m", type=positive_int, help="pq: sub-quantisers (default: 2 dimensions each)")
    parser.add_argument("--pq-dim", type=positive_int,
                        help="pq: code the vectors' projections on their top PQ_DIM principal axes (default: all "
                             "D); the candidates are still re-scored with the whole vectors (docs/benchmarks.md)")
    parser.add_argument("--nlist", type=int, help="IVF lists (default about 4 sqrt(N), a power of two); with "
                        "--index-type pq: IVF lists in front of the pq codes (codes of the residuals), 3/8 of them probed "
                        "(default none; 1024 at 1M: recall@1000 0.956 in ~2/3 of plain pq's time, docs/benchmarks.md)")
    parser.add_argument("--ivf-codec", choices=("flat", "sq8"), default="flat",
                        help="IVF list storage: float vectors or 8-bit scalar quantised (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--refit", action="store_true",
                        help="learn the whitening again over everything and rebuild every vector "
                             "(default on an indexed store: keep it, index only new partitions)")
    parser.add_argument("--wait", action="store_true",
                        help="wait for another extract/index holding the store's lock (default: exit at once)")


def main(args: argparse.Namespace, client) -> int:
    store = Store(args.store)
    other = Store(args.whiten_on) if args.whiten_on else None
    info = build_index(store, client, other, args.L, args.dim, args.shard_rows, args.index_type,
                       refit=args.refit, wait=args.wait, nlist=args.nlist, ivf_codec=args.ivf_codec, pq_m=args.pq_m,
                       pq_dim=args.pq_dim)
    print(json.dumps(info, indent=1) if args.json else
          f"indexed {store.path}: whitening fitted on {info['whitening']}, {info['dim']}-D, "
          f"{info['shards']} shard(s); {info['partitions_indexed']} partition(s) and {info['shards_built']} "
          f"shard(s) built{' (incremental)' if info['incremental'] else ''}; {info['timings']}")
    return 0
