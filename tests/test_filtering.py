"""Filtering on the workers that hold the FAISS shards, against client-side search; IVF trained once."""
from __future__ import annotations

import shutil
import time

import faiss
import numpy as np
import pytest

from rmac.storage.index import ShardedIndex, build_shard, load_shard
from rmac.storage.store import Store
from rmac.workflows.filtering import held_shards
from rmac.workflows.search import Database


def _queries(store: Store, n: int = 6) -> dict[str, np.ndarray]:
    g = store.arrays
    rng = np.random.default_rng(0)
    out = {}
    for kind in ("rmac", "macw"):
        x = g[kind][:]
        q = x[rng.choice(len(x), n, replace=False)] + 0.05 * rng.standard_normal((n, x.shape[1]))
        out[kind] = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    return out


def test_worker_held_shards_equal_client_side_search(client, dev_store):
    db_client = Database([Store(dev_store.path)])
    db_workers = Database([Store(dev_store.path)]).scatter_filtering(client)
    queries = _queries(dev_store.store)
    n_shards = dev_store.info["shards"]
    assert n_shards >= 3
    for kind, q in queries.items():
        for k in (1, 10, dev_store.store.n_images + 5):
            ref_s, ref_i = db_client.filter(kind, q, k)
            got_s, got_i = db_workers.filter(kind, q, k)
            got_s, got_i = got_s[:, :ref_s.shape[1]], got_i[:, :ref_i.shape[1]]
            np.testing.assert_allclose(got_s, ref_s, atol=1e-5)
            assert np.mean(got_i == ref_i) > 0.99  # ties aside, the same rows
    # every shard is held by exactly one worker, loaded once: searching again loads nothing new
    plan = db_workers.scattered.plan("rmac")
    assert sum(len(r) for r in plan.values()) == n_shards and len(plan) == 2
    before = client.run(held_shards)
    db_workers.filter("rmac", queries["rmac"], 5)
    assert client.run(held_shards) == before
    assert sum(before.values()) >= 2 * n_shards  # rmac and macw shards, spread over both workers
    assert all(v > 0 for v in before.values())


def test_single_queries_search_on_the_event_loop_with_the_same_results(client, dev_store):
    """A query of up to INLINE_ROWS rows is searched on each worker's event loop, a batch in the actor's
    thread, the shards loaded in that thread beforehand (`ShardHolder.load`, again after `warm`): the same
    top k either way; a worker that lets go of its shards (`release_held`) gets them back from `warm`."""
    from rmac.workflows.filtering import INLINE_ROWS, ScatteredFilter, release_held

    st = Store(dev_store.path)
    inline = ScatteredFilter(client, [st.path], [0])
    threaded = ScatteredFilter(client, [st.path], [0], inline_rows=0)
    q = _queries(st)["rmac"]
    assert len(q) > INLINE_ROWS >= 1
    for rows in (q[:1], q[:INLINE_ROWS], q):
        a, b = inline.search("rmac", rows, 10), threaded.search("rmac", rows, 10)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert len(inline._loaded) == len(inline.plan("rmac")) == 2  # each worker's shards, loaded once
    client.run(release_held)
    assert sum(client.run(held_shards).values()) == 0
    inline.warm("rmac")
    assert sum(client.run(held_shards).values()) == dev_store.info["shards"]
    np.testing.assert_array_equal(inline.search("rmac", q[:1], 10)[1], threaded.search("rmac", q[:1], 10)[1])


