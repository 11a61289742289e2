"""Pooling: MAC, GeM, regional MAC and the paper's R-MAC, against brute-force loops."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmac.ops import pooling as pl
from rmac.ops import whitening as wh
from rmac.ops.regions import rmac_regions


def _maps(rng, K, H, W, dtype=np.float32):
    x = np.maximum(rng.standard_normal((K, H, W)), 0) * 10
    return x.astype(dtype) if dtype != np.uint8 else np.round(x).clip(0, 31).astype(np.uint8)


def _norm(v):
    return math.sqrt(sum(float(a) * float(a) for a in v))


def _slow_l2n(v):
    n = _norm(v)
    return [float(a) / n if n > 0 else 0.0 for a in v]


def _slow_rmac(maps, regions, whitening=None):
    """The paper's R-MAC with per-element Python loops, in float64."""
    K = maps.shape[0]
    D = K if whitening is None else whitening.proj.shape[0]
    total = [0.0] * D
    for x, y, w, h in regions:
        v = [max(float(maps[k, yy, xx]) for yy in range(y, y + h) for xx in range(x, x + w)) for k in range(K)]
        v = _slow_l2n(v)
        if whitening is not None:
            c = [v[k] - float(whitening.mean[k]) for k in range(K)]
            v = _slow_l2n([sum(float(whitening.proj[d, k]) * c[k] for k in range(K)) for d in range(D)])
        total = [t + a for t, a in zip(total, v)]
    return np.array(_slow_l2n(total))


def _fit(rng, K, D=None):
    return wh.fit(wh.stats(rng.standard_normal((200, K))), dim=D)


def test_l2n():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    out = pl.l2n(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
    np.testing.assert_allclose(pl.l2n(x, axis=0), [[1.0, 1.0], [0.0, 0.0]])
    assert pl.l2n(np.array([3, 4])).dtype == np.float32
    assert pl.l2n(np.ones(3)).dtype == np.float64


def test_mac_and_gem_against_loops():
    rng = np.random.default_rng(0)
    maps = _maps(rng, 5, 4, 6)
    expected_mac = [max(maps[k].ravel()) for k in range(5)]
    np.testing.assert_array_equal(pl.mac(maps), expected_mac)
    assert pl.mac(maps).dtype == np.float32
    for p in (1.0, 3.0):
        expected = [
            (sum(max(float(v), 1e-6) ** p for v in maps[k].ravel()) / maps[k].size) ** (1 / p) for k in range(5)
        ]
        np.testing.assert_allclose(pl.gem(maps, p=p), expected, rtol=1e-6)
    # Large p tends to MAC; p=1 on a constant map is that constant.
    np.testing.assert_allclose(pl.gem(maps + 1, p=200.0), pl.mac(maps + 1), rtol=0.05)
    np.testing.assert_allclose(pl.gem(np.full((2, 3, 3), 2.5), p=1.0), [2.5, 2.5], rtol=1e-6)
    with pytest.raises(ValueError):
        pl.mac(np.zeros((3, 0, 4)))


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 4),
    st.integers(1, 9),
    st.integers(1, 9),
    st.sampled_from([np.float32, np.float64, np.uint8]),
    st.data(),
)
def test_regional_mac_matches_brute_force(seed, K, H, W, dtype, data):
    rng = np.random.default_rng(seed)
    maps = _maps(rng, K, H, W, dtype)
    # Arbitrary boxes (any order, repeats allowed), not just the R-MAC grid.
    n = data.draw(st.integers(0, 12))
    boxes = []
    for _ in range(n):
        x = data.draw(st.integers(0, W - 1))
        y = data.draw(st.integers(0, H - 1))
        boxes.append((x, y, data.draw(st.integers(1, W - x)), data.draw(st.integers(1, H - y))))
    regions = np.array(boxes, dtype=np.int64).reshape(-1, 4)
    got = pl.regional_mac(maps, regions)
    assert got.shape == (n, K) and got.dtype == np.float32
    for r, (x, y, w, h) in enumerate(boxes):
        for k in range(K):
            expected = max(maps[k, yy, xx] for yy in range(y, y + h) for xx in range(x, x + w))
            assert got[r, k] == np.float32(expected)  # exact: max only selects a value


def test_regional_mac_on_rmac_grid_and_whole_map():
    rng = np.random.default_rng(1)
    maps = _maps(rng, 16, 22, 30)
    regions = rmac_regions(30, 22, 3)
    got = pl.regional_mac(maps, regions)
    for r, (x, y, w, h) in enumerate(regions):
        np.testing.assert_array_equal(got[r], maps[:, y : y + h, x : x + w].max(axis=(1, 2)))
    np.testing.assert_array_equal(pl.regional_mac(maps, [(0, 0, 30, 22)])[0], pl.mac(maps))


