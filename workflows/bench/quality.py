"""`rmac bench quantisation`: what storing the activation maps quantised costs in re-ranking mAP, and
how many bytes the stored maps take.

Everything is computed in this process from the float activation maps of the dataset (nothing is
cached on disk). Filtering is done once, as `rmac extract` + `rmac index` + `rmac evaluate` do it: exact
MAC from the float maps, whitening fitted on the regional MACs of the dataset's distractors and the
database R-MACs from the stored (31-level, dequantised) maps, query vectors from the float query crop.
So every variant re-ranks *the same short-lists* with the same query vectors and whitening; only the
maps handed to `rmac.ops.rerank.rerank` change (the ``q31 lut`` row is what `rmac evaluate` measures):

- ``float32``: the float maps, through the exact float path (double-double integral images);
- ``q<L> lut``: the maps quantised to ``L`` levels by `rmac.ops.quantise.quantise` (what `rmac extract`
  stores, 31 levels by default), through the LUT path (exact int64 sums of ``q^10``, table root);
- ``q<L> float`` (with ``--dequantised``, and where the LUT path is not exact): the same quantised maps
  dequantised (``q * scale``) through the float path: the cost of the rounding alone, without the LUT
  root's approximation.

The LUT path is exact only while ``levels^10 * cells < 2^63`` (`rmac.ops.integral.max_exact_cells`):
7 levels up to 3.3e10 cells, 15 up to 1.6e7, 31 up to 11253, but 63 levels only up to 9 cells, so
63 levels can only be measured dequantised (the LUT path refuses those maps).

Methods, scored as `rmac.workflows.search.rerank_rows` scores them: ``mac+aml`` (whitened-MAC
filtering; AML localises with the plain MAC and the box is scored by its whitened approximate MAC),
``rmac+aml`` (R-MAC filtering, R-MAC of the localised box) and ``rmac+aml+qe`` (query expansion with the
top 5 localised R-MACs). mAP is the Oxford protocol's (revisited datasets: the Medium protocol), in
percent; differences are in points. With one or two positives per query (the dev set and its views)
one query is 100/n_queries points and AP moves in big steps when a positive swaps places with a
near-tied negative, so each row also reports, against float32: the queries whose AP changed, the
share of (positive, negative) pairs of the short-lists whose order flipped, and the mean absolute
score change. The ``q31+rk`` rows are other, equally coarse 31-level quantisations of the same maps:
each image's step is scaled by a random factor in [0.95, 1.05] (`rescaled_quantise`: the top level lands
within 5% of the default clip point, which `rmac bench aml` found equally good from 1e-4 to 1e-3), so
the strong responses, which decide max-pooling, round afresh. The spread of their mAP is the part of a
float-vs-quantised difference that is chance (which values happened to round which way), not cost.

Bytes per image: every map quantised at each level count and stored as the store stores it (the
sparse codes of `rmac.storage.maps`, one zstd frame per image, partitions of 16); plus the same for a
256-channel subset (AlexNet's conv5
has 256 channels; the paper stores ~32 kB per 1024 x 768 image: 30 x 22 cells x 256 channels, 81% zeros,
8 values, ~1 byte per non-zero).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from rmac.ops import whitening as wh
from rmac.ops.evaluate import compute_map, iou_cells
from rmac.ops.integral import ALPHA, max_exact_cells
from rmac.ops.pooling import l2n, mac, regional_mac, rmac_aggregate
from rmac.ops.quantise import DEFAULT_CLIP, dequantise, quantise
from rmac.ops.regions import rmac_regions
from rmac.ops.rerank import query_expansion, rerank, rescore
from rmac.storage.images import MIN_SIDE
from rmac.workflows.args import comma_list, existing_file, int_range, nonnegative_int, positive_int

DEFAULT_LEVELS = (31, 15, 7)  # 31: the store's default; 7 (8 values): the paper's
STORE_LEVELS = 31  # what `rmac extract` stores by default: the filtering vectors come from these maps
DEFAULT_REDRAWS = 3
REDRAW_SPREAD = 0.05
METHODS = ("mac+aml", "rmac+aml", "rmac+aml+qe")
ALEXNET_CHANNELS = 256
PAPER_ALEXNET_HW = (22, 30)  # AlexNet conv5 on a 1024 x 768 image (paper, Section 8)
PAPER_BYTES = 32_000


# ---------------------------------------------------------------------------------------------
# data


def _select(ds, n_queries: int | None, n_distractors: int | None):
    """The queries kept and the database ids: every image their ground truth names, plus the first
    ``n_distractors`` other database images (all when None)."""
    queries = ds.queries[:n_queries] if n_queries else list(ds.queries)
    if n_distractors is None and n_queries is None:
        return queries, list(ds.images)
    named, anyq = set(), set()
    for q in ds.queries:
        ids = {*q.ok, *q.junk, *(q.easy or []), *(q.hard or []), q.image}
        anyq |= ids
        if q in queries:
            named |= ids
    db = set(ds.images)
    others = [i for i in ds.images if i not in anyq]  # distractors: in no query's ground truth
    keep = named & db | set(others if n_distractors is None else others[:n_distractors])
    return queries, [i for i in ds.images if i in keep]


def _extract(ds, ids, queries, backbone: str, weights: str | None, max_size: int):
    """Float maps of the database images and the queries' (maps, image_hw, bbox), in this process."""
    from rmac.storage.images import load_image
    from rmac.workflows.extract import ModelChoice, image_features, worker_model
    from rmac.workflows.search import query_maps

    choice = ModelChoice(backbone, weights)
    model, spec = worker_model(choice)
    maps = [image_features(model, spec, load_image(ds.image_paths[i]), max_size) for i in ids]
    qmaps = [query_maps(str(ds.image_paths[q.image]), q.bbox, choice, max_size) for q in queries]
    return maps, qmaps, spec


