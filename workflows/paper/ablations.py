"""Section 8 of the paper: the alternatives it argues against, on the same stored maps.

- **Sum-pooling** instead of max-pooling, for R-MAC and AML (sum-pooling is integral max-pooling with
  alpha = 1): regional vectors are region sums, the whitening is fitted on them (same images, same
  dimension as the main whitening), the database and query R-MACs are built from them, and AML
  localises and re-scores with alpha = 1 (the query's localisation vector is its summed crop).
  The max-pooling side of the comparison is the main evaluation; the same pipeline run with
  ``pooling="max"`` reproduces it exactly (tests/test_paper.py), so the two differ only in the pooling.
- **Regional cross-matching** (Razavian et al. 2014b) instead of R-MAC: the whitened regional vectors
  are kept apart and an image scores the sum over the query's regions of the best cosine with its
  regions; as filtering, then with AML re-ranking (R-MAC variant) of its top N. Memory: |R| vectors of
  D floats per image instead of one.

Every pass over the database is one Dask task per store partition (maps read once per partition);
the sum-pooling whitening is a `dask.bag` tree reduction of per-partition statistics, like
`rmac index`.
"""
from __future__ import annotations

from collections import defaultdict
from functools import reduce

import numpy as np

from rmac.ops import whitening as wh
from rmac.ops.crossmatch import crossmatch_scores
from rmac.ops.integral import ALPHA
from rmac.ops.pooling import l2n, regional_mac, regional_sum, rmac_aggregate, rmac_aggregate_many
from rmac.ops.quantise import dequantise
from rmac.ops.regions import rmac_regions
from rmac.ops.rerank import query_expansion, rerank, rescore
from rmac.storage.store import Store
from rmac.workflows.evaluate import Evaluation, full_ranking, score
from rmac.workflows.paper.runner import Run
from rmac.workflows.paper.table1_rmac import metric
from rmac.workflows.search import SearchParams, query_maps, rerank_many

POOLING_ALPHA = {"max": ALPHA, "sum": 1}


def pooled_regions(x: np.ndarray, L: int, pooling: str) -> np.ndarray:
    """Regional vectors (R, K) of float maps `x` over the R-MAC grid, max- or sum-pooled."""
    _, h, w = x.shape
    regions = rmac_regions(w, h, L)
    return regional_sum(x, regions) if pooling == "sum" else regional_mac(x, regions)


def _valid_rows(store: Store, p: int, subset: np.ndarray | None = None) -> list[int]:
    part = store.partition_rows(p)
    rows = [r for r, ok in zip(part, store.valid_rows(part)) if ok]
    return [r for r in rows if subset is None or subset[r]]


def pooled_stats(store: Store, parts: list[int], L: int, pooling: str, subset: np.ndarray | None) -> wh.WhiteningStats:
    """Whitening statistics of the l2-normalised regional vectors of partitions ``parts`` (a task)."""
    stats = wh.empty(store.config.channels)
    for p in parts:
        for q, sc in store.read_maps(_valid_rows(store, p, subset)):
            stats = wh.merge(stats, wh.stats(l2n(pooled_regions(dequantise(q, sc), L, pooling))))
    return stats


def fit_pooled_whitening(client, store: Store, L: int, pooling: str, dim: int,
                         subset: np.ndarray | None = None, split_every: int = 8) -> wh.Whitening:
    """PCA-whitening of ``pooling``-pooled regional vectors: a tree reduction, as `rmac index` fits its own."""
    import dask.bag as db

    parts = list(range(store.n_partitions))
    bag = db.from_sequence(parts, npartitions=len(parts))
    total = bag.reduction(lambda ps: pooled_stats(store, list(ps), L, pooling, subset),
                          lambda items: reduce(wh.merge, items), split_every=split_every)
    return wh.fit(client.compute(total).result(), dim=dim)


def pooled_vectors(store: Store, p: int, L: int, pooling: str, whitening: wh.Whitening) -> tuple[list[int], np.ndarray]:
    """R-MAC rows of partition ``p`` from ``pooling``-pooled regions (a task)."""
    rows = _valid_rows(store, p)
    if not rows:
        return rows, np.zeros((0, whitening.dim), np.float32)
    regional = [pooled_regions(dequantise(q, sc), L, pooling) for q, sc in store.read_maps(rows)]
    offsets = np.cumsum([0] + [len(r) for r in regional])
    return rows, rmac_aggregate_many(np.concatenate(regional), offsets, whitening)


