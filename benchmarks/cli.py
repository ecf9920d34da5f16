"""``inventory bench`` / ``python -m benchmarks``: the arguments and the smoke preset."""

from __future__ import annotations

import argparse
import random
import shlex
import sys
from typing import Any

from . import require_extra
from .suites import SUITE_DEFAULT, SUITES, TARGETS
from .workloads import HOT_RESERVATIONS_PER_S_MAX, WORKLOADS, hot_stock_lasting

DESCRIPTION = """\
Drive the inventory service (through the router with unary calls, through the Python client
with automatic batching, over the raw Batch stream, one shard directly) and its alternatives
(PostgreSQL textbook, Redis Lua as deployed and durable, the bare gRPC echo ceiling) with the
same seeded workloads, audit every target's state afterwards, and write results.json,
report.md and PNG plots to --output-dir. The harness starts everything itself on loopback:
an embedded PostgreSQL (unless --database-url), a fresh database per stateful target, the
router and shard processes with a Redis for their events (as `inventory up` runs them;
--service-events off for an A/B), Redis and the echo server; all are stopped at the end.
Every phase reports reservations admitted and refused separately, CPU microseconds per
operation of every process (router, each shard, PostgreSQL with its backends, Redis, the
echo server, each generator process, the whole machine), each service process's worst
event-loop stall (from its JSON log, kept in OUTPUT_DIR/logs) and the load generator's own
garbage-collection pauses. One generator process saturates at about 0.85 core: give the
echo ceiling and other fast targets --generator-processes 2 or more so that they measure the
server (the report marks phases where a generator process was the bottleneck).
Suites: 'default' (every workload x every target, ratio table; issue 4) and 'paths'
(cart-1 reservations through router-unary, shard-unary and router-client at 1, 64 and 256
callers, side by side; issue 3). Each phase is bounded by --duration-s and --count-max."""

