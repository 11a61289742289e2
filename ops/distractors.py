"""Distractor images synthesised at the level of activation maps, from real maps (no CNN time).

A synthetic distractor is drawn by a `Recipe` from a pool of real maps `(K, h, w)`:

1. **crop** of a base map: a window covering 55-100 % of each side, at a random place;
2. **flip** left-right with probability 1/2 (a mirrored photo: the map mirrors with it, up to the
   network's padding asymmetry);
3. **rescale** of the window by a factor 0.7-1.3 (the photo taken closer or further), bilinear at
   cell centres, clamped to the store's largest map side;
4. with probability 0.5 a **mixture** (collage): a crop of a second real map, flipped and rescaled
   the same way, takes a slice of 30-50 % of the output along its longer side, so the distractor holds
   real local structure from two photos side by side, as a photo of a street holds several things.

Values are never invented: every output cell is an interpolation of real responses, so the channel
co-occurrences (what makes a map look like a place) are those of real photos; the MAC of a crop is a
real partial MAC, the max over a collage is that of its two halves. Channels are never permuted or
mixed (that would make vectors unlike any photo's and trivially dissimilar to every query).

Everything here is a pure function of its inputs and a `numpy.random.Generator`; the Dask side
(`rmac.workflows.distractors`) seeds one generator per output partition.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Piece", "Recipe", "interp_matrix", "resize_bilinear", "draw_recipe", "render"]

CROP_MIN = 0.55
SCALE_RANGE = (0.7, 1.3)
MIX_PROB = 0.5
MIX_SHARE = (0.3, 0.5)


@dataclass(frozen=True)
class Piece:
    """One real map's contribution: source ``index`` in the pool, its crop ``(x, y, w, h)`` in cells
    (half-open), whether it is flipped left-right, and the ``(h, w)`` it is resampled to."""

    index: int
    crop: tuple[int, int, int, int]
    flip: bool
    out_hw: tuple[int, int]


@dataclass(frozen=True)
class Recipe:
    """A distractor: ``base`` fills the map; ``partner`` (if any) is pasted beside it along ``axis``
    (1: rows, the partner below; 2: columns, the partner to the right), so the output is the two
    pieces' ``out_hw`` concatenated."""

    base: Piece
    partner: Piece | None = None
    axis: int = 2

    @property
    def out_hw(self) -> tuple[int, int]:
        h, w = self.base.out_hw
        if self.partner is None:
            return h, w
        ph, pw = self.partner.out_hw
        return (h + ph, w) if self.axis == 1 else (h, w + pw)

    def describe(self) -> dict:
        """JSON-able form (stored in the distractor's record)."""
        def piece(p: Piece) -> dict:
            return {"index": p.index, "crop": list(p.crop), "flip": p.flip, "out_hw": list(p.out_hw)}

        return {"base": piece(self.base), **({"partner": piece(self.partner), "axis": self.axis}
                                             if self.partner is not None else {})}


def interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` float32 weights of linear interpolation at cell centres (half-pixel
    convention, edges clamped): row ``i`` samples the input at ``(i + 0.5) * n_in / n_out - 0.5``."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got {n_in} -> {n_out}")
    pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m.astype(np.float32)


def resize_bilinear(maps: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resampling of ``(K, h, w)`` maps to ``(K, out_h, out_w)`` (separable: two matrix
    products). Non-negative in, non-negative out; the identity when the size is unchanged."""
    maps = np.asarray(maps, dtype=np.float32)
    _, h, w = maps.shape
    if (h, w) == (out_h, out_w):
        return maps.copy()
    ah, aw = interp_matrix(h, out_h), interp_matrix(w, out_w)
    return np.ascontiguousarray(np.einsum("ih,khw,jw->kij", ah, maps, aw, optimize=True), dtype=np.float32)


def _draw_piece(rng: np.random.Generator, index: int, hw: tuple[int, int], scale: float,
                crop_min: float = CROP_MIN) -> Piece:
    h, w = hw
    ch = max(1, int(round(h * rng.uniform(crop_min, 1.0))))
    cw = max(1, int(round(w * rng.uniform(crop_min, 1.0))))
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    flip = bool(rng.random() < 0.5)
    return Piece(index, (x, y, cw, ch), flip, (max(1, int(round(ch * scale))), max(1, int(round(cw * scale)))))


def draw_recipe(rng: np.random.Generator, shapes: list[tuple[int, int]], map_side: int,
                mix_prob: float = MIX_PROB) -> Recipe:
    """Draw one distractor from a pool of real maps of valid sizes ``shapes`` ((h, w) each); the
    output never exceeds ``map_side`` on either side (the store's padded size)."""
    if not shapes:
        raise ValueError("the pool of real maps is empty")
    n = len(shapes)
    b = int(rng.integers(n))
    scale = float(rng.uniform(*SCALE_RANGE))
    base = _draw_piece(rng, b, shapes[b], scale)
    bh, bw = base.out_hw
    fit = min(1.0, map_side / bh, map_side / bw)  # a rescaled crop may outgrow the padded map side
    if fit < 1.0:
        base = Piece(base.index, base.crop, base.flip, (max(1, int(bh * fit)), max(1, int(bw * fit))))
        bh, bw = base.out_hw
    if n < 2 or rng.random() >= mix_prob:
        return Recipe(base)
    p = int(rng.integers(n - 1))
    p += p >= b  # another map than the base
    axis = 2 if bw >= bh else 1
    length = bw if axis == 2 else bh
    share = float(rng.uniform(*MIX_SHARE))
    # the base keeps (1 - share) of its length; the partner fills the rest, at the base's other side
    keep = max(1, int(round(length * (1 - share))))
    rest = max(1, length - keep)
    other = bh if axis == 2 else bw
    ph, pw = shapes[p]
    partner = _draw_piece(rng, p, (ph, pw), 1.0)
    out = (other, rest) if axis == 2 else (rest, other)
    partner = Piece(partner.index, partner.crop, partner.flip, out)
    if axis == 2:
        x, y, cw, ch = base.crop
        cw2 = max(1, int(round(cw * keep / bw)))
        base = Piece(base.index, (x, y, cw2, ch), base.flip, (bh, keep))
    else:
        x, y, cw, ch = base.crop
        ch2 = max(1, int(round(ch * keep / bh)))
        base = Piece(base.index, (x, y, cw, ch2), base.flip, (keep, bw))
    return Recipe(base, partner, axis)


def _render_piece(piece: Piece, maps: np.ndarray) -> np.ndarray:
    x, y, w, h = piece.crop
    part = maps[:, y:y + h, x:x + w]
    if part.shape[1:] != (h, w):
        raise ValueError(f"crop {piece.crop} outside the {maps.shape[2]}x{maps.shape[1]} map")
    if piece.flip:
        part = part[:, :, ::-1]
    return resize_bilinear(part, *piece.out_hw)


def render(recipe: Recipe, pool: list[np.ndarray]) -> np.ndarray:
    """The float32 ``(K, h, w)`` maps of ``recipe`` drawn from the real float maps of ``pool``."""
    out = _render_piece(recipe.base, pool[recipe.base.index])
    if recipe.partner is not None:
        other = _render_piece(recipe.partner, pool[recipe.partner.index])
        out = np.concatenate([out, other], axis=recipe.axis)
    return np.ascontiguousarray(out)
