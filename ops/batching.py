"""Which images share a forward pass on a GPU: pure bookkeeping, no torch.

Only images of exactly the same input size are batched (no padding): a padded image's activations near
its right and bottom edges would differ from its own forward pass, so every map stays what the
one-image path (CPU) computes. Photo collections come in few aspect ratios, and after resizing to a
fixed longer side most photos of one camera share a size.
"""
from __future__ import annotations

from typing import Sequence


def shape_batches(shapes: Sequence[tuple[int, int]], max_batch: int = 16,
                  max_pixels: int | None = None) -> list[list[int]]:
    """Indices of ``shapes`` ((H, W) per image) grouped into batches of one size each.

    Each batch holds at most ``max_batch`` images and, when given, at most ``max_pixels`` pixels in all
    (an image larger than that goes alone). Every index appears once; batches come in the order of
    their first image, indices ascending inside a batch."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, hw in enumerate(shapes):
        groups.setdefault((int(hw[0]), int(hw[1])), []).append(i)
    per = {hw: max_batch if max_pixels is None else max(1, min(max_batch, max_pixels // max(1, hw[0] * hw[1])))
           for hw in groups}
    batches = [idx[s:s + per[hw]] for hw, idx in groups.items() for s in range(0, len(idx), per[hw])]
    return sorted(batches, key=lambda b: b[0])


def resolve_device(requested: str, cuda_available: bool) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without one is an error."""
    if requested == "auto":
        return "cuda" if cuda_available else "cpu"
    if requested == "cuda" and not cuda_available:
        raise RuntimeError("--device cuda: no CUDA device is visible to this worker (torch.cuda.is_available() "
                           "is False): use --device auto or cpu, or run GPU workers")
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {requested!r}: choose auto, cpu or cuda")
    return requested