# The smoke preset: seconds, a tiny catalogue (CI; no timing is asserted).
SMOKE = {
    "keys": 2_000,
    "stock_per_key": 50,
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


def _suite_default(name: str) -> str:
    values = {suite: settings[name] for suite, settings in SUITES.items()}
    shown = {
        suite: ",".join(str(v) for v in value) if isinstance(value, list) else f"{value:,}"
        for suite, value in values.items()
    }
    return "; ".join(f"{suite}: {value}" for suite, value in shown.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--suite",
        choices=sorted(SUITES),
        default=SUITE_DEFAULT,
        help="named comparison: sets the defaults of --targets, --workloads, --concurrency, "
        "--keys, --duration-s and --warmup-s (flags given explicitly win; default: default)",
    )
    add(
        "--service-address",
        help="an already running service (127.0.0.1:PORT) for router-unary, router-client "
        "and service-batch; else the harness starts a router and --shards shards "
        "(shard-unary always starts a shard of its own)",
    )
    add(
        "--database-url",
        help="PostgreSQL server DSN; every stateful target gets a fresh database created on "
        "it (dropped at the end). Default: an embedded PostgreSQL (pgserver) in a temporary "
        "directory, stopped and deleted at the end",
    )
    add("--shards", type=int, default=2, help="shard processes behind the started router")
    add(
        "--membership-lease-s",
        type=float,
        default=10.0,
        help="membership lease of the started shards and router (longer than the service's "
        "3 s default, so that a saturated 2-core machine does not trigger hand-offs)",
    )
    add(
        "--targets",
        type=_list_of(str, TARGETS),
        default=None,
        help=f"comma-separated, of: {','.join(TARGETS)} ({_suite_default('targets')})",
    )
    add(
        "--workloads",
        type=_list_of(str, WORKLOADS),
        default=None,
        help=f"comma-separated, of: {','.join(WORKLOADS)} ({_suite_default('workloads')})",
    )
    add(
        "--concurrency",
        type=_list_of(int),
        default=None,
        help=f"closed loop: calls in flight, comma-separated ({_suite_default('concurrency')})",
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
    add(
        "--duration-s",
        type=float,
        default=None,
        help=f"measured seconds per phase ({_suite_default('duration_s')})",
    )
    add(
        "--warmup-s",
        type=float,
        default=None,
        help=f"unmeasured seconds before each phase ({_suite_default('warmup_s')})",
    )
    add(
        "--settle-max-s",
        type=float,
        default=120.0,
        help="after the bulk load, wait until the target's server processes are quiet "
        "(the load's checkpoint written, PostgreSQL's autovacuum done) before the first "
        "phase, for at most this long (0: do not wait)",
    )
    add("--count-max", type=int, default=1_000_000, help="measured operations per phase, max")
    add(
        "--keys",
        type=int,
        default=None,
        help=f"catalogue key rows to load ({_suite_default('keys')})",
    )
    add("--stock-per-key", type=int, default=1_000, help="on_hand of every catalogue key")
    add(
        "--hot-stock",
        type=int,
        default=None,
        help="on_hand of the hot key, a fresh one per phase (default: enough for the phase: "
        f"warm-up + duration times {HOT_RESERVATIONS_PER_S_MAX:,} reservations/s, so every "
        "target keeps admitting; a small number makes the key sell out and the phase "
        "measure refusals)",
    )
    add("--zipf-s", type=float, default=1.1, help="Zipf exponent of the zipf workload")
    add(
        "--generator-processes",
        "--client-processes",
        dest="generator_processes",
        metavar="N",
        type=int,
        default=1,
        help="load generator processes, each with its share of the callers or the rate, all "
        "starting each phase at the same moment; histograms, counts and ledgers are merged "
        "(default 1: in this process). One process tops out near 0.85 core, so use 2+ to "
        "measure the echo ceiling (and any target faster than the generator)",
    )
    add(
        "--pool-size",
        type=int,
        default=16,
        help="connections per generator process for the postgres baseline",
    )
    add(
        "--service-events",
        choices=("on", "off"),
        default="on",
        help="the started router and shards publish availability events to a Redis of "
        "their own (appendfsync everysec), as `inventory up` runs them; off: no Redis, "
        "for an A/B of what events cost (default: on; not for --service-address)",
    )
    add(
        "--service-stats-interval-s",
        type=float,
        default=2.0,
        help="stats period asked of the started router and shards (INVENTORY_STATS_INTERVAL_S),"
        " whose stats lines give each phase's worst event-loop stall: short enough to place a "
        "stall in a phase, not shorter, since a shard's stats line scans every key it holds; "
        "a service that does not read it logs at its own period, shown in the report",
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
    for name, value in SUITES[parsed.suite].items():
        if getattr(parsed, name, None) is None:
            setattr(parsed, name, list(value) if isinstance(value, list) else value)
    if parsed.smoke:
        for name, value in SMOKE.items():
            setattr(parsed, name, value)
    if parsed.seed is None:
        parsed.seed = random.SystemRandom().randrange(2**31)
    if parsed.generator_processes < 1:
        raise SystemExit("--generator-processes must be >= 1")
    if parsed.hot_stock is None:
        seconds = parsed.warmup_s + parsed.duration_s
        parsed.hot_stock = hot_stock_lasting(
            seconds, max([HOT_RESERVATIONS_PER_S_MAX, *parsed.rate])
        )
    if parsed.shards < 1:
        raise SystemExit("--shards must be >= 1")
    if parsed.service_address and not parsed.service_address.startswith("127.0.0.1:"):
        raise SystemExit("--service-address must be on 127.0.0.1 (loopback only)")
    return parsed


def _run(parsed: argparse.Namespace) -> None:
    require_extra("inventory bench")  # before the harness imports it
    from .bench import run

    if not getattr(parsed, "command_line", None):
        parsed.command_line = shlex.join(["inventory", *sys.argv[1:]])
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
    require_extra("python -m benchmarks")
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=DESCRIPTION)
    add_arguments(parser)
    parsed = parser.parse_args(argv)
    arguments = sys.argv[1:] if argv is None else argv
    parsed.command_line = shlex.join(["python", "-m", "benchmarks", *arguments])
    _run(parsed)
