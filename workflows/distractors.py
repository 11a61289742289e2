"""`rmac distractors`: N synthetic distractor images made from the real activation maps of a store.

No CNN runs: each distractor is a crop / flip / rescale of a real stored map, half of them a collage
with a crop of a second real map (the recipe and why: `rmac.ops.distractors`). The output is a store
in exactly the layout `rmac extract` writes (MAC, quantised maps, scale, map and image sizes, record
files), so `rmac index`, filtering and AML re-ranking treat a distractor like an extracted photo.

One Dask task per output partition. Task ``p`` seeds its own generator with ``(seed, p)``, picks a
pool of real maps (two blocks of ``P`` consecutive source rows, so it reads two contiguous slices of
the source store, never the whole store), draws its ``P`` recipes from that pool, renders, quantises
with the store's levels and writes its partition, then its record file (the done marker). The same
seed, count, source (and its selected rows) and partition size give the same bytes, in any order, on
any number of workers; an interrupted run resumes where it stopped.

The source should hold *distractor* photos (no landmark of the evaluation): `--source-ids` selects
its rows by id pattern, e.g. ``'distractor_*'`` on the embedded dev set.
"""
from __future__ import annotations

import argparse
import fnmatch
import time
from pathlib import Path

import numpy as np
from dask.base import tokenize

from rmac.ops.distractors import draw_recipe, render
from rmac.ops.pooling import mac
from rmac.ops.quantise import dequantise, quantise
from rmac.storage.store import Store, StoreConfig, StoreError

RECIPE_VERSION = 1
DEFAULT_SEED = 0
ID_FORMAT = "synthetic/{:08d}"


def source_rows(src: Store, pattern: str = "*") -> np.ndarray:
    """Rows of ``src`` extracted successfully whose id matches ``pattern`` (fnmatch), in row order."""
    ok = src.valid_rows()
    rows = np.array([r for r, i in enumerate(src.ids) if ok[r] and fnmatch.fnmatchcase(i, pattern)],
                    dtype=np.int64)
    if len(rows) == 0:
        example = next((i for r, i in enumerate(src.ids) if ok[r]), None)
        hint = f" (its ids look like {example!r})" if example is not None else ""
        raise StoreError(f"{src.path}: no extracted image matches --source-ids {pattern!r}{hint}")
    return rows


def synthetic_path(src: Store, seed: int, row: int) -> str:
    """The (imageless) path recorded for distractor ``row``."""
    return f"synthetic:{src.path.name}:seed={seed}:{row}"


def pool_blocks(rows: np.ndarray, block: int) -> list[np.ndarray]:
    """``rows`` cut into consecutive blocks of ``block`` rows (the last may be shorter)."""
    return [rows[i:i + block] for i in range(0, len(rows), block)]


def synthesise_partition(src: Store, out: Store, p: int, rows: np.ndarray, seed: int,
                         blocks_per_pool: int = 2) -> dict:
    """Synthesise and write partition ``p`` of ``out`` from the source ``rows`` of ``src``. Idempotent."""
    if p in out.done_partitions():
        return {"partition": p, "skipped": True}
    cfg = out.config
    rng = np.random.default_rng([seed, p])
    blocks = pool_blocks(rows, cfg.partition_size)
    picked = sorted(set(rng.choice(len(blocks), size=min(blocks_per_pool, len(blocks)), replace=False).tolist()))
    pool_rows = np.concatenate([blocks[b] for b in picked]).tolist()
    stored = src.read_maps(pool_rows)
    pool = [dequantise(q, s) for q, s in stored]
    src_image_hw = src.arrays["image_hw"]
    stride = [np.asarray(src_image_hw[r], np.float64) / np.asarray(q.shape[1:], np.float64)
              for r, (q, _) in zip(pool_rows, stored)]
    shapes = [m.shape[1:] for m in pool]

    part = out.partition_rows(p)
    n, K, S = len(part), cfg.channels, cfg.map_side
    macs = np.zeros((n, K), np.float32)
    maps = np.zeros((n, K, S, S), np.uint8)
    scale = np.zeros(n, np.float32)
    map_hw = np.zeros((n, 2), np.int32)
    image_hw = np.zeros((n, 2), np.int32)
    records = []
    for i, row in enumerate(part):
        recipe = draw_recipe(rng, shapes, S)
        x = render(recipe, pool)
        h, w = x.shape[1:]
        macs[i] = mac(x)
        maps[i, :, :h, :w], scale[i] = quantise(x, levels=cfg.levels)
        map_hw[i] = (h, w)
        # the pixel size a photo with this map would have: the base photo's pixels per cell
        image_hw[i] = np.maximum(1, np.rint(np.array([h, w]) * stride[recipe.base.index])).astype(np.int32)
        desc = recipe.describe()
        for piece in ("base", "partner"):
            if piece in desc:
                desc[piece]["source"] = src.ids[pool_rows[desc[piece].pop("index")]]
        # the id and path of a row follow from its number (reading ids.json per task costs O(N))
        records.append({"id": ID_FORMAT.format(row), "path": synthetic_path(src, seed, row),
                        "status": "done", "reason": None,
                        "image_hw": image_hw[i].tolist(), "map_hw": [h, w], "recipe": desc})
    out.write_partition(p, records, macs, maps, scale, map_hw, image_hw)
    return {"partition": p, "skipped": False}


