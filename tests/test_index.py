"""Sharded FAISS search against numpy brute force, exclusion of failed rows, files, IVF recall."""
import json

import faiss
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rmac.storage.index import (
    ShardedIndex, build_shard, load_shard, save_shard, shard_entry, shard_file, valid_rows,
    write_manifest,
)


def l2n(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_index(folder, X, rows_per_shard, kind="flat", **kw):
    entries = []
    for i, start in enumerate(range(0, len(X), rows_per_shard)):
        stop = min(start + rows_per_shard, len(X))
        index = build_shard(X[start:stop], start, kind=kind, **kw)
        save_shard(index, folder / shard_file(i))
        entries.append(shard_entry(index, shard_file(i), start, stop, kind))
    write_manifest(folder, entries, {"array": "rmac"})
    return entries


def brute_force(X, Q, k, valid=None):
    S = Q @ X.T
    if valid is not None:
        S[:, ~valid] = -np.inf
    order = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, order, axis=1), order


def assert_same_topk(scores, ids, ref_scores, X, Q):
    # ids may differ on ties only: scores must agree, and each returned id must have its score
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)
    found = ids >= 0
    recomputed = np.einsum("qd,qkd->qk", Q, X[np.where(found, ids, 0)])
    np.testing.assert_allclose(recomputed[found], scores[found], atol=1e-5)
    for row in ids:
        assert len(set(row[row >= 0])) == (row >= 0).sum()


def test_flat_equals_brute_force_many_shards(tmp_path):
    rng = np.random.default_rng(0)
    X = l2n(rng.standard_normal((2003, 32)))  # last shard is a partial one
    Q = l2n(rng.standard_normal((25, 32)))
    write_index(tmp_path, X, rows_per_shard=97)
    index = ShardedIndex(tmp_path)
    assert len(index.shards) == 21 and index.ntotal == 2003 and index.meta == {"array": "rmac"}
    scores, ids = index.search(Q, 50)
    ref_scores, ref_ids = brute_force(X, Q, 50)
    assert_same_topk(scores, ids, ref_scores, X, Q)
    assert np.mean(ids == ref_ids) > 0.99  # ids are global row numbers, not per-shard offsets
    assert np.all(np.diff(scores, axis=1) <= 0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 300), per_shard=st.integers(1, 80),
       k=st.integers(1, 400), dup=st.booleans())
def test_flat_matches_brute_force_property(tmp_path_factory, seed, n, per_shard, k, dup):
    rng = np.random.default_rng(seed)
    X = l2n(rng.standard_normal((n, 8)))
    if dup:  # exact ties across shards
        X[n // 2:] = X[: n - n // 2]
    X[rng.random(n) < 0.1] = 0  # failed rows
    valid = valid_rows(X)
    Q = l2n(rng.standard_normal((3, 8)))
    folder = tmp_path_factory.mktemp("idx")
    write_index(folder, X, per_shard)
    scores, ids = ShardedIndex(folder).search(Q, k)
    assert scores.shape == ids.shape == (3, k)
    m = min(k, int(valid.sum()))
    ref_scores, _ = brute_force(X, Q, m, valid)
    assert_same_topk(scores[:, :m], ids[:, :m], ref_scores, X, Q)
    assert np.all(ids[:, m:] == -1) and np.all(scores[:, m:] == -np.inf)
    assert valid[ids[:, :m]].all()


def test_excluded_rows_never_returned(tmp_path):
    rng = np.random.default_rng(1)
    X = l2n(rng.standard_normal((600, 16)))
    X[[3, 150, 151, 599]] = 0          # failed images: zero vectors
    X[7, 2] = np.nan                   # a broken vector
    flagged = np.zeros(600, bool)
    flagged[[10, 300]] = True          # failed according to the store's records
    Q = np.concatenate([X[[10, 300, 20]], l2n(rng.standard_normal((5, 16)))])
    entries = []
    for i, start in enumerate(range(0, 600, 100)):
        index = build_shard(X[start:start + 100], start, valid=~flagged[start:start + 100])
        save_shard(index, tmp_path / shard_file(i))
        entries.append(shard_entry(index, shard_file(i), start, start + 100, "flat"))
    write_manifest(tmp_path, entries)
    index = ShardedIndex(tmp_path)
    assert index.ntotal == 600 - 7
    scores, ids = index.search(Q, 600)
    excluded = {3, 150, 151, 599, 7, 10, 300}
    for row in ids:
        assert set(row[:593]) == set(range(600)) - excluded
        assert np.all(row[593:] == -1)
    assert ids[2, 0] == 20 and scores[2, 0] == pytest.approx(1.0, abs=1e-5)
    assert json.loads((tmp_path / "manifest.json").read_text())["shards"][0]["ntotal"] == 97


def test_shard_of_only_failed_rows(tmp_path):
    X = np.zeros((10, 4), np.float32)
    X[5:] = l2n(np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]])
    write_index(tmp_path, X, 5)
    index = ShardedIndex(tmp_path)
    assert [s.ntotal for s in index.shards] == [0, 5]
    scores, ids = index.search(np.eye(4, dtype=np.float32)[:1], 3)
    assert sorted(ids[0, :2]) == [5, 9] and ids[0, 2] in (6, 7, 8)
    np.testing.assert_allclose(scores[0], [1, 1, 0], atol=1e-6)


