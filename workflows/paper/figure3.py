"""Figure 3 (middle and right): how well the generalised mean `f~ = (sum x^alpha)^(1/alpha)` stands
for the maximum.

- Middle: the approximation error of the maximum against the size of the response set (cells in
  the region), per alpha, on randomly sampled regions of randomly chosen database images. The paper
  plots the absolute error on AlexNet's responses in [0, 151]; responses here have another range, so
  the error is relative, `(f~ - f) / f` over channels with `f > 0` (scale-free; `f~ >= f` always, and
  `f~ <= n^(1/alpha) f` for n cells, drawn as dashed lines).
- Right: the distribution of the cosine between the exact max-pooled vector and `f~` over *all*
  regions of the same images: the float path (alpha = 10) and the LUT path that re-ranking uses
  (`rmac bench aml`'s code). The maps are the stored ones (31 levels): "exact" is the max of the
  dequantised map.
"""
from __future__ import annotations

import numpy as np

from rmac.ops import integral as I
from rmac.ops.quantise import dequantise
from rmac.workflows.bench.aml import region_cosines
from rmac.workflows.paper.runner import Run


def sample_boxes(h: int, w: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` boxes `(x, y, w, h)` with width and height uniform in 1..w / 1..h, placed uniformly."""
    bw = rng.integers(1, w + 1, n)
    bh = rng.integers(1, h + 1, n)
    bx = (rng.random(n) * (w - bw + 1)).astype(np.int64)
    by = (rng.random(n) * (h - bh + 1)).astype(np.int64)
    return np.stack([bx, by, bw, bh], axis=1).astype(np.int64)


def approximation_error(maps: list[np.ndarray], alphas, n_boxes: int, seed: int = 0) -> dict:
    """Per alpha, the mean relative error of `f~` against the exact maximum, binned by the response
    set's size (cells, bins [2^k, 2^(k+1)))."""
    rng = np.random.default_rng(seed)
    sizes, errors = [], {a: [] for a in alphas}
    for x in maps:
        x = np.ascontiguousarray(x, dtype=np.float32)
        _, h, w = x.shape
        boxes = sample_boxes(h, w, n_boxes, rng)
        hwk = x.transpose(1, 2, 0)
        exact = np.stack([hwk[by:by + bh, bx:bx + bw].max(axis=(0, 1)) for bx, by, bw, bh in boxes.tolist()])
        pos = exact > 0
        for a in alphas:
            approx = I.region_vectors(I.integral_float(x, alpha=a), boxes)
            rel = np.where(pos, (approx - exact) / np.where(pos, exact, 1.0), 0.0)
            errors[a].append(rel.sum(axis=1) / np.maximum(pos.sum(axis=1), 1))
        sizes.append(boxes[:, 2] * boxes[:, 3])
    sizes = np.concatenate(sizes)
    top = int(np.ceil(np.log2(sizes.max() + 1)))
    edges = [2 ** k for k in range(top + 1)]
    bins = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (sizes >= lo) & (sizes < hi)
        if sel.any():
            bins.append({"cells_lo": lo, "cells_hi": hi, "regions": int(sel.sum()),
                         "cells_mean": float(sizes[sel].mean()),
                         "rel_error": {str(a): float(np.concatenate(errors[a])[sel].mean()) for a in alphas}})
    return {"alphas": [float(a) for a in alphas], "regions": int(sizes.size), "bins": bins}


def cosine_distribution(maps_q: list[tuple[np.ndarray, float]], levels: int, n_bins: int = 50) -> dict:
    """Histogram and statistics of cosine(exact, f~) over every region of each map (float and LUT)."""
    out = {}
    for path in ("float", "lut"):
        c = np.concatenate([region_cosines(dequantise(q, sc), levels, path, q=q) for q, sc in maps_q])
        c = c[np.isfinite(c)]
        lo = float(min(c.min(), 0.99))
        counts, edges = np.histogram(c, bins=n_bins, range=(lo, 1.0))
        out[path] = {"regions": int(c.size), "mean": float(c.mean()), "median": float(np.median(c)),
                     "p5": float(np.percentile(c, 5)), "min": float(c.min()),
                     "hist_counts": counts.tolist(), "hist_edges": edges.tolist()}
    return out


def pick_rows(run: Run, store, n: int) -> list[int]:
    """``n`` random extracted rows of ``store`` (seeded)."""
    ok = np.flatnonzero(store.valid_rows())
    rng = np.random.default_rng(run.settings.seed)
    return sorted(rng.choice(ok, size=min(n, len(ok)), replace=False).tolist())


def run(run: Run) -> dict:
    s = run.settings
    ev, cmd = run.main()
    st = ev.db.stores[0]
    rows = pick_rows(run, st, s.fig3_images)
    maps_q = st.read_maps(rows)
    return {
        "images": [st.ids[r] for r in rows],
        "error": approximation_error([dequantise(q, sc) for q, sc in maps_q], s.alphas, s.fig3_boxes, s.seed),
        "cosine": cosine_distribution(maps_q, st.config.levels),
        "provenance": {"command": s.command() + "  # section figure3",
                       "function": "rmac.workflows.paper.figure3 (integral_float per alpha; "
                                   "rmac.workflows.bench.aml.region_cosines) on the stored maps of: " + cmd,
                       "settings": {"images": len(rows), "boxes_per_image": s.fig3_boxes, "alphas": list(s.alphas),
                                    "seed": s.seed, "alpha_cosine": 10, "levels": st.config.levels}},
    }
