"""Dataset loading: the embedded dev set in the Oxford format, the JSON form, the revisited pickle
through the restricted unpickler, and the index-list ground truth."""

import os
import pickle
import shutil

import numpy as np
import pytest

from rmac.data import LANDMARKS_DEV
from rmac.storage.datasets import (Dataset, DatasetError, Query, UnsafePickle, load_dataset, load_json,
                                   load_oxford, load_revisited, restricted_loads, save_json)


@pytest.fixture(scope="module")
def dev():
    return load_oxford(LANDMARKS_DEV)


def test_dev_set_counts(dev):
    assert len(dev.queries) == 29
    assert len(dev.images) == 186
    assert dev.images == sorted(dev.images)
    assert all(dev.image_paths[i].is_file() for i in dev.images)
    assert not dev.revisited


def test_dev_set_queries_as_in_the_files(dev):
    aero = dev.query("aero_1")
    assert aero.image == "aero_1"
    assert aero.bbox == (0.0, 0.0, 640.0, 480.0)
    assert aero.ok == ["aero_2"] and aero.junk == ["aero_1"]
    eiffel = dev.query("eiffel_2")
    assert eiffel.bbox == (0.0, 0.0, 180.0, 320.0)
    assert eiffel.ok == ["eiffel_1", "eiffel_3"] and eiffel.junk == ["eiffel_2"]
    assert dev.query("box_1").ok == ["box_2"]
    # box_2 is a positive but no query's image; every query image is in its own junk list
    assert "box_2" not in {q.image for q in dev.queries}
    assert all(q.image in q.junk for q in dev.queries)


def test_load_dataset_dispatch(dev, tmp_path):
    by_name = load_dataset("landmarks-dev")
    by_path = load_dataset(LANDMARKS_DEV)
    assert by_name.images == by_path.images == dev.images
    assert [q.name for q in by_name.queries] == [q.name for q in dev.queries]
    save_json(dev, tmp_path / "dev.json")
    assert load_dataset(tmp_path / "dev.json").images == dev.images
    with pytest.raises(DatasetError):
        load_dataset(tmp_path / "nowhere")


def test_gnd_index_form(dev):
    index_of = {img: k for k, img in enumerate(dev.images)}
    gnd = dev.gnd(index_of)
    assert len(gnd) == 29
    g = gnd[[q.name for q in dev.queries].index("tajmahal_1")]
    assert g["ok"] == [index_of["tajmahal_2"], index_of["tajmahal_3"]]
    assert g["junk"] == [index_of["tajmahal_1"]]
    assert g["bbx"] == [0.0, 0.0, 800.0, 526.0]
    assert "easy" not in g
    # an image missing from the index (failed extraction) is dropped, or raises when strict
    partial = {k: v for k, v in index_of.items() if k != "tajmahal_3"}
    g = dev.gnd(partial)[[q.name for q in dev.queries].index("tajmahal_1")]
    assert g["ok"] == [index_of["tajmahal_2"]]
    with pytest.raises(KeyError):
        dev.gnd(partial, strict=True)


def test_json_round_trip(dev, tmp_path):
    save_json(dev, tmp_path / "dev.json")
    back = load_json(tmp_path / "dev.json")
    assert back.name == dev.name and back.images == dev.images
    assert back.queries == dev.queries
    assert all(back.image_paths[i].resolve() == dev.image_paths[i].resolve() for i in dev.images)


def test_json_round_trip_optional_fields(tmp_path):
    (tmp_path / "jpg").mkdir()
    paths = {i: tmp_path / "jpg" / f"{i}.jpg" for i in ("a", "b", "c")}
    paths["d"] = tmp_path / "elsewhere" / "d.png"
    q = Query("q1", "a", (1.0, 2.5, 30.0, 40.0), ["b", "d"], ["c"], easy=["b"], hard=["d"],
              boxes={"b": (3.0, 4.0, 5.5, 6.0)})
    ds = Dataset("toy", tmp_path, ["a", "b", "c", "d"], paths, [q], revisited=True)
    save_json(ds, tmp_path / "toy.json")
    back = load_json(tmp_path / "toy.json")
    assert back.queries == [q] and back.revisited
    assert back.image_paths == paths
    assert back.gnd({"a": 0, "b": 1, "c": 2, "d": 3})[0] == {
        "ok": [1, 3], "junk": [2], "bbx": [1.0, 2.5, 30.0, 40.0], "easy": [1], "hard": [3]}


