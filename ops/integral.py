"""Approximate integral max-pooling (paper, Eq. 3): `f~_R,i = (sum_{p in R} X_i(p)^alpha)^(1/alpha)`.

An integral image of `X^alpha` gives the sum over any box from 4 terms, so a region's vector costs
O(K) whatever its size. Two paths:

- LUT path (quantised maps, the default for re-ranking). `X^alpha` comes from a power table over the
  integer levels `0..levels`; the integral images are int64 and every region sum is *exact* (the
  table guarantees `levels^alpha * cells < 2^63`). The alpha-th root reads a table indexed by the
  exponent and the top `ROOT_BITS` mantissa bits of the sum as a float64: no search, no `pow`, one
  gather per channel, relative error <= `ROOT_MAX_REL_ERR` (7.8e-4 at 6 bits, 32 KB of table).
  `rmac bench aml` compares it on 1.3M real region sums with `pow` and with the paper's binary
  search over the power table plus linear interpolation in the bracket: 1.5-2.5 ns per root against
  9-14 ns for `pow` and 10 ns for the (branchy) search, whose interpolation is also off by up to 19%
  between low levels (the power curve is far from linear there).

- Float path (float maps, for checking). `X^10` spans hundreds of orders of magnitude, and in float64
  the 4-term difference of large sums cancels catastrophically: a region far from a channel's maximum
  gets an absolute error ~`eps * sum`, i.e. `(eps * H * W)^(1/alpha)` ~ 7% of the channel max after
  the root. Countermeasures, all per channel: values are divided by the channel max first (so
  `Y = (X/max)^alpha <= 1`, no overflow); the integral image is a double-double (hi + lo, ~106 bits)
  built and differenced with error-free transformations; an int32 integral image of the non-zero
  count makes regions of exact zeros exactly 0; negative round-off is clamped to 0.
  Error bound (c a small constant; the tests check it with c = 64):
  `|S - S_true| <= c * (H + W) * 2^-104 * H * W` on the normalised sum (each integral-image entry
  takes <= H + W double-double additions of terms <= H * W), so
  `|f~ - f~_true| <= max_i * (c (H + W) H W 2^-104)^(1/alpha)`: an absolute floor of 0.4% of the
  channel max for 64 x 64 maps, 0.3% for 16 x 16 (typically far less), and a relative error of
  `(1/alpha) * floor_S / S_true` above it, e.g. <= 2e-5 for a region at 1% of the channel max
  (the tests see < 1e-9).

Integral images are channels-last, `(H+1, W+1, K)` C-contiguous: the 4 corners of a box are then 4
contiguous K-vectors, which the per-window loops read with SIMD (the `(K, H+1, W+1)` layout
gathers 4 strided values per channel instead).

Boxes are `(x, y, w, h)` in cells, half-open. Vectors come out in the units of the input: quantisation
levels on the LUT path (multiply by the image's scale for activation units), activations on the float
path.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import numpy as np
from numba import njit

__all__ = [
    "ALPHA",
    "ROOT_BITS",
    "ROOT_MAX_REL_ERR",
    "ROOT_SHIFT",
    "ROOT_OFFSET",
    "LutIntegral",
    "FloatIntegral",
    "power_table",
    "max_exact_cells",
    "root_table",
    "table_root",
    "integral_lut",
    "integral_float",
    "region_vector",
    "region_vectors",
    "kernel_args",
    "SparseMaps",
    "sparse_maps",
    "integral_lut_sparse",
    "integral_lut_sparse_into",
    "take_maps",
]

ALPHA = 10
ROOT_BITS = 6
ROOT_SHIFT = 52 - ROOT_BITS  # float64 bits >> ROOT_SHIFT = biased exponent and top mantissa bits
ROOT_OFFSET = (1023 << ROOT_BITS) - 1  # S = 1 (exponent 0, mantissa 0) -> index 1; index 0 is S = 0
_INT64_MAX = 2**63 - 1


# Worst relative error of a root-table entry: the widest bucket (mantissa 0) spans a ratio
# rho = (1 + 2^-bits)^(1/alpha) of roots, and its harmonic-mean entry is off by (rho - 1)/(rho + 1).
_RHO = (1.0 + 2.0**-ROOT_BITS) ** (1.0 / ALPHA)
ROOT_MAX_REL_ERR = (_RHO - 1.0) / (_RHO + 1.0)


class LutIntegral(NamedTuple):
    """Exact int64 integral images of `table[q]` `(H+1, W+1, K)` and the root table for their sums."""

    sums: np.ndarray
    roots: np.ndarray

    @property
    def map_hw(self) -> tuple[int, int]:
        return self.sums.shape[0] - 1, self.sums.shape[1] - 1


class FloatIntegral(NamedTuple):
    """Double-double integral images of `(X / cmax)^alpha` (`hi + lo`, `(H+1, W+1, K)`), the non-zero
    count's integral image `nnz`, the per-channel maxima `cmax` `(K,)` and `1 / alpha`."""

    hi: np.ndarray
    lo: np.ndarray
    nnz: np.ndarray
    cmax: np.ndarray
    inv_alpha: float

    @property
    def map_hw(self) -> tuple[int, int]:
        return self.hi.shape[0] - 1, self.hi.shape[1] - 1


