"""`rmac demo`: the whole system on the embedded photos, offline, in minutes.

Extracts `rmac.data.LANDMARKS_DEV` with the default backbone on a local Dask cluster, fits whitening on
its distractors, indexes, answers every query with every method (AML re-ranking and QE included),
and writes one self-contained HTML report: the mAP table and each query's top hits with their
localised boxes, positives and negatives marked. Re-running reuses the store.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from rmac.data import LANDMARKS_DEV
from rmac.workflows.evaluate import Evaluation, evaluate, print_table
from rmac.workflows.extract import ModelChoice
from rmac.workflows.args import creatable_file, new_or_existing_dir, positive_int

DEFAULT_STORE = "stores/demo-landmarks-dev"
DEFAULT_REPORT = "reports/demo.html"
SHOWN_METHOD = "rmac+aml+qe"


def report_queries(ev: Evaluation, method: str = SHOWN_METHOD, top: int = 8) -> list[dict]:
    """The report's per-query records (schema in rmac.workflows.report) for ``method``'s rankings."""
    ds, db = ev.dataset, ev.db
    image_hw = [store.arrays["image_hw"][:] for store in db.stores]
    out = []
    for q, qv, ranking in zip(ds.queries, ev.queries, ev.rankings[method]):
        ok, junk = set(q.ok), set(q.junk)
        hits = []
        for rank, (g, s) in enumerate(zip(ranking.rows.tolist(), ranking.scores.tolist())):
            store, r = db.locate(g)
            img = store.ids[r]
            if img in junk:  # junk images are not scored either way; showing them would confuse
                continue
            hits.append({"id": img, "path": store.paths[r], "score": float(s),
                         "box": list(ranking.boxes[g]) if g in ranking.boxes else None,
                         "image_hw": [int(v) for v in image_hw[db.stores.index(store)][r]],
                         "positive": img in ok, "initial_rank": ranking.initial_rank.get(g), "rank": rank})
            if len(hits) == top:
                break
        out.append({"name": q.name, "image": str(ds.image_paths[q.image]), "bbox": list(qv.bbox),
                    "image_hw": list(qv.image_hw), "hits": hits})
    return out


def run_demo(client, store: str = DEFAULT_STORE, report: str = DEFAULT_REPORT, dataset: Path = LANDMARKS_DEV,
             choice: ModelChoice = ModelChoice(), max_size: int = 1024, top: int = 8) -> dict:
    """Run the demo; returns the evaluation result with the report's path."""
    from rmac.workflows.report import write_html_report

    t = time.perf_counter()
    ev = evaluate(str(dataset), client, choice, max_size, store)
    res = ev.result
    queries = report_queries(ev, SHOWN_METHOD, top)
    notes = (f"{res['n_images']} images, {res['n_queries']} queries, {res['backbone']} at {res['max_size']} px. "
             f"Whitening: {res['whitening']}. Hits shown: {SHOWN_METHOD} (AML box in magenta; "
             f"green = positive, red = negative; junk images omitted).")
    write_html_report(report, "rmac demo: landmarks-dev", res["methods"], queries, notes=notes)
    res["report"] = str(Path(report).resolve())
    res["timings"]["total_s"] = round(time.perf_counter() - t, 2)
    return res


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=DEFAULT_STORE, type=new_or_existing_dir,
                        help="feature store (reused; default %(default)s)")
    parser.add_argument("--report", default=DEFAULT_REPORT, type=creatable_file,
                        help="HTML report path (default %(default)s)")
    parser.add_argument("--top", type=positive_int, default=8, help="hits shown per query")


def main(args: argparse.Namespace, client) -> int:
    res = run_demo(client, args.store, args.report, top=args.top)
    print_table(res)
    print(f"timings: {res['timings']}")
    print(f"report: {res['report']}")
    return 0
