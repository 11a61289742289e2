"""`rmac verify STORE [--sample F]`: every mismatch in a store, by name; non-zero exit if any.
Work left to do (partitions not extracted yet, rows not indexed yet) is printed as a note, not a problem.

Always checked (cheap: metadata, file sizes, ``stat`` calls):
  the manifest (format, configuration, segments), each array's shape against it, every partition's id
  table and record (counts, ids), every chunk/shard file a finished partition's rows need, the
  whitening against its hash, each FAISS folder against the committed index (files, sizes, commit),
  each partition's vectors against the record and whitening they were built from.
With ``--sample F`` (0 < F <= 1), as ``restic check --read-data-subset``: a random fraction F of the
partitions (and FAISS shards) is read back whole and compared with the checksums written when it was
extracted / indexed; a FAISS shard read back must hold as many vectors as valid rows in its range.
"""
from __future__ import annotations

import argparse
import json
import random
import sys

from rmac.storage import checksums
from rmac.storage.store import Store, StoreError


def verify(path: str, sample: float = 0.0, seed: int | None = None) -> dict:
    """Check the store at ``path``; returns ``{"problems": [...], "checked": {...}}``."""
    problems: list[str] = []
    notes: list[str] = []  # states, not damage: work left for the next extract / index
    try:
        store = Store(path)
    except StoreError as e:
        return {"store": str(path), "problems": [str(e)], "notes": [], "checked": {}}
    rng = random.Random(seed)
    checked = {"partitions": 0, "partitions_read": 0, "shards": 0, "shards_read": 0}
    try:
        g = store.arrays
    except Exception as e:
        return {"store": str(path), "problems": [f"arrays/: unreadable Zarr group ({e})"], "notes": [],
                "checked": checked}
    cfg, rows = store.config, store.n_images
    if store.n_held != store.manifest.get("n_images"):
        problems.append(f"manifest.json: n_images {store.manifest.get('n_images')} but segments hold {store.n_held}")
    for name in ("mac", "maps", "scale", "map_hw", "image_hw", "ok"):
        if name not in g:
            if name != "maps":  # the maps may be stored under other names (the sparse layout)
                problems.append(f"arrays/{name}: missing")
            continue
        a = g[name]
        if not hasattr(a, "shape"):  # arrays/maps/ is a group of per-partition codes (storage/maps.py)
            continue
        if a.shape[0] != rows:
            problems.append(f"arrays/{name}: {a.shape[0]} rows, the manifest says {rows}")
        if name in ("mac", "maps") and a.ndim > 1 and a.shape[1] != cfg.channels:
            problems.append(f"arrays/{name}: {a.shape[1]} channels, the manifest says {cfg.channels}")
    done = store.done_partitions()
    extra = sorted(p for p in done if p >= store.n_partitions)
    if extra:
        problems.append(f"parts/: records of partitions {extra} beyond the manifest's {store.n_partitions}")
    for p in range(store.n_partitions):
        if not checksums_table_ok(store, p, problems):
            continue
        if p not in done:
            notes.append(f"partition {p}: not extracted yet (pending): run `rmac extract` to finish it")
            continue
        read = sample > 0 and rng.random() < sample
        checked["partitions"] += 1
        checked["partitions_read"] += read
        problems += store.partition_problems(p, read_data=read)
    if store.manifest.get("index"):
        _verify_index(store, sample, rng, problems, notes, checked)
    return {"store": str(store.path), "problems": problems, "notes": notes, "checked": checked}


def checksums_table_ok(store: Store, p: int, problems: list[str]) -> bool:
    try:
        ids, paths = store.partition_ids(p)
    except StoreError as e:
        problems.append(f"partition {p}: id table ids/p{p:06d}.json missing or damaged ({e})")
        return False
    if len(ids) != store.partition_count(p) or len(paths) != len(ids):
        problems.append(f"partition {p}: id table holds {len(ids)} ids, the manifest says {store.partition_count(p)}")
        return False
    return True


