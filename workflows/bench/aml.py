"""`rmac bench aml`: AML's accuracy and speed, measured side by side in one run.

- Table 1 (left) of the paper on real activation maps (the offline backbone over the landmark pairs
  of the dev set: each query crop against its positives): mean IoU of AML's window with the
  exhaustive optimum, % of windows scored, and AML's time over the exhaustive search's.
- Figure 3 (right): the cosine between the exact max-pooled vector and its approximation `f~` over
  all regions of a few images, for the float path (alpha only) and the LUT path (quantised maps), and
  the quantiser's top clipping; plus the alpha-th root methods (table, binary search, pow).
- Re-ranking speed: 1000 AlexNet-sized quantised maps (256 x 22 x 30, ~80% zeros) against one
  query, LUT and float paths, MAC and R-MAC variants, one thread and all threads.

Real maps are cached in memory for the process (never written to disk).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from numba import njit

from rmac.ops import aml as A
from rmac.ops import integral as I
from rmac.ops.evaluate import iou_cells
from rmac.ops.quantise import DEFAULT_CLIP, DEFAULT_LEVELS, dequantise, quantise
from rmac.workflows.bench.machine import machine
from rmac.storage.images import MIN_SIDE
from rmac.workflows.args import comma_list, existing_file, existing_path, float_range, int_range, positive_int

_REAL_MAPS: dict[tuple, list[dict]] = {}  # (backbone, max_size, root, weights) -> pairs, in memory only


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="efficientnet-lite0", help="backbone for the real maps")
    parser.add_argument("--weights", type=existing_file, help="weights file for backbones without an offline package")
    parser.add_argument("--max-size", type=int_range(MIN_SIDE, 65536), default=1024,
                        help="image max side for the real maps")
    parser.add_argument("--data", type=existing_path,
                        help="Oxford-format dataset for the pairs (default: the embedded dev set)")
    parser.add_argument("--levels", type=int_range(1, 255), default=DEFAULT_LEVELS, help="quantisation levels")
    parser.add_argument("--steps", type=comma_list(positive_int), default="1,2,3,4,5", help="search steps t")
    parser.add_argument("--ratios", type=comma_list(float_range(1, 1e6)), default="1.1,1.5,2.0",
                        help="aspect-ratio thresholds s")
    parser.add_argument("--fig3-images", type=positive_int, default=5, help="images for the Figure-3 statistic")
    parser.add_argument("--maps", type=positive_int, default=1000, help="maps re-ranked in the speed test")
    parser.add_argument("--map-shape", type=comma_list(positive_int, 3), default="256,22,30",
                        help="K,H,W of the speed test's maps")
    parser.add_argument("--zeros", type=float_range(0, 1, hi_open=True), default=0.8,
                        help="fraction of zeros in the speed test's maps")
    parser.add_argument("--threads", type=positive_int, help="threads for the multi-threaded timings (default: all)")
    parser.add_argument("--skip-real", action="store_true", help="skip Table 1 and Figure 3 (no backbone)")
    parser.add_argument("--skip-speed", action="store_true", help="skip the re-ranking speed test")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")


# ---------------------------------------------------------------------------------------------
# real maps


def real_pairs(backbone: str = "efficientnet-lite0", max_size: int = 1024, root: str | os.PathLike | None = None,
               weights: str | None = None) -> list[dict]:
    """(query, positive) pairs with the query crop's MAC and aspect and the positive's float map."""
    from rmac.data import LANDMARKS_DEV
    from rmac.ops.backbones import activations, crop_query, resized_hw
    from rmac.ops.pooling import mac
    from rmac.storage.datasets import load_oxford
    from rmac.storage.images import load_image
    from rmac.storage.weights import load_backbone

    root = Path(root) if root is not None else LANDMARKS_DEV
    key = (backbone, int(max_size), str(root), weights)
    if key in _REAL_MAPS:
        return _REAL_MAPS[key]
    model, spec = load_backbone(backbone, weights)
    ds = load_oxford(root)
    maps: dict[tuple, np.ndarray] = {}  # (image id, crop box or None) -> activations

    def activations_of(image_id: str, bbox=None) -> np.ndarray:
        image = load_image(ds.image_paths[image_id])
        if bbox is not None:
            crop = crop_query(image, bbox, max_size)  # at the database's scale, as `rmac search`
            whole = resized_hw((image.height, image.width), max_size)[::-1]
            bbox = None if crop.size == whole else tuple(bbox)  # a whole-image box is the image
            image = crop
        if (image_id, bbox) not in maps:
            maps[image_id, bbox] = activations(model, spec, image, max_size)
        return maps[image_id, bbox]

    pairs = []
    for q in ds.queries:
        q_mac = mac(activations_of(q.image, q.bbox))
        aspect = (q.bbox[2] - q.bbox[0]) / (q.bbox[3] - q.bbox[1])
        for pos in q.ok:
            pairs.append({"query": q.name, "image": pos, "q_mac": q_mac, "aspect": aspect, "maps": activations_of(pos)})
    _REAL_MAPS[key] = pairs
    return pairs


def table1(pairs: list[dict], steps=(1, 2, 3, 4, 5), ratios=(1.1, 1.5, 2.0), levels: int = DEFAULT_LEVELS) -> dict:
    """Paper's Table 1 (left) on the LUT path: AML vs the exhaustive optimum, per (t, s).

    Each pair holds the query's MAC `q_mac`, its box aspect `aspect` and the positive's `maps`: float
    maps (quantised here) or uint8 maps already quantised to `levels` (as a store holds them)."""
    iis = [I.integral_lut(p["maps"] if p["maps"].dtype == np.uint8 else quantise(p["maps"], levels)[0], levels)
           for p in pairs]
    A.aml_search(iis[0], pairs[0]["q_mac"], 1.0)  # compile outside the timings
    A.exhaustive_search(iis[0], pairs[0]["q_mac"])
    exhaustive, ex_time = [], 0.0
    for p, ii in zip(pairs, iis):
        t0 = time.perf_counter()
        exhaustive.append(A.exhaustive_search(ii, p["q_mac"]))
        ex_time += time.perf_counter() - t0
    rows = []
    for t in steps:
        for s in ratios:
            ious, frac, aml_time, gap = [], [], 0.0, []
            for p, ii, ex in zip(pairs, iis, exhaustive):
                t0 = time.perf_counter()
                res = A.aml_search(ii, p["q_mac"], p["aspect"], t=t, s=s)
                aml_time += time.perf_counter() - t0
                ious.append(iou_cells(res.box, ex.box))
                frac.append(res.fraction_scored)
                gap.append(ex.score - res.score)
            rows.append({"t": t, "s": s, "iou": 100 * float(np.mean(ious)), "pct_windows": 100 * float(np.mean(frac)),
                         "time_ratio": aml_time / ex_time, "mean_score_gap": float(np.mean(gap))})
    sizes = [p["maps"].shape for p in pairs]
    return {"pairs": len(pairs), "channels": int(sizes[0][0]),
            "map_cells_mean": float(np.mean([h * w for _, h, w in sizes])),
            "exhaustive_ms_per_pair": 1e3 * ex_time / len(pairs), "rows": rows}


# ---------------------------------------------------------------------------------------------
# Figure 3: exact max-pooling against f~ over all regions


@njit(cache=True)
def _all_region_cosines(x, other, use_integral, ii):
    """Cosine between the exact max-pooled vector of `x` and, per region, either `f~` from the integral
    image (`use_integral`) or the exact max-pooled vector of `other`; NaN where a vector is zero."""
    K, H, W = x.shape
    out = np.empty((W * (W + 1) // 2) * (H * (H + 1) // 2))
    colmax = np.empty((W, K))
    colmax2 = np.empty((W, K))
    run = np.empty(K)
    run2 = np.empty(K)
    C = ii[1].shape[2] if ii[0] == I.LUT else ii[3].shape[2]
    d = np.empty(C)
    bits = d.view(np.int64)
    f = np.empty(C)
    n = 0
    for y1 in range(H):
        colmax[:] = 0.0
        colmax2[:] = 0.0
        for y2 in range(y1 + 1, H + 1):
            for xx in range(W):
                for k in range(K):
                    colmax[xx, k] = max(colmax[xx, k], x[k, y2 - 1, xx])
                    colmax2[xx, k] = max(colmax2[xx, k], other[k, y2 - 1, xx])
            for x1 in range(W):
                run[:] = 0.0
                run2[:] = 0.0
                for x2 in range(x1 + 1, W + 1):
                    for k in range(K):
                        run[k] = max(run[k], colmax[x2 - 1, k])
                        run2[k] = max(run2[k], colmax2[x2 - 1, k])
                    if use_integral:
                        I.fill_vector(ii, x1, y1, x2, y2, d, bits, f)
                        approx = f
                    else:
                        approx = run2
                    dot = 0.0
                    na = 0.0
                    nb = 0.0
                    for k in range(K):
                        dot += run[k] * approx[k]
                        na += run[k] * run[k]
                        nb += approx[k] * approx[k]
                    out[n] = dot / math.sqrt(na * nb) if na > 0 and nb > 0 else np.nan
                    n += 1
    return out


def _stats(c: np.ndarray) -> dict:
    c = c[np.isfinite(c)]
    return {"median": float(np.median(c)), "p5": float(np.percentile(c, 5)), "mean": float(c.mean()),
            "regions": int(c.size)}


def region_cosines(x: np.ndarray, levels: int = DEFAULT_LEVELS, path: str = "float",
                   clip: float = DEFAULT_CLIP, q: np.ndarray | None = None) -> np.ndarray:
    """Cosine of the exact max-pooled vector of the float map `x` (K, H, W) and its approximation `f~`
    over every region of the map (NaN where a vector is zero): `path` "float" (alpha = 10 on `x`) or
    "lut" (the LUT path on `q`, the quantised map, by default `quantise(x, levels, clip)`)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if path == "float":
        return _all_region_cosines(x, x, True, I.kernel_args(I.integral_float(x)))
    if path != "lut":
        raise ValueError(f"path must be 'float' or 'lut', got {path!r}")
    if q is not None:
        return _all_region_cosines(x, x, True, I.kernel_args(I.integral_lut(np.ascontiguousarray(q), levels)))
    q, scale = quantise(x, levels, clip=clip)
    return _all_region_cosines(x, dequantise(q, scale), True, I.kernel_args(I.integral_lut(q, levels)))


