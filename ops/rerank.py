"""Re-ranking by localised similarity (paper, Section 6), and query expansion.

For a database map, AML (`rmac.ops.aml`) finds the window most similar to the query's MAC. Then
- MAC variant: the score is that window's AML score (cosine of the query MAC and `f~` of the window),
  and the localised vector is `l2n(f~)`;
- R-MAC variant (when filtering used R-MAC): the R-MAC of the window is built from the same integral
  images: `rmac_regions(w_box, h_box, L)` offset by the window's origin, each region's `f~`,
  then l2n -> whitening -> l2n -> sum -> l2n; the score is its cosine with the query R-MAC.

`rerank` does a whole short-list: parallel over images (a nogil numba kernel per thread, one
integral image per thread at a time, built in preallocated scratch, channels without response left
out), then one BLAS matmul per block of maps whitens all their regional vectors. Quantised uint8
maps take the exact LUT path, float maps the float path.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import NamedTuple, Sequence

import numba
import numpy as np
from numba import njit

from rmac.ops import whitening as _wh
from rmac.ops.aml import AMLResult, aml_kernel, aml_search, aspect_bounds, unit_query
from rmac.ops.integral import (
    ALPHA,
    _NO_F64,
    _NO_I32,
    FLOAT,
    LUT,
    Integral,
    SparseMaps,
    fill_vector,
    integral_float_into,
    integral_lut_into,
    integral_lut_sparse_into,
    max_exact_cells,
    power_table,
    region_vector,
    region_vectors,
    root_table,
    sparse_maps,
)
from rmac.ops.pooling import l2n, rmac_aggregate, rmac_aggregate_many
from rmac.ops.regions import region_grid

__all__ = [
    "RerankResult",
    "localised_mac",
    "localised_rmac",
    "rerank",
    "rerank_dense",
    "query_expansion",
    "rescore",
]


class RerankResult(NamedTuple):
    """Per database image: the re-ranking `scores` (N,), the localised `boxes` (N, 4) `(x, y, w, h)`
    cells, the localised `vectors` (N, D) float32 unit rows (`l2n(f~)` of the box, or the box's R-MAC),
    the AML cosine of the box `aml_scores` (N,) and the windows scored `n_scored` (N,)."""

    scores: np.ndarray
    boxes: np.ndarray
    vectors: np.ndarray
    aml_scores: np.ndarray
    n_scored: np.ndarray


# ---------------------------------------------------------------------------------------------
# one map


def localised_mac(
    ii: Integral, q_mac: np.ndarray, query_aspect: float, t: int = 3, s: float = 1.1, passes: int = 5,
    refine_step: int = 3, map_hw: tuple[int, int] | None = None,
) -> tuple[AMLResult, np.ndarray]:
    """MAC variant on one integral image: the AML result (score = localised similarity) and `l2n(f~)`."""
    res = aml_search(ii, q_mac, query_aspect, t=t, s=s, passes=passes, refine_step=refine_step, map_hw=map_hw)
    return res, l2n(region_vector(ii, res.box)).astype(np.float32)


def _box_regions(box, L: int) -> np.ndarray:
    x, y, w, h = (int(v) for v in box)
    regions = region_grid(w, h, L).copy()
    regions[:, 0] += x
    regions[:, 1] += y
    return regions


def localised_rmac(
    ii: Integral, box, q_rmac: np.ndarray, whitening: _wh.Whitening | None, L: int = 3
) -> tuple[float, np.ndarray]:
    """R-MAC variant on one integral image: the R-MAC of `box` from its regions' `f~` and its cosine
    with the query R-MAC `q_rmac` (the query's R-MAC, whitened with the same `whitening`)."""
    vec = rmac_aggregate(region_vectors(ii, _box_regions(box, L)).astype(np.float32), whitening)
    return float(vec @ l2n(np.asarray(q_rmac, dtype=np.float32))), vec


# ---------------------------------------------------------------------------------------------
# a batch of maps


@lru_cache(maxsize=16)
def _region_table(H: int, W: int, L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """R-MAC regions of every box size up to `H x W`: rows `(x, y, w, h)`, and per `(h, w)` the first
    row and the count."""
    start = np.zeros((H + 1, W + 1), dtype=np.int64)
    count = np.zeros((H + 1, W + 1), dtype=np.int64)
    rows = []
    n = 0
    for h in range(1, H + 1):
        for w in range(1, W + 1):
            r = region_grid(w, h, L)
            start[h, w], count[h, w] = n, len(r)
            rows.append(r)
            n += len(r)
    return np.ascontiguousarray(np.concatenate(rows), dtype=np.int64), start, count


@njit(cache=True)
def _localise_one(ii, qv, h, w, t, a_lo, a_hi, refine_step, passes, regions, reg_start, reg_count,
                  d, bits, f, chans, box, vec, reg):
    """AML on one integral image (tuple `ii` over the channels `chans`); writes the box, `l2n(f~)` into
    `vec[chans]` and each region's `l2n(f~)` into the rows of `reg` (at `reg[:, chans]`, zeros
    elsewhere); returns `(score, n_scored, n_regions)`."""
    x1, y1, x2, y2, sc, n = aml_kernel(ii, qv, h, w, t, a_lo, a_hi, refine_step, passes, d, bits, f)
    box[0], box[1], box[2], box[3] = x1, y1, x2 - x1, y2 - y1
    fill_vector(ii, x1, y1, x2, y2, d, bits, f)
    _scatter_unit(f, chans, vec)
    start, cnt = reg_start[y2 - y1, x2 - x1], reg_count[y2 - y1, x2 - x1]
    for r in range(cnt):
        rx, ry = x1 + regions[start + r, 0], y1 + regions[start + r, 1]
        fill_vector(ii, rx, ry, rx + regions[start + r, 2], ry + regions[start + r, 3], d, bits, f)
        reg[r, :] = 0.0
        _scatter_unit(f, chans, reg[r])
    return sc, n, cnt


@njit(cache=True, nogil=True)
def _scatter_unit(f, chans, out):
    """`out[chans] = l2n(f)` (a zero `f` writes zeros)."""
    nn = 0.0
    for j in range(f.shape[0]):
        nn += f[j] * f[j]
    inv = 1.0 / math.sqrt(nn) if nn > 0.0 else 0.0
    for j in range(f.shape[0]):
        out[chans[j]] = f[j] * inv


@njit(cache=True)
def _active_channels(kind, q, x, h, w, chans):
    """Write the channels with a non-zero response in the valid `h x w` part to `chans`; return how many."""
    C = 0
    for k in range(chans.shape[0]):
        found = False
        for y in range(h):
            for xx in range(w):
                if (q[k, y, xx] > 0) if kind == LUT else (x[k, y, xx] > 0.0):
                    found = True
                    break
            if found:
                break
        if found:
            chans[C] = k
            C += 1
    return C


@njit(cache=True, nogil=True)
def _rerank_chunk(c, n_chunks, kind, maps_q, maps_f, hw, table, roots, alpha, qv, t, a_lo, a_hi,
                  refine_step, passes, regions, reg_start, reg_count, seg_rows, boxes, scores, n_scored, vecs, regs,
                  n_regs):
    """Maps `c, c + n_chunks, ...` of the batch, one after the other in one thread's scratch.

    Channels with no response in a map are left out of its integral image: they add nothing to `f~`,
    its norm, or the dot product, and real maps have many (12-48% of EfficientNet-Lite0's 1280 on
    the dev set)."""
    N = hw.shape[0]
    K = qv.shape[0]
    Hm = maps_q.shape[2] if kind == LUT else maps_f.shape[2]
    Wm = maps_q.shape[3] if kind == LUT else maps_f.shape[3]
    cells = (Hm + 1) * (Wm + 1) * K
    flat_i = np.empty(cells if kind == LUT else 0, dtype=np.int64)
    flat_f = np.empty(2 * cells if kind != LUT else 0)
    flat_n = np.empty(cells if kind != LUT else 0, dtype=np.int32)
    chans = np.empty(K, dtype=np.int64)
    qc = np.empty(K)
    cm = np.empty(K)
    d = np.empty(K)
    bits = d.view(np.int64)
    f = np.empty(K)
    at = c * seg_rows
    most = max(1, reg_count.max())
    for i in range(c, N, n_chunks):
        h, w = hw[i, 0], hw[i, 1]
        mq = maps_q[i if kind == LUT else 0]  # the other path's maps are a 1-element dummy
        mf = maps_f[i if kind != LUT else 0]
        C = _active_channels(kind, mq, mf, h, w, chans)
        for j in range(C):
            qc[j] = qv[chans[j]]
        n_lut = (h + 1) * (w + 1) * C if kind == LUT else 0
        n_flt = (h + 1) * (w + 1) * C if kind != LUT else 0
        sums = flat_i[:n_lut].reshape((h + 1, w + 1, C) if kind == LUT else (1, 1, 0))
        shape_f = (h + 1, w + 1, C) if kind != LUT else (1, 1, 0)
        hi = flat_f[:n_flt].reshape(shape_f)
        lo = flat_f[n_flt:2 * n_flt].reshape(shape_f)
        nnz = flat_n[:n_flt].reshape(shape_f)
        if kind == LUT:
            integral_lut_into(mq, h, w, chans[:C], table, sums)
        else:
            integral_float_into(mf, h, w, chans[:C], alpha, cm[:C], hi, lo, nnz)
        ii = (kind, sums, roots, hi, lo, nnz, cm[:C], 1.0 / alpha)
        sc, n, nr = _localise_one(ii, qc[:C], h, w, t, a_lo, a_hi, refine_step, passes, regions, reg_start,
                                  reg_count, d[:C], bits[:C], f[:C], chans[:C], boxes[i], vecs[i],
                                  regs[at:at + most])
        scores[i] = sc
        n_scored[i] = n
        n_regs[i] = nr
        at += nr


def _stack_maps(maps, map_hw) -> tuple[np.ndarray, np.ndarray]:
    """A padded `(N, K, Hm, Wm)` array and the valid `(h, w)` of each map."""
    if isinstance(maps, np.ndarray) and maps.ndim == 4:
        stacked = maps
        shapes = None
    else:
        maps = [np.asarray(m) for m in maps]
        if not maps:
            raise ValueError("no maps to re-rank")
        if any(m.ndim != 3 for m in maps) or len({m.shape[0] for m in maps}) != 1 or len({m.dtype for m in maps}) != 1:
            raise ValueError("maps must be (K, H, W) arrays with the same K and dtype")
        shapes = np.array([m.shape[1:] for m in maps], dtype=np.int64)
        Hm, Wm = shapes.max(axis=0)
        stacked = np.zeros((len(maps), maps[0].shape[0], Hm, Wm), dtype=maps[0].dtype)
        for i, m in enumerate(maps):
            stacked[i, :, : m.shape[1], : m.shape[2]] = m
    if map_hw is None:
        if shapes is None:
            shapes = np.tile(np.array(stacked.shape[2:], dtype=np.int64), (len(stacked), 1))
        hw = shapes
    else:
        hw = np.asarray(map_hw, dtype=np.int64).reshape(-1, 2)
    if len(hw) != len(stacked):
        raise ValueError(f"{len(hw)} map sizes for {len(stacked)} maps")
    if (hw < 1).any() or (hw[:, 0] > stacked.shape[2]).any() or (hw[:, 1] > stacked.shape[3]).any():
        raise ValueError("valid map sizes must be within the padded maps")
    return np.ascontiguousarray(stacked), np.ascontiguousarray(hw)


def _path_args(stacked: np.ndarray, levels: int, alpha: int) -> tuple:
    """`(kind, maps_q, maps_f, table, roots)` for the kernel: uint8 maps take the LUT path, float maps
    the float path; the other path's maps and tables are 1-element dummies."""
    Hm, Wm = stacked.shape[2:]
    if stacked.dtype == np.uint8:
        if Hm * Wm > max_exact_cells(levels, alpha):
            raise ValueError(f"{Hm}x{Wm} cells: sums of {levels}^{alpha} would overflow int64")
        if int(stacked.max()) > levels:
            raise ValueError(f"map levels exceed {levels}")
        return LUT, stacked, np.zeros((1, 1, 1, 1), np.float32), power_table(levels, alpha), root_table(alpha)
    if np.issubdtype(stacked.dtype, np.floating):
        if not np.isfinite(stacked).all():
            raise ValueError("maps contain NaN or infinite values")
        maps_f = np.ascontiguousarray(stacked, dtype=np.float32)
        return FLOAT, np.zeros((1, 1, 1, 1), np.uint8), maps_f, np.zeros(1, np.int64), np.zeros(1)
    raise ValueError(f"maps must be uint8 (quantised) or float, got {stacked.dtype}")


@njit(cache=True, nogil=True)
def _rerank_chunk_sparse(c, n_chunks, sel, map_hw, chan_start, chans, cell_start, cell_nnz, nz_start, nz_chan,
                         nz_level, table, roots, no_f, no_i, qv, t, a_lo, a_hi, refine_step, passes, regions,
                         reg_start, reg_count, max_cells, seg_rows, boxes, scores, n_scored, vecs, regs, n_regs):
    """Maps `sel[c], sel[c + n_chunks], ...` of sparse maps, one after the other in one thread's scratch;
    output `o` is map `sel[o]`. The maps' regional unit vectors follow each other in `regs` from row
    `c * seg_rows` (this thread's segment), `n_regs[o]` rows each. The integral image covers the map's
    valid cells and its active channels only, built from the non-zeros in one pass
    (`integral.integral_lut_sparse_into`)."""
    N = sel.shape[0]
    K = qv.shape[0]
    flat = np.empty(max_cells, dtype=np.int64)
    acc = np.empty(K, dtype=np.int64)
    ch = np.empty(K, dtype=np.int64)
    qc = np.empty(K)
    d = np.empty(K)
    bits = d.view(np.int64)
    f = np.empty(K)
    no_vec = np.empty(0)
    at = c * seg_rows
    most = max(1, reg_count.max())
    for o in range(c, N, n_chunks):
        i = sel[o]
        h, w = map_hw[i, 0], map_hw[i, 1]
        c0 = chan_start[i]
        C = chan_start[i + 1] - c0
        for j in range(C):
            ch[j] = chans[c0 + j]
            qc[j] = qv[ch[j]]
        sums = flat[:(h + 1) * (w + 1) * C].reshape((h + 1, w + 1, C))
        n0, n1 = nz_start[i], nz_start[i + 1]
        integral_lut_sparse_into(h, w, C, cell_nnz[cell_start[i]:cell_start[i + 1]], nz_chan[n0:n1],
                                 nz_level[n0:n1], table, sums, acc)
        ii = (LUT, sums, roots, no_f, no_f, no_i, no_vec, 0.1)
        sc, n, nr = _localise_one(ii, qc[:C], h, w, t, a_lo, a_hi, refine_step, passes, regions, reg_start,
                                  reg_count, d[:C], bits[:C], f[:C], ch[:C], boxes[o], vecs[o], regs[at:at + most])
        scores[o] = sc
        n_scored[o] = n
        n_regs[o] = nr
        at += nr


def _check_search(t, s, passes, refine_step, block, query_aspect) -> None:
    if int(t) < 1 or not s >= 1.0 or int(passes) < 0 or int(refine_step) < 0 or int(block) < 1:
        raise ValueError(f"need t >= 1, s >= 1, passes >= 0, refine_step >= 0, block >= 1; "
                         f"got {t}, {s}, {passes}, {refine_step}, {block}")
    if not (query_aspect > 0 and np.isfinite(query_aspect)):
        raise ValueError(f"query_aspect must be positive, got {query_aspect}")


def _run_blocks(N, K, Hm, Wm, qv, q_rmac, whitening, L, query_aspect, s, n_threads, block, chunk) -> RerankResult:
    """The batch driver shared by the sparse and dense kernels: output arrays, R-MAC region tables,
    threads over interleaved maps, blocks of `block` maps with one whitening matmul each.
    `chunk(c, n_chunks, b, reg_tables, outputs...)` runs one thread's share of the block slice `b`."""
    rmac_mode = q_rmac is not None
    if rmac_mode:
        q_r = l2n(np.asarray(q_rmac, dtype=np.float32).reshape(-1))
        D = whitening.dim if whitening is not None else K
        if q_r.shape[0] != D:
            raise ValueError(f"query R-MAC has {q_r.shape[0]} dimensions, localised R-MACs {D}")
        # sizes rounded up to 8 cells: a batch's largest map varies a little from query to query, and
        # a new table costs up to ~0.15 s (a `region_grid` per box size not made before), a bigger one nothing
        tables = _region_table(-(-int(Hm) // 8) * 8, -(-int(Wm) // 8) * 8, int(L))
    else:  # no regions: the MAC variant
        tables = (np.zeros((1, 4), np.int64), np.zeros((1, 1), np.int64), np.zeros((Hm + 1, Wm + 1), np.int64))
    boxes = np.zeros((N, 4), dtype=np.int64)
    scores = np.zeros(N)
    n_scored = np.zeros(N, dtype=np.int64)
    vecs = np.zeros((N, K), dtype=np.float32)
    n_regs = np.zeros(N, dtype=np.int64)
    block = min(int(block), N)
    n_chunks = max(1, min(block, int(n_threads) if n_threads is not None else numba.get_num_threads()))
    # Each thread writes its maps' unit regional vectors one after the other in its own segment of
    # `regs`, so that a segment's rows go to the whitening matmul as they are (no gathering copy).
    seg_rows = -(-block // n_chunks) * max(1, int(tables[2].max()))
    regs = np.empty((n_chunks * seg_rows, K), dtype=np.float32)
    rvecs = np.zeros((N, whitening.dim if rmac_mode and whitening is not None else K), dtype=np.float32)
    # A nogil kernel on Python threads: the parallelism of a numba prange over the chunks at less
    # than half the compile time (parfors re-optimise the whole inlined search code).
    pool = ThreadPoolExecutor(n_chunks) if n_chunks > 1 else None
    try:
        for b0 in range(0, N, block):
            b = slice(b0, min(N, b0 + block))
            nb = b.stop - b0
            outs = (seg_rows, boxes[b], scores[b], n_scored[b], vecs[b], regs, n_regs[b])
            if pool is None:
                chunk(0, 1, b, tables, *outs)
            else:
                list(pool.map(lambda c: chunk(c, n_chunks, b, tables, *outs), range(min(n_chunks, nb))))
            if rmac_mode:
                for c in range(min(n_chunks, nb)):
                    mine = np.arange(b0 + c, b.stop, n_chunks)
                    offsets = np.concatenate([[0], np.cumsum(n_regs[mine])])
                    rows = regs[c * seg_rows:c * seg_rows + offsets[-1]]
                    rvecs[mine] = rmac_aggregate_many(rows, offsets, whitening, unit=True)
    finally:
        if pool is not None:
            pool.shutdown()
    if not rmac_mode:
        return RerankResult(scores.copy(), boxes, vecs, scores, n_scored)
    return RerankResult((rvecs @ q_r).astype(np.float64), boxes, rvecs, scores, n_scored)


def rerank(
    maps: Sequence[np.ndarray] | np.ndarray | SparseMaps,
    q_mac: np.ndarray,
    query_aspect: float,
    *,
    map_hw: np.ndarray | None = None,
    select: np.ndarray | None = None,
    q_rmac: np.ndarray | None = None,
    whitening: _wh.Whitening | None = None,
    L: int = 3,
    levels: int = 31,
    alpha: int = ALPHA,
    t: int = 3,
    s: float = 1.1,
    passes: int = 5,
    refine_step: int = 3,
    n_threads: int | None = None,
    block: int = 64,
) -> RerankResult:
    """Localised similarity of the query to every database map.

    `maps`: `SparseMaps` (the stored form, exact LUT path), or quantised uint8 maps (converted to
    `SparseMaps`, LUT path, levels `0..levels`), or float maps (dense float path, for checking); the
    arrays either a list of `(K, h_i, w_i)` arrays or one padded `(N, K, Hm, Wm)` array with the valid
    sizes in `map_hw` (N, 2) `(h, w)`. `select` (SparseMaps only): re-rank only these maps, results in
    this order (no copy of the maps). `q_mac`: the query crop's MAC (K,). With `q_rmac` (the query's
    R-MAC, built with `whitening`) the R-MAC variant scores and returns localised R-MACs; otherwise the
    MAC variant. `n_threads` threads share the maps (default: numba's thread count). Maps go through
    in blocks of `block`, each with one whitening matmul for all its regional vectors, which bounds
    the memory of those vectors (up to `block * 50 * K` floats at 22 x 30 cells); 64 measured faster
    than 256 (the block's temporaries stay in cache).
    """
    if not isinstance(maps, SparseMaps):
        if select is not None:
            raise ValueError("select goes with SparseMaps")
        first = maps[0] if isinstance(maps, (list, tuple)) and len(maps) else maps
        if isinstance(first, np.ndarray) and first.dtype != np.uint8:
            return rerank_dense(maps, q_mac, query_aspect, map_hw=map_hw, q_rmac=q_rmac, whitening=whitening,
                                L=L, levels=levels, alpha=alpha, t=t, s=s, passes=passes, refine_step=refine_step,
                                n_threads=n_threads, block=block)
        if isinstance(maps, (list, tuple)) and not maps:
            raise ValueError("no maps to re-rank")
        maps = sparse_maps(maps, map_hw)
    sp = maps
    sel = np.arange(sp.n_maps, dtype=np.int64) if select is None else np.asarray(select, dtype=np.int64).reshape(-1)
    if len(sel) == 0:
        raise ValueError("no maps to re-rank")
    if (sel < 0).any() or (sel >= sp.n_maps).any():
        raise ValueError(f"select must index the {sp.n_maps} maps")
    K = sp.channels
    qv = unit_query(q_mac, K)
    _check_search(t, s, passes, refine_step, block, query_aspect)
    hw = np.ascontiguousarray(sp.map_hw, dtype=np.int64)
    h, w = hw[sel, 0], hw[sel, 1]
    if (h < 1).any() or (w < 1).any():
        raise ValueError("cannot re-rank an empty map (0 cells)")
    if int((h * w).max()) > max_exact_cells(levels, alpha):
        raise ValueError(f"{int((h * w).max())} cells: sums of {levels}^{alpha} would overflow int64")
    if sp.nz_level.size and int(sp.nz_level.max()) > levels:
        raise ValueError(f"map levels exceed {levels}")
    C = sp.chan_start[sel + 1] - sp.chan_start[sel]
    max_cells = int(((h + 1) * (w + 1) * C).max())
    table, roots = power_table(levels, alpha), root_table(alpha)
    a_lo, a_hi = aspect_bounds(float(query_aspect), float(s))
    arrays = (hw, sp.chan_start, sp.chans, sp.cell_start, sp.cell_nnz, sp.nz_start, sp.nz_chan, sp.nz_level,
              table, roots, _NO_F64, _NO_I32)

    def chunk(c, n_chunks, b, tables, *outs):
        _rerank_chunk_sparse(c, n_chunks, sel[b], *arrays, qv, int(t), a_lo, a_hi, int(refine_step), int(passes),
                             *tables, max_cells, *outs)

    return _run_blocks(len(sel), K, int(h.max()), int(w.max()), qv, q_rmac, whitening, L, query_aspect, s,
                       n_threads, block, chunk)


def rerank_dense(
    maps: Sequence[np.ndarray] | np.ndarray,
    q_mac: np.ndarray,
    query_aspect: float,
    *,
    map_hw: np.ndarray | None = None,
    q_rmac: np.ndarray | None = None,
    whitening: _wh.Whitening | None = None,
    L: int = 3,
    levels: int = 31,
    alpha: int = ALPHA,
    t: int = 3,
    s: float = 1.1,
    passes: int = 5,
    refine_step: int = 3,
    n_threads: int | None = None,
    block: int = 256,
) -> RerankResult:
    """`rerank` on dense (padded) maps: the float path (float maps), and for uint8 maps the dense LUT
    kernel that the sparse one replaced (kept as `rmac bench search`'s baseline, not used by search)."""
    stacked, hw = _stack_maps(maps, map_hw)
    N, K, Hm, Wm = stacked.shape
    qv = unit_query(q_mac, K)
    _check_search(t, s, passes, refine_step, block, query_aspect)
    kind, maps_q, maps_f, table, roots = _path_args(stacked, levels, alpha)
    a_lo, a_hi = aspect_bounds(float(query_aspect), float(s))

    def chunk(c, n_chunks, b, tables, *outs):
        _rerank_chunk(c, n_chunks, kind, maps_q[b] if kind == LUT else maps_q, maps_f[b] if kind == FLOAT else maps_f,
                      hw[b], table, roots, float(alpha), qv, int(t), a_lo, a_hi, int(refine_step), int(passes),
                      *tables, *outs)

    return _run_blocks(N, K, Hm, Wm, qv, q_rmac, whitening, L, query_aspect, s, n_threads, block, chunk)


# ---------------------------------------------------------------------------------------------
# query expansion


def query_expansion(q: np.ndarray, vectors: np.ndarray, order: np.ndarray, k: int = 5) -> np.ndarray:
    """`l2n(mean(q, vectors[order[:k]]))`: the query merged with its top-`k` re-ranked (localised)
    vectors (rows of `vectors` (N, D), `order` the re-ranked order as row indices). Inputs are
    l2-normalised first, so each counts once whatever its norm. Returns float32 `(D,)`."""
    q = l2n(np.asarray(q, dtype=np.float32).reshape(-1))
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != q.shape[0]:
        raise ValueError(f"vectors {vectors.shape} do not match the query dimension {q.shape[0]}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    top = l2n(vectors[np.asarray(order, dtype=np.int64)[:k]])
    return l2n(np.concatenate([q[None, :], top]).mean(axis=0))


def rescore(q: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Cosine-style scores `vectors @ q` (float64 `(N,)`): the expanded query against the short-list."""
    return (np.asarray(vectors, dtype=np.float32) @ np.asarray(q, dtype=np.float32).reshape(-1)).astype(np.float64)
