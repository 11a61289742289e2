"""`rmac extract`: images → MAC + quantised activation maps in a Zarr store, one Dask task per partition.

Each task loads the model once per worker process (cached), extracts its partition, writes its own rows
of every array and finally its record file, which marks the partition done. Re-running skips finished
partitions, so a crash, a Ctrl-C or a killed worker costs at most the partitions in flight; Dask
re-runs the tasks of a lost worker on the others.
"""
from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from dask.base import tokenize

from rmac.ops.pooling import mac
from rmac.ops.quantise import quantise
from rmac.storage.images import MIN_SIDE, BadImage, list_images, load_image
from rmac.storage.ids import dedupe, file_identity, source_stat
from rmac.storage.lock import StoreLock
from rmac.storage.store import Store, StoreConfig, StoreError
from rmac.workflows.args import existing_file, existing_path, int_range, new_or_existing_dir, positive_int
from rmac.workflows.text import printable

DEFAULT_BACKBONE = "efficientnet-lite0"
DEFAULT_MAX_SIZE = 1024
DEFAULT_PARTITION = 16
DEFAULT_LEVELS = 31


@dataclass(frozen=True)
class ModelChoice:
    """Which network a worker should load (hashable: the worker-side cache key)."""

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    random_weights: bool = False


@functools.lru_cache(maxsize=2)
def worker_model(choice: ModelChoice):
    """The model of ``choice``, loaded once per worker process and kept."""
    from rmac.storage.weights import load_backbone

    return load_backbone(choice.backbone, weights=choice.weights, random_weights=choice.random_weights)


def image_features(model, spec, image, max_size: int) -> np.ndarray:
    """The (K, h, w) float32 activation maps of a PIL image."""
    from rmac.ops.backbones import activations

    return activations(model, spec, image, max_size=max_size)


def extract_partition(store: Store, p: int, choice: ModelChoice, device: str = "cpu") -> dict:
    """Extract partition ``p`` of ``store`` and write it; returns its counts. Idempotent. ``device``:
    auto, cpu or cuda (see `rmac.workflows.device`)."""
    from rmac.workflows.device import iter_features, model_on, worker_device

    if p in store.done_partitions():
        return {"partition": p, "done": 0, "failed": 0, "skipped": len(store.partition_rows(p))}
    device = worker_device(device)
    model, spec = model_on(choice, device)
    cfg = store.config
    rows = store.partition_rows(p)
    ids, paths = store.partition_ids(p)  # this partition's ids only: not the whole table
    n, K, S = len(rows), cfg.channels, cfg.map_side
    macs = np.zeros((n, K), np.float32)
    maps: list[np.ndarray | None] = [None] * n  # quantised (K, h, w) per image; stored sparse
    scale = np.zeros(n, np.float32)
    map_hw = np.zeros((n, 2), np.int32)
    image_hw = np.zeros((n, 2), np.int32)
    records = []
    keep = _reusable(store, p, paths)  # a partition redone for some of its images keeps the others
    if keep:
        g, sl = store.arrays, slice(rows.start, rows.stop)
        old = [g[k][sl] for k in ("mac", "scale", "map_hw", "image_hw")]
        old_maps = store.read_sparse(p).maps
    features = iter_features(model, spec, [paths[i] for i in range(n) if i not in keep], cfg.max_size, device)
    for i, row in enumerate(rows):
        if i in keep:
            for dst, src in zip((macs, scale, map_hw, image_hw), old):
                dst[i] = src[i]
            maps[i] = old_maps.dense(i)
            records.append(keep[i])
            continue
        source = source_stat(paths[i])  # recorded: a later run sees a changed or reappeared file
        rec = {"id": ids[i], "path": paths[i], "status": "done", "reason": None, "source": source}
        try:
            image, x, error = next(features)
            if error is not None:
                raise error
        except BadImage as e:
            rec.update(status="failed", reason=f"{e.reason}: {e.detail}")
            records.append(rec)
            continue
        except ValueError as e:  # e.g. a panorama too thin for the network once resized
            rec.update(status="failed", reason=f"unusable: {e}")
            records.append(rec)
            continue
        h, w = x.shape[1:]
        if h > S or w > S:  # a backbone/geometry bug, not bad input: fail loudly
            raise RuntimeError(f"{rec['id']}: map {h}x{w} exceeds the store's {S}x{S}")
        macs[i] = mac(x)
        maps[i], scale[i] = quantise(x, levels=cfg.levels)
        map_hw[i] = (h, w)
        image_hw[i] = (image.height, image.width)
        rec.update(image_hw=[image.height, image.width], map_hw=[h, w])
        records.append(rec)
    store.write_partition(p, records, macs, maps, scale, map_hw, image_hw)
    store.clear_redo(p)
    done = sum(r["status"] == "done" for r in records)
    return {"partition": p, "done": done, "failed": n - done, "skipped": 0}


