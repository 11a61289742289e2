"""AML: approximate max-pooling localisation (paper, Section 5).

The score of a window `R` is the cosine between the query's MAC `q` and the approximate region vector
`f~_R` of `rmac.ops.integral`. `exhaustive_search` scores every window; `aml_search` scores the
windows of a grid with step `t` (edges at `0, t, 2t, ...` from the left/top and at `W, W-t, ...`
from the right/bottom, so the whole map is always a candidate) whose aspect ratio is within a factor
`s` of the query's (`query_aspect / s <= w/h <= query_aspect * s`, i.e. `|log(query_aspect / (w/h))|
<= log(s)`), then refines the best one by coordinate descent over its 4 edges (moves of
`+-step`, step going `refine_step .. 1`, up to `passes` passes per step, stopping when no move
improves), as the paper's released code does. Refinement moves are not aspect-filtered. When no grid
window passes the aspect filter (tiny maps), the whole map is scored instead.

Boxes are `(x, y, w, h)` in cells, half-open. Ties keep the first window in scan order.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit

from rmac.ops.integral import LUT, ROOT_OFFSET, ROOT_SHIFT, Integral, fill_float, kernel_args

__all__ = [
    "AMLResult",
    "n_windows",
    "unit_query",
    "aspect_bounds",
    "exhaustive_search",
    "aml_search",
    "box_to_pixels",
    "pixels_to_cells",
]


class AMLResult(NamedTuple):
    """The best window `box` `(x, y, w, h)` (cells), its `score` (cosine), how many windows were
    scored (`n_scored`, refinement moves included) and how many windows the map has (`n_total`)."""

    box: tuple[int, int, int, int]
    score: float
    n_scored: int
    n_total: int

    @property
    def fraction_scored(self) -> float:
        """`n_scored / n_total`, the paper's %W / 100."""
        return self.n_scored / self.n_total


