"""The `rmac` command line, run as a user runs it (the virtualenv's console script in a subprocess)
against a real cluster (`deploy/local-cluster.sh`: a scheduler and two worker processes):
`rmac evaluate` on a JSON dataset with and without a distractor store, `rmac extract` on bad and mixed
folders, `rmac search` output (JSON, PNG, HTML) and every kind of user error, which must end with exit
status 2 and one line saying what is wrong — never a traceback."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rmac.data import LANDMARKS_DEV
from rmac.storage.datasets import Dataset, load_json, save_json
from rmac.storage.store import Store
from rmac.workflows.evaluate import METHODS
from rmac.workflows.extract import ModelChoice, extract
from rmac.workflows.index import DEFAULT_L, build_index, load_whitening, regional_vectors
from rmac.workflows.report import BLUE, MAGENTA

from badfiles import write_bad_files
from conftest import MAX_SIZE, group

pytestmark = pytest.mark.slow

JPG = LANDMARKS_DEV / "jpg"
QUERY = JPG / "christ_1.jpg"  # 800 x 535
EVAL_GROUPS = ("christ", "eiffel", "tajmahal")  # 8 photos, 8 queries
EVAL_DISTRACTORS = [f"distractor_{i:03d}" for i in range(100, 112)]
EXTRA_DISTRACTORS = [f"distractor_{i:03d}" for i in range(120, 128)]  # the --distractors store
METRICS = ("map", "mp@1", "mp@5", "mp@10")
UNKNOWN_ID = "christ_99"  # named by the ground truth, not in the dataset


def check_clean(proc) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr


def user_error(proc, command: str = "search") -> str:
    """The one error line of a run that failed on bad input (exit status 2), with nothing else said."""
    check_clean(proc)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(f"rmac {command}: error: ")]
    assert len(errors) == 1, proc.stderr
    assert all(ln.startswith("dask: ") for ln in lines if ln not in errors), proc.stderr
    return errors[0]


# ------------------------------------------------------------------------------------------ evaluate
@pytest.fixture(scope="module")
def eval_files(dev, client, tmp_path_factory):
    """A JSON dataset (3 landmark groups + 12 distractors of the dev set) and an extracted store of 8
    other distractor photos."""
    root = tmp_path_factory.mktemp("eval")
    ids = sorted([i for i in dev.images if group(i) in EVAL_GROUPS] + EVAL_DISTRACTORS)
    queries = [q for q in dev.queries if group(q.image) in EVAL_GROUPS]
    queries[0] = dataclasses.replace(queries[0], ok=[*queries[0].ok, UNKNOWN_ID])  # dropped by --allow-unknown
    ds = Dataset("dev-mini", LANDMARKS_DEV, ids, {i: dev.image_paths[i] for i in ids}, queries)
    save_json(ds, root / "dev-mini.json")
    back = load_json(root / "dev-mini.json")
    assert back.images == ids and len(back.queries) == 8
    dist = root / "extra-distractors-store"
    extract([(i, str(dev.image_paths[i])) for i in EXTRA_DISTRACTORS], str(dist), client, ModelChoice(), MAX_SIZE,
            partition_size=4, progress=False)
    return root / "dev-mini.json", root / "eval-store", dist


@pytest.fixture(scope="module")
def evaluated(rmac_cli, eval_files):
    """`rmac evaluate` without, then with the distractor store; the JSON of each, and the dataset
    store's whitening as the first run left it."""
    dataset, store, dist = eval_files
    out = dataset.parent
    plain = rmac_cli("evaluate", dataset, "--store", store, "--max-size", MAX_SIZE, "--json", out / "plain.json",
                     "--allow-unknown")
    check_clean(plain)
    assert plain.returncode == 0, plain.stderr
    w_plain = load_whitening(Store(store))
    with_d = rmac_cli("evaluate", dataset, "--store", store, "--max-size", MAX_SIZE, "--distractors", dist,
                      "--json", out / "with-distractors.json", "--allow-unknown")
    check_clean(with_d)
    assert with_d.returncode == 0, with_d.stderr
    return (strict_json(out / "plain.json"), plain, w_plain, strict_json(out / "with-distractors.json"))