def _reusable(store: Store, p: int, paths: list[str]) -> dict[int, dict]:
    """Rows of partition ``p`` that a redo keeps as stored (offset -> old record): extracted before,
    and their source unchanged or gone (a removed file is reported, its features kept)."""
    old = store.redo_records(p)
    if old is None:
        return {}
    keep = {}
    for i, (rec, path) in enumerate(zip(old, paths)):
        if rec.get("status") == "done" and rec.get("path") == path:
            now = source_stat(path)
            if now is None or now == rec.get("source"):
                keep[i] = rec
    return keep


def store_config(choice: ModelChoice, max_size: int, partition_size: int, levels: int) -> StoreConfig:
    from rmac.ops.backbones import BACKBONES, max_map_side
    from rmac.ops.integral import max_exact_cells

    if choice.backbone not in BACKBONES:
        raise SystemExit(f"unknown backbone {choice.backbone!r}; choose one of {', '.join(BACKBONES)}")
    spec = BACKBONES[choice.backbone]
    side = max_map_side(spec, max_size)
    if max_exact_cells(levels) < side * side:  # re-ranking's int64 integral images would overflow
        from rmac.workflows.errors import UsageError
        raise UsageError(f"--levels {levels} at --max-size {max_size} ({side}x{side} cells with {choice.backbone}) "
                         f"is beyond what re-ranking sums exactly: use fewer levels or a smaller --max-size")
    weights = "random" if choice.random_weights else (Path(choice.weights).name if choice.weights else "pretrained")
    return StoreConfig(backbone=choice.backbone, channels=spec.channels, max_size=max_size,
                       map_side=side, levels=levels, partition_size=partition_size,
                       weights=weights)


def _config_task(choice: ModelChoice, max_size: int, partition_size: int, levels: int,
                 device: str) -> StoreConfig | str:
    from rmac.workflows.device import worker_device
    from rmac.workflows.errors import UsageError

    try:
        worker_device(device)
        return store_config(choice, max_size, partition_size, levels)
    except (SystemExit, RuntimeError, UsageError) as e:  # one line for the user; never SystemExit in a worker
        return str(e.code if isinstance(e, SystemExit) else e)


def _warm_up(choice: ModelChoice, device: str) -> None:
    from rmac.workflows.device import model_on, worker_device

    try:
        model_on(choice, worker_device(device))
    except Exception:  # the partition tasks report it properly
        pass


def start_workers(client, choice: ModelChoice, max_size: int, partition_size: int,
                  levels: int, device: str = "cpu") -> tuple[StoreConfig, list]:
    """The store configuration, computed on a worker, and warm-up futures loading the model on every worker.

    Start-up: the configuration needs the backbone table, i.e. torch, which the client itself never needs;
    a worker imports it anyway. Each worker then loads its model while the client lists and opens the
    store, instead of in its first partition. Keep the futures until the partitions are submitted."""
    cfg = client.submit(_config_task, choice, max_size, partition_size, levels, device, pure=False, priority=10)
    workers = list(client.scheduler_info()["workers"])
    warm = [client.submit(_warm_up, choice, device, workers=[w], allow_other_workers=False, pure=False, priority=5)
            for w in workers]
    got = cfg.result()
    if isinstance(got, str):
        from rmac.workflows.errors import UsageError

        raise UsageError(got)
    return got, warm