def _verify_index(store: Store, sample: float, rng: random.Random, problems: list[str], notes: list[str],
                  checked: dict) -> None:
    from rmac.workflows.index import VECTOR_KINDS, vector_part

    info = store.manifest["index"]
    if "commit" not in info:
        problems.append("manifest.json: index from an older rmac (no commit): run `rmac index --refit`")
        return
    try:
        wid = store.load_whitening()[3].get("id")
        if wid != info["whitening_id"]:
            problems.append(f"whitening/: id {wid}, the index was built with {info['whitening_id']}")
    except StoreError as e:
        problems.append(str(e))
    if int(store.manifest.get("revision", 0)) != info.get("revision"):
        problems.append("index: images were re-extracted since it was built: run `rmac index`")
    g = store.arrays
    for k in VECTOR_KINDS:
        if k not in g:
            problems.append(f"arrays/{k}: missing")
        elif g[k].shape[0] < info["rows"]:
            problems.append(f"arrays/{k}: {g[k].shape[0]} rows, the index covers {info['rows']}")
    indexed_rows = info["rows"]
    for p in range(min(info["partitions"], store.n_partitions)):
        got = vector_part(store, p)
        if got is None:
            problems.append(f"partition {p}: index/parts/p{p:06d}.json (its vectors' record) missing")
            continue
        if got.get("whitening") != info["whitening_id"]:
            problems.append(f"partition {p}: vectors built with whitening {got.get('whitening')}, "
                            f"the index with {info['whitening_id']}")
        if p in store.done_partitions() and got.get("record") != store.partition_digest(p):
            problems.append(f"partition {p}: vectors built from another extraction record: run `rmac index`")
        r = store.partition_rows(p)
        for m in store.missing_chunks(r.start, r.stop, names=VECTOR_KINDS, exclude=()):
            problems.append(f"partition {p}: chunk missing: arrays/{m}")
        if sample > 0 and rng.random() < sample:
            for name, want in got.get("checksums", {}).items():
                try:
                    ok = checksums.digest(g[name][r.start:r.stop]) == want
                except Exception as e:
                    problems.append(f"partition {p}: arrays/{name} unreadable ({type(e).__name__})")
                    continue
                if not ok:
                    problems.append(f"partition {p}: arrays/{name} does not match its checksum")
    for k in VECTOR_KINDS:
        folder = store.path / "index" / k
        try:
            meta = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError):
            problems.append(f"index/{k}/manifest.json: missing or not JSON")
            meta = {}
        if meta and meta.get("meta", {}).get("commit") != info["commit"]:
            problems.append(f"index/{k}/manifest.json: not the committed index ({info['commit']})")
        listed = [e["file"] for e in meta.get("shards", [])]
        if meta and listed != [e["file"] for e in info["shard_lists"][k]]:
            problems.append(f"index/{k}/manifest.json: lists {listed}, the commit {[e['file'] for e in info['shards'][k]]}")
        covered: list[int] = []
        for e in info["shard_lists"][k]:
            f = folder / e["file"]
            checked["shards"] += 1
            if e["stop"] > e["start"]:
                covered += range(store.partition_of(e["start"]), store.partition_of(e["stop"] - 1) + 1)
            if not f.is_file():
                problems.append(f"index/{k}/{e['file']}: missing")
                continue
            if f.stat().st_size != e.get("bytes"):
                problems.append(f"index/{k}/{e['file']}: {f.stat().st_size} bytes, the index says {e.get('bytes')}")
                continue
            if sample > 0 and rng.random() < sample:
                checked["shards_read"] += 1
                problems += _read_shard(store, k, e, f)
        if sorted(covered) != list(range(info["partitions"])):
            problems.append(f"index/{k}: shards cover partitions {_ranges(covered)}, the index "
                            f"holds 0..{info['partitions'] - 1}")
    if indexed_rows != store.n_images:
        notes.append(f"index: covers {indexed_rows} of {store.n_images} rows: run `rmac index` to add the rest")


def _ranges(parts: list[int]) -> str:
    return ", ".join(str(p) for p in sorted(parts)) if len(parts) < 20 else f"{len(parts)} (with gaps or overlaps)"


def _read_shard(store: Store, k: str, e: dict, f) -> list[str]:
    from rmac.storage.index import load_shard

    out = []
    if checksums.digest_file(f) != e.get("sha256"):
        out.append(f"index/{k}/{e['file']}: does not match its checksum")
        return out
    try:
        index = load_shard(f)
    except Exception as ex:
        return [f"index/{k}/{e['file']}: unreadable by FAISS ({ex})"]
    valid = int(store.arrays["ok"][e["start"]:e["stop"]].sum())
    if index.ntotal != e["ntotal"] or index.ntotal != valid:
        out.append(f"index/{k}/{e['file']}: {index.ntotal} vectors; the manifest says {e['ntotal']}, "
                   f"the rows {e['start']}..{e['stop']} hold {valid} valid images")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="the store folder")
    parser.add_argument("--sample", type=_fraction, default=0.0,
                        help="also read back this fraction (0..1] of the partitions and shards and compare "
                             "checksums (default 0: metadata, sizes and file presence only)")
    parser.add_argument("--seed", type=int, help="seed of the sample (default: random)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _fraction(text: str) -> float:
    try:
        f = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= f <= 1:
        raise argparse.ArgumentTypeError(f"a fraction between 0 and 1, got {text}")
    return f


def main(args: argparse.Namespace) -> int:
    result = verify(args.store, args.sample, args.seed)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for n in result["notes"]:
            print(f"note: {n}")
        for p in result["problems"]:
            print(p)
        c = result["checked"]
        print(f"{args.store}: {len(result['problems'])} problem(s); {c.get('partitions', 0)} partitions "
              f"({c.get('partitions_read', 0)} read back), {c.get('shards', 0)} FAISS shards "
              f"({c.get('shards_read', 0)} read back)", file=sys.stderr if result["problems"] else sys.stdout)
    return 1 if result["problems"] else 0
