"""Table 1 (right): mAP of MAC and of R-MAC with L = 1..4 at each input size (the paper: 724 and
1024), filtering only (no re-ranking). One `evaluate` per (size, L); the store of each size is
extracted once and re-indexed per L (the whitening is fitted on the regional vectors of that L)."""
from __future__ import annotations

from rmac.workflows.paper.runner import Run


def metric(m: dict) -> float:
    """mAP of a method's score dict (the Medium protocol on revisited datasets)."""
    return m["map"] if "map" in m else m["medium"]["map"]


def run(run: Run) -> dict:
    s = run.settings
    # The main size and L last: the store is left indexed as the other experiments use it.
    sizes = sorted(s.sizes, key=lambda v: (v == s.max_size, v))
    rows = []
    for size in sizes:
        row = {"max_size": size, "mac": {}, "rmac": {}, "commands": {}}
        for L in sorted(s.levels, key=lambda v: (size == s.max_size and v == s.L, v)):
            if size == s.max_size and L == s.L:
                ev, cmd = run.main()
            else:
                ev, cmd = run.evaluation(size, L, ("mac", "rmac"), top_n=0)
            res = ev.result["methods"]
            row["rmac"][L] = metric(res["rmac"])
            row["mac"][L] = metric(res["mac"])  # whitened MAC: its whitening is fitted with this L's regions
            row["commands"][L] = cmd
        row["map_bytes_per_image"] = ev.result["extract"]["map_bytes_per_image"]
        rows.append(row)
    return {"rows": rows, "L_for_mac": s.L if s.L in s.levels else min(s.levels),
            "provenance": {"command": s.command() + "  # section table1_rmac",
                           "function": "rmac.workflows.evaluate.evaluate(methods=('mac', 'rmac'), L=...) per size and L",
                           "settings": {"sizes": list(s.sizes), "levels": list(s.levels),
                                        "backbone": s.choice.backbone}}}
