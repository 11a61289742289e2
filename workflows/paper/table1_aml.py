"""Table 1 (left): AML against the exhaustive search over every window, on every (query, positive)
pair of the dataset: mean IoU of AML's window with the exhaustive optimum and % of windows scored, for
search steps t and aspect-ratio thresholds s. The numbers come from `rmac bench aml`'s `table1`, here
on the maps stored by the main evaluation (the query crops' MACs from the same run)."""
from __future__ import annotations

import numpy as np

from rmac.workflows.bench.aml import table1
from rmac.workflows.evaluate import Evaluation
from rmac.workflows.paper.runner import Run


def pairs_from_store(ev: Evaluation) -> list[dict]:
    """(query, positive) pairs: the query crop's MAC and box aspect, the positive's stored maps."""
    ds, st = ev.dataset, ev.db.stores[0]
    rows_of = {i: r for r, i in enumerate(st.ids)}
    ok = st.valid_rows()
    out = []
    for q, qv in zip(ds.queries, ev.queries):
        for pos in q.ok:
            r = rows_of.get(pos)
            if r is None or not ok[r]:
                continue
            (maps, _), = st.read_maps([r])
            out.append({"query": q.name, "image": pos, "q_mac": qv.mac, "aspect": qv.aspect, "maps": maps})
    return out


def run(run: Run) -> dict:
    s = run.settings
    ev, cmd = run.main()
    pairs = pairs_from_store(ev)
    if not pairs:
        return {"skipped": "no (query, positive) pair with extracted maps"}
    res = table1(pairs, s.steps, s.ratios, ev.db.stores[0].config.levels)
    res["provenance"] = {
        "command": s.command() + "  # section table1_aml",
        "function": "rmac.workflows.bench.aml.table1 (the code of `rmac bench aml`) on the stored maps of: " + cmd,
        "settings": {"steps": list(s.steps), "ratios": list(s.ratios), "max_size": s.max_size,
                     "backbone": s.choice.backbone, "levels": ev.db.stores[0].config.levels,
                     "passes": 5, "refine_step": 3},
    }
    res["queries"] = len({p["query"] for p in pairs})
    res["map_hw_mean"] = [float(np.mean([p["maps"].shape[1] for p in pairs])),
                          float(np.mean([p["maps"].shape[2] for p in pairs]))]
    return res
