"""`rmac paper` on a tiny views dataset (3 landmark queries, a dozen distractors, small images): the
report's structure, its JSON numbers against the functions that produce them, the PNGs, the cache;
and the ops it adds (sum-pooled regions, cross-matching) against slow references."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmac.data import LANDMARKS_DEV
from rmac.ops.crossmatch import crossmatch_scores
from rmac.ops.pooling import regional_sum

QUERIES = ["aero_1", "box_1", "eiffel_2"]
LANDMARKS = ["aero_1", "aero_2", "box_1", "box_2", "eiffel_1", "eiffel_2", "eiffel_3"]
DISTRACTORS = [f"distractor_{i:03d}" for i in (1, 9, 17, 30, 42, 55, 77, 90, 101, 120, 133, 150)]
SIZE = 256


# ------------------------------------------------------------------------------------------------ ops
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_regional_sum_matches_a_loop(K, H, W, seed):
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.normal(size=(K, H, W)), 0).astype(np.float32)
    boxes = np.array([(x0, y0, w, h) for x0 in range(W) for y0 in range(H)
                      for w in range(1, W - x0 + 1) for h in range(1, H - y0 + 1)])
    got = regional_sum(x, boxes)
    want = np.stack([x[:, y0:y0 + h, x0:x0 + w].sum(axis=(1, 2)) for x0, y0, w, h in boxes])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        regional_sum(x, [[0, 0, W + 1, 1]])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=6), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_crossmatch_scores_match_a_loop(counts, rq, seed):
    rng = np.random.default_rng(seed)
    D = 5
    q = rng.normal(size=(rq, D)).astype(np.float32)
    d = rng.normal(size=(sum(counts), D)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    got = crossmatch_scores(q, d, offsets)
    want = [sum(max(float(qi @ dj) for dj in d[a:b]) for qi in q) if b > a else 0.0
            for a, b in zip(offsets[:-1], offsets[1:])]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_views(tmp_path_factory):
    """Views (exact boxes) of three dev-set queries with their photos and twelve distractors."""
    from rmac.workflows.views import make_views

    src = tmp_path_factory.mktemp("paper-src")
    (src / "jpg").mkdir()
    (src / "gt").mkdir()
    for q in QUERIES:
        for kind in ("query", "good", "ok", "junk"):
            shutil.copyfile(LANDMARKS_DEV / "gt" / f"{q}_{kind}.txt", src / "gt" / f"{q}_{kind}.txt")
    for i in LANDMARKS + DISTRACTORS:
        shutil.copyfile(LANDMARKS_DEV / "jpg" / f"{i}.jpg", src / "jpg" / f"{i}.jpg")
    out = tmp_path_factory.mktemp("paper-views") / "views"
    make_views(src, out, seed=3)
    return out


@pytest.fixture(scope="module")
def paper_run(tiny_views, client, tmp_path_factory):
    """`run_paper` on the tiny views: small sizes and N, two Figure-3 images."""
    from rmac.workflows.extract import ModelChoice
    from rmac.workflows.paper import run_paper
    from rmac.workflows.paper.runner import PaperSettings

    out = tmp_path_factory.mktemp("paper-out")
    s = PaperSettings(str(tiny_views), str(out), ModelChoice(), max_size=SIZE, sizes=(224, SIZE), levels=(1, 3),
                      top_ns=(0, 4, 8, 40), fig3_images=2, fig3_boxes=40, alphas=(2.0, 10.0))
    return s, run_paper(s, client, progress=False)


def test_report_structure_and_figures(paper_run):
    s, res = paper_run
    out = Path(s.out)
    text = (out / "report.md").read_text()
    for title in ("Table 1 (left)", "Table 1 (right)", "Figure 3", "Figure 4", "Table 2", "Section 8",
                  "Localisation"):
        assert f"## {title}" in text, title
    for png in ("figure3-error.png", "figure3-cosine.png", "figure4.png"):
        data = (out / "paper" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"](paper/{png})" in text
    assert text.count("*Produced by* `rmac paper") == 7
    assert json.loads((out / "results.json").read_text())["sections"].keys() == res["sections"].keys()
    assert "no `--distractors STORE` was given" in text  # said, not hidden


def test_numbers_equal_the_underlying_functions(paper_run, client):
    """Table 2 and the last point of each Figure-4 curve are evaluate's own numbers; Table 1 (left) is
    `rmac bench aml`'s table1 on the same pairs; Table 1 (right) is evaluate's at each (size, L)."""
    from rmac.workflows.bench.aml import table1
    from rmac.workflows.evaluate import evaluate
    from rmac.workflows.paper.runner import Run
    from rmac.workflows.paper.table1_aml import pairs_from_store

    s, res = paper_run
    saved = json.loads((Path(s.out) / "results.json").read_text())["sections"]
    run = Run(s, client, progress=False)
    ev, _ = run.main()
    m = ev.result["methods"]
    assert saved["table2"]["columns"]["dataset"]["methods"] == m
    for method, pts in saved["figure4"]["curves"]["dataset"]["methods"].items():
        assert pts[-1]["map"] == m[method]["map"]
        assert pts[0]["map"] == m["rmac" if method.startswith("rmac") else "mac"]["map"]  # N = 0: filtering
    assert saved["localisation"]["result"] == ev.result["localisation"]
    assert ev.result["localisation"]["pairs"] > 0

    t1 = table1(pairs_from_store(ev), s.steps, s.ratios)
    for a, b in zip(saved["table1_aml"]["rows"], t1["rows"]):
        assert (a["t"], a["s"], a["iou"], a["pct_windows"]) == (b["t"], b["s"], b["iou"], b["pct_windows"])

    other = evaluate(s.dataset, client, s.choice, 224, str(run.store_path(224)), L=1, methods=("mac", "rmac"),
                     top_n=0, progress=False).result["methods"]
    row = next(r for r in saved["table1_rmac"]["rows"] if r["max_size"] == 224)
    assert row["rmac"]["1"] == other["rmac"]["map"] and row["mac"]["1"] == other["mac"]["map"]


def test_max_pooling_pipeline_reproduces_evaluate(paper_run, client):
    """The Section-8 pipeline with max-pooling and the main whitening gives evaluate's R-MAC numbers,
    so the sum-pooling column differs from the max-pooling one by the pooling alone."""
    from rmac.workflows.paper.ablations import pooling_pipeline
    from rmac.workflows.paper.runner import Run

    s, res = paper_run
    run = Run(s, client, progress=False)
    ev, _ = run.main()
    got = pooling_pipeline(run, ev, "max", whitening=ev.db.whitening)
    for m in ("rmac", "rmac+aml", "rmac+aml+qe"):
        assert got[m]["map"] == pytest.approx(ev.result["methods"][m]["map"], abs=0.02), m
    ab = res["sections"]["ablations"]
    assert ab["memory"]["bytes_per_image_crossmatch"] > ab["memory"]["bytes_per_image_rmac"]
    assert all(0 <= v["map"] <= 100 for v in ab["sum_pooling"].values())


def test_second_run_reuses_the_stores(paper_run, client):
    """A re-run extracts nothing: one store per size under the cache, untouched."""
    from rmac.workflows.paper import run_paper

    s, _ = paper_run
    stores = sorted(p.name for p in Path(s.cache_dir).iterdir())
    assert len(stores) == 2 and [n.rsplit("-", 1)[1] for n in stores] == ["224", str(SIZE)]
    stamp = {p: p.stat().st_mtime_ns for n in stores for p in (Path(s.cache_dir) / n / "parts").iterdir()}
    res = run_paper(replace(s, sections=("table2",)), client, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert "Section figure3 (not selected with --sections)." in res["meta"]["missing"]


@pytest.mark.parametrize("args, message", [
    (["--sizes", "0,1024"], "--sizes"), (["--top-ns", "a,5"], "--top-ns"), (["--qe", "-1"], "--qe"),
    (["--sections", "table9"], "--sections"), (["--fig3-images", "0"], "--fig3-images"),
    (["--distractors", "/no/such/store"], "--distractors")])
def test_bad_option_values_get_one_line(args, message, capsys, tmp_path):
    from rmac.workflows.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["paper", "landmarks-dev", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_bench_table1_takes_stored_uint8_maps_as_it_quantises_float_ones():
    """`rmac bench aml`'s table1 (reused by Table 1 left) gives the same rows on float maps and on the
    same maps quantised beforehand, as a store holds them; region_cosines' LUT path likewise."""
    from rmac.ops.quantise import quantise
    from rmac.workflows.bench.aml import region_cosines, synthetic_maps, table1

    maps = next(synthetic_maps(3, K=16, H=7, W=9, zeros=0.7, seed=1))
    rng = np.random.default_rng(0)
    pairs = [{"q_mac": rng.random(16).astype(np.float32), "aspect": a, "maps": m}
             for a, m in zip((0.8, 1.0, 1.6), maps)]
    stored = [{**p, "maps": quantise(p["maps"])[0]} for p in pairs]
    a, b = table1(pairs, (1, 3), (1.1, 2.0)), table1(stored, (1, 3), (1.1, 2.0))
    for ra, rb in zip(a["rows"], b["rows"]):
        assert (ra["iou"], ra["pct_windows"], ra["mean_score_gap"]) == (rb["iou"], rb["pct_windows"], rb["mean_score_gap"])
    x = maps[0]
    np.testing.assert_array_equal(region_cosines(x, path="lut"), region_cosines(x, path="lut", q=quantise(x)[0]))


def test_report_is_written_again_from_its_json(paper_run, tmp_path):
    """`load_results` + `write_report` give the same report from results.json alone (nothing re-run)."""
    from rmac.workflows.paper.report import load_results, write_report

    s, _ = paper_run
    out = Path(s.out)
    again = write_report(load_results(out / "results.json"), tmp_path / "again")
    assert again.read_text() == (out / "report.md").read_text()
