"""Retrieval evaluation against hand-computed values and a slow list-based implementation."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmac.ops.evaluate import average_precision, compute_map, compute_map_revisited, iou, iou_cells


def slow_query(ranking, ok, junk, kappas):
    """AP and precisions of one query by walking the junk-free ranked list."""
    clean = [i for i in ranking if i not in set(junk)]
    ap, found, last = 0.0, 0, None
    for r, i in enumerate(clean):
        if i in set(ok):
            p0 = 1.0 if r == 0 else found / r
            found += 1
            ap += (p0 + found / (r + 1)) / 2 / len(ok)
            last = r + 1
    precisions = []
    for k in kappas:
        if last is None:
            precisions.append(0.0)
        else:
            kk = min(k, last)
            precisions.append(sum(1 for i in clean[:kk] if i in set(ok)) / kk)
    return ap, precisions


def slow_map(ranks, gnd, kappas):
    aps, prs = [], []
    for q, g in enumerate(gnd):
        if len(g["ok"]) == 0:
            aps.append(math.nan)
            prs.append([math.nan] * len(kappas))
            continue
        ap, p = slow_query(list(ranks[:, q]), list(g["ok"]), list(g.get("junk", [])), kappas)
        aps.append(ap)
        prs.append(p)
    kept = [i for i, a in enumerate(aps) if not math.isnan(a)]
    m = sum(aps[i] for i in kept) / len(kept)
    pr = [sum(prs[i][j] for i in kept) / len(kept) for j in range(len(kappas))]
    return m, np.array(aps), np.array(pr), np.array(prs).reshape(len(gnd), len(kappas))


def _col(*ids):
    return np.array(ids).reshape(-1, 1)


def test_hand_computed_ap():
    # Positives at ranks 0 and 2 of 2: (1+1)/2/2 + (1/2 + 2/3)/2/2 = 1/2 + 7/24 = 19/24.
    m, aps, _, _ = compute_map(_col(10, 11, 12, 13), [{"ok": [10, 12], "junk": []}])
    assert m == pytest.approx(19 / 24) and aps[0] == pytest.approx(19 / 24)
    assert average_precision(np.array([0, 2]), 2) == pytest.approx(19 / 24)
    # A single positive at rank 2: p0 = 0/2, p1 = 1/3 -> 1/6.
    assert compute_map(_col(5, 9, 3, 7), [{"ok": [3]}])[0] == pytest.approx(1 / 6)
    # Two positives, only one ranked (truncated list): the other counts as a miss.
    assert compute_map(_col(3, 5), [{"ok": [3, 8]}])[0] == pytest.approx(0.5)


def test_junk_is_removed_before_ap():
    # Junk 9 before positive 3: rank 2 -> 1, AP = (0/1 + 1/2)/2 = 1/4 instead of 1/6.
    assert compute_map(_col(5, 9, 3, 7), [{"ok": [3], "junk": [9]}])[0] == pytest.approx(0.25)
    # Junk after the positive changes nothing; junk at the top gives a perfect AP.
    assert compute_map(_col(5, 3, 9, 7), [{"ok": [3], "junk": [9]}])[0] == pytest.approx(0.25)
    assert compute_map(_col(9, 3, 5), [{"ok": [3], "junk": [9]}])[0] == pytest.approx(1.0)


def test_empty_query_is_excluded():
    ranks = np.array([[1, 1, 2], [2, 2, 1]])
    gnd = [{"ok": [1], "junk": []}, {"ok": [], "junk": [1]}, {"ok": [1], "junk": []}]
    m, aps, pr, prs = compute_map(ranks, gnd, kappas=(1, 2))
    assert m == pytest.approx((1.0 + 1 / 4) / 2)
    assert math.isnan(aps[1]) and np.isnan(prs[1]).all()
    np.testing.assert_allclose(prs[[0, 2]], [[1.0, 1.0], [0.0, 0.5]])
    np.testing.assert_allclose(pr, [0.5, 0.75])
    all_empty = compute_map(ranks[:, :1], [{"ok": []}], kappas=(1,))
    assert math.isnan(all_empty[0]) and np.isnan(all_empty[2]).all()


def test_precision_at_k_caps_k_at_last_positive():
    # One positive at the top: the revisited code's precision@5 is 1, not 1/5.
    _, _, pr, _ = compute_map(_col(4, 0, 1, 2, 3, 5), [{"ok": [4]}], kappas=(1, 5))
    np.testing.assert_allclose(pr, [1.0, 1.0])
    # Positives at 1-based ranks 2 and 6: p@1 = 0, p@5 = 1/5, p@10 = 2/6.
    _, _, pr, _ = compute_map(_col(0, 4, 1, 2, 3, 5, 6), [{"ok": [4, 5]}], kappas=(1, 5, 10))
    np.testing.assert_allclose(pr, [0.0, 0.2, 2 / 6])


def test_perfect_ranking_is_one():
    rng = np.random.default_rng(0)
    n, nq = 50, 6
    gnd, cols = [], []
    for _ in range(nq):
        perm = rng.permutation(n)
        ok, junk = perm[:5], perm[5:8]
        gnd.append({"ok": ok.tolist(), "junk": junk.tolist()})
        cols.append(np.concatenate([rng.permutation(perm[:8]), perm[8:]]))  # junk mixed in at the top
    m, aps, pr, _ = compute_map(np.stack(cols, axis=1), gnd, kappas=(1, 5))
    assert m == pytest.approx(1.0) and np.allclose(aps, 1.0) and np.allclose(pr, 1.0)


@st.composite
def ranking_problems(draw):
    n = draw(st.integers(1, 30))
    nq = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n_ranked = draw(st.integers(1, n))  # possibly truncated rankings
    ranks = np.stack([rng.permutation(n)[:n_ranked] for _ in range(nq)], axis=1)
    gnd = []
    for _ in range(nq):
        perm = rng.permutation(n)
        a = draw(st.integers(0, n))
        b = draw(st.integers(a, n))
        gnd.append({"ok": perm[:a].tolist(), "junk": perm[a:b].tolist()})
    if all(len(g["ok"]) == 0 for g in gnd):
        gnd[0]["ok"] = [int(rng.integers(n))]
        gnd[0]["junk"] = [j for j in gnd[0]["junk"] if j not in gnd[0]["ok"]]
    kappas = draw(st.lists(st.integers(1, 12), max_size=3))
    return ranks, gnd, kappas


@settings(max_examples=200, deadline=None)
@given(ranking_problems())
def test_matches_slow_implementation(problem):
    ranks, gnd, kappas = problem
    m, aps, pr, prs = compute_map(ranks, gnd, kappas)
    sm, saps, spr, sprs = slow_map(ranks, gnd, kappas)
    assert m == pytest.approx(sm, abs=1e-12)
    np.testing.assert_allclose(aps, saps, atol=1e-12)
    np.testing.assert_allclose(pr, spr, atol=1e-12)
    np.testing.assert_allclose(prs, sprs, atol=1e-12)
    assert 0.0 <= m <= 1.0


def test_revisited_protocols():
    # Database 0..7; ranking 0,1,...,7. easy = {1}, hard = {3}, junk = {0}.
    ranks = _col(*range(8))
    gnd = [{"easy": [1], "hard": [3], "junk": [0]}]
    res = compute_map_revisited(ranks, gnd, kappas=(1, 5))
    # Easy: junk {0, 3}; easy 1 moves to rank 0 -> AP 1.
    assert res["easy"]["map"] == pytest.approx(1.0)
    # Medium: junk {0}; positives at ranks 0 and 2 -> 19/24; p@1 = 1, p@5 -> k'=3: 2/3.
    assert res["medium"]["map"] == pytest.approx(19 / 24)
    assert res["medium"]["mp@1"] == pytest.approx(1.0) and res["medium"]["mp@5"] == pytest.approx(2 / 3)
    # Hard: junk {0, 1}; hard 3 at rank 1 -> (0 + 1/2)/2 = 1/4.
    assert res["hard"]["map"] == pytest.approx(0.25)
    assert res["hard"]["mp@1"] == pytest.approx(0.0)
    assert set(res) == {"easy", "medium", "hard"}
    assert set(res["easy"]) == {"map", "aps", "prs", "mp@1", "mp@5"}


@settings(max_examples=50, deadline=None)
@given(ranking_problems())
def test_revisited_equals_compute_map_on_rewritten_gnd(problem):
    ranks, gnd, kappas = problem
    rng = np.random.default_rng(len(gnd))
    rgnd = []
    for g in gnd:  # split the positives into easy / hard
        ok = list(g["ok"])
        cut = int(rng.integers(0, len(ok) + 1))
        rgnd.append({"easy": ok[:cut], "hard": ok[cut:], "junk": g["junk"]})
    res = compute_map_revisited(ranks, rgnd, kappas)
    for name, make in {
        "easy": lambda g: {"ok": g["easy"], "junk": g["junk"] + g["hard"]},
        "medium": lambda g: {"ok": g["easy"] + g["hard"], "junk": g["junk"]},
        "hard": lambda g: {"ok": g["hard"], "junk": g["junk"] + g["easy"]},
    }.items():
        gt = [make(g) for g in rgnd]
        if all(len(g["ok"]) == 0 for g in gt):
            assert math.isnan(res[name]["map"])
            continue
        sm, saps, spr, _ = slow_map(ranks, gt, kappas)
        assert res[name]["map"] == pytest.approx(sm, abs=1e-12)
        np.testing.assert_allclose(res[name]["aps"], saps, atol=1e-12)
        for k, p in zip(kappas, spr):
            assert res[name][f"mp@{k}"] == pytest.approx(p, abs=1e-12)


def test_iou():
    assert iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert iou((0, 0, 2, 2), (0, 0, 2, 2)) == pytest.approx(1.0)
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    assert iou((0.5, 0.0, 1.5, 2.0), (0.0, 0.0, 1.0, 1.0)) == pytest.approx(0.5 / 2.5)
    # Broadcasting over many boxes.
    got = iou(np.array([[0, 0, 2, 2], [1, 1, 3, 3]]), np.array([0, 0, 2, 2]))
    np.testing.assert_allclose(got, [1.0, 1 / 7])
    # Cells: (x, y, w, h) half-open; [0,2)x[0,2) vs [1,3)x[1,3) -> 1 / 7.
    assert iou_cells((0, 0, 2, 2), (1, 1, 2, 2)) == pytest.approx(1 / 7)
    assert iou_cells((0, 0, 1, 1), (1, 0, 1, 1)) == 0.0  # adjacent cells do not overlap


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 8), min_size=8, max_size=8))
def test_iou_cells_counts_cells(v):
    a = (v[0], v[1], v[2] + 1, v[3] + 1)
    b = (v[4], v[5], v[6] + 1, v[7] + 1)
    cells = lambda r: {(x, y) for x in range(r[0], r[0] + r[2]) for y in range(r[1], r[1] + r[3])}  # noqa: E731
    ca, cb = cells(a), cells(b)
    assert iou_cells(a, b) == pytest.approx(len(ca & cb) / len(ca | cb))
    assert iou_cells(a, b) == pytest.approx(iou_cells(b, a))
