"""make-views on a small copy of the dev set: determinism, recorded boxes, the object really pasted
where recorded, and outputs that load back as datasets."""

import argparse
import json
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from rmac.data import LANDMARKS_DEV
from rmac.storage.datasets import load_json, load_oxford
from rmac.workflows import views
from rmac.workflows.views import (QUERY_SUFFIX, SELF_SUFFIX, ViewParams, make_views, paste_object,
                                  perspective_coeffs, random_quad, self_paste_source)

QUERIES = ["aero_1", "aero_2", "box_1", "eiffel_2"]
LANDMARKS = ["aero_1", "aero_2", "box_1", "box_2", "eiffel_1", "eiffel_2", "eiffel_3"]
DISTRACTORS = ["distractor_001", "distractor_017", "distractor_042", "distractor_077", "distractor_120",
               "distractor_150"]
POSITIVES = ["aero_1", "aero_2", "box_2", "eiffel_1", "eiffel_3"]  # good for some query above
SCALE = (0.05, 0.40)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Four queries of the dev set with their images, six distractors and the attribution files."""
    root = tmp_path_factory.mktemp("src")
    (root / "jpg").mkdir()
    (root / "gt").mkdir()
    for q in QUERIES:
        for kind in ("query", "good", "ok", "junk"):
            shutil.copyfile(LANDMARKS_DEV / "gt" / f"{q}_{kind}.txt", root / "gt" / f"{q}_{kind}.txt")
    for i in LANDMARKS + DISTRACTORS:
        shutil.copyfile(LANDMARKS_DEV / "jpg" / f"{i}.jpg", root / "jpg" / f"{i}.jpg")
    shutil.copyfile(LANDMARKS_DEV / "ATTRIBUTION.md", root / "ATTRIBUTION.md")
    shutil.copytree(LANDMARKS_DEV / "licenses", root / "licenses")
    return root


@pytest.fixture(scope="module")
def out(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("views") / "a"
    summary = make_views(src, out, seed=7, scale_range=SCALE)
    assert summary["views"] == len(POSITIVES)
    return out


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_through_the_cli(src, out, tmp_path):
    parser = argparse.ArgumentParser()
    views.add_arguments(parser)
    args = parser.parse_args([str(src), str(tmp_path / "b"), "--seed", "7", "--scale-range", *map(str, SCALE)])
    assert views.main(args) == 0
    a, b = _files(out), _files(tmp_path / "b")
    assert sorted(a) == sorted(b)
    assert all(a[k] == b[k] for k in a)
    other = make_views(src, tmp_path / "c", seed=8, scale_range=SCALE)
    c = _files(tmp_path / "c")
    assert all(a[f"jpg/{i}.jpg"] != c[f"jpg/{i}.jpg"] for i in POSITIVES)
    assert other["images"] == len([k for k in c if k.startswith("jpg/")])


def test_output_layout_and_copies(src, out):
    names = {p.name for p in out.iterdir()}
    assert {"jpg", "gt", "dataset.json", "views.json", "ATTRIBUTION.md", "licenses"} <= names
    assert "sources.json" not in names  # absent from this source, so not invented
    assert _files(out / "licenses") == _files(src / "licenses")
    # distractors and the untouched landmark (box_1, eiffel_2: junk or query only) are byte copies
    for i in DISTRACTORS + ["box_1", "eiffel_2"]:
        assert (out / "jpg" / f"{i}.jpg").read_bytes() == (src / "jpg" / f"{i}.jpg").read_bytes()
    # query photos whose database entry became a view keep an untouched copy
    for i in ("aero_1", "aero_2"):
        assert (out / "jpg" / f"{i}{QUERY_SUFFIX}.jpg").read_bytes() == (src / "jpg" / f"{i}.jpg").read_bytes()
        assert (out / "jpg" / f"{i}.jpg").read_bytes() != (src / "jpg" / f"{i}.jpg").read_bytes()


def test_ground_truth_loads_back(src, out):
    before = load_oxford(src)
    text = load_oxford(out)
    js = load_json(out / "dataset.json")
    assert text.images == js.images == sorted(LANDMARKS + DISTRACTORS + [f"aero_1{QUERY_SUFFIX}",
                                                                         f"aero_2{QUERY_SUFFIX}"])
    for q0, qt, qj in zip(before.queries, text.queries, js.queries):
        assert q0.name == qt.name == qj.name
        assert qt.image == qj.image and qt.bbox == qj.bbox == q0.bbox
        assert qt.ok == qj.ok == q0.ok
        assert qt.junk == qj.junk and set(q0.junk) <= set(qt.junk)
        assert sorted(qj.boxes) == sorted(q0.ok)
    aero = js.query("aero_1")
    assert aero.image == f"aero_1{QUERY_SUFFIX}"
    assert aero.junk == ["aero_1", f"aero_1{QUERY_SUFFIX}", f"aero_2{QUERY_SUFFIX}"]
    eiffel = js.query("eiffel_2")
    assert eiffel.image == "eiffel_2" and eiffel.junk == ["eiffel_2"]
    assert all(js.image_paths[i].is_file() for i in js.images)


def test_recorded_boxes_inside_and_sized(out):
    js = load_json(out / "dataset.json")
    record = json.loads((out / "views.json").read_text())
    assert record["params"]["seed"] == 7 and record["params"]["scale_range"] == list(SCALE)
    for q in js.queries:
        for img, (x1, y1, x2, y2) in q.boxes.items():
            W, H = Image.open(js.image_paths[img]).size
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
            frac = (x2 - x1) * (y2 - y1) / (W * H)
            assert SCALE[0] - 1e-6 <= frac <= SCALE[1] + 1e-6
            assert record["views"][img]["box"] == [x1, y1, x2, y2]


def _gray(img, n=24):
    return np.asarray(img.convert("L").resize((n, n), Image.Resampling.BOX), np.float64).ravel()


def _rectify(view, quad, size):
    """Undo the recorded perspective: the view's quad mapped back onto a `size` rectangle."""
    rw, rh = size
    c = perspective_coeffs([[0, 0], [rw, 0], [rw, rh], [0, rh]], quad)
    return view.transform((rw, rh), Image.Transform.PERSPECTIVE, c, Image.Resampling.BILINEAR)


