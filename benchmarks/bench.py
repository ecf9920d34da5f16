"""The run: start what each target needs, load, drive every phase, audit, report.

The PostgreSQL server is ``--database-url``'s, else an embedded one (``embedded``), started
only when some target needs it. For each target in turn (so that targets never compete for
the 2 cores): start its group's servers when it is the group's first target (a router and
shards with their Redis for events, one shard, Redis, the echo ceiling; each stateful group
in a fresh database), prepare and load the catalogue, run every phase (each workload at each
closed-loop concurrency, then at each open-loop rate), audit; after the group's last target,
stop its servers, drop its database and read the service processes' stats lines back from
their logs. Targets of one group (router-unary, router-client and service-batch share one
cluster) share one loaded catalogue and one cumulative ledger, so each audit checks
everything done to that server so far. Everything still running is stopped when the run
ends, also on failure or Ctrl-C.

What a phase measures, besides latency: the CPU of every process (each service process,
PostgreSQL with all its backends, Redis, each generator process) and of the whole machine,
sampled at the edges of the measured window, so that per operation they add up; the
generator processes' own garbage-collection pauses; and, from the service logs, each service
process's worst event-loop stall. The generator's ledger goes to files in the run's work
directory (deleted after a clean run, kept when something failed); the service logs go to
``<output-dir>/logs`` and are kept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, MutableSequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import psutil
from tqdm import tqdm

from . import histograms, report, service_logs
from .audit import audit
from .cluster import Cluster
from .echo import EchoServer
from .embedded import EmbeddedPostgres, create_database, drop_database
from .ledger import ledger_files, read_ledger
from .report import GENERATOR_SATURATED_CORES
from .runner import Phase, WorkerResult, init_worker, run_phase, run_worker
from .suites import GROUP_OF, KIND_OF, TARGETS
from .targets import INSUFFICIENT, OK, UNKNOWN_FATE_CODES, Target, TargetSpec
from .targets.postgres import PostgresTarget, postmaster_pids
from .targets.redis_lua import RedisServer, RedisTarget
from .targets.service import ServiceTarget
from .workloads import Catalogue, Key

# How long past its warm-up, duration and one call timeout a phase may take before the run
# gives up on it (generator processes that hang).
PHASE_GRACE_S = 30.0
PROGRESS_INTERVAL_S = 0.25
# Generator processes open their clients and freeze their heaps before a phase; the first
# phase of a pool also spawns them (about a second each on 2 busy cores).
GENERATOR_READY_TIMEOUT_S = 90.0
READY_POLL_INTERVAL_S = 0.01
# The start time is written this far ahead, so that every process (polling every 5 ms) has
# read it before it is due.
START_LEAD_S = 0.02
# The Redis the service targets publish their events to, as `inventory up` runs it.
SERVICE_REDIS_MODE = "everysec"
MACHINE_CORES = psutil.cpu_count() or 1
# The key of the machine's busy seconds in a CPU sample, beside the processes' labels.
MACHINE = "machine"


def listening_pids(address: str) -> list[int]:
    """The pid serving a loopback TCP port (needs the right to see it; else none)."""
    port = int(address.rsplit(":", 1)[1])
    with contextlib.suppress(psutil.Error):
        for connection in psutil.net_connections(kind="tcp"):
            listening = connection.status == psutil.CONN_LISTEN
            if listening and connection.laddr and connection.laddr.port == port and connection.pid:
                return [connection.pid]
    return []


def cpu_seconds(pids: list[int], tree: bool = True) -> float:
    """User + system CPU of ``pids``; with ``tree``, of their live descendants too and of
    their reaped children (PostgreSQL backends that exited meanwhile)."""
    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for process in [root, *(root.children(recursive=True) if tree else [])]:
                if process.pid in seen:
                    continue
                seen.add(process.pid)
                with contextlib.suppress(psutil.Error):
                    times = process.cpu_times()
                    total += times.user + times.system
                    if tree:
                        total += times.children_user + times.children_system
    return total


def machine_busy_seconds() -> float:
    """CPU seconds the machine's cores were busy (guest time is already in user time, steal
    is the hypervisor's)."""
    times = psutil.cpu_times()
    busy = times.user + times.system + getattr(times, "nice", 0.0)
    return float(busy + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0))