def figure3(maps_list: list[np.ndarray], levels: int = DEFAULT_LEVELS,
            clips=(0.0, 1e-4, DEFAULT_CLIP, 1e-3, 1e-2)) -> dict:
    """Cosine of exact max-pooled vs approximate region vectors over all regions of `maps_list`: the
    float path's `f~`, the LUT path's `f~` at the default clip, and, per quantiser clip, the exact
    max-pooling of the dequantised map and the LUT path's `f~`."""
    cos_float, cos_lut = [], []
    quant = {c: ([], []) for c in clips}
    for x in maps_list:
        x = np.ascontiguousarray(x, dtype=np.float32)
        cos_float.append(region_cosines(x, levels, "float"))
        for c in clips:
            q, scale = quantise(x, levels, clip=c)
            dq = dequantise(q, scale)
            quant[c][0].append(_all_region_cosines(x, dq, False, I.kernel_args(I.integral_lut(q, levels))))
            quant[c][1].append(_all_region_cosines(x, dq, True, I.kernel_args(I.integral_lut(q, levels))))
            if c == DEFAULT_CLIP:
                cos_lut.append(quant[c][1][-1])
    return {
        "images": len(maps_list),
        "float_path": _stats(np.concatenate(cos_float)),
        "lut_path": _stats(np.concatenate(cos_lut)),
        "quantiser": [{"clip": c, "max_pooling": _stats(np.concatenate(quant[c][0])),
                       "lut_path": _stats(np.concatenate(quant[c][1]))} for c in clips],
    }


