"""The load harness: ``inventory bench``, ``bench-events``, ``bench-ingest``, ``bench-hot``.

Public surface: ``main(argv)``, ``add_subcommand(subparsers)`` (``bench``),
``add_subcommands(subparsers)`` (``bench`` and ``bench-events``), ``require_extra(command)``;
the ``Target`` seam is in ``benchmarks.targets``. The service is a black box here: generated
protos and gRPC only.

The harness needs the ``bench`` extra (HDR histograms, psutil, tqdm, matplotlib), which a
plain ``pip install inventory-service`` does not bring. So this module imports only the
standard library, and the subcommands are added without importing anything of the extra:

- ``bench`` always has its real arguments (they are defined by modules free of the extra);
  run without the extra, it prints ``extra_hint`` and exits 2 before importing the harness.
- ``bench-events`` has its real arguments when the extra is installed; without it the
  arguments cannot be built (``watch_load`` imports tqdm at the top), so ``--help`` shows the
  hint as its description and a run prints the hint and exits 2, whatever its arguments.
- ``bench-ingest`` (``ingest_load``: feeds through the router against PostgreSQL) and
  ``bench-hot`` (``hot_keys``: one hot key on one owner, split, and as the PostgreSQL row)
  the same way.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Any

# Exit code of a harness command run without its extra: a usage error, as argparse's.
MISSING_EXTRA_EXIT_CODE = 2
# Import names of the distributions of the `bench` extra (pyproject.toml).
EXTRA_MODULES = ("hdrh", "matplotlib", "psutil", "tqdm")
EXTRA_INSTALL = "pip install 'inventory-service[bench]'"


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the benchmark."""
    from .cli import main as cli_main

    cli_main(argv)


def missing_extra_modules() -> list[str]:
    """The modules of the ``bench`` extra that cannot be imported (found, not imported)."""
    return [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]


def extra_hint(command: str) -> str:
    return f"{command} needs the benchmark extra: {EXTRA_INSTALL}"


def require_extra(command: str) -> None:
    """Print the one-line hint and exit ``MISSING_EXTRA_EXIT_CODE`` when the extra is missing."""
    if missing_extra_modules():
        print(extra_hint(command), file=sys.stderr, flush=True)
        raise SystemExit(MISSING_EXTRA_EXIT_CODE)


def add_subcommand(subparsers: Any, **parser_options: Any) -> argparse.ArgumentParser:
    """Add ``bench`` (with all its arguments and ``set_defaults(run=...)``) to ``subparsers``.

    ``parser_options`` (e.g. ``formatter_class``) apply to the new parser.
    """
    from .cli import DESCRIPTION, add_arguments

    missing = missing_extra_modules()
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="benchmark the service against its alternatives"
        + (" (needs the bench extra)" if missing else ""),
        description=f"{extra_hint('inventory bench')}.\n\n{DESCRIPTION}"
        if missing
        else DESCRIPTION,
        **parser_options,
    )
    add_arguments(parser)
    parser.set_defaults(run=_run_bench)
    return parser


def add_subcommands(
    subparsers: Any, *, events_arguments: bool = True, **parser_options: Any
) -> None:
    """Add ``bench``, ``bench-events``, ``bench-ingest`` and ``bench-hot`` to ``subparsers``
    (see the module docstring).

    ``events_arguments=False`` adds the last two without their arguments, for a command
    line that will not run them: building them imports their harness (~0.2 s).
    """
    add_subcommand(subparsers, **parser_options)
    harnesses = (
        (
            "bench-events",
            "measure event lag and concurrent watchers (python -m benchmarks.watch_load)",
            "Availability events: lag under write load, concurrent Watch subscribers.",
            "watch_load",
        ),
        (
            "bench-ingest",
            "measure POS feed ingest against PostgreSQL (python -m benchmarks.ingest_load)",
            "POS and supplier feeds: events/s and lag through the router, against the "
            "textbook PostgreSQL upsert.",
            "ingest_load",
        ),
        (
            "bench-hot",
            "measure one hot key: one owner, split, PostgreSQL (python -m benchmarks.hot_keys)",
            "One viral SKU hammered by concurrent callers: on one owner, split over K parts, "
            "and as the PostgreSQL hot row; admitted/s, latency, CPU per reservation, false "
            "sold-outs, stranded units and the staleness of the watched total.",
            "hot_keys",
        ),
    )
    missing = missing_extra_modules()
    for name, help_text, description, module in harnesses:
        parser = subparsers.add_parser(
            name,
            help=f"{help_text} (needs the bench extra)" if missing else help_text,
            description=extra_hint(f"inventory {name}") if missing else description,
            **parser_options,
        )
        parser.set_defaults(run=_harness_runner(name, module))
        if missing:
            # Whatever the arguments, the run prints the hint (the top-level parser lets the
            # unknown ones through when it sees accepts_any_arguments).
            parser.add_argument(
                "arguments", nargs=argparse.REMAINDER, help="not read: install the extra first"
            )
            parser.set_defaults(accepts_any_arguments=True)
        elif events_arguments:
            importlib.import_module(f"{__name__}.{module}").add_arguments(parser)


def _harness_runner(name: str, module: str) -> Any:
    def run(options: argparse.Namespace) -> None:
        require_extra(f"inventory {name}")
        importlib.import_module(f"{__name__}.{module}").run(options)

    return run


def _run_bench(options: argparse.Namespace) -> None:
    from .cli import _run  # checks the extra first

    _run(options)


__all__ = [
    "EXTRA_MODULES",
    "add_subcommand",
    "add_subcommands",
    "extra_hint",
    "main",
    "missing_extra_modules",
    "require_extra",
]
