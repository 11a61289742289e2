"""`rmac bench scale` helpers: peak RSS of every process, recall, the disk check."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from distributed import wait

from rmac.workflows.bench.scale import Peaks, bytes_needed, check_disk, recall_at


def test_peaks_see_a_worker_allocation_and_reset(client):
    peaks = Peaks(client)
    peaks.reset()
    base = peaks.read("base")
    workers = sorted(client.scheduler_info()["workers"])
    block = client.submit(np.ones, 300 * 2**20, dtype=np.uint8, workers=[workers[0]], pure=False)  # resident
    wait(block)
    after = peaks.read("after")
    del block  # the worker frees it (asynchronously)
    assert set(after) == set(base) and {"worker0", "worker1"} <= set(after)
    assert any(k.startswith("client") for k in after) and "scheduler" in " ".join(after)
    assert after["worker0"] >= base["worker0"] + 250  # MiB: the 300 MiB block, seen
    assert after["worker1"] < base["worker1"] + 100  # the other worker did not allocate it
    for _ in range(50):  # the peak is reset to the current RSS, once the block is gone
        time.sleep(0.2)
        peaks.reset()
        again = peaks.read("reset")
        if again["worker0"] < after["worker0"] - 250:
            break
    assert again["worker0"] < after["worker0"] - 250


def test_recall_at():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, -1]])
    found = np.array([[4, 3, 9, 8], [7, 6, 5, -1]])
    assert recall_at(found, exact) == pytest.approx((2 / 4 + 3 / 3) / 2)
    assert recall_at(exact, exact) == 1.0


def test_disk_check_refuses_with_the_size_needed(tmp_path):
    check_disk(tmp_path, 1, 10)
    with pytest.raises(SystemExit, match=r"need about [0-9.]+ GiB .* GiB free"):
        check_disk(tmp_path, bytes_needed(10**15, 1000), 1000)


def _run_figures(n: int) -> dict:
    """The fields of a `bench_scale` result that the curve reads (shapes as bench_scale writes them)."""
    return {"db_images": n, "bytes": {"per_image": 44668},
            "filtering": {"exact_workers": {"p50_ms": 0.4 * n ** 0.5},
                          "ivf_nprobe16": {"p50_ms": 10.0, "recall@1000": 0.4},
                          "ivf_nprobe64": {"p50_ms": 15.0, "recall@1000": 0.7}},
            "query": {"rerank_s": {"p50": 0.5}, "end_to_end_s": {"p50": 0.7}},
            "peak_rss_mib": {"index": {"client+scheduler": 400.0, "worker0": n / 100.0}}}


def test_cost_curve_plot_from_earlier_runs(tmp_path, capsys):
    from rmac.workflows import cli

    files = []
    for n in (10_186, 100_186):
        f = tmp_path / f"s{n}.json"
        f.write_text(json.dumps(_run_figures(n)))
        files.append(str(f))
    png = tmp_path / "curve.png"
    assert cli.main(["bench", "scale", "--from-json", *files, "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert cli.main(["bench", "scale"]) == 2 and "give --count" in capsys.readouterr().err


def test_summary_line_without_approximate_indexes():
    """`--approximate` with nothing: the summary says so instead of failing (it did, after a whole run)."""
    from rmac.workflows.bench.scale import best_approximate, summary_line

    res = _run_figures(10_186)
    res["filtering"] = {"exact_workers": {"p50_ms": 40.0, "p95_ms": 50.0}}
    res.update(top_n=1000, stages_s={"distractors_s": 3.0}, query_filter="exact_workers",
               query={k: {"p50": 0.5, "p95": 0.6} for k in ("rerank_s", "qe_s", "end_to_end_s")})
    assert best_approximate(res["filtering"]) is None
    line = summary_line(res)
    assert " approx=none " in line and "query_filter=exact_workers" in line and "e2e_p50_s=0.5" in line


@pytest.mark.slow
def test_a_small_run_end_to_end_then_reused(scheduler, tmp_path):
    """`bench_scale` at N = 300 on the test cluster: every figure there, the query filtered by a pq
    setting that keeps the recall, the JSON and summary line readable; run again on the kept folder,
    the distractors and their vectors are reused (nothing indexed again)."""
    from rmac.workflows.bench.scale import bench_scale, summary_line

    kw = dict(workdir=str(tmp_path / "w"), keep=True, scheduler=scheduler, max_size=256, shard_rows=64,
              n_queries=2, approximate=("pq",), pq_dims=(None, 128), k_factors=(8,), partition_size=32,
              pq_nlists=(None, 4), nprobes=(4,),
              similarity_sample=40, top_n=100)
    res = bench_scale(300, **kw)
    assert res["db_images"] == 300 + 186 and res["queries"] == 2 and res["workers"] == 2
    assert res["dim"] == 1280 and "dim_asked" not in res
    assert res["distractors_indexed"] == {"partitions": 10, "of": 10}
    f = res["filtering"]
    pq = ("pq_k8", "pq_d128_k8", "pq_ivf4_k8_nprobe4", "pq_d128_ivf4_k8_nprobe4")  # behind IVF: every list probed
    assert {"exact_workers", "exact_client", *pq} <= set(f)
    assert f["exact_client"]["recall_vs_workers"] > 0.99
    assert all(0.9 <= f[k]["recall@100"] <= 1.0 for k in pq)
    assert all(f[k]["thread_p50_ms"] > 0 and f[k]["actor_p50_ms"] > 0  # the actors, side by side
               for k in (*pq, "exact_workers"))
    assert res["approximate"]["pq"]["factory"] == "IDMap,PQ640x4fs,Refine(SQ8)"
    assert res["approximate"]["pq_d128"]["factory"] == "IDMap,PCA128,PQ64x4fs,Refine(SQ8)"
    assert res["approximate"]["pq_d128_ivf4"]["factory"] == "IDMap,PCA128,IVF4,PQ64x4fsr,Refine(SQ8)"
    assert res["approximate"]["pq_d128"]["scan_dim"] == 128
    assert res["approx_shard_rows"] == 150  # one shard per worker
    assert res["query_filter"] in pq
    assert res["metadata_held"]["partitions"] > 10  # the distractors' 10 partitions and the dev set's, held first
    for k in ("filter_s", "rerank_s", "qe_s", "end_to_end_s", "extract_s"):
        assert 0 < res["query"][k]["p50"] < 60
    assert res["bytes"]["per_image"] > res["bytes"]["maps_per_image"] > 0
    assert set(res["similarity"]["rows"]) >= {"MAC real", "R-MAC synthetic", "AML (R-MAC) synthetic"}
    line = summary_line(json.loads(json.dumps(res)))
    assert line.startswith("SCALE n=486 ") and f"query_filter={res['query_filter']}" in line

    again = bench_scale(300, **kw)
    assert again["distractors_indexed"] == {"partitions": 0, "of": 10}
    assert again["stages_s"]["distractors_s"] < res["stages_s"]["distractors_s"]

    # --dim: the same kept folder at 128-D: the dev set's whitening refitted, every distractor vector again
    low = bench_scale(300, **{**kw, "dim": 128, "pq_dims": (None,), "pq_nlists": (None,)})
    assert low["dim"] == 128 and low["dim_asked"] == 128
    assert low["distractors_indexed"] == {"partitions": 10, "of": 10}
    assert low["approximate"]["pq"]["factory"] == "IDMap,PQ64x4fs,Refine(SQ8)"
    assert 0.9 <= low["filtering"]["pq_k8"]["recall@100"] <= 1.0
    assert summary_line(low).startswith("SCALE n=486 dim=128 ")