Integral = Union[LutIntegral, FloatIntegral]


def power_table(levels: int = 31, alpha: int = ALPHA) -> np.ndarray:
    """`T[v] = v^alpha` for `v = 0..levels`, exact int64; ValueError if `levels^alpha` overflows."""
    levels, alpha = int(levels), int(alpha)
    if levels < 1 or alpha < 1:
        raise ValueError(f"need levels >= 1 and alpha >= 1, got {levels}, {alpha}")
    if levels**alpha > _INT64_MAX:
        raise ValueError(f"{levels}^{alpha} does not fit in int64")
    return np.array([v**alpha for v in range(levels + 1)], dtype=np.int64)


def max_exact_cells(levels: int = 31, alpha: int = ALPHA) -> int:
    """The largest number of cells whose `sum of q^alpha` is exact in int64 (31 levels, alpha 10: 11253)."""
    return _INT64_MAX // (int(levels) ** int(alpha))


def root_table(alpha: int = ALPHA) -> np.ndarray:
    """Alpha-th roots of the sums `S` in `[1, 2^63)`, indexed by the exponent and the top `ROOT_BITS`
    mantissa bits of `float(S)` (index 0 stands for `S = 0`). Each bucket `[a, b)` holds the value with
    the smallest worst relative error, the harmonic mean of `a^(1/alpha)` and `b^(1/alpha)`."""
    n = 63 << ROOT_BITS
    i = np.arange(n, dtype=np.float64)
    e, m = np.floor(i / 2**ROOT_BITS), np.mod(i, 2**ROOT_BITS)
    lo = (2.0**e * (1.0 + m / 2**ROOT_BITS)) ** (1.0 / alpha)
    hi = (2.0**e * (1.0 + (m + 1) / 2**ROOT_BITS)) ** (1.0 / alpha)
    return np.concatenate([[0.0], 2.0 * lo * hi / (lo + hi)])


@njit(cache=True)
def _lut_roots(d: np.ndarray, bits: np.ndarray, roots: np.ndarray, out: np.ndarray) -> None:
    """`out[k] = root(d[k])` for float64 sums `d` that `bits` (a view of `d` as int64) aliases."""
    last = roots.shape[0] - 1
    for k in range(d.shape[0]):
        i = (bits[k] >> ROOT_SHIFT) - ROOT_OFFSET
        i = min(max(i, 0), last)
        out[k] = roots[i]


def table_root(sums: np.ndarray, roots: np.ndarray | None = None) -> np.ndarray:
    """Alpha-th roots of non-negative integer sums through the root table (float64, same shape)."""
    roots = root_table() if roots is None else roots
    d = np.ascontiguousarray(sums, dtype=np.float64).reshape(-1).copy()
    out = np.empty_like(d)
    _lut_roots(d, d.view(np.int64), roots, out)
    return out.reshape(np.shape(sums))


# ---------------------------------------------------------------------------------------------
# building the integral images


