"""The `rmac` command line: one subcommand per job; each job module owns its arguments and `main`."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module under rmac.workflows, needs a Dask client, help)
COMMANDS = {
    "extract": ("extract", True, "extract MAC and activation maps of images into a store"),
    "index": ("index", True, "fit whitening, build R-MAC vectors and sharded FAISS indexes"),
    "search": ("search", True, "search a store with a query image (+ box): filter, AML re-rank, QE"),
    "evaluate": ("evaluate", True, "evaluate every method on an Oxford/Paris/revisited/JSON dataset"),
    "demo": ("demo", True, "the whole system on the embedded photos: report + mAP table"),
    "make-views": ("views", False, "synthesise a harder benchmark: landmarks small in cluttered scenes"),
    "bench": ("bench", False, "benchmarks printed as side-by-side ratios (aml, extract, search)"),
    "paper": ("paper", True, "every experiment of the paper on a dataset: DIR/report.md, figures, JSON"),
}


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheduler", help="tcp://HOST:PORT of a running Dask scheduler (default: a LocalCluster)")
    parser.add_argument("--workers", type=int, help="LocalCluster worker processes (default: one per core)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmac", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, needs_client, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(f"rmac.workflows.{module}").add_arguments(p)
        if needs_client:
            add_cluster_arguments(p)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, not a bug: printed as one line, exit status 2."""
    from rmac.storage.datasets import DatasetError
    from rmac.storage.images import BadImage
    from rmac.storage.store import StoreError
    from rmac.storage.weights import WeightsNotFound
    from rmac.workflows.search import QueryError

    return (StoreError, QueryError, WeightsNotFound, DatasetError, BadImage)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, needs_client, _ = COMMANDS[args.command]
    module = importlib.import_module(f"rmac.workflows.{module_name}")
    try:
        if not needs_client:
            return module.main(args)
        from rmac.workflows.cluster import get_client

        with get_client(args.scheduler, args.workers) as client:
            return module.main(args, client)
    except user_errors() as e:
        print(f"rmac {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished partitions are kept; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