def test_folder_without_shards(tmp_path):
    write_manifest(tmp_path, [], {"note": "empty store"})
    index = ShardedIndex(tmp_path)
    assert index.ntotal == 0
    scores, ids = index.search(np.ones((2, 16), np.float32), 3)
    assert ids.shape == (2, 3) and np.all(ids == -1) and np.all(scores == -np.inf)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    X = l2n(rng.standard_normal((500, 24)))
    Q = l2n(rng.standard_normal((4, 24)))
    for kind in ("flat", "ivf"):
        index = build_shard(X, 1000, kind=kind, nlist=8, nprobe=3)
        path = tmp_path / f"{kind}.faiss"
        save_shard(index, path)
        assert not list(tmp_path.glob("*.tmp"))
        for mmap in (False, True):
            back = load_shard(path, mmap=mmap)
            assert (back.d, back.ntotal) == (24, 500)
            D0, I0 = index.search(Q, 10)
            D1, I1 = back.search(Q, 10)
            np.testing.assert_array_equal(I0, I1)
            np.testing.assert_array_equal(D0, D1)
            assert I1.min() >= 1000
        if kind == "ivf":
            assert faiss.extract_index_ivf(back).nprobe == 3


def test_manifest_is_checked(tmp_path):
    X = l2n(np.random.default_rng(3).standard_normal((20, 4)))
    a, b = build_shard(X[:10], 0), build_shard(X[10:], 10)
    save_shard(a, tmp_path / "a.faiss")
    save_shard(b, tmp_path / "b.faiss")
    with pytest.raises(ValueError, match="overlap"):
        write_manifest(tmp_path, [shard_entry(a, "a.faiss", 0, 12, "flat"),
                                  shard_entry(b, "b.faiss", 10, 20, "flat")])
    with pytest.raises(FileNotFoundError):
        write_manifest(tmp_path, [shard_entry(a, "missing.faiss", 0, 10, "flat")])
    # a manifest that disagrees with the shard file is refused when loading
    write_manifest(tmp_path, [shard_entry(a, "b.faiss", 0, 10, "flat") | {"ntotal": 9}])
    with pytest.raises(ValueError, match="ntotal"):
        ShardedIndex(tmp_path)
    write_manifest(tmp_path, [shard_entry(a, "a.faiss", 0, 10, "flat")])
    with pytest.raises(ValueError, match="dimension"):
        ShardedIndex(tmp_path).search(np.ones((1, 5), np.float32), 1)


def test_ivf_recall_on_clustered_data(tmp_path):
    rng = np.random.default_rng(4)
    d, n, centers = 64, 24_000, 200
    C = l2n(rng.standard_normal((centers, d)))
    X = l2n(C[rng.integers(0, centers, n)] + 0.12 * rng.standard_normal((n, d)).astype(np.float32))
    Q = l2n(C[rng.integers(0, centers, 100)] + 0.12 * rng.standard_normal((100, d)).astype(np.float32))
    train = X[rng.choice(n, 8000, replace=False)]  # one sample shared by all shards
    write_index(tmp_path, X, 6000, kind="ivf", nlist=64, train=train)
    _, ref = brute_force(X, Q, 10)
    index = ShardedIndex(tmp_path, nprobe=8)

    def recall(ids):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)])

    r8 = recall(index.search(Q, 10)[1])
    r1 = recall(index.search(Q, 10, nprobe=1)[1])
    r_all = recall(index.search(Q, 10, nprobe=64)[1])
    assert r8 >= 0.95, r8
    assert r1 < r8 <= r_all == 1.0


