"""The compact storage form of activation maps: a few uniform integer levels and one scale per image.

`maps ~= q * scale` with `q` uint8 in `0..levels`. AML works on `q` directly: the cosine similarity
is invariant to the per-image scale, and the integer levels let `q^alpha` come from a lookup table
whose integral-image sums are exact in int64 (see `rmac.ops.integral`). With the default 31 levels
(values 0..31) and alpha = 10 the sums stay exact for maps of up to 11253 cells
(`31**10 * 11253 < 2**63`); 1024-px images give ~1000 cells at stride 32 (4096 at stride 16).

Rounding is to the nearest level, so zero stays zero and a response below half a step becomes zero.
The top level sits at the value that only a fraction `clip` of the image's non-zero responses exceed
(those saturate), like the paper's clipping of AlexNet at 128 (0.001% of its responses). Measured by
`rmac bench aml` (Figure-3 statistic: cosine of the exact max-pooled vector of the float map against
the LUT path's `f~` on the quantised map, over all 375k regions of 15 dev-set images, EfficientNet-
Lite0, 31 levels): median / 5th percentile 0.99853 / 0.99713 at the maximum (clip 0), 0.99867 /
0.99733 at 1e-4, 0.99876 / 0.99764 at 3e-4, 0.99878 / 0.99765 at 1e-3, 0.99860 / 0.99606 at 3e-3.
A tiny clip buys finer steps for the bulk of the responses; clipping more starts to flatten the
strongest ones, which decide max-pooling. Default: 3e-4 of the non-zeros (~0.002% of all responses
at the dev set's 94% zeros, close to the paper's 0.001%).
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_LEVELS", "DEFAULT_CLIP", "quantise", "dequantise"]

DEFAULT_LEVELS = 31
DEFAULT_CLIP = 3e-4


def _top(maps: np.ndarray, clip: float) -> float:
    """The response mapped to the top level: the max, or the `1 - clip` quantile of the non-zeros."""
    if clip <= 0.0:
        return float(maps.max(initial=0.0))
    nz = maps[maps > 0]
    if nz.size == 0:
        return 0.0
    k = min(nz.size - 1, int(np.ceil((1.0 - clip) * nz.size)) - 1)
    return float(np.partition(nz, max(k, 0))[max(k, 0)])


def quantise(
    maps: np.ndarray, levels: int = DEFAULT_LEVELS, clip: float = DEFAULT_CLIP
) -> tuple[np.ndarray, float]:
    """Quantise non-negative maps `(K, H, W)` to uint8 levels `0..levels` with one scale per image.

    `scale = top / levels` where `top` is the value that only a fraction `clip` of the non-zero
    responses exceed (those saturate at `levels`); `clip=0` puts the maximum at the top level.
    Values are rounded to the nearest level; negatives (round-off of a ReLU) become 0. An all-zero
    map gets `scale = 1.0`. Returns `(q, scale)` with `maps ~= q * scale`, `q` C-contiguous.
    """
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"expected maps (K, H, W), got shape {maps.shape}")
    if not 1 <= int(levels) <= 255:
        raise ValueError(f"levels must be in 1..255, got {levels}")
    if not 0.0 <= clip < 1.0:
        raise ValueError(f"clip must be in [0, 1), got {clip}")
    x = np.ascontiguousarray(maps, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("maps contain NaN or infinite values")
    top = _top(x, clip)
    if top <= 0.0:
        return np.zeros(x.shape, dtype=np.uint8), 1.0
    scale = top / int(levels)
    q = np.rint(x * np.float32(1.0 / scale))
    np.clip(q, 0, int(levels), out=q)
    return q.astype(np.uint8), float(scale)


def dequantise(q: np.ndarray, scale: float) -> np.ndarray:
    """The float32 maps `q * scale` that `quantise` stands for."""
    return np.asarray(q).astype(np.float32) * np.float32(scale)
