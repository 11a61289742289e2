"""`rmac bench quantisation` on a tiny subset of the embedded dev set (2 queries, 256 px)."""

import argparse

import numpy as np
import pytest

from rmac.ops.quantise import quantise
from rmac.workflows import bench_quality as B


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
                                byte_levels=(31,))


def test_structure_and_ranges(tiny):
    r = tiny
    assert r["n_queries"] == 2 and r["n_images"] >= 6 + 2
    by = {(x["maps"], x["path"]): x for x in r["rerank"]}
    # 63 levels only dequantised: the LUT path is not exact there
    assert set(by) == {("float32", "float"), ("q31", "lut"), ("q63", "float")}
    for row in r["rerank"]:
        assert set(row["map"]) == set(B.METHODS)
        for v in row["map"].values():
            assert 0.0 <= v <= 100.0
    for m in B.METHODS:
        d = by["q31", "lut"]["delta_points"][m]
        assert d == pytest.approx(by["q31", "lut"]["map"][m] - by["float32", "float"]["map"][m], abs=0.02)
    # 63 levels: the LUT path's int64 sums are exact up to 9 cells only, so it is reported as skipped
    assert [s["levels"] for s in r["skipped"]] == [63]
    assert 0.0 <= r["filter_map"]["mac"] <= 100.0 and 0.0 <= r["filter_map"]["rmac"] <= 100.0
    (b31, f32) = r["bytes"]
    assert b31["levels"] == 31 and 0 < b31["bytes_per_image"] < f32["bytes_per_image"]
    assert r["bytes_256_channels"]["rows"][0]["bytes_per_image"] < b31["bytes_per_image"]


def test_print_and_arguments(tiny, capsys):
    B.print_tables(tiny)
    out = capsys.readouterr().out
    assert "q31" in out and "float32" in out and "skipped 63 levels" in out
    p = argparse.ArgumentParser()
    B.add_arguments(p)
    a = p.parse_args(["--levels", "31,15", "--queries", "3"])
    assert a.dataset is None and a.levels == "31,15" and a.queries == 3
