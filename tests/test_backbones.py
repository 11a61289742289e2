"""Backbones with their real offline weights, on real photos; weight-file handling."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from rmac.data import LANDMARKS_DEV
from rmac.ops import backbones as B
from rmac.storage import weights as W

OFFLINE = ("efficientnet-lite0", "efficientnet-lite2", "mobilenet-v2")
TORCHVISION_ONLY = ("vgg16", "alexnet", "resnet50", "resnet101")
# photos whose ImageNet class is unambiguous (see data/landmarks-dev/sources.json)
PHOTOS = {
    "distractor_151.jpg": (293, "cheetah"),  # gcompris cheetah.webp
    "distractor_062.jpg": (387, "lesser panda"),  # gcompris red_panda.webp
}


def _photo(name: str) -> Image.Image:
    with Image.open(LANDMARKS_DEV / "jpg" / name) as im:
        return im.convert("RGB")


@pytest.fixture(scope="module", params=OFFLINE)
def offline(request):
    """(model, spec, classifier head) of one offline backbone, loaded once per module."""
    name = request.param
    model, spec = W.load_backbone(name)
    head = B.classifier_head(name, W.load_state_dict(name))
    return model, spec, head


@pytest.fixture(scope="module")
def cheetah() -> Image.Image:
    return _photo("distractor_151.jpg")


def test_imagenet_class_indices_are_the_named_classes():
    import torchvision.models as tvm

    categories = tvm.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    for index, label in PHOTOS.values():
        assert categories[index] == label


def test_classifies_real_photos(offline):
    model, spec, head = offline
    for name, (index, label) in PHOTOS.items():
        x = B.preprocess(_photo(name), spec, max_size=256)
        with torch.inference_mode():
            top5 = head(model(x))[0].topk(5).indices.tolist()
        assert index in top5, f"{spec.name} on {name}: {label} ({index}) not in top-5 {top5}"


def test_features_nonnegative_uncapped_with_predicted_shape(offline, cheetah):
    model, spec, _ = offline
    for crop in [(0, 0, 800, 450), (301, 40, 498, 441), (0, 0, 97, 333)]:  # wide, tall, thin
        image = cheetah.crop(crop)
        a = B.activations(model, spec, image, max_size=256)
        assert a.dtype == np.float32
        assert a.shape == (spec.channels, *B.map_shape(spec, (image.height, image.width), 256))
        assert a.min() >= 0.0
    full = B.activations(model, spec, cheetah, max_size=256)
    assert full.max() > 6.0, "the final ReLU6 was not replaced by an uncapped ReLU"


def test_lite_extractor_and_head_equal_the_package_model():
    from efficientnet_lite_pytorch import EfficientNet

    name = "efficientnet-lite0"
    path = str(W.weights_path(name))
    reference = EfficientNet.from_pretrained(name, weights_path=path).eval()
    state = W.load_state_dict(name)
    features, head = B.build_backbone(name, state), B.classifier_head(name, state)
    x = B.preprocess(_photo("distractor_062.jpg").resize((224, 224)), B.get_spec(name))
    with torch.inference_mode():
        torch.testing.assert_close(head(features(x)), reference(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["alexnet", "resnet50"])
def test_map_shape_matches_torchvision_geometry(name):
    model, spec = W.load_backbone(name, random_weights=True)
    for hw in [(31, 40), (97, 301), (301, 97), (255, 256)]:
        with torch.inference_mode():
            out = model(torch.zeros(1, 3, *hw))
        assert out.shape[1:] == (spec.channels, *B.map_shape(spec, hw, 1024))
        assert out.min() >= 0


@pytest.mark.parametrize("name", list(B.BACKBONES))
def test_max_map_side_bounds_every_map(name):
    spec = B.get_spec(name)
    for max_size in (300, 1024):
        bound = B.max_map_side(spec, max_size)
        assert bound == max(B.map_shape(spec, (max_size, max_size), max_size))
        for hw in [(max_size, 17), (4000, 3000), (1, 5000), (max_size - 1, max_size - 1)]:
            assert max(B.map_shape(spec, hw, max_size)) <= bound
    side = B.min_input_side(spec)
    assert min(B.map_shape(spec, (side, side), 1024)) == 1
    assert min(B.map_shape(spec, (side - 1, side - 1), 1024)) == 0


def test_preprocess_resizes_and_normalises():
    lite, imagenet = B.get_spec("efficientnet-lite0"), B.get_spec("mobilenet-v2")
    grey = Image.new("RGB", (2000, 1000), (127, 127, 127))
    x = B.preprocess(grey, lite, max_size=500)
    assert x.shape == (1, 3, 250, 500) and x.dtype == torch.float32
    assert torch.allclose(x, torch.zeros_like(x))  # (127*... - 127) / 128
    white = B.preprocess(Image.new("RGB", (40, 60), (255, 255, 255)), lite, max_size=500)
    assert white.shape == (1, 3, 60, 40)  # never upscaled
    assert torch.allclose(white, torch.ones_like(white))  # (255 - 127) / 128
    y = B.preprocess(Image.new("RGB", (64, 64), (124, 116, 104)), imagenet)
    expected = torch.tensor([(124 - 123.675) / 58.395, (116 - 116.28) / 57.12, (104 - 103.53) / 57.375])
    torch.testing.assert_close(y[0, :, 5, 5], expected)
    assert B.resized_hw((3000, 4000), 1024) == (768, 1024)
    with pytest.raises(ValueError, match="too thin"):
        B.preprocess(Image.new("RGB", (4000, 40)), B.get_spec("alexnet"), max_size=1024)


def test_crop_query_takes_the_box_outward_and_clips(cheetah):
    crop = B.crop_query(cheetah, (10.4, 20.6, 110.2, 70.0))
    assert crop.size == (101, 50)  # x 10..111, y 20..70
    assert np.array_equal(np.asarray(crop), np.asarray(cheetah)[20:70, 10:111])
    assert B.crop_query(cheetah, (-5, -5, 5000, 5000)).size == cheetah.size
    with pytest.raises(ValueError):
        B.crop_query(cheetah, (900, 10, 950, 20))


def test_batched_activations_equal_single_ones(cheetah):
    model, spec = W.load_backbone("efficientnet-lite0")
    images = [cheetah, cheetah.crop((0, 0, 300, 200)), cheetah.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    batched = B.activations_batch(model, spec, images, max_size=160, batch_size=2)
    for image, maps in zip(images, batched):
        np.testing.assert_allclose(maps, B.activations(model, spec, image, max_size=160),
                                   rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- weight files

@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


@pytest.mark.parametrize("name", TORCHVISION_ONLY)
def test_torchvision_backbones_name_the_missing_file(name, empty_hub):
    with pytest.raises(W.WeightsNotFound) as err:
        W.load_backbone(name)
    message = str(err.value)
    assert W.TORCHVISION_FILES[name] in message
    assert str(empty_hub) in message
    assert "--weights PATH" in message
    with pytest.raises(W.WeightsNotFound, match="no such file"):
        W.load_backbone(name, weights=empty_hub / "nowhere.pth")


def test_torchvision_backbone_loads_a_local_file_and_the_hub_cache(tmp_path, empty_hub):
    import torchvision.models as tvm

    state = tvm.resnet50(weights=None).state_dict()  # random init: stands in for the real file
    path = tmp_path / "my-resnet50.pth"
    torch.save(state, path)
    model, spec = W.load_backbone("resnet50", weights=path)
    assert not spec.random_weights and str(path) in spec.weights_source
    torch.testing.assert_close(model[0].weight, state["conv1.weight"])
    torch.testing.assert_close(model[7][2].bn3.running_var, state["layer4.2.bn3.running_var"])

    empty_hub.mkdir(parents=True)
    (empty_hub / W.TORCHVISION_FILES["resnet50"]).symlink_to(path)
    cached, _ = W.load_backbone("resnet50")
    torch.testing.assert_close(cached[0].weight, state["conv1.weight"])


class _Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_weight_files_are_never_unpickled_freely(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        W.load_backbone("resnet50", weights=path)


def test_random_weights_are_flagged():
    model, spec = W.load_backbone("efficientnet-lite0", random_weights=True)
    assert spec.random_weights and model.random_weights
    real, real_spec = W.load_backbone("efficientnet-lite0")
    assert not real_spec.random_weights and not real.random_weights
    assert not torch.equal(model.head[0].weight, real.head[0].weight)


def test_unknown_backbone_is_refused():
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        W.load_backbone("inception-v3")
