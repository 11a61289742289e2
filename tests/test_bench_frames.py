"""`rmac bench frames` on a small store: both encodings of the same partitions, checked equal, timed,
and the temporary copies removed; the CLI runs it and prints the figures as JSON."""
from __future__ import annotations

import json

import numpy as np

from rmac.storage.store import Store, StoreConfig
from rmac.workflows.bench.frames import bench_frames


def _store(path, n=20, P=8, K=8):
    rng = np.random.default_rng(4)
    ids = [f"im{i}" for i in range(n)]
    store = Store.create(path, ids, ids, StoreConfig(backbone="mobilenet-v2", channels=K, max_size=64, map_side=6,
                                                     levels=31, partition_size=P))
    for p in range(store.n_partitions):
        r = store.partition_rows(p)
        maps = [(rng.integers(1, 32, (K, 5, 6)) * (rng.random((K, 5, 6)) < 0.3)).astype(np.uint8) for _ in r]
        maps[0] = None if p == 1 else maps[0]  # a failed image
        recs = [{"id": ids[i], "path": ids[i], "status": "failed" if m is None else "done", "reason": None}
                for i, m in zip(r, maps)]
        hw = np.array([(0, 0) if m is None else (5, 6) for m in maps])
        store.write_partition(p, recs, np.zeros((len(r), K)), maps, np.ones(len(r)), hw, hw * 32)
    return store


def test_bench_frames_times_both_encodings_of_the_same_rows_and_cleans_up(tmp_path):
    _store(tmp_path / "s")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    res = bench_frames(tmp_path / "s", n_rows=5, repeat=1, tmp=scratch)
    assert res["rows"] == 5 and 1 <= res["partitions"] <= 3 and res["partition_size"] == 8
    for e in ("joint", "frames"):
        assert res[f"{e}_bytes_per_image"] > 0 and res[f"{e}_select_s"] > 0 and res[f"{e}_whole_s"] > 0
    assert [r["k"] for r in res["per_partition_select_k"]] == [1, 2, 4, 8]
    assert res["frames_select_meta_held_s"] > 0 and res["select_parsed_over_held"] > 0  # metadata held, side by side
    assert list(scratch.iterdir()) == []  # the copies are gone


def test_bench_frames_cli(tmp_path, capsys):
    from rmac.workflows.cli import main

    _store(tmp_path / "s")
    assert main(["bench", "frames", "--store", str(tmp_path / "s"), "--rows", "3", "--repeat", "1",
                 "--json", str(tmp_path / "f.json")]) == 0
    out = json.loads((tmp_path / "f.json").read_text())
    assert out["rows"] == 3 and out["select_joint_over_frames"] > 0
    assert json.loads(capsys.readouterr().out)["rows"] == 3
