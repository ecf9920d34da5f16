"""Feed benchmark: POS events through the router, against the textbook PostgreSQL upsert.

    inventory bench-ingest [--rates 5000,20000,40000] [--duration-s 10] [--database-url URL]

Both targets get the same stream of events, open loop: at each phase's rate, event i
occurs at ``start + i / rate``, at one of ``--stores`` stores of one merchant (a key among
its ``--skus`` SKUs). A key's first event is a stock count, the rest mostly sales, some
receipts, returns and adjustments; a ``--duplicate-share`` of the events sent are copies of
events sent before (a gateway's redelivery). An event's **lag** is from when it occurred
to when the target said it is durable (occurred -> applied), so it includes the sender's
batching and any queueing.

- **service**: the cluster of ``inventory up`` (PostgreSQL, Redis for events, 2 shards, a
  router) on loopback. One gateway per store keeps an ``Ingest.Stream`` open to the router;
  every ``--flush-ms`` it sends what has occurred at its store since (at most
  ``--batch-events`` per request, at most ``--requests-in-flight`` requests unanswered).
- **postgres**: the textbook approach a team would write instead: per event one
  transaction, ``INSERT INTO feed_events ... ON CONFLICT DO NOTHING`` and, when that
  inserted, ``UPDATE stock SET on_hand = on_hand + delta`` (a count sets it);
  ``--pg-connections`` pooled
  connections, each event sent when it occurs (at most ``--pg-in-flight`` outstanding; past
  that an event waits, and its lag shows it).

Per phase and target: events offered and acknowledged per second, lag p50 / p95 / p99 /
max, and the CPU of every process (router, shards, PostgreSQL, Redis, this generator) as
cores and as CPU microseconds per acknowledged event. After each phase an audit reads every
key back: its on_hand must be the sum of its distinct events. Then the run **settles**
before the next phase: a PostgreSQL ``CHECKPOINT`` writes out what the phase dirtied, and
the run waits (at most ``--settle-s-max``) until the servers together use less than
``SETTLED_CORES``, so that no phase pays for the one before it (a PostgreSQL phase leaves
its server flushing and vacuuming for seconds). Each phase's events sit at
keys of their own (a fresh merchant per phase and target), so phases never mix. Results:
``results.json`` and ``report.md`` in ``--output-dir`` (default
``benchmarks/results/ingest/``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import uvloop
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from ._watch_cluster import (
    GENERATOR,
    CpuSampler,
    add_server_arguments,
    measured_pids,
    run_header,
    servers,
    settle,
)
from .histograms import new_histogram, summary

DEFAULT_OUTPUT_DIR = Path("benchmarks/results/ingest")
TARGETS = ("service", "postgres")
SOURCE = "pos"
# What a till sends, by share (the rest are adjustments).
KIND_SHARES = (
    (pb.FEED_EVENT_KIND_SALE, 0.80),
    (pb.FEED_EVENT_KIND_RECEIPT, 0.10),
    (pb.FEED_EVENT_KIND_RETURN, 0.05),
)
# What a key's first event (a stock count) says is on the shelf: enough that sales keep it
# above zero, as on a stocked shelf.
STOCK_COUNTED = 1000
# The scheduler puts due events into the senders' buffers this often.
TICK_S = 0.002
READ_KEYS_MAX = 1000  # GetAvailability's bound
CALL_TIMEOUT_S = 30.0
# A phase's events still unanswered this long after its last one is due are counted lost.
DRAIN_S_MAX = 30.0
# Why events were not acknowledged (the status messages, cut), over the run.
FAILED: Counter[str] = Counter()
FAILED_MESSAGE_CHARS = 90

POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS feed_events (
    merchant_id text NOT NULL,
    source text NOT NULL,
    event_id text NOT NULL,
    occurred_at_ms bigint NOT NULL,
    PRIMARY KEY (merchant_id, source, event_id)
);
CREATE TABLE IF NOT EXISTS feed_stock (
    merchant_id text NOT NULL,
    location_id text NOT NULL,
    sku_id text NOT NULL,
    on_hand bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (merchant_id, location_id, sku_id)
);
"""
POSTGRES_INSERT_EVENT = """
INSERT INTO feed_events (merchant_id, source, event_id, occurred_at_ms) VALUES ($1, $2, $3, $4)
ON CONFLICT DO NOTHING RETURNING 1"""
POSTGRES_COUNT = """
INSERT INTO feed_stock (merchant_id, location_id, sku_id, on_hand) VALUES ($1, $2, $3, $4)
ON CONFLICT (merchant_id, location_id, sku_id) DO UPDATE SET on_hand = EXCLUDED.on_hand"""
POSTGRES_MOVE = """
INSERT INTO feed_stock (merchant_id, location_id, sku_id, on_hand) VALUES ($1, $2, $3, $4)
ON CONFLICT (merchant_id, location_id, sku_id)
DO UPDATE SET on_hand = feed_stock.on_hand + EXCLUDED.on_hand"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--targets", default=",".join(TARGETS), help="service,postgres")
    parser.add_argument(
        "--rates", default="5000,20000,40000", help="events offered per second, one phase each"
    )
    parser.add_argument("--duration-s", type=float, default=10.0, help="per phase")
    parser.add_argument("--stores", type=int, default=50, help="gateways, one per store")
    parser.add_argument("--skus", type=int, default=200, help="SKUs per store")
    parser.add_argument("--duplicate-share", type=float, default=0.1)
    parser.add_argument(
        "--flush-ms", type=float, default=100.0, help="how often a gateway sends what occurred"
    )
    parser.add_argument("--batch-events", type=int, default=500, help="events per request")
    parser.add_argument("--requests-in-flight", type=int, default=4, help="per gateway")
    parser.add_argument("--pg-connections", type=int, default=32)
    parser.add_argument("--pg-in-flight", type=int, default=256)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--settle-s-max", type=float, default=60.0, help="wait between phases for quiet, at most"
    )
    add_server_arguments(parser, DEFAULT_OUTPUT_DIR)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench-ingest", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))


# --------------------------------------------------------------------------- the stream


@dataclass
class Event:
    index: int  # its position in the phase's schedule
    message: pb.FeedEvent
    delta: int  # a count's value (the first event of its key: it sets the key's level)
    is_count: bool = False


@dataclass
class Stream:
    """A phase's events: the distinct ones, then the schedule of what is sent (with
    redeliveries), by store."""

    merchant_id: str
    stores: list[str]
    skus: int
    events: list[Event] = field(default_factory=list)
    sent: list[tuple[int, Event]] = field(default_factory=list)  # (store index, event)
    counted: set[tuple[int, int]] = field(default_factory=set)  # (store, sku) with a count

    @staticmethod
    def build(
        rng: random.Random,
        merchant_id: str,
        *,
        stores: int,
        skus: int,
        count: int,
        duplicates: float,
    ) -> Stream:
        stream = Stream(merchant_id, [f"store-{i}" for i in range(stores)], skus)
        for index in range(count):
            store = index % stores
            if stream.events and rng.random() < duplicates:
                stream.sent.append(_again(stream, rng.choice(stream.events)))
                continue
            event = _event(rng, stream, index, store)
            stream.events.append(event)
            stream.sent.append((store, event))
        return stream

    def expected(self, sent: int) -> dict[tuple[str, str], int]:
        """Each key's on_hand after the first ``sent`` events: its distinct events' sum."""
        totals: dict[tuple[str, str], int] = {}
        seen: set[int] = set()
        for _, event in self.sent[:sent]:
            if event.index in seen:
                continue
            seen.add(event.index)
            where = (event.message.key.location_id, event.message.key.sku_id)
            totals[where] = totals.get(where, 0) + event.delta
        return totals


def _event(rng: random.Random, stream: Stream, index: int, store: int) -> Event:
    """The next event at ``store``: a key's first is a stock count (``STOCK_COUNTED``), as a
    store's stock-take sets its shelves; then sales mostly, some receipts, returns and
    adjustments."""
    sku = rng.randrange(stream.skus)
    key = pb.InventoryKey(
        merchant_id=stream.merchant_id, sku_id=f"sku-{sku}", location_id=stream.stores[store]
    )
    if (store, sku) not in stream.counted:
        stream.counted.add((store, sku))
        message = pb.FeedEvent(
            event_id=f"e{index}", kind=pb.FEED_EVENT_KIND_COUNT, key=key, count=STOCK_COUNTED
        )
        return Event(index, message, STOCK_COUNTED, is_count=True)
    draw, kind = rng.random(), pb.FEED_EVENT_KIND_ADJUSTMENT
    for candidate, share in KIND_SHARES:
        if draw < share:
            kind = candidate
            break
        draw -= share
    quantity = rng.randint(1, 3)
    delta = -quantity if kind == pb.FEED_EVENT_KIND_SALE else quantity
    if kind == pb.FEED_EVENT_KIND_ADJUSTMENT:
        quantity = delta = rng.choice([-1, 1]) * quantity
    message = pb.FeedEvent(event_id=f"e{index}", kind=kind, key=key, quantity=quantity)
    return Event(index, message, delta)


def _again(stream: Stream, event: Event) -> tuple[int, Event]:
    return stream.stores.index(event.message.key.location_id), event


# ------------------------------------------------------------------------------ targets


@dataclass
class PhaseResult:
    target: str
    rate_per_s: float
    offered: int  # sent (at most the phase's count; fewer if the target held the sender back)
    acknowledged: int
    lost: int
    elapsed_s: float
    lag: dict[str, float]
    cpu_cores: dict[str, float]
    cpu_us_per_event: dict[str, float]
    audit_mismatches: int

    @property
    def events_per_s(self) -> float:
        return self.acknowledged / self.elapsed_s if self.elapsed_s else 0.0


class Schedule:
    """Event i is due at start + i / rate; ``due()`` gives what is due since the last call.

    Nothing is sent after ``stop_at``: a target that cannot keep up (it holds the sender
    back) is not given the rest of the phase's events, so a phase ends within twice its
    duration; ``sent`` says how many went out.
    """

    def __init__(
        self, events: list[tuple[int, Event]], rate_per_s: float, start: float, stop_at: float
    ) -> None:
        self._events, self._rate, self.start, self._stop_at = events, rate_per_s, start, stop_at
        self.sent = 0

    def done(self, now: float) -> bool:
        return self.sent >= len(self._events) or now >= self._stop_at

    def due(self, now: float) -> list[tuple[int, Event, float]]:
        """(store, event, occurred wall time in s) of every event due by ``now``."""
        if now >= self._stop_at:
            return []
        last = min(len(self._events), int((now - self.start) * self._rate) + 1)
        batch = []
        for position in range(self.sent, last):
            store, event = self._events[position]
            batch.append((store, event, self.start + position / self._rate))
        self.sent = max(self.sent, last)
        return batch


def _schedule(stream: Stream, rate_per_s: float, options: argparse.Namespace) -> Schedule:
    start = time.time() + 0.05
    return Schedule(stream.sent, rate_per_s, start, start + 2 * options.duration_s)


class _Gateway:
    """One store's POS gateway: an Ingest.Stream, fed every ``--flush-ms`` with what occurred."""

    def __init__(
        self, stub: pb_grpc.IngestStub, merchant_id: str, options: argparse.Namespace, lag: Any
    ) -> None:
        self.buffer: deque[tuple[Event, float]] = deque()
        self.acknowledged = 0
        self._call = stub.Stream()
        self._merchant_id = merchant_id
        self._options = options
        self._lag = lag
        self._room = asyncio.Semaphore(options.requests_in_flight)
        self._waiting: dict[int, list[float]] = {}  # sequence -> occurred times
        self._sequence = 0

    async def run(self, finished: asyncio.Event) -> None:
        reader = asyncio.create_task(self._read())
        flush_s = self._options.flush_ms / 1000
        while not (finished.is_set() and not self.buffer):
            await asyncio.sleep(flush_s)
            while self.buffer:
                await self._room.acquire()
                await self._send()
        await self._call.done_writing()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(reader, DRAIN_S_MAX)

    async def _send(self) -> None:
        size = min(len(self.buffer), self._options.batch_events)
        chunk = [self.buffer.popleft() for _ in range(size)]
        self._sequence += 1
        self._waiting[self._sequence] = [at for _, at in chunk]
        request = pb.IngestRequest(
            merchant_id=self._merchant_id,
            source=SOURCE,
            events=[e.message for e, _ in chunk],
            sequence=self._sequence,
        )
        await self._call.write(request)

    async def _read(self) -> None:
        async for response in self._call:
            occurred = self._waiting.pop(response.sequence)
            now = time.time()
            if response.HasField("error"):
                FAILED[response.error.message[:FAILED_MESSAGE_CHARS]] += len(occurred)
            for ack, at in zip(response.acks, occurred, strict=False):
                if ack.status != pb.EVENT_ACK_STATUS_FAILED:
                    self.acknowledged += 1
                    self._lag.record_value(max(1, int((now - at) * 1e6)))
                else:
                    FAILED[ack.error.message[:FAILED_MESSAGE_CHARS]] += 1
            self._room.release()