def n_windows(h: int, w: int) -> int:
    """Number of distinct windows on an `h x w` map: `w(w+1)/2 * h(h+1)/2`."""
    return (w * (w + 1) // 2) * (h * (h + 1) // 2)


# ---------------------------------------------------------------------------------------------
# numba kernels (shared with rerank.py)

@njit(cache=True, fastmath=True)
def _lut_score(sums, roots, qv, x1, y1, x2, y2, d, bits):
    """Cosine of unit `qv` and `f~` on the LUT path, fused: exact int64 sums -> root table -> dot/norm."""
    K = sums.shape[2]
    for k in range(K):
        d[k] = np.float64(sums[y2, x2, k] - sums[y1, x2, k] - sums[y2, x1, k] + sums[y1, x1, k])
    last = roots.shape[0] - 1
    dot = 0.0
    nn = 0.0
    for k in range(K):
        i = min(max((bits[k] >> ROOT_SHIFT) - ROOT_OFFSET, 0), last)
        r = roots[i]
        dot += qv[k] * r
        nn += r * r
    return dot / math.sqrt(nn) if nn > 0.0 else 0.0


@njit(cache=True)
def window_score(ii, qv, x1, y1, x2, y2, d, bits, f):
    """Cosine of unit `qv` with `f~` of `[x1, x2) x [y1, y2)` for the integral image tuple `ii`
    (`integral.kernel_args`); `d`, `bits` (int64 view of `d`), `f`: K-scratch."""
    kind, sums, roots, hi, lo, nnz, cmax, inv_alpha = ii
    if kind == LUT:
        return _lut_score(sums, roots, qv, x1, y1, x2, y2, d, bits)
    fill_float(hi, lo, nnz, cmax, inv_alpha, x1, y1, x2, y2, f)
    dot = 0.0
    nn = 0.0
    for k in range(f.shape[0]):
        dot += qv[k] * f[k]
        nn += f[k] * f[k]
    return dot / math.sqrt(nn) if nn > 0.0 else 0.0


@njit(cache=True)
def grid_search(ii, qv, H, W, t, a_lo, a_hi, d, bits, f):
    """Best window of the step-`t` grid with `a_lo <= w/h <= a_hi`: `(x1, y1, x2, y2, score, n_scored)`."""
    bx1, by1, bx2, by2 = 0, 0, W, H
    best = -np.inf
    n = 0
    for y1 in range(0, H, t):
        for y2 in range(H, y1, -t):
            for x1 in range(0, W, t):
                for x2 in range(W, x1, -t):
                    if x2 - x1 < a_lo * (y2 - y1) or x2 - x1 > a_hi * (y2 - y1):
                        continue
                    sc = window_score(ii, qv, x1, y1, x2, y2, d, bits, f)
                    n += 1
                    if sc > best:
                        best = sc
                        bx1, by1, bx2, by2 = x1, y1, x2, y2
    if n == 0:  # no grid window has the query's aspect (tiny maps): start from the whole map
        best = window_score(ii, qv, 0, 0, W, H, d, bits, f)
        n = 1
    return bx1, by1, bx2, by2, best, n


@njit(cache=True)
def refine(ii, qv, H, W, x1, y1, x2, y2, score, refine_step, passes, d, bits, f):
    """Coordinate descent over the 4 edges; a move is kept as soon as it improves the score.

    Returns `(x1, y1, x2, y2, score, n_scored)`."""
    n = 0
    for step in range(refine_step, 0, -1):
        for _ in range(passes):
            improved = False
            for move in range(8):
                delta = step if move % 2 else -step
                c1, r1, c2, r2 = x1, y1, x2, y2
                edge = move // 2
                if edge == 0:
                    c1 += delta
                elif edge == 1:
                    r1 += delta
                elif edge == 2:
                    c2 += delta
                else:
                    r2 += delta
                if c1 < 0 or r1 < 0 or c2 > W or r2 > H or c2 <= c1 or r2 <= r1:
                    continue
                sc = window_score(ii, qv, c1, r1, c2, r2, d, bits, f)
                n += 1
                if sc > score:
                    score = sc
                    x1, y1, x2, y2 = c1, r1, c2, r2
                    improved = True
            if not improved:
                break
    return x1, y1, x2, y2, score, n


@njit(cache=True)
def aml_kernel(ii, qv, H, W, t, a_lo, a_hi, refine_step, passes, d, bits, f):
    """Grid search then refinement: `(x1, y1, x2, y2, score, n_scored)`."""
    x1, y1, x2, y2, sc, n1 = grid_search(ii, qv, H, W, t, a_lo, a_hi, d, bits, f)
    x1, y1, x2, y2, sc, n2 = refine(ii, qv, H, W, x1, y1, x2, y2, sc, refine_step, passes, d, bits, f)
    return x1, y1, x2, y2, sc, n1 + n2


# ---------------------------------------------------------------------------------------------
# Python entry points


def unit_query(q: np.ndarray, K: int) -> np.ndarray:
    """The query MAC as a unit float64 vector of length K (ValueError if zero or mis-sized)."""
    q = np.asarray(q, dtype=np.float64).reshape(-1)
    if q.shape[0] != K:
        raise ValueError(f"query has {q.shape[0]} channels, maps have {K}")
    norm = np.linalg.norm(q)
    if not norm > 0 or not np.isfinite(norm):
        raise ValueError("query vector must be finite and non-zero")
    return np.ascontiguousarray(q / norm)


def _valid_hw(ii: Integral, map_hw: tuple[int, int] | None) -> tuple[int, int]:
    H, W = ii.map_hw
    if map_hw is None:
        return H, W
    h, w = int(map_hw[0]), int(map_hw[1])
    if not (1 <= h <= H and 1 <= w <= W):
        raise ValueError(f"valid size {map_hw} outside the {H}x{W} integral image")
    return h, w


def _scratch(K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = np.empty(K)
    return d, d.view(np.int64), np.empty(K)


def aspect_bounds(query_aspect: float, s: float) -> tuple[float, float]:
    """Window aspects `w/h` kept by the filter `|log(query_aspect / (w/h))| <= log(s)`, as the bounds
    `(query_aspect / s, query_aspect * s)` (no logarithm per window)."""
    return query_aspect / s, query_aspect * s


def _run(ii, q, map_hw, t, a_lo, a_hi, refine_step, passes) -> AMLResult:
    args = kernel_args(ii)
    K = (args[1] if args[0] == LUT else args[3]).shape[2]
    qv = unit_query(q, K)
    H, W = _valid_hw(ii, map_hw)
    x1, y1, x2, y2, sc, n = aml_kernel(args, qv, H, W, int(t), float(a_lo), float(a_hi), int(refine_step),
                                       int(passes), *_scratch(K))
    return AMLResult((int(x1), int(y1), int(x2 - x1), int(y2 - y1)), float(sc), int(n), n_windows(H, W))


def exhaustive_search(ii: Integral, q: np.ndarray, map_hw: tuple[int, int] | None = None) -> AMLResult:
    """The window maximising the cosine with `q` over all windows of the map (or of its valid top-left
    `map_hw = (h, w)` part, for padded maps)."""
    return _run(ii, q, map_hw, 1, 0.0, np.inf, 1, 0)


def aml_search(
    ii: Integral,
    q: np.ndarray,
    query_aspect: float,
    t: int = 3,
    s: float = 1.1,
    passes: int = 5,
    refine_step: int = 3,
    map_hw: tuple[int, int] | None = None,
) -> AMLResult:
    """AML: grid of step `t`, windows with `|log(query_aspect / (w/h))| > log(s)` skipped, then
    coordinate-descent refinement of the best (`passes = 0` skips it). `s = inf` keeps every aspect."""
    if int(t) < 1 or not s >= 1.0 or int(passes) < 0 or int(refine_step) < 0:
        raise ValueError(f"need t >= 1, s >= 1, passes >= 0, refine_step >= 0; got {t}, {s}, {passes}, {refine_step}")
    if not (query_aspect > 0 and np.isfinite(query_aspect)):
        raise ValueError(f"query_aspect must be positive, got {query_aspect}")
    return _run(ii, q, map_hw, t, *aspect_bounds(query_aspect, s), refine_step, passes)


def box_to_pixels(box, map_hw: tuple[int, int], image_hw: tuple[int, int],
                  geometry: tuple[float, float, float, float] | None = None) -> tuple[float, float, float, float]:
    """Map-cell box `(x, y, w, h)` -> pixel box `(x1, y1, x2, y2)`, clipped to the image.

    `geometry = (stride_y, stride_x, offset_y, offset_x)` is where the backbone puts its cells
    (`rmac.ops.backbones.cell_centres`): cell `(r, c)`'s receptive field is centred at
    `(offset_y + stride_y * r, offset_x + stride_x * c)` and the cell stands for the stride-wide
    span around that centre; the first and last cells of a row or column stretch to the image border.
    Without it, cells tile the image evenly (`[j, j+1) * image/map`)."""
    x, y, w, h = (int(v) for v in box)
    (mh, mw), (H, W) = map_hw, image_hw
    if geometry is None:
        # multiply before dividing: the last cell edge lands exactly on the image edge, never past it
        return (x * W / mw, y * H / mh, (x + w) * W / mw, (y + h) * H / mh)
    sy, sx, oy, ox = (float(v) for v in geometry)
    ex, ey = ox - sx / 2, oy - sy / 2  # left / top edge of cell 0's span

    def edge(j: int, n: int, e0: float, step: float, size: float) -> float:
        # the border cells also stand for the strips between their span and the image border
        return 0.0 if j <= 0 else float(size) if j >= n else min(max(e0 + step * j, 0.0), float(size))

    return (edge(x, mw, ex, sx, W), edge(y, mh, ey, sy, H), edge(x + w, mw, ex, sx, W), edge(y + h, mh, ey, sy, H))


def pixels_to_cells(box_px, map_hw: tuple[int, int], image_hw: tuple[int, int],
                    geometry: tuple[float, float, float, float] | None = None) -> tuple[int, int, int, int]:
    """Pixel box `(x1, y1, x2, y2)` -> the smallest cell box `(x, y, w, h)` covering it, clipped to the map
    and at least one cell wide and high. Inverse of `box_to_pixels` (same `geometry`) on cell boxes."""
    H, W = int(map_hw[0]), int(map_hw[1])
    if geometry is None:
        sy, sx = image_hw[0] / map_hw[0], image_hw[1] / map_hw[1]
        ey = ex = 0.0
    else:
        sy, sx, oy, ox = (float(v) for v in geometry)
        ex, ey = ox - sx / 2, oy - sy / 2
    x1, y1, x2, y2 = (float(v) for v in box_px)
    eps = 1e-9  # a cell edge mapped to pixels and back must land on the same cell edge
    c1 = min(max(int(math.floor((x1 - ex) / sx + eps)), 0), W - 1)
    r1 = min(max(int(math.floor((y1 - ey) / sy + eps)), 0), H - 1)
    c2 = min(max(int(math.ceil((x2 - ex) / sx - eps)), c1 + 1), W)
    r2 = min(max(int(math.ceil((y2 - ey) / sy - eps)), r1 + 1), H)
    return (c1, r1, c2 - c1, r2 - r1)