def distractor_spec(src: Store, count: int, seed: int, pattern: str, rows: np.ndarray) -> dict:
    """What a distractor store was made from (kept in its manifest; a resume must match it)."""
    return {"source": str(src.path.resolve()), "source_ids": pattern, "source_rows": int(len(rows)),
            "source_images": src.n_images, "count": int(count), "seed": int(seed),
            "recipe_version": RECIPE_VERSION}


def make_distractors(src_path: str, out_path: str, count: int, client, seed: int = DEFAULT_SEED,
                     pattern: str = "*", partition_size: int | None = None, progress: bool = True) -> dict:
    """Create (or resume) the distractor store ``out_path`` of ``count`` images; returns a summary."""
    from rmac.workflows.progress import wait_all

    if count < 1:
        raise StoreError(f"--count must be >= 1, got {count}")
    src = Store(src_path)
    src.require_complete()
    rows = source_rows(src, pattern)
    c = src.config
    config = StoreConfig(backbone=c.backbone, channels=c.channels, max_size=c.max_size, map_side=c.map_side,
                         levels=c.levels, partition_size=partition_size or c.partition_size, weights=c.weights)
    spec = distractor_spec(src, count, seed, pattern, rows)
    ids = [ID_FORMAT.format(i) for i in range(count)]
    if (Path(out_path) / "manifest.json").exists():
        out = Store(out_path)
        if out.manifest.get("distractors") != spec or out.config != config:
            raise StoreError(f"{out_path} holds other distractors ({out.manifest.get('distractors')}): "
                             "use another --out")
    else:
        paths = [synthetic_path(src, seed, i) for i in range(count)]
        out = Store.create(out_path, ids, paths, config)
        out.update_manifest(distractors=spec)
    t0 = time.perf_counter()
    pending = out.pending_partitions()
    tag = tokenize(str(out.path.resolve()))
    rows_f = client.scatter(rows, broadcast=True, hash=False)
    futures = [client.submit(synthesise_partition, src, out, p, rows_f, seed, key=f"distract-{tag}-{p}",
                             retries=2, pure=False) for p in pending]
    wait_all(futures, "distractors", progress)
    seconds = time.perf_counter() - t0
    return {"store": str(out.path), "images": out.n_images, "partitions_run": len(pending),
            "seconds": round(seconds, 2), "source_rows": int(len(rows)),
            "map_bytes_per_image": round(out.map_bytes() / out.n_images)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rmac.workflows.args import existing_dir, new_or_existing_dir, nonnegative_int, positive_int

    parser.add_argument("--count", type=positive_int, required=True, help="how many distractors to make")
    parser.add_argument("--from", dest="source", type=existing_dir, required=True,
                        help="an extracted store of real images")
    parser.add_argument("--out", type=new_or_existing_dir, required=True,
                        help="the distractor store to create (or resume)")
    parser.add_argument("--seed", type=nonnegative_int, default=DEFAULT_SEED, help="default %(default)s")
    parser.add_argument("--source-ids", default="*",
                        help="fnmatch pattern of the source ids to draw from, e.g. 'distractor_*' (default all)")
    parser.add_argument("--partition-size", type=positive_int,
                        help="images per task / shard (default: the source's)")


def main(args: argparse.Namespace, client) -> int:
    s = make_distractors(args.source, args.out, args.count, client, args.seed, args.source_ids,
                         args.partition_size)
    print(f"made {s['images']} distractors in {s['store']} from {s['source_rows']} real maps "
          f"({s['partitions_run']} partitions in {s['seconds']} s; {s['map_bytes_per_image']} map bytes per image)")
    return 0