@njit(cache=True)
def integral_lut_into(q, h, w, chans, table, out):
    """Fill `out[:h+1, :w+1]` (int64 `(>=h+1, >=w+1, len(chans))`) with the integral image of
    `table[q[chans, :h, :w]]`: channel `j` of `out` is channel `chans[j]` of `q`."""
    C = chans.shape[0]
    acc = np.empty(C, dtype=np.int64)
    for x in range(w + 1):
        for j in range(C):
            out[0, x, j] = 0
    for y in range(h):
        for j in range(C):
            acc[j] = 0
            out[y + 1, 0, j] = 0
        for x in range(w):
            for j in range(C):
                acc[j] += table[q[chans[j], y, x]]
                out[y + 1, x + 1, j] = out[y, x + 1, j] + acc[j]


def _check_box_map(maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(maps)
    if maps.ndim != 3 or 0 in maps.shape:
        raise ValueError(f"expected non-empty maps (K, H, W), got shape {maps.shape}")
    return maps


def integral_lut(q: np.ndarray, levels: int = 31, alpha: int = ALPHA) -> LutIntegral:
    """Exact int64 integral images `(H+1, W+1, K)` of `q^alpha` for uint8 maps `q` `(K, H, W)` in `0..levels`."""
    q = _check_box_map(q)
    if q.dtype != np.uint8:
        raise ValueError(f"expected uint8 quantised maps, got {q.dtype}")
    K, H, W = q.shape
    if H * W > max_exact_cells(levels, alpha):
        raise ValueError(f"{H}x{W} cells: sums of {levels}^{alpha} would overflow int64")
    if int(q.max()) > levels:
        raise ValueError(f"map levels exceed {levels}")
    table = power_table(levels, alpha)
    sums = np.empty((H + 1, W + 1, K), dtype=np.int64)
    integral_lut_into(q, H, W, np.arange(K), table, sums)
    return LutIntegral(sums, root_table(alpha))


@njit(cache=True)
def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@njit(cache=True)
def _dd_add(ah, al, bh, bl):
    """Accurate double-double addition (error-free on the high parts, then renormalised)."""
    s, e = _two_sum(ah, bh)
    t, f = _two_sum(al, bl)
    e += t
    s2 = s + e
    e = e - (s2 - s)
    e += f
    hi = s2 + e
    return hi, e - (hi - s2)


@njit(cache=True)
def integral_float_into(x, h, w, chans, alpha, cmax, hi, lo, nnz):
    """Fill `cmax` with the maxima of `x[chans, :h, :w]` and `hi/lo/nnz[:h+1, :w+1]` with the
    double-double integral image of `(x / cmax)^alpha` and the count of non-zeros (channel `j` is
    channel `chans[j]` of `x`)."""
    C = chans.shape[0]
    for j in range(C):
        m = 0.0
        for y in range(h):
            for xx in range(w):
                m = max(m, x[chans[j], y, xx])
        cmax[j] = m
    ahi = np.zeros(C)
    alo = np.zeros(C)
    acnt = np.zeros(C, dtype=np.int32)
    for xx in range(w + 1):
        for j in range(C):
            hi[0, xx, j] = 0.0
            lo[0, xx, j] = 0.0
            nnz[0, xx, j] = 0
    for y in range(h):
        for j in range(C):
            ahi[j] = 0.0
            alo[j] = 0.0
            acnt[j] = 0
            hi[y + 1, 0, j] = 0.0
            lo[y + 1, 0, j] = 0.0
            nnz[y + 1, 0, j] = 0
        for xx in range(w):
            for j in range(C):
                v = x[chans[j], y, xx]
                if v > 0.0:  # negatives (ReLU round-off) count as 0
                    yv = (v / cmax[j]) ** alpha
                    if yv < 1e-300:  # flush what would go subnormal: far below the error floor
                        yv = 0.0
                    ahi[j], alo[j] = _dd_add(ahi[j], alo[j], yv, 0.0)
                    acnt[j] += 1
                hi[y + 1, xx + 1, j], lo[y + 1, xx + 1, j] = _dd_add(hi[y, xx + 1, j], lo[y, xx + 1, j], ahi[j], alo[j])
                nnz[y + 1, xx + 1, j] = nnz[y, xx + 1, j] + acnt[j]


def integral_float(maps: np.ndarray, alpha: float = ALPHA) -> FloatIntegral:
    """Double-double integral images of `(X / max_channel)^alpha` for float maps `(K, H, W)`.

    Negative values (round-off of a ReLU) count as 0. See the module docstring for the error bound.
    """
    x = np.ascontiguousarray(_check_box_map(maps), dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("maps contain NaN or infinite values")
    K, H, W = x.shape
    cmax = np.empty(K)
    hi = np.empty((H + 1, W + 1, K))
    lo = np.empty((H + 1, W + 1, K))
    nnz = np.empty((H + 1, W + 1, K), dtype=np.int32)
    integral_float_into(x, H, W, np.arange(K), float(alpha), cmax, hi, lo, nnz)
    return FloatIntegral(hi, lo, nnz, cmax, 1.0 / float(alpha))


# ---------------------------------------------------------------------------------------------
# region vectors. Kernels take an integral image as the tuple of `kernel_args`, the same type for
# both paths (the other path's arrays are 1-element dummies), so one numba specialisation serves both.

LUT, FLOAT = 0, 1
_NO_I64 = np.zeros((1, 1, 1), dtype=np.int64)
_NO_F64 = np.zeros((1, 1, 1), dtype=np.float64)
_NO_I32 = np.zeros((1, 1, 1), dtype=np.int32)
_NO_VEC = np.zeros(1, dtype=np.float64)


def kernel_args(ii: Integral) -> tuple:
    """`(kind, sums, roots, hi, lo, nnz, cmax, inv_alpha)`: `ii` as the numba kernels take it."""
    if isinstance(ii, LutIntegral):
        return (LUT, ii.sums, ii.roots, _NO_F64, _NO_F64, _NO_I32, _NO_VEC, 0.1)
    if isinstance(ii, FloatIntegral):
        return (FLOAT, _NO_I64, _NO_VEC, ii.hi, ii.lo, ii.nnz, ii.cmax, float(ii.inv_alpha))
    raise TypeError(f"expected LutIntegral or FloatIntegral, got {type(ii).__name__}")


@njit(cache=True)
def fill_lut(sums, roots, x1, y1, x2, y2, d, bits, out):
    """`out = f~` of the box `[x1, x2) x [y1, y2)`; `d`/`bits`: float64 scratch and its int64 view."""
    K = sums.shape[2]
    for k in range(K):
        d[k] = np.float64(sums[y2, x2, k] - sums[y1, x2, k] - sums[y2, x1, k] + sums[y1, x1, k])
    _lut_roots(d, bits, roots, out)


@njit(cache=True)
def fill_float(hi, lo, nnz, cmax, inv_alpha, x1, y1, x2, y2, out):
    """`out = f~` of the box `[x1, x2) x [y1, y2)` on the float path."""
    K = hi.shape[2]
    for k in range(K):
        if nnz[y2, x2, k] - nnz[y1, x2, k] - nnz[y2, x1, k] + nnz[y1, x1, k] == 0:
            out[k] = 0.0
            continue
        ah, al = _dd_add(hi[y2, x2, k], lo[y2, x2, k], -hi[y1, x2, k], -lo[y1, x2, k])
        bh, bl = _dd_add(hi[y2, x1, k], lo[y2, x1, k], -hi[y1, x1, k], -lo[y1, x1, k])
        sh, sl = _dd_add(ah, al, -bh, -bl)
        s = sh + sl
        out[k] = cmax[k] * s**inv_alpha if s > 0.0 else 0.0


@njit(cache=True)
def fill_vector(ii, x1, y1, x2, y2, d, bits, out):
    """`out = f~` of `[x1, x2) x [y1, y2)` for the integral image tuple `ii` (see `kernel_args`)."""
    kind, sums, roots, hi, lo, nnz, cmax, inv_alpha = ii
    if kind == LUT:
        fill_lut(sums, roots, x1, y1, x2, y2, d, bits, out)
    else:
        fill_float(hi, lo, nnz, cmax, inv_alpha, x1, y1, x2, y2, out)


@njit(cache=True)
def _region_vectors(ii, boxes, out):
    K = out.shape[1]
    d = np.empty(K)
    bits = d.view(np.int64)
    for n in range(boxes.shape[0]):
        x, y, w, h = boxes[n, 0], boxes[n, 1], boxes[n, 2], boxes[n, 3]
        fill_vector(ii, x, y, x + w, y + h, d, bits, out[n])


def _check_boxes(boxes: np.ndarray, map_hw: tuple[int, int]) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    H, W = map_hw
    x, y, w, h = boxes.T
    if (w < 1).any() or (h < 1).any() or (x < 0).any() or (y < 0).any() or (x + w > W).any() or (y + h > H).any():
        raise ValueError(f"boxes must be non-empty and inside the {W}x{H} map")
    return np.ascontiguousarray(boxes)


def region_vectors(ii: Integral, boxes: np.ndarray) -> np.ndarray:
    """`f~` of every box `(x, y, w, h)` (`(N, 4)`, cells): float64 `(N, K)`, O(K) per box."""
    args = kernel_args(ii)
    boxes = _check_boxes(boxes, ii.map_hw)
    K = (ii.sums if args[0] == LUT else ii.hi).shape[2]
    out = np.empty((len(boxes), K))
    _region_vectors(args, boxes, out)
    return out


def region_vector(ii: Integral, box) -> np.ndarray:
    """`f~` of one box `(x, y, w, h)`: float64 `(K,)`."""
    return region_vectors(ii, np.asarray(box).reshape(1, 4))[0]


# ---------------------------------------------------------------------------------------------
# sparse maps: only the valid cells and the non-zeros of the channels with a response


class SparseMaps(NamedTuple):
    """Quantised maps of `n` images in the form the sparse kernels read: per map only its valid
    `h x w` cells, only its channels with a response, only its non-zeros, sorted by cell (row-major)
    and by channel within a cell, so that an integral image is built in one streaming pass.

    Map `i` has the valid size `map_hw[i] = (h, w)`; its `C` active channels are
    `chans[chan_start[i]:chan_start[i+1]]` (ascending original channel ids); the number of non-zeros
    in each of its `h*w` cells is `cell_nnz[cell_start[i]:cell_start[i+1]]`; its non-zeros are
    `nz_start[i]:nz_start[i+1]` of `nz_chan` (the compact channel `j`, `chans[j]` the real one) and
    `nz_level` (`1..levels`). A map without any response has `C = 0`."""

    channels: int
    map_hw: np.ndarray
    chan_start: np.ndarray
    chans: np.ndarray
    cell_start: np.ndarray
    cell_nnz: np.ndarray
    nz_start: np.ndarray
    nz_chan: np.ndarray
    nz_level: np.ndarray

    @property
    def n_maps(self) -> int:
        return int(self.map_hw.shape[0])

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self[1:]))

    def dense(self, i: int) -> np.ndarray:
        """Map `i` as a dense uint8 `(K, h, w)` array."""
        h, w = (int(v) for v in self.map_hw[i])
        out = np.zeros((self.channels, h, w), dtype=np.uint8)
        _densify(self.chans[self.chan_start[i]:self.chan_start[i + 1]],
                 self.cell_nnz[self.cell_start[i]:self.cell_start[i + 1]],
                 self.nz_chan[self.nz_start[i]:self.nz_start[i + 1]],
                 self.nz_level[self.nz_start[i]:self.nz_start[i + 1]], out)
        return out