def _padded(maps: list[np.ndarray], dtype=None) -> tuple[np.ndarray, np.ndarray]:
    hw = np.array([m.shape[1:] for m in maps], dtype=np.int64)
    H, W = hw.max(axis=0)
    out = np.zeros((len(maps), maps[0].shape[0], H, W), dtype=dtype or maps[0].dtype)
    for i, m in enumerate(maps):
        out[i, :, :m.shape[1], :m.shape[2]] = m
    return out, hw


# ---------------------------------------------------------------------------------------------
# filtering, re-ranking, mAP


def _regional(x: np.ndarray, L: int) -> np.ndarray:
    return l2n(regional_mac(x, rmac_regions(x.shape[2], x.shape[1], L)))


def _whitening(regional: list[np.ndarray], rows: np.ndarray, dim: int) -> wh.Whitening:
    """PCA-whitening of the regional vectors of ``rows`` (as `rmac index` fits it)."""
    stats = wh.empty(regional[0].shape[1])
    for r in rows:
        stats = wh.merge(stats, wh.stats(regional[r]))
    return wh.fit(stats, dim=min(dim, regional[0].shape[1]))


def _ranking(short: np.ndarray, scores: np.ndarray, rest: np.ndarray) -> np.ndarray:
    return np.concatenate([short[np.argsort(-scores, kind="stable")], rest])


def _rerank_all(stack, hw, levels, qvs, shorts, use_rmac: bool, w, L: int, qe: int):
    """Re-rank every query's short-list; returns per query (scores, boxes, qe_scores or None)."""
    out = []
    for qv, short in zip(qvs, shorts):
        rows = np.sort(short)
        maps = stack if len(rows) == len(stack) else stack[rows]
        res = rerank(maps, qv.mac, qv.aspect, map_hw=hw[rows], q_rmac=qv.rmac if use_rmac else None,
                     whitening=w if use_rmac else None, L=L, levels=levels or 31)
        at = {int(r): i for i, r in enumerate(rows)}
        pick = np.array([at[int(r)] for r in short])  # back to the short-list's order
        scores, boxes = res.scores[pick], res.boxes[pick]
        if not use_rmac:  # as `rmac.workflows.search.rerank_rows`: the box's whitened approximate MAC
            scores = l2n(wh.apply(w, res.vectors[pick])) @ qv.macw
        qe_scores = None
        if use_rmac and qe:
            vecs = res.vectors[pick]
            order = np.argsort(-scores, kind="stable")
            qe_scores = rescore(query_expansion(qv.rmac, vecs, order, k=qe), vecs)
        out.append((scores, boxes, qe_scores))
    return out


def rescaled_quantise(maps: np.ndarray, levels: int, factor: float, clip: float = DEFAULT_CLIP
                      ) -> tuple[np.ndarray, float]:
    """`quantise` with its step multiplied by ``factor``: rounding to the nearest level of the scaled
    grid (zeros stay zero, values above the top saturate). ``factor = 1`` is `quantise` itself."""
    _, scale = quantise(maps, levels, clip)
    scale *= float(factor)
    q = np.rint(np.asarray(maps, np.float32) * np.float32(1.0 / scale))
    return np.clip(q, 0, levels).astype(np.uint8), scale


