"""Extraction on a real distributed scheduler with two worker processes, real weights and real photos:
bad files recorded, a worker killed mid-run, resume after an interruption, every image stored once."""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rmac.data import LANDMARKS_DEV
from rmac.ops.backbones import activations
from rmac.ops.pooling import mac
from rmac.ops.quantise import dequantise
from rmac.storage.images import list_images, load_image
from rmac.storage.store import Store, StoreError
from rmac.workflows.cluster import get_client
from rmac.workflows.extract import ModelChoice, extract, extract_partition, worker_model

from badfiles import write_bad_files

MAX_SIZE = 384  # small images keep the real-network runs quick; the pipeline is the same
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    with get_client(n_workers=2, quiet=True, dashboard=False) as c:
        yield c


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """24 real photos plus every kind of bad file, in one folder (with a subfolder: recursion)."""
    root = tmp_path_factory.mktemp("photos")
    for src in sorted((LANDMARKS_DEV / "jpg").glob("*.jpg"))[:24]:
        shutil.copy(src, root / src.name)
    expected = write_bad_files(root / "bad")
    (root / "expected.txt").write_text("\n".join(f"{k}\t{v}" for k, v in expected.items()))
    return root


def _expected(photos: Path) -> dict[str, str]:
    """Expected outcome of every listed bad file (a folder named x.jpg is not an image: never listed)."""
    lines = (photos / "expected.txt").read_text().splitlines()
    listed = {i for i, _ in list_images(str(photos))}
    return {f"bad/{k}": v for k, v in (ln.split("\t") for ln in lines) if f"bad/{k}" in listed}


def _check_store(store: Store, photos: Path) -> None:
    ids = [i for i, _ in list_images(str(photos))]
    recs = store.records()
    assert [r["id"] for r in recs] == ids, "every image exactly once, in id order"
    assert store.pending_partitions() == []
    expected = _expected(photos)
    for r in recs:
        want = expected.get(r["id"], "ok")
        if want == "ok":
            assert r["status"] == "done", (r["id"], r["reason"])
        else:
            assert r["status"] == "failed" and r["reason"], r
    ok = store.valid_rows()
    assert ok.sum() == sum(r["status"] == "done" for r in recs)
    macs = store.arrays["mac"][:]
    assert (np.linalg.norm(macs[ok], axis=1) > 0).all() and not macs[~ok].any()


def test_extract_with_bad_files_and_a_killed_worker(client, photos, tmp_path):
    store_path = tmp_path / "store"
    choice = ModelChoice()
    result: dict = {}

    def run():
        result["summary"] = extract(str(photos), str(store_path), client, choice, MAX_SIZE,
                                    partition_size=4, progress=False)

    job = threading.Thread(target=run)
    job.start()
    # Kill one worker process (SIGKILL, no goodbye) once the first partition is written.
    deadline = time.time() + 300
    while time.time() < deadline and not list(store_path.glob("parts/p*.json")):
        time.sleep(0.2)
    pids = client.run(os.getpid)
    victim = sorted(pids)[0]
    os.kill(pids[victim], signal.SIGKILL)
    job.join(timeout=600)
    assert not job.is_alive()
    summary = result["summary"]
    store = Store(store_path)
    _check_store(store, photos)
    assert summary["done"] + summary["failed"] == store.n_images
    assert summary["failed"] == sum(v != "ok" for v in _expected(photos).values())
    assert summary["map_bytes_per_image"] > 0


def test_stored_features_match_a_plain_forward_pass(client, photos, tmp_path):
    store_path = tmp_path / "store"
    items = [it for it in list_images(str(photos)) if not it[0].startswith("bad/")][:6]
    extract(items, str(store_path), client, ModelChoice(), MAX_SIZE, partition_size=3, progress=False)
    store = Store(store_path)
    model, spec = worker_model(ModelChoice())
    for (q, scale), (_, path), m in zip(store.read_maps(range(6)), items, store.arrays["mac"][:6]):
        x = activations(model, spec, load_image(path), max_size=MAX_SIZE)
        assert q.shape == x.shape
        # float rounding only: the store's batched forward passes and this single one take different kernels
        np.testing.assert_allclose(m, mac(x), rtol=1e-4, atol=5e-5)
        # quantisation error is at most half a level (values above the clip aside)
        err = np.abs(dequantise(q, scale) - np.minimum(x, scale * q.max()))
        assert err.max() <= 0.5 * scale + 1e-5


def test_resume_after_interruption_runs_only_what_is_missing(client, photos, tmp_path):
    store_path = tmp_path / "store"
    items = [it for it in list_images(str(photos)) if not it[0].startswith("bad/")][:12]
    choice = ModelChoice()
    # An interrupted run: partitions 0 and 2 finished; partition 1 wrote its arrays but died before
    # its record file (the done marker) — it must be redone, not trusted.
    from rmac.workflows.extract import store_config
    store = Store.open_or_create(store_path, *zip(*items), store_config(choice, MAX_SIZE, 4, 31))
    for p in (0, 2):
        extract_partition(store, p, choice)
    done_before = {p: (store_path / "parts" / f"p{p:06d}.json").stat().st_mtime_ns for p in (0, 2)}
    assert store.pending_partitions() == [1]
    summary = extract(items, str(store_path), client, choice, MAX_SIZE, partition_size=4, progress=False)
    assert summary["partitions_run"] == 1
    for p, mtime in done_before.items():
        assert (store_path / "parts" / f"p{p:06d}.json").stat().st_mtime_ns == mtime, "finished work kept"
    assert [r["id"] for r in Store(store_path).records()] == [i for i, _ in items]
    # idempotent: a third run does nothing
    assert extract(items, str(store_path), client, choice, MAX_SIZE, partition_size=4,
                   progress=False)["partitions_run"] == 0


def test_a_store_refuses_another_configuration(client, photos, tmp_path):
    items = list_images(str(photos))[:2]
    extract(items, str(tmp_path / "s"), client, ModelChoice(), MAX_SIZE, partition_size=2, progress=False)
    with pytest.raises(StoreError, match="max size"):
        extract(items, str(tmp_path / "s"), client, ModelChoice(), MAX_SIZE * 2, partition_size=2,
                progress=False)
    # another list is no error: the store holds what it held and grows by what is new (tests/test_grow.py)
    again = extract(items[:1], str(tmp_path / "s"), client, ModelChoice(), MAX_SIZE, partition_size=2,
                    progress=False)
    assert again["added"] == 0 and again["partitions_run"] == 0 and again["images"] == 2