def test_ivf_trained_on_its_own_shard():
    rng = np.random.default_rng(5)
    X = l2n(rng.standard_normal((400, 16)))
    index = build_shard(X, 0, kind="ivf")  # nlist from the shard size: 400 // 39
    assert faiss.extract_index_ivf(index).nlist == 10 and index.ntotal == 400
    with pytest.raises(ValueError, match="training"):
        build_shard(np.zeros((5, 16), np.float32), 0, kind="ivf")


def _pq_template(train: np.ndarray, k_factor: float = 2.0):
    from rmac.workflows.ivf import pq_factory

    t = faiss.index_factory(train.shape[1], pq_factory(train.shape[1]), faiss.METRIC_INNER_PRODUCT)
    t.train(train)
    faiss.downcast_index(t.index).k_factor = k_factor
    return t


def test_flat16_is_exhaustive_at_half_precision(tmp_path):
    rng = np.random.default_rng(6)
    X = l2n(rng.standard_normal((3000, 48)))
    Q = l2n(rng.standard_normal((20, 48)))
    index = build_shard(X, 500, kind="flat16")
    save_shard(index, tmp_path / "h.faiss")
    back = load_shard(tmp_path / "h.faiss")
    ref_d, ref_i = brute_force(X, Q, 50)
    got_d, got_i = back.search(Q, 50)
    np.testing.assert_allclose(got_d, ref_d, atol=2e-3)  # fp16 rounding of the stored vectors
    assert np.mean(got_i - 500 == ref_i) > 0.97  # the same rows, up to near-ties
    # half the bytes of a float32 shard
    save_shard(build_shard(X, 500), tmp_path / "f.faiss")
    assert (tmp_path / "h.faiss").stat().st_size < 0.55 * (tmp_path / "f.faiss").stat().st_size


def test_pq_shards_recall_grows_with_k_factor_and_search_params_reach_them(tmp_path):
    """pq: 4-bit fast-scan codes over every row, the best k_factor x k re-scored with SQ8 vectors.
    Shards copy one trained template; `k_factor` per call reaches every shard (client and workers)."""
    rng = np.random.default_rng(7)
    d, n = 64, 12_000
    X = l2n(rng.standard_normal((n, d)) + 0.5 * rng.standard_normal((1, d)))
    Q = l2n(X[rng.choice(n, 40, replace=False)] + 0.3 * rng.standard_normal((40, d)).astype(np.float32))
    template = _pq_template(X[rng.choice(n, 4000, replace=False)])
    for i, (a, b) in enumerate([(0, 5000), (5000, n)]):
        s = build_shard(X[a:b], a, kind="pq", template=template)
        save_shard(s, tmp_path / shard_file(i))
    assert template.ntotal == 0
    write_manifest(tmp_path, [shard_entry(load_shard(tmp_path / shard_file(i)), shard_file(i), a, b, "pq")
                              for i, (a, b) in enumerate([(0, 5000), (5000, n)])])
    index = ShardedIndex(tmp_path)
    _, ref = brute_force(X, Q, 100)

    def recall(ids):
        return np.mean([len(set(a) & set(b)) / 100 for a, b in zip(ids, ref)])

    r1, r2, r8 = (recall(index.search(Q, 100, k_factor=kf)[1]) for kf in (1, 2, 8))
    assert recall(index.search(Q, 100)[1]) == r2  # the template's k_factor is stored in every shard
    assert r1 < r2 <= r8 and r8 >= 0.9, (r1, r2, r8)
    scores, ids = index.search(Q, 100, k_factor=8)
    exact = np.einsum("qd,qkd->qk", Q, X[ids])
    err = np.abs(scores - exact)  # re-scored with 8-bit vectors: close to the exact cosine
    assert np.median(err) < 0.005 and err.max() < 0.05, (np.median(err), err.max())
    with pytest.raises(ValueError, match="template"):
        build_shard(X[:10], 0, kind="pq")


