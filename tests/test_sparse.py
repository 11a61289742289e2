"""The sparse map format (storage/maps.py) and the sparse kernels, against the dense reference:
the codec round-trips any map exactly, the sparse integral images equal the dense ones on the active
channels, and sparse re-ranking gives bit-identical results to the dense kernel it replaced."""

import json
import os
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numcodecs import Zstd

from rmac.ops import integral as I
from rmac.ops import rerank as R
from rmac.ops import whitening as wh
from rmac.storage import maps as M
from rmac.storage.store import Store, StoreConfig, StoreError


def _q_map(rng, K, h, w, zeros, silent=0.3, levels=31):
    q = rng.integers(1, levels + 1, (K, h, w))
    q[rng.random((K, h, w)) < zeros] = 0
    q[rng.random(K) < silent] = 0  # channels without any response
    return q.astype(np.uint8)


maps_strategy = st.tuples(
    st.integers(0, 2**32 - 1),  # seed
    st.integers(1, 40),  # K
    st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=6),  # (h, w); 0: failed
    st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]),  # zeros
)


def _make(seed, K, shapes, zeros):
    rng = np.random.default_rng(seed)
    return [None if h * w == 0 else _q_map(rng, K, h, w, zeros) for h, w in shapes]


@settings(max_examples=60, deadline=None)
@given(maps_strategy)
def test_codec_round_trip_and_decoded_form_equals_dense_conversion(args):
    maps = _make(*args)
    K = args[1]
    buf, attrs = M.encode_maps(maps, K)
    attrs = json.loads(json.dumps(attrs))  # what Zarr keeps
    sp = M.decode_partition(buf, attrs)
    ref = I.sparse_maps([m if m is not None else np.zeros((K, 0, 0), np.uint8) for m in maps])
    assert sp.channels == ref.channels == K
    for f in sp._fields[1:]:
        assert np.array_equal(getattr(sp, f), getattr(ref, f)), f
    for i, m in enumerate(maps):
        assert np.array_equal(sp.dense(i), m if m is not None else np.zeros((K, 0, 0), np.uint8))
        if m is not None:  # active channels: exactly those with a response, ascending
            chans = sp.chans[sp.chan_start[i]:sp.chan_start[i + 1]]
            assert chans.tolist() == np.flatnonzero(m.reshape(K, -1).any(axis=1)).tolist()
    sel = np.random.default_rng(args[0]).permutation(len(maps))[: max(1, len(maps) // 2)]
    some = M.decode_partition(buf, attrs, sel)  # a few maps alone, in the order asked
    assert some.n_maps == len(sel)
    for j, i in enumerate(sel):
        assert np.array_equal(some.dense(j), sp.dense(int(i)))
    # one zstd frame per image, each decompressing alone to its gaps and levels; empty for no non-zero
    assert attrs["encoding"] == M.FRAMES_ENCODING and len(attrs["frame_bytes"]) == len(maps)
    assert sum(attrs["frame_bytes"]) == attrs["length"] == len(buf)
    off = np.cumsum([0] + attrs["frame_bytes"])
    for i, m in enumerate(maps):
        frame = buf[off[i]:off[i + 1]].tobytes()
        if m is None or not m.any():
            assert frame == b""
        else:
            flat = m.reshape(-1)
            raw = np.frombuffer(Zstd().decode(frame), np.uint8)
            assert len(raw) == attrs["gap_bytes"][i] + attrs["nnz"][i]
            assert np.array_equal(raw[attrs["gap_bytes"][i]:], flat[flat > 0])
    # the layout before per-image frames decodes to the same maps, whole or selected
    jbuf, jattrs = M.encode_maps_joint(maps, K)
    jattrs = json.loads(json.dumps(jattrs))
    assert jattrs["encoding"] == M.JOINT_ENCODING and "frame_bytes" not in jattrs
    assert {k: v for k, v in jattrs.items() if k not in ("encoding", "length")} == \
        {k: v for k, v in attrs.items() if k not in ("encoding", "length", "frame_bytes")}
    old = M.decode_partition(jbuf, jattrs)
    for f in sp._fields[1:]:
        assert np.array_equal(getattr(old, f), getattr(sp, f)), f
    old_some = M.decode_partition(jbuf, jattrs, sel)
    for f in sp._fields[1:]:
        assert np.array_equal(getattr(old_some, f), getattr(some, f)), f


def _partition(seed=5, n=6, K=16):
    rng = np.random.default_rng(seed)
    maps = [_q_map(rng, K, *rng.integers(1, 9, 2), 0.8) for _ in range(n)]
    maps[2] = None  # failed
    maps[4] = np.zeros((K, 3, 2), np.uint8)  # a map without any response
    return maps, np.arange(2 * n).reshape(n, 2) * 10


def _dense(m, K=16):
    return np.zeros((K, 0, 0), np.uint8) if m is None else m


def test_frames_array_reads_only_the_selected_frames_and_zarr_sees_the_same_bytes(tmp_path):
    """The maps array holds per-image zstd frames with no Zarr compressor: Zarr reads the very bytes of
    the chunk file; `read_partition(select=)` reads and decompresses only the selected frames (a frame
    damaged elsewhere in the partition does not matter to it) and gives the rows of the full decode."""
    import zarr

    arrays = tmp_path / "arrays"
    maps, ihw = _partition()
    stored = M.write_partition_maps(arrays, 0, maps, ihw)
    path = M.partition_path(arrays, 0)
    meta = json.loads((path / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes"]  # no compressor: the frames are the compression
    attrs = meta["attributes"]
    assert attrs["encoding"] == M.FRAMES_ENCODING and attrs["length"] == stored == sum(attrs["frame_bytes"])
    assert attrs["frame_bytes"][2] == attrs["frame_bytes"][4] == 0 and min(attrs["frame_bytes"][:2]) > 0
    raw = M.chunk_file(arrays, 0).read_bytes()
    arr = zarr.open_array(path, mode="r")
    assert arr[:].tobytes() == raw and len(raw) == stored
    full = M.read_partition(arrays, 0)
    assert np.array_equal(M.decode_partition(arr[:], arr.attrs.asdict()).nz_level, full.maps.nz_level)
    for i, m in enumerate(maps):
        assert np.array_equal(full.maps.dense(i), _dense(m))
    sel = np.array([5, 2, 0, 4])
    some = M.read_partition(arrays, 0, sel)
    assert some.image_hw.tolist() == ihw[sel].tolist()
    for j, i in enumerate(sel):
        assert np.array_equal(some.maps.dense(j), full.maps.dense(i))
    # damage image 1's frame: the full read fails, a read of other images never touches it
    off = np.cumsum([0] + attrs["frame_bytes"])
    bad = bytearray(raw)
    bad[off[1] + 4:off[2]] = bytes(off[2] - off[1] - 4)
    M.chunk_file(arrays, 0).write_bytes(bytes(bad))
    with pytest.raises(M.CorruptMaps, match="image 1"):
        M.read_partition(arrays, 0)
    assert np.array_equal(M.read_partition(arrays, 0, [3, 0]).maps.dense(0), maps[3])
    with pytest.raises(M.CorruptMaps):
        M.read_partition(arrays, 0, [1])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300_000), st.integers(1, 19), st.booleans())  # numcodecs cannot decode an empty frame: never written
def test_frame_content_size_is_what_the_frame_decompresses_to(n, level, noise):
    data = np.random.default_rng(n).integers(0, 256 if noise else 3, n).astype(np.uint8).tobytes()
    frame = Zstd(level=level).encode(data)
    assert M._content_size(frame) == len(Zstd().decode(frame)) == n
    assert M._content_size(b"PK\x03\x04" + frame[4:]) is None and M._content_size(frame[:4]) is None


def test_frames_corrupt_or_truncated_raise_corrupt_maps(tmp_path):
    maps, ihw = _partition(6)
    buf, attrs = M.encode_maps(maps)
    fb = attrs["frame_bytes"]
    with pytest.raises(M.CorruptMaps):  # the buffer cut short
        M.decode_partition(buf[:-3], attrs)
    with pytest.raises(M.CorruptMaps):  # frame sizes that do not add up to the length
        M.decode_partition(buf, {**attrs, "frame_bytes": [fb[0] + 1] + fb[1:]})
    with pytest.raises(M.CorruptMaps):  # two frames swapped: each decompresses, to the other's size
        a, b = buf[:fb[0]], buf[fb[0]:fb[0] + fb[1]]
        M.decode_partition(np.concatenate([b, a, buf[fb[0] + fb[1]:]]), {**attrs, "frame_bytes": [fb[1], fb[0]] + fb[2:]})
    with pytest.raises(M.CorruptMaps):  # a frame where the attributes say an image has none
        M.decode_partition(buf, {**attrs, "gap_bytes": attrs["gap_bytes"][:4] + [1] + attrs["gap_bytes"][5:]})
    with pytest.raises(M.CorruptMaps):  # a frame count that is not the image count
        M.decode_partition(buf, {**attrs, "frame_bytes": fb[:-1]})
    arrays = tmp_path / "arrays"
    M.write_partition_maps(arrays, 0, maps, ihw)
    chunk = M.chunk_file(arrays, 0)
    chunk.write_bytes(chunk.read_bytes()[:-5])  # a truncated chunk file
    for sel in (None, [0], [5]):
        with pytest.raises(M.CorruptMaps, match="bytes where its metadata says"):
            M.read_partition(arrays, 0, sel)


def test_old_joint_arrays_still_read_and_unknown_encodings_are_refused(tmp_path):
    """An array in the layout before per-image frames (one zstd stream by Zarr) reads as it always did,
    whole or selected, through the store too; an encoding from a newer rmac is named, not misread."""
    arrays = tmp_path / "arrays"
    maps, ihw = _partition(7)
    M.write_partition_maps_joint(arrays, 0, maps, ihw)
    M.write_partition_maps(arrays, 1, maps, ihw)
    meta = json.loads((M.partition_path(arrays, 0) / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "zstd"]
    assert meta["attributes"]["encoding"] == M.JOINT_ENCODING
    old, new = M.read_partition(arrays, 0), M.read_partition(arrays, 1)
    for f in old.maps._fields[1:]:
        assert np.array_equal(getattr(old.maps, f), getattr(new.maps, f)), f
    sel = [5, 0, 3]
    for j, i in enumerate(sel):
        assert np.array_equal(M.read_partition(arrays, 0, sel).maps.dense(j), _dense(maps[i]))
    assert M.PartitionCache(1 << 20).get(arrays, 0).image_hw.tolist() == ihw.tolist()
    path = M.partition_path(arrays, 1) / "zarr.json"
    meta = json.loads(path.read_text())
    meta["attributes"]["encoding"] = "quantum frames v9"
    path.write_text(json.dumps(meta))
    with pytest.raises(M.UnknownEncoding, match="newer rmac"):
        M.read_partition(arrays, 1)
    with pytest.raises(M.UnknownEncoding, match="newer rmac"):
        M.decode_partition(np.zeros(3, np.uint8), meta["attributes"])


def test_store_reads_partitions_of_either_encoding(tmp_path):
    """A store whose partition 0 was written before per-image frames and partition 1 after: both read,
    verify and re-rank alike; an unknown encoding gives a StoreError naming it."""
    rng = np.random.default_rng(8)
    ids = [f"im{i}" for i in range(6)]
    store = Store.create(tmp_path / "s", ids, ids, _config())
    maps = [_q_map(rng, 8, *rng.integers(1, 7, 2), 0.8) for _ in range(6)]
    hw = np.array([m.shape[1:] for m in maps])
    recs = [{"id": i, "path": i, "status": "done", "reason": None} for i in ids]
    for p in (0, 1):
        sl = slice(3 * p, 3 * p + 3)
        store.write_partition(p, recs[sl], np.zeros((3, 8)), maps[sl], np.ones(3), hw[sl], hw[sl] * 32)
    M.write_partition_maps_joint(tmp_path / "s" / "arrays", 0, maps[:3], hw[:3] * 32, 8)
    store.write_record(0, recs[:3])  # as the old code recorded it
    assert store.partition_problems(0) == [] and store.partition_problems(1) == []
    for p in (0, 1):
        for j in range(3):
            assert np.array_equal(store.read_sparse(p).maps.dense(j), maps[3 * p + j])
            assert np.array_equal(store.read_sparse(p, select=[j]).maps.dense(0), maps[3 * p + j])
    with pytest.raises(ValueError, match="outside partition 1's 3 images"):  # the caller's mistake, not damage
        store.read_sparse(1, select=[1, 3])
    path = M.partition_path(tmp_path / "s" / "arrays", 1) / "zarr.json"
    meta = json.loads(path.read_text())
    meta["attributes"]["encoding"] = "quantum frames v9"
    path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="newer rmac"):
        store.read_sparse(1, select=[0])


def test_codec_long_gaps_and_corrupt_codes():
    rng = np.random.default_rng(1)
    m = np.zeros((2000, 30, 40), np.uint8)  # gaps up to ~2.4M cells: 4-byte varints
    m[0, 0, 0], m[1999, 29, 39], m[700, 3, 5] = 31, 1, 7
    m[1000] = _q_map(rng, 1, 30, 40, 0.2)[0]
    buf, attrs = M.encode_maps([m])
    assert np.array_equal(M.decode_partition(buf, attrs).dense(0), m)
    with pytest.raises(M.CorruptMaps):
        M.decode_partition(buf[:-1], {**attrs, "length": len(buf) - 1})
    bad = buf.copy()
    bad[0] = 0xFF  # a varint that runs into the next one: positions past the map
    with pytest.raises(M.CorruptMaps):
        M.decode_partition(bad, attrs)
    with pytest.raises(M.CorruptMaps):
        M.decode_partition(buf, {**attrs, "map_hw": [[30, 39]]})  # positions beyond the recorded size


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 24), st.integers(1, 9), st.integers(1, 9),
       st.sampled_from([0.0, 0.6, 0.95, 1.0]))
