"""`rmac bench …`: speed and accuracy goals measured side by side in one run, printed as ratios.

Benchmarks are not timed tests: each prints what it measured on this machine, and docs/benchmarks.md
records the figures with the command and the machine. One module per benchmark; each owns its
arguments (`add_arguments`) and either a `main(args) -> int` (it prints its own report) or a
`run(args) -> dict` (printed here as JSON, and written to `--json FILE`).
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

# name -> (module under rmac.workflows.bench, help)
BENCHES = {
    "aml": ("aml", "AML vs exhaustive (Table 1), integral approximation (Fig. 3), re-ranking speed"),
    "quantisation": ("quality", "re-ranking mAP with float vs quantised maps, and bytes per image"),
    "extract": ("extract", "Dask extraction vs a plain torch loop"),
    "forward": ("forward", "the extractor's forward pass as rmac runs it vs the package's modules"),
    "search": ("search", "filter / re-rank / QE times, 1 vs 2 workers"),
    "grow": ("grow", "index after a store grew by a tenth: incremental vs full"),
    "localisation": ("localisation", "AML / exhaustive windows vs exact boxes on views: IoU by object size, query scales"),
    "frames": ("frames", "maps read per image frame vs per partition stream: N spread rows, bytes per image"),
    "scale": ("scale", "N synthetic distractors: build time, peak memory, bytes, exact/IVF filtering, query time"),
}


def _module(name: str):
    return importlib.import_module(f"rmac.workflows.bench.{BENCHES[name][0]}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, (_, help_) in BENCHES.items():
        p = sub.add_parser(name, help=help_, description=help_)
        module = _module(name)
        module.add_arguments(p)
        if not hasattr(module, "main"):
            p.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")


def main(args: argparse.Namespace) -> int:
    module = _module(args.bench)
    if hasattr(module, "main"):
        return module.main(args)
    res = module.run(args)
    print(json.dumps(res, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1))
    return 0
