"""R-MAC region grid: exact equality with a literal transcription of the MATLAB formula."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rmac.ops.regions import region_grid, rmac_regions


def matlab_regions(W, H, L, dtype=float):
    """Literal, loop-based transcription of `rmac_regions.m` with scalar floats of type `dtype`.

    `dtype=float` is MATLAB's double; `dtype=np.float32` reproduces the torch-default port.
    """
    f = dtype
    ovr = f(0.4)
    w = min(W, H)
    best, idx = None, None
    for k, steps in enumerate(range(2, 8)):  # MATLAB's min keeps the first minimum
        b = f(max(H, W) - w) / f(steps - 1)
        err = abs((f(w) ** 2 - f(w) * b) / f(w) ** 2 - ovr)
        if best is None or err < best:
            best, idx = err, k
    Wd = idx + 1 if H < W else 0
    Hd = idx + 1 if H > W else 0
    regions = []
    for l in range(1, L + 1):
        wl = math.floor(2 * w / (l + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        bw = f(W - wl) / f(l + Wd - 1) if l + Wd - 1 else f(0)
        cen_w = [int(math.floor(f(wl2) + f(i) * bw)) - wl2 for i in range(l + Wd)]
        bh = f(H - wl) / f(l + Hd - 1) if l + Hd - 1 else f(0)
        cen_h = [int(math.floor(f(wl2) + f(i) * bh)) - wl2 for i in range(l + Hd)]
        for y in cen_h:
            for x in cen_w:
                regions.append((x, y, wl, wl))
    return np.array(regions, dtype=np.int64).reshape(-1, 4)


def test_exhaustive_sweep_matches_matlab_transcription():
    for L in range(1, 5):
        for W in range(1, 101):
            for H in range(1, 101):
                got = rmac_regions(W, H, L)
                assert got.dtype == np.int64
                np.testing.assert_array_equal(got, matlab_regions(W, H, L), err_msg=f"{W}x{H} L={L}")


def test_hand_worked_30x22():
    # W=30, H=22: w=22, long side excess 8. steps 2..7 give b = 8, 4, 8/3, 2, 1.6, 4/3 and
    # overlaps 1 - b/22 = .636, .818, .879, .909, .927, .939: the closest to 0.4 is steps=2,
    # so idx=0 and Wd=1, Hd=0.
    # l=1: wl=floor(44/2)=22, wl2=floor(11-1)=10; x: b=(30-22)/1=8 -> floor(10+{0,8})-10 = 0, 8;
    #      y: one region (b=0) -> 0.
    # l=2: wl=floor(44/3)=14, wl2=floor(7-1)=6; x: b=(30-14)/2=8 -> 0, 8, 16;
    #      y: b=(22-14)/1=8 -> 0, 8.
    # l=3: wl=floor(44/4)=11, wl2=floor(5.5-1)=4; x: b=(30-11)/3=6.33 -> floor(4, 10.33, 16.67, 23)-4
    #      = 0, 6, 12, 19; y: b=(22-11)/2=5.5 -> floor(4, 9.5, 15)-4 = 0, 5, 11.
    expected = [(0, 0, 22, 22), (8, 0, 22, 22)]
    expected += [(x, y, 14, 14) for y in (0, 8) for x in (0, 8, 16)]
    expected += [(x, y, 11, 11) for y in (0, 5, 11) for x in (0, 6, 12, 19)]
    np.testing.assert_array_equal(rmac_regions(30, 22, 3), np.array(expected))
    # Transposed map: the extra regions move to the y axis.
    np.testing.assert_array_equal(rmac_regions(22, 30, 1), [(0, 0, 22, 22), (0, 8, 22, 22)])


def test_square_map_one_region_at_level_one():
    for s in (1, 2, 7, 30, 64):
        np.testing.assert_array_equal(rmac_regions(s, s, 1), [(0, 0, s, s)])
    # Square 10x10, L=2: level 2 is 2x2 regions of side floor(20/3)=6 at 0 and 4.
    np.testing.assert_array_equal(
        rmac_regions(10, 10, 2),
        [(0, 0, 10, 10), (0, 0, 6, 6), (4, 0, 6, 6), (0, 4, 6, 6), (4, 4, 6, 6)],
    )


def test_float32_pitfall_w2_h32():
    # W=2, H=32, L=2: level 2 has side 1 and b = 31/7 along y; the last top edge must be 31
    # (7 * 31/7 = 31 exactly in double). In float32 it lands just under 31 and floors to 30.
    got = rmac_regions(2, 32, 2)
    assert got[-1].tolist() == [1, 31, 1, 1]
    assert matlab_regions(2, 32, 2, dtype=np.float32)[-1].tolist() == [1, 30, 1, 1]
    np.testing.assert_array_equal(got, matlab_regions(2, 32, 2))


def test_tiny_maps_skip_empty_levels():
    # w=1: level l>=2 has side floor(2/(l+1)) = 0 and is skipped.
    np.testing.assert_array_equal(rmac_regions(1, 1, 4), [(0, 0, 1, 1)])
    assert rmac_regions(5, 5, 0).shape == (0, 4)


def _extra(W, H):
    level1 = rmac_regions(W, H, 1)
    return len(level1) - 1


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400), st.integers(1, 5))
def test_properties(W, H, L):
    r = rmac_regions(W, H, L)
    x, y, w, h = r.T
    # Inside the map and square.
    assert (x >= 0).all() and (y >= 0).all()
    assert (x + w <= W).all() and (y + h <= H).all()
    assert (w == h).all() and (w >= 1).all()
    # Count per level: l * (l + m - 1), m = number of level-1 regions (1 for a square map),
    # i.e. (l + Wd) * (l + Hd) with one of Wd, Hd zero.
    m = _extra(W, H) + 1
    if W == H:
        assert m == 1
    short = min(W, H)
    levels = [l for l in range(1, L + 1) if 2 * short // (l + 1) > 0]
    counts = [l * (l + m - 1) for l in levels]
    assert len(r) == sum(counts)
    level_of = np.repeat(levels, counts)
    np.testing.assert_array_equal(w, [2 * short // (l + 1) for l in level_of])
    # Inside a level: a (l + Hd) x (l + Wd) grid, rows (y) outer, columns (x) inner, edges
    # non-decreasing (they can repeat on tiny maps, as in the original).
    for l in levels:
        sel = level_of == l
        nx = l + (m - 1 if W > H else 0)
        ny = l + (m - 1 if H > W else 0)
        gx, gy = x[sel].reshape(ny, nx), y[sel].reshape(ny, nx)
        assert (gx == gx[:1]).all() and (gy == gy[:, :1]).all()
        assert (np.diff(gx[0]) >= 0).all() and (np.diff(gy[:, 0]) >= 0).all()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400))
def test_level_one_covers_long_side(W, H):
    # With long/short <= 7 the chosen step keeps a non-negative overlap (b <= w), so the level-1
    # squares of side min(W, H) cover the whole map. Beyond that ratio only 7 squares are used.
    long_, short = max(W, H), min(W, H)
    r = rmac_regions(W, H, 1)
    assert (r[:, 2] == short).all()
    starts = r[:, 0] if W >= H else r[:, 1]
    covered = np.zeros(long_, dtype=bool)
    for s in starts:
        covered[s : s + short] = True
    if long_ <= 7 * short:
        assert covered.all()
    else:
        assert len(r) == 7
    assert starts[0] == 0 and starts[-1] + short == long_


def test_region_grid_is_rmac_regions_kept_read_only():
    """`region_grid` (the cached grid the index and re-ranking share) is `rmac_regions`, the same array on
    every call, and cannot be changed in place by one user under another."""
    import pytest

    for W, H, L in [(30, 22, 3), (2, 32, 2), (1, 1, 3), (17, 17, 4)]:
        g = region_grid(W, H, L)
        np.testing.assert_array_equal(g, rmac_regions(W, H, L))
        assert region_grid(W, H, L) is g
        with pytest.raises(ValueError):
            g[0, 0] = 1