def test_sparse_integral_equals_dense_on_active_channels(seed, K, h, w, zeros):
    q = _q_map(np.random.default_rng(seed), K, h, w, zeros)
    dense = I.integral_lut(q).sums
    ii, chans = I.integral_lut_sparse(I.sparse_maps([q]), 0)
    assert ii.sums.dtype == np.int64 and ii.sums.shape == (h + 1, w + 1, len(chans))
    assert np.array_equal(ii.sums, dense[:, :, chans])
    silent = np.setdiff1d(np.arange(K), chans)
    assert not dense[:, :, silent].any()
    boxes = np.array([(x, y, bw, bh) for y in range(h) for x in range(w) for bh in (1, h - y) for bw in (1, w - x)])
    np.testing.assert_array_equal(I.region_vectors(ii, boxes), I.region_vectors(I.integral_lut(q), boxes)[:, chans])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.3, 0.8, 0.97]), st.booleans())
def test_sparse_rerank_is_bit_identical_to_the_dense_kernel(seed, zeros, use_rmac):
    rng = np.random.default_rng(seed)
    K = 16
    maps = [_q_map(rng, K, *rng.integers(1, 12, 2), zeros) for _ in range(7)]
    maps[3][:] = 0  # a map without any response
    q = rng.gamma(1.0, 1.0, K) + 0.01
    kw = {}
    if use_rmac:
        X = rng.gamma(1.0, 1.0, (300, K))
        w = wh.fit(wh.stats(X / np.linalg.norm(X, axis=1, keepdims=True)), dim=10)
        kw = {"q_rmac": rng.standard_normal(10), "whitening": w}
    ref = R.rerank_dense(maps, q, 1.3, t=2, s=1.5, n_threads=1, **kw)
    sp = I.sparse_maps(maps)

    def same(got, want, f):
        # the kernels' own outputs bit for bit; the whitened R-MAC goes through a BLAS matmul over a
        # block of maps, whose rounding OpenBLAS may vary with the block's row count (0.3.31's small-matrix
        # kernels): the last bit only
        if use_rmac and f in ("scores", "vectors"):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f)
        else:
            assert np.array_equal(got, want), f

    for res in (R.rerank(maps, q, 1.3, t=2, s=1.5, n_threads=2, **kw),
                R.rerank(sp, q, 1.3, t=2, s=1.5, n_threads=1, block=3, **kw)):
        for f in res._fields:
            same(getattr(res, f), getattr(ref, f), f)
    # a selection, and the same maps gathered from two "partitions" in another order
    sel = np.array([5, 0, 6, 2])
    a = R.rerank(sp, q, 1.3, select=sel, t=2, s=1.5, **kw)
    parts = [I.sparse_maps(maps[:4]), I.sparse_maps(maps[4:])]
    b = R.rerank(I.take_maps([(parts[1], [1]), (parts[0], [0]), (parts[1], [2]), (parts[0], [2])]), q, 1.3,
                 t=2, s=1.5, **kw)
    for f in a._fields:
        same(getattr(a, f), getattr(ref, f)[sel], f)
        same(getattr(b, f), getattr(ref, f)[sel], f)


