"""Search end to end on a real cluster (a `dask scheduler` and two `dask worker` processes started by
deploy/local-cluster.sh), real weights, real photos, real Zarr stores and FAISS shards, checked against
the same kernels run in this one process: the Dask tree-reduced whitening against a fit on every
regional vector, FAISS filtering against numpy brute force, the scattered AML re-ranking and query
expansion against `rmac.ops.rerank` on the stored maps; then retrieval quality and the boxes."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from rmac.ops import whitening as wh
from rmac.ops.aml import box_to_pixels
from rmac.ops.evaluate import compute_map
from rmac.ops.pooling import l2n, rmac
from rmac.ops.quantise import dequantise
from rmac.ops.rerank import query_expansion, rerank, rescore
from rmac.storage.index import ShardedIndex
from rmac.workflows.evaluate import full_ranking
from rmac.workflows.extract import ModelChoice
from rmac.workflows.index import DEFAULT_DIM, DEFAULT_L, load_whitening, partition_stats, regional_vectors
from rmac.workflows.search import Database, SearchParams, answer, cell_geometry, query_maps, query_vectors

from conftest import MAX_SIZE, PARTITION

pytestmark = pytest.mark.slow

TOP_N = 24  # re-ranked per query: fewer than the 44 images, so the filter's cut matters too
QE = 5
EASY = ("christ_1", "eiffel_1", "rushmore_1", "tajmahal_1")  # their first positive is clearly first


@pytest.fixture(scope="module")
def db(dev_store):
    return Database([dev_store.store])


@pytest.fixture(scope="module")
def queries(client, dev, dev_store, db):
    """Every query of the subset: its maps computed on a worker, its vectors from the stored whitening."""
    futures = [client.submit(query_maps, str(dev.image_paths[q.image]), q.bbox, ModelChoice(), MAX_SIZE,
                             pure=False) for q in dev_store.queries]
    out = []
    for f in futures:
        maps, hw, bbox = f.result()
        out.append(query_vectors(maps, db.whitenings, DEFAULT_L, hw, bbox))
    return out


@pytest.fixture(scope="module")
def rankings(client, db, queries):
    """The cluster's answer (filter, scattered AML re-ranking, QE) to every query."""
    return [answer(db, client, qv, SearchParams(top_n=TOP_N, qe=QE)) for qv in queries]


def assert_same_ranking(rows, scores, ref_rows, ref_scores, atol=1e-5):
    """Same rows with the same scores (within ``atol``), in the same order except between exact ties."""
    rows, ref_rows = np.asarray(rows), np.asarray(ref_rows)
    assert sorted(rows.tolist()) == sorted(ref_rows.tolist())
    ref = dict(zip(ref_rows.tolist(), np.asarray(ref_scores, np.float64).tolist()))
    np.testing.assert_allclose(scores, [ref[r] for r in rows.tolist()], rtol=0, atol=atol)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=atol)  # position by position
    assert np.all(np.diff(np.asarray(scores, np.float64)) <= atol), "best first"
    for i in np.flatnonzero(rows != ref_rows):  # a swap is only allowed between tied scores
        assert abs(ref[int(rows[i])] - ref[int(ref_rows[i])]) <= atol, (i, rows[i], ref_rows[i])


def test_the_cluster_runs_separate_worker_processes(client, dev_store):
    import os

    pids = client.run(os.getpid)
    assert len(pids) == 2 and os.getpid() not in pids.values() and len(set(pids.values())) == 2
    info = dev_store.info
    assert dev_store.store.n_partitions == 6 and info["shards"] == 3 >= 2
    for kind in ("rmac", "macw"):
        manifest = json.loads((dev_store.path / "index" / kind / "manifest.json").read_text())
        ranges = [(s["start"], s["stop"]) for s in manifest["shards"]]
        assert ranges == [(0, 16), (16, 32), (32, 44)]
        assert all(s["ntotal"] == s["stop"] - s["start"] for s in manifest["shards"])
        assert manifest["meta"]["whitening"] == "dev distractors"