@njit(cache=True)
def _densify(chans, cell_nnz, nz_chan, nz_level, out):
    w = out.shape[2]
    n = 0
    for c in range(cell_nnz.shape[0]):
        y, x = c // w, c % w
        for _ in range(cell_nnz[c]):
            out[chans[nz_chan[n]], y, x] = nz_level[n]
            n += 1


@njit(cache=True)
def _pack_dense(maps, hw, chan_start, cell_start, nz_start, chans, cell_nnz, nz_chan, nz_level):
    """Fill the SparseMaps arrays from padded uint8 maps `(n, K, Hm, Wm)` (offsets already computed):
    two channel-major passes (sequential reads), counting per cell, then placing at each cell's cursor."""
    K = maps.shape[1]
    cursor = np.empty(maps.shape[2] * maps.shape[3], dtype=np.int64)
    for i in range(maps.shape[0]):
        h, w = hw[i, 0], hw[i, 1]
        cs = cell_start[i]
        for c in range(h * w):
            cell_nnz[cs + c] = 0
        C = 0
        for k in range(K):
            found = False
            for y in range(h):
                for x in range(w):
                    if maps[i, k, y, x] != 0:
                        cell_nnz[cs + y * w + x] += 1
                        found = True
            if found:
                chans[chan_start[i] + C] = k
                C += 1
        at = nz_start[i]
        for c in range(h * w):
            cursor[c] = at
            at += cell_nnz[cs + c]
        for j in range(C):
            k = chans[chan_start[i] + j]
            for y in range(h):
                for x in range(w):
                    v = maps[i, k, y, x]
                    if v != 0:
                        q = cursor[y * w + x]
                        cursor[y * w + x] += 1
                        nz_chan[q] = j
                        nz_level[q] = v


