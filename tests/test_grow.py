"""Stores that grow, on a real cluster (deploy/local-cluster.sh), real weights and photos: new images
become new partitions at the end (nothing moves, nothing is redone), the same file under two names is
stored once, changed / reappeared sources are extracted again, removed ones reported; `rmac index`
then indexes only what is new; two `rmac extract` at once on a new store; the run log and `rmac info`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from rmac.data import LANDMARKS_DEV
from rmac.storage.index import ShardedIndex
from rmac.storage.store import Store
from rmac.workflows import cli
from rmac.workflows.extract import ModelChoice, extract, extract_partition
from rmac.workflows.index import build_index, require_indexed
from rmac.workflows.operations.info import info
from rmac.workflows.operations.verify import verify

from conftest import BIN, cli_env
from test_lock import hold

pytestmark = pytest.mark.slow
SIZE = 256
P = 4


@pytest.fixture()
def photos(tmp_path) -> Path:
    """14 real photos in a folder of their own (tests change, add and remove files)."""
    root = tmp_path / "photos"
    root.mkdir()
    for src in sorted((LANDMARKS_DEV / "jpg").glob("*.jpg"))[:14]:
        shutil.copy(src, root / src.name)
    return root


def items_of(folder: Path, names) -> list[tuple[str, str]]:
    return [(Path(n).stem, str(folder / n)) for n in names]


def run_extract(items, store, client):
    return extract(items, str(store), client, ModelChoice(), SIZE, partition_size=P, progress=False)


def mtimes(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_mtime_ns for f in folder.iterdir() if f.is_file()}


def test_a_store_grows_and_is_indexed_incrementally(photos, client, tmp_path, capsys):
    names = sorted(os.listdir(photos))
    store_path = tmp_path / "store"
    first = run_extract(items_of(photos, names[:10]), store_path, client)
    assert first["added"] == 10 and first["partitions_run"] == 3 and first["done"] == 10
    info1 = build_index(Store(store_path), client, shard_rows=8, dim=64, progress=False)
    assert not info1["incremental"] and info1["partitions_indexed"] == 3
    before = Store(store_path)
    mac0, ok0 = before.arrays["mac"][:], before.arrays["ok"][:]
    parts0, shards0 = mtimes(store_path / "parts"), mtimes(store_path / "index" / "rmac")

    # the next night: 4 new photos, one of them also reached through a symlink and a repeated list entry
    os.symlink(photos / names[11], photos / "link.jpg")
    grown = items_of(photos, names) + items_of(photos, ["link.jpg"]) + [("again", str(photos / names[12]))]
    second = run_extract(grown, store_path, client)
    assert second["added"] == 4 and second["partitions_run"] == 1
    assert sorted(d["id"] for d in second["duplicates"]) == ["again", "link"]
    store = Store(store_path)
    assert store.n_held == 14 and store.n_partitions == 4 and store.n_images == 16  # rows 10, 11 empty
    assert store.ids[:10] == [Path(n).stem for n in names[:10]] and store.ids[10:12] == [None, None]
    assert store.ids[12:] == [Path(n).stem for n in names[10:]]
    np.testing.assert_array_equal(store.arrays["mac"][:10], mac0)  # existing rows never move
    np.testing.assert_array_equal(store.arrays["ok"][:10], ok0)
    assert not store.arrays["ok"][10:12].any()
    assert {k: v for k, v in mtimes(store_path / "parts").items() if k in parts0} == parts0  # nothing redone

    info2 = build_index(store, client, shard_rows=8, dim=64, progress=False)
    assert info2["incremental"] and info2["partitions_indexed"] == 1 and info2["shards_built"] == 1
    assert info2["whitening_id"] == info1["whitening_id"]
    assert {k: v for k, v in mtimes(store_path / "index" / "rmac").items() if k in shards0
            and k.startswith("shard_")} == {k: v for k, v in shards0.items() if k.startswith("shard_")}
    index = ShardedIndex(store_path / "index" / "rmac")
    assert index.ntotal == 14
    X = store.arrays["rmac"][:]
    _, ids = index.search(X[12:16], 1)
    assert ids[:, 0].tolist() == [12, 13, 14, 15]  # the new images are found
    require_indexed(Store(store_path))
    assert verify(str(store_path), sample=1.0)["problems"] == []

    # --refit learns the whitening again over everything and rebuilds every vector
    info3 = build_index(Store(store_path), client, shard_rows=8, dim=64, progress=False, refit=True)
    assert not info3["incremental"] and info3["partitions_indexed"] == 4
    assert verify(str(store_path), sample=1.0)["problems"] == []

    runs = Store(store_path).runs()
    assert [r["command"] for r in runs] == ["extract", "index", "extract", "index", "index"]
    assert runs[2]["added"] == 4 and runs[2]["duplicates"] == 2 and all(r["version"] for r in runs)
    summary = info(str(store_path))
    assert summary["images"] == 14 and summary["partitions"] == 4 and summary["failed"] == 0
    assert summary["index"]["index_kind"] == "flat" and summary["index"]["rows"] == 16
    assert summary["whitening"]["id"] == info3["whitening_id"] and summary["bytes"]["maps"] > 0
    assert len(summary["last_runs"]) == 5 and summary["lock"] is None
    assert cli.main(["info", str(store_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == summary
    assert cli.main(["info", str(store_path)]) == 0
    text = capsys.readouterr().out
    assert "images     14 (14 extracted, 0 failed, 0 pending)" in text and "index      flat, 2 shard(s)" in text


def test_changed_missing_and_removed_sources(photos, client, tmp_path):
    names = sorted(os.listdir(photos))[:8]
    store_path = tmp_path / "store"
    gone = photos / names[5]
    hidden = tmp_path / names[5]
    shutil.move(gone, hidden)  # missing at the first run
    first = run_extract(items_of(photos, names), store_path, client)
    assert first["failed"] == 1 and first["failures"][0]["id"] == Path(names[5]).stem
    build_index(Store(store_path), client, dim=64, progress=False)
    shutil.move(hidden, gone)  # it arrives later
    shutil.copy(LANDMARKS_DEV / "jpg" / "eiffel_1.jpg", photos / names[1])  # another photo under an old name
    os.unlink(photos / names[6])  # removed from the source folder
    second = run_extract(items_of(photos, names), store_path, client)
    assert second["retried"] == [Path(names[5]).stem]
    assert second["changed"] == [Path(names[1]).stem]
    assert second["removed"] == [Path(names[6]).stem]
    assert second["added"] == 0 and second["partitions_run"] == 2  # partitions 0 and 1, redone
    store = Store(store_path)
    recs = {r["id"]: r for r in store.records()}
    assert recs[Path(names[5]).stem]["status"] == "done"
    assert recs[Path(names[6]).stem]["status"] == "done"  # kept in the store, reported
    # the index built before no longer matches the rewritten rows: refused until re-indexed
    with pytest.raises(Exception, match="re-extracted since the index was built"):
        require_indexed(store)
    info2 = build_index(store, client, dim=64, progress=False)
    assert info2["incremental"] and info2["partitions_indexed"] == 2
    require_indexed(Store(store_path))
    assert verify(str(store_path), sample=1.0)["problems"] == []


def test_a_task_reads_only_its_partitions_ids(photos, client, tmp_path):
    names = sorted(os.listdir(photos))[:8]
    store_path = tmp_path / "store"
    run_extract(items_of(photos, names), store_path, client)
    store = Store(store_path)
    assert sorted(os.listdir(store_path / "ids")) == ["p000000.json", "p000001.json"]
    assert not (store_path / "ids.json").exists()
    # partition 1 again with partition 0's id table gone: the task never needs it
    (store_path / "ids" / "p000000.json").unlink()
    store.forget_partitions([1])
    got = extract_partition(Store(store_path), 1, ModelChoice())
    assert got["done"] == 4


def _popen(*args) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "rmac"), *map(str, args)], env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_extracts_at_once_on_a_new_store(photos, scheduler, tmp_path):
    store_path = tmp_path / "new-store"
    args = ("extract", photos, "--store", store_path, "--max-size", SIZE, "--partition-size", P,
            "--scheduler", scheduler)
    a, b = _popen(*args, "--wait"), _popen(*args, "--wait")
    outs = [p.communicate(timeout=600) for p in (a, b)]
    for p, (out, err) in zip((a, b), outs):
        assert p.returncode == 0 and "Traceback" not in err, err
    store = Store(store_path)
    assert store.pending_partitions() == [] and store.n_held == 14
    runs = store.runs()
    assert sorted(r["partitions_run"] for r in runs) == [0, 4]  # one did the work, the other nothing
    assert verify(str(store_path), sample=1.0)["problems"] == []
    assert not [f for f in tmp_path.iterdir() if ".creating-" in f.name]  # no temporary folder left

    # without --wait, a second writer exits at once with one line naming the holder
    holder = hold(store_path, 120)
    try:
        for command in (args, ("index", store_path, "--scheduler", scheduler)):
            t0 = time.monotonic()
            second = _popen(*command)
            out, err = second.communicate(timeout=300)
            assert second.returncode == 2 and out == "", (out, err)
            lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("dask: ")]
            assert len(lines) == 1 and f"locked by pid {holder.pid}" in lines[0] and "--wait" in lines[0], err
            assert time.monotonic() - t0 < 60  # at once: it did not wait for the holder's 120 s
    finally:
        holder.kill()
        holder.wait()
