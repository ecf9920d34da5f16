"""The benchmark harness (``inventory bench``, ``python -m benchmarks``).

Public surface: ``main(argv)`` and ``add_subcommand(subparsers)``; the ``Target`` seam is in
``benchmarks.targets``. The service is a black box here: generated protos and gRPC only.
Both functions import the harness when called, so that importing this package (e.g. from
``inventory --help``) stays cheap.
"""

from __future__ import annotations

import argparse
from typing import Any


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the benchmark."""
    from .cli import main as cli_main

    cli_main(argv)


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` (with all its arguments and ``set_defaults(run=...)``) to ``subparsers``."""
    from .cli import add_subcommand as cli_add_subcommand

    return cli_add_subcommand(subparsers)


__all__ = ["add_subcommand", "main"]