def extract(source: str | list[tuple[str, str]], store_path: str, client, choice: ModelChoice = ModelChoice(),
            max_size: int = DEFAULT_MAX_SIZE, partition_size: int = DEFAULT_PARTITION,
            levels: int = DEFAULT_LEVELS, progress: bool = True, wait: bool = False,
            device: str = "auto") -> dict:
    """Extract every image of ``source`` (a folder, a list file, or (id, path) pairs) into the store at
    ``store_path``: creates it, resumes a partial one, or grows it with the images it does not hold
    (see `plan_growth`). Holds the store's lock throughout (``wait``: wait for another holder).
    ``device``: auto, cpu or cuda."""
    items = list_images(source) if isinstance(source, (str, Path)) else list(source)
    if not items:
        raise SystemExit(f"rmac extract: no images found in {source}")
    t0 = time.perf_counter()
    config, _warm = start_workers(client, choice, max_size, partition_size, levels, device)
    empty = Store.create_empty(store_path, config)
    with StoreLock(empty.path, "extract", wait=wait) as lock:
        store = Store(empty.path)
        plan = plan_growth(store, items)
        store.forget_partitions(plan["redo"])
        if plan["new"]:
            store.append(*zip(*plan["new"]))
            store = Store(store.path)
        summary = run_partitions(store, client, choice, progress=progress, device=device)
        summary.update(added=len(plan["new"]), duplicates=plan["duplicates"], removed=plan["removed"],
                       changed=plan["changed"], retried=plan["retried"],
                       took_over_lock=lock.took_over, seconds_total=round(time.perf_counter() - t0, 2))
        store.log_run({"command": "extract", "version": _version(), "added": len(plan["new"]),
                       "partitions_run": summary["partitions_run"], "done": summary["done"],
                       "failed": summary["failed"], "changed": len(plan["changed"]),
                       "removed": len(plan["removed"]), "duplicates": len(plan["duplicates"]),
                       "seconds": summary["seconds_total"]})
    return summary


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rmac")
    except PackageNotFoundError:
        return "unknown"


def plan_growth(store: Store, items: list[tuple[str, str]]) -> dict:
    """What a run adds to ``store`` and redoes in it:

    * ``new``: listed images whose id the store does not hold, minus ``duplicates`` (a file already
      listed or held under another name: same device and inode);
    * ``redo``: partitions to extract again because an image's source changed (size or mtime) since it
      was extracted (``changed``), or failed because it was missing and exists now (``retried``);
    * ``removed``: held images whose source file is gone (kept in the store, reported).
    """
    held_ids = set()
    held_identity: dict[tuple, str] = {}
    changed, retried, removed, redo = [], [], [], set()
    for rec in store.records():
        held_ids.add(rec["id"])
        now = source_stat(rec["path"])
        if now is None:
            removed.append(rec["id"])
            continue
        held_identity.setdefault(file_identity(rec["path"]), rec["id"])
        before = rec.get("source")
        if before is None and rec["status"] == "failed":
            retried.append(rec["id"])
            redo.add(store.partition_of(rec["row"]))
        elif before is not None and before != now:
            changed.append(rec["id"])
            redo.add(store.partition_of(rec["row"]))
    pending = set(store.pending_partitions())
    for p in pending:  # ids listed but not extracted yet (an interrupted run) are held too
        ids, paths = store.partition_ids(p)
        held_ids.update(ids)
        for i, path in zip(ids, paths):
            held_identity.setdefault(file_identity(path), i)
    fresh = [(i, str(path)) for i, path in items if i not in held_ids]
    new, duplicates = dedupe(fresh, held_identity)
    return {"new": new, "duplicates": duplicates, "removed": removed, "changed": changed,
            "retried": retried, "redo": sorted(redo - pending)}


