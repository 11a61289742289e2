"""`rmac index`: PCA-whitening as a Dask tree reduction, R-MAC / MAC global vectors, sharded FAISS.

1. Each partition task turns its stored maps into l2-normalised regional MAC vectors and returns only
   their sufficient statistics (count, sum, outer products); a `dask.bag` tree reduction merges them,
   so no process ever holds all regional vectors. The client fits the whitening on the merged total.
2. Each partition task builds its rows of `rmac` (the paper's R-MAC) and `macw` (l2 → whiten → l2 MAC).
3. Each shard task builds one FAISS index over a contiguous range of partitions and writes it beside
   the store (`index/<kind>/shard_XXX.faiss` + `manifest.json`).
"""
from __future__ import annotations

import argparse
import sys
import time
from functools import reduce

import numpy as np

from rmac.ops import whitening as wh
from rmac.ops.pooling import l2n, regional_mac, rmac_aggregate_many
from rmac.ops.quantise import dequantise
from rmac.ops.regions import rmac_regions
from rmac.storage.store import Store, StoreError

DEFAULT_L = 3
DEFAULT_DIM = 512
DEFAULT_SHARD_ROWS = 100_000
VECTOR_KINDS = ("rmac", "macw")


def regional_vectors(q: np.ndarray, scale: float, L: int = DEFAULT_L) -> np.ndarray:
    """The l2-normalised regional MAC vectors (R, K) of one stored map."""
    x = dequantise(q, scale)
    _, h, w = x.shape
    return l2n(regional_mac(x, rmac_regions(w, h, L)))


def _partition_rows(store: Store, p: int, subset: np.ndarray | None) -> list[int]:
    part = store.partition_rows(p)
    rows = [r for r, ok in zip(part, store.valid_rows(part)) if ok]
    if subset is not None:
        rows = [r for r in rows if subset[r]]
    return rows


def partition_stats(store: Store, p: int, L: int, subset: np.ndarray | None = None) -> wh.WhiteningStats:
    """Whitening statistics of the regional vectors of partition ``p`` (rows in ``subset`` only)."""
    stats = wh.empty(store.config.channels)
    for q, scale in store.read_maps(_partition_rows(store, p, subset)):
        stats = wh.merge(stats, wh.stats(regional_vectors(q, scale, L)))
    return stats


def _merge_all(items) -> wh.WhiteningStats:
    return reduce(wh.merge, items)


def fit_whitening(source: Store, client, L: int = DEFAULT_L, dim: int | None = DEFAULT_DIM,
                  subset: np.ndarray | None = None, split_every: int = 8) -> wh.Whitening:
    """Fit PCA-whitening on the regional vectors of ``source`` (rows in ``subset``) by tree reduction."""
    import dask.bag as db

    source.require_complete()
    parts = list(range(source.n_partitions))
    bag = db.from_sequence(parts, npartitions=len(parts))
    total = bag.reduction(
        lambda ps: _merge_all([partition_stats(source, p, L, subset) for p in ps]),
        _merge_all, split_every=split_every)
    stats = client.compute(total).result()
    if stats.count < 2:
        raise StoreError(f"{source.path}: too few regional vectors ({stats.count}) to fit whitening")
    dim = min(dim or source.config.channels, source.config.channels)
    return wh.fit(stats, dim=dim)


def partition_vectors(store: Store, p: int, whitening: wh.Whitening, L: int) -> int:
    """Write partition ``p``'s R-MAC and whitened-MAC rows; failed rows stay zero."""
    part = store.partition_rows(p)
    rows = list(part)
    D = whitening.proj.shape[0]
    out = {k: np.zeros((len(rows), D), np.float32) for k in VECTOR_KINDS}
    keep = [i for i, ok in enumerate(store.valid_rows(part)) if ok]
    if keep:
        maps = store.read_maps([rows[i] for i in keep])
        regional = [regional_vectors(q, s, L) for q, s in maps]
        offsets = np.cumsum([0] + [len(r) for r in regional])
        out["rmac"][keep] = rmac_aggregate_many(np.concatenate(regional), offsets, whitening)
        macs = store.arrays["mac"][rows[0]:rows[-1] + 1][keep]
        out["macw"][keep] = l2n(wh.apply(whitening, l2n(macs)))
    g = store.arrays
    for k in VECTOR_KINDS:
        g[k][rows[0]:rows[-1] + 1] = out[k]
    return len(keep)


def build_shard_file(store: Store, kind: str, shard: int, start: int, stop: int, index_kind: str) -> dict:
    """Build and save one FAISS shard over rows [start, stop) of ``kind`` vectors."""
    from rmac.storage.index import build_shard, save_shard

    vectors = store.arrays[kind][start:stop]
    valid = store.valid_rows(range(start, stop))
    index = build_shard(vectors, start, kind=index_kind, valid=valid)
    name = f"shard_{shard:03d}.faiss"
    folder = store.path / "index" / kind
    folder.mkdir(parents=True, exist_ok=True)
    save_shard(index, folder / name)
    return {"file": name, "start": start, "stop": stop, "kind": index_kind, "d": int(vectors.shape[1]),
            "ntotal": int(index.ntotal)}


def shard_ranges(store: Store, shard_rows: int) -> list[tuple[int, int]]:
    """Contiguous row ranges made of whole partitions, about ``shard_rows`` rows each."""
    P = store.config.partition_size
    per = max(1, round(shard_rows / P)) * P
    return [(s, min(s + per, store.n_images)) for s in range(0, store.n_images, per)]


