"""Quantisation of activation maps to uint8 levels with one scale per image."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmac.ops.quantise import DEFAULT_LEVELS, dequantise, quantise


def _sparse_maps(seed, K=6, H=5, W=7, zeros=0.7):
    rng = np.random.default_rng(seed)
    x = (rng.gamma(1.5, 3.0, (K, H, W)) * (rng.random((K, H, W)) > zeros)).astype(np.float32)
    return x


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), levels=st.integers(1, 255), zeros=st.floats(0.0, 0.95))
def test_round_to_nearest_level_without_clip(seed, levels, zeros):
    x = _sparse_maps(seed, zeros=zeros)
    q, scale = quantise(x, levels, clip=0.0)
    assert q.dtype == np.uint8 and q.shape == x.shape and q.flags.c_contiguous
    assert int(q.max()) <= levels
    if x.max() == 0:
        assert scale == 1.0 and not q.any()
        return
    assert scale == pytest.approx(float(x.max()) / levels, rel=1e-6)
    assert int(q.max()) == levels  # the maximum response is the top level
    assert not q[x == 0].any()  # zero stays zero
    # nearest level: the reconstruction error is at most half a step (float32 slack)
    err = np.abs(dequantise(q, scale) - x)
    assert err.max() <= 0.5 * scale * (1 + 1e-5) + 1e-6
    # and it is the nearest: one level up or down is never closer (compared in float64)
    x64 = x.astype(np.float64)
    err64 = np.abs(q * scale - x64)
    for dq in (-1, 1):
        other = np.clip(q.astype(np.int64) + dq, 0, levels) * scale
        assert (np.abs(other - x64) >= err64 - 1e-5 * scale).all()


def test_default_clip_saturates_only_the_tiniest_top_fraction():
    from rmac.ops.quantise import DEFAULT_CLIP

    x = _sparse_maps(9, K=40, H=30, W=30, zeros=0.5)  # ~18000 non-zeros
    q, scale = quantise(x)
    nz = x[x > 0]
    saturated = np.mean(nz > scale * DEFAULT_LEVELS)
    assert 0 < saturated <= DEFAULT_CLIP
    assert scale * DEFAULT_LEVELS < x.max()


def test_scale_invariance_of_levels():
    """Scaling an image by a power of two scales `scale` and leaves the levels (hence AML) unchanged."""
    x = _sparse_maps(3)
    q1, s1 = quantise(x)
    q2, s2 = quantise(x * 8)
    assert np.array_equal(q1, q2) and s2 == pytest.approx(8 * s1)
    q3, _ = quantise(np.transpose(np.transpose(x, (2, 0, 1)).copy(), (1, 2, 0)))  # non-C-ordered input
    assert np.array_equal(q1, q3) and q3.flags.c_contiguous


def test_clip_saturates_the_top_fraction():
    x = _sparse_maps(5, K=20, H=20, W=20, zeros=0.5)
    nz = x[x > 0]
    clip = 0.01
    q, scale = quantise(x, DEFAULT_LEVELS, clip=clip)
    top = scale * DEFAULT_LEVELS
    assert np.mean(nz > top) <= clip  # at most the clipped fraction lies above the top level
    assert np.mean(nz >= top) >= clip - 1.0 / nz.size
    assert (q[x >= top] == DEFAULT_LEVELS).all()
    small = x <= top
    assert np.abs(dequantise(q, scale)[small] - x[small]).max() <= 0.5 * scale * (1 + 1e-5)
    # a finer step than without clipping
    assert scale < quantise(x, clip=0.0)[1]


def test_negatives_become_zero_and_bad_input_raises():
    x = np.array([[[-1e-7, 0.0], [2.0, 4.0]]], dtype=np.float32)
    q, scale = quantise(x, 4)  # 2 non-zeros: the default clip leaves the max at the top level
    assert q.tolist() == [[[0, 0], [2, 4]]] and scale == 1.0
    with pytest.raises(ValueError):
        quantise(np.full((1, 2, 2), np.nan, dtype=np.float32))
    with pytest.raises(ValueError):
        quantise(np.ones((2, 2)))
    with pytest.raises(ValueError):
        quantise(np.ones((1, 2, 2)), levels=256)
    with pytest.raises(ValueError):
        quantise(np.ones((1, 2, 2)), clip=1.0)


def test_all_zero_map():
    q, scale = quantise(np.zeros((3, 4, 5), dtype=np.float32))
    assert scale == 1.0 and q.dtype == np.uint8 and not q.any()
    assert not dequantise(q, scale).any()