@dataclass(frozen=True)
class Measured:
    """A process whose CPU a phase reports: a label, its pids, whether its children count."""

    label: str
    pids: tuple[int, ...]
    role: str  # one of ROLES
    tree: bool = False


# After the bulk load, the servers count as quiet below this many cores for this many
# samples in a row. An idle cluster holding 1,000,000 keys uses ~0.08 core (shards 0.02
# each, router 0.013, Redis 0.01, PostgreSQL backends: timers, heartbeats, the publisher's
# catch-up), measured with psutil over 3 s.
SETTLE_QUIET_CORES = 0.15
SETTLE_QUIET_SAMPLES = 3
SETTLE_SAMPLE_S = 0.5


# The server's processes, the load generator's, and the harness's own when the generator runs
# in processes of its own (it then only waits and shows progress).
ROLES = ("server", "generator", "harness")


def cpu_sample(measured: list[Measured]) -> dict[str, float]:
    """CPU seconds so far of each process (by label), and the machine's busy seconds."""
    sample = {m.label: cpu_seconds(list(m.pids), tree=m.tree) for m in measured}
    sample[MACHINE] = machine_busy_seconds()
    return sample


def cpu_figures(
    measured: list[Measured],
    before: dict[str, float],
    after: dict[str, float],
    window_s: float,
    operations: int,
) -> dict[str, Any]:
    """Per process: CPU seconds in the window, cores, microseconds per operation; and the
    split the report has always shown (generator / server / rest of the machine)."""

    def figures(cpu_s: float) -> dict[str, Any]:
        return {
            "cpu_s": round(cpu_s, 4),
            "cores": round(cpu_s / window_s, 4),
            "us_per_operation": round(1e6 * cpu_s / operations, 1) if operations else None,
        }

    spent = {label: max(0.0, after[label] - before[label]) for label in before}
    processes = {
        m.label: {**figures(spent[m.label]), "role": m.role, "pids": list(m.pids)} for m in measured
    }
    by_role = {role: sum(spent[m.label] for m in measured if m.role == role) for role in ROLES}
    busy_s = spent[MACHINE]
    generator_cores = [p["cores"] for p in processes.values() if p["role"] == "generator"]
    return {
        "wall_s": round(window_s, 4),
        "operations": operations,
        "processes": processes,
        "machine": figures(busy_s),
        "client_cores": by_role["generator"] / window_s,
        "server_cores": by_role["server"] / window_s,
        "harness_cores": by_role["harness"] / window_s,
        "other_cores": max(0.0, busy_s - sum(by_role.values())) / window_s,
        "machine_cores": MACHINE_CORES,
        "generator_saturated": max(generator_cores, default=0.0) >= GENERATOR_SATURATED_CORES,
    }


def group_of(name: str) -> str:
    """The server group of target ``name`` (an unknown name is its own group)."""
    return GROUP_OF.get(name) or name


@dataclass
class Server:
    """What a group's targets call: an address or DSN, and the processes it runs on."""

    address: str
    description: str
    processes: list[Measured] = field(default_factory=list)  # role "server"
    logs: dict[str, Path] = field(default_factory=dict)  # service process label -> JSON log

    @property
    def pids(self) -> list[int]:
        return [pid for m in self.processes for pid in m.pids]


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": MACHINE_CORES,
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def reservation_counts(codes: dict[str, int], measured_s: float) -> dict[str, Any]:
    """The reserve calls of a phase by outcome: admitted (OK), refused (insufficient stock),
    of unknown fate, failed otherwise."""
    admitted = codes.get(OK, 0)
    refused = codes.get(INSUFFICIENT, 0)
    unknown = sum(n for code, n in codes.items() if code in UNKNOWN_FATE_CODES)
    return {
        "admitted": admitted,
        "refused": refused,
        "unknown_fate": unknown,
        "failed": sum(codes.values()) - admitted - refused - unknown,
        "admitted_per_s": admitted / measured_s,
        "refused_per_s": refused / measured_s,
    }


