"""Table 2: the five methods (MAC, R-MAC, MAC+AML, R-MAC+AML, R-MAC+AML+QE) at the main size, L and N,
on the dataset and on the dataset plus the distractor stores; the paper's figures beside ours when the
dataset is Oxford5k or Paris6k and the backbone one of the paper's networks."""
from __future__ import annotations

from rmac.workflows.evaluate import METHODS
from rmac.workflows.paper import reference as ref
from rmac.workflows.paper.runner import Run


def run(run: Run) -> dict:
    s = run.settings
    out = {"methods": list(METHODS), "columns": {}, "paper": {}}
    for label, distractors in [("dataset", ())] + ([("with distractors", tuple(s.distractors))]
                                                   if s.distractors else []):
        ev, cmd = run.main(distractors)
        r = ev.result
        out["columns"][label] = {"n_images": r["n_images"], "n_queries": r["n_queries"], "whitening": r["whitening"],
                                 "methods": r["methods"], "timings": r["timings"], "command": cmd}
    name, net = ref.paper_dataset(run.dataset.name), ref.network(s.choice.backbone)
    if name and net:
        out["paper"] = {"network": net, "dataset": ref.TABLE2[net].get(name, {}),
                        "with distractors": ref.TABLE2[net].get(ref.WITH_DISTRACTORS[name], {}),
                        "names": [name, ref.WITH_DISTRACTORS[name]]}
    out["provenance"] = {"command": s.command() + "  # section table2",
                         "function": "rmac.workflows.evaluate.evaluate (all five methods)",
                         "settings": {"max_size": s.max_size, "L": s.L, "top_n": s.top_n, "qe": s.qe,
                                      "backbone": s.choice.backbone, "distractors": list(s.distractors)}}
    return out
