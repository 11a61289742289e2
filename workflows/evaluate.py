"""`rmac evaluate`: extract (cached in a store), index, and score every method on a dataset.

Methods (the paper's Table 2 / Figure 4): ``mac`` and ``rmac`` (filtering only), ``mac+aml`` and
``rmac+aml`` (AML re-ranking of the top N with the MAC / R-MAC localised similarity), ``rmac+aml+qe``.
Whitening is never learned on the test queries or their positives: by default it is fitted on the
dataset's distractors (images in no query's ground truth), or on ``--whiten-on STORE`` (the paper
learns Oxford's on Paris and vice versa). ``--distractors STORE`` adds extracted stores to the database.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmac.ops.evaluate import compute_map, compute_map_revisited, iou
from rmac.storage.datasets import Dataset, DatasetError, load_dataset
from rmac.storage.store import Store
from rmac.workflows.args import existing_dir, new_or_existing_dir, nonnegative_int, positive_int, writable_file
from rmac.workflows.errors import UsageError
from rmac.workflows.extract import ModelChoice, add_model_arguments, extract
from rmac.workflows.index import DEFAULT_DIM, DEFAULT_L, DIM_HELP, build_index, load_whitenings
from rmac.workflows.search import (Database, QueryVectors, Ranking, SearchParams, add_filter_arguments,
                                   add_query_scales_argument, answer, describe_at_scales, localise_exhaustive,
                                   query_maps, query_vectors, rerank_many)

METHODS = {
    "mac": SearchParams(filter="mac", rerank=False, qe=0),
    "rmac": SearchParams(filter="rmac", rerank=False, qe=0),
    "mac+aml": SearchParams(filter="mac", rerank=True, qe=0),
    "rmac+aml": SearchParams(filter="rmac", rerank=True, qe=0),
    "rmac+aml+qe": SearchParams(filter="rmac", rerank=True, qe=5),
}
KAPPAS = (1, 5, 10)


def whitening_subset(ds: Dataset, rows_of: dict[str, int], n: int) -> np.ndarray:
    """Rows of images that are in no query's ground truth and are no query image: the distractors."""
    used = set()
    for q in ds.queries:
        used.update(q.ok, q.junk, q.easy or [], q.hard or [], [q.image])
    mask = np.zeros(n, dtype=bool)
    for i, r in rows_of.items():
        mask[r] = i not in used
    return mask


def default_store(ds: Dataset, choice: ModelChoice, max_size: int) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", ds.name)
    return Path("stores") / f"{name}-{choice.backbone}-{max_size}"


def full_ranking(rows: np.ndarray, n_db: int) -> np.ndarray:
    """``rows`` followed by every other database row (unranked rows keep index order)."""
    rest = np.setdiff1d(np.arange(n_db), rows, assume_unique=False)
    return np.concatenate([rows, rest])


def score(ranks: np.ndarray, gnd: list[dict], revisited: bool) -> dict:
    """mAP and mean precision at 1/5/10, in percent (one entry per protocol when revisited)."""
    def pct(v) -> float | None:  # undefined (no query with a positive) is None: JSON null, never NaN
        v = float(v)
        return round(100 * v, 2) if math.isfinite(v) else None

    def pack(m, pr):
        return {"map": pct(m), **{f"mp@{k}": pct(p) for k, p in zip(KAPPAS, pr)}}

    if revisited:
        res = compute_map_revisited(ranks, gnd, kappas=KAPPAS)
        return {proto: pack(res[proto]["map"], [res[proto][f"mp@{k}"] for k in KAPPAS])
                for proto in ("easy", "medium", "hard")}
    m, _, pr, _ = compute_map(ranks, gnd, kappas=KAPPAS)
    return pack(m, pr)


@dataclass
class Evaluation:
    """The JSON result, plus what a report needs: the dataset, the database and every ranking."""

    result: dict
    dataset: Dataset
    db: Database
    rankings: dict[str, list[Ranking]]
    queries: list[QueryVectors]