def strict_json(path) -> dict:
    """Parse as a strict JSON parser does: NaN, Infinity and -Infinity are not JSON."""
    def refuse(constant: str):
        raise AssertionError(f"{path} holds {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_evaluate_writes_the_documented_json(evaluated, eval_files, dev):
    res, proc, w, _ = evaluated
    assert {"dataset", "backbone", "max_size", "whitening", "n_images", "n_queries", "methods",
            "timings"} <= set(res)
    assert res["dataset"] == "dev-mini" and res["backbone"] == "efficientnet-lite0" and res["max_size"] == MAX_SIZE
    assert res["n_images"] == 20 and res["n_queries"] == 8
    # the ground truth's unknown image was dropped, said once on stderr and counted
    assert res["unknown_gt"] == 1
    assert f"warning: dropped 1 ground-truth image(s) not in the dataset: '{UNKNOWN_ID}'" in proc.stderr
    assert set(res["methods"]) == set(METHODS) == {"mac", "rmac", "mac+aml", "rmac+aml", "rmac+aml+qe"}
    for name, m in res["methods"].items():
        assert set(m) == set(METRICS), name
        for k in METRICS:
            assert isinstance(m[k], float) and 0.0 <= m[k] <= 100.0, (name, k, m[k])
        assert f"  {name} " in proc.stdout  # the table is printed too
    # percent, not fractions: this small set is easy for R-MAC
    assert res["methods"]["rmac"]["map"] > 50 and res["methods"]["rmac"]["mp@1"] > 50
    assert all(v >= 0 for v in res["timings"].values())
    assert {"extract_s", "index_s", "queries_s"} <= set(res["timings"])
    # whitening fitted on the 12 distractors only (no query, no positive)
    assert "distractors" in res["whitening"] and "12 images" in res["whitening"]
    store = Store(eval_files[1])
    rows = [store.ids.index(i) for i in EVAL_DISTRACTORS]
    assert w.n_fit == sum(len(regional_vectors(q, s, DEFAULT_L)) for q, s in store.read_maps(rows))


def test_evaluate_at_a_reduced_dimension(evaluated, eval_files, rmac_cli, tmp_path):
    """`rmac evaluate --dim 64`: the whitenings keep 64 dimensions, every method is scored with them, and
    the JSON and the table say so (the first run, without --dim, kept D = K)."""
    plain = evaluated[0]
    dataset, store, _ = eval_files
    copy = tmp_path / "store-64"
    shutil.copytree(store, copy)
    proc = rmac_cli("evaluate", dataset, "--store", copy, "--max-size", MAX_SIZE, "--dim", 64, "--methods",
                    "rmac,rmac+aml", "--json", tmp_path / "d64.json", "--allow-unknown")
    assert proc.returncode == 0, proc.stderr
    res = strict_json(tmp_path / "d64.json")
    assert plain["dim"] == 1280 and res["dim"] == 64 and "(64-D)" in proc.stdout
    assert set(res["methods"]) == {"rmac", "rmac+aml"} and res["methods"]["rmac"]["map"] > 0
    assert Store(copy).arrays["rmac"].shape == (plain["n_images"], 64)


def test_evaluate_with_a_distractor_store(evaluated, eval_files):
    plain, _, w_plain, res = evaluated
    _, store_path, dist_path = eval_files
    assert res["n_images"] == plain["n_images"] + len(EXTRA_DISTRACTORS) == 28
    assert res["n_queries"] == plain["n_queries"] and res["whitening"] == plain["whitening"]
    # the distractor store was indexed with the dataset's whitening, which the second run left as it was
    w_store, w_dist = load_whitening(Store(store_path)), load_whitening(Store(dist_path))
    for a in ("mean", "proj", "eigvals"):
        np.testing.assert_array_equal(getattr(w_dist, a), getattr(w_store, a))
        np.testing.assert_array_equal(getattr(w_store, a), getattr(w_plain, a))
    dist = Store(dist_path)
    assert dist.manifest["index"]["whitening"] == plain["whitening"]
    assert json.loads((dist_path / "index" / "rmac" / "manifest.json").read_text())["shards"][0]["ntotal"] == 8
    np.testing.assert_allclose(np.linalg.norm(dist.arrays["rmac"][:], axis=1), 1.0, atol=1e-5)
    # the dataset's own vectors are unchanged, so more images can only push positives down: without
    # query expansion (whose expanded query depends on the list) no method's mAP can rise
    for name in ("mac", "rmac", "mac+aml", "rmac+aml"):
        assert res["methods"][name]["map"] <= plain["methods"][name]["map"], name
    for m in res["methods"].values():
        assert all(0.0 <= m[k] <= 100.0 for k in METRICS)


# ------------------------------------------------------------------------------------------- extract
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``bad``: only unusable files (every kind); ``mixed``: two photos and three unusable files."""
    root = tmp_path_factory.mktemp("folders")
    expected = write_bad_files(root / "bad")
    for name, outcome in expected.items():
        if outcome == "ok":
            (root / "bad" / name).unlink()
    bad = {name: reason for name, reason in expected.items() if reason != "ok" and name != "folder.jpg"}
    (root / "mixed").mkdir()
    for name in ("christ_2.jpg", "aero_1.jpg"):
        shutil.copy(JPG / name, root / "mixed" / name)
    mixed = {n: bad[n] for n in ("empty.jpg", "text.jpg", "truncated.jpg")}
    for n in mixed:
        shutil.copy(root / "bad" / n, root / "mixed" / n)
    return root, bad, mixed


@pytest.fixture(scope="module")
def mixed_extract(rmac_cli, folders):
    root = folders[0]
    proc = rmac_cli("extract", root / "mixed", "--store", root / "mixed-store", "--max-size", MAX_SIZE)
    return proc, root / "mixed-store"


def test_extract_a_folder_of_only_bad_files_fails_and_lists_them(rmac_cli, folders):
    root, bad, _ = folders
    proc = rmac_cli("extract", root / "bad", "--store", root / "bad-store", "--max-size", MAX_SIZE)
    check_clean(proc)
    assert proc.returncode != 0
    assert f"extracted 0 of {len(bad)} images" in proc.stdout
    assert f"{len(bad)} failed:" in proc.stdout
    listed = {ln.strip().split(": ")[0]: ln.strip().split(": ")[1] for ln in proc.stdout.splitlines()
              if ln.startswith("  ")}
    assert listed == bad, proc.stdout


def test_extract_a_mixed_folder_succeeds_and_lists_the_failures(mixed_extract, folders):
    proc, store_path = mixed_extract
    _, _, mixed = folders
    check_clean(proc)
    assert proc.returncode == 0, proc.stderr
    assert "extracted 2 of 5 images" in proc.stdout and "3 failed:" in proc.stdout
    listed = {ln.strip().split(": ")[0]: ln.strip().split(": ")[1] for ln in proc.stdout.splitlines()
              if ln.startswith("  ")}
    assert listed == mixed, proc.stdout
    store = Store(store_path)
    assert store.valid_rows().tolist() == [i in ("aero_1.jpg", "christ_2.jpg") for i in store.ids]


# -------------------------------------------------------------------------------------------- search
def test_search_json_png_and_html(rmac_cli, dev_store, tmp_path):
    png, page = tmp_path / "hits.png", tmp_path / "hits.html"
    proc = rmac_cli("search", dev_store.path, QUERY, "--json", "--show", 5, "--png", png, "--html", page)
    check_clean(proc)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["query"] == {"image": str(QUERY), "bbox": [0.0, 0.0, 800.0, 535.0], "image_hw": [535, 800]}
    assert set(res["timings"]) == {"extract_s", "filter_s", "rerank_s", "qe_s"}
    assert all(isinstance(v, float) and v >= 0 for v in res["timings"].values())
    hits = res["hits"]
    assert [h["rank"] for h in hits] == list(range(5))
    assert hits[0]["id"] == "christ_1" and hits[0]["initial_rank"] == 0  # the query photo itself
    assert "christ_2" in [h["id"] for h in hits[:3]]
    store = dev_store.store
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    for h in hits:
        r = store.ids.index(h["id"])
        assert h["path"] == store.paths[r] and os.path.isfile(h["path"])
        H, W = h["image_hw"]
        assert [H, W] == [int(v) for v in store.arrays["image_hw"][r]]
        x1, y1, x2, y2 = h["box"]
        assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H, h
    # the PNG: query plus 5 hits, the query box in blue, the AML boxes in magenta
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width >= 6 * 256
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    for colour in (BLUE, MAGENTA):
        assert (pixels == colour).all(axis=1).sum() > 500, colour
    # the HTML page: every hit, in rank order, with its thumbnail
    text = page.read_text()
    assert "<title>rmac search: christ_1</title>" in text
    positions = [text.index(f'data-id="{h["id"]}" data-rank="{h["rank"]}"') for h in hits]
    assert positions == sorted(positions)
    assert text.count("data:image/jpeg;base64,") == 6
    assert "wrote" in proc.stderr and str(png) in proc.stderr and str(page) in proc.stderr


@pytest.fixture(scope="module")
def other_stores(client, tmp_path_factory):
    """Indexed two-photo stores of other configurations: max size 256, and random weights."""
    root = tmp_path_factory.mktemp("other")
    items = [(i, str(JPG / f"{i}.jpg")) for i in ("distractor_140", "distractor_141")]
    out = {}
    for name, choice, size in (("size256", ModelChoice(), 256), ("random", ModelChoice(random_weights=True), MAX_SIZE)):
        extract(items, str(root / name), client, choice, size, partition_size=2, progress=False)
        build_index(Store(root / name), client, progress=False)
        out[name] = root / name
    return out


ERRORS = {
    # case: (arguments after `rmac search`, words the message must hold)
    "box outside the image": (["{store}", QUERY, "--bbox", 5000, 5000, 6000, 6000], ["outside", "800x535"]),
    "empty box": (["{store}", QUERY, "--bbox", 100, 50, 100, 200], ["empty", "x1 < x2"]),
    "text file named .jpg": (["{store}", "{text}"], ["query image", "text.jpg", "not_an_image"]),
    "missing query image": (["{store}", "{missing}"], ["query image", "nothere.jpg", "unreadable",
                                                      "No such file"]),
    "store never indexed": (["{mixed}", QUERY], ["never indexed", "rmac index"]),
    "not a store": (["{empty}", QUERY], ["not an rmac store"]),
    "no such store": (["{missing_store}", QUERY], ["not an rmac store"]),
    "distractors of another max size": (["{store}", QUERY, "--distractors", "{size256}"],
                                        ["efficientnet-lite0/256", "efficientnet-lite0/384"]),
    "random-weight store": (["{random}", QUERY], ["random-weight"]),
    "random-weight distractors": (["{store}", QUERY, "--distractors", "{random}"], ["random weights"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_search_user_errors(case, rmac_cli, dev_store, mixed_extract, other_stores, tmp_path):
    (tmp_path / "text.jpg").write_text("this is not a JPEG\n")
    (tmp_path / "empty").mkdir()
    where = {"store": dev_store.path, "text": tmp_path / "text.jpg", "missing": tmp_path / "nothere.jpg",
             "mixed": mixed_extract[1], "empty": tmp_path / "empty", "missing_store": tmp_path / "no-store",
             **other_stores}
    args, words = ERRORS[case]
    line = user_error(rmac_cli("search", *[str(a).format(**{k: str(v) for k, v in where.items()}) for a in args]))
    for w in words:
        assert w in line, (case, line)


# ------------------------------------------------------------------------------ bad input, every class
# Each case runs through `rmac.workflows.cli.main` as the console script does; it must end with exit
# status 2 and exactly one line on stderr, `rmac CMD: error: ...` holding the words listed, and no traceback.
# Placeholders: {file} an existing file, {dir} an empty folder, {missing} a path that does not exist,
# {under_file} a path below a file, {jpg} a photo, {odd} a name with a newline, {bad} with undecodable bytes.
PARSE_ERRORS = {
    # numeric options out of range
    "extract --partition-size 0": (["extract", "{dir}", "--store", "{missing}", "--partition-size", "0"],
                                   ["--partition-size", ">= 1", "got 0"]),
    "extract --partition-size -3": (["extract", "{dir}", "--store", "{missing}", "--partition-size", "-3"],
                                    ["--partition-size", "got -3"]),
    "extract --partition-size x": (["extract", "{dir}", "--store", "{missing}", "--partition-size", "x"],
                                   ["--partition-size", "'x' is not a whole number"]),
    "extract --levels 0": (["extract", "{dir}", "--store", "{missing}", "--levels", "0"], ["--levels", "1..255"]),
    "extract --levels 300": (["extract", "{dir}", "--store", "{missing}", "--levels", "300"], ["--levels", "300"]),
    "extract --max-size 0": (["extract", "{dir}", "--store", "{missing}", "--max-size", "0"], ["--max-size", "32.."]),
    "extract --max-size -5": (["extract", "{dir}", "--store", "{missing}", "--max-size", "-5"], ["--max-size"]),
    "extract --workers 0": (["extract", "{dir}", "--store", "{missing}", "--workers", "0"], ["--workers", ">= 1"]),
    "extract --workers -1": (["extract", "{dir}", "--store", "{missing}", "--workers", "-1"], ["--workers"]),
    "index --dim 0": (["index", "{dir}", "--dim", "0"], ["--dim", ">= 1"]),
    "index --dim -4": (["index", "{dir}", "--dim", "-4"], ["--dim"]),
    "index --shard-rows 0": (["index", "{dir}", "--shard-rows", "0"], ["--shard-rows"]),
    "index --levels-l 0": (["index", "{dir}", "--levels-l", "0"], ["--levels-l", "1..10"]),
    "search --top-n 0": (["search", "{dir}", "{jpg}", "--top-n", "0"], ["--top-n", ">= 1"]),
    "search --top-n -1": (["search", "{dir}", "{jpg}", "--top-n", "-1"], ["--top-n"]),
    "search --qe -1": (["search", "{dir}", "{jpg}", "--qe", "-1"], ["--qe", ">= 0"]),
    "search --show 0": (["search", "{dir}", "{jpg}", "--show", "0"], ["--show"]),
    "search --bbox nan": (["search", "{dir}", "{jpg}", "--bbox", "nan", "0", "10", "10"], ["--bbox", "finite"]),
    "search --bbox inf": (["search", "{dir}", "{jpg}", "--bbox", "0", "0", "inf", "10"], ["--bbox", "finite"]),
    "evaluate --top-n 0": (["evaluate", "dev", "--top-n", "0"], ["--top-n"]),
    "evaluate --qe -2": (["evaluate", "dev", "--qe", "-2"], ["--qe"]),
    "demo --top 0": (["demo", "--top", "0"], ["--top"]),
    "make-views --scene-size 0": (["make-views", "dev", "{missing}", "--scene-size", "0", "600"], ["--scene-size"]),
    "make-views --scale-range 0": (["make-views", "dev", "{missing}", "--scale-range", "0", "0.5"], ["--scale-range"]),
    "make-views --scale-range 1.5": (["make-views", "dev", "{missing}", "--scale-range", "0.1", "1.5"],
                                     ["--scale-range"]),
    "make-views --scale-range min > max": (["make-views", "dev", "{missing}", "--scale-range", "0.4", "0.1"],
                                           ["scale range", "min <= max"]),
    "make-views --seed -1": (["make-views", "dev", "{missing}", "--seed", "-1"], ["--seed"]),
    "bench extract --images 0": (["bench", "extract", "--images", "0"], ["--images"]),
    "bench extract --workers 0": (["bench", "extract", "--workers", "0"], ["--workers"]),
    "bench search --queries 0": (["bench", "search", "--queries", "0"], ["--queries"]),
    "bench search --top-n 0": (["bench", "search", "--top-n", "0"], ["--top-n"]),
    "bench aml --maps 0": (["bench", "aml", "--maps", "0"], ["--maps"]),
    "bench aml --map-shape 1,2": (["bench", "aml", "--map-shape", "1,2"], ["--map-shape", "expected 3"]),
    "bench aml --map-shape 0,2,2": (["bench", "aml", "--map-shape", "0,2,2"], ["--map-shape", "'0'"]),
    "bench aml --steps 1,x": (["bench", "aml", "--steps", "1,x"], ["--steps", "'x'"]),
    "bench aml --ratios 0.5": (["bench", "aml", "--ratios", "0.5"], ["--ratios"]),
    "bench aml --zeros 1.5": (["bench", "aml", "--zeros", "1.5"], ["--zeros"]),
    "bench aml --threads 0": (["bench", "aml", "--threads", "0"], ["--threads"]),
    "bench quantisation --levels 0,7": (["bench", "quantisation", "--levels", "0,7"], ["--levels", "'0'"]),
    "bench quantisation --redraws -1": (["bench", "quantisation", "--redraws", "-1"], ["--redraws", ">= 0"]),
    "bench quantisation --top-n -1": (["bench", "quantisation", "--top-n", "-1"], ["--top-n"]),
    # paths of the wrong kind
    "extract missing images": (["extract", "{missing}", "--store", "{dir}"], ["images", "no such file or folder"]),
    "extract --store is a file": (["extract", "{dir}", "--store", "{file}"], ["--store", "is a file"]),
    "extract --store below a file": (["extract", "{dir}", "--store", "{under_file}"], ["--store", "is a file"]),
    "extract --weights a folder": (["extract", "{dir}", "--store", "{missing}", "--weights", "{dir}"],
                                   ["--weights", "is a folder"]),
    "extract --weights missing": (["extract", "{dir}", "--store", "{missing}", "--weights", "{missing}"],
                                  ["--weights", "no such file"]),
    "index a file": (["index", "{file}"], ["store", "not a folder"]),
    "index missing": (["index", "{missing}"], ["store", "no such folder"]),
    "index --whiten-on a file": (["index", "{dir}", "--whiten-on", "{file}"], ["--whiten-on", "not a folder"]),
    "search --png in a missing folder": (["search", "{dir}", "{jpg}", "--png", "{missing}/x.png"],
                                         ["--png", "does not exist"]),
    "search --html is a folder": (["search", "{dir}", "{jpg}", "--html", "{dir}"], ["--html", "is a folder"]),
    "evaluate --json is a folder": (["evaluate", "dev", "--json", "{dir}"], ["--json", "is a folder"]),
    "evaluate --distractors missing": (["evaluate", "dev", "--distractors", "{missing}"], ["--distractors"]),
    "evaluate --whiten-on a file": (["evaluate", "dev", "--whiten-on", "{file}"], ["--whiten-on"]),
    "evaluate --store is a file": (["evaluate", "dev", "--store", "{file}"], ["--store", "is a file"]),
    "demo --report below a file": (["demo", "--report", "{under_file}"], ["--report", "is a file"]),
    "demo --store is a file": (["demo", "--store", "{file}"], ["--store"]),
    "make-views OUT is a file": (["make-views", "dev", "{file}"], ["out", "is a file"]),
    "make-views missing SRC": (["make-views", "{missing}", "{dir}"], ["no such dataset"]),
    "bench aml --data missing": (["bench", "aml", "--data", "{missing}"], ["--data"]),
    "search --query-scales 0": (["search", "{dir}", "{jpg}", "--query-scales", "0"], ["--query-scales", "[0.1, 2]"]),
    "search --query-scales 1,1": (["search", "{dir}", "{jpg}", "--query-scales", "1,1"], ["--query-scales", "twice"]),
    "evaluate --query-scales x": (["evaluate", "dev", "--query-scales", "1,x"], ["--query-scales", "not a number"]),
    "evaluate --query-scales too many": (["evaluate", "dev", "--query-scales", "1,.9,.8,.7,.6,.5,.4,.3,.2"],
                                         ["--query-scales", "at most 8"]),
    "bench localisation without 1": (["bench", "localisation", "{dir}", "--store", "{dir}", "--scales", "0.5"],
                                     ["--scales", "include 1"]),
    # names that are not plain text
    "extract --store with a newline": (["extract", "{dir}", "--store", "{odd}"], ["--store", "control characters"]),
    "extract --store not UTF-8": (["extract", "{dir}", "--store", "{bad}"], ["--store", "not UTF-8"]),
    "index a store named with a newline": (["index", "{odd}"], ["store", "control characters"]),
    # a scheduler address that is not one
    "--scheduler without a port": (["index", "{dir}", "--scheduler", "foo"], ["Dask scheduler", "foo", "port"]),
    # options that do not exist or are missing
    "search --queries missing": (["search", "{dir}", "--queries", "{missing}"], ["--queries", "no such file"]),
    "extract without --store": (["extract", "{dir}"], ["required", "--store"]),
    "unknown subcommand": (["frobnicate"], ["invalid choice", "frobnicate"]),
}


@pytest.fixture
def places(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file.txt").write_text("x\n")
    return {"file": str(tmp_path / "a-file.txt"), "dir": str(tmp_path / "empty"), "missing": str(tmp_path / "nothere"),
            "under_file": str(tmp_path / "a-file.txt" / "sub"), "jpg": str(QUERY),
            "odd": str(tmp_path / "new\nline"), "bad": os.fsdecode(os.fsencode(str(tmp_path)) + b"/bad\xff\xfe")}


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    """`cli.main(argv)` as the console script runs it: its exit status, stdout and stderr."""
    from rmac.workflows import cli

    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("case", list(PARSE_ERRORS))
def test_bad_option_values_get_one_line(case, places, capsys):
    args, words = PARSE_ERRORS[case]
    argv = [a.format(**places) for a in args]
    code, out, err = run_main(capsys, argv)
    assert code == 2, (case, code, err)
    assert "Traceback" not in err and out == "", (case, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rmac") and ": error: " in lines[0], err
    for w in words:
        assert w in lines[0], (case, lines[0])
    assert not os.path.exists(places["missing"])  # nothing was created


def _revisited_pkl(root, easy) -> str:
    import pickle

    root.mkdir()
    gnd = [{"bbx": [0.0, 0.0, 10.0, 10.0], "easy": np.array(easy), "hard": np.array([], np.int64),
            "junk": np.array([], np.int64)}]
    (root / "gnd_r.pkl").write_bytes(pickle.dumps({"imlist": ["christ_2", "distractor_100"],
                                                   "qimlist": ["christ_1"], "gnd": gnd}))
    return str(root / "gnd_r.pkl")


def _oxford_copy(root, query: bytes = b"christ_1 0 0 100 100\n", good: bytes = b"christ_2\n") -> str:
    (root / "jpg").mkdir(parents=True)
    (root / "gt").mkdir()
    for i in ("christ_1", "christ_2", "distractor_100"):
        shutil.copy(JPG / f"{i}.jpg", root / "jpg" / f"{i}.jpg")
    (root / "gt" / "c_query.txt").write_bytes(query)
    (root / "gt" / "c_good.txt").write_bytes(good)
    return str(root)


# Bad input found once the job runs (file contents, values that only make sense together), through
# the console script against the test cluster.
JOB_ERRORS = {
    "extract: image list not UTF-8": (
        lambda t: ["extract", _write(t / "list.txt", b"a.jpg\n\xff\xfe.jpg\n"), "--store", t / "s"],
        ["list.txt", "line 2 is not UTF-8"]),
    "extract: levels beyond exact re-ranking": (
        lambda t: ["extract", JPG, "--store", t / "s", "--levels", "200", "--max-size", "1024"],
        ["--levels 200", "--max-size 1024"]),
    "evaluate: ground truth names unknown images": (
        lambda t: ["evaluate", _oxford_copy(t / "ox", good=b"christ_2\nchrist_22\n"), "--store", t / "s"],
        ["not in the dataset", "'christ_22'", "--allow-unknown"]),
    "evaluate: malformed number": (
        lambda t: ["evaluate", _oxford_copy(t / "ox", query=b"christ_1 0 0 1OO 100\n"), "--store", t / "s"],
        ["c_query.txt", "'1OO' is not a number"]),
    "evaluate: ground truth not UTF-8": (
        lambda t: ["evaluate", _oxford_copy(t / "ox", good=b"christ_2\n\xe9t\xe9\n"), "--store", t / "s"],
        ["c_good.txt", "not UTF-8"]),
    "evaluate: revisited index out of range": (
        lambda t: ["evaluate", _revisited_pkl(t / "rev", [5]), "--store", t / "s"],
        ["gnd_r.pkl", "index 5 is out of range"]),
    "evaluate: revisited negative index": (
        lambda t: ["evaluate", _revisited_pkl(t / "rev", [-1]), "--store", t / "s"], ["index -1"]),
    "evaluate: JSON dataset not JSON": (
        lambda t: ["evaluate", _write(t / "d.json", b"{\"name\": "), "--store", t / "s"], ["d.json", "not valid JSON"]),
    "evaluate: a dataset without queries": (
        lambda t: ["evaluate", _write(t / "d.json", json.dumps({"name": "noq", "image_root": str(JPG),
                                                                 "images": ["christ_1"], "queries": []}).encode()),
                   "--store", t / "s"], ["noq", "0 queries", "nothing to evaluate"]),
    "evaluate: unknown method": (
        lambda t: ["evaluate", "dev", "--methods", "rmac,bogus", "--store", t / "s"], ["--methods", "bogus"]),
}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(JOB_ERRORS))
def test_bad_input_found_by_the_job_gets_one_line(case, rmac_cli, tmp_path):
    make, words = JOB_ERRORS[case]
    args = make(tmp_path)
    line = user_error(rmac_cli(*args), args[0])
    for w in words:
        assert w in line, (case, line)
    assert not (tmp_path / "s").exists()  # refused before a store was made


# --------------------------------------------------------------------------------- make-views source
@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_make_views_never_touches_its_source(rmac_cli, tmp_path, where):
    src = Path(_oxford_copy(tmp_path / "src"))
    (src / "gt" / "d_query.txt").write_text("distractor_100 0 0 50 50\n")
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    out = {"same": src, "inside": src / "views", "around": tmp_path}[where]
    line = user_error(rmac_cli("make-views", src, out, "--overwrite", scheduler_arg=False), "make-views")
    assert "source folder" in line and str(out) in line
    after = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert after == before and not (src / "views").exists()


# --------------------------------------------------------------------------------------- Dask tasks
def test_user_error_inside_a_dask_task_is_one_line(rmac_cli, dev_store, tmp_path):
    """A user error raised in a task on a LocalCluster started by the command itself: the worker's
    "Compute Failed ... Traceback" block is not printed, only the one line."""
    (tmp_path / "text.jpg").write_text("not a JPEG\n")
    proc = rmac_cli("search", dev_store.path, tmp_path / "text.jpg", "--workers", "1", scheduler_arg=False,
                    timeout=600)
    assert "Compute Failed" not in proc.stderr, proc.stderr
    line = user_error(proc)
    assert "query image" in line and "not_an_image" in line


# ------------------------------------------------------------------------------------ full disk, index
def _limit_file_size(limit: int):
    def set_limit() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


def test_index_on_a_full_disk_fails_and_keeps_the_previous_index(rmac_cli, dev_store, tmp_path):
    """The FAISS shards are written by workers whose files may not exceed 128 kB (RLIMIT_FSIZE: a real
    kernel refusal, like a full disk; the store's 16-row vector chunks fit, a new 44-row shard of
    1280-D vectors does not). `--refit` makes it a full re-index (an indexed store would otherwise only
    index new partitions, and there are none). `rmac index` must fail with one line naming the file,
    leave every shard and manifest of the previous index byte for byte, each shard whole (as many
    vectors as its manifest says), and no temporary file."""
    from conftest import CLUSTER_SCRIPT, _stop_cluster, cli_env

    from rmac.storage.index import load_shard

    store = tmp_path / "store"
    shutil.copytree(dev_store.path, store)
    index = store / "index"
    previous = {p: p.read_bytes() for k in ("rmac", "macw") for p in sorted((index / k).iterdir()) if p.is_file()}
    manifests = [p for p in previous if p.suffix == ".json"]
    assert manifests and any(p.suffix == ".faiss" for p in previous)
    state = tmp_path / "limited-cluster"
    try:
        out = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", str(state), "1"], env=cli_env(),
                             capture_output=True, text=True, timeout=120, check=True,
                             preexec_fn=_limit_file_size(128 * 1024))
        address = out.stdout.strip().splitlines()[-1]
        proc = rmac_cli("index", store, "--refit", "--scheduler", address, scheduler_arg=False, timeout=600)
        worker_log = (state / "worker1.log").read_text(errors="replace")
    finally:
        _stop_cluster(state)
    # the progress bars of the steps that ran before the failure are not messages
    proc.stderr = "\n".join(ln for ln in proc.stderr.splitlines() if "%|" not in ln)
    line = user_error(proc, "index")
    assert "File too large" in line and ".faiss" in line, line
    assert "Compute Failed" not in worker_log and "File too large" not in worker_log  # the worker kept quiet
    assert all(p.read_bytes() == data for p, data in previous.items())
    for m in manifests:
        for e in json.loads(m.read_text())["shards"]:
            assert load_shard(m.parent / e["file"]).ntotal == e["ntotal"]
    assert not list(index.rglob("*.tmp"))
    # with room again, the same command succeeds and the store answers
    ok = rmac_cli("index", store)
    check_clean(ok)
    assert ok.returncode == 0, ok.stderr
    found = rmac_cli("search", store, QUERY, "--json")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["hits"][0]["id"] == "christ_1"