def test_oxford_query_prefix_and_missing_lists(tmp_path):
    (tmp_path / "jpg").mkdir()
    (tmp_path / "gt").mkdir()
    for i in ("all_souls_000013", "x", "y"):
        shutil.copyfile(LANDMARKS_DEV / "jpg" / "aero_1.jpg", tmp_path / "jpg" / f"{i}.jpg")
    (tmp_path / "gt" / "all_souls_1_query.txt").write_text("oxc1_all_souls_000013 136.5 34.1 648.5 955.7\n")
    (tmp_path / "gt" / "all_souls_1_good.txt").write_text("all_souls_000013\nx\n\n")
    (tmp_path / "gt" / "all_souls_1_ok.txt").write_text("y\n")
    ds = load_oxford(tmp_path)
    (q,) = ds.queries
    assert q.image == "all_souls_000013" and q.bbox == (136.5, 34.1, 648.5, 955.7)
    assert q.ok == ["all_souls_000013", "x", "y"] and q.junk == []
    (tmp_path / "gt" / "bad_query.txt").write_text("nothere 0 0 1 1\n")
    with pytest.raises(DatasetError, match="nothere"):
        load_oxford(tmp_path)


# ------------------------------------------------------------------------------------------ revisited
def _revisited_cfg():
    return {
        "imlist": ["db_a", "db_b", "db_c", "db_d"],
        "qimlist": ["q_1", "q_2"],
        "gnd": [
            {"bbx": np.array([10.0, 20.0, 110.0, 220.0]), "easy": np.array([0, 2]),
             "hard": np.array([3], dtype=np.int64), "junk": np.array([], dtype=np.int64)},
            {"bbx": [1.5, 2.5, 3.5, 4.5], "easy": [1], "hard": np.array([], dtype=np.int32),
             "junk": [np.int64(0), 2]},
        ],
    }


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_revisited_real_format_loads(tmp_path, protocol):
    (tmp_path / "gnd_rtoy.pkl").write_bytes(pickle.dumps(_revisited_cfg(), protocol=protocol))
    ds = load_revisited(tmp_path, "rtoy")
    assert ds.revisited and ds.images == ["db_a", "db_b", "db_c", "db_d"]
    q1, q2 = ds.queries
    assert (q1.name, q1.image, q1.bbox) == ("q_1", "q_1", (10.0, 20.0, 110.0, 220.0))
    assert q1.easy == ["db_a", "db_c"] and q1.hard == ["db_d"] and q1.junk == []
    assert q1.ok == ["db_a", "db_c", "db_d"]
    assert q2.easy == ["db_b"] and q2.hard == [] and q2.junk == ["db_a", "db_c"]
    assert ds.image_paths["q_2"] == tmp_path / "jpg" / "q_2.jpg"
    g = ds.gnd({i: k for k, i in enumerate(ds.images)})
    assert g[0]["easy"] == [0, 2] and g[0]["hard"] == [3] and g[1]["junk"] == [0, 2]
    assert load_dataset(tmp_path / "gnd_rtoy.pkl").queries == ds.queries


def test_revisited_pickle_from_numpy1_loads():
    """numpy < 2 wrote `numpy.core.multiarray`; it must resolve without importing the old alias."""
    data = pickle.dumps({"a": np.arange(5), "s": np.float32(2.5)}, protocol=2)
    assert b"numpy._core.multiarray" in data
    old = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    back = restricted_loads(old)
    np.testing.assert_array_equal(back["a"], np.arange(5))
    assert back["s"] == np.float32(2.5)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Evil(marker)]}, protocol=2)
    with pytest.raises(UnsafePickle, match="system"):
        restricted_loads(payload)
    (tmp_path / "gnd_evil.pkl").write_bytes(payload)
    with pytest.raises(UnsafePickle):
        load_revisited(tmp_path, "evil")
    assert not marker.exists()
    # plain unpickling of the same bytes would have run the command: the payload is real
    pickle.loads(payload)
    assert marker.exists()


@pytest.mark.parametrize("obj", [eval, getattr, shutil.rmtree, Query])
def test_restricted_unpickler_refuses_other_globals(obj):
    with pytest.raises(UnsafePickle):
        restricted_loads(pickle.dumps(obj))
