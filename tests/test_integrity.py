"""Integrity under faults and bad input (issue 10), without a cluster: FAISS shards written through
checked, fsync'ed writes under a real file-size limit, damaged shards refused, make-views refusing an
output that overlaps its source, evaluation refusing ground truth that names unknown images and never
writing NaN, and the dataset loaders turning every malformed file into one `DatasetError`."""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import faiss
import numpy as np
import pytest

from rmac.data import LANDMARKS_DEV
from rmac.storage.datasets import Dataset, DatasetError, Query, load_dataset, load_json, load_oxford, save_json
from rmac.storage.images import ImageListError, list_images
from rmac.storage.index import ShardedIndex, build_shard, save_shard, shard_entry, write_manifest
from rmac.storage.store import StoreError
from rmac.workflows.errors import _DropUserErrors, describe, is_user_error
from rmac.workflows.evaluate import score, to_json
from rmac.workflows.views import make_views


def _vectors(n: int, d: int = 64, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ----------------------------------------------------------------------------------- FAISS writes
LIMITED_SAVE = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    from rmac.storage.index import build_shard, save_shard
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
    x = np.load(sys.argv[2])
    index = build_shard(x, 0)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
    try:
        save_shard(index, sys.argv[1])
    except OSError as e:
        print("OSError", e.errno, e.filename)
        sys.exit(3)
    print("saved")
""")


def test_save_shard_raises_on_a_full_disk_and_keeps_the_old_shard(tmp_path):
    """faiss.write_index only prints a close error when the disk fills up; save_shard must raise, leave
    the previous file intact and no temporary file behind. The fault is real: RLIMIT_FSIZE makes the
    kernel refuse the write past the limit (EFBIG), in a subprocess so the test process is not limited."""
    path = tmp_path / "shard_000.faiss"
    old = build_shard(_vectors(10), 0)
    save_shard(old, path)
    before = path.read_bytes()
    np.save(tmp_path / "big.npy", _vectors(500))  # a 128 kB shard
    proc = subprocess.run([sys.executable, "-c", LIMITED_SAVE, str(path), str(tmp_path / "big.npy"), "65536"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    code, name = proc.stdout.split()[1:]
    assert int(code) == 27 and name == str(path)  # EFBIG, naming the shard
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npy", "shard_000.faiss"]
    assert faiss.read_index(str(path)).ntotal == 10
    # the same command with room enough writes a shard identical to faiss's own writer
    ok = subprocess.run([sys.executable, "-c", LIMITED_SAVE, str(path), str(tmp_path / "big.npy"), str(1 << 30)],
                        capture_output=True, text=True, timeout=120)
    assert ok.stdout.strip() == "saved", ok.stderr
    faiss.write_index(build_shard(np.load(tmp_path / "big.npy"), 0), str(tmp_path / "ref.faiss"))
    assert path.read_bytes() == (tmp_path / "ref.faiss").read_bytes()


def test_truncated_shard_is_refused_with_one_line(tmp_path):
    folder = tmp_path / "rmac"
    folder.mkdir()
    index = build_shard(_vectors(20), 0)
    save_shard(index, folder / "shard_000.faiss")
    write_manifest(folder, [shard_entry(index, "shard_000.faiss", 0, 20, "flat")])
    assert ShardedIndex(folder).ntotal == 20
    data = (folder / "shard_000.faiss").read_bytes()
    (folder / "shard_000.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="shard_000.faiss: damaged or missing FAISS shard") as e:
        ShardedIndex(folder)
    assert "\n" not in describe(e.value)
    (folder / "manifest.json").write_text('{"format": ')
    with pytest.raises(StoreError, match="unreadable index manifest"):
        ShardedIndex(folder)


# ------------------------------------------------------------------------------ user errors, workers
def test_user_errors_and_the_worker_log_filter():
    import errno
    import logging

    assert is_user_error(OSError(errno.ENOSPC, "No space left on device", "/x/shard_000.faiss"))
    assert describe(OSError(errno.ENOSPC, "No space left on device", "/x/s")) == "No space left on device: '/x/s'"
    assert not is_user_error(OSError("socket closed")) and not is_user_error(RuntimeError("bug"))
    assert is_user_error(DatasetError("x"))

    def record(exc_text: str) -> logging.LogRecord:
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1,
                                 "Compute Failed\nKey: %s\nState: %s\nTask: %s\nException: %r\nTraceback: %r\n",
                                 ("k", "executing", "task", exc_text, "  File ..."), None)

    f = _DropUserErrors()
    assert not f.filter(record("BadImage('not_an_image', 'not a recognised image format', '/q.jpg')"))
    assert not f.filter(record("OSError(28, 'No space left on device')"))
    assert not f.filter(record("DatasetError('bad gt')"))
    assert f.filter(record("RuntimeError('a real bug')"))  # bugs stay visible
    assert f.filter(record("OSError('Timed out')"))
    assert f.filter(logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, "other %s", ("x",), None))


# ---------------------------------------------------------------------------------------- make-views
@pytest.fixture
def small_src(tmp_path):
    """An Oxford-layout copy of two dev landmark groups and four distractors."""
    dev = load_oxford(LANDMARKS_DEV)
    keep = [q for q in dev.queries if q.name.split("_")[0] in ("christ", "eiffel")]
    distractors = sorted(i for i in dev.images if i.startswith("distractor_"))[:4]
    ids = sorted({i for q in keep for i in q.ok + q.junk + [q.image]} | set(distractors))
    root = tmp_path / "src"
    (root / "jpg").mkdir(parents=True)
    (root / "gt").mkdir()
    for i in ids:
        shutil.copyfile(dev.image_paths[i], root / "jpg" / f"{i}.jpg")
    for q in keep:
        for kind in ("query", "good", "ok", "junk"):
            shutil.copyfile(LANDMARKS_DEV / "gt" / f"{q.name}_{kind}.txt", root / "gt" / f"{q.name}_{kind}.txt")
    return root


def _tree(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "inside", "around", "jpg"])
def test_make_views_refuses_an_output_overlapping_its_source(small_src, tmp_path, where):
    out = {"same": small_src, "inside": small_src / "views", "around": tmp_path,
           "jpg": small_src / "jpg"}[where]
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match="source folder") as e:
        make_views(small_src, out, overwrite=True)
    assert is_user_error(e.value)
    assert _tree(tmp_path) == before  # nothing touched, nothing created
    assert not (small_src / "views").exists()


def test_make_views_refuses_landmarks_dev_as_output(tmp_path):
    with pytest.raises(ValueError, match="is the source folder"):
        make_views("landmarks-dev", LANDMARKS_DEV, overwrite=True)
    assert (LANDMARKS_DEV / "jpg" / "christ_1.jpg").is_file()


# ---------------------------------------------------------------------------------------- evaluation
def _mini_json(tmp_path, ok_extra=()) -> Dataset:
    ds = Dataset("mini", LANDMARKS_DEV, ["christ_1", "christ_2", "distractor_100"],
                 {i: LANDMARKS_DEV / "jpg" / f"{i}.jpg" for i in ("christ_1", "christ_2", "distractor_100")},
                 [Query("q", "christ_1", (0.0, 0.0, 10.0, 10.0), ["christ_2", *ok_extra], [])])
    save_json(ds, tmp_path / "mini.json")
    return load_json(tmp_path / "mini.json")


def test_unknown_ground_truth_ids_are_found_and_dropped_on_request(tmp_path):
    ds = _mini_json(tmp_path, ok_extra=("christ_22", "christ_3"))
    assert ds.unknown_ids() == ["christ_22", "christ_3"]
    ds.drop_unknown()
    assert ds.unknown_ids() == [] and ds.queries[0].ok == ["christ_2"]


def test_evaluate_refuses_unknown_ground_truth_before_any_work(tmp_path):
    from rmac.workflows.evaluate import evaluate

    _mini_json(tmp_path, ok_extra=("christ_22",))
    with pytest.raises(DatasetError, match="1 image.* not in the dataset mini: 'christ_22'.*--allow-unknown"):
        evaluate(str(tmp_path / "mini.json"), client=None, store=str(tmp_path / "store"))
    assert not (tmp_path / "store").exists()


def test_scores_and_json_never_hold_nan():
    ranks = np.arange(3)[:, None]
    res = score(ranks, [{"ok": [], "junk": [], "bbx": None}], revisited=False)  # no query has a positive
    assert res == {"map": None, "mp@1": None, "mp@5": None, "mp@10": None}
    text = to_json({"methods": {"mac": res}, "x": [float("nan"), float("inf"), 1.5]})
    assert json.loads(text) == {"methods": {"mac": res}, "x": [None, None, 1.5]}
    assert "NaN" not in text and "Infinity" not in text
    ok = score(ranks, [{"ok": [0], "junk": [], "bbx": None}], revisited=False)
    assert ok["map"] == 100.0 and all(math.isfinite(v) for v in ok.values())


# ------------------------------------------------------------------------------------ dataset loaders
def _oxford(tmp_path, query="christ_1 1 2 300 400\n", good=b"christ_2\n"):
    root = tmp_path / "ox"
    (root / "jpg").mkdir(parents=True, exist_ok=True)
    (root / "gt").mkdir(exist_ok=True)
    for i in ("christ_1", "christ_2"):
        shutil.copyfile(LANDMARKS_DEV / "jpg" / f"{i}.jpg", root / "jpg" / f"{i}.jpg")
    (root / "gt" / "c_1_query.txt").write_bytes(query.encode() if isinstance(query, str) else query)
    (root / "gt" / "c_1_good.txt").write_bytes(good)
    return root


def _pkl(tmp_path, easy, imlist=("a", "b"), bbx=(0.0, 0.0, 5.0, 5.0), raw=None):
    root = tmp_path / "rev"
    root.mkdir(exist_ok=True)
    cfg = {"imlist": list(imlist), "qimlist": ["q"],
           "gnd": [{"bbx": list(bbx), "easy": easy, "hard": np.array([], np.int64),
                    "junk": np.array([], np.int64)}]}
    (root / "gnd_r.pkl").write_bytes(raw if raw is not None else pickle.dumps(cfg))
    return root / "gnd_r.pkl"


LOADER_ERRORS = {
    # case: (make the dataset, words of the DatasetError)
    "oxford box not a number": (lambda t: _oxford(t, query="christ_1 1 2 abc 400\n"), ["c_1_query.txt", "'abc'"]),
    "oxford box nan": (lambda t: _oxford(t, query="christ_1 1 2 nan 400\n"), ["not a finite number"]),
    "oxford query not utf-8": (lambda t: _oxford(t, query=b"christ_1 1 2 3 \xff\n"), ["c_1_query.txt", "UTF-8"]),
    "oxford list not utf-8": (lambda t: _oxford(t, good=b"christ_2\n\xfe\xff\n"), ["c_1_good.txt", "UTF-8", "0xfe"]),
    "revisited index out of range": (lambda t: _pkl(t, np.array([2])), ["query 0", "index 2", "out of range"]),
    "revisited negative index": (lambda t: _pkl(t, np.array([-1])), ["index -1", "out of range"]),
    "revisited fractional index": (lambda t: _pkl(t, [0.5]), ["0.5", "not a whole number"]),
    "revisited bbx not numbers": (lambda t: _pkl(t, [0], bbx=("x", 0, 1, 1)), ["bbx", "'x'"]),
    "revisited truncated pickle": (lambda t: _pkl(t, [0], raw=pickle.dumps({"imlist": ["a"]})[:-5]),
                                   ["not a readable ground-truth pickle"]),
    "revisited unsafe pickle": (lambda t: _pkl(t, [0], raw=b"cos\nsystem\n(S'true'\ntR."),
                                ["refusing to unpickle", "os.system"]),
    "revisited name not utf-8": (lambda t: _pkl(t, [0], imlist=(b"\xff\xfe", "b")), ["not UTF-8"]),
    "json not json": (lambda t: _write(t / "d.json", b'{"name": "x", '), ["d.json", "not valid JSON"]),
    "json not utf-8": (lambda t: _write(t / "d.json", b'{"name": "\xff"}'), ["d.json", "UTF-8"]),
    "json query without bbox": (lambda t: _write(t / "d.json", json.dumps(
        {"name": "x", "image_root": ".", "images": ["a"], "queries": [{"name": "q", "image": "a", "ok": []}]}
    ).encode()), ["d.json", "malformed", "bbox"]),
    "json box not numbers": (lambda t: _write(t / "d.json", json.dumps(
        {"name": "x", "image_root": ".", "images": ["a"],
         "queries": [{"name": "q", "image": "a", "bbox": [0, 0, "w", 1], "ok": []}]}).encode()), ["bbox", "'w'"]),
    "json id with a newline": (lambda t: _write(t / "d.json", json.dumps(
        {"name": "x", "image_root": ".", "images": ["a\nb"], "queries": []}).encode()), ["control characters"]),
    "json images not a list": (lambda t: _write(t / "d.json", json.dumps(
        {"name": "x", "image_root": ".", "images": 3, "queries": []}).encode()), ["images must be a list"]),
}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(LOADER_ERRORS))
def test_dataset_loaders_turn_bad_files_into_one_line(case, tmp_path):
    make, words = LOADER_ERRORS[case]
    with pytest.raises(DatasetError) as e:
        load_dataset(make(tmp_path))
    msg = describe(e.value)
    for w in words:
        assert w in msg, (case, msg)


def test_image_list_not_utf8_names_the_line(tmp_path):
    (tmp_path / "list.txt").write_bytes(b"a.jpg\nb.jpg\n\xff\xfe.jpg\n")
    with pytest.raises(ImageListError, match=r"line 3 is not UTF-8"):
        list_images(tmp_path / "list.txt")
    with pytest.raises(ImageListError, match="no such folder or list file"):
        list_images(tmp_path / "nothere")



# ------------------------------------------------------------------------------ unusual file names
ODD_NAMES = ["new\nline.jpg", "tab\there.jpg", os.fsdecode(b"bad\xff\xfename.jpg"), "<b>tag&amp;.jpg", "é 中.jpg"]


def test_printable_names():
    from rmac.workflows.text import printable

    assert [printable(n) for n in ODD_NAMES] == ["new\\nline.jpg", "tab\\there.jpg", "bad\\xff\\xfename.jpg",
                                                "<b>tag&amp;.jpg", "é 中.jpg"]
    assert all("\n" not in printable(n) and printable(n).encode("utf-8") for n in ODD_NAMES)


def test_png_and_html_of_hits_with_unusual_names(tmp_path):
    """Photos whose file names hold a newline, undecodable bytes or markup: the PNG is drawn, the HTML
    page is valid UTF-8 with every name escaped, one per hit."""
    from PIL import Image

    from rmac.workflows.report import draw_hits_png, write_html_report

    photos = []
    for n in ODD_NAMES:
        p = os.path.join(os.fsencode(tmp_path), os.fsencode(n))
        shutil.copyfile(LANDMARKS_DEV / "jpg" / "christ_2.jpg", p)
        photos.append(os.fsdecode(p))
    hits = [{"id": n, "path": p, "score": 0.5 - i / 10, "box": [0.0, 0.0, 100.0, 80.0], "image_hw": [535, 800],
             "rank": i, "initial_rank": i, "positive": None} for i, (n, p) in enumerate(zip(ODD_NAMES, photos))]
    query = {"name": ODD_NAMES[0], "image": photos[0], "bbox": [0.0, 0.0, 800.0, 535.0], "image_hw": [535, 800]}
    draw_hits_png(query, hits, tmp_path / "hits.png")
    with Image.open(tmp_path / "hits.png") as im:
        assert im.format == "PNG" and im.width >= 6 * 200
    write_html_report(tmp_path / "hits.html", f"rmac search: {ODD_NAMES[0]}", {}, [{**query, "hits": hits}])
    text = (tmp_path / "hits.html").read_bytes().decode("utf-8")
    for shown in ("new\\nline.jpg", "bad\\xff\\xfename.jpg", "&lt;b&gt;tag&amp;amp;.jpg", "é 中.jpg"):
        assert f'data-id="{shown}"' in text, shown
    assert "<b>" not in text and text.count("data:image/jpeg;base64,") == len(ODD_NAMES) + 1