async def run_service_phase(
    router_address: str, stream: Stream, rate_per_s: float, options: argparse.Namespace
) -> tuple[int, int, Any, float]:
    """(offered, acknowledged, lag histogram, elapsed s) through Ingest.Stream."""
    histogram = new_histogram()
    async with grpc.aio.insecure_channel(router_address) as channel:
        stub = pb_grpc.IngestStub(channel)
        gateways = [_Gateway(stub, stream.merchant_id, options, histogram) for _ in stream.stores]
        schedule = _schedule(stream, rate_per_s, options)
        finished = asyncio.Event()
        tasks = [asyncio.create_task(g.run(finished)) for g in gateways]
        while not schedule.done(time.time()):
            await asyncio.sleep(TICK_S)
            for store, event, occurred in schedule.due(time.time()):
                if not event.message.occurred_at_ms:  # a redelivery keeps its time
                    event.message.occurred_at_ms = int(occurred * 1000)
                gateways[store].buffer.append((event, occurred))
        finished.set()
        await asyncio.gather(*tasks)
        elapsed_s = time.time() - schedule.start
    return schedule.sent, sum(g.acknowledged for g in gateways), histogram, elapsed_s


async def run_postgres_phase(
    pool: asyncpg.Pool, stream: Stream, rate_per_s: float, options: argparse.Namespace
) -> tuple[int, int, Any, float]:
    histogram = new_histogram()
    acknowledged = 0
    room = asyncio.Semaphore(options.pg_in_flight)

    async def apply(event: Event, occurred: float) -> None:
        nonlocal acknowledged
        try:
            message = event.message
            async with pool.acquire() as connection, connection.transaction():
                key = message.key
                inserted = await connection.fetchval(
                    POSTGRES_INSERT_EVENT,
                    key.merchant_id,
                    SOURCE,
                    message.event_id,
                    int(occurred * 1000),
                )
                if inserted:
                    statement = POSTGRES_COUNT if event.is_count else POSTGRES_MOVE
                    await connection.execute(
                        statement, key.merchant_id, key.location_id, key.sku_id, event.delta
                    )
            acknowledged += 1
            histogram.record_value(max(1, int((time.time() - occurred) * 1e6)))
        finally:
            room.release()

    schedule = _schedule(stream, rate_per_s, options)
    async with asyncio.TaskGroup() as group:
        while not schedule.done(time.time()):
            await asyncio.sleep(TICK_S)
            for _, event, occurred in schedule.due(time.time()):
                await room.acquire()
                group.create_task(apply(event, occurred))
    elapsed_s = time.time() - schedule.start
    return schedule.sent, acknowledged, histogram, elapsed_s


