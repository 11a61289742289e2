"""Re-ranking by localised similarity (MAC and R-MAC variants) and query expansion, against slow loops."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmac.ops import aml as A
from rmac.ops import integral as I
from rmac.ops import rerank as R
from rmac.ops import whitening as wh
from rmac.ops.quantise import quantise
from rmac.ops.regions import rmac_regions


def _maps(rng, n, K, lo=3, hi=11, zeros=0.6):
    """Sparse maps whose non-zeros stay within ~1:40 of each other, so that the float path is exact
    to ~1e-15 (its absolute error floor, ~1e-3 of a channel's max, is covered in test_integral)."""
    out = []
    for _ in range(n):
        H, W = rng.integers(lo, hi, 2)
        x = ((1 + rng.gamma(1.0, 3.0, (K, H, W))) * (rng.random((K, H, W)) > zeros)).astype(np.float32)
        out.append(x)
    return out


def _slow_power_mean(x, box):
    """f~ of a box straight from the map: int sums + root table (uint8) or a float64 power mean."""
    bx, by, bw, bh = box
    r = x[:, by:by + bh, bx:bx + bw]
    if x.dtype == np.uint8:
        return I.table_root(np.array([sum(int(v) ** 10 for v in c.ravel()) for c in r], dtype=np.int64))
    r = r.astype(np.float64).reshape(x.shape[0], -1)
    m = r.max(axis=1)
    safe = np.where(m > 0, m, 1.0)
    return np.where(m > 0, m * ((r / safe[:, None]) ** 10).sum(axis=1) ** 0.1, 0.0)


def _unit(v):
    n = math.sqrt(sum(float(a) ** 2 for a in v))
    return np.array([float(a) / n if n > 0 else 0.0 for a in v])


def _slow_localised_rmac(x, box, w, L):
    """R-MAC of a box in explicit steps: regions, f~, l2n, (x - mean) proj^T, l2n, sum, l2n."""
    bx, by, bw, bh = box
    total = np.zeros(w.proj.shape[0] if w is not None else x.shape[0])
    for rx, ry, rw, rh in rmac_regions(bw, bh, L):
        v = _unit(_slow_power_mean(x, (bx + rx, by + ry, rw, rh)))
        if w is not None:
            v = _unit([sum((v[k] - w.mean[k]) * w.proj[d, k] for k in range(len(v))) for d in range(w.proj.shape[0])])
        total += v
    return _unit(total)


def _whitening(rng, K, D):
    X = rng.gamma(1.0, 1.0, (400, K))
    return wh.fit(wh.stats(X / np.linalg.norm(X, axis=1, keepdims=True)), dim=D)


@pytest.mark.parametrize("kind", ["lut", "float"])
def test_mac_variant_equals_per_image_search(kind):
    rng = np.random.default_rng(0)
    K = 12
    floats = _maps(rng, 9, K)
    floats[2][[0, 3, 4]] = 0  # channels without response are left out of the batch's integral images
    floats[5][:] = 0  # a map without any response
    maps = [quantise(x)[0] for x in floats] if kind == "lut" else floats
    q = floats[0][:, 1:3, 1:4].max(axis=(1, 2)) + 0.01
    q[3] = 5.0  # a query channel that map 2 lacks
    aspect = 1.4
    res = R.rerank(maps, q, aspect, t=2, s=1.5, n_threads=3)  # threads take interleaved maps
    res1 = R.rerank(maps, q, aspect, t=2, s=1.5, n_threads=1)
    for field in res._fields:
        assert np.array_equal(getattr(res, field), getattr(res1, field))
    assert res.vectors.dtype == np.float32 and res.boxes.shape == (9, 4)
    for i, m in enumerate(maps):
        ii = I.integral_lut(m) if kind == "lut" else I.integral_float(m)
        ref = A.aml_search(ii, q, aspect, t=2, s=1.5)
        assert tuple(res.boxes[i]) == ref.box
        assert res.scores[i] == ref.score == res.aml_scores[i]
        assert res.n_scored[i] == ref.n_scored
        v = _slow_power_mean(m, ref.box)
        np.testing.assert_allclose(res.vectors[i], _unit(v), rtol=1e-6, atol=1e-7)
        # the score is the cosine of the query and the box's f~
        assert res.scores[i] == pytest.approx(float(_unit(v) @ _unit(q)), abs=1e-9)
        single, vec = R.localised_mac(ii, q, aspect, t=2, s=1.5)
        assert single == ref
        np.testing.assert_allclose(vec, res.vectors[i], rtol=1e-6, atol=1e-7)


def test_padded_batch_equals_list():
    rng = np.random.default_rng(1)
    K = 8
    maps = [quantise(x)[0] for x in _maps(rng, 5, K)]
    Hm = max(m.shape[1] for m in maps)
    Wm = max(m.shape[2] for m in maps)
    padded = np.full((5, K, Hm, Wm), 31, dtype=np.uint8)  # loud padding must not matter
    for i, m in enumerate(maps):
        padded[i, :, : m.shape[1], : m.shape[2]] = m
    hw = np.array([m.shape[1:] for m in maps])
    q = rng.gamma(1.0, 1.0, K)
    a = R.rerank(maps, q, 0.8)
    b = R.rerank(padded, q, 0.8, map_hw=hw)
    for field in a._fields:
        assert np.array_equal(getattr(a, field), getattr(b, field))


@pytest.mark.parametrize("kind", ["lut", "float"])
def test_rmac_variant_equals_slow_reference(kind):
    rng = np.random.default_rng(2)
    K, D, L = 10, 6, 3
    floats = _maps(rng, 6, K, lo=4, hi=12)
    floats[3][[1, 2, 7]] = 0
    floats += [(1 + rng.random((K, h, w))).astype(np.float32) for h, w in [(1, 1), (1, 5), (7, 1)]]  # thin maps
    maps = [quantise(x)[0] for x in floats] if kind == "lut" else floats
    w = _whitening(rng, K, D)
    q_mac = floats[1][:, 2:6, 1:5].max(axis=(1, 2)) + 0.01
    q_rmac = rng.standard_normal(D)
    res = R.rerank(maps, q_mac, 1.0, q_rmac=q_rmac, whitening=w, L=L)
    blocks = R.rerank(maps, q_mac, 1.0, q_rmac=q_rmac, whitening=w, L=L, block=2, n_threads=2)
    for field in res._fields:
        np.testing.assert_allclose(getattr(blocks, field), getattr(res, field), rtol=1e-6, atol=1e-6)
    mac_only = R.rerank(maps, q_mac, 1.0)
    assert np.array_equal(res.boxes, mac_only.boxes)  # localisation uses the MAC either way
    assert np.array_equal(res.aml_scores, mac_only.aml_scores)
    assert res.vectors.shape == (9, D)
    for i, m in enumerate(maps):
        ref = _slow_localised_rmac(m, tuple(res.boxes[i]), w, L)
        np.testing.assert_allclose(res.vectors[i], ref, atol=2e-5)
        assert res.scores[i] == pytest.approx(float(ref @ _unit(q_rmac)), abs=2e-5)
        ii = I.integral_lut(m) if kind == "lut" else I.integral_float(m)
        sc, vec = R.localised_rmac(ii, tuple(res.boxes[i]), q_rmac, w, L)
        assert sc == pytest.approx(res.scores[i], abs=1e-5)
        np.testing.assert_allclose(vec, res.vectors[i], atol=1e-5)


def test_rmac_variant_without_whitening():
    rng = np.random.default_rng(3)
    K = 7
    maps = [quantise(x)[0] for x in _maps(rng, 3, K)]
    q = rng.gamma(1.0, 1.0, K)
    res = R.rerank(maps, q, 1.0, q_rmac=q, whitening=None, L=2)
    for i, m in enumerate(maps):
        np.testing.assert_allclose(res.vectors[i], _slow_localised_rmac(m, tuple(res.boxes[i]), None, 2), atol=2e-5)


def test_rerank_rejects_bad_input():
    rng = np.random.default_rng(4)
    maps = [quantise(x)[0] for x in _maps(rng, 2, 4)]
    with pytest.raises(ValueError):
        R.rerank(maps, np.ones(5), 1.0)  # wrong K
    with pytest.raises(ValueError):
        R.rerank([m.astype(np.int32) for m in maps], np.ones(4), 1.0)
    with pytest.raises(ValueError):
        R.rerank([np.full((4, 3, 3), 40, dtype=np.uint8)], np.ones(4), 1.0)  # above 31 levels
    with pytest.raises(ValueError):
        R.rerank(maps, np.ones(4), 1.0, map_hw=[(3, 3)])  # one size for two maps
    with pytest.raises(ValueError):
        R.rerank([], np.ones(4), 1.0)
    with pytest.raises(ValueError):
        R.rerank(maps, np.ones(4), 1.0, q_rmac=np.ones(3))  # R-MAC of the wrong dimension


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), N=st.integers(1, 12), D=st.integers(1, 8), k=st.integers(0, 7))
def test_query_expansion_and_rescore(seed, N, D, k):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(D) + 0.1
    V = rng.standard_normal((N, D))
    order = rng.permutation(N)
    got = R.query_expansion(q, V, order, k=k)
    members = [_unit(q)] + [_unit(V[j]) for j in list(order)[:k]]
    mean = [sum(m[d] for m in members) / len(members) for d in range(D)]
    np.testing.assert_allclose(got, _unit(mean), atol=1e-5)
    scores = R.rescore(got, V)
    np.testing.assert_allclose(scores, [sum(float(got[d]) * V[j, d] for d in range(D)) for j in range(N)], atol=1e-4)


def test_query_expansion_with_no_neighbours_is_the_query():
    q = np.array([3.0, 4.0])
    np.testing.assert_allclose(R.query_expansion(q, np.eye(2), [1, 0], k=0), [0.6, 0.8], rtol=1e-6)
