"""Integral max-pooling: exact int64 LUT path, root table, double-double float path, against brute force."""


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmac.ops import integral as I


def _q_maps(rng, K, H, W, levels=31, zeros=0.6):
    q = rng.integers(0, levels + 1, (K, H, W))
    q[rng.random((K, H, W)) < zeros] = 0
    return q.astype(np.uint8)


def _all_boxes(H, W):
    return np.array([(x, y, w, h) for y in range(H) for h in range(1, H - y + 1)
                     for x in range(W) for w in range(1, W - x + 1)], dtype=np.int64)


def _brute_sum_lut(q, box, alpha=10):
    """Exact `sum q^alpha` over a box with Python integers."""
    x, y, w, h = box
    return [sum(int(v) ** alpha for v in q[k, y:y + h, x:x + w].ravel()) for k in range(q.shape[0])]


def _brute_float(x, box, alpha=10):
    """Power mean `(sum x^alpha)^(1/alpha)` over a box, in float64, scaled by the region's own max."""
    bx, by, bw, bh = box
    r = np.maximum(x[:, by:by + bh, bx:bx + bw].astype(np.float64), 0).reshape(x.shape[0], -1)
    m = r.max(axis=1)
    safe = np.where(m > 0, m, 1.0)
    return np.where(m > 0, m * ((r / safe[:, None]) ** alpha).sum(axis=1) ** (1.0 / alpha), 0.0)


# ---------------------------------------------------------------------------------------------
# tables


def test_power_table_exact_and_overflow():
    T = I.power_table(31, 10)
    assert T.dtype == np.int64 and [int(v) for v in T] == [v**10 for v in range(32)]
    with pytest.raises(ValueError):
        I.power_table(80, 10)  # 80^10 > 2^63
    n = I.max_exact_cells(31, 10)
    assert 31**10 * n <= 2**63 - 1 < 31**10 * (n + 1)
    assert n >= 4096


def test_root_table_relative_error_over_the_whole_range():
    rng = np.random.default_rng(0)
    T = I.power_table(31, 10)
    # every level's power, small integers, bucket edges (powers of two and their neighbours), random
    pow2 = np.array([2**e for e in range(63)], dtype=object)
    S = np.concatenate([
        T, np.arange(0, 5000),
        np.array([int(p) + d for p in pow2 for d in (-1, 0, 1) if 0 <= int(p) + d < 2**63], dtype=np.int64),
        rng.integers(1, 2**62, 20000, dtype=np.int64),
        (T[None, :] * rng.integers(1, 4000, (50, 1))).ravel(),
    ]).astype(np.int64)
    r = I.table_root(S)
    exact = np.array([float(int(s)) ** 0.1 for s in S])
    assert r[S == 0].max() == 0.0
    nz = S > 0
    rel = np.abs(r[nz] / exact[nz] - 1)
    assert rel.max() <= I.ROOT_MAX_REL_ERR * (1 + 1e-9)
    assert I.ROOT_MAX_REL_ERR < 1e-3


# ---------------------------------------------------------------------------------------------
# LUT path


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), K=st.integers(1, 5), H=st.integers(1, 6), W=st.integers(1, 6),
       zeros=st.floats(0, 0.95))
def test_lut_region_sums_are_exact(seed, K, H, W, zeros):
    rng = np.random.default_rng(seed)
    q = _q_maps(rng, K, H, W, zeros=zeros)
    ii = I.integral_lut(q)
    assert ii.sums.shape == (H + 1, W + 1, K) and ii.sums.flags.c_contiguous
    boxes = _all_boxes(H, W)
    got = I.region_vectors(ii, boxes)
    for box, vec in zip(boxes, got):
        S = _brute_sum_lut(q, box)
        x, y, w, h = box
        corners = (ii.sums[y + h, x + w] - ii.sums[y, x + w] - ii.sums[y + h, x] + ii.sums[y, x])
        assert [int(c) for c in corners] == S  # the 4-term difference is exact
        assert np.array_equal(vec, I.table_root(np.array(S, dtype=np.int64)))
        exact = np.array([float(s) ** 0.1 for s in S])
        assert np.all(np.abs(vec - exact) <= I.ROOT_MAX_REL_ERR * exact * (1 + 1e-9))


