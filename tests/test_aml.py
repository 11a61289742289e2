"""AML window search against a plain-numpy exhaustive search, and its properties."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmac.ops import aml as A
from rmac.ops import integral as I
from rmac.ops.evaluate import iou_cells


def _q_maps(rng, K, H, W, zeros=0.6):
    q = rng.integers(0, 32, (K, H, W))
    q[rng.random((K, H, W)) < zeros] = 0
    return q.astype(np.uint8)


def _all_boxes(H, W):
    return [(x, y, w, h) for y in range(H) for h in range(1, H - y + 1)
            for x in range(W) for w in range(1, W - x + 1)]


def _brute_vectors_lut(q, boxes):
    """f~ of every box by plain numpy: int64 sums of q^10 over the box, then the root table."""
    p = q.astype(np.int64) ** 10
    sums = np.array([p[:, y:y + h, x:x + w].sum(axis=(1, 2)) for x, y, w, h in boxes])
    return I.table_root(sums)


def _brute_vectors_float(x, boxes):
    out = []
    for bx, by, bw, bh in boxes:
        r = x[:, by:by + bh, bx:bx + bw].astype(np.float64).reshape(x.shape[0], -1)
        m = r.max(axis=1)
        safe = np.where(m > 0, m, 1.0)
        out.append(np.where(m > 0, m * ((r / safe[:, None]) ** 10).sum(axis=1) ** 0.1, 0.0))
    return np.array(out)


def _cos(V, q):
    n = np.linalg.norm(V, axis=1)
    return np.where(n > 0, V @ q / np.where(n > 0, n, 1) / np.linalg.norm(q), 0.0)


def _brute_scores(maps, q, boxes):
    V = _brute_vectors_lut(maps, boxes) if maps.dtype == np.uint8 else _brute_vectors_float(maps, boxes)
    return _cos(V, q.astype(np.float64))


def _integral(maps):
    return I.integral_lut(maps) if maps.dtype == np.uint8 else I.integral_float(maps)


def _random_case(seed, K, H, W, kind):
    rng = np.random.default_rng(seed)
    q = _q_maps(rng, K, H, W)
    maps = q if kind == "lut" else (q * rng.uniform(0.5, 1.5, q.shape)).astype(np.float32)
    query = rng.gamma(1.0, 1.0, K) * (rng.random(K) > 0.3) + 1e-3
    return maps, query


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), K=st.integers(1, 6), H=st.integers(1, 6), W=st.integers(1, 6),
       kind=st.sampled_from(["lut", "float"]))
def test_exhaustive_equals_brute_force(seed, K, H, W, kind):
    maps, query = _random_case(seed, K, H, W, kind)
    boxes = _all_boxes(H, W)
    scores = _brute_scores(maps, query, boxes)
    res = A.exhaustive_search(_integral(maps), query)
    assert res.n_scored == res.n_total == len(boxes) == A.n_windows(H, W)
    assert res.score == pytest.approx(scores.max(), abs=1e-12)
    assert scores[boxes.index(res.box)] == pytest.approx(scores.max(), abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), H=st.integers(1, 9), W=st.integers(1, 9), t=st.integers(1, 4),
       s=st.sampled_from([1.1, 1.5, 2.0, math.inf]), aspect=st.floats(0.2, 5.0), passes=st.integers(0, 5))
def test_aml_never_beats_exhaustive_and_refinement_never_hurts(seed, H, W, t, s, aspect, passes):
    maps, query = _random_case(seed, 4, H, W, "lut")
    ii = I.integral_lut(maps)
    best = A.exhaustive_search(ii, query).score
    res = A.aml_search(ii, query, aspect, t=t, s=s, passes=passes)
    coarse = A.aml_search(ii, query, aspect, t=t, s=s, passes=0)
    assert res.score <= best + 1e-12
    assert res.score >= coarse.score
    assert res.n_scored >= coarse.n_scored
    # the reported score is the box's score
    assert res.score == pytest.approx(_brute_scores(maps, query, [res.box])[0], abs=1e-12)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), H=st.integers(1, 8), W=st.integers(1, 8), kind=st.sampled_from(["lut", "float"]))
def test_step_one_without_aspect_filter_is_exhaustive(seed, H, W, kind):
    maps, query = _random_case(seed, 5, H, W, kind)
    ii = _integral(maps)
    ex = A.exhaustive_search(ii, query)
    res = A.aml_search(ii, query, 1.0, t=1, s=math.inf, passes=5)
    assert res.score == ex.score and res.box == ex.box


def _grid_windows(H, W, t, aspect, s):
    out = []
    for y1 in range(0, H, t):
        for y2 in range(H, y1, -t):
            for x1 in range(0, W, t):
                for x2 in range(W, x1, -t):
                    if aspect / s <= (x2 - x1) / (y2 - y1) <= aspect * s:  # |log(aspect / (w/h))| <= log(s)
                        out.append((x1, y1, x2 - x1, y2 - y1))
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), H=st.integers(1, 12), W=st.integers(1, 12), t=st.integers(1, 5),
       s=st.sampled_from([1.1, 1.5, 2.0]), aspect=st.floats(0.2, 5.0))
def test_grid_and_aspect_filter(seed, H, W, t, s, aspect):
    """Without refinement AML returns the best of exactly the grid windows that pass the aspect filter."""
    maps, query = _random_case(seed, 3, H, W, "lut")
    windows = _grid_windows(H, W, t, aspect, s)
    res = A.aml_search(I.integral_lut(maps), query, aspect, t=t, s=s, passes=0)
    assert res.n_scored == max(len(windows), 1)
    if not windows:  # nothing has the query's aspect: the whole map is scored instead
        assert res.box == (0, 0, W, H)
        assert res.score == pytest.approx(_brute_scores(maps, query, [res.box])[0], abs=1e-12)
    else:
        scores = _brute_scores(maps, query, windows)
        assert res.box in windows
        assert res.score == pytest.approx(scores.max(), abs=1e-12)
        x, y, w, h = res.box
        assert abs(math.log(aspect / (w / h))) <= math.log(s) + 1e-12


def test_grid_always_holds_the_whole_map():
    maps, query = _random_case(0, 3, 10, 7, "lut")
    assert (0, 0, 7, 10) in _grid_windows(10, 7, 4, 0.7, math.inf)
    res = A.aml_search(I.integral_lut(maps), query, 7 / 10, t=50, s=1.01, passes=0)
    assert res.box == (0, 0, 7, 10) and res.n_scored == 1


def test_refinement_reaches_a_local_optimum():
    """After refinement no single edge move of 1 cell improves the score."""
    rng = np.random.default_rng(3)
    for _ in range(5):
        maps, query = _random_case(int(rng.integers(1 << 30)), 6, 14, 11, "lut")
        res = A.aml_search(I.integral_lut(maps), query, 1.0, t=4, s=1.5, passes=50)
        x, y, w, h = res.box
        neighbours = []
        for dx1, dy1, dx2, dy2 in [(-1, 0, 0, 0), (1, 0, 0, 0), (0, -1, 0, 0), (0, 1, 0, 0),
                                   (0, 0, -1, 0), (0, 0, 1, 0), (0, 0, 0, -1), (0, 0, 0, 1)]:
            x1, y1, x2, y2 = x + dx1, y + dy1, x + w + dx2, y + h + dy2
            if 0 <= x1 < x2 <= 11 and 0 <= y1 < y2 <= 14:
                neighbours.append((x1, y1, x2 - x1, y2 - y1))
        assert _brute_scores(maps, query, neighbours).max() <= res.score + 1e-12


def _planted_scene(rng, K=64, H=24, W=32, box=(17, 9, 9, 6)):
    """Clutter plus an object whose 16 channels each fire at their own spot spread over the object
    (with the corners taken), so that only the whole object holds all of the query's maxima."""
    x = rng.gamma(1.0, 3.0, (K, H, W)) * (rng.random((K, H, W)) > 0.85)
    bx, by, bw, bh = box
    channels = rng.choice(K, 16, replace=False)
    spots = [(0, 0), (bh - 1, 0), (0, bw - 1), (bh - 1, bw - 1)]
    spots += [(int(rng.integers(bh)), int(rng.integers(bw))) for _ in range(12)]
    obj = np.zeros((K, bh, bw))
    for c, (r, col) in zip(channels, spots):
        obj[c, r, col] = rng.uniform(20, 30)
    x[:, by:by + bh, bx:bx + bw] = np.maximum(x[:, by:by + bh, bx:bx + bw], obj)
    return x.astype(np.float32), obj.max(axis=(1, 2))


