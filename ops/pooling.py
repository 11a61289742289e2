"""Global and regional pooling of activation maps `(K, H, W)`, and the paper's R-MAC aggregation."""

from __future__ import annotations

import numpy as np
from numba import njit

from rmac.ops import whitening as _wh
from rmac.ops.integral import SparseMaps
from rmac.ops.regions import rmac_regions

__all__ = ["l2n", "mac", "gem", "regional_mac", "regional_mac_sparse", "regional_sum", "rmac_aggregate",
           "rmac_aggregate_many", "rmac"]


def l2n(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """l2-normalise along `axis`; vectors with norm below `eps` (e.g. zero) are divided by `eps`.

    Floating inputs keep their dtype, anything else becomes float32.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps).astype(x.dtype)


def _check_maps(maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(maps)
    if maps.ndim != 3 or 0 in maps.shape[1:]:
        raise ValueError(f"expected non-empty activation maps (K, H, W), got shape {maps.shape}")
    return maps


def mac(maps: np.ndarray) -> np.ndarray:
    """MAC: spatial max of every channel, float32 `(K,)`."""
    return _check_maps(maps).max(axis=(1, 2)).astype(np.float32)


def gem(maps: np.ndarray, p: float = 3.0, eps: float = 1e-6) -> np.ndarray:
    """Generalised mean `(mean_p max(x, eps)^p)^(1/p)` of every channel, float32 `(K,)`."""
    x = np.maximum(_check_maps(maps).astype(np.float64), eps)
    return (np.mean(x**p, axis=(1, 2)) ** (1.0 / p)).astype(np.float32)


def _check_regions(regions: np.ndarray, W: int, H: int) -> np.ndarray:
    """Regions as int64 `(R, 4)` rows `(x, y, w, h)`; ValueError unless each is non-empty and inside."""
    regions = np.asarray(regions, dtype=np.int64).reshape(-1, 4)
    x, y, w, h = regions.T
    if (w < 1).any() or (h < 1).any() or (x < 0).any() or (y < 0).any() or (x + w > W).any() or (y + h > H).any():
        raise ValueError(f"regions must be non-empty and inside the {W}x{H} map")
    return regions


def regional_mac(maps: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Max-pooled vector of each region `(x, y, w, h)` (cells, half-open): float32 `(R, K)`.

    One numpy reduction per region on a channels-last copy of the maps, so every step is a
    contiguous element-wise max over K channels. Measured faster than fully vectorised forms
    (two `np.maximum.reduceat` passes were 5-10x slower) for R-MAC's ~20 regions.
    """
    maps = _check_maps(maps)
    K, H, W = maps.shape
    regions = _check_regions(regions, W, H)
    hwk = np.ascontiguousarray(maps.transpose(1, 2, 0))
    out = np.empty((len(regions), K), dtype=np.float32)
    for r, (x0, y0, w0, h0) in enumerate(regions.tolist()):
        out[r] = hwk[y0 : y0 + h0, x0 : x0 + w0].max(axis=(0, 1))
    return out


def regional_mac_sparse(maps: SparseMaps, i: int, regions: np.ndarray, scale: float) -> np.ndarray:
    """`regional_mac` of map ``i`` of stored quantised maps, dequantised by ``scale`` (> 0): float32
    `(R, K)`, the same numbers as `regional_mac(dequantise(maps.dense(i), scale), regions)`.

    A max commutes with a positive scale, so the levels are max-pooled first, in one pass over the map's
    non-zeros (each added to the regions holding its cell); no dense map is made. Indexing spent most of
    its time making dense float maps and scanning their zeros (~95 % of a stored map's values).
    """
    h, w = (int(v) for v in maps.map_hw[i])
    regions = _check_regions(regions, w, h)
    levels = np.zeros((len(regions), maps.channels), np.uint8)
    a, b = maps.nz_start[i], maps.nz_start[i + 1]
    _regional_max_levels(maps.chans[maps.chan_start[i]:maps.chan_start[i + 1]],
                         maps.cell_nnz[maps.cell_start[i]:maps.cell_start[i + 1]], maps.nz_chan[a:b],
                         maps.nz_level[a:b], w, regions, levels)
    return levels.astype(np.float32) * np.float32(scale)


@njit(cache=True, nogil=True)
def _regional_max_levels(chans, cell_nnz, nz_chan, nz_level, w, regions, out):
    n = 0
    for c in range(cell_nnz.shape[0]):
        y, x = c // w, c % w
        first = n
        n += cell_nnz[c]
        for r in range(regions.shape[0]):
            x0, y0 = regions[r, 0], regions[r, 1]
            if x0 <= x < x0 + regions[r, 2] and y0 <= y < y0 + regions[r, 3]:
                for t in range(first, n):
                    ch = chans[nz_chan[t]]
                    if nz_level[t] > out[r, ch]:
                        out[r, ch] = nz_level[t]


def _check_regional(regional: np.ndarray) -> np.ndarray:
    regional = np.asarray(regional)
    if regional.ndim != 2:
        raise ValueError(f"expected regional vectors (R, K), got shape {regional.shape}")
    return regional


def _whiten_regions(regional: np.ndarray, whitening: _wh.Whitening | None) -> np.ndarray:
    """l2n -> PCA-whitening (if given) -> l2n of every regional vector."""
    v = l2n(np.asarray(regional, dtype=np.float32))
    if whitening is not None:
        v = l2n(_wh.apply(whitening, v))
    return v


def rmac_aggregate(regional: np.ndarray, whitening: _wh.Whitening | None = None) -> np.ndarray:
    """The paper's R-MAC from regional vectors `(R, K)`: each l2n, whitened, l2n; summed; l2n.

    Returns float32 `(D,)` (D = K without whitening). No regions give the zero vector.
    """
    v = _whiten_regions(_check_regional(regional), whitening)
    return l2n(v.sum(axis=0, dtype=np.float32))


def rmac_aggregate_many(
    regional: np.ndarray, offsets: np.ndarray, whitening: _wh.Whitening | None = None, unit: bool = False
) -> np.ndarray:
    """R-MAC of N images at once: image `i` owns rows `offsets[i]:offsets[i+1]` of `regional`.

    One whitening matmul for all regions (in the whitening's triangular basis when D = K: see
    `whitening.Basis`), then one pass that l2-normalises and sums each image's rows. `unit`: the rows
    are l2-normalised already (re-ranking writes them so). Returns float32 `(N, D)`; an image without
    regions gets the zero vector.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    regional = _check_regional(regional)
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(regional):
        raise ValueError("offsets must run from 0 to len(regional)")
    if (np.diff(offsets) < 0).any():
        raise ValueError("offsets must be non-decreasing")
    v = np.asarray(regional, dtype=np.float32)
    if not unit:
        v = l2n(v)
    basis = _wh.triangular_basis(whitening) if whitening is not None else None
    if basis is not None:  # the same cosines in the triangular basis, at half the multiply-adds
        v = _wh.apply_basis(basis, v, shift=False)
        shift = basis.shift
    else:
        if whitening is not None:
            v = _wh.apply(whitening, v)
        shift = np.zeros(v.shape[1], np.float32)
    sums = np.zeros((len(offsets) - 1, v.shape[1]), dtype=np.float32)
    _unit_segment_sums(np.ascontiguousarray(v), shift, offsets, sums)
    out = l2n(sums)
    return out if basis is None else out @ basis.back


@njit(cache=True, nogil=True, fastmath=True)
def _unit_segment_sums(v, shift, offsets, out):
    """`out[i] = sum of l2n(v[r] - shift)` over rows `offsets[i]:offsets[i+1]` (a zero row adds nothing)."""
    for i in range(out.shape[0]):
        for r in range(offsets[i], offsets[i + 1]):
            nn = np.float32(0.0)
            for j in range(v.shape[1]):
                x = v[r, j] - shift[j]
                nn += x * x
            if nn > 0.0:
                inv = np.float32(1.0 / np.sqrt(np.float64(nn)))
                for j in range(v.shape[1]):
                    out[i, j] += (v[r, j] - shift[j]) * inv


def rmac(maps: np.ndarray, L: int = 3, whitening: _wh.Whitening | None = None) -> np.ndarray:
    """R-MAC of one activation map `(K, H, W)` over the `L`-level region grid: float32 `(D,)`."""
    maps = _check_maps(maps)
    _, H, W = maps.shape
    return rmac_aggregate(regional_mac(maps, rmac_regions(W, H, L)), whitening)


def regional_sum(maps: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Sum-pooled vector of each region `(x, y, w, h)` (cells, half-open): float32 `(R, K)`.

    The paper's Section 8 ablation (sum-pooling is integral max-pooling with alpha = 1): one float64
    integral image, 4 terms per region."""
    maps = _check_maps(maps)
    K, H, W = maps.shape
    x, y, w, h = _check_regions(regions, W, H).T
    ii = np.zeros((H + 1, W + 1, K))
    ii[1:, 1:] = maps.transpose(1, 2, 0).astype(np.float64).cumsum(0).cumsum(1)
    out = ii[y + h, x + w] - ii[y, x + w] - ii[y + h, x] + ii[y, x]
    return np.maximum(out, 0.0).astype(np.float32)  # non-negative maps: clear the round-off
