"""`rmac verify` on damaged stores, and `search` / `index` refusing them with one clear line instead of
reading missing data as zeros; `kill -9` of the client during extraction, indexing and shard writes
leaves a readable store (the previous index still answers) that a re-run completes. Real cluster,
real weights, real photos."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rmac.data import LANDMARKS_DEV
from rmac.storage.store import Store, StoreError
from rmac.workflows import cli
from rmac.workflows.extract import ModelChoice, extract
from rmac.workflows.index import build_index, require_indexed
from rmac.workflows.operations.verify import verify

from conftest import BIN, cli_env

pytestmark = pytest.mark.slow
SIZE = 256
QUERY = LANDMARKS_DEV / "jpg" / "christ_1.jpg"


@pytest.fixture(scope="module")
def indexed(client, tmp_path_factory) -> Path:
    """12 photos, 3 partitions of 4, indexed into 3 FAISS shards per kind."""
    root = tmp_path_factory.mktemp("verify")
    items = [(p.stem, str(p)) for p in sorted((LANDMARKS_DEV / "jpg").glob("*.jpg"))[:12]]
    extract(items, str(root / "store"), client, ModelChoice(), SIZE, partition_size=4, progress=False)
    build_index(Store(root / "store"), client, dim=64, shard_rows=4, progress=False)
    assert verify(str(root / "store"), sample=1.0) == {
        "store": str(root / "store"), "problems": [], "notes": [],
        "checked": {"partitions": 3, "partitions_read": 3, "shards": 6, "shards_read": 6}}
    return root / "store"


def _truncate(f: Path) -> None:
    os.truncate(f, f.stat().st_size // 2)


def _edit_manifest(store: Path) -> None:
    m = json.loads((store / "manifest.json").read_text())
    m["n_images"] = 11
    (store / "manifest.json").write_text(json.dumps(m))


def _grow_file(f: Path) -> None:
    with open(f, "ab") as out:
        out.write(b"\0" * 100)


# damage -> (what verify must name, what search's error line must say, what index's must say; None:
# `rmac index` repairs it and verify is clean afterwards)
DAMAGE = {
    "truncated_maps_shard": (lambda s: _truncate(s / "arrays/maps/p000001/c/0"),
                             "partition 1: arrays/maps", "damaged", "damaged"),
    "missing_ok_chunk": (lambda s: (s / "arrays/ok/c/2").unlink(),
                         "partition 2: chunk missing: arrays/ok/c/2", "data missing", "data missing"),
    "edited_manifest": (lambda s: _edit_manifest(s), "manifest.json does not match its checksum",
                        "does not match its checksum", "does not match its checksum"),
    "faiss_wrong_length": (lambda s: _grow_file(s / "index/rmac/shard_001.faiss"),
                           "index/rmac/shard_001.faiss: ", "shard_001.faiss is", None),
    "record_without_data": (lambda s: [(s / f).unlink() for f in ("arrays/mac/c/0/0", "arrays/maps/p000000/c/0")],
                            "partition 0: chunk missing: arrays/mac/c/0/0", "data missing", "data missing"),
    "whitening_chunk": (lambda s: (s / "whitening/regional/proj/c/0/0").unlink(), "whitening/regional/proj",
                        "whitening",
                        "whitening"),
    "id_table": (lambda s: (s / "ids/p000001.json").unlink(), "partition 1: id table", "id table", "id table"),
    "vector_chunk": (lambda s: (s / "arrays/rmac/c/1/0").unlink(), "partition 1: chunk missing: arrays/rmac/c/1/0",
                     None, None),
}


def _run_cli(args, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(code, out, err, command) -> str:
    assert code == 2 and "Traceback" not in err + out, (code, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("dask: ")]
    assert len(lines) == 1 and lines[0].startswith(f"rmac {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_verify_names_the_damage_and_search_and_index_refuse(case, indexed, scheduler, tmp_path, capsys):
    damage, named, search_says, index_says = DAMAGE[case]
    store = tmp_path / "store"
    shutil.copytree(indexed, store)
    damage(store)
    result = verify(str(store), sample=1.0)
    assert any(named in p for p in result["problems"]), result["problems"]
    code, out, err = _run_cli(["verify", store, "--sample", "1"], capsys)
    assert code == 1 and named in out

    if search_says:
        line = _error_line(*_run_cli(["search", store, QUERY, "--json", "--scheduler", scheduler], capsys), "search")
        assert search_says in line and str(store) in line, line
    if index_says:
        refit = ["--refit"] if case == "truncated_maps_shard" else []  # plain `index` reads nothing old
        line = _error_line(*_run_cli(["index", store, "--dim", 64, *refit, "--scheduler", scheduler], capsys),
                           "index")
        assert index_says in line, line
    else:  # what the index owns is rebuilt by `rmac index`
        code, out, err = _run_cli(["index", store, "--dim", 64, "--shard-rows", 4, "--scheduler", scheduler], capsys)
        assert code == 0, err
        assert verify(str(store), sample=1.0)["problems"] == []
        code, out, err = _run_cli(["search", store, QUERY, "--json", "--scheduler", scheduler], capsys)
        assert code == 0 and json.loads(out)["hits"][0]["id"] == "christ_1", err


# ----------------------------------------------------------------------------------------------- kill -9
def _popen(*args) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "rmac"), *map(str, args)], env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    """SIGKILL ``proc`` (the client: no cleanup) as soon as ``ready()``; it must not have finished first."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, ("finished before the kill", proc.communicate())
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()