def test_pq_factory_sizes():
    from rmac.workflows.ivf import pq_factory

    assert pq_factory(1280) == "IDMap,PQ640x4fs,Refine(SQ8)"
    assert pq_factory(511) == "IDMap,PQ511x4fs,Refine(SQ8)"  # odd: one dimension per sub-quantiser
    assert pq_factory(512, 128) == "IDMap,PQ128x4fs,Refine(SQ8)"
    with pytest.raises(ValueError, match="divide"):
        pq_factory(10, 3)
    assert pq_factory(1280, dim=512) == "IDMap,PCA512,PQ256x4fs,Refine(SQ8)"  # the re-scoring stays 1280-D
    assert pq_factory(1280, 128, 1024, dim=512) == "IDMap,PCA512,IVF1024,PQ128x4fsr,Refine(SQ8)"
    assert pq_factory(64, dim=64) == "IDMap,PQ32x4fs,Refine(SQ8)"  # every axis: no projection
    with pytest.raises(ValueError, match="pq-dim"):
        pq_factory(64, dim=65)


def test_pq_codes_of_fewer_axes_keep_inner_products_and_rescore_in_full():
    """`--pq-dim`: the codes are of the vectors' projections on their top axes, found by an uncentred PCA
    (a projected inner product is the inner product within those axes, not shifted by each row's
    product with the mean); the candidates are re-scored with the whole
    vectors. On data whose energy lies mostly in 32 of 64 dimensions, with a large common mean (where a
    centred PCA would mis-rank), codes of 32 axes find the top 100 better than codes of all 64 axes in as
    many bytes, and score it like the exact cosine."""
    from rmac.workflows.ivf import pq_factory, train_uncentred_pca

    rng = np.random.default_rng(11)
    d, n, r = 64, 12_000, 32
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    spread = np.r_[np.ones(r), np.full(d - r, 0.02)]
    X = l2n((rng.standard_normal((n, d)) * spread + 3 * spread * rng.standard_normal(d)) @ basis.T)
    Q = l2n(X[rng.choice(n, 30, replace=False)] + 0.05 * rng.standard_normal((30, d)).astype(np.float32))
    index = faiss.index_factory(d, pq_factory(d, dim=r), faiss.METRIC_INNER_PRODUCT)
    train_uncentred_pca(index, X[:4000])
    index.train(X[:4000])
    pre = faiss.downcast_index(faiss.downcast_index(index.index).base_index)
    pca = faiss.downcast_VectorTransform(pre.chain.at(0))
    assert np.abs(faiss.vector_to_array(pca.b)).max() < 1e-5  # nothing subtracted
    proj = pca.apply(Q) @ pca.apply(X).T
    assert np.abs(proj - Q @ X.T).max() < 0.05  # inner products kept within the top axes
    index.add_with_ids(X, np.arange(n, dtype=np.int64) + 1000)
    _, ref = brute_force(X, Q, 100)
    params = faiss.IndexRefineSearchParameters(k_factor=8)
    scores, ids = index.search(Q, 100, params=params)
    recall = np.mean([len(set(a - 1000) & set(b)) / 100 for a, b in zip(ids, ref)])
    plain = faiss.index_factory(d, pq_factory(d, m=r // 2), faiss.METRIC_INNER_PRODUCT)  # the same bytes a row
    plain.train(X[:4000])
    plain.add_with_ids(X, np.arange(n, dtype=np.int64))
    plain_recall = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(plain.search(Q, 100, params=params)[1], ref)])
    assert recall > 0.9 and recall > plain_recall + 0.1, (recall, plain_recall)
    exact = np.einsum("qd,qkd->qk", Q, X[ids - 1000])
    assert np.median(np.abs(scores - exact)) < 0.005  # re-scored with the 64-D 8-bit vectors


@pytest.mark.parametrize("kind", ["flat", "flat16", "pq", "ivf"])
def test_a_shard_added_chunk_by_chunk_is_the_shard_built_at_once(kind):
    """`add_rows` in chunks (how a Dask task builds a large shard in bounded memory) gives the same
    shard as `build_shard` over all rows: same ids, same scores, failed rows left out in each chunk."""
    from rmac.storage.index import add_rows

    rng = np.random.default_rng(3)
    d, n, start = 32, 2_000, 700
    X = l2n(rng.standard_normal((n, d)))
    X[[5, 999, 1500]] = 0  # failed images
    valid = np.ones(n, bool)
    valid[[10, 1234]] = False  # rows the store marks invalid
    Q = l2n(rng.standard_normal((8, d)))
    kw = {}
    if kind == "pq":
        kw["template"] = _pq_template(X[valid_rows(X)][:1500])
    elif kind == "ivf":
        kw["template"] = build_shard(X[:0], 0, kind="ivf", train=X, nlist=16, nprobe=16)
    whole = build_shard(X, start, kind=kind, valid=valid, **kw)
    chunked = build_shard(X[:333], start, kind=kind, valid=valid[:333], **kw)
    added = sum(add_rows(chunked, X[a:a + 333], start + a, valid[a:a + 333]) for a in range(333, n, 333))
    assert chunked.ntotal == whole.ntotal == n - 5 and added == whole.ntotal - (333 - 2)  # rows 5 and 10 in the first chunk
    (s1, i1), (s2, i2) = whole.search(Q, 50), chunked.search(Q, 50)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=0, atol=1e-6)
    assert not np.isin([start + 5, start + 999, start + 1500, start + 10, start + 1234], i2).any()