def test_sparse_rerank_input_errors():
    sp = I.sparse_maps([np.ones((4, 3, 3), np.uint8), np.zeros((4, 0, 0), np.uint8)])
    with pytest.raises(ValueError, match="empty map"):
        R.rerank(sp, np.ones(4), 1.0)  # the failed (0 x 0) row
    with pytest.raises(ValueError, match="select"):
        R.rerank(sp, np.ones(4), 1.0, select=[2])
    with pytest.raises(ValueError, match="levels"):
        R.rerank(I.sparse_maps([np.full((4, 3, 3), 40, np.uint8)]), np.ones(4), 1.0)
    with pytest.raises(ValueError, match="channels"):
        R.rerank(sp, np.ones(5), 1.0, select=[0])


def test_partition_cache_is_bounded_and_never_stale(tmp_path):
    rng = np.random.default_rng(0)
    arrays = tmp_path / "arrays"
    parts = {p: [_q_map(rng, 8, 5, 6, 0.7) for _ in range(3)] for p in range(4)}
    for p, maps in parts.items():
        M.write_partition_maps(arrays, p, maps, np.full((3, 2), 100 + p))
    one = M.read_partition(arrays, 0).nbytes
    cache = M.PartitionCache(int(2.5 * one))
    for p in (0, 1, 0, 2, 3):
        got = cache.get(arrays, p)
        assert [got.maps.dense(i).tolist() for i in range(3)] == [m.tolist() for m in parts[p]]
        assert got.image_hw.tolist() == [[100 + p] * 2] * 3
    assert cache.hits == 1 and cache.misses == 4 and len(cache) == 2 and cache.nbytes <= 2.5 * one
    assert [cache.holds(arrays, p) for p in range(4)] == [False, False, True, True]
    new = [_q_map(rng, 8, 4, 4, 0.5) for _ in range(3)]
    M.write_partition_maps(arrays, 3, new, np.zeros((3, 2)))  # rewritten: the cached copy is not served
    assert not cache.holds(arrays, 3)
    assert np.array_equal(cache.get(arrays, 3).maps.dense(1), new[1])
    assert cache.holds(arrays, 3) and len(cache) == 2
    with pytest.raises(FileNotFoundError):
        cache.get(arrays, 9)