def test_planted_object_is_localised():
    """A query pattern planted in a cluttered map is found with IoU > 0.5 (exhaustive and AML)."""
    from rmac.ops.quantise import quantise

    rng = np.random.default_rng(7)
    truth = (17, 9, 9, 6)
    for _ in range(3):
        x, query = _planted_scene(rng, box=truth)
        for ii in (I.integral_lut(quantise(x)[0]), I.integral_float(x)):
            ex = A.exhaustive_search(ii, query)
            res = A.aml_search(ii, query, 9 / 6)
            assert iou_cells(ex.box, truth) > 0.5
            assert iou_cells(res.box, truth) > 0.5
            assert res.n_scored < 0.02 * res.n_total


def test_valid_part_of_padded_maps():
    """`map_hw` restricts the search to the valid top-left part: padding never shows up."""
    rng = np.random.default_rng(11)
    maps, query = _random_case(5, 4, 6, 5, "lut")
    padded = np.zeros((4, 9, 8), dtype=np.uint8)
    padded[:, :6, :5] = maps
    padded[:, 6:, :] = 31  # loud padding that would attract the search
    padded[:, :, 5:] = 31
    a = A.exhaustive_search(I.integral_lut(maps), query)
    b = A.exhaustive_search(I.integral_lut(padded), query, map_hw=(6, 5))
    assert a.box == b.box and a.score == b.score and a.n_total == b.n_total
    c = A.aml_search(I.integral_lut(padded), query, 1.2, map_hw=(6, 5))
    d = A.aml_search(I.integral_lut(maps), query, 1.2)
    assert c == d
    with pytest.raises(ValueError):
        A.exhaustive_search(I.integral_lut(maps), query, map_hw=(7, 5))
    del rng


