"""`rmac paper DATASET --out DIR`: every experiment of the paper as one command, and its report.

One module per experiment (each a `run(Run) -> dict`): `table1_aml` (Table 1 left), `table1_rmac`
(Table 1 right), `figure3`, `figure4`, `table2`, `ablations` (Section 8), `localisation`; `report`
writes `DIR/report.md`, `DIR/paper/*.png` and `DIR/results.json`. Stores are extracted once per
backbone and input size into `DIR/cache/` (or `--cache`) and reused by later runs.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import sys
import time
from dataclasses import replace

from rmac.workflows.paper.runner import SECTIONS, PaperSettings, Run

# the order sections run in: Table 1 (right) first, so that the store ends indexed at the main size and L
RUN_ORDER = ("table1_rmac", "table1_aml", "figure3", "figure4", "table2", "ablations", "localisation")


def _ints(minimum: int):
    """A comma-separated list of whole numbers >= ``minimum``, as a tuple."""
    from rmac.workflows.args import comma_list, nonnegative_int, positive_int

    check = comma_list(positive_int if minimum >= 1 else nonnegative_int)

    def parse(text: str) -> tuple[int, ...]:
        return tuple(int(v) for v in check(text).split(",") if v.strip())

    parse.__name__ = "comma-separated whole numbers"
    return parse


def _sections(text: str) -> tuple[str, ...]:
    got = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in got if v not in SECTIONS]
    if bad or not got:
        raise argparse.ArgumentTypeError(f"unknown sections {bad}; choose from {','.join(SECTIONS)}")
    return got


def run_paper(settings: PaperSettings, client, progress: bool = True) -> dict:
    """Run the chosen sections and write the report; returns the results (as written to results.json)."""
    from rmac.workflows.bench.machine import machine

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.perf_counter()
    run = Run(settings, client, progress)
    sections, timings = {}, {}
    for name in RUN_ORDER:
        if name not in settings.sections:
            continue
        t = time.perf_counter()
        print(f"rmac paper: {name}", file=sys.stderr)
        sections[name] = importlib.import_module(f"rmac.workflows.paper.{name}").run(run)
        timings[name] = round(time.perf_counter() - t, 2)
    ev = run.main()[0].result
    missing = []
    if not settings.distractors:
        missing.append("Figure 4 and Table 2 with distractors: no `--distractors STORE` was given.")
    if "localisation" in sections and not sections["localisation"].get("result"):
        missing.append("Localisation: the dataset's ground truth has no boxes for its positives.")
    missing += [f"Section {s} (not selected with --sections)." for s in SECTIONS if s not in settings.sections]
    results = {
        "meta": {"command": settings.command(), "dataset": settings.dataset, "dataset_name": run.dataset.name,
                 "backbone": settings.choice.backbone, "weights": settings.choice.weights,
                 "max_size": settings.max_size, "n_images": ev["n_images"], "n_queries": ev["n_queries"],
                 "whitening": ev["whitening"], "machine": machine(), "started": started,
                 "seconds": round(time.perf_counter() - t0, 1), "timings": timings,
                 "evaluations": run.timings, "missing": missing,
                 "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.__dict__.items()
                              if k != "choice"}},
        "sections": sections,
    }
    from rmac.workflows.paper.report import write_report

    results["meta"]["report"] = str(write_report(results, settings.out))
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rmac.workflows.args import existing_dir, existing_path, new_or_existing_dir, nonnegative_int, positive_int
    from rmac.workflows.extract import add_model_arguments

    parser.add_argument("dataset", help="Oxford-format folder (gt/ + jpg/), revisited .pkl, dataset .json, or "
                                        "landmarks-dev")
    parser.add_argument("--out", required=True, type=new_or_existing_dir,
                        help="output folder: report.md, paper/*.png, results.json, cache/")
    add_model_arguments(parser)
    parser.add_argument("--whiten-on", type=existing_path,
                        help="fit whitening on this store or dataset (the paper: Paris for Oxford)")
    parser.add_argument("--distractors", action="append", default=[], type=existing_dir,
                        help="extracted distractor store (repeatable): Figure 4 and Table 2 with distractors")
    parser.add_argument("--sizes", type=_ints(1), default=(724, 1024), help="input sizes of Table 1 (right)")
    parser.add_argument("--levels", type=_ints(1), default=(1, 2, 3, 4), help="R-MAC L of Table 1 (right)")
    parser.add_argument("--top-ns", type=_ints(0), default=(0, 50, 100, 200, 500, 1000),
                        help="re-ranked N of Figure 4; the largest is the N of Table 2")
    parser.add_argument("--qe", type=nonnegative_int, default=5, help="top re-ranked images merged by QE")
    parser.add_argument("--fig3-images", type=positive_int, default=10, help="images of Figure 3")
    parser.add_argument("--cache", type=new_or_existing_dir,
                        help="where the extracted stores are kept (default OUT/cache)")
    parser.add_argument("--sections", type=_sections, default=SECTIONS,
                        help=f"comma-separated subset of {','.join(SECTIONS)}")


def settings_from_args(args: argparse.Namespace) -> PaperSettings:
    from rmac.workflows.extract import ModelChoice

    s = PaperSettings(args.dataset, args.out, ModelChoice(args.backbone, args.weights, args.random_weights),
                      max_size=args.max_size, sizes=args.sizes, levels=args.levels, top_ns=args.top_ns, qe=args.qe,
                      fig3_images=args.fig3_images, whiten_on=args.whiten_on, distractors=tuple(args.distractors),
                      cache=args.cache, sections=args.sections)
    if s.max_size not in s.sizes:
        s = replace(s, sizes=tuple(sorted(set(s.sizes) | {s.max_size})))
    return s


def main(args: argparse.Namespace, client) -> int:
    res = run_paper(settings_from_args(args), client)
    print(f"wrote {res['meta']['report']} ({res['meta']['seconds']:.0f} s)")
    return 0