def _config(K=8, P=3):
    # a real backbone's name: re-ranking maps boxes to pixels with its geometry (the maps are synthetic)
    return StoreConfig(backbone="mobilenet-v2", channels=K, max_size=64, map_side=6, levels=31, partition_size=P)


def test_store_writes_sparse_reads_dense_and_refuses_format_1(tmp_path):
    rng = np.random.default_rng(2)
    ids = [f"im{i}" for i in range(5)]
    store = Store.create(tmp_path / "s", ids, ids, _config())
    maps = [_q_map(rng, 8, *rng.integers(1, 7, 2), 0.8) for _ in range(5)]
    maps[4] = None  # failed
    hw = np.array([m.shape[1:] if m is not None else (0, 0) for m in maps])
    recs = [{"id": i, "path": i, "status": "done" if m is not None else "failed", "reason": None}
            for i, m in zip(ids, maps)]
    padded = np.zeros((3, 8, 6, 6), np.uint8)  # partition 0 as a padded array, partition 1 as a list
    for i in range(3):
        padded[i, :, :hw[i, 0], :hw[i, 1]] = maps[i]
    ihw = hw * 32
    store.write_partition(0, recs[:3], np.zeros((3, 8)), padded, np.ones(3), hw[:3], ihw[:3])
    store.write_partition(1, recs[3:], np.zeros((2, 8)), maps[3:], np.full(2, 0.5), hw[3:], ihw[3:])
    got = store.read_maps([3, 0, 2])
    for (q, scale), r in zip(got, [3, 0, 2]):
        assert np.array_equal(q, maps[r]) and scale == (0.5 if r == 3 else 1.0)
    part = store.read_sparse(1)
    assert part.maps.map_hw.tolist() == [list(hw[3]), [0, 0]] and part.image_hw.tolist() == ihw[3:].tolist()
    with pytest.raises(ValueError):
        store.write_partition(1, recs[3:], np.zeros((2, 8)), maps[3:], np.ones(2), hw[:2], ihw[3:])  # wrong sizes
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(StoreError, match="re-extract"):
        Store(tmp_path / "s")