def test_single_queries_go_over_direct_lines_with_the_same_results(client, dev_store):
    """A query of up to INLINE_ROWS rows goes over each worker's direct line (`filterline`), with the same
    top k as through the actors; a batch still goes through the actors; a stranger's bytes on a line's
    port and a failing search (wrong dimension: raised as through the actors) leave the lines usable."""
    import socket

    from rmac.workflows.filtering import INLINE_ROWS, ScatteredFilter

    st = Store(dev_store.path)
    direct = ScatteredFilter(client, [st.path], [0])
    actors = ScatteredFilter(client, [st.path], [0], direct=False)
    q = _queries(st)["rmac"]
    for rows in (q[:1], q[:INLINE_ROWS]):
        for k in (1, 10, st.n_images + 5):
            a, b = direct.search("rmac", rows, k), actors.search("rmac", rows, k)
            np.testing.assert_array_equal(a[1], b[1])
            np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert len(direct._lines) == 2 and not actors._lines  # one line per worker holding shards
    a, b = direct.search("rmac", q, 10), actors.search("rmac", q, 10)  # a batch: through the actors
    np.testing.assert_array_equal(a[1], b[1])
    host, port = next(iter(direct._lines.values())).sock.getpeername()[:2]
    with socket.create_connection((host, port)) as stranger:  # not our protocol: the worker hangs up
        stranger.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(64))
        try:
            assert stranger.recv(16) == b""  # closed, nothing answered
        except ConnectionResetError:  # closed with our bytes unread
            pass
    np.testing.assert_array_equal(direct.search("rmac", q[:1], 10)[1], b[1][:1])
    with pytest.raises(AssertionError):  # FAISS checks the dimension: on the line, then through the actor
        direct.search("rmac", np.ones((1, 7), np.float32), 10)
    assert not direct._lines  # closed after the failure, opened again by the next query
    np.testing.assert_array_equal(direct.search("rmac", q[:1], 10)[1], b[1][:1])
    assert len(direct._lines) == 2


def test_ivf_template_shards_share_lists_and_full_probe_is_exact(client, dev_store, tmp_path):
    """`rmac index --ivf`: one k-means per vector kind; every shard copies it; probing every list
    returns exactly the flat top k, through the workers."""
    from rmac.workflows.index import build_index, load_whitenings

    path = tmp_path / "ivf-store"
    shutil.copytree(dev_store.path, path)
    st = Store(path)
    w = load_whitenings(st)
    nlist = 4
    info = build_index(st, client, whitening=w, whiten_label="dev distractors", shard_rows=16,
                       index_kind="ivf", nlist=nlist, progress=False)
    assert info["shards"] >= 3 and "ivf_train_s" in info["timings"]
    index = ShardedIndex(path / "index" / "rmac")
    assert info["ivf"]["rmac"]["nlist"] == nlist and info["ivf"]["macw"]["nlist"] == nlist
    centroids = [faiss.extract_index_ivf(s).quantizer.reconstruct_n(0, nlist) for s in index.shards]
    for c in centroids[1:]:
        np.testing.assert_array_equal(c, centroids[0])
    flat = Database([Store(dev_store.path)])
    ivf = Database([Store(path)]).scatter_filtering(client)
    for kind, q in _queries(st).items():
        ref_s, ref_i = flat.filter(kind, q, 20)
        got_s, got_i = ivf.filter(kind, q, 20, nprobe=nlist)
        np.testing.assert_allclose(got_s, ref_s, atol=1e-5)
        one_s, _ = ivf.filter(kind, q, 20, nprobe=1)  # fewer lists: never better than exact
        assert np.all(np.nan_to_num(one_s, neginf=-9) <= ref_s + 1e-5)