def build_index(store: Store, client, whiten_on: Store | None = None, L: int = DEFAULT_L,
                dim: int | None = DEFAULT_DIM, shard_rows: int = DEFAULT_SHARD_ROWS,
                index_kind: str = "flat", whiten_subset: np.ndarray | None = None,
                whiten_label: str | None = None, whitening: wh.Whitening | None = None,
                progress: bool = True) -> dict:
    """Whitening, global vectors and FAISS shards for ``store``; returns timings and what was built.

    The whitening is fitted on ``whiten_on`` (default: the store itself), on the rows of
    ``whiten_subset`` only when given; or taken as given (``whitening``, labelled ``whiten_label``),
    which is how distractor stores share the whitening of the dataset they are added to."""
    from distributed import wait

    from rmac.storage.index import write_manifest

    store.require_complete()
    source = whiten_on or store
    mine, theirs = store.config, source.config
    if (theirs.backbone, theirs.channels, theirs.weights) != (mine.backbone, mine.channels, mine.weights):
        raise StoreError(f"whitening store {source.path} holds {theirs.backbone} ({theirs.weights} weights) "
                         f"features, the store {mine.backbone} ({mine.weights}): they must match")
    timings = {}
    t = time.perf_counter()
    w = whitening if whitening is not None else fit_whitening(source, client, L, dim, whiten_subset)
    timings["whitening_s"] = time.perf_counter() - t
    fitted_on = whiten_label or str(source.path)
    store.save_whitening(w.mean, w.proj, w.eigvals, {
        "fitted_on": fitted_on, "n_vectors": int(w.n_fit), "L": L, "dim": int(w.proj.shape[0]),
        "shrinkage": float(w.shrinkage)})

    t = time.perf_counter()
    D = w.proj.shape[0]
    g = store.arrays
    P = store.config.partition_size
    for k in VECTOR_KINDS:
        g.create_array(k, shape=(max(store.n_images, 1), D), chunks=(P, D), dtype="float32",
                       fill_value=0.0, overwrite=True)
    w_future = client.scatter(w, broadcast=True)
    futures = [client.submit(partition_vectors, store, p, w_future, L, pure=False, retries=2)
               for p in range(store.n_partitions)]
    _wait(futures, "vectors", progress)
    timings["vectors_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ranges = shard_ranges(store, shard_rows)
    for k in VECTOR_KINDS:
        shards = [client.submit(build_shard_file, store, k, i, a, b, index_kind, pure=False, retries=2)
                  for i, (a, b) in enumerate(ranges)]
        wait(shards)
        write_manifest(store.path / "index" / k, [f.result() for f in shards],
                       {"vectors": k, "whitening": fitted_on})
    timings["faiss_s"] = time.perf_counter() - t
    info = {"store": str(store.path), "whitening": fitted_on, "L": L, "dim": int(D),
            "shards": len(ranges), "index_kind": index_kind,
            "timings": {k: round(v, 3) for k, v in timings.items()}}
    store.update_manifest(index=info)
    return info


def _wait(futures, desc: str, progress: bool) -> None:
    from distributed import as_completed
    from tqdm import tqdm

    with tqdm(total=len(futures), desc=desc, unit="part", disable=not progress, file=sys.stderr) as bar:
        for f in as_completed(futures):
            f.result()
            bar.update(1)


def load_whitening(store: Store) -> wh.Whitening:
    """The whitening saved in ``store`` by `rmac index`."""
    mean, proj, eigvals, attrs = store.load_whitening()
    return wh.Whitening(mean=mean, proj=proj, eigvals=eigvals, n_fit=int(attrs.get("n_vectors", 0)),
                        shrinkage=float(attrs.get("shrinkage", 0.0)))


def require_indexed(store: Store) -> dict:
    info = store.manifest.get("index")
    if not info:
        raise StoreError(f"{store.path} was never indexed: run `rmac index {store.path}` first")
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rmac.workflows.args import existing_dir, int_range, positive_int

    parser.add_argument("store", type=existing_dir, help="an extracted store")
    parser.add_argument("--whiten-on", type=existing_dir,
                        help="learn whitening on this other store (the paper: Oxford for Paris)")
    parser.add_argument("--levels-l", dest="L", type=int_range(1, 10), default=DEFAULT_L,
                        help="R-MAC scales L (default 3)")
    parser.add_argument("--dim", type=positive_int, default=DEFAULT_DIM,
                        help="whitened dimensions (default %(default)s)")
    parser.add_argument("--shard-rows", type=positive_int, default=DEFAULT_SHARD_ROWS, help="rows per FAISS shard")
    parser.add_argument("--ivf", action="store_true", help="IVF shards instead of exact inner product")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def main(args: argparse.Namespace, client) -> int:
    import json

    store = Store(args.store)
    other = Store(args.whiten_on) if args.whiten_on else None
    info = build_index(store, client, other, args.L, args.dim, args.shard_rows, "ivf" if args.ivf else "flat")
    print(json.dumps(info, indent=1) if args.json else
          f"indexed {store.path}: whitening fitted on {info['whitening']}, {info['dim']}-D, "
          f"{info['shards']} shard(s); {info['timings']}")
    return 0