def sparse_maps(maps, map_hw: np.ndarray | None = None) -> SparseMaps:
    """`SparseMaps` of quantised uint8 maps: a list of `(K, h_i, w_i)` arrays, or one padded
    `(n, K, Hm, Wm)` array with the valid sizes in `map_hw` `(n, 2)` `(h, w)` (default: all of it)."""
    if isinstance(maps, np.ndarray) and maps.ndim == 4:
        padded = maps
        hw = (np.tile(np.array(maps.shape[2:], dtype=np.int64), (len(maps), 1)) if map_hw is None
              else np.asarray(map_hw, dtype=np.int64).reshape(-1, 2))
        if len(hw) != len(padded):
            raise ValueError(f"{len(hw)} map sizes for {len(padded)} maps")
        if (hw < 0).any() or (hw[:, 0] > padded.shape[2]).any() or (hw[:, 1] > padded.shape[3]).any():
            raise ValueError("valid map sizes must be within the padded maps")
        parts = [padded]
    else:
        maps = [np.asarray(m) for m in maps]
        if any(m.ndim != 3 for m in maps) or len({m.shape[0] for m in maps}) > 1:
            raise ValueError("maps must be (K, H, W) arrays with the same K")
        if map_hw is not None:
            raise ValueError("map_hw goes with a padded (n, K, Hm, Wm) array, not a list of maps")
        hw = np.array([m.shape[1:] for m in maps], dtype=np.int64).reshape(-1, 2)
        parts = [m[None] for m in maps]
    dtypes = {p.dtype for p in parts}
    if dtypes and dtypes != {np.dtype(np.uint8)}:
        raise ValueError(f"expected uint8 quantised maps, got {sorted(map(str, dtypes))}")
    K = int(parts[0].shape[1]) if parts else 0
    n = len(hw)
    sizes = hw[:, 0] * hw[:, 1]
    cell_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if len(parts) == 1:
        m = np.ascontiguousarray(parts[0])
        crop = [m[i, :, :hw[i, 0], :hw[i, 1]] for i in range(n)]
    else:
        crop = [p[0] for p in parts]
    nnz = np.array([np.count_nonzero(c) for c in crop], dtype=np.int64)
    active = np.array([int(np.count_nonzero(c.reshape(K, -1).any(axis=1))) if c.size else 0 for c in crop],
                      dtype=np.int64)
    chan_start = np.concatenate([[0], np.cumsum(active)]).astype(np.int64)
    nz_start = np.concatenate([[0], np.cumsum(nnz)]).astype(np.int64)
    out = SparseMaps(K, hw, chan_start, np.empty(chan_start[-1], np.int32), cell_start,
                     np.empty(cell_start[-1], np.uint16), nz_start, np.empty(nz_start[-1], np.uint16),
                     np.empty(nz_start[-1], np.uint8))
    for i, c in enumerate(crop):
        one = np.ascontiguousarray(c)[None] if c.size else np.zeros((1, K, 0, 0), np.uint8)
        _pack_dense(one, hw[i:i + 1], chan_start[i:i + 2],
                    cell_start[i:i + 2], nz_start[i:i + 2], out.chans, out.cell_nnz, out.nz_chan, out.nz_level)
    return out


