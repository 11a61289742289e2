"""The `rmac` command line, run as a user runs it (the virtualenv's console script in a subprocess)
against a real cluster (`deploy/local-cluster.sh`: a scheduler and two worker processes):
`rmac evaluate` on a JSON dataset with and without a distractor store, `rmac extract` on bad and mixed
folders, `rmac search` output (JSON, PNG, HTML) and every kind of user error, which must end with exit
status 2 and one line saying what is wrong — never a traceback."""
from __future__ import annotations

import json
import os
import shutil

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
    plain = rmac_cli("evaluate", dataset, "--store", store, "--max-size", MAX_SIZE, "--json", out / "plain.json")
    check_clean(plain)
    assert plain.returncode == 0, plain.stderr
    w_plain = load_whitening(Store(store))
    with_d = rmac_cli("evaluate", dataset, "--store", store, "--max-size", MAX_SIZE, "--distractors", dist,
                      "--json", out / "with-distractors.json")
    check_clean(with_d)
    assert with_d.returncode == 0, with_d.stderr
    return (json.loads((out / "plain.json").read_text()), plain, w_plain,
            json.loads((out / "with-distractors.json").read_text()))


def test_evaluate_writes_the_documented_json(evaluated, eval_files, dev):
    res, proc, w, _ = evaluated
    assert {"dataset", "backbone", "max_size", "whitening", "n_images", "n_queries", "methods",
            "timings"} <= set(res)
    assert res["dataset"] == "dev-mini" and res["backbone"] == "efficientnet-lite0" and res["max_size"] == MAX_SIZE
    assert res["n_images"] == 20 and res["n_queries"] == 8
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