def test_build_shard_from_template_equals_its_own_training():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((600, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    quantiser = faiss.IndexFlatIP(16)
    template = faiss.IndexIVFFlat(quantiser, 16, 8, faiss.METRIC_INNER_PRODUCT)
    template.train(x)
    a = build_shard(x[:300], 0, kind="ivf", template=template, nprobe=8)
    b = build_shard(x[300:], 300, kind="ivf", template=template, nprobe=8)
    assert template.ntotal == 0 and a.ntotal == 300 and b.ntotal == 300
    q = x[:5]
    da, ia = a.search(q, 3)
    np.testing.assert_array_equal(ia[:, 0], np.arange(5))
    np.testing.assert_allclose(da[:, 0], 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="trained, empty"):
        build_shard(x[:10], 0, kind="ivf", template=a)


@pytest.mark.parametrize("index_type,nlist,pq_dim", [("pq", None, None), ("pq", 4, None), ("pq", None, 128),
                                                    ("flat16", None, None)])
def test_pq_and_flat16_indexes_through_the_workers(client, dev_store, tmp_path, index_type, nlist, pq_dim):
    """`rmac index --index-type pq [--nlist N] [--pq-dim d] | flat16`: shards on the workers, `k_factor` (and pq
    behind IVF lists: `nprobe`) reaching them, the exact top k found (pq: with enough candidates re-scored).
    Indexed again with the same pq parameters nothing is built; with others the pq index is built anew from
    the vectors already there."""
    from rmac.workflows.index import build_index, load_whitenings
    from rmac.workflows.ivf import PQ_K_FACTOR

    path = tmp_path / f"{index_type}-{nlist}-{pq_dim}-store"
    shutil.copytree(dev_store.path, path)
    st = Store(path)
    info = build_index(st, client, whitening=load_whitenings(st), whiten_label="dev distractors", shard_rows=16,
                       index_kind=index_type, progress=False, nlist=nlist, pq_dim=pq_dim)
    assert info["index_kind"] == index_type and info["shards"] >= 3
    if index_type == "pq":
        assert info["pq"]["rmac"]["factory"].startswith(
            "IDMap,IVF4,PQ" if nlist else "IDMap,PCA128,PQ64x4fs" if pq_dim else "IDMap,PQ")
        assert info["trained_with"] == {"nlist": nlist, "ivf_codec": "flat", "pq_m": None, "pq_dim": pq_dim}
        assert info["pq"]["rmac"].get("nprobe") == (round(4 * 3 / 8) if nlist else None)  # 3/8 of the lists
        assert info["pq"]["rmac"]["k_factor"] == PQ_K_FACTOR == 4  # stored in every shard
        assert "pq_train_s" in info["timings"]
    flat = Database([Store(dev_store.path)])
    approx = Database([Store(path)]).scatter_filtering(client)
    for kind, q in _queries(st).items():
        _, ref_i = flat.filter(kind, q, 20)
        _, got_i = approx.filter(kind, q, 20, nprobe=nlist, k_factor=8)
        found = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(got_i, ref_i)])
        assert found >= 0.95, (kind, found)
        _, one_i = approx.filter(kind, q, 20, nprobe=nlist, k_factor=1)  # (1 list of 4 may hold < 20)
        assert one_i.shape == (len(q), 20) and (one_i >= 0).all()
    if pq_dim:
        kw = dict(whitening=load_whitenings(st), whiten_label="dev distractors", shard_rows=16,
                  index_kind=index_type, progress=False)
        same = build_index(st, client, pq_dim=pq_dim, **kw)
        assert same["incremental"] and same["shards_built"] == 0
        other = build_index(st, client, pq_dim=None, **kw)  # other parameters: built anew, not extended
        assert not other["incremental"] and other["shards_built"] == other["shards"] >= 3
        assert other["partitions_indexed"] == 0  # the vectors are kept: only the shards depend on pq's parameters
        assert other["pq"]["rmac"]["factory"] == "IDMap,PQ640x4fs,Refine(SQ8)"


def test_an_index_beside_the_committed_one(client, dev_store, tmp_path):
    """`build_ivf` (what `rmac bench scale` compares): a trained pq template, shards added in parallel
    into ``index-pq/``, searched through the workers like the committed index, which stays as it was."""
    from rmac.workflows.filtering import ScatteredFilter
    from rmac.workflows.index import shard_ranges
    from rmac.workflows.ivf import TEMPLATE, build_ivf, train_pq_template

    path = tmp_path / "beside"
    shutil.copytree(dev_store.path, path)
    st = Store(path)
    committed = (path / "index" / "rmac" / "manifest.json").read_bytes()
    folder = path / "index-pq" / "rmac"
    meta = client.submit(train_pq_template, st, "rmac", 160, 0, str(folder), pure=False).result()
    assert meta["factory"] == "IDMap,PQ160x4fs,Refine(SQ8)"
    ranges = shard_ranges(st, 16)
    build_ivf(client, st, "rmac", str(folder / TEMPLATE), ranges, "index-pq", {"pq": meta}, index_type="pq")
    index = ShardedIndex(folder)
    assert len(index.shards) == len(ranges) >= 2 and index.ntotal == int(st.valid_rows().sum())
    assert (path / "index" / "rmac" / "manifest.json").read_bytes() == committed
    db = Database([Store(path)])
    db.scattered = ScatteredFilter(client, [path], [0], "index-pq")
    _, ref_i = Database([Store(dev_store.path)]).filter("rmac", _queries(st)["rmac"], 20)
    _, got_i = db.filter("rmac", _queries(st)["rmac"], 20, k_factor=8)
    assert np.mean([len(set(a) & set(b)) / 20 for a, b in zip(got_i, ref_i)]) >= 0.95