def rerank_pooled(store: Store, jobs: list[tuple], whitening: wh.Whitening, L: int, pooling: str,
                  t: int = 3, s: float = 1.1) -> list[tuple[np.ndarray, np.ndarray]]:
    """AML re-ranking (R-MAC variant) of each job's rows of one partition (a task): max-pooling takes the
    stored maps' LUT path (alpha = 10, as `rmac search`), sum-pooling the float path with alpha = 1.
    ``jobs``: (localisation vector, query aspect, query R-MAC, rows). Returns (scores, vectors) per job."""
    span = sorted({r for *_, rows in jobs for r in rows})
    stored = dict(zip(span, store.read_maps(span)))  # row -> (uint8 (K, h, w), scale)
    out = []
    for q_loc, aspect, q_rmac, rows in jobs:
        maps = [stored[r][0] if pooling == "max" else dequantise(*stored[r]) for r in rows]
        res = rerank(maps, q_loc, aspect, q_rmac=q_rmac, whitening=whitening, L=L,
                     levels=store.config.levels, alpha=POOLING_ALPHA[pooling], t=t, s=s)
        out.append((res.scores, res.vectors))
    return out


def _by_partition(store: Store, rows_per_query: list[np.ndarray]) -> dict[int, list[tuple[int, list[int]]]]:
    groups: dict[int, list[tuple[int, list[int]]]] = defaultdict(list)
    for qi, rows in enumerate(rows_per_query):
        per: dict[int, list[int]] = defaultdict(list)
        for r in np.asarray(rows).tolist():
            per[store.partition_of(r)].append(r)
        for p, rs in per.items():
            groups[p].append((qi, rs))
    return groups


def _rank(filter_scores: np.ndarray, top_n: int, rerank_scores: dict[int, float] | None) -> np.ndarray:
    """Rows by filter score, the top ``top_n`` re-ordered by their re-ranking scores."""
    order = np.argsort(-filter_scores, kind="stable")
    if not rerank_scores:
        return order
    top = order[:top_n]
    s = np.array([rerank_scores[int(r)] for r in top])
    return np.concatenate([top[np.argsort(-s, kind="stable")], order[top_n:]])


def _query_maps(run: Run, ev: Evaluation) -> list[np.ndarray]:
    s = run.settings
    futures = [run.client.submit(query_maps, str(ev.dataset.image_paths[q.image]), q.bbox, s.choice, s.max_size,
                                 pure=False) for q in ev.dataset.queries]
    return [f.result()[0] for f in futures]


def pooling_pipeline(run: Run, ev: Evaluation, pooling: str, whitening: wh.Whitening | None = None,
                     qmaps: list[np.ndarray] | None = None) -> dict:
    """R-MAC filtering, R-MAC+AML and R-MAC+AML+QE with ``pooling`` on the main store; the whitening is
    fitted on the main whitening's images unless given."""
    s, client = run.settings, run.client
    st = ev.db.stores[0]
    if whitening is None:
        source, subset = run.whitening_rows(ev)
        whitening = fit_pooled_whitening(client, source, s.L, pooling, ev.db.whitening.dim, subset)
    w = client.scatter(whitening, broadcast=True, hash=False)
    V = np.zeros((st.n_images, whitening.dim), np.float32)
    for f in [client.submit(pooled_vectors, st, p, s.L, pooling, w, pure=False) for p in range(st.n_partitions)]:
        rows, vecs = f.result()
        V[rows] = vecs
    valid = st.valid_rows()
    qmaps = qmaps if qmaps is not None else _query_maps(run, ev)
    q_rmac = [rmac_aggregate(pooled_regions(m, s.L, pooling), whitening) for m in qmaps]
    q_loc = [l2n(m.reshape(m.shape[0], -1).sum(axis=1)) if pooling == "sum" else l2n(m.max(axis=(1, 2)))
             for m in qmaps]
    filt = [np.where(valid, V @ q, -np.inf) for q in q_rmac]
    n = min(s.top_n, int(valid.sum()))
    tops = [np.argsort(-f, kind="stable")[:n] for f in filt]
    groups = _by_partition(st, tops)
    futures = {p: client.submit(rerank_pooled, st, [(q_loc[qi], ev.queries[qi].aspect, q_rmac[qi], rs)
                                                    for qi, rs in members], w, s.L, pooling, pure=False)
               for p, members in groups.items()}
    got: list[dict[int, tuple[float, np.ndarray]]] = [{} for _ in qmaps]
    for p, fut in futures.items():
        for (qi, rs), (scores, vecs) in zip(groups[p], fut.result()):
            for r, sc, v in zip(rs, scores, vecs):
                got[qi][r] = (float(sc), v)
    gnd = ev.dataset.gnd({i: r for r, i in enumerate(st.ids)})
    rankings = {"rmac": [], "rmac+aml": [], "rmac+aml+qe": []}
    for qi in range(len(qmaps)):
        rankings["rmac"].append(_rank(filt[qi], n, None))
        rer = _rank(filt[qi], n, {r: v[0] for r, v in got[qi].items()})
        rankings["rmac+aml"].append(rer)
        top = tops[qi]
        vecs = np.stack([got[qi][int(r)][1] for r in top]) if n else np.zeros((0, whitening.dim), np.float32)
        order = np.argsort(-np.array([got[qi][int(r)][0] for r in top]), kind="stable")
        qe_scores = rescore(query_expansion(q_rmac[qi], vecs, order, k=s.qe), vecs) if n else np.zeros(0)
        rankings["rmac+aml+qe"].append(_rank(filt[qi], n, dict(zip(top.tolist(), qe_scores.tolist()))))
    return {m: score(np.stack([full_ranking(r, st.n_images) for r in rs], axis=1), gnd, ev.dataset.revisited)
            for m, rs in rankings.items()}