def run_partitions(store: Store, client, choice: ModelChoice, progress: bool = True, device: str = "cpu") -> dict:
    """Submit every pending partition of ``store``, wait, and summarise the whole store."""
    from rmac.workflows.progress import wait_all

    t0 = time.perf_counter()
    pending = store.pending_partitions()
    tag = tokenize(str(store.path.resolve()))  # two stores named alike on one scheduler must not clash
    futures = [client.submit(extract_partition, store, p, choice, device, key=f"extract-{tag}-{p}",
                             retries=2, pure=False) for p in pending]
    wait_all(futures, "extract", progress)
    return summarise(store, time.perf_counter() - t0, newly=len(pending))


def summarise(store: Store, seconds: float = 0.0, newly: int = 0) -> dict:
    """Counts and reasons over the whole store (JSON-able)."""
    recs = store.records()
    failed = [{"id": r["id"], "reason": r["reason"]} for r in recs if r["status"] == "failed"]
    done = sum(r["status"] == "done" for r in recs)
    return {
        "store": str(store.path), "images": store.n_held, "done": done, "failed": len(failed),
        "pending_partitions": len(store.pending_partitions()), "partitions_run": newly,
        "seconds": round(seconds, 2), "map_bytes_per_image": round(store.map_bytes() / done) if done else 0,
        "failures": failed,
    }


def print_summary(summary: dict) -> None:
    print(f"extracted {summary['done']} of {summary['images']} images into {printable(summary['store'])} "
          f"({summary['partitions_run']} partitions run in {summary['seconds']} s; "
          f"{summary['map_bytes_per_image']} map bytes per image)")
    if summary["failed"]:
        print(f"{summary['failed']} failed:")
        for f in summary["failures"]:
            print(f"  {printable(f['id'])}: {printable(f['reason'])}")
    for key, what in (("added", "added by this run"), ("changed", "changed since extracted: re-extracted"),
                      ("retried", "failed as missing, now present: retried"),
                      ("removed", "source file gone (kept in the store)"),
                      ("duplicates", "the same file as another image: stored once")):
        got = summary.get(key)
        if isinstance(got, int):
            print(f"{got} {what}")
        elif got:
            print(f"{len(got)} {what}:")
            for g in got[:20]:
                print(f"  {printable(g['id'])} = {printable(g['same_as'])}" if isinstance(g, dict) else f"  {printable(g)}")
            if len(got) > 20:
                print(f"  ... and {len(got) - 20} more")
    if summary.get("took_over_lock"):
        print(f"took over the lock of a process that died: {summary['took_over_lock']}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", type=existing_path,
                        help="a folder of images (recursive) or a text file of image paths")
    parser.add_argument("--store", required=True, type=new_or_existing_dir,
                        help="the store folder (created or resumed)")
    add_model_arguments(parser)
    add_wait_argument(parser)
    parser.add_argument("--partition-size", type=positive_int, default=DEFAULT_PARTITION,
                        help="images per task / Zarr shard (default %(default)s)")
    parser.add_argument("--levels", type=int_range(1, 255), default=DEFAULT_LEVELS,
                        help="quantisation levels of the stored maps (default %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where workers run the network: cpu (one image at a time), cuda (same-size images "
                             "batched), auto (a worker's GPU when it sees one); default %(default)s")


def add_wait_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true",
                        help="wait for another extract/index holding the store's lock (default: exit at once)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="default %(default)s")
    parser.add_argument("--weights", type=existing_file,
                        help="a local weights file (vgg16, alexnet, resnet50, resnet101)")
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights: for speed benchmarks only, refused by evaluation")
    parser.add_argument("--max-size", type=int_range(MIN_SIDE, 65536), default=DEFAULT_MAX_SIZE,
                        help="longer image side in pixels (default %(default)s)")


def main(args: argparse.Namespace, client) -> int:
    choice = ModelChoice(args.backbone, args.weights, args.random_weights)
    summary = extract(args.images, args.store, client, choice, args.max_size, args.partition_size, args.levels,
                      wait=args.wait, device=args.device)
    print_summary(summary)
    if getattr(args, "json", None):
        import json
        print(json.dumps(summary, indent=1))
    return 0 if summary["done"] > 0 else 1
