"""The ``inventory`` command: ``up``, ``router``, ``shard``, ``migrate``, and the load harness.

``inventory up`` is the one-command run: with no ``--database-url`` (or
INVENTORY_DATABASE_URL) it starts an embedded PostgreSQL whose data lives in ``--data-dir``
(default ``.inventory/``, kept across restarts), likewise an embedded Redis, then ``--shards``
shard processes (2 by default, on ``--shard-ports`` and up) and one router on ``--port``,
prints the router's address and where each process serves its Prometheus metrics (on
``--metrics-ports`` and up) and stays in the foreground until Ctrl-C or SIGTERM; then it
stops the router, the shards, Redis and PostgreSQL, in that order.

Rules of ``up``:

- A stop request (SIGINT, SIGTERM, SIGHUP) is honoured at any moment, start-up included:
  the handlers are installed before anything starts, and every started thing is registered
  for clean-up as it starts. The handlers only record the request; ``up`` acts on it when
  the step under way is done (nothing is left half-started): at once in a wait, within a
  health check (1 s), or when the embedded PostgreSQL start returns (its first start, with
  initdb, takes seconds). The clean-up is never interrupted by a further signal, and each
  of its waits is bounded.
- The children run in sessions of their own, so a Ctrl-C in the terminal reaches only
  ``up``, which stops them in order. A ``kill -9`` of ``up`` cannot be handled: its
  children and embedded servers then stay up.
- Ports are checked before anything starts; a taken one is one line naming it, exit 2.
- The terminal gets human progress lines (timestamps ISO-8601 UTC); the shards' and the
  router's JSON logs go to ``--log-file`` (``--logs terminal``: to the terminal instead).
- Exit codes: 0 after a requested stop, 1 when something failed or a child died, 2 for a
  usage error or a taken port.

The service subcommands import nothing of the ``bench`` extra; ``bench`` and
``bench-events`` say which extra to install when it is missing (see ``benchmarks``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, NoReturn

from .common.config import (
    CLIENT_TLS_FLAGS,
    HelpFormatter,
    add_channel_tls_arguments,
    add_database_argument,
    add_log_level_argument,
    add_no_auth_argument,
    add_redis_argument,
    add_router_arguments,
    add_shard_arguments,
    channel_tls_config,
    env,
    router_config,
    shard_config,
)
from .keys import add_subcommands as add_key_subcommands
from .keys import prepare_local_auth, token_hint

if TYPE_CHECKING:
    from .common.tls import ChannelFactory

# How long `up` waits for a process it started to answer health checks (recovery included).
PROCESS_READY_TIMEOUT_S = 60.0
# How long a stopping process may take before it is killed (its own drain grace is 5 s).
PROCESS_STOP_TIMEOUT_S = 15.0
# After SIGKILL, how long to wait for the process to be reaped.
PROCESS_KILL_TIMEOUT_S = 5.0
# Between health checks of a starting process, and between liveness checks once serving.
READY_POLL_INTERVAL_S = 0.2
WATCH_POLL_INTERVAL_S = 0.5
# Deadline of one health check; a signal is handled at the latest when it returns.
HEALTH_CHECK_TIMEOUT_S = 1.0
# Lines of the log file quoted when a child fails.
LOG_TAIL_LINES_MAX = 20
# Today's layout: shard i listens on --port + 10 + i unless --shard-ports says otherwise.
SHARD_PORT_OFFSET = 10
# Metrics (Prometheus) on --port + 20 (the router) and + 21 + i (shard i) unless
# --metrics-ports says otherwise.
METRICS_PORT_OFFSET = 20
PORT_MAX = 65535

EXIT_FAILED = 1
EXIT_USAGE = 2

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole ``inventory`` parser; ``command`` (the subcommand about to run, if known)
    lets ``bench-events`` skip building its arguments when it will not run."""
    parser = argparse.ArgumentParser(
        prog="inventory", description="Inventory service.", formatter_class=HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_text,
            description=help_text[:1].upper() + help_text[1:] + ".",
            formatter_class=HelpFormatter,
        )

    up = add("up", "run the whole system (embedded PostgreSQL and Redis by default)")
    up.add_argument(
        "--data-dir",
        default=env("DATA_DIR", ".inventory"),
        help="where embedded servers keep their data [INVENTORY_DATA_DIR]",
    )
    up.add_argument(
        "--port",
        type=int,
        default=env("PORT", "50051"),
        help="port of the public gRPC API (the router) on 127.0.0.1 [INVENTORY_PORT]",
    )
    up.add_argument(
        "--shards",
        type=int,
        default=env("SHARDS", "2"),
        help="number of shard processes [INVENTORY_SHARDS]",
    )
    up.add_argument(
        "--shard-ports",
        type=int,
        metavar="FIRST",
        default=env("SHARD_PORTS", "") or None,
        help="port of shard-0 on 127.0.0.1; shard-i listens on FIRST + i "
        f"[INVENTORY_SHARD_PORTS] (default: --port + {SHARD_PORT_OFFSET})",
    )
    up.add_argument(
        "--metrics-ports",
        type=int,
        metavar="FIRST",
        default=env("METRICS_PORTS", "") or None,
        help="Prometheus metrics on 127.0.0.1: the router's on FIRST, shard-i's on FIRST + 1 "
        f"+ i; 0: none [INVENTORY_METRICS_PORTS] (default: --port + {METRICS_PORT_OFFSET})",
    )
    up.add_argument(
        "--logs",
        choices=["file", "terminal"],
        default=env("LOGS", "file"),
        help="where the shards' and the router's JSON logs go [INVENTORY_LOGS]",
    )
    up.add_argument(
        "--log-file",
        default=env("LOG_FILE", ""),
        help="the log file of --logs file, appended to [INVENTORY_LOG_FILE] "
        "(default: DATA_DIR/logs/inventory.log)",
    )
    add_no_auth_argument(
        up,
        "(default: callers present tokens signed by the key in DATA_DIR/auth; see inventory token)",
    )
    up.add_argument(
        "--tls",
        action="store_true",
        default=env("TLS", "") not in ("", "0", "false"),
        help="mutual TLS on every hop, with a local CA and certificates in DATA_DIR/tls "
        "(printed at start) [INVENTORY_TLS] (default: off: plaintext on loopback)",
    )
    add_database_argument(up, required=False, embedded=True)
    add_redis_argument(up, embedded=True)
    add_log_level_argument(up)
    up.set_defaults(run=_up)

    router = add("router", "run one router process (stateless front)")
    add_router_arguments(router)
    router.set_defaults(run=_router)

    shard = add("shard", "run one shard process (owns partitions)")
    add_shard_arguments(shard)
    shard.set_defaults(run=_shard)

    migrate = add("migrate", "apply schema migrations and exit")
    add_database_argument(migrate)
    migrate.set_defaults(run=_migrate)

    stock_import = add(
        "import", "import a stock-take (CSV or JSON lines of absolute counts) as one batch"
    )
    stock_import.add_argument(
        "file", type=Path, help="the counts: CSV with a header, or JSON lines"
    )
    stock_import.add_argument("--merchant-id", required=True, help="whose stock it is")
    stock_import.add_argument(
        "--address",
        default=env("ADDRESS", "127.0.0.1:50051"),
        help="the router [INVENTORY_ADDRESS]",
    )
    stock_import.add_argument(
        "--batch-id",
        default="",
        help="tags every ledger record of the import (default: import-<hash of the file>)",
    )
    stock_import.add_argument(
        "--format", choices=["csv", "json"], default="", help="default: by suffix"
    )
    stock_import.add_argument(
        "--counted-at-ms",
        type=int,
        default=0,
        help="when lines without counted_at_ms were counted (Unix ms; default: the file's "
        "modification time)",
    )
    stock_import.add_argument(
        "--token",
        default=env("TOKEN", ""),
        help="the caller's token, role gateway or admin (inventory token) [INVENTORY_TOKEN]",
    )
    add_channel_tls_arguments(stock_import, CLIENT_TLS_FLAGS, "the router")
    stock_import.add_argument("--report", type=Path, help="write the summary as JSON here")
    stock_import.add_argument("--no-progress", action="store_true", help="no progress bar")
    stock_import.set_defaults(run=_import)

    add_key_subcommands(add)

    # The load harness: imports nothing of the `bench` extra here; each command says which
    # extra to install when it is missing.
    from benchmarks import add_subcommands

    add_subcommands(
        commands,
        events_arguments=command in (None, "bench-events", "bench-ingest", "bench-hot"),
        formatter_class=HelpFormatter,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in arguments if not a.startswith("-")), None)
    parser = build_parser(command)
    options, unknown = parser.parse_known_args(arguments)
    if unknown and not getattr(options, "accepts_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    options.run(options)


def _import(options: argparse.Namespace) -> None:
    from .importer import run_import

    try:
        summary = asyncio.run(
            run_import(
                options.file,
                address=options.address,
                merchant_id=options.merchant_id,
                batch_id=options.batch_id,
                file_format=options.format,
                counted_at_ms=options.counted_at_ms,
                progress=not options.no_progress,
                token=options.token,
                tls=channel_tls_config(options, CLIENT_TLS_FLAGS),
            )
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USAGE) from None
    print(summary.text(), flush=True)
    if options.report:
        options.report.write_text(json.dumps(summary.as_data(), indent=2) + "\n")
    raise SystemExit(0 if summary.complete else EXIT_FAILED)


def _shard(options: argparse.Namespace) -> None:
    from .shard.main import main as shard_main

    shard_main(shard_config(options))


def _router(options: argparse.Namespace) -> None:
    from .router.main import main as router_main

    router_main(router_config(options))


def _migrate(options: argparse.Namespace) -> None:
    print(f"migrations applied: {_migrate_database(options.database_url)}", flush=True)


def _migrate_database(database_url: str, signals: _StopSignals | None = None) -> str:
    """Apply the migrations; with ``signals``, a stop request cancels them (a transaction:
    nothing half-applied) instead of waiting for, say, an unreachable server's timeout."""
    from persistence.connections import migrate_database

    async def migrate() -> list[int]:
        task = asyncio.ensure_future(migrate_database(database_url))
        while not task.done():
            await asyncio.wait({task}, timeout=READY_POLL_INTERVAL_S)
            if signals is not None and signals.received is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                signals.check()
        return list(task.result() or [])

    applied = asyncio.run(migrate())
    return str(applied or "none (up to date)")


# --- inventory up ---------------------------------------------------------------------------


class _StopRequested(Exception):
    """Raised by ``_StopSignals.check`` once a stop signal has arrived."""


class _StartFailed(Exception):
    """Start-up cannot go on; ``str()`` is the message, printed after ``error:``."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _StopSignals:
    """SIGINT, SIGTERM and SIGHUP all mean: stop everything that was started, in order.

    The handler only records the request and says so on the terminal; ``check()``, called
    between steps and in every wait loop, raises ``_StopRequested``. A handler that raised
    itself could fire anywhere (inside a ``__del__``, where Python swallows the exception, or
    half-way through a library's start of a server), so it never does: a step always ends
    (each is bounded) and the stop follows it. The acknowledgement is an ``os.write``: a
    handler may run in the middle of a ``print``, and the buffered stream is not reentrant.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.step = ""  # what is under way, for the acknowledgement

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def check(self) -> None:
        if self.received is not None:
            raise _StopRequested(self.received.name)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            _acknowledge(f"{name} received: already stopping (every wait is bounded)")
            return
        self.received = signal.Signals(signum)
        after = f" once {self.step} is done" if self.step else ""
        _acknowledge(f"{name} received: stopping everything that was started{after}")


@dataclass(frozen=True)
class _Child:
    name: str  # shard-0, ..., router
    address: str
    port_flag: str  # the flag that sets its port, for messages
    process: subprocess.Popen[bytes]


class _Reporter:
    """Human progress lines on the terminal; in file mode also one JSON line each in the log,
    so that the log file is the whole story in one timeline."""

    def __init__(self, log: IO[bytes] | None, log_path: Path | None) -> None:
        self.log = log
        self.log_path = log_path

    def say(self, message: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # a closed terminal must not stop the
            print(f"{_utc_now()} {message}", flush=True)  # clean-up half-way
        self.record("info", message)

    def error(self, message: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            print(f"error: {message}", file=sys.stderr, flush=True)
        self.record("error", message)

    def record(self, level: str, message: str) -> None:
        if self.log is None or self.log.closed:
            return
        line = {"timestamp": _utc_now(), "level": level, "process": "up", "event": message}
        with contextlib.suppress(OSError):
            self.log.write((json.dumps(line) + "\n").encode())

    def tail(self) -> str:
        """The end of the log file, for a child that failed (empty in terminal mode: the
        user saw it)."""
        if self.log_path is None:
            return ""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        shown = "\n".join(lines[-LOG_TAIL_LINES_MAX:])
        return f"\n--- last {LOG_TAIL_LINES_MAX} lines of {self.log_path} ---\n{shown}"


def _up(options: argparse.Namespace) -> None:
    from persistence.embedded import EmbeddedServerError

    signals = _StopSignals()
    reporter = _Reporter(None, None)
    exit_code = 0
    try:
        signals.install()  # first: from here on a stop request stops whatever was started
        data_dir = Path(options.data_dir).resolve()
        shard_ports = options.shard_ports or options.port + SHARD_PORT_OFFSET
        _check_plan(options.shards, options.port, shard_ports)
        _check_metrics_ports(options.shards, _metrics_first(options), _planned_ports(options))
        if signals.received is not None:
            return  # nothing was started
        with contextlib.ExitStack() as stack:  # unwinds in reverse: children, Redis, PostgreSQL
            try:
                reporter = _open_reporter(stack, options, data_dir)
                children = _start(
                    options, data_dir, shard_ports, stack=stack, signals=signals, reporter=reporter
                )
                exit_code = _watch(children, signals, reporter)
            except _StopRequested as stop:  # acknowledged on the terminal by the handler
                reporter.record("info", f"{stop} received: stopping everything that was started")
            except _StartFailed as failure:
                reporter.error(str(failure))
                exit_code = failure.exit_code
        reporter.say("stopped")
    except _StartFailed as refused:  # by the plan: nothing was started
        reporter.error(str(refused))
        exit_code = refused.exit_code
    except EmbeddedServerError as error:  # an embedded server that would not stop
        reporter.error(str(error))
        exit_code = EXIT_FAILED
    if exit_code:
        raise SystemExit(exit_code)


def _open_reporter(
    stack: contextlib.ExitStack, options: argparse.Namespace, data_dir: Path
) -> _Reporter:
    """The log file (unless --logs terminal), also for this process's own JSON logs (the
    migrations log through structlog)."""
    from .common.telemetry import configure_logging

    logging.getLogger("pgserver").setLevel(logging.WARNING)  # its info lines are commands run
    if options.logs == "terminal":
        configure_logging(options.log_level, "up")
        return _Reporter(None, None)
    log_path = Path(options.log_file or data_dir / "logs" / "inventory.log").resolve()
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = stack.enter_context(log_path.open("ab", buffering=0))
    except OSError as error:
        _usage_error(f"cannot write the log file {log_path}: {error.strerror} (--log-file)")
    # configure_logging writes to sys.stderr as it is when called; the log file is a text
    # stream of its own, line-buffered so that lines from all processes stay whole.
    stream = stack.enter_context(open(log.fileno(), "a", buffering=1, closefd=False))  # noqa: SIM115
    with contextlib.redirect_stderr(stream):
        configure_logging(options.log_level, "up")
    return _Reporter(log, log_path)


def _check_plan(shards: int, port: int, shard_ports: int) -> None:
    """Everything that can be refused before anything starts: counts, ranges, taken ports."""
    from .common.server import ListenError, check_listen_address

    if shards < 1:
        raise _StartFailed("--shards must be at least 1", EXIT_USAGE)
    for value, flag in ((port, "--port"), (shard_ports, "--shard-ports")):
        if not 1 <= value <= PORT_MAX:
            raise _StartFailed(f"{flag} {value} is not a port (1 to {PORT_MAX})", EXIT_USAGE)
    if shard_ports + shards - 1 > PORT_MAX:
        raise _StartFailed(
            f"--shard-ports {shard_ports} + {shards} shards passes {PORT_MAX}", EXIT_USAGE
        )
    if shard_ports <= port < shard_ports + shards:
        raise _StartFailed(
            f"--port {port} is also shard-{port - shard_ports}'s port (see --shard-ports)",
            EXIT_USAGE,
        )
    wanted = [(port, "--port")] + [(shard_ports + i, "--shard-ports") for i in range(shards)]
    for wanted_port, flag in wanted:
        try:
            check_listen_address(f"127.0.0.1:{wanted_port}")
        except ListenError as error:
            raise _StartFailed(f"{error} ({flag})", EXIT_USAGE) from None


def _start(
    options: argparse.Namespace,
    data_dir: Path,
    shard_ports: int,
    *,
    stack: contextlib.ExitStack,
    signals: _StopSignals,
    reporter: _Reporter,
) -> list[_Child]:
    """Start in dependency order; each thing is on ``stack`` before the next one starts, and
    a stop request is honoured after every step and inside every wait."""
    from persistence.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedServerError

    started = time.monotonic()
    if reporter.log_path is not None:
        reporter.say(f"logs of the shards and the router: {reporter.log_path} (JSON lines)")
    database_url = options.database_url
    if not database_url:
        reporter.say(f"starting embedded PostgreSQL (data in {data_dir / 'postgres'}) ...")
        signals.step = "the embedded PostgreSQL start"
        postgres = stack.enter_context(EmbeddedPostgres())
        stack.callback(reporter.say, "stopping embedded PostgreSQL")
        try:
            database_url = postgres.start(data_dir / "postgres")
        except EmbeddedServerError as error:
            raise _StartFailed(str(error)) from error
        signals.check()
    redis_url = options.redis_url
    if not redis_url:
        reporter.say(f"starting embedded Redis (data in {data_dir / 'redis'}) ...")
        signals.step = "the embedded Redis start"
        redis_server = stack.enter_context(EmbeddedRedis())
        stack.callback(reporter.say, "stopping embedded Redis")
        try:
            redis_url = redis_server.start(data_dir / "redis")
        except EmbeddedServerError as error:
            raise _StartFailed(str(error)) from error
        signals.check()
    signals.step = ""
    reporter.say(f"migrations applied: {_migrate_database(database_url, signals)}")
    children: list[_Child] = []
    stack.callback(_stop_children, children, reporter)
    common = [
        *("--database-url", database_url, "--redis-url", redis_url),
        *("--log-level", options.log_level),
    ]
    security = _security(options, data_dir, reporter)
    common += security.arguments
    for index in range(options.shards):
        name, listen = f"shard-{index}", f"127.0.0.1:{shard_ports + index}"
        arguments = ["shard", "--shard-id", name, "--listen", listen, *common]
        arguments += _metrics_listen(_metrics_first(options), 1 + index)
        children.append(_spawn(name, listen, "--shard-ports", arguments, reporter))
        _wait_ready(children[-1], signals, reporter, security.channels)
        reporter.say(f"{name} serving on {listen}")
    listen = f"127.0.0.1:{options.port}"
    arguments = ["router", "--listen", listen, *common, *security.router_arguments]
    arguments += _metrics_listen(_metrics_first(options), 0)
    children.append(_spawn("router", listen, "--port", arguments, reporter))
    _wait_ready(children[-1], signals, reporter, security.channels)
    reporter.say(
        f"inventory service listening on {listen} (router, {_shards(options.shards)}; "
        f"ready in {time.monotonic() - started:.1f} s; Ctrl-C to stop)"
    )
    reporter.say(_metrics_line(_metrics_first(options), options.shards))
    for hint in security.hints:
        reporter.say(hint)
    return children


def _metrics_first(options: argparse.Namespace) -> int:
    """The router's metrics port (shard-i's is the next + i); 0: no metrics."""
    first: int | None = options.metrics_ports
    return options.port + METRICS_PORT_OFFSET if first is None else first


def _planned_ports(options: argparse.Namespace) -> set[int]:
    shard_ports = options.shard_ports or options.port + SHARD_PORT_OFFSET
    return {options.port, *range(shard_ports, shard_ports + options.shards)}


def _check_metrics_ports(shards: int, first: int, taken: set[int]) -> None:
    """The metrics ports are ports, apart from the gRPC ones and free (like ``_check_plan``)."""
    from .common.server import ListenError, check_listen_address

    if first == 0:
        return
    wanted = range(first, first + 1 + shards)
    if first < 0 or wanted[-1] > PORT_MAX:
        raise _StartFailed(
            f"--metrics-ports {first} + {shards + 1} ports is not in 1 to {PORT_MAX}", EXIT_USAGE
        )
    shared = sorted(taken.intersection(wanted))
    if shared:
        raise _StartFailed(
            f"--metrics-ports {first}: port {shared[0]} is also a gRPC port", EXIT_USAGE
        )
    for port in wanted:
        try:
            check_listen_address(f"127.0.0.1:{port}")
        except ListenError as error:
            raise _StartFailed(f"{error} (--metrics-ports)", EXIT_USAGE) from None


def _metrics_listen(first: int, offset: int) -> list[str]:
    return ["--metrics-listen", f"127.0.0.1:{first + offset}"] if first else []


def _metrics_line(first: int, shards: int) -> str:
    if not first:
        return "metrics: none (--metrics-ports 0)"
    where = [f"router http://127.0.0.1:{first}/metrics"]
    where += [f"shard-{i} http://127.0.0.1:{first + 1 + i}/metrics" for i in range(shards)]
    return f"metrics (Prometheus): {', '.join(where)}"


@dataclass
class _Security:
    """How ``up``'s processes check their callers (tokens) and are reached (TLS)."""

    arguments: list[str]  # every process's flags
    router_arguments: list[str]  # the router's own: its token and TLS to the shards
    channels: ChannelFactory  # what ``up``'s health checks connect with
    hints: list[str]  # what a caller needs, said once the service listens


def _security(options: argparse.Namespace, data_dir: Path, reporter: _Reporter) -> _Security:
    from .certificates import prepare_local_tls
    from .common.tls import ChannelFactory

    security = _Security([], [], ChannelFactory(), [])
    if options.no_auth:
        reporter.say("warning: --no-auth: every caller can read, change and watch all stock")
        security.arguments.append("--no-auth")
    else:
        local = prepare_local_auth(data_dir)
        reporter.say(f"tokens are verified with the keys in {local.jwks_path}")
        security.arguments.extend(["--auth-keys", str(local.jwks_path)])
        security.router_arguments.extend(["--shard-token-file", str(local.router_token_path)])
        security.hints.append(token_hint())
    if not options.tls:
        return security
    local_tls = prepare_local_tls(data_dir)
    reporter.say(f"TLS certificates issued by the local CA {local_tls.ca}")
    security.arguments.extend(local_tls.server_arguments())
    security.router_arguments.extend(local_tls.router_arguments())
    security.hints.extend(local_tls.hints())
    security.channels = ChannelFactory(local_tls.caller())
    return security


def _spawn(
    name: str, address: str, port_flag: str, arguments: list[str], reporter: _Reporter
) -> _Child:
    """A child in its own session (a terminal's Ctrl-C is for `up`, which stops it in order),
    with its output in the log file unless --logs terminal."""
    output = reporter.log if reporter.log is not None else None
    process = subprocess.Popen(
        [sys.executable, "-m", "shard_router", *arguments],
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return _Child(name, address, port_flag, process)


def _wait_ready(
    child: _Child, signals: _StopSignals, reporter: _Reporter, channels: ChannelFactory
) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + PROCESS_READY_TIMEOUT_S
    with channels.open_blocking(child.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            signals.check()
            code = child.process.poll()
            if code is not None:
                raise _exited_before_serving(child, code, reporter)
            try:
                request = health_pb2.HealthCheckRequest()
                answer = stub.Check(request, timeout=HEALTH_CHECK_TIMEOUT_S)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(READY_POLL_INTERVAL_S)
    raise _StartFailed(
        f"{child.name} did not answer health checks on {child.address} within "
        f"{PROCESS_READY_TIMEOUT_S:g} s{reporter.tail()}"
    )


def _exited_before_serving(child: _Child, code: int, reporter: _Reporter) -> _StartFailed:
    from .common.server import LISTEN_FAILED_EXIT_CODE

    if code == LISTEN_FAILED_EXIT_CODE:  # taken between our check and its bind
        return _StartFailed(f"{child.address} is already in use ({child.port_flag})", EXIT_USAGE)
    return _StartFailed(f"{child.name} exited with code {code} before serving{reporter.tail()}")


def _watch(children: list[_Child], signals: _StopSignals, reporter: _Reporter) -> int:
    """Until a child exits (a stop request raises out of here); returns the exit code."""
    while True:
        signals.check()
        for child in children:
            code = child.process.poll()
            if code is not None:
                reporter.error(
                    f"{child.name} exited with code {code} at {_utc_now()}; "
                    f"stopping the rest{reporter.tail()}"
                )
                return EXIT_FAILED
        time.sleep(WATCH_POLL_INTERVAL_S)


def _stop_children(children: list[_Child], reporter: _Reporter) -> None:
    """The router first (no new calls), then every shard at once; each wait bounded."""
    routers = [c for c in children if c.name == "router"]
    shards = [c for c in children if c.name != "router"]
    for group in (routers, shards):
        running = [c for c in group if c.process.poll() is None]
        if not running:
            continue
        reporter.say(f"stopping {', '.join(c.name for c in running)}")
        for child in running:
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + PROCESS_STOP_TIMEOUT_S
        for child in running:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                reporter.error(f"{child.name} did not stop in {PROCESS_STOP_TIMEOUT_S:g} s; killed")
                child.process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.process.wait(PROCESS_KILL_TIMEOUT_S)


def _shards(count: int) -> str:
    return f"{count} shard" if count == 1 else f"{count} shards"


def _usage_error(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def _acknowledge(message: str) -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no usable stdout
        os.write(sys.stdout.fileno(), f"{_utc_now()} {message}\n".encode())


def _utc_now() -> str:
    """ISO-8601 UTC to the second, as in the JSON logs: 2026-11-25T14:03:07Z."""
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="seconds").replace("+00:00", "Z")


if __name__ == "__main__":
    main()