def test_index_cli_takes_the_index_type():
    import argparse

    from rmac.workflows.index import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["/tmp", "--pq"]).index_type == "pq"
    assert p.parse_args(["/tmp", "--ivf"]).index_type == "ivf"
    assert p.parse_args(["/tmp", "--index-type", "flat16"]).index_type == "flat16"
    assert p.parse_args(["/tmp"]).index_type == "flat"
    with pytest.raises(SystemExit):
        p.parse_args(["/tmp", "--pq", "--ivf"])


def _exit_soon() -> None:
    import os
    import threading

    threading.Timer(0.2, os._exit, (1,)).start()  # after `client.run` has its answer


def test_actor_searches_fall_back_to_tasks_when_a_worker_dies(dev_store):
    """Filtering calls each worker's `ShardHolder` actor directly; when a worker dies the call is
    answered by tasks on the workers there are (same rows), and the next call makes new actors."""
    from distributed import Client, LocalCluster

    from rmac.workflows.filtering import ScatteredFilter

    q = _queries(dev_store.store)["rmac"]
    ref_s, ref_i = Database([Store(dev_store.path)]).filter("rmac", q, 10)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        filt = ScatteredFilter(c, [dev_store.path], [0])
        s, i = filt.search("rmac", q, 10)
        np.testing.assert_allclose(s, ref_s, atol=1e-5)
        np.testing.assert_allclose(filt.search("rmac", q[:1], 10)[0], ref_s[:1], atol=1e-5)  # over the lines
        assert len(filt._holders) == 2 and len(filt._lines) == 2  # one actor, one line per worker holding shards
        gone = sorted(filt._holders)[0]
        c.run(_exit_soon, workers=[gone])
        for _ in range(300):  # the nanny restarts it under a new address
            workers = set(c.scheduler_info()["workers"])
            if gone not in workers and len(workers) == 2:
                break
            time.sleep(0.1)
        s, i = filt.search("rmac", q[:1], 10)  # a dead line, then dead actors: through tasks
        np.testing.assert_allclose(s, ref_s[:1], atol=1e-5)
        assert not filt._holders and not filt._lines and gone not in filt.workers
        s, i = filt.search("rmac", q, 10)  # new actors on the workers there are now
        np.testing.assert_allclose(s, ref_s, atol=1e-5)
        np.testing.assert_allclose(filt.search("rmac", q[:1], 10)[0], ref_s[:1], atol=1e-5)
        assert len(filt._lines) == 2
        assert set(filt._holders) <= set(c.scheduler_info()["workers"]) and filt._holders


def test_workers_without_plain_tcp_get_no_line(dev_store):
    """Workers whose comms are not plain ``tcp://`` (here in-process) offer no direct line: a single query
    goes through the actors, and the client asks each worker for a line only once."""
    from distributed import Client, LocalCluster

    from rmac.workflows.filtering import ScatteredFilter

    q = _queries(dev_store.store)["rmac"][:1]
    ref_s, ref_i = Database([Store(dev_store.path)]).filter("rmac", q, 10)
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as c:
        assert cluster.scheduler_address.startswith("inproc://")
        filt = ScatteredFilter(c, [dev_store.path], [0])
        for _ in range(2):
            s, i = filt.search("rmac", q, 10)
            np.testing.assert_allclose(s, ref_s, atol=1e-5)
        assert list(filt._lines.values()) == [None]