def test_pq_behind_ivf_lists_probes_the_stored_nprobe_and_keeps_k_factor(tmp_path):
    """``rmac index --index-type pq --nlist N``: IVF lists in front of fast-scan codes of the residuals.
    The shards probe the template's nprobe (set to nlist / 8 here); a per-call nprobe reaches them
    without resetting their k_factor; probing every list finds the deep neighbours as the plain pq does."""
    from rmac.workflows.ivf import pq_factory

    rng = np.random.default_rng(8)
    d, n, nlist = 32, 12_000, 32
    X = l2n(rng.standard_normal((n, d)) + 0.5 * rng.standard_normal((1, d)))
    Q = l2n(X[rng.choice(n, 40, replace=False)] + 0.3 * rng.standard_normal((40, d)).astype(np.float32))
    assert pq_factory(d, None, nlist) == "IDMap,IVF32,PQ16x4fsr,Refine(SQ8)"
    template = faiss.index_factory(d, pq_factory(d, None, nlist), faiss.METRIC_INNER_PRODUCT)
    assert faiss.extract_index_ivf(template).by_residual  # codes of the residuals from the list centroids
    template.train(X[rng.choice(n, 4000, replace=False)])
    faiss.downcast_index(template.index).k_factor = 4.0
    faiss.extract_index_ivf(template).nprobe = nlist // 8
    entries = []
    for i, (a, b) in enumerate([(0, 5000), (5000, n)]):
        save_shard(build_shard(X[a:b], a, kind="pq", template=template), tmp_path / shard_file(i))
        entries.append(shard_entry(load_shard(tmp_path / shard_file(i)), shard_file(i), a, b, "pq"))
    write_manifest(tmp_path, entries)
    index = ShardedIndex(tmp_path)
    _, ref = brute_force(X, Q, 100)

    def recall(ids):
        return np.mean([len(set(a) & set(b)) / 100 for a, b in zip(ids, ref)])

    stored = index.search(Q, 100)
    np.testing.assert_array_equal(stored[1], index.search(Q, 100, nprobe=nlist // 8, k_factor=4)[1])
    every = index.search(Q, 100, nprobe=nlist)
    np.testing.assert_array_equal(every[1], index.search(Q, 100, nprobe=nlist, k_factor=4)[1])  # k_factor kept
    assert recall(stored[1]) < recall(every[1]), (recall(stored[1]), recall(every[1]))
    assert recall(index.search(Q, 100, nprobe=nlist, k_factor=8)[1]) >= 0.9


def test_regional_vectors_from_the_stored_non_zeros_equal_the_dense_path(dev_store):
    """What indexing pools (`regional_vectors_of`: the stored non-zeros, one read per partition) is exactly
    `regional_vectors` of each dense dequantised map (`Store.read_maps`), over rows of several partitions."""
    from rmac.workflows.index import DEFAULT_L, regional_vectors, regional_vectors_of

    dev_store = dev_store.store
    rows = [int(r) for r in np.flatnonzero(dev_store.valid_rows())[::7]]
    assert len({dev_store.partition_of(r) for r in rows}) > 2
    got = regional_vectors_of(dev_store, rows, DEFAULT_L)
    want = [regional_vectors(q, s, DEFAULT_L) for q, s in dev_store.read_maps(rows)]
    assert len(got) == len(want) == len(rows)
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.array_equal(g, w)
    # the vector stage hands over the maps its integrity check decoded (`verify_partition`) instead of
    # reading them again: the same vectors
    p = dev_store.partition_of(rows[0])
    mine = [r for r in rows if dev_store.partition_of(r) == p]
    checked = dev_store.verify_partition(p)
    assert checked.map_hw.shape == dev_store.read_sparse(p).maps.map_hw.shape
    for g, w in zip(regional_vectors_of(dev_store, mine, DEFAULT_L, {p: checked}), got[:len(mine)]):
        assert np.array_equal(g, w)