def test_bad_arguments():
    maps, query = _random_case(0, 3, 4, 4, "lut")
    ii = I.integral_lut(maps)
    with pytest.raises(ValueError):
        A.exhaustive_search(ii, np.zeros(3))
    with pytest.raises(ValueError):
        A.exhaustive_search(ii, np.ones(4))
    for kw in [dict(t=0), dict(s=0.9), dict(passes=-1)]:
        with pytest.raises(ValueError):
            A.aml_search(ii, query, 1.0, **kw)
    with pytest.raises(ValueError):
        A.aml_search(ii, query, 0.0)


@settings(max_examples=50, deadline=None)
@given(H=st.integers(1, 40), W=st.integers(1, 40), ih=st.integers(1, 2000), iw=st.integers(1, 2000),
       data=st.data())
def test_box_pixel_round_trip(H, W, ih, iw, data):
    x = data.draw(st.integers(0, W - 1))
    y = data.draw(st.integers(0, H - 1))
    w = data.draw(st.integers(1, W - x))
    h = data.draw(st.integers(1, H - y))
    px = A.box_to_pixels((x, y, w, h), (H, W), (ih, iw))
    assert px == pytest.approx((x * iw / W, y * ih / H, (x + w) * iw / W, (y + h) * ih / H))
    assert A.pixels_to_cells(px, (H, W), (ih, iw)) == (x, y, w, h)
    # any pixel box maps to cells that cover it
    x1, x2 = sorted(data.draw(st.floats(0, iw)) for _ in range(2))
    y1, y2 = sorted(data.draw(st.floats(0, ih)) for _ in range(2))
    cx, cy, cw, ch = A.pixels_to_cells((x1, y1, x2, y2), (H, W), (ih, iw))
    assert 0 <= cx and 0 <= cy and cw >= 1 and ch >= 1 and cx + cw <= W and cy + ch <= H
    bx1, by1, bx2, by2 = A.box_to_pixels((cx, cy, cw, ch), (H, W), (ih, iw))
    tol = 1e-6 * max(iw, ih)
    assert bx1 <= x1 + tol and by1 <= y1 + tol
    assert bx2 >= min(x2, bx1 + iw / W) - tol and by2 >= min(y2, by1 + ih / H) - tol


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(sorted(__import__("rmac.ops.backbones", fromlist=["BACKBONES"]).BACKBONES)),
       ih=st.integers(64, 3000), iw=st.integers(64, 3000), max_size=st.sampled_from([512, 800, 1024]),
       data=st.data())
def test_box_pixel_round_trip_with_backbone_geometry(name, ih, iw, max_size, data):
    """With a backbone's stride and offset: cell boxes -> pixels -> the same cells; a cell's pixel box is
    centred on its receptive-field centre (unless clipped by the image); any pixel box is covered."""
    from rmac.ops import backbones as B

    spec = B.get_spec(name)
    H, W = B.map_shape(spec, (ih, iw), max_size)
    if min(H, W) < 1:
        return
    geo = B.cell_centres(spec, (ih, iw), max_size)
    sy, sx, oy, ox = geo
    x = data.draw(st.integers(0, W - 1))
    y = data.draw(st.integers(0, H - 1))
    w = data.draw(st.integers(1, W - x))
    h = data.draw(st.integers(1, H - y))
    px = A.box_to_pixels((x, y, w, h), (H, W), (ih, iw), geo)
    assert 0 <= px[0] < px[2] <= iw and 0 <= px[1] < px[3] <= ih
    assert A.pixels_to_cells(px, (H, W), (ih, iw), geo) == (x, y, w, h)
    cx1, _, cx2, _ = A.box_to_pixels((x, y, 1, 1), (H, W), (ih, iw), geo)
    if 0 < x < W - 1:
        assert (cx1 + cx2) / 2 == pytest.approx(ox + sx * x)
    assert A.box_to_pixels((0, 0, W, H), (H, W), (ih, iw), geo) == (0.0, 0.0, iw, ih)
    x1, x2 = sorted(data.draw(st.floats(0, iw)) for _ in range(2))
    y1, y2 = sorted(data.draw(st.floats(0, ih)) for _ in range(2))
    cx, cy, cw, ch = A.pixels_to_cells((x1, y1, x2, y2), (H, W), (ih, iw), geo)
    assert 0 <= cx and 0 <= cy and cw >= 1 and ch >= 1 and cx + cw <= W and cy + ch <= H
    bx1, by1, bx2, by2 = A.box_to_pixels((cx, cy, cw, ch), (H, W), (ih, iw), geo)
    tol = 1e-6 * max(iw, ih)
    assert bx1 <= x1 + tol and by1 <= y1 + tol and bx2 >= x2 - tol and by2 >= y2 - tol
