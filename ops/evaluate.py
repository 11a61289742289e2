"""Retrieval evaluation (Oxford/Paris and the revisited protocol) and box overlap.

`compute_map` has the semantics of the standard `compute_map` of the revisited-Oxford code:
junk images are removed from the ranking, AP is the trapezoid rule over the ranked positives,
queries without positives get NaN and are left out of the means, and precision at k uses
`k' = min(k, rank of the last ranked positive)` (1-based).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["average_precision", "compute_map", "compute_map_revisited", "iou", "iou_cells"]


def average_precision(pos: np.ndarray, npos: int) -> float:
    """Trapezoid AP of positives at sorted 0-based ranks `pos` (junk already removed), out of `npos`."""
    pos = np.asarray(pos, dtype=np.float64)
    j = np.arange(len(pos), dtype=np.float64)
    p0 = np.divide(j, pos, out=np.ones_like(pos), where=pos > 0)  # precision before the positive
    p1 = (j + 1) / (pos + 1)  # precision after it
    return float(((p0 + p1) / 2).sum() / npos)


def _positions(ranking: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of the positives in `ranking` once the junk images are taken out."""
    pos = np.flatnonzero(np.isin(ranking, ok))
    junk_pos = np.flatnonzero(np.isin(ranking, junk))
    # A positive moves up by the number of junk images strictly before it.
    return pos - np.searchsorted(junk_pos, pos, side="left")


def compute_map(
    ranks: np.ndarray, gnd: Sequence[Mapping], kappas: Sequence[int] = ()
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP and precision at `kappas` of a ranking.

    `ranks` (n_ranked, n_queries): column q lists database indices best first (may be a truncated
    list); `gnd[q]` has `ok` (positives) and optionally `junk` index lists. Returns
    `(map, aps (nq,), pr (len(kappas),), prs (nq, len(kappas)))`; map is a fraction in [0, 1],
    NaN when no query has positives. Positives missing from a truncated ranking count as misses.
    """
    ranks = np.asarray(ranks)
    nq = len(gnd)
    if ranks.ndim != 2 or ranks.shape[1] != nq:
        raise ValueError(f"ranks must be (n_ranked, {nq}), got shape {ranks.shape}")
    kappas = np.asarray(kappas, dtype=np.int64).reshape(-1)
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for q, g in enumerate(gnd):
        ok = np.asarray(g["ok"], dtype=np.int64).reshape(-1)
        if len(ok) == 0:
            continue
        junk = np.asarray(g.get("junk", ()), dtype=np.int64).reshape(-1)
        pos = _positions(ranks[:, q], ok, junk)
        aps[q] = average_precision(pos, len(ok))
        if len(pos) == 0:
            prs[q] = 0.0
            continue
        kq = np.minimum(pos.max() + 1, kappas)
        prs[q] = ((pos + 1)[None, :] <= kq[:, None]).sum(axis=1) / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def compute_map_revisited(
    ranks: np.ndarray, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10)
) -> dict[str, dict]:
    """Revisited Oxford/Paris protocol: `gnd[q]` holds `easy`, `hard`, `junk` index lists.

    Returns `{"easy"|"medium"|"hard": {"map", "aps", "prs", "mp@k" for k in kappas}}`, where
    Easy counts easy as positives and hard as junk, Medium easy+hard as positives, Hard hard as
    positives and easy as junk. Values are fractions in [0, 1].
    """
    protocols = {
        "easy": (("easy",), ("junk", "hard")),
        "medium": (("easy", "hard"), ("junk",)),
        "hard": (("hard",), ("junk", "easy")),
    }
    out = {}
    for name, (ok_keys, junk_keys) in protocols.items():
        g_t = [
            {
                "ok": np.concatenate([np.asarray(g[k], dtype=np.int64).reshape(-1) for k in ok_keys]),
                "junk": np.concatenate([np.asarray(g[k], dtype=np.int64).reshape(-1) for k in junk_keys]),
            }
            for g in gnd
        ]
        m, aps, pr, prs = compute_map(ranks, g_t, kappas)
        res = {"map": m, "aps": aps, "prs": prs}
        res.update({f"mp@{int(k)}": float(p) for k, p in zip(kappas, pr)})
        out[name] = res
    return out


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Intersection over union of pixel boxes `(x1, y1, x2, y2)`; broadcasts over leading axes.

    Returns a float for two single boxes; 0 when both boxes are empty.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[..., 2] - a[..., 0], 0, None) * np.clip(a[..., 3] - a[..., 1], 0, None)
    area_b = np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    union = area_a + area_b - inter
    out = np.divide(inter, union, out=np.zeros_like(union), where=union > 0)
    return float(out) if out.ndim == 0 else out


def iou_cells(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Intersection over union of activation-map boxes `(x, y, w, h)` (half-open cells)."""
    return iou(_corners(a), _corners(b))


def _corners(box: np.ndarray) -> np.ndarray:
    box = np.asarray(box, dtype=np.float64)
    return np.concatenate([box[..., :2], box[..., :2] + box[..., 2:4]], axis=-1)
