"""Map-level synthetic distractors: kernels against slow references, and `rmac distractors` on a real
cluster: same layout as extraction, deterministic bytes, resumable, indexable and re-rankable."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rmac.ops.distractors import Piece, Recipe, draw_recipe, interp_matrix, render, resize_bilinear
from rmac.ops.pooling import mac
from rmac.ops.quantise import dequantise
from rmac.storage.store import Store, StoreError


def slow_bilinear(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """Bilinear at cell centres, one output cell at a time."""
    K, h, w = x.shape
    out = np.zeros((K, oh, ow), np.float64)
    for i in range(oh):
        py = min(max((i + 0.5) * h / oh - 0.5, 0.0), h - 1)
        y0 = int(np.floor(py)); y1 = min(y0 + 1, h - 1); fy = py - y0
        for j in range(ow):
            px = min(max((j + 0.5) * w / ow - 0.5, 0.0), w - 1)
            x0 = int(np.floor(px)); x1 = min(x0 + 1, w - 1); fx = px - x0
            out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                            + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
    return out


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), oh=st.integers(1, 12), ow=st.integers(1, 12),
       seed=st.integers(0, 2**31))
def test_resize_equals_slow_bilinear(h, w, oh, ow, seed):
    x = np.random.default_rng(seed).random((3, h, w)).astype(np.float32)
    got = resize_bilinear(x, oh, ow)
    assert got.shape == (3, oh, ow) and got.dtype == np.float32
    np.testing.assert_allclose(got, slow_bilinear(x, oh, ow), atol=1e-5)
    assert got.min() >= 0 and got.max() <= x.max() + 1e-6  # convex weights: nothing invented
    np.testing.assert_allclose(interp_matrix(h, oh).sum(1), 1.0, atol=1e-6)


def test_resize_same_size_is_identity():
    x = np.random.default_rng(1).random((4, 5, 7)).astype(np.float32)
    np.testing.assert_array_equal(resize_bilinear(x, 5, 7), x)


def test_render_crop_flip_and_collage_against_slicing():
    rng = np.random.default_rng(2)
    a, b = rng.random((6, 8, 10)).astype(np.float32), rng.random((6, 7, 9)).astype(np.float32)
    r = Recipe(Piece(0, (2, 1, 5, 6), True, (6, 5)), Piece(1, (0, 0, 3, 6), False, (6, 3)), axis=2)
    got = render(r, [a, b])
    ref = np.concatenate([a[:, 1:7, 2:7][:, :, ::-1], b[:, 0:6, 0:3]], axis=2)
    np.testing.assert_array_equal(got, ref)
    assert r.out_hw == got.shape[1:]
    np.testing.assert_array_equal(mac(got), np.maximum(mac(ref[:, :, :5]), mac(ref[:, :, 5:])))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 5), side=st.integers(4, 20))
def test_drawn_recipes_fit_and_render(seed, n, side):
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(1, side + 1)), int(rng.integers(1, side + 1))) for _ in range(n)]
    pool = [rng.random((2, *s)).astype(np.float32) for s in shapes]
    for _ in range(10):
        r = draw_recipe(rng, shapes, side)
        x = render(r, pool)
        assert x.shape[1:] == r.out_hw and 1 <= x.shape[1] <= side and 1 <= x.shape[2] <= side
        for p in (r.base, r.partner):
            if p is not None:
                cx, cy, cw, ch = p.crop
                h, w = shapes[p.index]
                assert 0 <= cx and 0 <= cy and cw >= 1 and ch >= 1 and cx + cw <= w and cy + ch <= h
        if r.partner is not None:
            assert r.partner.index != r.base.index


def test_draw_is_deterministic():
    shapes = [(10, 12), (9, 8), (12, 12)]
    one = [draw_recipe(np.random.default_rng([5, 1]), shapes, 16) for _ in range(3)]
    two = [draw_recipe(np.random.default_rng([5, 1]), shapes, 16) for _ in range(3)]
    assert one == two


# -- the workflow on the cluster ---------------------------------------------------------------------
COUNT = 120


@pytest.fixture(scope="module")
def distractors(client, dev_store, tmp_path_factory):
    from rmac.workflows.distractors import make_distractors

    tmp = tmp_path_factory.mktemp("distractors")
    summary = make_distractors(str(dev_store.path), str(tmp / "d1"), COUNT, client, seed=7,
                               pattern="distractor_*", partition_size=16, progress=False)
    return tmp, summary, Store(tmp / "d1")


VECTORS = ("mac", "scale", "map_hw", "image_hw", "ok")


def _arrays(store: Store) -> dict:
    """Every stored array, the maps as their valid (K, h, w) cells (whatever the map format)."""
    g = store.arrays
    out = {k: g[k][:] for k in VECTORS}
    for r, (q, _) in enumerate(store.read_maps(range(store.n_images))):
        out[f"map{r}"] = q
    return out


def test_same_layout_as_extraction(dev_store, distractors):
    _, summary, d = distractors
    src = dev_store.store
    assert summary["images"] == COUNT and d.n_images == COUNT and d.pending_partitions() == []
    gs, gd = src.arrays, d.arrays
    indexed = {"rmac", "macw"}
    assert sorted(set(gd.keys()) - indexed) == sorted(set(gs.keys()) - indexed)  # as extracted
    for k in VECTORS:
        assert gd[k].dtype == gs[k].dtype and gd[k].shape[1:] == gs[k].shape[1:], k
        assert gd[k].shape[0] == COUNT
    c, s = d.config, src.config
    assert (c.backbone, c.channels, c.max_size, c.map_side, c.levels, c.weights) == \
        (s.backbone, s.channels, s.max_size, s.map_side, s.levels, s.weights)
    recs = d.records()
    assert len(recs) == COUNT and all(r["status"] == "done" for r in recs)
    assert all(r["recipe"]["base"]["source"].startswith("distractor_") for r in recs)
    assert any("partner" in r["recipe"] for r in recs) and any("partner" not in r["recipe"] for r in recs)
    a = _arrays(d)
    assert a["ok"].all()
    for i in range(0, COUNT, 7):
        h, w = a["map_hw"][i]
        assert 1 <= h <= c.map_side and 1 <= w <= c.map_side
        q = a[f"map{i}"]
        assert q.dtype == np.uint8 and q.shape == (c.channels, h, w) and q.max() <= c.levels
        # stored MAC is the float map's; the quantised map's max is within half a step of it
        np.testing.assert_allclose(mac(dequantise(q, a["scale"][i])),
                                   np.minimum(a["mac"][i], c.levels * a["scale"][i]),
                                   atol=0.5 * a["scale"][i] + 1e-6)


def test_same_seed_same_bytes_other_seed_differs_and_resume(client, dev_store, distractors):
    from rmac.workflows.distractors import make_distractors

    tmp, _, d1 = distractors
    make_distractors(str(dev_store.path), str(tmp / "d2"), COUNT, client, seed=7, pattern="distractor_*",
                     partition_size=16, progress=False)
    d2 = Store(tmp / "d2")
    a1, a2 = _arrays(d1), _arrays(d2)
    for k in a1:
        np.testing.assert_array_equal(a1[k], a2[k], err_msg=k)
    assert d1.records() == d2.records()
    # an interrupted run: drop two partitions' rows and done markers, resume, same bytes again
    g = d2.arrays
    for p in (1, 4):
        rows = d2.partition_rows(p)
        g["mac"][rows.start:rows.stop] = 0
        g["scale"][rows.start:rows.stop] = 0
        (d2.path / "parts" / f"p{p:06d}.json").unlink()
    s = make_distractors(str(dev_store.path), str(tmp / "d2"), COUNT, client, seed=7, pattern="distractor_*",
                         partition_size=16, progress=False)
    assert s["partitions_run"] == 2
    a2 = _arrays(Store(tmp / "d2"))
    for k in a1:
        np.testing.assert_array_equal(a1[k], a2[k], err_msg=k)
    # another seed: other distractors; resuming with other parameters is refused
    make_distractors(str(dev_store.path), str(tmp / "d3"), COUNT, client, seed=8, pattern="distractor_*",
                     partition_size=16, progress=False)
    assert not np.array_equal(_arrays(Store(tmp / "d3"))["mac"], a1["mac"])
    with pytest.raises(StoreError, match="other distractors"):
        make_distractors(str(dev_store.path), str(tmp / "d2"), COUNT, client, seed=9,
                         pattern="distractor_*", partition_size=16, progress=False)


def test_bad_source_selection_is_one_clear_error(client, dev_store, tmp_path):
    from rmac.workflows.distractors import make_distractors

    with pytest.raises(StoreError, match="no extracted image matches") as e:
        make_distractors(str(dev_store.path), str(tmp_path / "x"), 10, client, pattern="nothing_*",
                         progress=False)
    assert "ids look like" in str(e.value)  # says what a pattern should match
    with pytest.raises(StoreError, match="--count"):
        make_distractors(str(dev_store.path), str(tmp_path / "y"), 0, client, progress=False)


def test_indexed_searched_and_reranked_like_extracted_images(client, dev, dev_store, distractors):
    """Index the distractors with the dataset's whitening; a search over dataset + distractors
    returns distractors among the top N, re-ranks them with boxes inside their images, and the
    dataset's positives still come first for a landmark query."""
    from rmac.workflows.extract import ModelChoice
    from rmac.workflows.index import build_index, load_whitenings
    from rmac.workflows.search import Database, SearchParams, answer, query_maps, query_vectors

    from conftest import MAX_SIZE

    _, _, d = distractors
    w = load_whitenings(dev_store.store)
    first = build_index(d, client, whitening=w, whiten_label="dev distractors", shard_rows=48, progress=False)
    assert not first["incremental"] and first["partitions_indexed"] == d.n_partitions
    # the same whitening again (a bench or an evaluation run twice): nothing to redo
    again = build_index(Store(d.path), client, whitening=load_whitenings(dev_store.store),
                        whiten_label="dev distractors", shard_rows=48, progress=False)
    assert again["incremental"] and again["partitions_indexed"] == 0 and again["shards_built"] == 0
    assert again["whitening_id"] == first["whitening_id"] and again["whitening"] == "dev distractors"
    db = Database([Store(dev_store.path), Store(d.path)])
    assert db.n_images == dev_store.store.n_images + COUNT
    q = dev_store.queries[0]
    maps, hw, bbox = client.submit(query_maps, str(dev.image_paths[q.image]), q.bbox, ModelChoice(), MAX_SIZE,
                                   pure=False).result()
    qv = query_vectors(maps, w, 3, hw, bbox)
    r = answer(db, client, qv, SearchParams(top_n=db.n_images, qe=0))
    n_dev = dev_store.store.n_images
    synthetic = [g for g in r.rows.tolist() if g >= n_dev]
    assert len(synthetic) == COUNT  # every distractor was filtered in and re-ranked
    for g in synthetic[:20]:
        store, row = db.locate(g)
        ih, iw = store.arrays["image_hw"][row]
        x1, y1, x2, y2 = r.boxes[g]
        assert 0 <= x1 < x2 <= iw + 1e-3 and 0 <= y1 < y2 <= ih + 1e-3
    positives = {dev_store.rows_of[i] for i in [*q.ok, q.image] if i in dev_store.rows_of}
    assert len(positives) >= 2 and int(r.rows[0]) in positives
    info = json.loads((d.path / "index" / "rmac" / "manifest.json").read_text())
    assert sum(s["ntotal"] for s in info["shards"]) == COUNT


def test_cli_bad_input_is_one_line(rmac_cli, dev_store, tmp_path):
    r = rmac_cli("distractors", "--count", "0", "--from", dev_store.path, "--out", tmp_path / "z")
    err = [l for l in r.stderr.splitlines() if not l.startswith("dask:")]
    assert r.returncode == 2 and len(err) == 1 and "--count" in err[0], r.stderr
    r = rmac_cli("distractors", "--count", "5", "--from", tmp_path / "nothing", "--out", tmp_path / "z")
    assert r.returncode == 2 and "--from" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = rmac_cli("distractors", "--count", "5", "--from", tmp_path / "empty", "--out", tmp_path / "z")
    assert r.returncode == 2 and "not an rmac store" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "z").exists()