def crossmatch_partition(store: Store, p: int, L: int, whitening: wh.Whitening,
                         q_regions: list[np.ndarray]) -> tuple[list[int], np.ndarray, list[int]]:
    """Cross-matching scores (queries x rows) of partition ``p``'s images and their region counts (a task)."""
    rows = _valid_rows(store, p)
    if not rows:
        return rows, np.zeros((len(q_regions), 0)), []
    regional = [l2n(wh.apply(whitening, l2n(pooled_regions(dequantise(q, sc), L, "max"))))
                for q, sc in store.read_maps(rows)]
    offsets = np.cumsum([0] + [len(r) for r in regional])
    allr = np.concatenate(regional)
    return rows, np.stack([crossmatch_scores(qr, allr, offsets) for qr in q_regions]), [len(r) for r in regional]


def crossmatch(run: Run, ev: Evaluation, qmaps: list[np.ndarray]) -> dict:
    """Regional cross-matching as filtering, then with AML (R-MAC variant) on its top N; memory per image."""
    s, client = run.settings, run.client
    st, w = ev.db.stores[0], ev.db.whitening
    q_regions = [l2n(wh.apply(w, l2n(pooled_regions(m, s.L, "max")))) for m in qmaps]
    S = np.full((len(qmaps), st.n_images), -np.inf)
    counts = []
    wf = client.scatter(w, broadcast=True, hash=False)
    for f in [client.submit(crossmatch_partition, st, p, s.L, wf, q_regions, pure=False)
              for p in range(st.n_partitions)]:
        rows, sc, cnt = f.result()
        S[:, rows] = sc
        counts += cnt
    n = min(s.top_n, len(counts))
    tops = [np.argsort(-S[qi], kind="stable")[:n] for qi in range(len(qmaps))]
    params = SearchParams(filter="rmac", top_n=n, L=s.L, qe=0)
    got = rerank_many(ev.db, client, ev.queries, tops, params) if n else [{} for _ in qmaps]
    gnd = ev.dataset.gnd({i: r for r, i in enumerate(st.ids)})
    res = {}
    for name, rr in (("crossmatch", None), ("crossmatch+aml", got)):
        ranks = [_rank(S[qi], n, {g: v[0] for g, v in rr[qi].items()} if rr else None) for qi in range(len(qmaps))]
        res[name] = score(np.stack([full_ranking(r, st.n_images) for r in ranks], axis=1), gnd, ev.dataset.revisited)
    D = w.dim
    mean_r = float(np.mean(counts))
    res["memory"] = {"dim": D, "regions_per_image_mean": mean_r,
                     "query_regions_mean": float(np.mean([len(q) for q in q_regions])),
                     "bytes_per_image_rmac": 4 * D, "bytes_per_image_crossmatch": 4 * D * mean_r,
                     "factor": mean_r,
                     "inner_products_per_image": float(np.mean([len(q) for q in q_regions])) * mean_r}
    return res


def run(run: Run) -> dict:
    s = run.settings
    ev, cmd = run.main()
    qmaps = _query_maps(run, ev)
    summed = pooling_pipeline(run, ev, "sum", qmaps=qmaps)
    cm = crossmatch(run, ev, qmaps)
    main = ev.result["methods"]
    return {
        "sum_pooling": {m: v for m, v in summed.items()},
        "max_pooling": {m: main[m] for m in ("rmac", "rmac+aml", "rmac+aml+qe")},
        "crossmatch": {k: cm[k] for k in ("crossmatch", "crossmatch+aml")},
        "rmac": main["rmac"], "rmac+aml": main["rmac+aml"],
        "memory": cm["memory"],
        "summary": {"sum": {m: metric(v) for m, v in summed.items()},
                    "max": {m: metric(main[m]) for m in ("rmac", "rmac+aml", "rmac+aml+qe")},
                    "crossmatch": metric(cm["crossmatch"]), "crossmatch+aml": metric(cm["crossmatch+aml"])},
        "provenance": {"command": s.command() + "  # section ablations",
                       "function": "rmac.workflows.paper.ablations.pooling_pipeline(pooling='sum') and "
                                   "crossmatch(); max-pooling figures from: " + cmd,
                       "settings": {"L": s.L, "top_n": s.top_n, "qe": s.qe, "max_size": s.max_size,
                                    "alpha_sum": 1, "alpha_max": ALPHA, "t": 3, "s": 1.1}},
    }