def evaluate(dataset: str, client, choice: ModelChoice = ModelChoice(), max_size: int = 1024,
             store: str | None = None, distractors: tuple[str, ...] = (), whiten_on: str | None = None,
             top_n: int = 1000, methods: tuple[str, ...] = tuple(METHODS), rank_depth: int = 10_000,
             L: int = DEFAULT_L, qe: int = 5, progress: bool = True, allow_unknown: bool = False,
             nprobe: int | None = None, query_scales: tuple[float, ...] = (1.0,),
             k_factor: float | None = None, dim: int | None = None) -> Evaluation:
    """Evaluate ``methods`` on ``dataset``; the result holds mAP in percent (None where undefined: no
    query has a positive). ``query_scales`` other than ``(1.0,)``: multi-scale localisation in the
    re-ranking (`SearchParams.query_scales`). ``dim``: whitened dimensions (default D = K, as the paper).
    Ground truth naming images outside the dataset raises `DatasetError`, or
    with ``allow_unknown`` is dropped with a warning (their number is in the result's ``unknown_gt``)."""
    if choice.random_weights:
        raise SystemExit("rmac evaluate: random weights are for speed benchmarks only")
    ds = load_dataset(dataset)
    if not ds.queries or not ds.images:
        raise DatasetError(f"dataset {ds.name} has {len(ds.images)} images and {len(ds.queries)} queries: "
                           "nothing to evaluate")
    unknown = ds.unknown_ids()
    if unknown and not allow_unknown:
        raise DatasetError(f"the ground truth names {len(unknown)} image(s) not in the dataset "
                           f"{ds.name}: {_some(unknown)} (fix it, or pass --allow-unknown to drop them)")
    if unknown:
        print(f"rmac evaluate: warning: dropped {len(unknown)} ground-truth image(s) not in the dataset: "
              f"{_some(unknown)}", file=sys.stderr)
        ds.drop_unknown()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    store_path = Path(store) if store else default_store(ds, choice, max_size)
    summary = extract([(i, str(ds.image_paths[i])) for i in ds.images], str(store_path), client, choice,
                      max_size, progress=progress)
    timings["extract_s"] = time.perf_counter() - t
    st = Store(store_path)
    rows_of = {i: r for r, i in enumerate(st.ids)}

    t = time.perf_counter()
    if whiten_on:
        label = whiten_on
        build_index(st, client, whiten_on=Store(whiten_on), L=L, dim=dim, whiten_label=label, progress=progress)
    else:
        subset = whitening_subset(ds, rows_of, st.n_images) & st.valid_rows()
        label = f"{ds.name} distractors ({int(subset.sum())} images, no query or positive)"
        build_index(st, client, L=L, dim=dim, whiten_subset=subset, whiten_label=label, progress=progress)
    w = load_whitenings(st)
    extra = [Store(p) for p in distractors]
    for d in extra:
        build_index(d, client, L=L, whitening=w, whiten_label=label, progress=progress)
    timings["index_s"] = time.perf_counter() - t

    db = Database([st, *extra]).scatter_filtering(client)
    t = time.perf_counter()
    futures = [client.submit(query_maps, str(ds.image_paths[q.image]), q.bbox, choice, max_size, pure=False)
               for q in ds.queries]
    qvs = []
    for f in futures:
        maps, hw, bbox = f.result()
        qvs.append(query_vectors(maps, w, L, hw, bbox))
    if any(METHODS[m].rerank for m in methods):
        qvs = describe_at_scales(client, qvs, [str(ds.image_paths[q.image]) for q in ds.queries], choice, max_size,
                                 query_scales, w, L)
    timings["queries_s"] = time.perf_counter() - t

    gnd = ds.gnd(rows_of)
    n_db = db.n_images
    depth = min(n_db, max(rank_depth, top_n))
    w_future = client.scatter(w, broadcast=True, hash=False)
    results, reranked, per_method = {}, {}, {}
    for name in methods:
        base = METHODS[name]
        params = SearchParams(**{**base.__dict__, "top_n": top_n, "L": L, "qe": qe if base.qe else 0,
                                 "nprobe": nprobe, "k_factor": k_factor,
                                 "query_scales": tuple(query_scales)})
        t = time.perf_counter()
        key = params.filter
        if params.rerank and key not in reranked:  # one scattered pass for all queries, reused with QE
            _, top = db.filter("rmac" if key == "rmac" else "macw",
                               np.stack([qv.rmac if key == "rmac" else qv.macw for qv in qvs]), top_n, nprobe,
                               k_factor)
            reranked[key] = rerank_many(db, client, qvs, [r[r >= 0] for r in top], params, w_future)
        ranked = [answer(db, client, qv, params, w_future, k=depth,
                         reranked=reranked[key][i] if params.rerank else None)
                  for i, qv in enumerate(qvs)]
        timings[f"{name}_s"] = time.perf_counter() - t
        ranks = np.stack([full_ranking(r.rows, n_db) for r in ranked], axis=1)
        results[name] = score(ranks, gnd, ds.revisited)
        per_method[name] = ranked
    out = {
        "dataset": ds.name, "backbone": choice.backbone, "max_size": max_size, "whitening": label,
        "dim": int(w.regional.proj.shape[0]),
        "n_images": n_db, "n_queries": len(ds.queries), "top_n": top_n, "qe": qe,
        "query_scales": list(query_scales), "methods": results,
        "unknown_gt": len(unknown),
        "extract": {k: summary[k] for k in ("done", "failed", "map_bytes_per_image")},
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    if any(q.boxes for q in ds.queries) and "rmac+aml" in methods:
        out["localisation"] = localisation(ds, db, client, qvs, reranked.get("rmac", []), rows_of, w_future,
                                           SearchParams().scale_pick, L)
    return Evaluation(result=out, dataset=ds, db=db, rankings=per_method, queries=qvs)


def localisation_pairs(ds: Dataset, rows_of: dict) -> list[tuple[int, int, tuple, bool]]:
    """Every (query index, database row, true pixel box, is a self-paste of that query's photo) of the
    positives with a known box that the store holds."""
    from rmac.workflows.views import QUERY_SUFFIX, self_paste_source

    pairs = []
    for i, q in enumerate(ds.queries):
        photo = q.image.removesuffix(QUERY_SUFFIX)
        for img, true_box in (q.boxes or {}).items():
            if img in rows_of:
                pairs.append((i, rows_of[img], tuple(true_box), self_paste_source(img) == photo))
    return pairs


def localisation(ds: Dataset, db: Database, client, qvs, reranked: list[dict], rows_of: dict, whitening=None,
                 scale_pick: str = "aml", L: int = DEFAULT_L) -> dict:
    """Mean IoU with the true boxes of the AML box (from R-MAC re-ranking) and of the exhaustive optimum,
    over every (query, positive) pair with a known box (the paper's Section 8); reported apart for
    self-pastes (the query photo itself pasted, `rmac make-views --self-pastes`: the true box is exactly
    what the query shows) and for other positives, with the share of self-pastes at IoU >= 0.5.
    With query scales, the exhaustive optimum is each scale's, picked among the scales by the rule that
    picks AML's window (`SearchParams.scale_pick`)."""
    pairs = localisation_pairs(ds, rows_of)
    futures = [client.submit(localise_exhaustive, db.stores[0], row, qvs[i], whitening, scale_pick, L, pure=False)
               for i, row, _, _ in pairs]
    groups: dict[str, dict[str, list[float]]] = {g: {"aml": [], "exhaustive": []} for g in ("all", "self", "other")}
    for (i, row, true_box, is_self), f in zip(pairs, futures):
        got = reranked[i] if reranked else {}
        for g in ("all", "self" if is_self else "other"):
            if row in got:
                groups[g]["aml"].append(iou(got[row][1], true_box))
            groups[g]["exhaustive"].append(iou(f.result(), true_box))

    def pct(v: list[float]):
        return round(100 * float(np.mean(v)), 2) if v else None

    def hits(v: list[float]):
        return round(100 * float(np.mean(np.asarray(v) >= 0.5)), 2) if v else None

    out = {"pairs": len(pairs), "aml_pairs": len(groups["all"]["aml"]),
           "iou_aml": pct(groups["all"]["aml"]), "iou_exhaustive": pct(groups["all"]["exhaustive"])}
    for g in ("self", "other"):
        d = groups[g]
        out[g] = {"pairs": len(d["exhaustive"]), "aml_pairs": len(d["aml"]), "iou_aml": pct(d["aml"]),
                  "iou_exhaustive": pct(d["exhaustive"])}
    out["self"].update(iou50_aml=hits(groups["self"]["aml"]), iou50_exhaustive=hits(groups["self"]["exhaustive"]))
    return out


def _some(ids: list[str], n: int = 5) -> str:
    return ", ".join(map(repr, ids[:n])) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def _pct(v: float | None) -> str:
    return "   n/a" if v is None else f"{v:6.2f}"


def to_json(res: dict) -> str:
    """The result as strict JSON: a non-finite number anywhere is written as null, never NaN."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(res), indent=1, allow_nan=False)


def print_table(res: dict) -> None:
    print(f"{res['dataset']}: {res['n_images']} images, {res['n_queries']} queries, {res['backbone']} "
          f"@ {res['max_size']} px; whitening ({res.get('dim', '?')}-D): {res['whitening']}")
    for name, m in res["methods"].items():
        if "map" in m:
            print(f"  {name:<13} mAP {_pct(m['map'])}  mP@1 {_pct(m['mp@1'])}  mP@5 {_pct(m['mp@5'])}  "
                  f"mP@10 {_pct(m['mp@10'])}")
        else:
            print(f"  {name:<13} " + "  ".join(f"{p} mAP {_pct(v['map'])}" for p, v in m.items()))
    if res.get("localisation"):
        loc = res["localisation"]
        print(f"  localisation IoU with true boxes: AML {loc['iou_aml']}  exhaustive {loc['iou_exhaustive']} "
              f"({loc['pairs']} pairs)")
        for g, what in (("self", "self-pastes"), ("other", "other positives")):
            d = loc.get(g) or {}
            if d.get("pairs"):
                extra = (f"; IoU >= 0.5: AML {d['iou50_aml']}% exhaustive {d['iou50_exhaustive']}%"
                         if g == "self" else "")
                print(f"    {what:<16} AML {d['iou_aml']}  exhaustive {d['iou_exhaustive']} ({d['pairs']} pairs){extra}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="Oxford-format folder (gt/ + jpg/), revisited .pkl, or dataset .json")
    parser.add_argument("--store", type=new_or_existing_dir,
                        help="where the dataset's features are cached (default stores/NAME-...)")
    add_model_arguments(parser)
    parser.add_argument("--distractors", action="append", default=[], type=existing_dir,
                        help="extracted distractor store")
    parser.add_argument("--whiten-on", type=existing_dir,
                        help="fit whitening on this store instead of the dataset's distractors")
    parser.add_argument("--top-n", type=positive_int, default=1000, help="images re-ranked per query")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of methods")
    parser.add_argument("--qe", type=nonnegative_int, default=5, help="top re-ranked images merged by QE (default 5)")
    parser.add_argument("--dim", type=positive_int, default=DEFAULT_DIM, help=DIM_HELP)
    add_filter_arguments(parser)
    add_query_scales_argument(parser)
    parser.add_argument("--json", dest="json_out", type=writable_file, help="write the result as JSON to this file")
    parser.add_argument("--allow-unknown", action="store_true",
                        help="drop ground-truth images that are not in the dataset (with a warning) instead of "
                             "refusing the dataset")


def main(args: argparse.Namespace, client) -> int:
    choice = ModelChoice(args.backbone, args.weights, args.random_weights)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    res = evaluate(args.dataset, client, choice, args.max_size, args.store, tuple(args.distractors),
                   args.whiten_on, args.top_n, methods, qe=args.qe, allow_unknown=args.allow_unknown,
                   nprobe=args.nprobe, k_factor=args.k_factor, query_scales=args.query_scales,
                   dim=args.dim).result
    print_table(res)
    if args.json_out:
        Path(args.json_out).write_text(to_json(res))
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0