def _order_flips(base: list[np.ndarray], other: list[np.ndarray], shorts: list[np.ndarray], gnd: list[dict]) -> float:
    """Fraction of the (positive, negative) pairs of the short-lists (junk left out) whose order differs
    between two scorings: what AP sees, without AP's coarseness (a tie counts as half a flip)."""
    flips = pairs = 0.0
    for b, o, sh, g in zip(base, other, shorts, gnd):
        ok, junk = np.isin(sh, g["ok"]), np.isin(sh, g.get("junk", ()))
        neg = ~ok & ~junk
        if not ok.any() or not neg.any():
            continue
        db = np.sign(b[ok][:, None] - b[neg][None, :])
        do = np.sign(o[ok][:, None] - o[neg][None, :])
        flips += float(np.sum(np.abs(db - do))) / 2
        pairs += db.size
    return flips / pairs if pairs else 0.0


def _map(rankings: list[np.ndarray], gnd: list[dict]) -> tuple[float, np.ndarray]:
    m, aps, _, _ = compute_map(np.stack(rankings, axis=1), gnd)
    return 100.0 * float(m), 100.0 * aps


# ---------------------------------------------------------------------------------------------
# bytes


def _codec_bytes(maps_u8: list[np.ndarray], side: int, partition: int = 16) -> int:
    """Bytes of ``maps_u8`` stored as the store stores them (store format 2: per partition of
    ``partition`` images, the sparse codes of `rmac.storage.maps`, one zstd frame per image), in memory.
    ``side`` (the padded side of format 1) no longer matters: only valid cells are stored."""
    from rmac.storage.maps import encode_maps

    return sum(encode_maps(maps_u8[p0:p0 + partition])[0].size for p0 in range(0, len(maps_u8), partition))


def bytes_table(maps: list[np.ndarray], levels: tuple[int, ...], side: int, channels: np.ndarray | None = None,
                clip: float = DEFAULT_CLIP) -> list[dict]:
    """Per level count: stored bytes per image, non-zero fraction, bytes per non-zero, bits per value."""
    if channels is not None:
        maps = [np.ascontiguousarray(m[channels]) for m in maps]
    n = len(maps)
    values = sum(m.size for m in maps)
    rows = []
    for L in levels:
        q = [quantise(m, L, clip)[0] for m in maps]
        nnz = sum(int(np.count_nonzero(x)) for x in q)
        b = _codec_bytes(q, side)
        rows.append({"levels": L, "bytes_per_image": round(b / n), "nonzero_fraction": round(nnz / values, 4),
                     "bytes_per_nonzero": round(b / max(nnz, 1), 3), "bits_per_value": round(8 * b / values, 3),
                     "cells_per_image": round(values / n / maps[0].shape[0], 1)})
    rows.append({"levels": None, "dtype": "float32 (uncompressed)", "bytes_per_image": round(4 * values / n),
                 "nonzero_fraction": round(sum(int(np.count_nonzero(m)) for m in maps) / values, 4)})
    return rows


# ---------------------------------------------------------------------------------------------
# the benchmark


