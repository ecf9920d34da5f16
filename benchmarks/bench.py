"""The run: start what each target needs, load, drive every phase, audit, report.

The PostgreSQL server is ``--database-url``'s, else an embedded one (``embedded``), started
only when some target needs it. For each target in turn (so that targets never compete for
the 2 cores): start its group's servers when it is the group's first target (a router and
shards, one shard, Redis, the echo ceiling; each stateful group in a fresh database), prepare
and load the catalogue, run every phase (each workload at each closed-loop concurrency, then
at each open-loop rate), audit; after the group's last target, stop its servers and drop its
database. Targets of one group (router-unary, router-client and service-batch share one
cluster) share one loaded catalogue and one cumulative ledger, so each audit checks
everything done to that server so far. Everything still running is stopped when the run
ends, also on failure or Ctrl-C.
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
from collections.abc import MutableSequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import psutil
from tqdm import tqdm

from . import histograms, report
from .audit import audit
from .cluster import Cluster
from .echo import EchoServer
from .embedded import EmbeddedPostgres, create_database, drop_database
from .runner import LedgerEntry, Phase, WorkerResult, init_worker, run_phase, run_worker
from .suites import GROUP_OF, KIND_OF, TARGETS
from .targets import INSUFFICIENT, OK, Target, TargetSpec
from .targets.postgres import PostgresTarget, postmaster_pids
from .targets.redis_lua import RedisServer, RedisTarget
from .targets.service import ServiceTarget
from .workloads import Catalogue, Key

# How long past its warm-up, duration and one call timeout a phase may take before the run
# gives up on it (client processes that hang).
PHASE_GRACE_S = 30.0
PROGRESS_INTERVAL_S = 0.25
MACHINE_CORES = psutil.cpu_count() or 1


def listening_pids(address: str) -> list[int]:
    """The pid serving a loopback TCP port (needs the right to see it; else none)."""
    port = int(address.rsplit(":", 1)[1])
    with contextlib.suppress(psutil.Error):
        for connection in psutil.net_connections(kind="tcp"):
            listening = connection.status == psutil.CONN_LISTEN
            if listening and connection.laddr and connection.laddr.port == port and connection.pid:
                return [connection.pid]
    return []


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of ``pids`` and their live descendants."""
    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for process in [root, *root.children(recursive=True)]:
                if process.pid in seen:
                    continue
                seen.add(process.pid)
                with contextlib.suppress(psutil.Error):
                    # children_*: reaped children (PostgreSQL backends that exited meanwhile)
                    times = process.cpu_times()
                    total += times.user + times.system + times.children_user
                    total += times.children_system
    return total


def machine_busy_seconds() -> float:
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def group_of(name: str) -> str:
    """The server group of target ``name`` (an unknown name is its own group)."""
    return GROUP_OF.get(name) or name