def test_lut_exact_at_the_largest_allowed_map():
    """All cells at the top level on the largest exact map: the full-map sum is exact in int64."""
    n = I.max_exact_cells(31, 10)
    H = 3
    W = n // H
    q = np.full((1, H, W), 31, dtype=np.uint8)
    ii = I.integral_lut(q)
    assert int(ii.sums[H, W, 0]) == 31**10 * H * W
    assert int(ii.sums[H, W, 0] - ii.sums[0, W, 0] - ii.sums[H, 1, 0] + ii.sums[0, 1, 0]) == 31**10 * H * (W - 1)
    with pytest.raises(ValueError):
        I.integral_lut(np.zeros((1, H, W + 2), dtype=np.uint8))  # one column too many
    with pytest.raises(ValueError):
        I.integral_lut(np.full((1, 2, 2), 32, dtype=np.uint8))  # above the top level
    with pytest.raises(ValueError):
        I.integral_lut(np.zeros((1, 2, 2), dtype=np.float32))


def test_single_cell_and_zero_regions_lut():
    q = np.zeros((3, 4, 5), dtype=np.uint8)
    q[0, 1, 2], q[1, 3, 4], q[2, 0, 0] = 31, 1, 7
    ii = I.integral_lut(q)
    v = I.region_vector(ii, (2, 1, 1, 1))
    assert v[0] == pytest.approx(31, rel=I.ROOT_MAX_REL_ERR) and v[1] == 0 and v[2] == 0
    assert not I.region_vector(ii, (1, 2, 2, 2)).any()  # only zeros: exactly 0
    # max-like: 31 with the 1 of the same channel elsewhere in the box barely changes the root
    full = I.region_vector(ii, (0, 0, 5, 4))
    assert full[0] == pytest.approx(31, rel=2e-3) and full[1] == pytest.approx(1, rel=2e-3)


def test_box_validation():
    ii = I.integral_lut(np.zeros((2, 3, 4), dtype=np.uint8))
    for bad in [(0, 0, 0, 1), (0, 0, 5, 1), (-1, 0, 1, 1), (0, 2, 1, 2)]:
        with pytest.raises(ValueError):
            I.region_vector(ii, bad)
    with pytest.raises(TypeError):
        I.region_vector(np.zeros((3, 3, 3)), (0, 0, 1, 1))


# ---------------------------------------------------------------------------------------------
# float path


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), K=st.integers(1, 5), H=st.integers(1, 6), W=st.integers(1, 6),
       zeros=st.floats(0, 0.9), spread=st.floats(0, 6))
def test_float_path_matches_brute_force(seed, K, H, W, zeros, spread):
    """Random maps whose values span `spread` decades: the float path equals the brute-force power
    mean to 1e-9 relative wherever the region's power mean is above the documented error floor."""
    rng = np.random.default_rng(seed)
    x = (10.0 ** rng.uniform(-spread, 0, (K, H, W)) * (rng.random((K, H, W)) > zeros)).astype(np.float32)
    fi = I.integral_float(x)
    boxes = _all_boxes(H, W)
    got = I.region_vectors(fi, boxes)
    cmax = x.max(axis=(1, 2)).astype(np.float64)
    floor = cmax * (64 * (H + W) * H * W * 2.0**-104) ** 0.1  # the module's bound, with c = 64
    for box, vec in zip(boxes, got):
        ref = _brute_float(x, box)
        assert np.all(np.abs(vec - ref) <= 1e-9 * ref + floor)
        big = ref > 1e-2 * cmax
        np.testing.assert_allclose(vec[big], ref[big], rtol=1e-9)
        assert np.all(vec[ref == 0] == 0)  # regions of zeros are exactly zero


