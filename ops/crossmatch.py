"""Regional cross-matching (paper, Section 8; Razavian et al. 2014b): the regional vectors of an image
are kept apart instead of being aggregated into R-MAC, and an image is scored by summing, over the
query's regions, the best cosine with any of its regions.

Costs: |R| vectors stored per image instead of one, and |R_q| x |R| inner products per image.
"""
from __future__ import annotations

import numpy as np

__all__ = ["crossmatch_scores"]


def crossmatch_scores(q_regions: np.ndarray, db_regions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Scores of N images for one query: `sum_i max_j <q_i, d_j>` over the query's unit regional
    vectors `q_regions` (Rq, D) and image n's rows `offsets[n]:offsets[n+1]` of `db_regions` (R, D).

    An image without regions scores 0. Returns float64 `(N,)`."""
    q = np.asarray(q_regions, dtype=np.float32)
    d = np.asarray(db_regions, dtype=np.float32)
    offsets = np.asarray(offsets, dtype=np.int64)
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
        raise ValueError(f"regional vectors must be (Rq, D) and (R, D), got {q.shape} and {d.shape}")
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(d) or (np.diff(offsets) < 0).any():
        raise ValueError("offsets must be non-decreasing from 0 to len(db_regions)")
    n = len(offsets) - 1
    out = np.zeros(n)
    nonempty = offsets[1:] > offsets[:-1]
    if nonempty.any() and len(q):
        sim = q @ d.T  # (Rq, R)
        best = np.maximum.reduceat(sim, offsets[:-1][nonempty], axis=1)  # (Rq, non-empty images)
        out[nonempty] = best.sum(axis=0, dtype=np.float64)
    return out
