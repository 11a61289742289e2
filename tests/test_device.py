"""`--device auto|cpu|cuda`: the batching of same-size images (pure, against a slow reference), the device
choice, and the GPU code path run on CPU tensors — its batched forward passes against the one-image path.
(No GPU on the test machines: the path is the same code with `.to("cuda")`.)"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rmac.data import LANDMARKS_DEV
from rmac.ops.backbones import activations, preprocess
from rmac.ops.batching import resolve_device, shape_batches
from rmac.storage.images import BadImage, load_image
from rmac.workflows.device import _gpu_features, iter_features, worker_device
from rmac.workflows.extract import ModelChoice, worker_model

from badfiles import write_bad_files

shapes_st = st.lists(st.sampled_from([(768, 1024), (1024, 768), (683, 1024), (1024, 1024), (32, 40)]),
                     max_size=60)


@settings(max_examples=200, deadline=None)
@given(shapes=shapes_st, max_batch=st.integers(1, 20), max_pixels=st.one_of(st.none(), st.integers(1, 5_000_000)))
def test_shape_batches_against_a_reference(shapes, max_batch, max_pixels):
    batches = shape_batches(shapes, max_batch, max_pixels)
    assert sorted(i for b in batches for i in b) == list(range(len(shapes)))  # every image once
    for b in batches:
        assert b == sorted(b) and len({shapes[i] for i in b}) == 1  # one size per forward pass
        h, w = shapes[b[0]]
        cap = max_batch if max_pixels is None else max(1, min(max_batch, max_pixels // (h * w)))
        assert len(b) <= cap
    assert [b[0] for b in batches] == sorted(b[0] for b in batches)
    # slow reference: walk the images in order, close a size's open batch when it is full
    ref, open_ = [], {}
    for i, hw in enumerate(shapes):
        cap = max_batch if max_pixels is None else max(1, min(max_batch, max_pixels // (hw[0] * hw[1])))
        if hw not in open_ or len(open_[hw]) == cap:
            open_[hw] = []
            ref.append(open_[hw])
        open_[hw].append(i)
    assert batches == ref  # as few batches as the caps allow


def test_shape_batches_rejects_an_empty_batch():
    with pytest.raises(ValueError):
        shape_batches([(1, 1)], max_batch=0)


def test_device_choice():
    assert resolve_device("auto", True) == "cuda" and resolve_device("auto", False) == "cpu"
    assert resolve_device("cpu", True) == "cpu" and resolve_device("cuda", True) == "cuda"
    with pytest.raises(RuntimeError, match="--device cuda: no CUDA device"):
        resolve_device("cuda", False)
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu", True)
    assert worker_device("auto") == "cpu"  # this machine has no GPU: auto runs on CPU
    with pytest.raises(RuntimeError):
        worker_device("cuda")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos that resize to a few shared sizes at 256 px, and bad files between them."""
    root = tmp_path_factory.mktemp("device")
    names = ["christ_1", "christ_2", "eiffel_1", "eiffel_2", "rushmore_1", "tajmahal_1", "liberty_1",
             "notredame_1", "aero_1", "books_1"]
    paths = []
    for n in names:
        shutil.copy(LANDMARKS_DEV / "jpg" / f"{n}.jpg", root / f"{n}.jpg")
        paths.append(str(root / f"{n}.jpg"))
    bad = write_bad_files(root / "bad")
    broken = [str(root / "bad" / k) for k, v in bad.items() if v not in ("ok",)][:2]
    return paths[:4] + broken[:1] + paths[4:] + broken[1:]


def test_the_gpu_path_equals_the_one_image_path(photos):
    model, spec = worker_model(ModelChoice())
    max_size = 256
    shapes = []
    for p in photos:
        try:
            shapes.append(tuple(preprocess(load_image(p), spec, max_size).shape[-2:]))
        except (BadImage, ValueError):
            pass
    assert len(set(shapes)) < len(shapes)  # some photos really share a forward pass
    one = list(iter_features(model, spec, photos, max_size, "cpu"))
    batched = list(_gpu_features(model, spec, photos, max_size, "cpu"))  # the cuda code path, on CPU
    assert len(one) == len(batched) == len(photos)
    n_bad = 0
    for p, (im1, x1, e1), (im2, x2, e2) in zip(photos, one, batched):
        if e1 is not None:
            n_bad += 1
            assert x2 is None and type(e2) is type(e1) and str(e2) == str(e1), p
            continue
        assert e2 is None and im2.size == im1.size
        assert x1.shape == x2.shape and x1.shape[1:] != (0, 0)
        np.testing.assert_allclose(x2, x1, rtol=1e-4, atol=1e-4 * float(x1.max()))
        np.testing.assert_allclose(x1, activations(model, spec, load_image(p), max_size=max_size), rtol=0, atol=0)
    assert n_bad == 2


@pytest.mark.slow
def test_extract_device_cuda_without_a_gpu_is_one_line(rmac_cli, tmp_path):
    from test_cli import user_error

    err = user_error(rmac_cli("extract", LANDMARKS_DEV / "jpg", "--store", tmp_path / "s", "--device", "cuda"),
                     "extract")
    assert "--device cuda: no CUDA device is visible" in err
    assert not (tmp_path / "s").exists()  # refused before the store is created
