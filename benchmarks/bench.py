"""The run: start what each target needs, load, drive every phase, audit, report.

For each target in turn (so that targets never compete for the 2 cores): start its servers
(Redis, the echo ceiling, a shard when none is given), prepare and load the catalogue, run
every phase (each workload at each closed-loop concurrency, then at each open-loop rate),
audit, stop its servers. Targets on one server (service-unary and service-batch) share one
loaded catalogue and one cumulative ledger, so each audit checks everything done to that
server so far.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableSequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import grpc
import psutil
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc
from tqdm import tqdm

from . import histograms, report
from .audit import audit
from .echo import EchoServer
from .runner import LedgerEntry, Phase, WorkerResult, init_worker, run_phase, run_worker
from .targets import INSUFFICIENT, OK, Target, TargetSpec
from .targets.postgres import PostgresTarget, postmaster_pids
from .targets.redis_lua import RedisServer, RedisTarget, free_port
from .targets.service import ServiceTarget
from .workloads import Catalogue, Key

TARGETS = (
    "service-unary",
    "service-batch",
    "postgres",
    "redis",
    "redis-durable",
    "echo-unary",
    "echo-batch",
)
SHARD_START_TIMEOUT_S = 60.0
SHARD_STOP_TIMEOUT_S = 15.0
# How long past its warm-up, duration and one call timeout a phase may take before the run
# gives up on it (client processes that hang).
PHASE_GRACE_S = 30.0
PROGRESS_INTERVAL_S = 0.25
MACHINE_CORES = psutil.cpu_count() or 1


class ShardServer:
    """``python -m shard_router shard`` as a child (black box: a process and an address)."""

    def __init__(self, database_url: str, log_dir: Path) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self._database_url = database_url
        self._log_path = log_dir / "shard.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self) -> None:
        with self._log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "shard_router", "shard", "--shard-id", "bench-0",
                 "--listen", self.address, "--database-url", self._database_url],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline_s = time.monotonic() + SHARD_START_TIMEOUT_S
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.InventoryStub(channel)
            probe = pb.GetAvailabilityRequest(
                keys=[pb.InventoryKey(merchant_id="probe", sku_id="probe", location_id="probe")]
            )
            while time.monotonic() < deadline_s:
                if self._process.poll() is not None:
                    break
                with contextlib.suppress(grpc.RpcError):
                    stub.GetAvailability(probe, timeout=1.0)
                    return
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"shard did not serve on {self.address}; log: {self._log_path}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(SHARD_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(SHARD_STOP_TIMEOUT_S)


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
        self.stack = contextlib.ExitStack()
        self.shard: ShardServer | None = None
        self.echo: EchoServer | None = None
        self.loaded: dict[str, list[LedgerEntry]] = {}  # server group -> cumulative ledger
        self.hot_keys: dict[str, list[Key]] = {}
        self.pool: ProcessPoolExecutor | None = None
        self.slots: MutableSequence[int] = [0] * max(1, options.client_processes)
        self.results: dict[str, Any] = {
            "run_tag": self.run_tag,
            "seed": self.seed,
            "started_at_unix_s": time.time(),
            "machine": {"cores": MACHINE_CORES},
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

    def service_address(self) -> str:
        if self.options.service_address:
            return str(self.options.service_address)
        if self.shard is None:
            if not self.options.database_url:
                raise RuntimeError("service targets need --service-address or --database-url")
            self.shard = ShardServer(self.options.database_url, self.work_dir)
            self.shard.start()
            self.stack.callback(self.shard.stop)
        return self.shard.address

    def echo_server(self) -> EchoServer:
        """One echo server for both echo targets (idle while other targets run)."""
        if self.echo is None:
            self.echo = EchoServer()
            self.echo.start()
            self.stack.callback(self.echo.stop)
        return self.echo

    async def make_target(self, name: str, stop: contextlib.ExitStack) -> tuple[Target, str]:
        """The target and its server group (targets of one group share state)."""
        if name in ("service-unary", "service-batch"):
            address = self.service_address()
            kind = "grpc-unary" if name == "service-unary" else "grpc-batch"
            pids = listening_pids(address)
            if self.options.database_url:
                pids += await _postmaster(self.options.database_url)
            return ServiceTarget(self.spec(name, kind, address), pids, self.run_tag), address
        if name in ("echo-unary", "echo-batch"):
            echo = self.echo_server()
            kind = "grpc-unary" if name == "echo-unary" else "grpc-batch"
            spec = self.spec(name, kind, echo.address, stateful=False)
            return ServiceTarget(spec, [echo.pid], self.run_tag), name
        if name == "postgres":
            if not self.options.database_url:
                raise RuntimeError("the postgres baseline needs --database-url")
            return PostgresTarget(self.spec(name, "postgres", self.options.database_url)), name
        if name in ("redis", "redis-durable"):
            server = RedisServer(self.work_dir / name, durable=name == "redis-durable")
            server.start()
            stop.callback(server.stop)
            return RedisTarget(self.spec(name, "redis", server.url), server), name
        raise ValueError(f"unknown target {name!r}; one of {', '.join(TARGETS)}")

    async def run(self) -> dict[str, Any]:
        print(f"benchmark seed {self.seed} (replay with --seed {self.seed}); run {self.run_tag}")
        workers = self.options.client_processes
        try:
            if workers > 1:
                context = get_context("spawn")
                self.slots = context.RawArray("q", workers)
                self.pool = ProcessPoolExecutor(
                    workers, mp_context=context, initializer=init_worker, initargs=(self.slots,)
                )
                self.stack.callback(self.pool.shutdown, cancel_futures=True)
            for name in self.options.targets:
                await self.run_target(name)
        finally:
            self.stack.close()
        return self.results

    async def run_target(self, name: str) -> None:
        entry: dict[str, Any] = {"unavailable": None, "audit": None}
        self.results["targets"][name] = entry
        started_target = time.monotonic()
        with contextlib.ExitStack() as stop:
            target, group = await self.make_target(name, stop)
            try:
                await target.prepare()
                if target.unavailable:
                    entry["unavailable"] = target.unavailable
                    print(f"[{name}] unavailable: {target.unavailable}", file=sys.stderr)
                    return
                started = time.monotonic()
                if target.spec.stateful and group not in self.loaded:
                    await target.load(self.catalogue)
                    self.loaded[group] = []
                    self.hot_keys[group] = []
                entry["load_s"] = time.monotonic() - started
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
            "all": histograms.summary(overall),
            "calls": calls,
            "refused": codes.get(INSUFFICIENT, 0),
            "errors": {c: n for c, n in codes.items() if c not in (OK, INSUFFICIENT)},
            "cdf": histograms.cdf(overall),
            "cpu": cpu,
        }


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