async def service_levels(router_address: str, stream: Stream) -> dict[tuple[str, str], int]:
    keys = [(store, f"sku-{i}") for store in stream.stores for i in range(stream.skus)]
    found: dict[tuple[str, str], int] = {}
    async with grpc.aio.insecure_channel(router_address) as channel:
        stub = pb_grpc.InventoryStub(channel)
        for start in range(0, len(keys), READ_KEYS_MAX):
            chunk = keys[start : start + READ_KEYS_MAX]
            request = pb.GetAvailabilityRequest(
                keys=[
                    pb.InventoryKey(merchant_id=stream.merchant_id, sku_id=s, location_id=loc)
                    for loc, s in chunk
                ]
            )
            answer = await stub.GetAvailability(request, timeout=CALL_TIMEOUT_S)
            for where, level in zip(chunk, answer.levels, strict=True):
                if level.exists:
                    found[where] = level.on_hand
    return found


async def postgres_levels(pool: asyncpg.Pool, stream: Stream) -> dict[tuple[str, str], int]:
    rows = await pool.fetch(
        "SELECT location_id, sku_id, on_hand FROM feed_stock WHERE merchant_id = $1",
        stream.merchant_id,
    )
    return {(r["location_id"], r["sku_id"]): r["on_hand"] for r in rows}