def test_tree_reduced_whitening_equals_a_fit_on_every_regional_vector(dev_store):
    """The whitening `rmac index` fitted by a Dask tree reduction of per-partition statistics equals a
    fit on all regional vectors of the distractor rows computed here, in one piece; by default it keeps
    D = K dimensions, as the paper."""
    store = dev_store.store
    K = store.config.channels
    assert DEFAULT_DIM is None
    w = load_whitening(store)
    distractors = np.flatnonzero(dev_store.subset)
    assert [store.ids[r] for r in distractors] == [i for i in dev_store.ids if i.startswith("distractor_")]
    X = np.concatenate([regional_vectors(q, s, DEFAULT_L) for q, s in store.read_maps(distractors)])
    ref = wh.fit(wh.stats(X))
    # fitted on the distractors only: as many vectors as they have regions, fewer than the whole store
    n_all = sum(len(regional_vectors(q, s, DEFAULT_L)) for q, s in store.read_maps(range(store.n_images)))
    assert w.n_fit == ref.n_fit == len(X) < n_all
    assert w.proj.shape == ref.proj.shape == (K, K)
    _assert_same_whitening(w, ref, X)


def _assert_same_whitening(w, ref, X):
    np.testing.assert_allclose(w.mean, ref.mean, rtol=0, atol=1e-7)
    np.testing.assert_allclose(w.eigvals, ref.eigvals, rtol=1e-7, atol=1e-12 * ref.eigvals[0])
    # Components with a distinct eigenvalue are unique up to sign (fixed by `fit`'s convention); those of
    # the null space (more kept dimensions than training vectors) are an arbitrary basis of it.
    lam = ref.eigvals
    gap = np.minimum(np.abs(np.diff(lam, prepend=np.inf)), np.abs(np.diff(lam, append=-np.inf)))
    distinct = (lam > 1e-9 * lam[0]) & (gap > 1e-7 * lam[0])
    assert distinct.sum() > 0.9 * min(len(X) - 1, len(lam))
    err = np.linalg.norm(w.proj[distinct] - ref.proj[distinct], axis=1) / np.linalg.norm(ref.proj[distinct], axis=1)
    assert err.max() < 1e-4
    # as an operator on the training data (which has no null-space component) they agree everywhere
    np.testing.assert_allclose(wh.apply(w, X), wh.apply(ref, X), rtol=0, atol=1e-4)


def test_mac_filtering_is_whitened_with_a_whitening_learned_on_mac_vectors(dev_store):
    """MAC filtering uses its own whitening, learned on one l2-normalised MAC per distractor image (as
    the paper's test.m), out of the same tree reduction as the regional one; `macw` rows apply it."""
    store = dev_store.store
    w_mac, w_reg = load_whitening(store, "mac"), load_whitening(store, "regional")
    distractors = np.flatnonzero(dev_store.subset)
    M = l2n(store.arrays["mac"][:][distractors])
    ref = wh.fit(wh.stats(M))
    assert w_mac.n_fit == len(distractors) != w_reg.n_fit
    _assert_same_whitening(w_mac, ref, M)
    macw = store.arrays["macw"][:][distractors]
    np.testing.assert_allclose(macw, l2n(wh.apply(ref, M)), rtol=0, atol=2e-4)
    regional, macs = partition_stats(store, 0, DEFAULT_L)  # one task yields both sets of statistics
    assert macs.count == int(store.valid_rows(store.partition_rows(0)).sum()) < regional.count


def test_stored_global_vectors_equal_in_process_ones(dev_store):
    """The R-MAC rows the workers wrote equal `rmac.ops.pooling.rmac` of the stored maps."""
    store = dev_store.store
    w = load_whitening(store)
    X = store.arrays["rmac"][:]
    ref = np.stack([rmac(dequantise(q, s), DEFAULT_L, w) for q, s in store.read_maps(range(store.n_images))])
    np.testing.assert_allclose(X, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)


def test_faiss_filtering_equals_brute_force_cosine(dev_store, db, queries):
    store = dev_store.store
    n = store.n_images
    for kind, Q in (("rmac", np.stack([qv.rmac for qv in queries])),
                    ("macw", np.stack([qv.macw for qv in queries]))):
        assert len(ShardedIndex(store.path / "index" / kind).shards) == 3
        X = store.arrays[kind][:]
        S = Q @ X.T
        for k in (n, 10):
            scores, rows = db.filter(kind, Q, k)
            assert scores.shape == rows.shape == (len(Q), k)
            for q in range(len(Q)):
                order = np.argsort(-S[q], kind="stable")[:k]
                assert_same_ranking(rows[q], scores[q], order, S[q, order])