# alpha-th root alternatives, measured against the root table that integral.py uses


@njit(cache=True)
def _root_search(S, T, out):
    """The paper's root: binary search over the power table, plus linear interpolation in the bracket."""
    last = T.shape[0] - 1
    for k in range(S.shape[0]):
        s = S[k]
        lo, hi = 0, last
        while lo < hi:  # largest v with T[v] <= s
            mid = (lo + hi + 1) >> 1
            if T[mid] <= s:
                lo = mid
            else:
                hi = mid - 1
        out[k] = lo if lo == last else lo + (s - T[lo]) / (T[lo + 1] - T[lo])


@njit(cache=True)
def _root_pow(S, out):
    for k in range(S.shape[0]):
        out[k] = S[k] ** 0.1


@njit(cache=True)
def _root_table(S, roots, d, bits, out):
    for k in range(S.shape[0]):
        d[k] = np.float64(S[k])
    for k in range(S.shape[0]):
        out[k] = roots[min(max((bits[k] >> I.ROOT_SHIFT) - I.ROOT_OFFSET, 0), roots.shape[0] - 1)]


def root_methods(maps_list: list[np.ndarray], levels: int = DEFAULT_LEVELS, repeat: int = 20) -> dict:
    """ns per root and worst relative error on the region sums of real quantised maps."""
    rng = np.random.default_rng(0)
    sums = []
    for x in maps_list:
        ii = I.integral_lut(quantise(x, levels)[0], levels)
        H, W = ii.map_hw
        for _ in range(200):
            x1, x2 = sorted(rng.choice(W + 1, 2, replace=False))
            y1, y2 = sorted(rng.choice(H + 1, 2, replace=False))
            sums.append(ii.sums[y2, x2] - ii.sums[y1, x2] - ii.sums[y2, x1] + ii.sums[y1, x1])
    S = np.ascontiguousarray(np.concatenate(sums))
    exact = S.astype(np.float64) ** 0.1
    T, roots = I.power_table(levels), I.root_table()
    d, out = np.empty(S.size), np.empty(S.size)
    methods = {"table": lambda: _root_table(S, roots, d, d.view(np.int64), out),
               "search+interp": lambda: _root_search(S, T, out), "pow": lambda: _root_pow(S, out)}
    res = {}
    for name, fn in methods.items():
        fn()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        dt = (time.perf_counter() - t0) / repeat
        nz = exact > 0
        res[name] = {"ns_per_root": 1e9 * dt / S.size, "max_rel_err": float(np.max(np.abs(out[nz] / exact[nz] - 1)))}
    res["sums"] = int(S.size)
    res["zero_fraction"] = float(np.mean(S == 0))
    return res


