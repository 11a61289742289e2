"""Figure 4: mAP against the number N of images re-ranked by AML, for MAC and R-MAC filtering (and
R-MAC with QE), on the dataset and, with `--distractors`, on the dataset plus the distractor stores.

One evaluation re-ranks the largest N; every smaller N re-uses those per-image AML results through
`rmac.workflows.search.answer(..., reranked=...)` (an image's re-ranking score does not depend on N),
so the point at the largest N is exactly the evaluation's own mAP. N = 0 is filtering alone."""
from __future__ import annotations

import numpy as np

from rmac.workflows.evaluate import Evaluation, full_ranking, score
from rmac.workflows.paper.runner import Run
from rmac.workflows.paper.table1_rmac import metric
from rmac.workflows.search import SearchParams, answer

CURVES = ("mac+aml", "rmac+aml", "rmac+aml+qe")


def curve(ev: Evaluation, client, method: str, top_ns, qe: int, L: int, rank_depth: int = 10_000) -> list[dict]:
    """mAP of ``method`` when only the top N of its filtering are re-ranked, for each N."""
    db, ds = ev.db, ev.dataset
    st = db.stores[0]
    gnd = ds.gnd({i: r for r, i in enumerate(st.ids)})
    n_db = db.n_images
    base = {"mac+aml": "mac", "rmac+aml": "rmac", "rmac+aml+qe": "rmac"}[method]
    points = []
    for N in top_ns:
        n = min(int(N), n_db)
        params = SearchParams(filter=base, rerank=n > 0, top_n=n, L=L, qe=qe if method.endswith("+qe") else 0)
        depth = min(n_db, max(rank_depth, n))
        ranked = [answer(db, client, qv, params, k=depth, reranked=r.reranked)
                  for qv, r in zip(ev.queries, ev.rankings[method])]
        ranks = np.stack([full_ranking(r.rows, n_db) for r in ranked], axis=1)
        res = score(ranks, gnd, ds.revisited)
        points.append({"N": int(N), "N_effective": n, "map": metric(res), "scores": res})
    return points


def run(run: Run) -> dict:
    s = run.settings
    settings = [("dataset", ())] + ([("with distractors", tuple(s.distractors))] if s.distractors else [])
    out = {"top_ns": list(s.top_ns), "curves": {}, "provenance": {
        "command": s.command() + "  # section figure4",
        "function": "rmac.workflows.search.answer(top_n=N, reranked=<the evaluation's AML results>) per N",
        "settings": {"top_ns": list(s.top_ns), "L": s.L, "qe": s.qe, "max_size": s.max_size, "t": 3, "s": 1.1}}}
    for label, distractors in settings:
        ev, cmd = run.main(distractors)
        out["curves"][label] = {"n_images": ev.db.n_images, "command": cmd,
                                "methods": {m: curve(ev, run.client, m, s.top_ns, s.qe, s.L) for m in CURVES}}
    return out
