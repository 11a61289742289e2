"""`rmac bench localisation VIEWS --store STORE`: where AML's windows land against exact boxes, and why.

Reads a views dataset with exact boxes (`rmac make-views SRC VIEWS --self-pastes N`) and its store as
`rmac evaluate VIEWS --store STORE` left it (extracted and indexed). For every (query, positive with a
box) pair, self-pastes (the query photo itself pasted) and other positives apart, and for the query
described at each of ``--scales`` (the photo resized by that factor before the box is cut, as
`rmac search --query-scales` does):

- the exhaustive optimum of the AML objective (the cosine of the query's MAC with `f~` of a window,
  every window scored) and AML's window (grid step t, aspect filter s, refinement), their IoU with the
  true box, and the optimum's area over the object's area;
- at scale 1, the objective on the object's own cells (the true box mapped to cells) against the whole
  map, with `f~` and with exact max-pooling: when the whole map scores higher, no search can find the
  object, the objective itself prefers the larger window;
- how a window is picked among the scales: ``scale 1`` (the paper), ``best AML cosine`` (each scale's
  window scored with its own query MAC: `scale_pick="aml"`), ``best re-ranking score`` (each window's
  R-MAC against the scale-1 query R-MAC: `scale_pick="score"`), ``best own-scale R-MAC score`` (each
  window's R-MAC against the R-MAC of the query at the scale that found it: `scale_pick="own"`), two
  probes (``best whitened cosine``: the window's `f~` and the scale's MAC both whitened with the MAC
  whitening; ``best gain over whole map``: the window's AML cosine minus the whole map's, per scale),
  and the ``oracle`` (the scale whose window has the best IoU: the bound on any rule).

Results per object-area bin (share of the scene the true box covers). The product's own path,
`rmac.workflows.search.rerank_scales` (what `rmac search` and `rmac evaluate` run) is run on every map
with each of its rules, as a check of the per-scale figures ("product_path").
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rmac.ops import whitening as wh
from rmac.ops.aml import aml_search, box_to_pixels, exhaustive_search, pixels_to_cells
from rmac.ops.evaluate import iou
from rmac.ops.integral import integral_lut, region_vector, sparse_maps
from rmac.ops.pooling import l2n
from rmac.ops.rerank import localised_rmac
from rmac.workflows.args import existing_dir, existing_file, query_scales

BINS = ((0.0, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 1.01))
# how the window is picked among the query scales -> the per-window key maximised (None: see _pick)
RULES = {"scale 1": None, "best AML cosine": "cosine", "best re-ranking score": "rerank_score",
         "best own-scale R-MAC score": "own_rmac_score", "best whitened cosine": "whitened_cosine",
         "best gain over whole map": "gain", "oracle": "iou"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("views", type=existing_dir, help="a views dataset with exact boxes (rmac make-views)")
    parser.add_argument("--store", type=existing_dir, required=True,
                        help="its store, extracted and indexed (as `rmac evaluate VIEWS --store STORE` leaves it)")
    parser.add_argument("--scales", type=query_scales, default=(1.0, 0.71, 0.5, 0.35),
                        help="query scales compared (default 1,0.71,0.5,0.35; 1 must be one of them)")
    parser.add_argument("--pairs", choices=("all", "self", "other"), default="all",
                        help="which positives to measure: self-pastes, other positives, or all (default; the "
                             "exhaustive search at every scale takes ~1-3 s per pair on 2 cores)")
    parser.add_argument("--weights", type=existing_file, help="weights file, for backbones without an offline package")
    parser.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")


def _pct(v) -> float | None:
    v = [float(x) for x in v]
    return round(100 * float(np.mean(v)), 2) if v else None


def measure(views: str, store_path: str, scales: tuple[float, ...], weights: str | None = None,
            which: str = "all") -> dict:
    """Every pair's windows at every scale (see the module docstring); returns the per-pair records and
    the summary tables."""
    from rmac.storage.datasets import load_dataset
    from rmac.storage.store import Store, StoreError
    from rmac.workflows.errors import UsageError
    from rmac.workflows.evaluate import localisation_pairs
    from rmac.workflows.extract import ModelChoice
    from rmac.workflows.index import DEFAULT_L, load_whitenings, require_indexed
    from rmac.workflows.search import (SearchParams, cell_geometry, query_maps, query_scale_maps, query_vectors,
                                       rerank_scales, with_scales)

    if 1.0 not in scales:
        raise UsageError(f"--scales must include 1 (the paper's scale, the reference), got {scales}")
    ds = load_dataset(views)
    st = Store(store_path)
    try:
        require_indexed(st)
    except StoreError as e:
        raise UsageError(f"{store_path} is not an indexed store of {views} ({e}): run "
                         f"`rmac evaluate {views} --store {store_path}` first") from None
    rows_of = {i: r for r, i in enumerate(st.ids) if i is not None}
    pairs = [p for p in localisation_pairs(ds, rows_of) if which == "all" or p[3] == (which == "self")]
    if not pairs:
        raise UsageError(f"{views} has no positive with an exact box in {store_path}: make it with "
                         "`rmac make-views SRC VIEWS --self-pastes N`")
    cfg = st.config
    choice = ModelChoice(cfg.backbone, weights)
    w = load_whitenings(st)
    qvs = {}
    for qi in sorted({p[0] for p in pairs}):
        q = ds.queries[qi]
        path = str(ds.image_paths[q.image])
        maps, hw, bbox = query_maps(path, q.bbox, choice, cfg.max_size)
        qv = query_vectors(maps, w, DEFAULT_L, hw, bbox)
        qvs[qi] = with_scales(qv, scales, *query_scale_maps(path, bbox, choice, cfg.max_size, scales), w, DEFAULT_L)
    records = []
    for qi, row, true_box, is_self in pairs:
        qv = qvs[qi]
        (qmap, _), = st.read_maps([row])
        ii = integral_lut(qmap, cfg.levels)
        image_hw = tuple(int(v) for v in st.arrays["image_hw"][row])
        geom = cell_geometry(st, image_hw)
        map_hw = qmap.shape[1:]
        area = (true_box[2] - true_box[0]) * (true_box[3] - true_box[1])
        rec = {"query": ds.queries[qi].name, "image": st.ids[row], "self": is_self,
               "object_area": area / (image_hw[0] * image_hw[1]), "scales": list(qv.scales), "per_scale": []}
        whole = (0, 0, map_hw[1], map_hw[0])
        f_whole = l2n(region_vector(ii, whole))
        for j, m in enumerate(qv.localisation_macs()):
            m = m.astype(np.float64)
            wq = l2n(wh.apply(w.mac, m[None].astype(np.float32))[0])
            entry = {"scale": qv.scales[j]}
            for method, found in (("exhaustive", exhaustive_search(ii, m)), ("aml", aml_search(ii, m, qv.aspect))):
                px = box_to_pixels(found.box, map_hw, image_hw, geom)
                f = l2n(region_vector(ii, found.box)).astype(np.float32)
                entry[method] = {"iou": iou(px, true_box), "cosine": found.score,
                                 "gain": found.score - float(f_whole @ l2n(m)),
                                 "whitened_cosine": float(l2n(wh.apply(w.mac, f[None])[0]) @ wq),
                                 "rerank_score": localised_rmac(ii, found.box, qv.rmac, w.regional)[0],
                                 "own_rmac_score": localised_rmac(ii, found.box, qv.scale_rmacs[j], w.regional)[0],
                                 "area_ratio": (px[2] - px[0]) * (px[3] - px[1]) / area}
            rec["per_scale"].append(entry)
        # the product's path on this map: `rerank_scales` with each pick rule
        sp = sparse_maps([qmap])
        for pick in ("aml", "score", "own"):
            res = rerank_scales(sp, qv, w, SearchParams(scale_pick=pick), cfg.levels)
            px = box_to_pixels(res.boxes[0], map_hw, image_hw, geom)
            rec[f"aml_pick_{pick}"] = {"iou": iou(px, true_box), "scale": qv.scales[int(res.scale[0])],
                                       "area_ratio": (px[2] - px[0]) * (px[3] - px[1]) / area}
        # the objective at scale 1 on the object's own cells against the whole map
        obj = pixels_to_cells(true_box, map_hw, image_hw, geom)
        q1 = qv.mac.astype(np.float64)

        def exact(box):
            x, y, bw, bh = box
            return float(l2n(qmap[:, y:y + bh, x:x + bw].max(axis=(1, 2)).astype(np.float64)) @ q1)

        rec["objective_s1"] = {"object_cells": list(obj),
                               "ftilde_object": float(l2n(region_vector(ii, obj)) @ q1),
                               "ftilde_whole": float(l2n(region_vector(ii, whole)) @ q1),
                               "exact_object": exact(obj), "exact_whole": exact(whole)}
        records.append(rec)
    return {"views": str(views), "store": str(store_path), "scales": list(scales),
            "summary": summarise(records, scales), "pairs": records}


def _pick(rec: dict, rule: str, method: str) -> dict:
    ps = rec["per_scale"]
    if RULES[rule] is None:
        return ps[rec["scales"].index(1.0)][method]
    return max((p[method] for p in ps), key=lambda d: d[RULES[rule]])  # ties: the first scale listed


def summarise(records: list[dict], scales: tuple[float, ...]) -> dict:
    """Mean IoU / share at IoU >= 0.5 per pick rule and per fixed scale, and the per-area-bin table."""
    out: dict = {}
    for group in ("self", "other"):
        recs = [r for r in records if r["self"] == (group == "self")]
        if not recs:
            continue
        g: dict = {"pairs": len(recs), "rules": {}, "per_scale": {}, "bins": []}
        for rule in RULES:
            d = {}
            for method in ("aml", "exhaustive"):
                v = [_pick(r, rule, method)["iou"] for r in recs]
                d[f"iou_{method}"] = _pct(v)
                d[f"iou50_{method}"] = _pct(np.asarray(v) >= 0.5)
            g["rules"][rule] = d
        g["product_path"] = {pick: _pct([r[f"aml_pick_{pick}"]["iou"] for r in recs]) for pick in ("aml", "score", "own")}
        for sc in scales:
            have = [p for r in recs for p in r["per_scale"] if p["scale"] == sc]
            g["per_scale"][str(sc)] = {m: _pct([p[m]["iou"] for p in have]) for m in ("aml", "exhaustive")}
        for lo, hi in BINS:
            b = [r for r in recs if lo <= r["object_area"] < hi]
            if not b:
                continue
            row = {"area": f"{100 * lo:.0f}-{min(100, 100 * hi):.0f} %", "n": len(b)}
            for rule, tag in _TAGS.items():
                row[f"iou_exhaustive_{tag}"] = _pct([_pick(r, rule, "exhaustive")["iou"] for r in b])
                row[f"iou_aml_{tag}"] = _pct([_pick(r, rule, "aml")["iou"] for r in b])
                row[f"area_ratio_exhaustive_{tag}"] = round(float(np.median(
                    [_pick(r, rule, "exhaustive")["area_ratio"] for r in b])), 2)
            obj = [r["objective_s1"] for r in b]
            row["whole_beats_object_ftilde"] = _pct([o["ftilde_whole"] > o["ftilde_object"] for o in obj])
            row["whole_beats_object_exact"] = _pct([o["exact_whole"] > o["exact_object"] for o in obj])
            row["cos_object_ftilde"] = round(float(np.mean([o["ftilde_object"] for o in obj])), 3)
            row["cos_whole_ftilde"] = round(float(np.mean([o["ftilde_whole"] for o in obj])), 3)
            row["mean_scale_best_aml"] = round(float(np.mean([r["aml_pick_aml"]["scale"] for r in b])), 2)
            row["mean_scale_oracle"] = round(float(np.mean([
                max(r["per_scale"], key=lambda p: p["aml"]["iou"])["scale"] for r in b])), 2)
            g["bins"].append(row)
        out[group] = g
    return out


_TAGS = {"scale 1": "s1", "best AML cosine": "best_aml", "best re-ranking score": "best_score",
         "best own-scale R-MAC score": "best_own",
         "best whitened cosine": "best_white", "best gain over whole map": "best_gain", "oracle": "oracle"}


def print_report(res: dict) -> None:
    print(f"{res['views']} ({res['store']}), query scales {res['scales']}")
    for group, g in res["summary"].items():
        print(f"\n{group}-pastes" if group == "self" else "\nother positives", f"({g['pairs']} pairs)")
        print(f"  {'pick among scales':<26} {'IoU AML':>8} {'exhaustive':>10} {'>=0.5 AML':>10} {'>=0.5 exh':>10}")
        for rule, d in g["rules"].items():
            print(f"  {rule:<26} {d['iou_aml']:>8} {d['iou_exhaustive']:>10} {d['iou50_aml']:>10} {d['iou50_exhaustive']:>10}")
        pp = g["product_path"]
        print(f"  rerank_scales (the product's path): AML IoU, pick aml {pp['aml']}, score {pp['score']}, own {pp['own']}")
        print("  fixed scale: " + "  ".join(f"{s}: AML {d['aml']} exh {d['exhaustive']}" for s, d in g["per_scale"].items()))
        print(f"  {'object area':<11} {'n':>3} {'whole>obj f~':>12} {'exact':>6} {'area x s1':>9} {'area x orc':>10}  "
              "IoU exhaustive / AML: " + " ".join(f"{t:>11}" for t in _TAGS.values()))
        for b in g["bins"]:
            ious = " ".join(f"{b['iou_exhaustive_' + t]!s:>5}/{b['iou_aml_' + t]!s:<5}" for t in _TAGS.values())
            print(f"  {b['area']:<11} {b['n']:>3} {b['whole_beats_object_ftilde']!s:>12} {b['whole_beats_object_exact']!s:>6} "
                  f"{b['area_ratio_exhaustive_s1']:>9} {b['area_ratio_exhaustive_oracle']:>10}  {'':>21}{ious}")


def main(args: argparse.Namespace) -> int:
    res = measure(args.views, args.store, tuple(args.scales), args.weights, args.pairs)
    print_report(res)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json_out}")
    return 0