@njit(cache=True)
def integral_lut_sparse_into(h, w, C, cell_nnz, nz_chan, nz_level, table, out, acc):
    """Fill `out` (int64 `(h+1, w+1, C)`) with the integral image of `table[level]` of one sparse map
    (its `cell_nnz`, `nz_chan`, `nz_level`) in one pass over the cells; `acc`: int64 scratch `(>= C,)`."""
    for x in range(w + 1):
        for j in range(C):
            out[0, x, j] = 0
    n = 0
    for y in range(h):
        for j in range(C):
            acc[j] = 0
            out[y + 1, 0, j] = 0
        for x in range(w):
            for _ in range(cell_nnz[y * w + x]):
                acc[nz_chan[n]] += table[nz_level[n]]
                n += 1
            for j in range(C):
                out[y + 1, x + 1, j] = out[y, x + 1, j] + acc[j]


def integral_lut_sparse(sp: SparseMaps, i: int, levels: int = 31, alpha: int = ALPHA) -> tuple[LutIntegral, np.ndarray]:
    """Exact int64 integral images `(h+1, w+1, C)` of map `i` of `sp` over its `C` active channels only,
    and those channels' ids `(C,)`: channel `j` of the integral image is channel `chans[j]` of the map."""
    h, w = (int(v) for v in sp.map_hw[i])
    if h * w == 0:
        raise ValueError(f"map {i} is empty ({h}x{w})")
    if h * w > max_exact_cells(levels, alpha):
        raise ValueError(f"{h}x{w} cells: sums of {levels}^{alpha} would overflow int64")
    lv = sp.nz_level[sp.nz_start[i]:sp.nz_start[i + 1]]
    if lv.size and int(lv.max()) > levels:
        raise ValueError(f"map levels exceed {levels}")
    chans = sp.chans[sp.chan_start[i]:sp.chan_start[i + 1]]
    C = len(chans)
    sums = np.empty((h + 1, w + 1, C), dtype=np.int64)
    integral_lut_sparse_into(h, w, C, sp.cell_nnz[sp.cell_start[i]:sp.cell_start[i + 1]],
                             sp.nz_chan[sp.nz_start[i]:sp.nz_start[i + 1]], lv, power_table(levels, alpha),
                             sums, np.empty(max(C, 1), np.int64))
    return LutIntegral(sums, root_table(alpha)), chans.astype(np.int64)


