"""The re-ranking read path before issue 9, kept only as `rmac bench search`'s baseline (not used by
search): the maps stored dense and padded (`(N, K, S, S)` uint8, one Zarr shard per partition, one inner
chunk per image, bit-shuffled zstd: store format 1's ``maps`` array), read as a contiguous slice per
partition, one Dask task per partition, and re-ranked by the dense LUT kernel (`rerank_dense`)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from rmac.ops import whitening as wh
from rmac.ops.aml import box_to_pixels
from rmac.ops.pooling import l2n
from rmac.ops.rerank import rerank_dense

MAPS_CODEC_V1 = BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle)


def write_dense(store, path: Path) -> Path:
    """Store format 1's padded ``maps`` array of every row of ``store`` at ``path`` (a Zarr array)."""
    cfg = store.config
    P, K, S = cfg.partition_size, cfg.channels, cfg.map_side
    arr = zarr.create_array(str(path), shape=(max(store.n_images, 1), K, S, S), chunks=(1, K, S, S),
                            shards=(P, K, S, S), dtype="uint8", fill_value=0, compressors=MAPS_CODEC_V1)
    for p in range(store.n_partitions):
        rows = store.partition_rows(p)
        part = store.read_sparse(p).maps
        padded = np.zeros((len(rows), K, S, S), np.uint8)
        for i in range(len(rows)):
            h, w = (int(v) for v in part.map_hw[i])
            padded[i, :, :h, :w] = part.dense(i)
        arr[rows.start:rows.stop] = padded
    return path


def dense_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def read_padded(store, dense_path: Path, rows: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Format 1's `Store.read_padded`: the contiguous span of ``rows`` (one partition) and their sizes."""
    g = store.arrays
    maps = zarr.open_array(str(dense_path), mode="r")
    sel = np.asarray(rows, dtype=np.int64)
    lo, hi = int(sel.min()), int(sel.max()) + 1
    pick = sel - lo
    return maps[lo:hi][pick], g["map_hw"][lo:hi][pick], g["image_hw"][lo:hi][pick]


def rerank_rows(store, dense_path: Path, jobs, whitening, params) -> list[dict]:
    """Format 1's `rerank_rows` (one partition's rows per task); ``whitening``: the (regional, mac) pair
    or one whitening, and boxes mapped with the backbone's geometry, as the product path does."""
    from rmac.workflows.search import _pair, cell_geometry

    w_regional, w_mac = _pair(whitening)
    span = sorted({r for _, rows in jobs for r in rows})
    maps, map_hw, image_hw = read_padded(store, dense_path, span)
    at = {r: i for i, r in enumerate(span)}
    use_rmac = params.filter == "rmac"
    out = []
    for qv, rows in jobs:
        pick = [at[r] for r in rows]
        res = rerank_dense(maps[pick], qv.mac, qv.aspect, map_hw=map_hw[pick],
                           q_rmac=qv.rmac if use_rmac else None, whitening=w_regional if use_rmac else None,
                           L=params.L, levels=store.config.levels, t=params.t, s=params.s)
        boxes = [box_to_pixels(b, hw, ihw, cell_geometry(store, ihw))
                 for b, hw, ihw in zip(res.boxes, map_hw[pick], image_hw[pick])]
        scores, vectors = res.scores, res.vectors
        if not use_rmac:
            vectors = l2n(wh.apply(w_mac, vectors))
            scores = vectors @ qv.macw
        out.append({"rows": rows, "scores": scores, "boxes": boxes, "vectors": vectors})
    return out


def rerank(db, client, qv, rows, params, whitening_future, dense_paths: list[Path]) -> dict:
    """Format 1's scatter: one task per (store, partition); {row: (score, box, vector)}."""
    groups: dict[tuple[int, int], tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for g in np.asarray(rows).tolist():
        si, r = db.position(g)
        gs, rs = groups[(si, db.stores[si].partition_of(r))]
        gs.append(g)
        rs.append(r)
    futures = {key: client.submit(rerank_rows, db.stores[key[0]], dense_paths[key[0]], [(qv, rs)],
                                  whitening_future, params, pure=False)
               for key, (gs, rs) in groups.items()}
    out = {}
    for key, fut in futures.items():
        res, = fut.result()
        for g, score, box, vec in zip(groups[key][0], res["scores"], res["boxes"], res["vectors"]):
            out[g] = (float(score), tuple(float(v) for v in box), vec)
    return out