def counted_operations(codes: dict[str, dict[str, int]]) -> int:
    """What ops/s counts: reserve and read calls answered OK or refused (per call kind, the
    tally of status codes)."""
    return sum(
        n
        for kind in ("reserve", "read")
        for code, n in codes.get(kind, {}).items()
        if code in (OK, INSUFFICIENT)
    )


@dataclass(frozen=True)
class CpuWindow:
    """CPU samples at the edges of a phase's measured window."""

    measured: list[Measured]
    before: dict[str, float]
    after: dict[str, float]
    window_s: float


def summarise(
    target: str, phase: Phase, results: list[WorkerResult], window: CpuWindow
) -> dict[str, Any]:
    """One phase's figures from its generator processes' results, merged."""
    merged = histograms.merge([r.histograms for r in results])
    measured_s = max(r.measured_s for r in results)
    overall = histograms.new_histogram()
    calls: dict[str, Any] = {}
    codes: dict[str, int] = {}
    for kind, histogram in merged.histograms.items():
        overall.add(histogram)
        calls[kind] = {**histograms.summary(histogram), "codes": dict(merged.codes[kind])}
        for code, count in merged.codes[kind].items():
            codes[code] = codes.get(code, 0) + count
    operations = counted_operations({kind: dict(c) for kind, c in merged.codes.items()})
    reservations = reservation_counts(dict(merged.codes.get("reserve", {})), measured_s)
    cpu = cpu_figures(
        window.measured, window.before, window.after, max(window.window_s, 1e-9), operations
    )
    return {
        "target": target,
        "group": group_of(target),
        "workload": phase.workload,
        "mode": phase.mode,
        "load": phase.load_label,
        "concurrency": phase.concurrency,
        "rate_per_s": phase.rate_per_s,
        "measured_s": measured_s,
        "window_unix_s": [
            min(r.measure_from_unix_s for r in results),
            max(r.measure_to_unix_s for r in results),
        ],
        "operations": operations,
        "throughput_ops_s": operations / measured_s,
        "reservations": reservations,
        # Reservations admitted per second (reserve calls answered OK).
        "reservations_ok_s": reservations["admitted_per_s"],
        "all": histograms.summary(overall),
        "calls": calls,
        "refused": codes.get(INSUFFICIENT, 0),
        "errors": {c: n for c, n in codes.items() if c not in (OK, INSUFFICIENT)},
        "cdf": histograms.cdf(overall),
        "cpu": cpu,
        "generators": [
            {
                "worker": r.worker,
                "pid": r.pid,
                "cpu_s_phase": round(r.cpu_s, 4),
                "operations": counted_operations({k: c for k, (_, c) in r.histograms.items()}),
                "ledger_entries": r.ledger_entries,
                "gc": r.gc,
            }
            for r in sorted(results, key=lambda r: r.worker)
        ],
        "loop_stall_max_ms": {},  # filled from the service logs when the group stops
    }