def test_float_path_tiny_region_next_to_a_huge_maximum():
    """The catastrophic-cancellation case: a region far below a channel's maximum.

    In plain float64 integral images of x^10 the 4-term difference loses everything under
    eps * 1e60 here; the double-double path keeps the tiny region right."""
    H, W = 16, 16
    x = np.zeros((1, H, W), dtype=np.float32)
    x[0, :8, :8] = 1e6  # 64 huge cells above and left of the region: large integral-image corners
    x[0, 10:13, 10:14] = 1e4  # 1% of the maximum
    x[0, 14, 14] = 1.0  # 1e-6 of the maximum
    fi = I.integral_float(x)
    for box in [(10, 10, 4, 3), (9, 9, 6, 5), (11, 11, 1, 1), (10, 10, 6, 6)]:
        ref = _brute_float(x, box)
        np.testing.assert_allclose(I.region_vector(fi, box), ref, rtol=1e-9)
    # a region of exact zeros inside the clutter of large sums is exactly 0
    assert I.region_vector(fi, (8, 8, 2, 2))[0] == 0.0
    # a single cell at 1e-6 of the max: within the absolute bound (not relative: below the floor)
    floor = 1e6 * (64 * (H + W) * H * W * 2.0**-104) ** 0.1
    assert abs(I.region_vector(fi, (14, 14, 1, 1))[0] - 1.0) <= floor
    # the naive float64 integral image really does fail on the 1% region
    y = (x[0].astype(np.float64) / 1e6) ** 10
    S = np.zeros((H + 1, W + 1))
    S[1:, 1:] = y.cumsum(0).cumsum(1)
    bx, by, bw, bh = 10, 10, 4, 3
    naive = max(S[by + bh, bx + bw] - S[by, bx + bw] - S[by + bh, bx] + S[by, bx], 0.0) ** 0.1 * 1e6
    assert abs(naive - _brute_float(x, (bx, by, bw, bh))[0]) > 0.1 * 1e4


def test_float_path_negative_and_zero_channels():
    x = np.zeros((3, 3, 3), dtype=np.float32)
    x[0] = -1e-6  # ReLU round-off
    x[1, 1, 1] = 5.0
    fi = I.integral_float(x)
    v = I.region_vector(fi, (0, 0, 3, 3))
    assert v[0] == 0 and v[1] == pytest.approx(5.0, rel=1e-12) and v[2] == 0
    with pytest.raises(ValueError):
        I.integral_float(np.full((1, 2, 2), np.inf, dtype=np.float32))


def test_alpha_approximates_the_max():
    """f~ is between the max and the max times (cells)^(1/alpha): the paper's approximation
    (up to the float path's documented absolute floor for regions far below the channel max)."""
    rng = np.random.default_rng(1)
    x = rng.gamma(1.0, 2.0, (8, 6, 7)).astype(np.float32)
    fi = I.integral_float(x)
    boxes = _all_boxes(6, 7)
    got = I.region_vectors(fi, boxes)
    floor = x.max(axis=(1, 2)) * (64 * 13 * 42 * 2.0**-104) ** 0.1
    for box, vec in zip(boxes, got):
        bx, by, bw, bh = box
        m = x[:, by:by + bh, bx:bx + bw].max(axis=(1, 2)).astype(np.float64)
        assert np.all(vec >= m * (1 - 1e-12) - floor)
        assert np.all(vec <= m * (bw * bh) ** 0.1 * (1 + 1e-12) + floor)


def test_figure3_kernel_of_the_benchmark():
    """The benchmark's all-regions cosine kernel equals numpy: exact max-pooling vs region_vectors."""
    from rmac.workflows.bench.aml import _all_region_cosines

    rng = np.random.default_rng(4)
    x = (rng.gamma(1.0, 2.0, (5, 4, 6)) * (rng.random((5, 4, 6)) > 0.5)).astype(np.float32)
    other = (x * rng.uniform(0.9, 1.1, x.shape)).astype(np.float32)
    ii = I.integral_float(x)
    boxes = np.array([(bx, by, bw, bh) for by in range(4) for bh in range(1, 5 - by)
                      for bx in range(6) for bw in range(1, 7 - bx)])
    got_f = _all_region_cosines(x, other, True, I.kernel_args(ii))
    got_o = _all_region_cosines(x, other, False, I.kernel_args(ii))
    V = I.region_vectors(ii, boxes)
    # the kernel's order: y1, y2, x1, x2 ascending
    order = sorted(range(len(boxes)), key=lambda i: (boxes[i][1], boxes[i][3], boxes[i][0], boxes[i][2]))
    for n, i in enumerate(order):
        bx, by, bw, bh = boxes[i]
        e = x[:, by:by + bh, bx:bx + bw].max(axis=(1, 2)).astype(np.float64)
        o = other[:, by:by + bh, bx:bx + bw].max(axis=(1, 2)).astype(np.float64)
        for got, a in ((got_f, V[i]), (got_o, o)):
            if np.linalg.norm(e) == 0 or np.linalg.norm(a) == 0:
                assert np.isnan(got[n])
            else:
                assert got[n] == pytest.approx(e @ a / np.linalg.norm(e) / np.linalg.norm(a), abs=1e-12)