def _new_files(folder: Path, before: set[str], pattern: str):
    return lambda: {f.name for f in folder.glob(pattern)} - before


def test_kill_9_at_each_step_leaves_a_readable_store_that_a_rerun_completes(scheduler, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for src in sorted((LANDMARKS_DEV / "jpg").glob("*.jpg"))[:16]:
        shutil.copy(src, photos / src.name)
    store = tmp_path / "store"
    ext = ("extract", photos, "--store", store, "--max-size", SIZE, "--partition-size", 2, "--scheduler", scheduler)

    # 1. during extraction, once the first partition is written
    p = _popen(*ext)
    _kill_when(p, lambda: any((store / "parts").glob("p*.json")))
    assert verify(str(store))["problems"] == []  # readable; pending partitions are notes
    code, _, err = _run_cli(ext, capsys)
    assert code == 0, err
    s = Store(store)
    assert s.pending_partitions() == [] and s.n_held == 16
    idx = ("index", store, "--dim", 64, "--shard-rows", 2, "--scheduler", scheduler)
    code, _, err = _run_cli(idx, capsys)
    assert code == 0, err
    commit = Store(store).manifest["index"]["commit"]

    # 2. during indexing (the vectors of the new partitions), after the store grew by 8 photos
    for src in sorted((LANDMARKS_DEV / "jpg").glob("*.jpg"))[16:24]:
        shutil.copy(src, photos / src.name)
    code, _, err = _run_cli(ext, capsys)
    assert code == 0, err
    parts = store / "index" / "parts"
    before = {f.name for f in parts.glob("p*.json")}
    p = _popen(*idx)
    _kill_when(p, _new_files(parts, before, "p*.json"))
    _still_answers(store, commit, scheduler, capsys)

    # 3. during the shard writes
    shards = store / "index" / "rmac"
    before = {f.name for f in shards.glob("shard_*.faiss")}
    p = _popen(*idx)
    _kill_when(p, _new_files(shards, before, "shard_*.faiss"))
    _still_answers(store, commit, scheduler, capsys)

    # 4. during a re-fit, once the new whitening is saved aside
    p = _popen(*idx, "--refit")
    _kill_when(p, lambda: any(store.glob(".whitening.*")))
    _still_answers(store, commit, scheduler, capsys)

    # the re-run completes the index; the store is whole
    code, _, err = _run_cli(idx, capsys)
    assert code == 0, err
    info = require_indexed(Store(store))
    assert info["commit"] != commit and info["rows"] == Store(store).n_images
    result = verify(str(store), sample=1.0)
    assert result["problems"] == [] and result["notes"] == []
    assert not list(store.glob(".whitening.*")) and not list(shards.glob("manifest.*.json"))


def _still_answers(store: Path, commit: str, scheduler: str, capsys) -> None:
    """After a kill: the previous index is still the committed one, intact, and search answers."""
    s = Store(store)
    assert s.manifest["index"]["commit"] == commit
    require_indexed(s)
    assert verify(str(store), sample=1.0)["problems"] == []
    code, out, err = _run_cli(["search", store, QUERY, "--json", "--scheduler", scheduler], capsys)
    assert code == 0, err
    assert json.loads(out)["hits"][0]["id"] == "christ_1.jpg"  # ids of a folder are relative paths