def test_rerank_rows_reads_partitions_once_and_matches_the_kernel_on_dense_maps(tmp_path, monkeypatch):
    """`rerank_rows` (a search task): rows from several partitions, in any order, through the worker
    cache or not, give the kernel's results on the dense maps, row for row; a second call hits the cache."""
    from rmac.ops.aml import box_to_pixels
    from rmac.ops.pooling import l2n
    from rmac.workflows import search as S

    rng = np.random.default_rng(3)
    K, P = 12, 4
    ids = [f"im{i}" for i in range(10)]
    store = Store.create(tmp_path / "s", ids, ids, _config(K, P))
    maps = [_q_map(rng, K, *rng.integers(2, 7, 2), 0.7) for _ in ids]
    hw = np.array([m.shape[1:] for m in maps])
    ihw = hw * 32 + 5
    for p in range(store.n_partitions):
        r = store.partition_rows(p)
        recs = [{"id": ids[i], "path": ids[i], "status": "done", "reason": None} for i in r]
        store.write_partition(p, recs, np.zeros((len(r), K)), maps[r.start:r.stop], np.ones(len(r)),
                              hw[r.start:r.stop], ihw[r.start:r.stop])
    X = rng.gamma(1.0, 1.0, (300, K))
    w = wh.fit(wh.stats(X / np.linalg.norm(X, axis=1, keepdims=True)), dim=8)
    q = l2n(rng.gamma(1.0, 1.0, K).astype(np.float32))
    qv = S.QueryVectors(mac=q, macw=l2n(wh.apply(w, q)), rmac=l2n(rng.standard_normal(8).astype(np.float32)),
                        aspect=1.2, image_hw=(100, 120), bbox=(0.0, 0.0, 120.0, 100.0))
    rows = [9, 0, 5, 1, 8, 4]
    for filt in ("rmac", "mac"):
        params = S.SearchParams(filter=filt)
        ref = R.rerank([maps[r] for r in rows], qv.mac, qv.aspect, q_rmac=qv.rmac if filt == "rmac" else None,
                       whitening=w if filt == "rmac" else None)
        S.worker_map_cache().clear()
        for cache in (True, True, False):
            (got,) = S.rerank_rows(store, [(qv, rows)], w, params, cache=cache)
            assert got["rows"] == rows
            for i, r in enumerate(rows):
                assert got["boxes"][i] == box_to_pixels(ref.boxes[i], hw[r], ihw[r], S.cell_geometry(store, ihw[r]))
            if filt == "rmac":  # one whitening matmul over the rows in partition order: float32 rounding
                np.testing.assert_allclose(got["scores"], ref.scores, rtol=0, atol=1e-6)
                np.testing.assert_allclose(got["vectors"], ref.vectors, rtol=0, atol=1e-6)
            else:
                np.testing.assert_allclose(got["vectors"], l2n(wh.apply(w, ref.vectors)), rtol=0, atol=1e-6)
        c = S.worker_map_cache()
        assert c.misses == 3 and c.hits == 3  # three partitions, read once, then served from the cache

    # one map per partition (a short-list spread over a large store): only those maps are decoded, and
    # nothing is cached; the results are the kernel's all the same
    S.worker_map_cache().clear()
    few = [9, 0, 5]
    decoded = []
    read_many = M.read_many
    monkeypatch.setattr(M, "read_many", lambda *a: decoded.append(read_many(*a)) or decoded[-1])
    (got,) = S.rerank_rows(store, [(qv, few)], w, S.SearchParams(filter="rmac"), cache=True)
    assert len(decoded) == 1 and len(decoded[0].image_hw) == 3  # the three partitions' maps decoded together
    ref = R.rerank([maps[r] for r in few], qv.mac, qv.aspect, q_rmac=qv.rmac, whitening=w)
    np.testing.assert_allclose(got["scores"], ref.scores, rtol=0, atol=1e-6)
    assert got["boxes"] == [box_to_pixels(ref.boxes[i], hw[r], ihw[r], S.cell_geometry(store, ihw[r]))
                            for i, r in enumerate(few)]
    assert len(S.worker_map_cache()) == 0 and S.worker_map_cache().misses == 0