@njit(cache=True, nogil=True)
def _gather_segments(src, start, stop, dst, at):
    """Copy `src[start[i]:stop[i]]` for each i, one after the other, into `dst` from `at`; returns the end."""
    for i in range(start.shape[0]):
        for j in range(start[i], stop[i]):
            dst[at] = src[j]
            at += 1
    return at


def take_maps(parts: list[tuple[SparseMaps, np.ndarray]]) -> SparseMaps:
    """One `SparseMaps` of the maps `idx` of each `(maps, idx)` in `parts`, in that order (a copy of
    only those maps: e.g. a query's rows from several decoded partitions)."""
    if not parts:
        raise ValueError("no maps to take")
    K = parts[0][0].channels
    parts = [(sp, np.asarray(idx, dtype=np.int64).reshape(-1)) for sp, idx in parts]
    for sp, _ in parts:
        if sp.channels != K:
            raise ValueError(f"maps with {sp.channels} and {K} channels")
    out = {"map_hw": np.concatenate([sp.map_hw[idx] for sp, idx in parts])}
    for start, fields in (("chan_start", ("chans",)), ("cell_start", ("cell_nnz",)),
                          ("nz_start", ("nz_chan", "nz_level"))):
        counts = np.concatenate([getattr(sp, start)[idx + 1] - getattr(sp, start)[idx] for sp, idx in parts])
        out[start] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        for f in fields:
            dst = np.empty(int(out[start][-1]), dtype=getattr(parts[0][0], f).dtype)
            at = 0
            for sp, idx in parts:
                off = getattr(sp, start)
                at = _gather_segments(getattr(sp, f), off[idx], off[idx + 1], dst, at)
            out[f] = dst
    return SparseMaps(K, **{f: out[f] for f in SparseMaps._fields[1:]})
