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


@pytest.mark.parametrize("name", ["alexnet", "resnet50", "vgg16", "efficientnet-lite0"])
def test_map_shape_matches_torchvision_geometry(name):
    model, spec = W.load_backbone(name, random_weights=True)
    for hw in [(67, 80), (97, 301), (301, 97), (255, 256)]:
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
    # the extractor has its batch norms folded in (`for_inference`): it computes what the file's own
    # network computes up to layer4
    reference = tvm.resnet50(weights=None)
    reference.load_state_dict(state)
    reference = torch.nn.Sequential(*list(reference.children())[:-2]).eval()
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference(x)
        tol = dict(atol=1e-5 * float(expected.abs().max()), rtol=1e-4)  # float rounding of the folded norms
        torch.testing.assert_close(model(x), expected, **tol)

        empty_hub.mkdir(parents=True)
        (empty_hub / W.TORCHVISION_FILES["resnet50"]).symlink_to(path)
        cached, _ = W.load_backbone("resnet50")
        torch.testing.assert_close(cached(x), expected, **tol)


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


def _linearised(name: str) -> torch.nn.Module:
    """The backbone with random weights, its nonlinearities removed and max-pools made average pools
    (same kernel, stride, padding): a linear network with the same receptive fields, so the gradient of
    one cell's output is non-zero exactly on its whole receptive field."""
    import copy

    from torch import nn

    model = copy.deepcopy(B.build_backbone(name))
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish)):
                setattr(module, child_name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(module, child_name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                         ceil_mode=child.ceil_mode))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@pytest.mark.parametrize("name", list(B.BACKBONES))
def test_cell_centres_are_the_measured_receptive_field_centres(name):
    """Per backbone, the pixel box `box_to_pixels` gives one cell (with `cell_centres`'s stride and offset)
    is centred within 2 px of the cell's receptive field measured on the network: the extent of the
    gradient of the cell's response w.r.t. the input. Widths of both parities exercise TF "SAME"
    padding, whose offset depends on them (a photo's own pixels at max size 10000: no resizing)."""
    from rmac.ops.aml import box_to_pixels

    torch.manual_seed(0)
    model = _linearised(name)
    spec = B.get_spec(name)
    h = 64  # a strip: the x and y geometry are the same layers, and a strip keeps the test cheap
    for w in (1216, 1217):
        map_hw = B.map_shape(spec, (h, w), 10000)
        geometry = B.cell_centres(spec, (h, w), 10000)
        for c in (map_hw[1] // 2 - 1, map_hw[1] // 2):
            x = torch.randn(1, 3, h, w, requires_grad=True)
            out = model(x)
            assert tuple(out.shape[-2:]) == map_hw
            out[0, :, map_hw[0] // 2, c].sum().backward()
            cols = np.flatnonzero(x.grad[0].abs().sum((0, 1)).numpy())
            assert 0 < cols[0] and cols[-1] < w - 1, "receptive field clipped: widen the strip"
            measured = (cols[0] + cols[-1] + 1) / 2  # pixel i covers [i, i+1)
            x1, _, x2, _ = box_to_pixels((c, 0, 1, 1), map_hw, (h, w), geometry)
            assert abs((x1 + x2) / 2 - measured) <= 2, (name, w, c, (x1 + x2) / 2, measured)


def test_cell_centres_in_photo_pixels_follow_the_resize():
    """For a photo the network sees shrunk, the stride and offset are scaled back to the photo's pixels."""
    spec = B.get_spec("vgg16")
    assert B.cell_centres(spec, (768, 1024), 1024) == (32.0, 32.0, 16.0, 16.0)  # pool5: cell j at 32j + 16
    sy, sx, oy, ox = B.cell_centres(spec, (1536, 2048), 1024)  # shrunk 2x
    assert (sy, sx, oy, ox) == (64.0, 64.0, 32.0, 32.0)
    sy, sx, oy, ox = B.cell_centres(B.get_spec("efficientnet-lite0"), (768, 1024), 1024)
    assert (sy, sx) == (32.0, 32.0) and (oy, ox) == (31.5, 31.5)  # SAME padding on even sizes: pads right/bottom


@pytest.mark.parametrize("name,expected", [("vgg16", (24, 32)), ("alexnet", (23, 31))])
def test_vgg_and_alexnet_keep_pool5(name, expected):
    """The paper's layers (MatConvNet 31 / 15) are pool5: a 1024 x 768 image gives 32 x 24 cells with VGG16
    and about 30 x 22 with AlexNet (31 x 23 with torchvision's padded first layer); random weights."""
    model, spec = W.load_backbone(name, random_weights=True)
    assert spec.stride == 32 and B.map_shape(spec, (768, 1024), 1024) == expected
    assert B.max_map_side(spec, 1024) == expected[1]
    hw = (768, 1024) if name == "alexnet" else (384, 512)  # VGG16 at full size is slow on a CPU
    with torch.inference_mode():
        out = model(torch.rand(1, 3, *hw))
    assert tuple(out.shape[-2:]) == B.map_shape(spec, hw, 1024)
    assert tuple(out.shape[-2:]) == ((24, 32) if name == "vgg16" and hw == (768, 1024) else
                                     (12, 16) if name == "vgg16" else expected)


@pytest.mark.parametrize("name", ["efficientnet-lite0", "mobilenet-v2", "resnet50"])
def test_inference_form_computes_the_same_function(name):
    """`for_inference` (batch norms folded, SAME padding left to the convolution where centred, in-place
    activations) changes the extractor's speed, not its function: same maps up to float rounding, on
    even and odd sides (TF SAME padding centred and uneven), with batch norms whose statistics are not
    the identity."""
    import copy

    from torch import nn

    torch.manual_seed(0)
    _, features, _ = B._efficientnet_lite(name) if name.startswith("efficientnet") else B._torchvision(name)
    for m in features.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    reference = copy.deepcopy(features.eval())
    fast = B.for_inference(features)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    for hw in [(64, 96), (65, 97), (97, 66)]:
        x = torch.randn(1, 3, *hw)
        with torch.inference_mode():
            expected = reference(x)
            got = fast(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-4)
