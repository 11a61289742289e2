"""The R-MAC region grid of Tolias et al. (ICLR 2016), on the activation map.

A port of the released MATLAB `rmac_regions.m`. Everything is computed in float64, like MATLAB:
a float32 port misplaces the last region by one cell for some aspect ratios (e.g. W=2, H=32, L=2)
because `i * b` lands just under an integer before the floor.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["rmac_regions", "region_grid"]

_OVERLAP = 0.4  # target overlap of neighbouring regions
_STEPS = np.arange(2, 8, dtype=np.float64)  # candidate region counts along the long side


def _extra_regions(W: int, H: int) -> tuple[int, int]:
    """Extra regions `(Wd, Hd)` along the long side, chosen for an overlap closest to 40%."""
    w = min(W, H)
    b = (max(W, H) - w) / (_STEPS - 1)
    idx = int(np.argmin(np.abs((w * w - w * b) / (w * w) - _OVERLAP)))  # first minimum, as MATLAB
    if H < W:
        return idx + 1, 0
    if H > W:
        return 0, idx + 1
    return 0, 0


def _edges(size: int, wl: int, wl2: int, n: int) -> np.ndarray:
    """Left (or top) edges of the `n` regions of side `wl` spread uniformly along `size` cells."""
    b = (size - wl) / (n - 1) if n > 1 else 0.0
    return (np.floor(wl2 + np.arange(n, dtype=np.float64) * b) - wl2).astype(np.int64)


def rmac_regions(W: int, H: int, L: int = 3) -> np.ndarray:
    """Square R-MAC regions on a `W x H` activation map, for scales `l = 1..L`.

    Returns int64 `(R, 4)` rows `(x, y, w, h)` in cells (half-open `[x, x+w) x [y, y+h)`),
    ordered by level, then row (y), then column (x). Level `l` has `(l + Wd) * (l + Hd)` regions
    of side `floor(2 min(W, H) / (l + 1))`; levels whose side would be 0 are skipped.
    """
    W, H, L = int(W), int(H), int(L)
    if W < 1 or H < 1 or L < 0:
        raise ValueError(f"need W, H >= 1 and L >= 0, got W={W}, H={H}, L={L}")
    w = min(W, H)
    Wd, Hd = _extra_regions(W, H)
    out = []
    for l in range(1, L + 1):
        wl = (2 * w) // (l + 1)
        if wl == 0:
            continue
        wl2 = int(np.floor(wl / 2 - 1))
        xs = _edges(W, wl, wl2, l + Wd)
        ys = _edges(H, wl, wl2, l + Hd)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")  # row-major: y outer, x inner
        level = np.empty((yy.size, 4), dtype=np.int64)
        level[:, 0] = xx.ravel()
        level[:, 1] = yy.ravel()
        level[:, 2:] = wl
        out.append(level)
    if not out:
        return np.zeros((0, 4), dtype=np.int64)
    return np.concatenate(out)


@lru_cache(maxsize=4096)
def region_grid(W: int, H: int, L: int = 3) -> np.ndarray:
    """`rmac_regions`, kept per map size for the process and read-only: a grid costs ~0.2 ms to make, and
    a store's maps come in a few hundred sizes (at 1M the vector stage made ~90 new grids a partition when
    they were kept per call: 10 % of its time). Copy it to change it."""
    grid = rmac_regions(W, H, L)
    grid.flags.writeable = False
    return grid