def test_partition_metadata_is_parsed_once_per_file_version(tmp_path):
    """`partition_meta` keeps a partition's parsed metadata while its ``zarr.json`` is the same file, so
    repeated reads skip the JSON; a partition written again is read afresh, and a file changed in the last
    `RACY_NS` is never kept (a rewrite in the same clock tick could look the same)."""
    arrays = tmp_path / "arrays"
    maps, ihw = _partition()
    M.write_partition_maps(arrays, 0, maps, ihw)
    meta_file = M.partition_path(arrays, 0) / "zarr.json"
    M._parsed_meta.cache_clear()
    first = M.read_partition(arrays, 0, [1])
    assert M._parsed_meta.cache_info().currsize == 0  # just written: parsed, not kept
    old = time.time_ns() - 10 * M.RACY_NS
    os.utime(meta_file, ns=(old, old))
    for _ in range(3):
        again = M.read_partition(arrays, 0, [1])
        assert np.array_equal(again.maps.dense(0), first.maps.dense(0))
    info = M._parsed_meta.cache_info()
    assert info.currsize == 1 and info.hits == 2 and info.misses == 1
    with pytest.raises(ValueError):  # what the cache holds is read-only: no reader can alter it for the next
        M.partition_meta(arrays, 0).index[0][0, 0] = 9
    # written again with other maps (and made to look old): the new maps, not the cached metadata
    M.write_partition_maps(arrays, 0, maps[::-1], ihw[::-1])
    os.utime(meta_file, ns=(old + 1, old + 1))
    n = len(maps)
    got = M.read_partition(arrays, 0)
    for i in range(n):
        assert np.array_equal(got.maps.dense(i), _dense(maps[n - 1 - i]))
    assert got.image_hw.tolist() == ihw[::-1].tolist()


