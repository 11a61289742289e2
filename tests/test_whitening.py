"""PCA-whitening: mergeable statistics, fit, apply."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmac.ops import whitening as wh


def _data(rng, n, K, rank=None):
    """Correlated data with a spread of variances (optionally of low rank)."""
    r = K if rank is None else rank
    A = rng.standard_normal((r, K)) * np.geomspace(3.0, 0.1, r)[:, None]
    return rng.standard_normal((n, r)) @ A + rng.standard_normal(K)


def _naive_whitening(X, D):
    """Textbook PCA-whitening from np.cov and an SVD (no shrinkage), as columns U, eigenvalues."""
    X = np.asarray(X, dtype=np.float64)
    C = np.cov(X, rowvar=False, bias=True)
    U, S, _ = np.linalg.svd(C)
    return X.mean(0), U[:, :D], S[:D]


def _assert_stats_close(a, b):
    assert a.count == b.count
    np.testing.assert_allclose(a.sum, b.sum, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(a.outer, b.outer, rtol=1e-12, atol=1e-9)


def test_stats_values():
    X = np.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0]], dtype=np.float32)
    s = wh.stats(X)
    assert s.count == 3 and s.sum.dtype == np.float64 and s.outer.dtype == np.float64
    np.testing.assert_allclose(s.sum, [4.5, 1.0])
    brute = sum(np.outer(x, x) for x in X.astype(np.float64))
    np.testing.assert_allclose(s.outer, brute)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(1, 6), st.data())
def test_merge_of_chunks_equals_stats_of_concatenation(seed, n, K, data):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, K))
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=5)))
    chunks = np.split(X, cuts)
    parts = [wh.stats(c) for c in chunks]
    # Left fold from the identity, and a pairwise tree in a shuffled order.
    folded = wh.empty(K)
    for p in parts:
        folded = wh.merge(folded, p)
    order = data.draw(st.permutations(range(len(parts))))
    tree = [parts[i] for i in order]
    while len(tree) > 1:
        tree = [wh.merge(*tree[i : i + 2]) if i + 1 < len(tree) else tree[i] for i in range(0, len(tree), 2)]
    whole = wh.stats(X)
    _assert_stats_close(folded, whole)
    _assert_stats_close(tree[0], whole)
    # Commutative exactly; empty is an exact identity.
    a, b = parts[0], parts[-1]
    ab, ba = wh.merge(a, b), wh.merge(b, a)
    assert ab.count == ba.count and np.array_equal(ab.sum, ba.sum) and np.array_equal(ab.outer, ba.outer)
    e = wh.merge(wh.empty(K), a)
    assert e.count == a.count and np.array_equal(e.sum, a.sum) and np.array_equal(e.outer, a.outer)


def test_merge_rejects_dimension_mismatch():
    with pytest.raises(ValueError):
        wh.merge(wh.empty(3), wh.empty(4))


def test_fit_on_merged_equals_fit_on_concatenation():
    rng = np.random.default_rng(0)
    X = _data(rng, 500, 16)
    merged = wh.merge(wh.merge(wh.stats(X[:123]), wh.stats(X[123:400])), wh.stats(X[400:]))
    a, b = wh.fit(merged, dim=8), wh.fit(wh.stats(X), dim=8)
    np.testing.assert_allclose(a.proj, b.proj, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-6)
    np.testing.assert_allclose(a.eigvals, b.eigvals, rtol=1e-9)
    assert a.n_fit == b.n_fit == 500


def test_fit_matches_textbook_pca():
    rng = np.random.default_rng(1)
    X = _data(rng, 400, 12)
    w = wh.fit(wh.stats(X), dim=6, shrinkage=0.0)
    mu, U, S = _naive_whitening(X, 6)
    assert w.proj.dtype == np.float32 and w.mean.dtype == np.float32 and w.eigvals.dtype == np.float64
    np.testing.assert_allclose(w.eigvals, S, rtol=1e-9)
    np.testing.assert_allclose(w.mean, mu, rtol=1e-5, atol=1e-6)
    # Same rows up to sign (the sign convention is checked separately).
    expected = (U / np.sqrt(S)).T
    signs = np.sign((w.proj * expected).sum(1))
    np.testing.assert_allclose(w.proj, expected * signs[:, None], rtol=1e-4, atol=1e-5)


def test_whitened_training_data_has_identity_covariance():
    rng = np.random.default_rng(2)
    X = _data(rng, 2000, 20)
    w = wh.fit(wh.stats(X), dim=10, shrinkage=0.0)
    Y = wh.apply(w, X).astype(np.float64)
    assert Y.shape == (2000, 10) and wh.apply(w, X).dtype == np.float32
    np.testing.assert_allclose(Y.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(Y, rowvar=False, bias=True), np.eye(10), atol=1e-4)


def test_apply_formula_and_single_vector():
    rng = np.random.default_rng(3)
    X = _data(rng, 100, 8)
    w = wh.fit(wh.stats(X))
    x = X[7]
    expected = w.proj.astype(np.float64) @ (x - w.mean.astype(np.float64))
    np.testing.assert_allclose(wh.apply(w, x), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(wh.apply(w, X)[7], wh.apply(w, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shrinkage", [0.0, 0.1, 1.0])
def test_dim_reduction_keeps_top_rows(shrinkage):
    rng = np.random.default_rng(4)
    X = _data(rng, 300, 10)
    s = wh.stats(X)
    full = wh.fit(s, shrinkage=shrinkage)
    for d in (1, 3, 10):
        part = wh.fit(s, dim=d, shrinkage=shrinkage)
        np.testing.assert_array_equal(part.proj, full.proj[:d])
        np.testing.assert_array_equal(part.eigvals, full.eigvals[:d])
    assert (np.diff(full.eigvals) <= 0).all()


def test_shrinkage_rule():
    rng = np.random.default_rng(5)
    X = _data(rng, 300, 6)
    s = wh.stats(X)
    plain, shrunk = wh.fit(s, shrinkage=0.0), wh.fit(s, shrinkage=0.5)
    reg = 0.5 * np.cov(X, rowvar=False, bias=True).trace() / 6  # mean eigenvalue = trace / K
    # Same directions, row norms 1/sqrt(lambda) vs 1/sqrt(lambda + reg).
    ratio = np.linalg.norm(shrunk.proj, axis=1) / np.linalg.norm(plain.proj, axis=1)
    np.testing.assert_allclose(ratio, np.sqrt(plain.eigvals / (plain.eigvals + reg)), rtol=1e-5)
    assert shrunk.shrinkage == 0.5


def test_sign_convention_is_deterministic():
    rng = np.random.default_rng(6)
    X = _data(rng, 200, 7)
    w = wh.fit(wh.stats(X), shrinkage=0.0)
    rows = w.proj
    assert (rows[np.arange(7), np.argmax(np.abs(rows), axis=1)] > 0).all()
    # Flipping the data's sign flips no eigenvector (the covariance is the same).
    w2 = wh.fit(wh.stats(-X), shrinkage=0.0)
    np.testing.assert_allclose(w2.proj, w.proj, rtol=1e-5, atol=1e-6)


def test_more_channels_than_vectors_is_stable():
    rng = np.random.default_rng(7)
    n, K = 40, 256
    X = rng.standard_normal((n, K)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    w = wh.fit(wh.stats(X), dim=128)  # default shrinkage
    assert np.isfinite(w.proj).all() and np.isfinite(w.eigvals).all()
    assert (w.eigvals[n - 1 :] == 0).all()  # rank <= n - 1 after centring
    # Bounded gain: no direction gets more than (shrinkage * mean eigenvalue)^-1/2.
    mean_eig = np.cov(X.astype(np.float64), rowvar=False, bias=True).trace() / K
    gain = np.linalg.norm(w.proj.astype(np.float64), axis=1)
    assert gain.max() <= (wh.DEFAULT_SHRINKAGE * mean_eig) ** -0.5 * (1 + 1e-5)
    Y = wh.apply(w, X)
    assert np.isfinite(Y).all()
    # Within the data's span the whitening still equalises: the top n-1 directions of the
    # whitened data have variances lambda / (lambda + reg) < 1, in decreasing order.
    var = np.var(Y.astype(np.float64) @ np.eye(128)[:, : n - 1], axis=0)
    expected = w.eigvals[: n - 1] / (w.eigvals[: n - 1] + wh.DEFAULT_SHRINKAGE * mean_eig)
    np.testing.assert_allclose(var, expected, rtol=1e-3)
    # Without shrinkage a rank-deficient fit beyond the rank is refused rather than exploding.
    with pytest.raises(ValueError, match="shrinkage"):
        wh.fit(wh.stats(X), dim=128, shrinkage=0.0)
    assert np.isfinite(wh.fit(wh.stats(X), dim=n - 1, shrinkage=0.0).proj).all()


def test_fit_rejects_bad_arguments():
    s = wh.stats(np.random.default_rng(8).standard_normal((10, 4)))
    for bad in (dict(dim=0), dict(dim=5), dict(shrinkage=-1.0)):
        with pytest.raises(ValueError):
            wh.fit(s, **bad)
    with pytest.raises(ValueError):
        wh.fit(wh.stats(np.ones((1, 4))))


def test_rank_deficient_positive_data_with_large_mean():
    # MAC-like vectors: non-negative, l2-normalised, so |mean|^2 dwarfs the variances and
    # `outer/n - mu mu^T` cancels; the null space must still read as zero, not as tiny noise.
    rng = np.random.default_rng(9)
    n, K = 30, 200
    X = np.abs(rng.standard_normal((n, K))) + 2.0
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    s = wh.stats(X)
    w = wh.fit(s, dim=64)
    assert (w.eigvals[n - 1 :] == 0).all() and (w.eigvals[: n - 1] > 0).all()
    assert np.isfinite(wh.apply(w, X)).all()
    with pytest.raises(ValueError):
        wh.fit(s, dim=n, shrinkage=0.0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), K=st.integers(2, 40), n=st.integers(1, 30),
       shrinkage=st.sampled_from([0.01, 0.1, 1.0]))
def test_triangular_basis_keeps_inner_products(seed, K, n, shrinkage):
    """The triangular basis whitens to the same Gram matrix as `apply`, and `back` rotates it onto
    `apply`'s rows exactly (up to float32 rounding)."""
    rng = np.random.default_rng(seed)
    w = wh.fit(wh.stats(_data(rng, 3 * K + 5, K)), shrinkage=shrinkage)
    b = wh.triangular_basis(w)
    assert b is not None and wh.triangular_basis(w) is b  # computed once per whitening
    assert np.all(np.triu(b.lower, 1) == 0)
    np.testing.assert_allclose(b.back @ b.back.T, np.eye(K), atol=1e-5)
    X = _data(rng, n, K).astype(np.float32)
    ref = wh.apply(w, X).astype(np.float64)
    got = wh.apply_basis(b, X, width=3).astype(np.float64)
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(got @ got.T, ref @ ref.T, rtol=1e-4, atol=1e-4 * scale**2)
    np.testing.assert_allclose(got @ b.back, ref, rtol=1e-4, atol=1e-4 * scale)


def test_triangular_basis_only_for_square_whitening():
    rng = np.random.default_rng(0)
    assert wh.triangular_basis(wh.fit(wh.stats(_data(rng, 50, 6)), dim=4)) is None
