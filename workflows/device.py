"""Where a worker runs the network: `--device auto|cpu|cuda` of `rmac extract`.

On CPU a worker extracts one image at a time on one thread (Dask gives the parallelism). On a GPU it
decodes and resizes its partition's images on the CPU, then runs images of the same input size together
(`rmac.ops.batching.shape_batches`: no padding, so the maps equal the one-image results), and falls back to
one image at a time when a batch does not fit in GPU memory.
"""
from __future__ import annotations

import functools
from typing import Iterator, Sequence

import numpy as np

from rmac.ops.batching import resolve_device, shape_batches

DEVICES = ("auto", "cpu", "cuda")
GPU_MAX_BATCH = 16
GPU_MAX_PIXELS = 16 * 1024 * 768  # input pixels per forward pass


def worker_device(requested: str) -> str:
    """``requested`` resolved on this worker (``auto``: its GPU when it sees one)."""
    import torch

    return resolve_device(requested, torch.cuda.is_available())


@functools.lru_cache(maxsize=2)
def model_on(choice, device: str):
    """The model of ``choice`` on ``device``, loaded once per worker process (CPU: the shared cache)."""
    from rmac.workflows.extract import worker_model

    if device == "cpu":
        return worker_model(choice)
    from rmac.storage.weights import load_backbone

    model, spec = load_backbone(choice.backbone, weights=choice.weights, random_weights=choice.random_weights)
    return model.to(device).eval(), spec


def iter_features(model, spec, paths: Sequence[str], max_size: int, device: str = "cpu"
                  ) -> Iterator[tuple[object, np.ndarray | None, Exception | None]]:
    """``(image, (K, h, w) maps, None)`` or ``(None, None, error)`` for each path, in order. The errors are
    the one-image path's: `BadImage` for an unusable file, ValueError for an image too thin once resized."""
    from rmac.ops.backbones import activations
    from rmac.storage.images import BadImage, load_image

    if device == "cpu":
        for path in paths:
            try:
                image = load_image(path)
                yield image, activations(model, spec, image, max_size=max_size), None
            except (BadImage, ValueError) as e:
                yield None, None, e
        return
    yield from _gpu_features(model, spec, paths, max_size, device)


def _gpu_features(model, spec, paths, max_size, device):
    import torch

    from rmac.ops.backbones import preprocess
    from rmac.storage.images import BadImage, load_image

    images, tensors, errors = [None] * len(paths), [None] * len(paths), [None] * len(paths)
    for i, path in enumerate(paths):
        try:
            images[i] = load_image(path)
            tensors[i] = preprocess(images[i], spec, max_size)
        except (BadImage, ValueError) as e:
            images[i], errors[i] = None, e
    ok = [i for i in range(len(paths)) if errors[i] is None]
    maps: dict[int, np.ndarray] = {}
    for batch in shape_batches([tuple(tensors[i].shape[-2:]) for i in ok], GPU_MAX_BATCH, GPU_MAX_PIXELS):
        idx = [ok[j] for j in batch]
        try:
            maps.update(zip(idx, _forward(model, [tensors[i] for i in idx], device)))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            for i in idx:  # one at a time, as on CPU
                maps[i] = _forward(model, [tensors[i]], device)[0]
    for i in range(len(paths)):
        yield (images[i], maps[i], None) if errors[i] is None else (None, None, errors[i])


def _forward(model, tensors: list, device: str) -> list[np.ndarray]:
    import torch

    with torch.inference_mode():
        out = model(torch.cat(tensors).to(device, non_blocking=True))
    return list(out.float().cpu().numpy())