def test_regional_mac_rejects_bad_regions():
    maps = np.zeros((2, 4, 5), dtype=np.float32)
    for bad in [(0, 0, 0, 1), (0, 0, 1, 0), (4, 0, 2, 1), (0, 3, 1, 2), (-1, 0, 1, 1)]:
        with pytest.raises(ValueError):
            pl.regional_mac(maps, [bad])


@pytest.mark.parametrize("whiten", [False, True])
def test_rmac_matches_slow_reference(whiten):
    rng = np.random.default_rng(2)
    K, H, W = 6, 7, 11
    maps = _maps(rng, K, H, W)
    w = _fit(rng, K, D=4) if whiten else None
    regions = rmac_regions(W, H, 3)
    got = pl.rmac(maps, L=3, whitening=w)
    assert got.dtype == np.float32 and got.shape == ((4,) if whiten else (K,))
    np.testing.assert_allclose(got, _slow_rmac(maps, regions, w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got), 1.0, rtol=1e-6)


def test_rmac_aggregate_single_region_is_l2n_and_zeros_stay_zero():
    v = np.array([[0.0, 3.0, 4.0]], dtype=np.float32)
    np.testing.assert_allclose(pl.rmac_aggregate(v), [0.0, 0.6, 0.8])
    z = pl.rmac_aggregate(np.zeros((3, 4), dtype=np.float32))
    assert z.dtype == np.float32 and np.array_equal(z, np.zeros(4))
    assert np.array_equal(pl.rmac_aggregate(np.zeros((0, 4))), np.zeros(4))
    # A zero region contributes nothing without whitening.
    both = pl.rmac_aggregate(np.array([[1.0, 2.0], [0.0, 0.0]]))
    np.testing.assert_allclose(both, pl.l2n(np.array([1.0, 2.0])), rtol=1e-6)
    assert np.isfinite(pl.rmac(np.zeros((3, 5, 8), dtype=np.float32))).all()


def test_rmac_is_invariant_to_region_scale():
    # Per-region l2n: scaling one region's activations does not change the R-MAC.
    rng = np.random.default_rng(3)
    reg = rng.random((5, 8)).astype(np.float32)
    scaled = reg * np.array([1, 10, 0.1, 3, 7], dtype=np.float32)[:, None]
    w = _fit(rng, 8, D=6)
    np.testing.assert_allclose(pl.rmac_aggregate(reg, w), pl.rmac_aggregate(scaled, w), rtol=1e-5, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.integers(0, 6), min_size=1, max_size=8), st.sampled_from([None, 5, 7]))
def test_rmac_aggregate_many_equals_loop(seed, counts, dim):
    """Many at once equals one by one; D = K goes through the whitening's triangular basis."""
    rng = np.random.default_rng(seed)
    K = 7
    regional = rng.random((sum(counts), K)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    w = _fit(rng, K, D=dim) if dim else None
    got = pl.rmac_aggregate_many(regional, offsets, w)
    assert got.dtype == np.float32 and got.shape == (len(counts), dim or K)
    for i in range(len(counts)):
        expected = pl.rmac_aggregate(regional[offsets[i] : offsets[i + 1]], w)
        np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=2e-6)


def test_rmac_aggregate_many_rejects_bad_offsets():
    reg = np.ones((4, 3), dtype=np.float32)
    for bad in ([0, 3], [1, 4], [0, 3, 2, 4], []):
        with pytest.raises(ValueError):
            pl.rmac_aggregate_many(reg, bad)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 3), K=st.integers(1, 40), L=st.integers(1, 4),
       zeros=st.floats(0.0, 1.0), scale=st.floats(1e-3, 10.0))
def test_regional_mac_sparse_equals_the_dense_reference(seed, n, K, L, zeros, scale):
    """Max-pooling the stored levels over each region from the non-zeros alone gives exactly the regional
    MAC of the dense dequantised map (brute-force reference), for R-MAC's regions and for arbitrary ones."""
    from rmac.ops.integral import sparse_maps
    from rmac.ops.quantise import dequantise

    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(n):
        q = rng.integers(1, 32, (K, *rng.integers(1, 12, 2))).astype(np.uint8)
        q[rng.random(q.shape) < zeros] = 0
        maps.append(q)
    sp = sparse_maps(maps)
    for i, q in enumerate(maps):
        _, h, w = q.shape
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        arbitrary = np.array([[x0, y0, rng.integers(1, w - x0 + 1), rng.integers(1, h - y0 + 1)], [0, 0, w, h]])
        for regions in (rmac_regions(w, h, L), arbitrary):
            want = pl.regional_mac(dequantise(q, scale), regions)
            got = pl.regional_mac_sparse(sp, i, regions, scale)
            assert got.dtype == np.float32 and np.array_equal(got, want)
    with pytest.raises(ValueError, match="inside"):
        pl.regional_mac_sparse(sp, 0, [[0, 0, maps[0].shape[2] + 1, 1]], scale)