def bench_quantisation(dataset: str | None = None, backbone: str = "efficientnet-lite0", max_size: int = 1024,
                       weights: str | None = None, levels: tuple[int, ...] = DEFAULT_LEVELS, top_n: int = 1000,
                       L: int = 3, dim: int = 512, qe: int = 5, n_queries: int | None = None,
                       n_distractors: int | None = None, dequantised: bool = False, byte_levels=None,
                       redraws: int = DEFAULT_REDRAWS, seed: int = 0, progress: bool = False) -> dict:
    """Re-ranking mAP with float maps vs quantised maps (same short-lists) and stored bytes per image.

    ``dataset``: anything `load_dataset` reads (default: the embedded dev set). ``n_queries`` /
    ``n_distractors`` cut it down (the first queries, every image their ground truth names, and the
    first other images) for quick runs. ``dequantised``: also run each level count's dequantised maps
    through the float path (always done where the LUT path is not exact). ``redraws``: that many
    other 31-level quantisations, each image's step scaled by a random factor in [0.95, 1.05]
    (`rescaled_quantise`): the spread of their mAP is the noise floor of the mAP differences. ``progress``: one line per stage on stderr.
    """
    def say(msg: str) -> None:
        if progress:
            print(f"bench quantisation: {msg}", file=sys.stderr, flush=True)

    from rmac.data import LANDMARKS_DEV
    from rmac.ops.backbones import max_map_side
    from rmac.storage.datasets import load_dataset
    from rmac.workflows.evaluate import full_ranking, whitening_subset
    from rmac.workflows.search import query_vectors

    ds = load_dataset(dataset if dataset is not None else str(LANDMARKS_DEV))
    queries, ids = _select(ds, n_queries, n_distractors)
    timings = {}
    t = time.perf_counter()
    maps, qmaps, spec = _extract(ds, ids, queries, backbone, weights, max_size)
    timings["extract_s"] = time.perf_counter() - t
    say(f"extracted {len(ids)} images and {len(queries)} queries in {timings['extract_s']:.0f} s")
    n = len(ids)
    rows_of = {i: r for r, i in enumerate(ids)}
    sub = type(ds)(ds.name, ds.root, ids, ds.image_paths, queries, ds.revisited)
    gnd = sub.gnd(rows_of)

    t = time.perf_counter()
    wrows = np.flatnonzero(whitening_subset(sub, rows_of, n))
    quantised: dict[int, list[tuple[np.ndarray, float]]] = {STORE_LEVELS: [quantise(x, STORE_LEVELS) for x in maps]}
    regional = [_regional(dequantise(q, sc), L) for q, sc in quantised[STORE_LEVELS]]  # as `rmac index`
    w = _whitening(regional, wrows, dim)
    db_rmac = np.stack([rmac_aggregate(r, w) for r in regional])
    db_macw = l2n(wh.apply(w, l2n(np.stack([mac(x) for x in maps]))))  # the store keeps the exact MAC
    qvs = [query_vectors(m, w, L, hw, bbox) for m, hw, bbox in qmaps]
    filt = {"mac": [np.argsort(-(db_macw @ qv.macw), kind="stable") for qv in qvs],
            "rmac": [np.argsort(-(db_rmac @ qv.rmac), kind="stable") for qv in qvs]}
    n_top = min(top_n, n)
    filter_map = {k: round(_map([full_ranking(o, n) for o in v], gnd)[0], 2) for k, v in filt.items()}
    timings["filter_s"] = time.perf_counter() - t

    float_stack, hw = _padded(maps, np.float32)
    cells = int(float_stack.shape[2] * float_stack.shape[3])
    # (name, path, levels, redraw number or None)
    variants: list[tuple[str, str, int | None, int | None]] = [("float32", "float", None, None)]
    skipped = []
    for lv in levels:
        exact = cells <= max_exact_cells(lv, ALPHA)
        if exact:
            variants.append((f"q{lv}", "lut", lv, None))
        else:
            skipped.append({"levels": lv, "path": "lut", "reason": f"{lv}^{ALPHA} x {cells} padded cells overflows "
                            f"int64 (exact up to {max_exact_cells(lv, ALPHA)} cells)"})
        if dequantised or not exact:
            variants.append((f"q{lv}", "float", lv, None))
    for j in range(redraws):
        variants.append((f"q{STORE_LEVELS}+r{j + 1}", "lut", STORE_LEVELS, j + 1))

    results, base = [], {}
    for name, path, lv, run in variants:
        t = time.perf_counter()
        if lv is None:
            stack = float_stack
        else:
            if run is not None:
                rng = np.random.default_rng([seed, run])
                qmaps_ = [rescaled_quantise(x, lv, rng.uniform(1 - REDRAW_SPREAD, 1 + REDRAW_SPREAD))
                          for x in maps]
            else:
                if lv not in quantised:
                    quantised[lv] = [quantise(x, lv) for x in maps]
                qmaps_ = quantised[lv]
            if path == "lut":
                stack = _padded([q for q, _ in qmaps_], np.uint8)[0]
            else:
                stack = _padded([dequantise(q, sc) for q, sc in qmaps_], np.float32)[0]
        row = {"maps": name, "path": path, "levels": lv, "redraw": run, "map": {},
               "delta_points": {}, "queries_changed": {}, "order_flips_pct": {}, "mean_abs_score_diff": {},
               "box_iou_vs_float": {}}
        for f in ("mac", "rmac"):
            shorts = [o[:n_top] for o in filt[f]]
            got = _rerank_all(stack, hw, lv, qvs, shorts, f == "rmac", w, L, qe)
            scores = {f"{f}+aml": [sc for sc, _, _ in got]}
            if f == "rmac" and qe:
                scores["rmac+aml+qe"] = [qs for _, _, qs in got]
            # where the positives' boxes land, relative to the float path's
            pos_boxes = {}
            for qi, (sh, (_, boxes, _)) in enumerate(zip(shorts, got)):
                for j, r in enumerate(sh.tolist()):
                    if r in gnd[qi]["ok"]:
                        pos_boxes[qi, r] = boxes[j]
            if lv is None:
                base[f"{f}:boxes"] = pos_boxes
            else:
                keys = sorted(set(pos_boxes) & set(base[f"{f}:boxes"]))
                if keys:
                    row["box_iou_vs_float"][f"{f}+aml"] = round(100 * float(np.mean(
                        [iou_cells(np.asarray(pos_boxes[k]), np.asarray(base[f"{f}:boxes"][k])) for k in keys])), 2)
            for m, sc in scores.items():
                mp, aps = _map([_ranking(sh, x, o[n_top:]) for sh, x, o in zip(shorts, sc, filt[f])], gnd)
                row["map"][m] = round(mp, 2)
                if lv is None:
                    base[m] = (mp, aps, sc)
                    continue
                row["delta_points"][m] = round(mp - base[m][0], 2)
                row["queries_changed"][m] = int(np.sum(~np.isclose(aps, base[m][1], atol=1e-9) & ~np.isnan(aps)))
                row["order_flips_pct"][m] = round(100 * _order_flips(base[m][2], sc, shorts, gnd), 3)
                row["mean_abs_score_diff"][m] = float(f"{np.mean(np.abs(np.concatenate(sc) - np.concatenate(base[m][2]))):.3g}")
        row["seconds"] = round(time.perf_counter() - t, 2)
        results.append(row)
        say(f"{name} {path}: " + ", ".join(f"{m} {v:.2f}" for m, v in row["map"].items()) + f" ({row['seconds']:.0f} s)")

    t = time.perf_counter()
    side = max_map_side(spec, max_size)
    blevels = tuple(byte_levels) if byte_levels else tuple(sorted(set(levels)))
    K = maps[0].shape[0]
    rng = np.random.default_rng(seed)
    ch = np.sort(rng.choice(K, size=min(ALEXNET_CHANNELS, K), replace=False))
    sub_bytes = bytes_table(maps, blevels, side, channels=ch)
    cells_img = float(np.mean([m.shape[1] * m.shape[2] for m in maps]))
    paper_cells = PAPER_ALEXNET_HW[0] * PAPER_ALEXNET_HW[1]
    for r in sub_bytes:
        if r["levels"] is not None:
            r["projected_bytes_at_30x22"] = round(r["bytes_per_image"] * paper_cells / cells_img)
    timings["bytes_s"] = time.perf_counter() - t
    return {
        "dataset": ds.name, "backbone": backbone, "max_size": max_size, "channels": K,
        "n_images": n, "n_queries": len(queries), "top_n": n_top, "L": L, "qe": qe,
        "whitening": {"fitted_on": f"{len(wrows)} distractors ({STORE_LEVELS}-level maps, as `rmac index`)",
                      "dim": int(w.proj.shape[0]),
                      "regional_vectors": int(w.n_fit)},
        "map_hw_mean": [round(float(v), 1) for v in hw.mean(axis=0)], "padded_cells": cells,
        "filter_map": filter_map, "rerank": results, "skipped": skipped,
        "bytes": bytes_table(maps, blevels, side),
        "bytes_256_channels": {"channels": f"{len(ch)} of {K} chosen at random (seed {seed})",
                               "cells_per_image_mean": round(cells_img, 1), "rows": sub_bytes,
                               "paper": f"~{PAPER_BYTES // 1000} kB per image (AlexNet, 30x22x256, 8 values)"},
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }


# ---------------------------------------------------------------------------------------------
# command line


def print_tables(r: dict) -> None:
    print(f"{r['dataset']}: {r['n_images']} images, {r['n_queries']} queries, {r['backbone']} @ {r['max_size']} px "
          f"({r['channels']} channels, maps {r['map_hw_mean'][0]:.1f} x {r['map_hw_mean'][1]:.1f} cells on average); "
          f"top {r['top_n']} re-ranked; whitening on {r['whitening']['fitted_on']}, {r['whitening']['dim']}-D")
    print(f"  filtering only: MAC {r['filter_map']['mac']:.2f}  R-MAC {r['filter_map']['rmac']:.2f}")
    methods = [m for m in METHODS if m in r["rerank"][0]["map"]]
    print(f"  {'maps':<8} {'path':<6} " + "  ".join(f"{m:<28}" for m in methods) + "  box IoU vs float")
    for row in r["rerank"]:
        cells = []
        for m in methods:
            d = row["delta_points"].get(m)
            cells.append(f"{row['map'][m]:6.2f}" + (f" ({d:+5.2f} {row['queries_changed'][m]:2d}q {row['order_flips_pct'][m]:5.2f}%)"
                                                     if d is not None else ""))
        iou_ = row["box_iou_vs_float"].get("rmac+aml")
        print(f"  {row['maps']:<8} {row['path']:<6} " + "  ".join(f"{c:<28}" for c in cells)
              + (f"  {iou_:5.1f}" if iou_ is not None else ""))
    print("  mAP %; in brackets, against float32: points, queries whose AP changed, and % of the (positive,\n"
          "  negative) pairs of the short-lists whose order flipped. q31+rk: 31 levels, each image's step\n"
          "  scaled by a random factor in [0.95, 1.05]: equally coarse, so their spread is the noise floor.")
    for s in r["skipped"]:
        print(f"  skipped {s['levels']} levels on the {s['path']} path: {s['reason']}")
    print(f"\nStored maps, bytes per image ({r['channels']} channels; sparse codes as in the store):")
    _print_bytes(r["bytes"])
    b = r["bytes_256_channels"]
    print(f"\n256-channel (AlexNet-sized) maps: {b['channels']}, {b['cells_per_image_mean']:.0f} cells per image; "
          f"paper: {b['paper']}")
    _print_bytes(b["rows"], projected=True)


