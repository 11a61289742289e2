"""`rmac info STORE [--json]`: what a store holds (images, failed, partitions, whitening, index, bytes on
disk, the last runs of its run log, who holds its lock)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rmac.storage.lock import StoreLock
from rmac.storage.store import Store


def _bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def info(path: str, last: int = 5) -> dict:
    """The summary of the store at ``path`` (JSON-able)."""
    store = Store(path)
    recs = store.records()
    failed = sum(r["status"] == "failed" for r in recs)
    index = store.manifest.get("index")
    whitening = None
    if (store.path / "whitening").exists():
        try:
            attrs = store.load_whitening()[3]
            whitening = {k: attrs.get(k) for k in ("id", "fitted_on", "n_vectors", "dim", "L")}
        except Exception as e:  # a damaged whitening is reported, not fatal here
            whitening = {"error": str(e)}
    lock = StoreLock(store.path, "info").holder()
    runs = store.runs()
    return {
        "store": str(store.path), "format": store.manifest["format"], "config": store.config.__dict__,
        "images": store.n_held, "done": len(recs) - failed, "failed": failed,
        "pending_images": store.n_held - len(recs), "partitions": store.n_partitions,
        "pending_partitions": len(store.pending_partitions()), "rows": store.n_images,
        "growths": len(store.segments), "whitening": whitening,
        "index": None if not index else {k: index.get(k) for k in (
            "index_kind", "dim", "L", "shards", "rows", "partitions", "whitening_id", "commit")},
        "unindexed_rows": store.n_images - (index or {}).get("rows", 0),
        "bytes": {"total": _bytes(store.path), "arrays": _bytes(store.path / "arrays"),
                  "maps": _bytes(store.path / "arrays" / "maps"), "index": _bytes(store.path / "index")},
        "lock": None if not lock or lock.get("released") else lock,
        "runs": len(runs), "last_runs": runs[-last:],
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_info(d: dict) -> None:
    c = d["config"]
    print(f"{d['store']}: rmac store format {d['format']}, {c['backbone']} ({c['weights']}), max size "
          f"{c['max_size']}, {c['levels']} levels")
    print(f"images     {d['images']} ({d['done']} extracted, {d['failed']} failed, {d['pending_images']} pending)")
    print(f"partitions {d['partitions']} of {c['partition_size']} ({d['pending_partitions']} pending; "
          f"{d['growths']} growth(s); {d['rows']} rows)")
    w = d["whitening"]
    print("whitening  " + ("none" if not w else w.get("error") or
                           f"{w['dim']}-D, L={w['L']}, fitted on {w['fitted_on']} ({w['n_vectors']} vectors), id {w['id']}"))
    i = d["index"]
    print("index      " + ("none" if not i else f"{i['index_kind']}, {i['shards']} shard(s), {i['rows']} rows"
                           + (f" ({d['unindexed_rows']} rows not indexed yet)" if d["unindexed_rows"] else "")))
    b = d["bytes"]
    print(f"bytes      {_size(b['total'])} (maps {_size(b['maps'])}, index {_size(b['index'])})")
    if d["lock"]:
        print(f"locked by  pid {d['lock'].get('pid')} on {d['lock'].get('host')} ({d['lock'].get('command')}, "
              f"since {d['lock'].get('started')})")
    print(f"runs       {d['runs']}" + (", last:" if d["last_runs"] else ""))
    for r in d["last_runs"]:
        rest = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("time", "command"))
        print(f"  {r.get('time')} {r.get('command')}: {rest}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="the store folder")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--runs", type=int, default=5, help="how many of the last runs to show (default 5)")


def main(args: argparse.Namespace) -> int:
    d = info(args.store, max(0, args.runs))
    if args.json:
        print(json.dumps(d, indent=1))
    else:
        print_info(d)
    return 0
