"""Localisation against the true boxes: mean IoU of AML's box (R-MAC re-ranking) and of the exhaustive
optimum with the object's box in each positive, where the ground truth has boxes (the self-pasted
views record theirs). Taken from `rmac evaluate`'s localisation output of the main evaluation."""
from __future__ import annotations

from rmac.workflows.paper import reference as ref
from rmac.workflows.paper.runner import Run


def run(run: Run) -> dict:
    s = run.settings
    ev, cmd = run.main()
    loc = ev.result.get("localisation")
    name = ref.paper_dataset(run.dataset.name)
    return {"result": loc, "has_boxes": any(q.boxes for q in run.dataset.queries),
            "paper": ref.LOCALISATION, "paper_dataset": name,
            "provenance": {"command": s.command() + "  # section localisation",
                           "function": "rmac.workflows.evaluate.evaluate → result['localisation']: " + cmd,
                           "settings": {"max_size": s.max_size, "t": 3, "s": 1.1, "backbone": s.choice.backbone}}}