def _print_bytes(rows: list[dict], projected: bool = False) -> None:
    print(f"  {'levels':>8} {'bytes/image':>12} {'non-zero':>9} {'B/non-zero':>11} {'bits/value':>11}"
          + (f" {'at 30x22 cells':>15}" if projected else ""))
    for x in rows:
        if x["levels"] is None:
            print(f"  {'float32':>8} {x['bytes_per_image']:12d} {x['nonzero_fraction']:9.3f}   (uncompressed)")
            continue
        print(f"  {x['levels']:>8} {x['bytes_per_image']:12d} {x['nonzero_fraction']:9.3f} {x['bytes_per_nonzero']:11.3f} "
              f"{x['bits_per_value']:11.3f}" + (f" {x['projected_bytes_at_30x22']:15d}" if projected else ""))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", nargs="?", help="dataset (folder, .json, gnd_*.pkl; default: the embedded "
                                                   "landmarks-dev; e.g. the output of `rmac make-views`)")
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--weights", type=existing_file, help="weights file for backbones without an offline package")
    parser.add_argument("--max-size", type=int_range(MIN_SIDE, 65536), default=1024)
    parser.add_argument("--levels", type=comma_list(int_range(1, 255)), default=",".join(map(str, DEFAULT_LEVELS)),
                        help="quantisation level counts to compare with float32 (default %(default)s; "
                             "63 runs dequantised on the float path, slow)")
    parser.add_argument("--top-n", type=positive_int, default=1000, help="images re-ranked per query")
    parser.add_argument("--queries", type=positive_int, help="only the first QUERIES queries")
    parser.add_argument("--distractors", type=nonnegative_int,
                        help="only the first DISTRACTORS images outside the ground truth")
    parser.add_argument("--redraws", type=nonnegative_int, default=DEFAULT_REDRAWS,
                        help="other 31-level quantisations (each image's step scaled by U(0.95, 1.05)): "
                             "the noise floor of the mAP differences (default %(default)s)")
    parser.add_argument("--dequantised", action="store_true",
                        help="also run every level count's dequantised maps through the float path (slow)")
    parser.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")


def main(args: argparse.Namespace) -> int:
    res = bench_quantisation(args.dataset, args.backbone, args.max_size, args.weights,
                             tuple(int(v) for v in args.levels.split(",") if v.strip()), args.top_n,
                             n_queries=args.queries, n_distractors=args.distractors,
                             dequantised=args.dequantised, redraws=args.redraws, progress=True)
    print_tables(res)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    raise SystemExit(main(p.parse_args()))