def mismatches(expected: dict[tuple[str, str], int], found: dict[tuple[str, str], int]) -> int:
    keys = set(expected) | set(found)
    return sum(1 for k in keys if expected.get(k, 0) != found.get(k, 0))


# --------------------------------------------------------------------------------- run


def run(options: argparse.Namespace) -> dict[str, Any]:
    uvloop.install()
    seed = options.seed if options.seed is not None else random.randrange(2**32)
    print(f"seed={seed}", flush=True)
    targets = [t for t in options.targets.split(",") if t]
    rates = [float(r) for r in options.rates.split(",") if r]
    options.output_dir.mkdir(parents=True, exist_ok=True)
    with servers(
        router_address="",
        router_pid=None,
        database_url=options.database_url,
        redis_url=options.redis_url,
        shards=2,
        log_dir=options.output_dir / "logs",
    ) as found:
        results = asyncio.run(_run(options, found, targets, rates, seed))
    results["started"] = found.started
    (options.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (options.output_dir / "report.md").write_text(markdown(results))
    print(markdown(results), flush=True)
    return results


async def _run(
    options: argparse.Namespace, found: Any, targets: list[str], rates: list[float], seed: int
) -> dict[str, Any]:

    database_url = found.database_url
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=options.pg_connections)
    assert pool is not None
    await pool.execute(POSTGRES_SCHEMA)
    sampler = CpuSampler(await measured_pids(found), found.router_pid)
    run_id = secrets.token_hex(3)
    phases: list[dict[str, Any]] = []
    try:
        for rate in rates:
            for target in targets:
                rng = random.Random(f"{seed}:{rate}")  # the same stream for every target
                merchant = f"bench-{run_id}-{target}-{int(rate)}"
                count = int(rate * options.duration_s)
                stream = Stream.build(
                    rng,
                    merchant,
                    stores=options.stores,
                    skus=options.skus,
                    count=count,
                    duplicates=options.duplicate_share,
                )
                label = f"{target}@{int(rate)}"
                sampler.mark(f"{label}:start")
                if target == "service":
                    offered, acked, histogram, elapsed = await run_service_phase(
                        found.router_address, stream, rate, options
                    )
                else:
                    offered, acked, histogram, elapsed = await run_postgres_phase(
                        pool, stream, rate, options
                    )
                sampler.mark(f"{label}:end")
                cores = sampler.window(f"{label}:start", f"{label}:end")
                if target == "service":
                    levels = await service_levels(found.router_address, stream)
                else:
                    levels = await postgres_levels(pool, stream)
                result = PhaseResult(
                    target=target,
                    rate_per_s=rate,
                    offered=offered,
                    acknowledged=acked,
                    lost=offered - acked,
                    elapsed_s=round(elapsed, 3),
                    lag=summary(histogram),
                    cpu_cores=cores,
                    cpu_us_per_event={
                        k: round(v * elapsed * 1e6 / max(acked, 1), 1) for k, v in cores.items()
                    },
                    audit_mismatches=mismatches(stream.expected(offered), levels),
                )
                print(_row(result), flush=True)
                if FAILED:
                    print(f"  not acknowledged: {dict(FAILED)}", flush=True)
                settled_s = await settle(pool, sampler, label, options.settle_s_max)
                print(f"  settled in {settled_s:.1f} s", flush=True)
                phases.append(
                    asdict_result(result) | {"failed": dict(FAILED), "settled_s": settled_s}
                )
                FAILED.clear()
    finally:
        await pool.close()
    return {
        "seed": seed,
        **run_header(options),
        "phases": phases,
    }


