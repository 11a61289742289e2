"""The paper's own figures (Tolias, Sicre & Jégou, ICLR 2016), typed from its tables and text.

These are the only hand-typed numbers of `rmac paper`; the report labels every one of them as the
paper's. Where each comes from is given beside it (also in /work/shared/REFERENCE.md for Table 2).
"""
from __future__ import annotations

import re

CITATION = "Tolias, Sicre & Jégou, ICLR 2016"

# Table 1 (left): AML vs exhaustive search on all (query, positive) pairs of Oxford5k, AlexNet.
# (t, s) -> (IoU with the optimum %, % of windows scored)
TABLE1_AML = {
    (1, 1.1): (81.8, 8.9), (1, 1.5): (88.7, 27.5), (1, 2.0): (93.7, 46.3),
    (2, 1.1): (79.9, 0.5), (2, 1.5): (83.8, 2.0), (2, 2.0): (86.6, 3.6),
    (3, 1.1): (78.7, 0.2), (3, 1.5): (81.2, 0.5), (3, 2.0): (83.6, 0.8),
    (4, 1.1): (77.0, 0.1), (4, 1.5): (79.5, 0.2), (4, 2.0): (81.5, 0.3),
    (5, 1.1): (75.8, 0.1), (5, 1.5): (79.0, 0.1), (5, 2.0): (80.9, 0.2),
}

# Table 1 (right): mAP on Oxford5k. (network, resolution) -> {"mac": ..., "rmac": {L: ...}}
TABLE1_RMAC = {
    ("alexnet", 1024): {"mac": 44.9, "rmac": {1: 47.9, 2: 54.6, 3: 56.1, 4: 55.6}},
    ("alexnet", 724): {"mac": 44.8, "rmac": {1: 48.4, 2: 54.4, 3: 54.3, 4: 52.6}},
    ("vgg16", 1024): {"mac": 55.2, "rmac": {1: 57.3, 2: 64.5, 3: 66.9, 4: 67.4}},
    ("vgg16", 724): {"mac": 52.2, "rmac": {1: 54.8, 2: 58.0, 3: 60.9, 4: 60.3}},
}

# Table 2 (and the text of Section 7 for MAC): mAP per dataset. The +100k distractor columns are the
# paper's Oxford105k / Paris106k. Methods the paper gives no number for are absent.
TABLE2 = {
    "vgg16": {
        "oxford5k": {"mac": 55.2, "rmac": 66.8, "rmac+aml+qe": 77.0},
        "paris6k": {"mac": 74.7, "rmac": 83.0, "rmac+aml+qe": 87.7},
        "oxford105k": {"rmac": 61.6, "rmac+aml+qe": 72.6},
        "paris106k": {"rmac": 75.7, "rmac+aml+qe": 81.7},
    },
    "alexnet": {
        "oxford5k": {"mac": 44.9, "rmac": 56.1},
        "paris6k": {"rmac": 72.9},
        "oxford105k": {"rmac": 47.0},
        "paris106k": {"rmac": 60.1},
    },
}
WITH_DISTRACTORS = {"oxford5k": "oxford105k", "paris6k": "paris106k"}

# Section 7, localisation against the ground-truth boxes (cross-matching the 5 query images of each
# building): mean IoU % of the exhaustive optimum and of AML.
LOCALISATION = {"oxford5k": {"iou_exhaustive": 52.6, "iou_aml": 51.3},
                "paris6k": {"iou_exhaustive": 52.9, "iou_aml": 51.4}}
AML_SPEEDUP = 180  # "localization is approximately 180 times faster"

# Section 8: sum-pooling (alpha = 1) for R-MAC and AML, VGG16 (the max-pooling figures are Table 2's).
SUM_POOLING = {"oxford105k": {"rmac": 59.8, "rmac+aml+qe": 69.5},
               "paris106k": {"rmac": 69.8, "rmac+aml+qe": 78.1}}
# Section 8: regional cross-matching on Oxford5k, as filtering and with AML re-ranking on top.
CROSSMATCH = {"oxford5k": {"crossmatch": 75.2, "crossmatch+aml": 78.5}}

# Figure 4 has no printed numbers; its text: AML improves mAP by 18% with 1M distractors.
FIGURE3_ALPHA = 10


def paper_dataset(name: str) -> str | None:
    """`oxford5k` / `paris6k` when the dataset's name says it is one of the paper's (not a derived copy
    such as views or the revisited versions), else None."""
    n = name.lower()
    if re.fullmatch(r"(oxford5k|oxford|oxf5k|oxbuild(ings)?)", n):
        return "oxford5k"
    if re.fullmatch(r"(paris6k|paris|par6k)", n):
        return "paris6k"
    return None


def network(backbone: str) -> str | None:
    """The paper's network name for a backbone (`vgg16`, `alexnet`), else None."""
    return backbone if backbone in ("vgg16", "alexnet") else None