# ---------------------------------------------------------------------------------------------
# re-ranking speed on AlexNet-sized maps


def synthetic_maps(n: int, K: int = 256, H: int = 22, W: int = 30, zeros: float = 0.8, seed: int = 0,
                   chunk: int = 100, levels: int = DEFAULT_LEVELS) -> Iterator[np.ndarray]:
    """Chunks of float32 maps `(m, K, H, W)` like activations: smooth random fields (bilinear
    upsampling of coarse noise), a per-channel gain and threshold (some channels stay silent, as in
    real maps), cut so that a fraction `zeros` of the *quantised* responses is zero (rounding to
    `levels` levels zeroes the responses under half a step, so the cut is corrected after the
    first chunk)."""
    rng = np.random.default_rng(seed)
    gh, gw = max(2, H // 4), max(2, W // 4)
    uy = _interp_matrix(H, gh)
    ux = _interp_matrix(W, gw)
    target = zeros
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        coarse = rng.standard_normal((m, K, gh, gw)).astype(np.float32)
        field = np.einsum("hi,nkij,wj->nkhw", uy, coarse, ux, optimize=True)
        field -= rng.normal(0.0, 0.5, (m, K, 1, 1)).astype(np.float32)  # per-channel threshold offset
        cut = np.quantile(field, min(max(target, 0.0), 0.999))
        gain = rng.gamma(2.0, 5.0, (m, K, 1, 1)).astype(np.float32)
        maps = np.maximum(field - cut, 0) * gain
        if start == 0:
            got = np.mean([np.mean(quantise(x, levels)[0] == 0) for x in maps[:20]])
            target = zeros - (got - zeros)
        yield maps


def _interp_matrix(n: int, g: int) -> np.ndarray:
    pos = np.linspace(0, g - 1, n)
    lo = np.minimum(np.floor(pos).astype(int), g - 2)
    frac = pos - lo
    M = np.zeros((n, g), dtype=np.float32)
    M[np.arange(n), lo] = 1 - frac
    M[np.arange(n), lo + 1] = frac
    return M


def speed(n_maps: int = 1000, shape=(256, 22, 30), zeros: float = 0.8, levels: int = DEFAULT_LEVELS,
          threads: int | None = None, seed: int = 0) -> dict:
    """Seconds to re-rank `n_maps` maps against one query: LUT and float paths, MAC and R-MAC variants,
    one thread and `threads` threads."""
    import numba

    from rmac.ops import whitening as wh
    from rmac.ops.pooling import l2n, mac, regional_mac, rmac
    from rmac.ops.regions import rmac_regions
    from rmac.ops.integral import sparse_maps
    from rmac.ops.rerank import rerank, rerank_dense

    K, H, W = shape
    threads = threads or numba.get_num_threads()
    q_maps = np.empty((n_maps, K, H, W), dtype=np.uint8)
    scales = np.empty(n_maps)
    float_sample = None
    i = 0
    for block in synthetic_maps(n_maps, K, H, W, zeros, seed, levels=levels):
        if float_sample is None:
            float_sample = block[:50].copy()
        for x in block:
            q_maps[i], scales[i] = quantise(x, levels)
            i += 1
    # the query: a crop of one map; whitening learned on the regions of other maps
    y0, x0, qh, qw = H // 4, W // 4, max(1, H // 2), max(1, (2 * W) // 5)
    crop = float_sample[0, :, y0:y0 + qh, x0:x0 + qw]
    q_mac, aspect = mac(crop), qw / qh
    regional = np.concatenate([regional_mac(x, rmac_regions(W, H, 3)) for x in float_sample[1:]])
    whitening = wh.fit(wh.stats(l2n(regional)))
    q_rmac = rmac(crop, 3, whitening)

    def run(maps, variant, n_threads, fn=rerank):
        kw = {"q_rmac": q_rmac, "whitening": whitening} if variant == "rmac" else {}
        t0 = time.perf_counter()
        res = fn(maps, q_mac, aspect, n_threads=n_threads, **kw)
        return time.perf_counter() - t0, res

    def run_float(variant, n_threads, chunk=250):
        total, scored = 0.0, []
        for s in range(0, n_maps, chunk):
            maps = q_maps[s:s + chunk].astype(np.float32) * scales[s:s + chunk, None, None, None].astype(np.float32)
            dt, res = run(maps, variant, n_threads)
            total += dt
            scored.append(res.n_scored)
        return total, np.concatenate(scored)

    for variant in ("mac", "rmac"):  # compile outside the timings
        run(q_maps[:2], variant, 1)
        run(q_maps[:2], variant, 1, rerank_dense)
        run(q_maps[:2].astype(np.float32), variant, 1)
    # the stored form is sparse (store format 2): the LUT path re-ranks SparseMaps; the conversion from
    # these dense synthetic maps is timed apart (`pack_s`), and the dense LUT kernel it replaced too
    t0 = time.perf_counter()
    sparse = sparse_maps(q_maps)
    pack_s = time.perf_counter() - t0
    out = {"maps": n_maps, "shape": [K, H, W], "zeros": float(np.mean(q_maps == 0)),
           "silent_channels": float(np.mean(q_maps.reshape(n_maps, K, -1).max(axis=2) == 0)),
           "threads": threads, "seconds": {}, "pack_s": pack_s}
    for variant in ("mac", "rmac"):
        for n_threads in (1, threads):
            dt, res = run(sparse, variant, n_threads)
            out["seconds"][f"lut_{variant}_{n_threads}t"] = dt
            out["seconds"][f"lut-dense_{variant}_{n_threads}t"] = run(q_maps, variant, n_threads, rerank_dense)[0]
            out["windows_per_map"] = float(res.n_scored.mean())
            dt, _ = run_float(variant, n_threads)
            out["seconds"][f"float_{variant}_{n_threads}t"] = dt
    out["windows_total_per_map"] = A.n_windows(H, W)
    return out


# ---------------------------------------------------------------------------------------------


def bench_aml(backbone: str = "efficientnet-lite0", max_size: int = 1024, data: str | None = None,
              weights: str | None = None, levels: int = DEFAULT_LEVELS, steps=(1, 2, 3, 4, 5),
              ratios=(1.1, 1.5, 2.0), fig3_images: int = 5, n_maps: int = 1000, map_shape=(256, 22, 30),
              zeros: float = 0.8, threads: int | None = None, real: bool = True, do_speed: bool = True) -> dict:
    """Run the benchmark sections; returns a JSON-able dict."""
    out: dict = {"machine": machine(), "levels": levels}
    if real:
        t0 = time.perf_counter()
        pairs = real_pairs(backbone, max_size, data, weights)
        out["real_maps"] = {"backbone": backbone, "max_size": max_size, "pairs": len(pairs),
                            "extract_s": time.perf_counter() - t0}
        out["table1"] = table1(pairs, steps, ratios, levels)
        seen, fig_maps = set(), []
        for p in pairs:
            if p["image"] not in seen and len(fig_maps) < fig3_images:
                seen.add(p["image"])
                fig_maps.append(p["maps"])
        out["figure3"] = figure3(fig_maps, levels)
        out["roots"] = root_methods(fig_maps, levels)
        x = np.stack([p["maps"].reshape(p["maps"].shape[0], -1).max(axis=1) for p in pairs])
        out["real_maps"]["silent_channels"] = float(np.mean(x == 0))
        out["real_maps"]["zeros"] = float(np.mean(np.concatenate([(p["maps"] == 0).ravel() for p in pairs])))
    if do_speed:
        out["speed"] = speed(n_maps, tuple(map_shape), zeros, levels, threads)
    return out


def _print_tables(r: dict) -> None:
    print(f"machine: {r['machine']}; quantisation levels: {r['levels']}")
    if "table1" in r:
        t1, rm = r["table1"], r["real_maps"]
        print(f"\nTable 1 (left) — AML vs exhaustive search, {t1['pairs']} query/positive pairs, "
              f"{rm['backbone']} at {rm['max_size']} px ({t1['channels']} channels, "
              f"{t1['map_cells_mean']:.0f} cells per map on average; {100 * rm['silent_channels']:.0f}% silent "
              f"channels, {100 * rm['zeros']:.0f}% zeros); exhaustive {t1['exhaustive_ms_per_pair']:.1f} ms/pair")
        ratios = sorted({row["s"] for row in t1["rows"]})
        print("   t | " + " | ".join(f"s={s:<4}  IoU    %W   time" for s in ratios))
        for t in sorted({row["t"] for row in t1["rows"]}):
            cells = []
            for s in ratios:
                row = next(x for x in t1["rows"] if x["t"] == t and x["s"] == s)
                cells.append(f"       {row['iou']:5.1f} {row['pct_windows']:5.2f} {row['time_ratio']:6.4f}")
            print(f"  {t:2d} | " + " | ".join(cells))
        print("  (time = AML time / exhaustive time, same run)")
    if "figure3" in r:
        f3 = r["figure3"]
        print("\nFigure 3 (right) — cosine(exact max-pooling, approximation) over all regions of "
              f"{f3['images']} images")
        print("  approximation                         median      p5    mean  regions")
        rows = [("f~ float path (alpha=10)", f3["float_path"]),
                (f"f~ LUT path (default clip {DEFAULT_CLIP:g})", f3["lut_path"])]
        for q in f3["quantiser"]:
            rows.append((f"max-pool of dequantised, clip={q['clip']:g}", q["max_pooling"]))
            rows.append((f"f~ LUT path, clip={q['clip']:g}", q["lut_path"]))
        for name, st in rows:
            print(f"  {name:36s} {st['median']:.5f} {st['p5']:.5f} {st['mean']:.5f} {st['regions']:8d}")
    if "roots" in r:
        ro = r["roots"]
        print(f"\nalpha-th root on {ro['sums']} real region sums ({100 * ro['zero_fraction']:.0f}% zero)")
        for name in ("table", "search+interp", "pow"):
            print(f"  {name:14s} {ro[name]['ns_per_root']:6.2f} ns/root   max rel. error {ro[name]['max_rel_err']:.2e}")
    if "speed" in r:
        sp = r["speed"]
        K, H, W = sp["shape"]
        print(f"\nRe-ranking {sp['maps']} maps of {K}x{H}x{W} ({100 * sp['zeros']:.0f}% zeros, "
              f"{100 * sp['silent_channels']:.0f}% silent channels), t=3, s=1.1: "
              f"{sp['windows_per_map']:.0f} of {sp['windows_total_per_map']} windows per map")
        print("  path        variant   1 thread   " + f"{sp['threads']} threads")
        for path in ("lut", "lut-dense", "float"):
            for variant in ("mac", "rmac"):
                a = sp["seconds"][f"{path}_{variant}_1t"]
                b = sp["seconds"][f"{path}_{variant}_{sp['threads']}t"]
                print(f"  {path:11s} {variant:8s} {a:8.3f} s  {b:8.3f} s")
        print(f"  (lut: the sparse kernel on the stored form; lut-dense: the dense kernel it replaced; "
              f"converting these dense maps to the sparse form took {sp['pack_s']:.3f} s)")
        print("  (paper: 2.9 s for 1000 AlexNet maps, one thread)")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def main(args: argparse.Namespace) -> int:
    res = bench_aml(
        backbone=args.backbone, max_size=args.max_size, data=args.data, weights=args.weights, levels=args.levels,
        steps=tuple(int(v) for v in _floats(args.steps)), ratios=_floats(args.ratios), fig3_images=args.fig3_images,
        n_maps=args.maps, map_shape=tuple(int(v) for v in _floats(args.map_shape)), zeros=args.zeros,
        threads=args.threads, real=not args.skip_real, do_speed=not args.skip_speed,
    )
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        _print_tables(res)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    raise SystemExit(main(p.parse_args()))
