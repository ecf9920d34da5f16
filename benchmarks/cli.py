"""``inventory bench`` / ``python -m benchmarks``: the arguments and the smoke preset."""

from __future__ import annotations

import argparse
import random
from typing import Any

from .bench import TARGETS
from .workloads import WORKLOADS

DESCRIPTION = """\
Drive the inventory service and its alternatives (PostgreSQL textbook, Redis Lua as deployed
and durable, the bare gRPC echo ceiling) with the same seeded workloads, audit every target's
state afterwards, and write results.json, report.md and PNG plots to --output-dir.
Only loopback targets. Each phase is bounded by --duration-s and --count-max."""

# The smoke preset: seconds, a tiny catalogue (CI; no timing is asserted).
SMOKE = {
    "keys": 2_000,
    "stock_per_key": 50,
    "hot_stock": 20,
    "concurrency": [4],
    "rate": [100.0],
    "rate_workloads": ["uniform"],
    "duration_s": 0.2,
    "warmup_s": 0.05,
    "count_max": 2_000,
    "audit_reservations_max": 500,
}


def _list_of(kind: Any, choices: tuple[str, ...] | None = None) -> Any:
    def parse(text: str) -> list[Any]:
        values = [kind(part) for part in text.split(",") if part.strip()]
        if choices is not None:
            unknown = [v for v in values if v not in choices]
            if unknown:
                raise argparse.ArgumentTypeError(
                    f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}"
                )
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--service-address", help="a running service (127.0.0.1:PORT); else one is started")
    add(
        "--database-url",
        help="PostgreSQL DSN: the postgres baseline's schema (bench_baseline_pg) lives there, "
        "and a shard is started on it when --service-address is not given",
    )
    add(
        "--targets",
        type=_list_of(str, TARGETS),
        default=list(TARGETS),
        help=f"comma-separated, default all: {','.join(TARGETS)}",
    )
    add(
        "--workloads",
        type=_list_of(str, WORKLOADS),
        default=list(WORKLOADS),
        help=f"comma-separated, default all: {','.join(WORKLOADS)}",
    )
    add(
        "--concurrency",
        type=_list_of(int),
        default=[1, 8, 64],
        help="closed loop: calls in flight, comma-separated (default 1,8,64)",
    )
    add(
        "--rate",
        type=_list_of(float),
        default=[],
        help="open loop: arrivals per second, comma-separated (default none)",
    )
    add(
        "--rate-workloads",
        type=_list_of(str, WORKLOADS),
        default=list(WORKLOADS),
        help="workloads that also run open loop at each --rate (default all)",
    )
    add("--duration-s", type=float, default=10.0, help="measured seconds per phase")
    add("--warmup-s", type=float, default=2.0, help="unmeasured seconds before each phase")
    add("--count-max", type=int, default=1_000_000, help="measured operations per phase, max")
    add("--keys", type=int, default=1_000_000, help="catalogue key rows to load")
    add("--stock-per-key", type=int, default=1_000, help="on_hand of every catalogue key")
    add("--hot-stock", type=int, default=1_000, help="on_hand of the hot key (per phase)")
    add("--zipf-s", type=float, default=1.1, help="Zipf exponent of the zipf workload")
    add(
        "--client-processes",
        type=int,
        default=1,
        help="load generator processes; histograms are merged (default 1: in this process)",
    )
    add(
        "--pool-size",
        type=int,
        default=16,
        help="connections per client process for the postgres baseline",
    )
    add("--batch-items-max", type=int, default=1000, help="items per BatchRequest, max")
    add(
        "--batch-in-flight-messages-max",
        type=int,
        default=1,
        help="BatchRequest messages unanswered at once per stream",
    )
    add("--call-timeout-s", type=float, default=10.0, help="deadline of each call")
    add(
        "--audit-reservations-max",
        type=int,
        default=10_000,
        help="acknowledged reservations checked on the server (a seeded sample beyond it)",
    )
    add("--seed", type=int, default=None, help="workload seed (printed; default random)")
    add("--output-dir", default="benchmarks/results/latest", help="where the report goes")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--smoke", action="store_true",
        help="seconds, tiny catalogue, every workload once (CI); overrides sizes")  # fmt: skip


def options_from(parsed: argparse.Namespace) -> argparse.Namespace:
    if parsed.smoke:
        for name, value in SMOKE.items():
            setattr(parsed, name, value)
    if parsed.seed is None:
        parsed.seed = random.SystemRandom().randrange(2**31)
    if parsed.client_processes < 1:
        raise SystemExit("--client-processes must be >= 1")
    if parsed.service_address and not parsed.service_address.startswith("127.0.0.1:"):
        raise SystemExit("--service-address must be on 127.0.0.1 (loopback only)")
    return parsed


def _run(parsed: argparse.Namespace) -> None:
    from .bench import run

    results = run(options_from(parsed))
    audits = [t["audit"] for t in results["targets"].values() if t.get("audit")]
    if not all(a["passed"] for a in audits):
        raise SystemExit("audit FAILED (see report.md)")


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` to an ``argparse`` subparsers object (``inventory bench``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench", help="benchmark the service against its alternatives", description=DESCRIPTION
    )
    add_arguments(parser)
    parser.set_defaults(run=_run)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=DESCRIPTION)
    add_arguments(parser)
    _run(parser.parse_args(argv))