def asdict_result(result: PhaseResult) -> dict[str, Any]:
    data = dict(vars(result))
    data["events_per_s"] = round(result.events_per_s, 1)
    return data


def _row(result: PhaseResult) -> str:
    lag = result.lag
    return (
        f"{result.target:9} offered {result.rate_per_s:>8.0f}/s  acknowledged "
        f"{result.events_per_s:>8.0f}/s  lag p50 {lag['p50_ms']:.1f} p95 {lag['p95_ms']:.1f} "
        f"p99 {lag['p99_ms']:.1f} ms  lost {result.lost}  audit mismatches "
        f"{result.audit_mismatches}"
    )


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Ingest: POS events through the router vs. the textbook PostgreSQL upsert",
        "",
        f"Seed {results['seed']}; {results['machine']['cores']} cores, Python "
        f"{results['machine']['python']}. Lag: occurred -> acknowledged durable.",
        "",
        "| target | offered/s | acknowledged/s | lag p50 ms | p95 | p99 | max | lost | audit |"
        " CPU cores (router / shards / postgres / redis / generator) |"
        " CPU µs per event (router / shards / postgres) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for p in results["phases"]:
        cores, per = p["cpu_cores"], p["cpu_us_per_event"]
        lines.append(
            f"| {p['target']} | {p['rate_per_s']:.0f} | {p['events_per_s']:.0f} | "
            f"{p['lag']['p50_ms']:.1f} | {p['lag']['p95_ms']:.1f} | {p['lag']['p99_ms']:.1f} | "
            f"{p['lag']['max_ms']:.1f} | {p['lost']} | {p['audit_mismatches']} | "
            + " / ".join(f"{cores.get(c, 0):.2f}" for c in COMPONENTS)
            + " | "
            + " / ".join(f"{per.get(c, 0):.0f}" for c in COMPONENTS[:3])
            + " |"
        )
    return "\n".join(lines) + "\n"


COMPONENTS = ("router", "shards", "postgres", "redis", GENERATOR)


if __name__ == "__main__":
    main(sys.argv[1:])
