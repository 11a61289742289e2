"""`rmac bench quantisation` on a tiny subset of the embedded dev set (2 queries, 256 px)."""

import argparse

import numpy as np
import pytest

from rmac.ops.quantise import quantise
from rmac.workflows.bench import quality as B


def test_codec_bytes_grow_with_content():
    # all-zero inner chunks are not written at all (Zarr's default), as in the store
    rng = np.random.default_rng(0)
    zeros = [np.zeros((16, 5, 7), np.uint8) for _ in range(3)]
    dense = [quantise(rng.gamma(1.0, 1.0, (16, 5, 7)).astype(np.float32), 31)[0] for _ in range(3)]
    assert B._codec_bytes(zeros, side=8) == 0 < B._codec_bytes(dense, side=8)


@pytest.fixture(scope="module")
def tiny():
    try:
        from rmac.storage.weights import weights_path
        weights_path("efficientnet-lite0")
    except Exception as e:  # pragma: no cover - offline weights missing
        pytest.skip(f"no efficientnet-lite0 weights: {e}")
    return B.bench_quantisation(None, max_size=256, levels=(31, 63), n_queries=2, n_distractors=6,
                                byte_levels=(31,), redraws=1)


def test_structure_and_ranges(tiny):
    r = tiny
    assert r["n_queries"] == 2 and r["n_images"] >= 6 + 2
    by = {(x["maps"], x["path"]): x for x in r["rerank"]}
    # 63 levels only dequantised: the LUT path is not exact there
    assert set(by) == {("float32", "float"), ("q31", "lut"), ("q63", "float"), ("q31+r1", "lut")}
    for row in r["rerank"]:
        assert set(row["map"]) == set(B.METHODS)
        for v in row["map"].values():
            assert 0.0 <= v <= 100.0
    for m in B.METHODS:
        assert 0.0 <= by["q31", "lut"]["order_flips_pct"][m] <= 100.0
        assert by["q31", "lut"]["mean_abs_score_diff"][m] >= 0.0
        d = by["q31", "lut"]["delta_points"][m]
        assert d == pytest.approx(by["q31", "lut"]["map"][m] - by["float32", "float"]["map"][m], abs=0.02)
    # 63 levels: the LUT path's int64 sums are exact up to 9 cells only, so it is reported as skipped
    assert [s["levels"] for s in r["skipped"]] == [63]
    assert 0.0 <= r["filter_map"]["mac"] <= 100.0 and 0.0 <= r["filter_map"]["rmac"] <= 100.0
    (b31, f32) = r["bytes"]
    assert b31["levels"] == 31 and 0 < b31["bytes_per_image"] < f32["bytes_per_image"]
    assert r["bytes_256_channels"]["rows"][0]["bytes_per_image"] < b31["bytes_per_image"]


def test_rescaled_quantise():
    rng = np.random.default_rng(1)
    x = (rng.gamma(1.0, 1.0, (8, 6, 5)) * (rng.random((8, 6, 5)) > 0.5)).astype(np.float32)
    q0, s0 = quantise(x, 31)
    q, s = B.rescaled_quantise(x, 31, 1.0)
    assert s == pytest.approx(s0) and np.array_equal(q, q0)  # factor 1: the store's quantiser
    q, s = B.rescaled_quantise(x, 31, 1.04)
    assert s == pytest.approx(1.04 * s0) and q.max() <= 31 and not q[x == 0].any()
    inside = x < 30.5 * s  # below saturation: rounded to the nearest level of the scaled grid
    assert np.abs(q[inside] * s - x[inside]).max() <= 0.5 * s * (1 + 1e-5)
    assert not np.array_equal(q, q0)


def test_order_flips():
    shorts, gnd = [np.array([0, 1, 2, 3])], [{"ok": [0], "junk": [3]}]
    base = [np.array([0.9, 0.5, 0.4, 0.99])]
    assert B._order_flips(base, base, shorts, gnd) == 0.0
    # the positive falls between the two negatives: 1 of 2 pairs flips; the junk image does not count
    assert B._order_flips(base, [np.array([0.45, 0.5, 0.4, 0.0])], shorts, gnd) == 0.5
    assert B._order_flips(base, [np.array([0.5, 0.5, 0.4, 0.0])], shorts, gnd) == 0.25  # a tie: half


def test_print_and_arguments(tiny, capsys):
    B.print_tables(tiny)
    out = capsys.readouterr().out
    assert "q31" in out and "float32" in out and "skipped 63 levels" in out
    p = argparse.ArgumentParser()
    B.add_arguments(p)
    a = p.parse_args(["--levels", "31,15", "--queries", "3", "--redraws", "0"])
    assert a.dataset is None and a.levels == "31,15" and a.queries == 3 and a.redraws == 0
