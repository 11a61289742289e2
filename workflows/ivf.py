"""Approximate filtering at scale (IVF and pq): train once on a sample, add per shard in parallel.

`rmac index --ivf` used to train k-means on every shard separately (each shard its own lists, and
training cost times the number of shards). Here one Dask task trains an empty IVF index on a sample
of the store's vectors (whole partitions drawn at random, so the read is a few contiguous slices) and
saves it as ``index/ivf/<kind>/ivf_template.faiss`` (beside the committed shard folders); every
shard task then copies the template and adds its own rows (`rmac.storage.index.build_shard(template=...)`). All shards share the same lists, so one
``nprobe`` means the same thing everywhere.

Choice of the index (FAISS guidelines, measured by `rmac bench scale`): ``nlist`` about 4 sqrt(N)
(4096 at 1M, never under 39 vectors per list), trained on at most 64 x nlist vectors; lists hold the vectors uncompressed
(``IVF{nlist},Flat``, exact scores inside the probed lists) or with 8-bit scalar quantisation
(``IVF{nlist},SQ8``, a quarter of the memory: 1M x 1280-D is 1.3 GB instead of 5 GB).

IVF loses the deep neighbours that a top 1000 needs: at 100k (D = 1280) a quarter of the lists gave
recall@1000 0.83-0.89 (docs/benchmarks.md). The "pq" index reaches 0.98 there and at 1M: no partition at all,
every row scanned as a 4-bit product-quantisation code with FAISS's SIMD fast-scan (``M = D/2``
sub-quantisers, D/4 bytes a row), and the best ``k_factor x k`` re-scored with 8-bit scalar-quantised
vectors (``PQ{M}x4fs,Refine(SQ8)``; D + D/4 bytes a row: 1.6 GB at 1M x 1280 against 5.1 GB flat).
``rmac index --index-type pq --nlist N`` puts N IVF lists in front of codes of the same size, each row
coded as its residual from its list's centroid (``IVF{N},PQ{M}x4fsr,Refine(SQ8)``, ``nprobe`` stored as
3/8 of the lists). The real query crops' deep neighbours are spread over many lists: with codes of the
rows themselves (FAISS's ``x4fs``, used until residuals were measured) 1024 lists at nprobe 64-128 kept only
0.79-0.88 of the top 1000 at 1M, and 256 lists needed nprobe 160 (5/8) for 0.964 in ~4/5 of plain pq's
time. Residual codes rank the candidates better for the same bytes and scan, which pays most with finer
lists: on one 500k-row shard of the 1M store (one thread, interleaved) 1024 lists at nprobe 384 keep 0.961
in 8.9 ms where 256 lists at nprobe 160 keep 0.959 in 13.2 ms; through the system at 1M x 1280 (two
shards, 2 workers) 0.956 in 0.61-0.67 of plain pq's time, measured in the same runs (docs/benchmarks.md).
Plain pq stays the default.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rmac.storage.store import Store

CODECS = ("flat", "sq8")
POINTS_PER_LIST = 64
PQ_TRAIN = 65_536  # training vectors of a pq template (its codebooks have 16 centroids each)
PQ_NPROBE_SHARE = 3 / 8  # of the lists in front of pq codes (residual codes): recall@1000 0.96 with 1024 lists on a
# 500k-row 1M shard (5/16: 0.954; 256 lists need 5/8 for the same); docs/benchmarks.md
PQ_K_FACTOR = 4.0  # stored in the template: recall@1000 0.98 at 100k and at 1M (2 shards of 500k), ~1-2 ms more
# than k_factor 2 (0.90 / 0.94); docs/benchmarks.md
TEMPLATE = "ivf_template.faiss"


def default_nlist(n: int) -> int:
    """About 4 sqrt(n), a power of two between 16 and 16384 (the FAISS guidelines' range), with at
    least 39 vectors per list (k-means' minimum): 256 at 10k, 1024 at 100k, 4096 at 1M."""
    nlist = 2 ** int(np.round(np.log2(4 * np.sqrt(max(n, 1)))))
    while nlist > 16 and nlist * 39 > n:
        nlist //= 2
    return int(min(16384, max(16, nlist)))


def sample_rows(store: Store, kind: str, size: int, seed: int = 0) -> np.ndarray:
    """About ``size`` valid vectors of ``kind``, from whole partitions drawn at random."""
    from rmac.storage.index import valid_rows

    rng = np.random.default_rng(seed)
    arr = store.arrays[kind]
    out, got = [], 0
    for p in rng.permutation(store.n_partitions).tolist():
        rows = store.partition_rows(p)
        x = arr[rows.start:rows.stop]
        x = x[valid_rows(x) & store.valid_rows(rows)]
        out.append(x)
        got += len(x)
        if got >= size:
            break
    return np.concatenate(out)[:size] if out else np.zeros((0, arr.shape[1]), np.float32)


def pq_factory(d: int, m: int | None = None, nlist: int | None = None, dim: int | None = None) -> str:
    """The FAISS factory string of a pq index over ``d``-D vectors: ``m`` sub-quantisers (default: two
    dimensions each; an odd dimension gets one each), behind ``nlist`` IVF lists if given (then coding
    each row's residual from its list's centroid). ``dim``: the
    codes are of the vectors projected on their top ``dim`` principal axes (``PCA{dim}``, made uncentred
    by `train_uncentred_pca`); the candidates are still re-scored with the whole ``d``-D vectors."""
    scan = int(dim or d)
    if not 1 <= scan <= d:
        raise ValueError(f"--pq-dim {dim} must be in 1..{d}")
    m = int(m or (scan // 2 if scan % 2 == 0 else scan))
    if scan % m:
        raise ValueError(f"--pq-m {m} must divide the dimension scanned, {scan}")
    pca = f"PCA{scan}," if dim and scan < d else ""
    if not nlist:
        return f"IDMap,{pca}PQ{m}x4fs,Refine(SQ8)"
    # behind lists the codes are of each row's residual from its list's centroid (FAISS's "x4fsr"):
    # finer codes for the same bytes and the same scan (inner products split into centroid + residual)
    return f"IDMap,{pca}IVF{int(nlist)},PQ{m}x4fsr,Refine(SQ8)"


def train_uncentred_pca(index, x: np.ndarray) -> None:
    """Train the ``PCA{dim}`` in front of a `pq_factory` index's codes on ``x`` without centring: its axes
    are the top eigenvectors of ``x``'s second moment and nothing is subtracted, so inner products keep
    their meaning (FAISS's own PCA subtracts the mean, which adds ``-<mean, x>`` to each row's score).
    Written by hand into FAISS's PCAMatrix (mean 0), which has no uncentred mode; with fewer samples than
    dimensions the last axes span directions the sample never reaches."""
    import faiss

    pre = faiss.downcast_index(faiss.downcast_index(index.index).base_index)
    pca = faiss.downcast_VectorTransform(pre.chain.at(0))
    moment = np.zeros((pca.d_in, pca.d_in))
    for a in range(0, len(x), 8192):  # float64 sums, 8192 rows at a time (a 1280-D sample is 335 MB already)
        chunk = np.asarray(x[a:a + 8192], dtype=np.float64)
        moment += chunk.T @ chunk
    vals, vecs = np.linalg.eigh(moment / max(len(x), 1))
    order = np.argsort(vals)[::-1]
    faiss.copy_array_to_vector(np.zeros(pca.d_in, np.float32), pca.mean)
    faiss.copy_array_to_vector(np.maximum(vals[order], 0).astype(np.float32), pca.eigenvalues)
    faiss.copy_array_to_vector(np.ascontiguousarray(vecs[:, order].T, dtype=np.float32).ravel(), pca.PCAMat)
    pca.is_trained = True
    pca.prepare_Ab()


def train_pq_template(store: Store, kind: str, m: int | None = None, seed: int = 0, folder: str | None = None,
                      k_factor: float = PQ_K_FACTOR, nlist: int | None = None, dim: int | None = None) -> dict:
    """Train an empty pq index (`pq_factory`, with ``nlist`` IVF lists in front if given, probing `PQ_NPROBE_SHARE` of
    them by default, and codes of ``dim``-D projections if given) on a sample of ``kind`` vectors and save it
    in the index folder (a Dask task, like `train_template`)."""
    import faiss

    from rmac.storage.index import save_shard

    size = max(PQ_TRAIN, POINTS_PER_LIST * int(nlist or 0))
    x = np.ascontiguousarray(sample_rows(store, kind, size, seed), dtype=np.float32)
    nlist = max(1, min(int(nlist), len(x))) if nlist else None
    spec = pq_factory(x.shape[1], m, nlist, dim)
    index = faiss.index_factory(x.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    info = {"factory": spec, "trained_on": int(len(x)), "k_factor": float(k_factor), "file": TEMPLATE}
    if ",PCA" in spec:  # trained first: `index.train` then leaves it as it is
        train_uncentred_pca(index, x)
        info["scan_dim"] = int(dim)
    index.train(x)
    faiss.downcast_index(index.index).k_factor = float(k_factor)
    if nlist:
        info["nlist"] = nlist
        info["nprobe"] = faiss.extract_index_ivf(index).nprobe = max(1, round(nlist * PQ_NPROBE_SHARE))
    folder = Path(folder) if folder else store.path / "index" / kind
    folder.mkdir(parents=True, exist_ok=True)
    save_shard(index, folder / TEMPLATE)
    return info


def train_template(store: Store, kind: str, nlist: int | None = None, codec: str = "flat",
                   seed: int = 0, folder: str | None = None) -> dict:
    """Train an empty IVF index on a sample of ``kind`` vectors and save it in the index folder (a Dask
    task: the sample, at most 64 x nlist vectors, is read here, never on the client)."""
    import faiss

    from rmac.storage.index import save_shard

    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    n = int(store.valid_rows().sum())
    nlist = int(nlist or default_nlist(n))
    x = np.ascontiguousarray(sample_rows(store, kind, POINTS_PER_LIST * nlist, seed), dtype=np.float32)
    nlist = max(1, min(nlist, len(x)))  # FAISS warns below 39 points per list; it still trains
    d = x.shape[1]
    quantiser = faiss.IndexFlatIP(d)
    if codec == "flat":
        index = faiss.IndexIVFFlat(quantiser, d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFScalarQuantizer(quantiser, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True
    index.cp.seed = seed
    index.train(x)
    folder = Path(folder) if folder else store.path / "index" / kind
    folder.mkdir(parents=True, exist_ok=True)
    save_shard(index, folder / TEMPLATE)
    return {"nlist": nlist, "trained_on": int(len(x)), "codec": codec, "file": TEMPLATE}


def build_ivf(client, store: Store, kind: str, template: str | None, ranges: list[tuple[int, int]],
              index_dir: str, meta: dict, index_type: str) -> None:
    """Every shard of ``store`` over ``ranges`` added to ``template`` (IVF, pq) or built as ``index_type``
    (flat, flat16) in parallel, in the folder ``STORE/index_dir/kind``, then the folder's manifest (an
    index beside the committed one: `rmac bench scale` compares several)."""
    from rmac.storage.index import write_manifest
    from rmac.workflows.index import build_shard_file

    futures = [client.submit(build_shard_file, store, kind, i, a, b, index_type, template, index_dir, pure=False,
                             retries=2)
               for i, (a, b) in enumerate(ranges)]
    write_manifest(store.path / index_dir / kind, client.gather(futures), meta)