def test_object_is_where_recorded(src, out):
    rec = json.loads((out / "views.json").read_text())["views"]
    assert sorted(rec) == POSITIVES
    for k, img in enumerate(POSITIVES):
        source = Image.open(src / "jpg" / f"{img}.jpg").crop(tuple(int(v) for v in rec[img]["cut"]))
        own = _rectify(Image.open(out / "jpg" / f"{img}.jpg"), rec[img]["quad"], rec[img]["object_size"])
        other_img = POSITIVES[(k + 1) % len(POSITIVES)]  # same region shape, wrong view: a control
        other = _rectify(Image.open(out / "jpg" / f"{other_img}.jpg"), rec[other_img]["quad"],
                         rec[img]["object_size"])
        r_own = np.corrcoef(_gray(own), _gray(source))[0, 1]
        r_other = np.corrcoef(_gray(other), _gray(source))[0, 1]
        assert r_own > 0.9, (img, r_own)
        assert r_own > r_other + 0.2, (img, r_own, r_other)


@pytest.mark.parametrize("seed", range(12))
def test_paste_changes_only_the_box(seed):
    rng = np.random.default_rng(seed)
    scene = Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8))
    ow, oh = [(300, 200), (40, 400), (500, 60), (333, 333)][seed % 4]
    obj = Image.new("RGB", (ow, oh), (250, 20, 20))
    p = ViewParams(scale_range=SCALE)
    out, (x1, y1, x2, y2), rec = paste_object(scene, obj, rng, p)
    assert 0 <= x1 < x2 <= 800 and 0 <= y1 < y2 <= 600
    frac = (x2 - x1) * (y2 - y1) / (800 * 600)
    assert frac == pytest.approx(rec["area_fraction"], rel=1e-9)
    assert SCALE[0] <= frac <= SCALE[1]
    a, b = np.asarray(scene), np.asarray(out)
    inside = np.zeros((600, 800), bool)
    inside[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = True
    changed = (a != b).any(axis=2)
    assert not changed[~inside].any()
    # what changed is the warped quad: its area, up to its antialiased outline
    quad = np.array(rec["quad"])
    area = 0.5 * abs(np.dot(quad[:, 0], np.roll(quad[:, 1], 1)) - np.dot(quad[:, 1], np.roll(quad[:, 0], 1)))
    perimeter = np.linalg.norm(quad - np.roll(quad, 1, axis=0), axis=1).sum()
    assert abs(changed.sum() - area) < perimeter
    cx, cy = np.mean(rec["quad"], axis=0).astype(int)
    assert b[cy, cx, 0] > 120 and b[cy, cx, 1] < 120


def test_perspective_coeffs_map_the_points():
    rng = np.random.default_rng(0)
    for _ in range(50):
        dst = random_quad(rng.uniform(20, 500), rng.uniform(20, 500), rng, ViewParams())
        src = np.array([[0, 0], [1, 0], [1, 1], [0, 1]]) * rng.uniform(10, 900, size=2)
        a, b, c, d, e, f, g, h = perspective_coeffs(dst, src)
        for (x, y), (u, v) in zip(dst, src):
            w = g * x + h * y + 1
            assert (a * x + b * y + c) / w == pytest.approx(u, abs=1e-6)
            assert (d * x + e * y + f) / w == pytest.approx(v, abs=1e-6)
        assert dst.min(axis=0) == pytest.approx([0, 0])


def test_refuses_non_empty_output_unless_overwrite(src, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        make_views(src, tmp_path / "o")
    (tmp_path / "o" / "gt").mkdir()
    (tmp_path / "o" / "gt" / "stale_query.txt").write_text("gone 0 0 1 1\n")
    make_views(src, tmp_path / "o", overwrite=True)
    assert (tmp_path / "o" / "keep.txt").exists() and not (tmp_path / "o" / "gt" / "stale_query.txt").exists()
    assert len(load_oxford(tmp_path / "o").queries) == len(QUERIES)


def test_revisited_source(tmp_path):
    """Revisited queries are outside the database: their photos are copied and junk for themselves."""
    root = tmp_path / "rsrc"
    (root / "jpg").mkdir(parents=True)
    db = ["aero_2", "box_2"] + DISTRACTORS[:3]
    for i in db + ["aero_1", "box_1"]:
        shutil.copyfile(LANDMARKS_DEV / "jpg" / f"{i}.jpg", root / "jpg" / f"{i}.jpg")
    gnd = [{"bbx": [0.0, 0.0, 640.0, 480.0], "easy": np.array([0]), "hard": np.array([], np.int64),
            "junk": np.array([], np.int64)},
           {"bbx": [10.0, 10.0, 300.0, 200.0], "easy": np.array([], np.int64), "hard": np.array([1]),
            "junk": np.array([0])}]
    (root / "gnd_rtoy.pkl").write_bytes(pickle.dumps({"imlist": db, "qimlist": ["aero_1", "box_1"], "gnd": gnd}))
    make_views(root / "gnd_rtoy.pkl", tmp_path / "out", seed=1)
    js = load_json(tmp_path / "out" / "dataset.json")
    assert js.revisited and js.images == sorted(db + ["aero_1", "box_1"])
    aero, box = js.queries
    assert (aero.image, aero.easy, aero.hard, aero.junk) == ("aero_1", ["aero_2"], [], ["aero_1"])
    assert (box.image, box.easy, box.hard, box.junk) == ("box_1", [], ["box_2"], ["aero_2", "box_1"])
    assert sorted(aero.boxes) == ["aero_2"] and sorted(box.boxes) == ["box_2"]
    assert load_oxford(tmp_path / "out").images == js.images


def test_self_pastes_are_the_query_photo_itself_with_exact_boxes(src, tmp_path):
    """`self_pastes=2`: each query photo (cut to its query box) is pasted into 2 cluttered scenes, listed
    as positives of its own query (and of the queries that have the photo as a positive) with the pasted
    box; the rectified paste is the query's own content."""
    out = tmp_path / "self"
    summary = make_views(src, out, seed=7, scale_range=SCALE, self_pastes=2)
    js = load_json(out / "dataset.json")
    rec = json.loads((out / "views.json").read_text())["views"]
    photos = sorted({q.image.removesuffix(QUERY_SUFFIX) for q in js.queries})
    assert summary["self_pastes"] == 2 * len(photos) and summary["views"] == len(POSITIVES)
    for q in js.queries:
        photo = q.image.removesuffix(QUERY_SUFFIX)
        own = [f"{photo}{SELF_SUFFIX}{k}" for k in range(2)]
        assert set(own) <= set(q.ok) and all(self_paste_source(i) == photo for i in own)
        plain = [i for i in q.ok if self_paste_source(i) is None]
        for i in q.ok:  # every positive has its exact box; self-pastes are of this photo or a positive's
            assert i in q.boxes and i in js.images
            assert self_paste_source(i) in (None, photo, *plain)
        for sid in own:
            r = rec[sid]
            assert r["self_paste_of"] == photo and r["box"] == list(q.boxes[sid])
            assert r["cut"] == list(q.bbox)
            W, H = Image.open(js.image_paths[sid]).size
            x1, y1, x2, y2 = q.boxes[sid]
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
            source = Image.open(src / "jpg" / f"{photo}.jpg").crop(tuple(int(v) for v in r["cut"]))
            got = _rectify(Image.open(js.image_paths[sid]), r["quad"], r["object_size"])
            assert np.corrcoef(_gray(got), _gray(source))[0, 1] > 0.9
    assert self_paste_source("christ_1") is None and self_paste_source("christ_1__self12") == "christ_1"
