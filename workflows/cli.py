"""The `rmac` command line: one subcommand per job; each job module owns its arguments and `main`."""
from __future__ import annotations

import argparse
import importlib
import sys
from contextlib import ExitStack
from typing import NoReturn

# subcommand -> (module under rmac.workflows, needs a Dask client, help)
COMMANDS = {
    "extract": ("extract", True, "extract MAC and activation maps of images into a store"),
    "index": ("index", True, "fit whitening, build R-MAC vectors and sharded FAISS indexes"),
    "search": ("search", True, "search a store with a query image (+ box): filter, AML re-rank, QE"),
    "evaluate": ("evaluate", True, "evaluate every method on an Oxford/Paris/revisited/JSON dataset"),
    "demo": ("demo", True, "the whole system on the embedded photos: report + mAP table"),
    "distractors": ("distractors", True, "synthesise distractor images from a store's real activation maps"),
    "make-views": ("views", False, "synthesise a harder benchmark: landmarks small in cluttered scenes"),
    "bench": ("bench", False, "benchmarks printed as side-by-side ratios (aml, extract, search)"),
    "info": ("operations.info", False, "summarise a store: images, failures, partitions, index, bytes, last runs"),
    "verify": ("operations.verify", False, "check a store's shapes, files and checksums; name every mismatch"),
    "paper": ("paper", True, "every experiment of the paper on a dataset: DIR/report.md, figures, JSON"),
}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``rmac CMD: error: ...``), not the usage block too.
    Subcommand parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    from rmac.workflows.args import positive_int

    parser.add_argument("--scheduler", help="tcp://HOST:PORT of a running Dask scheduler (default: a LocalCluster)")
    parser.add_argument("--workers", type=positive_int, help="LocalCluster worker processes (default: one per core)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rmac", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, needs_client, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(f"rmac.workflows.{module}").add_arguments(p)
        if needs_client:
            add_cluster_arguments(p)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, not a bug: printed as one line, exit status 2 (OSErrors about
    paths, permissions or space are user errors too: see `rmac.workflows.errors.is_user_error`)."""
    from rmac.workflows.errors import user_error_types

    return user_error_types()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, needs_client, _ = COMMANDS[args.command]
    module = importlib.import_module(f"rmac.workflows.{module_name}")
    try:
        if not needs_client:
            return module.main(args)
        from rmac.workflows.cluster import get_client
        from rmac.workflows.errors import UsageError, describe, silence_user_errors

        with ExitStack() as stack:
            try:
                client = stack.enter_context(get_client(args.scheduler, args.workers))
            except (OSError, ValueError) as e:  # a bad address; distributed's timeouts carry no errno
                where = args.scheduler or "a local cluster"
                raise UsageError(f"cannot start or reach the Dask scheduler ({where}): {describe(e)}") from None
            silence_user_errors(client)
            return module.main(args, client)
    except (*user_errors(), OSError) as e:
        from rmac.workflows.errors import describe, is_user_error

        if not is_user_error(e):
            raise
        print(f"rmac {args.command}: error: {describe(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # `raise SystemExit("message")` in a job: the same one-line form
        if not isinstance(e.code, str):
            raise
        prefix = f"rmac {args.command}: "
        message = e.code[len(prefix):] if e.code.startswith(prefix) else e.code
        print(f"{prefix}error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished partitions are kept; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