def test_prefetch_asks_for_the_metadata_and_only_the_selected_frames(tmp_path, monkeypatch):
    """`prefetch` hints every wanted partition's ``zarr.json`` and then exactly the selected frames'
    byte ranges (the whole chunk when all are wanted); a missing partition or an offset out of range is
    left to the read that follows, and the reads return the same maps."""
    arrays = tmp_path / "arrays"
    maps, ihw = _partition()
    M.write_partition_maps(arrays, 0, maps, ihw)
    advised = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, a, n, how: (advised.append(
        (os.readlink(f"/proc/self/fd/{fd}"), a, n, how)), real(fd, a, n, how))[1])
    off = M.partition_meta(arrays, 0).offsets
    M.prefetch(arrays, {0: np.array([1, 99]), 7: None})
    meta, chunk = str(M.partition_path(arrays, 0) / "zarr.json"), str(M.chunk_file(arrays, 0))
    assert advised == [(meta, 0, 0, os.POSIX_FADV_WILLNEED),
                       (chunk, int(off[1]), int(off[2] - off[1]), os.POSIX_FADV_WILLNEED)]
    advised.clear()
    M.prefetch(arrays, {0: None})
    assert advised == [(meta, 0, 0, os.POSIX_FADV_WILLNEED), (chunk, 0, 0, os.POSIX_FADV_WILLNEED)]
    assert np.array_equal(M.read_partition(arrays, 0, [1]).maps.dense(0), _dense(maps[1]))
    old = time.time_ns() - 10 * M.RACY_NS  # metadata held (`partition_meta` keeps it): only the frames are hinted
    os.utime(M.partition_path(arrays, 0) / "zarr.json", ns=(old, old))
    M.partition_meta(arrays, 0)
    advised.clear()
    M.prefetch(arrays, {0: np.array([1])})
    assert advised == [(chunk, int(off[1]), int(off[2] - off[1]), os.POSIX_FADV_WILLNEED)]
    M.clear_meta_cache()  # forgotten: hinted again
    advised.clear()
    M.prefetch(arrays, {0: np.array([1])})
    assert advised[0] == (meta, 0, 0, os.POSIX_FADV_WILLNEED)