class Server:
    """What a group's targets call: an address or DSN, the processes whose CPU is "server"."""

    def __init__(self, address: str, pids: list[int], description: str) -> None:
        self.address = address
        self.pids = pids
        self.description = description


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
        self.stack = contextlib.AsyncExitStack()
        self.embedded: EmbeddedPostgres | None = None
        self.postmaster: list[int] = []
        self.servers: dict[str, Server] = {}  # group -> its running server
        self.group_stacks: dict[str, contextlib.AsyncExitStack] = {}
        self.loaded: dict[str, list[LedgerEntry]] = {}  # server group -> cumulative ledger
        self.loaded_by: dict[str, str] = {}  # server group -> the target that loaded it
        self.hot_keys: dict[str, list[Key]] = {}
        self.pool: ProcessPoolExecutor | None = None
        self.slots: MutableSequence[int] = [0] * max(1, options.client_processes)
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

    async def start_server(self, group: str, stack: contextlib.AsyncExitStack) -> Server:
        options = self.options
        if group == "cluster" and options.service_address:
            pids = listening_pids(options.service_address)
            if options.database_url:
                pids += await _postmaster(options.database_url)
            address = str(options.service_address)
            return Server(address, pids, f"the running service at {address} (--service-address)")
        if group in ("cluster", "shard"):
            dsn = await self.fresh_database(group, stack)
            routed = group == "cluster"
            cluster = Cluster(
                dsn,
                self.work_dir / group,
                shards=options.shards if routed else 1,
                router=routed,
                lease_s=options.membership_lease_s,
                name=group,
            )
            stack.callback(cluster.stop)
            await asyncio.to_thread(cluster.start)
            return Server(
                cluster.address,
                cluster.pids + self.postmaster,
                f"{cluster.description} started on {cluster.address}, fresh database",
            )
        if group == "postgres":
            dsn = await self.fresh_database(group, stack)
            return Server(dsn, self.postmaster, "fresh database")
        if group in ("redis", "redis-durable"):
            redis_server = RedisServer(self.work_dir / group, durable=group == "redis-durable")
            stack.callback(redis_server.stop)
            await asyncio.to_thread(redis_server.start)
            mode = "appendonly, appendfsync always" if redis_server.durable else "no AOF"
            return Server(redis_server.url, [redis_server.pid], f"redis-server ({mode})")
        if group == "echo":
            echo = EchoServer()
            stack.callback(echo.stop)
            await asyncio.to_thread(echo.start)
            return Server(echo.address, [echo.pid], f"echo server on {echo.address}")
        raise ValueError(f"unknown server group {group!r}")

    async def stop_group(self, group: str) -> None:
        stack = self.group_stacks.pop(group, None)
        self.servers.pop(group, None)
        if stack is not None:
            await stack.aclose()

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
        workers = self.options.client_processes
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
            if workers > 1:
                context = get_context("spawn")
                self.slots = context.RawArray("q", workers)
                self.pool = ProcessPoolExecutor(
                    workers, mp_context=context, initializer=init_worker, initargs=(self.slots,)
                )
                self.stack.callback(self.pool.shutdown, cancel_futures=True)
            for index, name in enumerate(targets):
                group = group_of(name)
                try:
                    await self.run_target(name)
                finally:
                    if last_of_group[group] == index:
                        await self.stop_group(group)
        except BaseException:
            print(f"servers' logs kept in {self.work_dir}", file=sys.stderr)
            raise
        else:
            self.stack.callback(shutil.rmtree, self.work_dir, ignore_errors=True)
        finally:
            await self.stack.aclose()
        self.results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        self.results["finished_at_unix_s"] = time.time()
        return self.results

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
            if target.spec.stateful and group in self.loaded:
                entry["catalogue_loaded_by"] = self.loaded_by[group]
            if target.spec.stateful and group not in self.loaded:
                self.loaded_by[group] = name
                print(f"[{name}] loading {self.catalogue.rows:,} key rows", file=sys.stderr)
                await target.load(self.catalogue)
                self.loaded[group] = []
                self.hot_keys[group] = []
                entry["load_s"] = time.monotonic() - started
                print(f"[{name}] loaded in {entry['load_s']:.1f} s", file=sys.stderr)
            started = time.monotonic()
            ledger = self.loaded.setdefault(group, [])
            hot_keys = self.hot_keys.setdefault(group, [])
            for phase in self.phases():
                if phase.workload == "hot" and target.spec.stateful:
                    hot = self.catalogue.hot_key(phase.index)
                    await target.load_key(hot, self.catalogue.hot_stock)
                    hot_keys.append(hot)
                self.results["phases"].append(await self.run_phase(target, phase, ledger))
            entry["phases_s"] = time.monotonic() - started
            started = time.monotonic()
            if target.spec.stateful:
                entry["audit"] = await audit(
                    target,
                    self.catalogue,
                    ledger=ledger,
                    hot_keys=hot_keys,
                    sample_max=self.options.audit_reservations_max,
                    seed=self.seed,
                )
                entry["audit_s"] = time.monotonic() - started
                verdict = "passed" if entry["audit"]["passed"] else "FAILED"
                print(f"[{name}] audit {verdict}", file=sys.stderr)
        finally:
            await target.close()
        entry["total_s"] = time.monotonic() - started_target
        print(f"[{name}] done in {entry['total_s']:.1f} s", file=sys.stderr)

    async def run_phase(
        self, target: Target, phase: Phase, ledger: list[LedgerEntry]
    ) -> dict[str, Any]:
        workers = self.options.client_processes
        for index in range(len(self.slots)):
            self.slots[index] = 0
        busy_before = machine_busy_seconds()
        server_before = cpu_seconds(target.server_pids)
        started = time.monotonic()
        parts: asyncio.Future[list[WorkerResult]]
        if self.pool is None:
            parts = asyncio.ensure_future(self.in_process(target, phase))
        else:
            loop = asyncio.get_running_loop()
            parts = asyncio.gather(
                *(
                    loop.run_in_executor(self.pool, run_worker, target.spec, phase, i, workers)
                    for i in range(workers)
                )
            )
        results: list[WorkerResult] = await self.watch(target, phase, parts)
        wall_s = time.monotonic() - started
        server_s = cpu_seconds(target.server_pids) - server_before
        busy_s = machine_busy_seconds() - busy_before
        client_s = sum(r.cpu_s for r in results)
        for result in results:
            ledger.extend(result.ledger)
        cpu = {
            "wall_s": wall_s,
            "client_cores": client_s / wall_s,
            "server_cores": server_s / wall_s,
            "other_cores": max(0.0, busy_s - client_s - server_s) / wall_s,
            "machine_cores": MACHINE_CORES,
            "client_processes": len(results),
            "client_pids": sorted({r.pid for r in results}),
        }
        return self.summarise(target, phase, results, cpu)

    async def in_process(self, target: Target, phase: Phase) -> list[WorkerResult]:
        return [await run_phase(target.spec, phase, 0, 1, self.slots)]

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

    def summarise(
        self,
        target: Target,
        phase: Phase,
        results: list[WorkerResult],
        cpu: dict[str, Any],
    ) -> dict[str, Any]:
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
        operations = sum(
            n
            for kind in ("reserve", "read")
            for code, n in merged.codes.get(kind, {}).items()
            if code in (OK, INSUFFICIENT)
        )
        reserve_codes = merged.codes.get("reserve")
        admitted = reserve_codes[OK] if reserve_codes is not None else 0
        return {
            "target": target.spec.name,
            "workload": phase.workload,
            "mode": phase.mode,
            "load": phase.load_label,
            "concurrency": phase.concurrency,
            "rate_per_s": phase.rate_per_s,
            "measured_s": measured_s,
            "operations": operations,
            "throughput_ops_s": operations / measured_s,
            # Reservations admitted per second (reserve calls answered OK).
            "reservations_ok_s": admitted / measured_s,
            "all": histograms.summary(overall),
            "calls": calls,
            "refused": codes.get(INSUFFICIENT, 0),
            "errors": {c: n for c, n in codes.items() if c not in (OK, INSUFFICIENT)},
            "cdf": histograms.cdf(overall),
            "cpu": cpu,
        }


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