class Bench:
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.seed: int = options.seed
        self.run_tag = f"{self.seed}x{secrets.token_hex(3)}"
        self.catalogue = Catalogue(
            keys=options.keys,
            stock_per_key=options.stock_per_key,
            hot_stock=options.hot_stock,
            namespace=f"b{self.run_tag}",
        )
        self.phase_numbers = iter(range(1_000_000))
        self.work_dir = Path(tempfile.mkdtemp(prefix="inventory-bench-"))
        self.logs_dir = Path(options.output_dir) / "logs"
        self.stack = contextlib.AsyncExitStack()
        self.embedded: EmbeddedPostgres | None = None
        self.postmaster: list[int] = []
        self.servers: dict[str, Server] = {}  # group -> its running server
        self.group_stacks: dict[str, contextlib.AsyncExitStack] = {}
        self.loaded_by: dict[str, str] = {}  # server group -> the target that loaded it
        self.ledger_entries: dict[str, int] = {}  # server group -> entries its ledger holds
        self.hot_keys: dict[str, list[Key]] = {}
        self.pool: ProcessPoolExecutor | None = None
        workers = options.generator_processes
        # Shared with the generator processes (see runner): progress, ready pids, start time.
        self.slots: MutableSequence[int] = [0] * workers
        self.ready: MutableSequence[int] = [0] * workers
        self.go: MutableSequence[float] = [0.0]
        self.results: dict[str, Any] = {
            "run_tag": self.run_tag,
            "seed": self.seed,
            "command": getattr(options, "command_line", ""),
            "suite": getattr(options, "suite", ""),
            "started_at_unix_s": time.time(),
            "machine": machine(),
            "postgres_server": None,
            "options": {k: v for k, v in vars(options).items() if k != "run"},
            "catalogue": {**asdict(self.catalogue), "rows": self.catalogue.rows},
            "targets": {},
            "phases": [],
            "service_logs": {},
        }

    def phases(self) -> list[Phase]:
        options, planned = self.options, []
        for workload in options.workloads:
            for concurrency in options.concurrency:
                planned.append(("closed", workload, concurrency, 0.0))
            if workload in options.rate_workloads:
                for rate in options.rate:
                    planned.append(("open", workload, 0, rate))
        return [
            Phase(
                index=next(self.phase_numbers),
                workload=workload,
                mode=mode,
                concurrency=concurrency,
                rate_per_s=rate,
                duration_s=options.duration_s,
                warmup_s=options.warmup_s,
                count_max=options.count_max,
                seed=self.seed,
                zipf_s=options.zipf_s,
                catalogue=self.catalogue,
                run_tag=self.run_tag,
            )
            for mode, workload, concurrency, rate in planned
        ]

    def spec(self, name: str, kind: str, address: str, stateful: bool = True) -> TargetSpec:
        options = self.options
        return TargetSpec(
            name=name,
            kind=kind,
            address=address,
            stateful=stateful,
            call_timeout_s=options.call_timeout_s,
            batch_items_max=options.batch_items_max,
            batch_in_flight_messages_max=options.batch_in_flight_messages_max,
            pool_size=options.pool_size,
        )

    # ------------------------------------------------------------------ servers

    async def postgres_url(self) -> str:
        """The PostgreSQL server: --database-url's, else an embedded one started now."""
        if self.options.database_url:
            if self.results["postgres_server"] is None:
                self.postmaster = await _postmaster(self.options.database_url)
                version = await _server_version(self.options.database_url)
                self.results["postgres_server"] = f"--database-url (PostgreSQL {version})"
            return str(self.options.database_url)
        if self.embedded is None:
            embedded = EmbeddedPostgres()
            self.stack.callback(embedded.stop)
            print("starting embedded PostgreSQL (pgserver, temporary directory)", file=sys.stderr)
            await asyncio.to_thread(embedded.start)
            self.embedded = embedded
            self.postmaster = [embedded.pid] if embedded.pid else []
            version = await _server_version(embedded.url)
            self.results["postgres_server"] = f"embedded pgserver (PostgreSQL {version})"
        return self.embedded.url

    def postgresql(self) -> list[Measured]:
        """PostgreSQL as one process of the report: the postmaster and all its backends."""
        if not self.postmaster:
            return []
        return [Measured("postgresql", tuple(self.postmaster), "server", tree=True)]

    async def fresh_database(self, group: str, stack: contextlib.AsyncExitStack) -> str:
        """A new database for ``group`` on the run's server, dropped when ``stack`` closes."""
        server_url = await self.postgres_url()
        name = f"bench_{self.run_tag}_{group.replace('-', '_')}"
        dsn = await create_database(server_url, name)
        stack.push_async_callback(drop_database, server_url, name)
        return dsn

    async def server(self, group: str) -> Server:
        """The running server of ``group``, started on first use."""
        if group in self.servers:
            return self.servers[group]
        stack = contextlib.AsyncExitStack()
        self.group_stacks[group] = stack
        self.stack.push_async_callback(stack.aclose)
        server = await self.start_server(group, stack)
        self.servers[group] = server
        print(f"[{group}] {server.description}", file=sys.stderr)
        return server

    async def start_redis(
        self, directory: Path, mode: str, stack: contextlib.AsyncExitStack
    ) -> RedisServer:
        redis_server = RedisServer(directory, mode=mode)
        stack.callback(redis_server.stop)
        await asyncio.to_thread(redis_server.start)
        return redis_server

    async def start_server(self, group: str, stack: contextlib.AsyncExitStack) -> Server:
        options = self.options
        if group == "cluster" and options.service_address:
            address = str(options.service_address)
            service = Measured("service", tuple(listening_pids(address)), "server")
            if options.database_url:
                await self.postgres_url()
            return Server(
                address,
                f"the running service at {address} (--service-address)",
                [service, *self.postgresql()],
            )
        if group in ("cluster", "shard"):
            return await self.start_cluster(group, stack)
        if group == "postgres":
            dsn = await self.fresh_database(group, stack)
            return Server(dsn, "fresh database", self.postgresql())
        if group in ("redis", "redis-durable"):
            mode = "always" if group == "redis-durable" else "memory"
            redis_server = await self.start_redis(self.work_dir / group, mode, stack)
            redis = Measured("redis", (redis_server.pid,), "server")
            return Server(redis_server.url, redis_server.description, [redis])
        if group == "echo":
            echo = EchoServer()
            stack.callback(echo.stop)
            await asyncio.to_thread(echo.start)
            measured = Measured("echo", (echo.pid,), "server")
            return Server(echo.address, f"echo server on {echo.address}", [measured])
        raise ValueError(f"unknown server group {group!r}")

    async def start_cluster(self, group: str, stack: contextlib.AsyncExitStack) -> Server:
        """Shards (and a router for ``cluster``) in a fresh database, publishing their
        events to a Redis of their own unless ``--service-events off``."""
        options = self.options
        dsn = await self.fresh_database(group, stack)
        redis: list[Measured] = []
        redis_url, events = "", "events off (no Redis)"
        if options.service_events == "on":
            redis_server = await self.start_redis(
                self.work_dir / group / "redis", SERVICE_REDIS_MODE, stack
            )
            redis_url, events = redis_server.url, f"events on ({redis_server.description})"
            redis = [Measured("redis", (redis_server.pid,), "server")]
        routed = group == "cluster"
        cluster = Cluster(
            dsn,
            self.logs_dir / group,
            shards=options.shards if routed else 1,
            router=routed,
            lease_s=options.membership_lease_s,
            name=group,
            redis_url=redis_url,
            stats_interval_s=options.service_stats_interval_s,
        )
        stack.callback(cluster.stop)
        await asyncio.to_thread(cluster.start)
        labelled = cluster.labelled
        return Server(
            cluster.address,
            f"{cluster.description} started on {cluster.address}, fresh database, {events}",
            [
                *(Measured(label, (p.pid,), "server") for label, p in labelled.items()),
                *self.postgresql(),
                *redis,
            ],
            {label: p.log_path for label, p in labelled.items()},
        )

    async def stop_group(self, group: str) -> None:
        stack = self.group_stacks.pop(group, None)
        server = self.servers.pop(group, None)
        if stack is not None:
            await stack.aclose()
        if server is not None and server.logs:
            self.attach_loop_stalls(group, server.logs)

    def attach_loop_stalls(self, group: str, logs: dict[str, Path]) -> None:
        """Each phase of ``group``: every service process's worst loop stall in its window."""
        lines = {label: service_logs.stats_lines(path) for label, path in logs.items()}
        self.results["service_logs"][group] = {
            label: {
                "path": str(logs[label]),
                "stats_lines": len(found),
                "stats_period_s": service_logs.stats_period_s(found),
            }
            for label, found in lines.items()
        }
        for phase in self.results["phases"]:
            if phase["group"] != group:
                continue
            window_from, window_to = phase["window_unix_s"]
            phase["loop_stall_max_ms"] = {
                label: service_logs.worst_stall(found, window_from, window_to)
                for label, found in lines.items()
            }

    async def make_target(self, name: str) -> Target:
        group = GROUP_OF.get(name)
        if group is None:
            raise ValueError(f"unknown target {name!r}; one of {', '.join(TARGETS)}")
        server = await self.server(group)
        entry = self.results["targets"][name]
        entry["server"] = server.description
        if group in ("cluster", "shard", "echo"):
            spec = self.spec(name, KIND_OF[name], server.address, stateful=group != "echo")
            return ServiceTarget(spec, server.pids, self.run_tag)
        if group == "postgres":
            return PostgresTarget(self.spec(name, "postgres", server.address))
        return RedisTarget(self.spec(name, "redis", server.address), server.pids)

    # ------------------------------------------------------------------ the run

    async def run(self) -> dict[str, Any]:
        print(f"benchmark seed {self.seed} (replay with --seed {self.seed}); run {self.run_tag}")
        # Targets of one group run back to back (in the order given otherwise), so that a
        # group's servers are stopped before the next group runs: idle servers would take
        # CPU from the target measured and count in PostgreSQL's share.
        given: list[str] = list(self.options.targets)
        first_of_group: dict[str, int] = {}
        for name in given:
            first_of_group.setdefault(group_of(name), len(first_of_group))
        targets = sorted(given, key=lambda n: first_of_group[group_of(n)])
        self.results["targets_order"] = targets
        last_of_group = {group_of(n): i for i, n in enumerate(targets)}
        try:
            self.start_generators()
            for index, name in enumerate(targets):
                group = group_of(name)
                try:
                    await self.run_target(name)
                finally:
                    if last_of_group[group] == index:
                        await self.stop_group(group)
        except BaseException:
            print(f"the generators' ledgers are kept in {self.work_dir}", file=sys.stderr)
            raise
        else:
            audits = [t["audit"] for t in self.results["targets"].values() if t.get("audit")]
            if all(a["passed"] for a in audits):
                self.stack.callback(shutil.rmtree, self.work_dir, ignore_errors=True)
            else:
                print(f"audit failed: the ledgers are kept in {self.work_dir}", file=sys.stderr)
        finally:
            await self.stack.aclose()
        self.results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        self.results["finished_at_unix_s"] = time.time()
        return self.results

    def start_generators(self) -> None:
        """With several generator processes, their pool and the arrays they share."""
        workers = self.options.generator_processes
        if workers == 1:
            return
        context = get_context("spawn")
        self.slots = context.RawArray("q", workers)
        self.ready = context.RawArray("q", workers)
        self.go = context.RawArray("d", 1)
        self.pool = ProcessPoolExecutor(
            workers,
            mp_context=context,
            initializer=init_worker,
            initargs=(self.slots, self.ready, self.go),
        )
        self.stack.callback(self.pool.shutdown, cancel_futures=True)

    async def run_target(self, name: str) -> None:
        entry: dict[str, Any] = {"unavailable": None, "audit": None}
        self.results["targets"][name] = entry
        started_target = time.monotonic()
        group = group_of(name)
        started = time.monotonic()
        target = await self.make_target(name)
        entry["start_s"] = time.monotonic() - started
        try:
            await target.prepare()
            if target.unavailable:
                entry["unavailable"] = target.unavailable
                print(f"[{name}] unavailable: {target.unavailable}", file=sys.stderr)
                return
            started = time.monotonic()
            if target.spec.stateful and group in self.loaded_by:
                entry["catalogue_loaded_by"] = self.loaded_by[group]
            if target.spec.stateful and group not in self.loaded_by:
                self.loaded_by[group] = name
                print(f"[{name}] loading {self.catalogue.rows:,} key rows", file=sys.stderr)
                await target.load(self.catalogue)
                entry["load_s"] = time.monotonic() - started
                print(f"[{name}] loaded in {entry['load_s']:.1f} s", file=sys.stderr)
                entry["settle"] = await self.settle(group)
            started = time.monotonic()
            hot_keys = self.hot_keys.setdefault(group, [])
            for phase in self.phases():
                if phase.workload == "hot" and target.spec.stateful:
                    hot = self.catalogue.hot_key(phase.index)
                    await target.load_key(hot, self.catalogue.hot_stock)
                    hot_keys.append(hot)
                self.results["phases"].append(await self.run_phase(target, phase, group))
            entry["phases_s"] = time.monotonic() - started
            started = time.monotonic()
            if target.spec.stateful:
                entry["audit"] = await audit(
                    target,
                    self.catalogue,
                    ledger=read_ledger(ledger_files(self.ledger_dir(group))),
                    hot_keys=hot_keys,
                    sample_max=self.options.audit_reservations_max,
                    seed=self.seed,
                    entries_expected=self.ledger_entries.get(group, 0),
                )
                entry["audit_s"] = time.monotonic() - started
                verdict = "passed" if entry["audit"]["passed"] else "FAILED"
                print(f"[{name}] audit {verdict}", file=sys.stderr)
        finally:
            await target.close()
        entry["total_s"] = time.monotonic() - started_target
        print(f"[{name}] done in {entry['total_s']:.1f} s", file=sys.stderr)

    async def settle(self, group: str) -> dict[str, Any]:
        """Wait until the group's server processes are quiet after the bulk load (its
        checkpoint written, PostgreSQL's autovacuum done), so that no phase pays for the
        load: quiet is under SETTLE_QUIET_CORES for SETTLE_QUIET_SAMPLES samples in a row,
        and the wait is bounded by --settle-max-s. Returns how long it took and whether
        the servers did go quiet."""
        both = [*self.servers[group].processes, *self.postgresql()]
        measured = list({m.label: m for m in both}.values())
        started = time.monotonic()
        deadline = started + self.options.settle_max_s
        quiet = 0
        before = await asyncio.to_thread(cpu_sample, measured)
        while quiet < SETTLE_QUIET_SAMPLES and time.monotonic() < deadline:
            await asyncio.sleep(SETTLE_SAMPLE_S)
            after = await asyncio.to_thread(cpu_sample, measured)
            busy_s = sum(after[m.label] - before[m.label] for m in measured)
            quiet = quiet + 1 if busy_s / SETTLE_SAMPLE_S < SETTLE_QUIET_CORES else 0
            before = after
        settled = {
            "s": round(time.monotonic() - started, 2),
            "quiet": quiet >= SETTLE_QUIET_SAMPLES,
        }
        label = "quiet" if settled["quiet"] else "still busy (--settle-max-s)"
        print(f"[{group}] servers {label} after {settled['s']:.1f} s", file=sys.stderr)
        return settled

    def ledger_dir(self, group: str) -> Path:
        return self.work_dir / "ledger" / group

    async def run_phase(self, target: Target, phase: Phase, group: str) -> dict[str, Any]:
        workers = self.options.generator_processes
        for index in range(workers):
            self.slots[index] = 0
            self.ready[index] = 0
        self.go[0] = 0.0
        paths = [
            self.ledger_dir(group) / f"p{phase.index:05d}-w{i:03d}.tsv" for i in range(workers)
        ]
        parts = self.launch(target.spec, phase, paths)
        window: asyncio.Task[CpuWindow] | None = None
        try:
            await self.until_ready(parts, workers)
            measured = [
                *self.servers[group].processes,
                *(
                    Measured(f"generator-{i}", (self.ready[i],), "generator")
                    for i in range(workers)
                ),
                *([Measured("harness", (os.getpid(),), "harness")] if self.pool else []),
            ]
            go = time.time() + START_LEAD_S
            measure_from = go + phase.warmup_s
            window = asyncio.create_task(
                self.cpu_window(measured, measure_from, measure_from + phase.duration_s, parts)
            )
            self.go[0] = go
            results = await self.watch(target, phase, parts)
            cpu = await window
        finally:
            if window is not None and not window.done():
                window.cancel()
        self.ledger_entries[group] = self.ledger_entries.get(group, 0) + sum(
            r.ledger_entries for r in results
        )
        return summarise(target.spec.name, phase, results, cpu)

    def launch(
        self, spec: TargetSpec, phase: Phase, ledger_paths: list[Path]
    ) -> asyncio.Future[list[WorkerResult]]:
        """The phase in every generator process (here, or in the pool); not yet started."""
        workers = len(ledger_paths)
        if self.pool is None:
            single = run_phase(
                spec,
                phase,
                worker=0,
                workers=1,
                progress=self.slots,
                ready=self.ready,
                go=self.go,
                ledger_path=ledger_paths[0],
            )
            return asyncio.ensure_future(_as_list(single))
        loop = asyncio.get_running_loop()
        return asyncio.gather(
            *(
                loop.run_in_executor(
                    self.pool, run_worker, spec, phase, i, workers, str(ledger_paths[i])
                )
                for i in range(workers)
            )
        )

    async def until_ready(self, parts: asyncio.Future[list[WorkerResult]], workers: int) -> None:
        """Until every generator process has said ready; its failure raises here."""
        deadline = time.monotonic() + GENERATOR_READY_TIMEOUT_S
        while not all(self.ready[i] for i in range(workers)):
            if parts.done():
                parts.result()  # raises what failed
                raise RuntimeError("a generator process ended before the phase started")
            if time.monotonic() > deadline:
                parts.cancel()
                raise RuntimeError(
                    f"generator processes not ready within {GENERATOR_READY_TIMEOUT_S} s"
                )
            await asyncio.wait({parts}, timeout=READY_POLL_INTERVAL_S)

    async def cpu_window(
        self,
        measured: list[Measured],
        measure_from: float,
        measure_to: float,
        parts: asyncio.Future[list[WorkerResult]],
    ) -> CpuWindow:
        """CPU samples at the measured window's start and end (Unix seconds), or when the
        generators finish first (``--count-max``)."""
        await asyncio.sleep(max(0.0, measure_from - time.time()))
        before = await asyncio.to_thread(cpu_sample, measured)
        started = time.monotonic()
        await asyncio.wait({parts}, timeout=max(0.0, measure_to - time.time()))
        window_s = time.monotonic() - started
        after = await asyncio.to_thread(cpu_sample, measured)
        return CpuWindow(measured, before, after, window_s)

    async def watch(
        self, target: Target, phase: Phase, parts: asyncio.Future[list[WorkerResult]]
    ) -> list[WorkerResult]:
        total_s = phase.warmup_s + phase.duration_s
        limit_s = total_s + self.options.call_timeout_s + PHASE_GRACE_S
        description = f"{target.spec.name} {phase.workload} {phase.load_label}"
        started = time.monotonic()
        with tqdm(
            total=round(total_s, 1), unit="s", desc=description, disable=self.options.no_progress,
            leave=False, bar_format="{desc}: {bar} {n:.1f}/{total}s {postfix}",
        ) as bar:  # fmt: skip
            while not parts.done():
                elapsed_s = time.monotonic() - started
                if elapsed_s > limit_s:
                    parts.cancel()
                    raise RuntimeError(f"phase {description} overran {limit_s:.0f} s")
                bar.n = round(min(elapsed_s, total_s), 1)
                bar.set_postfix(ops=sum(self.slots), refresh=True)
                await asyncio.wait({parts}, timeout=PROGRESS_INTERVAL_S)
        return parts.result()


async def _as_list(single: Awaitable[WorkerResult]) -> list[WorkerResult]:
    return [await single]


async def _server_version(dsn: str) -> str:
    import asyncpg

    with contextlib.suppress(OSError, asyncpg.PostgresError):
        connection = await asyncpg.connect(dsn)
        try:
            return str(await connection.fetchval("SHOW server_version"))
        finally:
            await connection.close()
    return "unknown version"


async def _postmaster(dsn: str) -> list[int]:
    import asyncpg

    with contextlib.suppress(OSError, asyncpg.PostgresError):
        connection = await asyncpg.connect(dsn)
        try:
            return await postmaster_pids(connection)
        finally:
            await connection.close()
    return []


def run(options: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark of ``options``; write the report; return the results."""
    bench = Bench(options)
    results = asyncio.run(bench.run())
    files = report.write(results, Path(options.output_dir))
    print(report.markdown(results))
    print(f"report: {', '.join(str(p) for p in files.values())}")
    return results