def test_hold_meta_keeps_the_partitions_that_have_maps(tmp_path):
    """`hold_meta` parses and keeps each listed partition's metadata (a partition without maps is
    skipped), so the reads that follow parse nothing."""
    arrays = tmp_path / "arrays"
    maps, ihw = _partition()
    for p in (0, 2):
        M.write_partition_maps(arrays, p, maps, ihw)
        old = time.time_ns() - 10 * M.RACY_NS
        os.utime(M.partition_path(arrays, p) / "zarr.json", ns=(old, old))
    M.clear_meta_cache()
    assert M.hold_meta(arrays, [0, 1, 2], batch=2) == 2
    assert M._parsed_meta.cache_info().currsize == 2
    M.read_partition(arrays, 2, [0])
    assert M._parsed_meta.cache_info().misses == 2  # the read found it held


def test_maps_of_many_partitions_decode_together_as_one_by_one(tmp_path):
    """`maps.read_many` / `Store.read_sparse_many`: maps of several partitions (any offsets, any order, a
    failed image among them) decoded together equal those read partition by partition; a store with a
    partition of the old layout is read one by one; a truncated chunk is a StoreError naming its partition."""
    rng = np.random.default_rng(9)
    ids = [f"im{i}" for i in range(9)]
    store = Store.create(tmp_path / "s", ids, ids, _config())
    maps = [_q_map(rng, 8, *rng.integers(1, 7, 2), 0.8) for _ in ids]
    maps[4] = None  # failed
    hw = np.array([m.shape[1:] if m is not None else (0, 0) for m in maps])
    recs = [{"id": i, "path": i, "status": "done" if m is not None else "failed", "reason": None}
            for i, m in zip(ids, maps)]
    for p in range(3):
        sl = slice(3 * p, 3 * p + 3)
        store.write_partition(p, recs[sl], np.zeros((3, 8)), maps[sl], np.ones(3), hw[sl], hw[sl] * 32 + 1)
    wanted = {2: np.array([2, 0]), 0: np.array([1]), 1: np.array([0, 1, 2])}
    rows = [3 * p + int(o) for p, sel in wanted.items() for o in sel]
    arrays = tmp_path / "s" / "arrays"
    for got in (M.read_many(arrays, wanted), store.read_sparse_many(wanted)):
        assert got.image_hw.tolist() == (hw[rows] * 32 + 1).tolist()
        for j, r in enumerate(rows):
            want = maps[r] if maps[r] is not None else np.zeros((8, 0, 0), np.uint8)
            assert np.array_equal(got.maps.dense(j), want), r
    M.write_partition_maps_joint(arrays, 0, maps[:3], hw[:3] * 32 + 1, 8)  # as before per-image frames
    assert M.read_many(arrays, wanted) is None
    got = store.read_sparse_many(wanted)
    assert all(np.array_equal(got.maps.dense(j), maps[r]) for j, r in enumerate(rows) if maps[r] is not None)
    chunk = M.chunk_file(arrays, 2)
    chunk.write_bytes(chunk.read_bytes()[:-5])
    with pytest.raises(StoreError, match="maps of partition 2 unreadable"):
        store.read_sparse_many(wanted)