def test_cluster_rerank_and_qe_equal_single_process(dev_store, db, queries, rankings):
    """For every query, the filter → scattered AML re-ranking → gather → QE answer of the cluster equals
    `rmac.ops.rerank.rerank` / `query_expansion` / `rescore` run here on the dense `Store.read_maps`."""
    store, w = dev_store.store, db.whitening
    X = store.arrays["rmac"][:]
    for qv, ranking in zip(queries, rankings):
        # filter: numpy brute force
        sims = X @ qv.rmac
        top = np.argsort(-sims, kind="stable")[:TOP_N]
        initial = sorted(ranking.initial_rank, key=ranking.initial_rank.get)
        assert_same_ranking(np.array(initial), sims[initial], top, sims[top])
        # the top N span several partitions, so the cluster scattered several tasks
        assert len({int(r) // PARTITION for r in top}) >= 3
        # re-rank: the kernel on the stored (quantised) maps read back dense, in this process
        maps = [q for q, _ in store.read_maps(top.tolist())]
        map_hw, image_hw = store.arrays["map_hw"][:][top], store.arrays["image_hw"][:][top]
        res = rerank(maps, qv.mac, qv.aspect, q_rmac=qv.rmac, whitening=w, L=DEFAULT_L,
                     levels=store.config.levels, t=3, s=1.1)
        boxes = [box_to_pixels(b, hw, ihw, cell_geometry(store, ihw)) for b, hw, ihw in zip(res.boxes, map_hw, image_hw)]
        got = ranking.reranked
        assert sorted(got) == sorted(top.tolist())
        for i, g in enumerate(top.tolist()):
            score, box, vec = got[g]
            assert score == pytest.approx(res.scores[i], abs=1e-5)
            np.testing.assert_allclose(box, boxes[i], rtol=0, atol=1e-9)
            np.testing.assert_allclose(vec, res.vectors[i], rtol=0, atol=1e-5)
        # QE on the re-ranked order, then the expanded query re-scores the short-list
        order0 = np.argsort(-res.scores, kind="stable")
        final = rescore(query_expansion(qv.rmac, res.vectors, order0, k=QE), res.vectors)
        order = np.argsort(-final, kind="stable")
        assert len(ranking.rows) == TOP_N
        assert_same_ranking(ranking.rows, ranking.scores, top[order], final[order])
        assert set(ranking.timings) == {"filter_s", "rerank_s", "qe_s"}


def test_hold_metadata_gives_each_worker_the_partitions_it_reranks(client, db, queries, rankings):
    """`Database.hold_metadata`: every worker parses and keeps the metadata of exactly the partitions
    `rerank_many` sends it (partition modulo the sorted workers); the answers stay the same."""
    from rmac.storage import maps as M

    client.run(M.clear_meta_cache)
    store = db.stores[0]
    held = db.hold_metadata(client)
    assert held == store.n_partitions  # every partition has maps
    sizes = client.run(lambda: M._parsed_meta.cache_info().currsize)
    workers = sorted(sizes)
    assert sizes == {w: sum(1 for p in range(store.n_partitions) if p % len(workers) == i)
                     for i, w in enumerate(workers)}
    misses = client.run(lambda: M._parsed_meta.cache_info().misses)
    again = answer(db, client, queries[0], SearchParams(top_n=TOP_N, qe=QE))
    assert client.run(lambda: M._parsed_meta.cache_info().misses) == misses  # nothing parsed again
    assert_same_ranking(again.rows, again.scores, rankings[0].rows, rankings[0].scores)


def test_boxes_are_image_pixels_inside_the_image(dev_store, rankings):
    store = dev_store.store
    image_hw = store.arrays["image_hw"][:]
    map_hw = store.arrays["map_hw"][:]
    seen = 0
    for ranking in rankings:
        assert set(ranking.boxes) == set(ranking.rows.tolist())  # every re-ranked image has its box
        for g, (x1, y1, x2, y2) in ranking.boxes.items():
            H, W = (int(v) for v in image_hw[g])
            with Image.open(store.paths[g]) as im:
                assert im.size == (W, H), "image_hw is the photo's own size, not the network input's"
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H, (store.ids[g], (x1, y1, x2, y2), (W, H))
            # whole cells of the map at the backbone's stride and offset: unclipped edges fall on the grid
            sy, sx, oy, ox = cell_geometry(store, (H, W))
            for v, lim, stride, edge0 in ((x1, W, sx, ox - sx / 2), (x2, W, sx, ox - sx / 2),
                                          (y1, H, sy, oy - sy / 2), (y2, H, sy, oy - sy / 2)):
                k = (v - edge0) / stride
                assert v in (0.0, float(lim)) or abs(k - round(k)) < 1e-6
            seen += 1
    assert seen == len(rankings) * TOP_N


def test_retrieval_quality(dev, dev_store, queries, rankings):
    """An easy query's true positive comes first (its own image aside, which is junk), and the mAP of
    R-MAC filtering and of the full pipeline are those of working retrieval."""
    store = dev_store.store
    by_name = {q.name: (q, r) for q, r in zip(dev_store.queries, rankings)}
    for name in EASY:
        q, r = by_name[name]
        ids = [store.ids[g] for g in r.rows]
        assert ids[0] == q.image, "the query's own image (junk) is the best match"
        first = next(i for i in ids if i not in q.junk)
        assert first in q.ok, (name, ids[:4])
    gnd = dev.gnd(dev_store.rows_of)
    gnd = [gnd[dev.queries.index(q)] for q in dev_store.queries]
    n = store.n_images
    filtered = np.stack([full_ranking(np.array(sorted(r.initial_rank, key=r.initial_rank.get)), n)
                         for r in rankings], axis=1)
    full = np.stack([full_ranking(r.rows, n) for r in rankings], axis=1)
    m_filter, aps, _, _ = compute_map(filtered, gnd)
    m_full, _, _, _ = compute_map(full, gnd)
    assert len(aps) == 14 and not np.isnan(aps).any()
    assert m_filter > 0.9 and m_full > 0.6, (m_filter, m_full)


@pytest.mark.parametrize("name", ["christ_1", "eiffel_1"])
def test_query_is_described_at_the_database_scale(client, dev, dev_store, db, tmp_path, name):
    """The same photo upscaled 3x (its box too) gives the same query: the whole photo is resized as
    `extract` resizes a database image before the box is cut, so the crop's scale does not depend on
    the photo's resolution (cutting at full resolution first described it 3x larger)."""
    q = next(q for q in dev_store.queries if q.name == name)
    photo = Image.open(dev.image_paths[q.image]).convert("RGB")
    W, H = photo.size
    assert max(W, H) > MAX_SIZE  # the database shrinks this photo
    box = (0.2 * W, 0.15 * H, 0.7 * W, 0.75 * H)  # a part of the photo, smaller than MAX_SIZE
    big_path = tmp_path / f"{name}_x3.png"
    photo.resize((3 * W, 3 * H), Image.Resampling.BICUBIC).save(big_path)
    got = []
    for path, bbox in ((dev.image_paths[q.image], box), (big_path, tuple(3 * v for v in box))):
        maps, hw, bb = client.submit(query_maps, str(path), bbox, ModelChoice(), MAX_SIZE, pure=False).result()
        got.append(query_vectors(maps, db.whitenings, DEFAULT_L, hw, bb))
    small, big = got
    assert float(small.mac @ big.mac) >= 0.99
    assert float(small.rmac @ big.rmac) >= 0.99
    assert float(small.macw @ big.macw) >= 0.99
    # filtering: the same top 10 in the same order, as the issue asks
    a, b = (answer(db, client, qv, SearchParams(filter="rmac", rerank=False, qe=0)) for qv in got)
    assert a.rows[:10].tolist() == b.rows[:10].tolist(), (name, a.scores[:10], b.scores[:10])
    # re-ranked + QE: the same top 10 except between near-tied distractors at the bottom (measured:
    # christ_1's rank 10 swaps two distractors 0.011 apart once the localised vectors are averaged by QE)
    a, b = (answer(db, client, qv, SearchParams(top_n=TOP_N, qe=QE)) for qv in got)
    assert a.rows[:5].tolist() == b.rows[:5].tolist()
    for i in np.flatnonzero(a.rows[:10] != b.rows[:10]):
        assert abs(float(a.scores[i]) - float(b.scores[i])) < 0.02, (name, i, a.scores[:10], b.scores[:10])
    assert len(set(a.rows[:10].tolist()) ^ set(b.rows[:10].tolist())) <= 2


def test_evaluate_reports_self_paste_localisation_apart(client, tmp_path):
    """On views with self-pastes, `rmac evaluate` reports the IoU of AML and of the exhaustive optimum
    separately for self-pastes (exact boxes of the query's own content) and for other positives, plus
    the share of self-pastes localised at IoU >= 0.5."""
    import shutil

    from rmac.data import LANDMARKS_DEV
    from rmac.workflows.evaluate import evaluate
    from rmac.workflows.views import make_views, self_paste_source

    src = tmp_path / "src"
    (src / "jpg").mkdir(parents=True)
    (src / "gt").mkdir()
    for q in ("christ_1", "eiffel_2"):
        for kind in ("query", "good", "ok", "junk"):
            shutil.copyfile(LANDMARKS_DEV / "gt" / f"{q}_{kind}.txt", src / "gt" / f"{q}_{kind}.txt")
    for i in ["christ_1", "christ_2", "eiffel_1", "eiffel_2", "eiffel_3"] + [f"distractor_{k:03d}" for k in range(1, 9)]:
        shutil.copyfile(LANDMARKS_DEV / "jpg" / f"{i}.jpg", src / "jpg" / f"{i}.jpg")
    make_views(src, tmp_path / "views", seed=3, self_pastes=2)
    ev = evaluate(str(tmp_path / "views"), client, ModelChoice(), MAX_SIZE, store=str(tmp_path / "store"),
                  top_n=40, progress=False)
    loc = ev.result["localisation"]
    n_self = sum(self_paste_source(i) == q.image.removesuffix("__query")
                 for q in ev.dataset.queries for i in q.boxes)
    assert n_self == 4 and loc["self"]["pairs"] == 4
    assert loc["other"]["pairs"] == loc["pairs"] - 4 > 0
    for g in ("self", "other"):
        assert loc[g]["aml_pairs"] == loc[g]["pairs"]  # every positive was re-ranked (top 40 of the db)
        assert 0 <= loc[g]["iou_aml"] <= 100 and 0 <= loc[g]["iou_exhaustive"] <= 100
    overall = (loc["self"]["iou_aml"] * 4 + loc["other"]["iou_aml"] * loc["other"]["pairs"]) / loc["pairs"]
    assert loc["iou_aml"] == pytest.approx(overall, abs=0.02)
    assert loc["self"]["iou50_aml"] in (0.0, 25.0, 50.0, 75.0, 100.0)
    assert loc["self"]["iou50_exhaustive"] in (0.0, 25.0, 50.0, 75.0, 100.0)
    # `rmac bench localisation` on the same views and store: its scale-1 rule is the evaluation's AML and
    # exhaustive IoU, and with the query scales its "best re-ranking score" rule is `--query-scales`' figure
    from rmac.workflows.bench.localisation import measure

    bench = measure(str(tmp_path / "views"), str(tmp_path / "store"), (1.0, 0.5), which="self")
    s1 = bench["summary"]["self"]["rules"]["scale 1"]
    assert bench["summary"]["self"]["pairs"] == 4 and "other" not in bench["summary"]
    assert s1["iou_aml"] == pytest.approx(loc["self"]["iou_aml"], abs=0.01)
    assert s1["iou_exhaustive"] == pytest.approx(loc["self"]["iou_exhaustive"], abs=0.01)
    ms = evaluate(str(tmp_path / "views"), client, ModelChoice(), MAX_SIZE, store=str(tmp_path / "store"),
                  top_n=40, progress=False, query_scales=(1.0, 0.5))
    assert ms.result["query_scales"] == [1.0, 0.5]
    for m in ("mac", "rmac"):  # filtering does not change
        assert ms.result["methods"][m] == ev.result["methods"][m]
    picked = bench["summary"]["self"]["rules"]["best re-ranking score"]
    assert ms.result["localisation"]["self"]["iou_aml"] == pytest.approx(picked["iou_aml"], abs=0.01)
    assert ms.result["localisation"]["self"]["iou_exhaustive"] == pytest.approx(picked["iou_exhaustive"], abs=0.01)
    assert bench["summary"]["self"]["product_path"]["score"] == pytest.approx(picked["iou_aml"], abs=0.01)


def test_query_scales_on_the_cluster_equal_single_process(client, dev, dev_store, db, queries):
    """`--query-scales`: the workers describe the query at each scale (the photo resized before the box
    is cut) and the scattered re-ranking keeps each image's best-scale window, as `rerank_scales` and
    the single-scale kernel run here per scale on the stored maps; with scales (1,) nothing changes."""
    from rmac.ops.backbones import crop_query, activations
    from rmac.ops.integral import sparse_maps
    from rmac.ops.pooling import mac
    from rmac.storage.images import load_image
    from rmac.workflows.extract import worker_model
    from rmac.workflows.search import describe_at_scales, rerank_many, rerank_scales

    store = dev_store.store
    scales = (1.0, 0.6)
    qs = list(zip(dev_store.queries, queries))[:3]
    paths = [str(dev.image_paths[q.image]) for q, _ in qs]
    same = describe_at_scales(client, [qv for _, qv in qs], paths, ModelChoice(), MAX_SIZE, (1.0,), db.whitenings,
                              DEFAULT_L)
    assert all(a is qv for a, (_, qv) in zip(same, qs))
    qvs = describe_at_scales(client, [qv for _, qv in qs], paths, ModelChoice(), MAX_SIZE, scales, db.whitenings,
                             DEFAULT_L)
    model, spec = worker_model(ModelChoice())
    rows = np.arange(min(TOP_N, store.n_images))
    params = SearchParams(top_n=len(rows), query_scales=scales)
    got = rerank_many(db, client, qvs, [rows] * len(qvs), params)
    maps = [q for q, _ in store.read_maps(rows.tolist())]
    image_hw = store.arrays["image_hw"][:][rows]
    for (q, qv0), qv, path, g in zip(qs, qvs, paths, got):
        assert qv.scales == scales and np.array_equal(qv.scale_macs[0], qv0.mac)
        crop = crop_query(load_image(path), qv0.bbox, MAX_SIZE, 0.6)
        np.testing.assert_allclose(qv.scale_macs[1], l2n(mac(activations(model, spec, crop, MAX_SIZE))), atol=1e-5)
        ref = rerank_scales(sparse_maps(maps), qv, db.whitenings, params, store.config.levels)
        assert 0 < (ref.scale == 1).sum() < len(rows)  # both scales win on some image
        for i, r in enumerate(rows.tolist()):
            score, box, vec = g[r]
            assert score == pytest.approx(ref.scores[i], abs=1e-5)
            np.testing.assert_allclose(box, box_to_pixels(ref.boxes[i], maps[i].shape[1:], image_hw[i],
                                                          cell_geometry(store, image_hw[i])), atol=1e-9)
            np.testing.assert_allclose(vec, ref.vectors[i], atol=1e-5)


def test_a_shard_file_built_in_chunks_of_the_store_is_the_same_shard(dev_store, monkeypatch):
    """`build_shard_file` reads and adds ``ADD_ROWS`` rows at a time (bounded memory at 1M); chunks that
    split partitions give the shard built at once."""
    import rmac.workflows.index as wi
    from rmac.storage.index import load_shard

    store, n = dev_store.store, dev_store.store.n_images
    whole = wi.build_shard_file(store, "rmac", 0, 0, n, "flat", index_dir="index-whole")
    monkeypatch.setattr(wi, "ADD_ROWS", 7)
    chunked = wi.build_shard_file(store, "rmac", 0, 0, n, "flat", index_dir="index-chunked")
    assert chunked["ntotal"] == whole["ntotal"] == int(store.valid_rows().sum())
    a, b = (load_shard(store.path / d / "rmac" / e["file"]) for d, e in
            (("index-whole", whole), ("index-chunked", chunked)))
    q = np.ascontiguousarray(store.arrays["rmac"][:5], dtype=np.float32)
    (s1, i1), (s2, i2) = a.search(q, n), b.search(q, n)
    for d in ("index-whole", "index-chunked"):  # the store is shared by the session's tests
        shutil.rmtree(store.path / d)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
