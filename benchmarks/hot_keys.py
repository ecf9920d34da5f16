"""Hot-key benchmark: one viral SKU on one owner, split over K parts, and the PostgreSQL hot row.

    inventory bench-hot [--callers 256] [--duration-s 10] [--parts 2,4] [--shards 4] [--rounds 3]

Every phase hammers one fresh key (one SKU at one store) with ``--callers`` concurrent
callers, each reserving one unit at a time with a key of its own, closed loop, for
``--duration-s`` after ``--warmup-s``:

- **one owner**: the key as it is, on the shard owning its partition;
- **split, K parts**: the key split (``HotKeys.SplitKey``) into its home and K - 1 buckets,
  each on a shard of its own (``--shards`` should be at least the largest K), the router's
  rebalancer spreading the units; K counts the parts, the home included (K = 2 is the home
  and one bucket);
- **postgres hot row**: the textbook conditional ``UPDATE ... WHERE on_hand - reserved >= 1``
  on one row and the reservation's INSERT, one transaction each (``benchmarks.targets.
  postgres``), on the same PostgreSQL server.

The service's phases go through ``shard_router.client.InventoryClient`` with automatic
batching (``--client grpc-unary``: one plain call each), as an order service would call it.
With enough stock to keep admitting (``--stock``, far more than a phase can sell), each phase
reports admitted reservations/s, latency p50/p95/p99 of every call, and the CPU of every
process (router, shards, PostgreSQL, Redis, this generator) as cores and as CPU µs per
admitted reservation. Every refusal there is a **false sold-out**: at least 95 % of the
stock remained throughout (the report checks it).

The shards checkpoint every ``--checkpoint-interval-s`` (1 s; their default is 30 s, with
one at 20,000 records in between): each phase then pays for checkpointing its own
reservations. At 30 s, a phase's last ones were checkpointed during the phase after it, which
paid for them, and a split's parts, each below 20,000 records, handed on all of theirs.

These phases run ``--rounds`` times, each round in the reverse order of the one before (one
owner, the splits, PostgreSQL; then PostgreSQL first), so that a machine that drifts during
the run (the servers' state grows, a neighbour wakes up) does not favour one phase. Each
phase's figures are the median over the rounds; each ratio is taken within a round, between
phases minutes apart at most, and reported as the median and the worst over the rounds.

Then **sell-out** phases (one owner and each K): ``--sell-out-stock`` units and the same
callers until ``--sell-out-s``. They report the false sold-out rate while at least 5 % of the
stock remained (a refusal for insufficient stock answered while more than 5 % of the stock
was not yet admitted, over the calls answered in that time: an upper bound, since calls in
flight may have been about to take those units) and the **stranded** units: those never
admitted by the end, with the callers still asking (units a bucket holds while the others
are empty, or in transit). An answer that is neither an admission nor such a refusal is
counted as **failed**, apart (a partition at its bound of live reservations, an outage).

During every service phase one ``Watch`` subscriber follows the key: the **staleness of the
displayed total** is, per change it receives, the time from the commit of the part's change
that moved the total to its arrival (commit -> shown), and after the load stops, how long
the stream takes to show what a strong read of the key shows.

Audit: after each phase a strong read of the key must hold exactly the admitted units as
reserved (nothing oversold, no acknowledged reservation lost). Results: ``results.json``,
``report.md`` and ``hot-keys.png`` in ``--output-dir`` (default
``benchmarks/results/hot-keys/``). Only loopback servers; every phase stops by itself
(duration and ``--ops-max`` calls).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import uvloop
from inventory.v1 import events_pb2, events_pb2_grpc
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
from .targets import INSUFFICIENT, OK, Client, TargetSpec, open_client
from .targets.postgres import PostgresTarget
from .targets.service import key_to_proto
from .workloads import Key

DEFAULT_OUTPUT_DIR = Path("benchmarks/results/hot-keys")
MERCHANT = "m-hot"
# Each phase's key at a store of its own: a partition holds at most 100,000 live
# reservations (inventory_core limits), and the reservations of a phase outlive it.
LOCATION = "store-hot-{index}"
# Reservations outlive every phase: an expiry would hand units back mid-sell-out.
TTL_S = 3600
CALL_TIMEOUT_S = 30.0
# After a phase, how long past the shards' checkpoint interval the harness waits before it
# looks for quiet: the last checkpoint of the phase's reservations starts by then.
CHECKPOINT_SLACK_S = 0.5
# How long a split may take to hand every bucket its first share (the rebalancer's rounds).
GRANTED_WAIT_S = 30.0
# How long the Watch stream may take to show what a strong read shows, once the load stops.
CONVERGE_WAIT_S = 10.0
POLL_S = 0.05
# The share of the stock that must remain for a refusal to count as a false sold-out.
FALSE_SOLD_OUT_REMAINING = 0.05
# A fixed pure-Python loop, timed in CPU before each phase: how fast this (shared) machine
# ran just then, so that a phase's figures can be read against it.
SPEED_LOOP_N = 200_000
SPEED_SAMPLES = 5
COMPONENTS = ("router", "shards", "postgres", "redis", GENERATOR)
ADMITTED, REFUSED, FAILED = "admitted", "refused", "failed"
SERVERS = COMPONENTS[:-1]


@dataclass(frozen=True)
class Phase:
    name: str
    target: str  # "service" | "postgres"
    parts: int  # 1: one owner (or the PostgreSQL row); K: the home and K - 1 buckets
    stock: int
    seconds: float
    warmup_s: float
    sell_out: bool
    round: int = 0


@dataclass
class Calls:
    """What the callers saw: a latency histogram, answers by code, and when each answer came
    (seconds from the measured window's start) with what it was (``ADMITTED``, ``REFUSED``
    for insufficient stock, else ``FAILED``), for the sell-out figures."""

    histogram: Any = field(default_factory=new_histogram)
    codes: Counter[str] = field(default_factory=Counter)
    answered: list[tuple[float, str]] = field(default_factory=list)
    admitted: int = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--callers", type=int, default=256, help="concurrent callers")
    parser.add_argument("--duration-s", type=float, default=10.0, help="per phase, measured")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="per phase, not measured")
    parser.add_argument(
        "--parts", default="2,4", help="K of the split phases: the home and K - 1 buckets"
    )
    parser.add_argument("--shards", type=int, default=4, help="shard processes")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="times each throughput phase runs, in alternating order (medians are reported)",
    )
    parser.add_argument(
        "--stock", type=int, default=10_000_000, help="the key's units: more than a phase sells"
    )
    parser.add_argument("--sell-out-stock", type=int, default=3000)
    parser.add_argument("--sell-out-s", type=float, default=6.0, help="per sell-out phase")
    parser.add_argument(
        "--client",
        choices=("grpc-client", "grpc-unary"),
        default="grpc-client",
        help="how the service is called: InventoryClient with batching, or unary calls",
    )
    parser.add_argument("--pg-connections", type=int, default=32)
    parser.add_argument("--ops-max", type=int, default=2_000_000, help="calls per phase, at most")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL row")
    parser.add_argument("--no-sell-out", action="store_true", help="skip the sell-out phases")
    parser.add_argument("--settle-s-max", type=float, default=30.0)
    parser.add_argument(
        "--checkpoint-interval-s",
        type=float,
        default=1.0,
        help="the shards' (their default is 30 s): each phase then pays for its own "
        "checkpoints, not for the tail of the phase before",
    )
    add_server_arguments(parser, DEFAULT_OUTPUT_DIR)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench-hot", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))


def phases_of(options: argparse.Namespace) -> list[Phase]:
    parts = [int(k) for k in options.parts.split(",") if k]
    if any(k < 2 for k in parts):
        raise SystemExit("--parts: each K is at least 2 (the home and one bucket)")
    if options.rounds < 1:
        raise SystemExit("--rounds: at least 1")
    plenty = (options.stock, options.duration_s, options.warmup_s, False)
    each = [Phase("one owner", "service", 1, *plenty)]
    each += [Phase(f"split K={k}", "service", k, *plenty) for k in parts]
    if not options.no_postgres:
        each.append(Phase("postgres hot row", "postgres", 1, *plenty))
    found: list[Phase] = []
    for number in range(options.rounds):
        ordered = each if number % 2 == 0 else each[::-1]
        found += [replace(phase, round=number) for phase in ordered]
    if not options.no_sell_out:
        sell_out = (options.sell_out_stock, options.sell_out_s, 0.0, True)
        found.append(Phase("one owner, sell-out", "service", 1, *sell_out))
        found += [Phase(f"split K={k}, sell-out", "service", k, *sell_out) for k in parts]
    return found


def run(options: argparse.Namespace) -> dict[str, Any]:
    uvloop.install()
    options.output_dir.mkdir(parents=True, exist_ok=True)
    with servers(
        router_address="",
        router_pid=None,
        database_url=options.database_url,
        redis_url=options.redis_url,
        shards=options.shards,
        log_dir=options.output_dir / "logs",
        shard_options=["--checkpoint-interval-s", f"{options.checkpoint_interval_s:g}"],
    ) as found:
        results = asyncio.run(_run(options, found))
    results["started"] = found.started
    (options.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (options.output_dir / "report.md").write_text(markdown(results))
    plot(results, options.output_dir / "hot-keys.png")
    print(markdown(results), flush=True)
    return results


async def _run(options: argparse.Namespace, found: Any) -> dict[str, Any]:

    sampler = CpuSampler(await measured_pids(found), found.router_pid)
    pool = await asyncpg.create_pool(found.database_url, min_size=1, max_size=2)
    assert pool is not None
    run_id = secrets.token_hex(3)
    service = TargetSpec(
        "service", options.client, found.router_address, call_timeout_s=CALL_TIMEOUT_S
    )
    postgres = TargetSpec(
        "postgres",
        "postgres",
        found.database_url,
        call_timeout_s=CALL_TIMEOUT_S,
        pool_size=options.pg_connections,
    )
    baseline = PostgresTarget(postgres)
    results: list[dict[str, Any]] = []
    try:
        if not options.no_postgres:
            await baseline.prepare()
        async with grpc.aio.insecure_channel(found.router_address) as channel:
            for index, phase in enumerate(phases_of(options)):
                key = Key(MERCHANT, LOCATION.format(index=index), f"hot-{run_id}-{index}")
                spec = service if phase.target == "service" else postgres
                print(f"[{phase.name}] {key.sku_id}: {phase.stock:,} units", flush=True)
                if phase.target == "service":
                    await _prepare_service_key(channel, key, phase)
                else:
                    await baseline.load_key(key, phase.stock)
                loop_ms = machine_loop_ms()
                result = await run_phase(
                    phase, key, spec, options=options, sampler=sampler, channel=channel
                )
                result["machine_loop_ms"] = loop_ms
                if phase.target == "service":
                    result |= await _service_audit(channel, key, phase, result)
                else:
                    level = (await baseline.levels([key]))[key]
                    result["audit"] = {"reserved": level.reserved}
                admitted = result["admitted"] + result["warmup_admitted"]
                result["audit"]["passed"] = result["audit"]["reserved"] == admitted
                print(_line(result), flush=True)
                result["settled_s"] = await settle(
                    pool,
                    sampler,
                    f"{index}",
                    options.settle_s_max,
                    wait_s_min=options.checkpoint_interval_s + CHECKPOINT_SLACK_S,
                )
                results.append(result)
    finally:
        await baseline.close()
        await pool.close()
    by_round = ratios_by_round(results)
    return {
        **run_header(options),
        "phases": results,
        "summary": summary_of(results),
        "ratios_by_round": by_round,
        "ratios": {n: statistics.median(r[n] for r in by_round if n in r) for n in by_round[0]},
        "ratios_worst": {n: min(r[n] for r in by_round if n in r) for n in by_round[0]},
    }


# ------------------------------------------------------------------------------ a phase


async def _prepare_service_key(channel: grpc.aio.Channel, key: Key, phase: Phase) -> None:
    """The key with its stock and, for a split phase, split with every bucket granted."""
    inventory = pb_grpc.InventoryStub(channel)
    await inventory.SetStock(
        pb.SetStockRequest(
            key=key_to_proto(key), on_hand=phase.stock, idempotency_key=f"stock-{key.sku_id}"
        ),
        timeout=CALL_TIMEOUT_S,
    )
    if phase.parts == 1:
        return
    hot_keys = pb_grpc.HotKeysStub(channel)
    split = await hot_keys.SplitKey(
        pb.SplitKeyRequest(
            key=key_to_proto(key),
            bucket_count=phase.parts - 1,
            idempotency_key=f"split-{key.sku_id}",
        ),
        timeout=CALL_TIMEOUT_S,
    )
    buckets = list(split.split.buckets)
    deadline = time.monotonic() + GRANTED_WAIT_S
    while time.monotonic() < deadline:
        found = await hot_keys.GetHotKeys(
            pb.GetHotKeysRequest(keys=buckets), timeout=CALL_TIMEOUT_S
        )
        if len(found.parts) == len(buckets) and all(p.level.on_hand for p in found.parts):
            return
        await asyncio.sleep(POLL_S)
    raise RuntimeError(f"{key.sku_id}: the rebalancer never granted every bucket")


async def run_phase(
    phase: Phase,
    key: Key,
    spec: TargetSpec,
    *,
    options: argparse.Namespace,
    sampler: CpuSampler,
    channel: grpc.aio.Channel,
) -> dict[str, Any]:
    client = await open_client(spec, options.callers)
    watcher = Watcher(key) if phase.target == "service" else None
    watching = asyncio.ensure_future(watcher.follow(channel)) if watcher else None
    try:
        warmup = Calls()
        if phase.warmup_s:
            await _load(client, key, warmup, seconds=phase.warmup_s, tag="warmup", options=options)
        calls = Calls()
        sampler.mark(f"{key.sku_id}:start")
        started = time.monotonic()
        await _load(client, key, calls, seconds=phase.seconds, tag="run", options=options)
        elapsed_s = time.monotonic() - started
        sampler.mark(f"{key.sku_id}:end")
    finally:
        await client.close()
    cores = sampler.window(f"{key.sku_id}:start", f"{key.sku_id}:end")
    admitted = calls.admitted
    per_op = {
        name: round(used * elapsed_s * 1e6 / max(admitted, 1), 1) for name, used in cores.items()
    }
    result: dict[str, Any] = {
        "name": phase.name,
        "round": phase.round,
        "target": phase.target,
        "parts": phase.parts,
        "stock": phase.stock,
        "sell_out": phase.sell_out,
        "elapsed_s": round(elapsed_s, 3),
        "calls": sum(calls.codes.values()),
        "admitted": admitted,
        "admitted_per_s": round(admitted / elapsed_s, 1),
        "codes": dict(calls.codes),
        "refused": sum(kind == REFUSED for _, kind in calls.answered),
        "failed": sum(kind == FAILED for _, kind in calls.answered),
        "latency": summary(calls.histogram),
        "cpu_cores": cores,
        "cpu_us_per_admitted": per_op,
        "servers_cpu_us_per_admitted": round(sum(per_op.get(c, 0.0) for c in SERVERS), 1),
        **sold_out_figures(phase, calls, warmup.admitted),
    }
    if watcher is not None and watching is not None:
        result["watch"] = await watcher.finish(channel, key, watching)
    result["warmup_admitted"] = warmup.admitted
    return result


def machine_loop_ms() -> float:
    """The median CPU milliseconds of ``SPEED_SAMPLES`` runs of a fixed loop (more: the
    machine ran slower)."""
    samples = []
    for _ in range(SPEED_SAMPLES):
        started = time.process_time()
        total = 0
        for number in range(SPEED_LOOP_N):
            total += number
        samples.append((time.process_time() - started) * 1000)
    return round(statistics.median(samples), 2)


async def _load(
    client: Client,
    key: Key,
    calls: Calls,
    *,
    seconds: float,
    tag: str,
    options: argparse.Namespace,
) -> None:
    """``options.callers`` closed-loop callers, one unit each, for ``seconds`` or until
    ``options.ops_max`` calls."""
    stop_at = time.monotonic() + seconds
    started = time.monotonic()
    numbers = iter(range(options.ops_max))
    lines = [(key, 1)]

    async def caller(number: int) -> None:
        for sequence in numbers:
            now = time.monotonic()
            if now >= stop_at:
                return
            answer = await client.reserve(lines, TTL_S, f"{key.sku_id}-{tag}-{number}-{sequence}")
            done = time.monotonic()
            calls.histogram.record_value(max(int((done - now) * 1e6), 1))
            calls.codes[answer.code] += 1
            kind = (
                ADMITTED
                if answer.code == OK
                else REFUSED
                if answer.code == INSUFFICIENT
                else FAILED
            )
            calls.admitted += kind == ADMITTED
            calls.answered.append((done - started, kind))

    await asyncio.gather(*(caller(n) for n in range(options.callers)))


def _kind(code: str) -> str:
    if code == OK:
        return ADMITTED
    return REFUSED if code == INSUFFICIENT else FAILED


def sold_out_figures(phase: Phase, calls: Calls, warmup_admitted: int) -> dict[str, Any]:
    """The false sold-out rate while at least 5 % of the stock remained, and the units left
    (stranded, for a sell-out phase) when the phase ended."""
    remaining_floor = phase.stock * FALSE_SOLD_OUT_REMAINING
    admitted = warmup_admitted
    asked = refused = 0
    first_refusal_left: int | None = None
    for _, kind in calls.answered:
        if phase.stock - admitted > remaining_floor:
            asked += 1
            refused += kind == REFUSED
        if kind == REFUSED and first_refusal_left is None:
            first_refusal_left = phase.stock - admitted
        admitted += kind == ADMITTED
    figures: dict[str, Any] = {
        "false_sold_out": refused,
        "false_sold_out_asked": asked,
        "false_sold_out_rate": round(refused / max(asked, 1), 5),
        "remained_share_min": round((phase.stock - admitted) / phase.stock, 4),
    }
    if phase.sell_out:
        figures["stranded"] = phase.stock - admitted
        figures["left_at_first_refusal"] = first_refusal_left
    return figures


async def _service_audit(
    channel: grpc.aio.Channel, key: Key, phase: Phase, result: dict[str, Any]
) -> dict[str, Any]:
    level = await strong_level(channel, key)
    audit = {"reserved": level.reserved, "on_hand": level.on_hand, "sellable": level.sellable}
    if phase.sell_out:  # what is left unadmitted, as the key itself says
        audit["stranded_read"] = phase.stock - level.reserved
    return {"audit": audit}


async def strong_level(channel: grpc.aio.Channel, key: Key) -> pb.StockLevel:
    answer = await pb_grpc.InventoryStub(channel).GetAvailability(
        pb.GetAvailabilityRequest(keys=[key_to_proto(key)]), timeout=CALL_TIMEOUT_S
    )
    level: pb.StockLevel = answer.levels[0]
    return level


# ------------------------------------------------------------------------------- Watch


class Watcher:
    """One Watch subscriber of the phase's key: how long after a part's commit the total
    moved on the stream, and the total it shows last."""

    def __init__(self, key: Key) -> None:
        self.key = key
        self.lag = new_histogram()
        self.changes = 0
        self.last: tuple[int, int, int] | None = None  # (version, reserved, sellable)

    async def follow(self, channel: grpc.aio.Channel) -> None:
        stub = events_pb2_grpc.AvailabilityStreamStub(channel)
        request = events_pb2.WatchRequest(
            merchant_id=self.key.merchant_id,
            location_ids=[self.key.location_id],
            sku_ids=[self.key.sku_id],
        )
        async for event in stub.Watch(request):
            if event.HasField("snapshot"):
                for level in event.snapshot.levels:
                    self.last = (level.version, level.reserved, level.sellable)
            elif event.HasField("change"):
                change = event.change
                self.changes += 1
                lag_ms = time.time() * 1000 - change.committed_at_ms
                self.lag.record_value(max(int(lag_ms * 1000), 1))
                self.last = (change.version, change.after.reserved, change.after.sellable)

    async def finish(
        self, channel: grpc.aio.Channel, key: Key, watching: asyncio.Future[None]
    ) -> dict[str, Any]:
        """Until the stream shows what a strong read shows (bounded), then stop."""
        started = time.monotonic()
        converged_s: float | None = None
        try:
            while time.monotonic() - started < CONVERGE_WAIT_S:
                level = await strong_level(channel, key)
                if self.last == (level.version, level.reserved, level.sellable):
                    converged_s = round(time.monotonic() - started, 3)
                    break
                await asyncio.sleep(POLL_S)
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await watching
        return {"changes": self.changes, "lag": summary(self.lag), "converged_s": converged_s}


# ------------------------------------------------------------------------------ report


def ratios_by_round(phases: list[dict[str, Any]]) -> list[dict[str, float]]:
    """``ratios`` within each round (at least one, if no phase ran)."""
    measured = [p for p in phases if not p["sell_out"]]
    rounds = sorted({p["round"] for p in measured})
    return [ratios([p for p in measured if p["round"] == r]) for r in rounds] or [{}]


def summary_of(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per phase, in the first round's order: the median over its rounds of each
    figure (a sell-out phase runs once: its own)."""
    names = list(dict.fromkeys(p["name"] for p in phases))
    return [_median_of([p for p in phases if p["name"] == name]) for name in names]


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    if len(runs) == 1:
        return {**runs[0], "rounds": 1}

    def median(*path: str) -> float:
        """The median over the runs of the figure at ``path`` (a missing one: 0)."""
        values = []
        for run in runs:
            value: Any = run
            for name in path:
                value = value.get(name, 0.0)
            values.append(float(value))
        return round(statistics.median(values), 1)

    first = runs[0]
    combined: dict[str, Any] = {
        **first,
        "rounds": len(runs),
        "admitted": sum(run["admitted"] for run in runs),
        "refused": sum(run["refused"] for run in runs),
        "failed": sum(run["failed"] for run in runs),
        "admitted_per_s": median("admitted_per_s"),
        "admitted_per_s_range": [
            min(run["admitted_per_s"] for run in runs),
            max(run["admitted_per_s"] for run in runs),
        ],
        "latency": {name: median("latency", name) for name in first["latency"]},
        "cpu_us_per_admitted": {
            name: median("cpu_us_per_admitted", name) for name in first["cpu_us_per_admitted"]
        },
        "servers_cpu_us_per_admitted": median("servers_cpu_us_per_admitted"),
        "false_sold_out": sum(run["false_sold_out"] for run in runs),
        "false_sold_out_asked": sum(run["false_sold_out_asked"] for run in runs),
        "remained_share_min": min(run["remained_share_min"] for run in runs),
        "audit": {"passed": all(run["audit"]["passed"] for run in runs)},
    }
    combined["false_sold_out_rate"] = round(
        combined["false_sold_out"] / max(combined["false_sold_out_asked"], 1), 5
    )
    if "watch" in first:
        converged = [run["watch"]["converged_s"] for run in runs]
        combined["watch"] = {
            "changes": sum(run["watch"]["changes"] for run in runs),
            "lag": {name: median("watch", "lag", name) for name in first["watch"]["lag"]},
            "converged_s": None if None in converged else max(converged),
        }
    return combined


def ratios(phases: list[dict[str, Any]]) -> dict[str, float]:
    """Each split's admitted/s over one owner's and over the PostgreSQL row's (one round)."""
    by_name = {p["name"]: p for p in phases}
    owner, row = by_name.get("one owner"), by_name.get("postgres hot row")
    found: dict[str, float] = {}
    for p in phases:
        if p["sell_out"] or p["target"] != "service" or p["parts"] == 1:
            continue
        if owner is not None:
            found[f"{p['name']} / one owner"] = round(
                p["admitted_per_s"] / max(owner["admitted_per_s"], 1e-9), 2
            )
        if row is not None:
            found[f"{p['name']} / postgres hot row"] = round(
                p["admitted_per_s"] / max(row["admitted_per_s"], 1e-9), 2
            )
    if owner is not None and row is not None:
        found["one owner / postgres hot row"] = round(
            owner["admitted_per_s"] / max(row["admitted_per_s"], 1e-9), 2
        )
    return found


def _line(result: dict[str, Any]) -> str:
    latency = result["latency"]
    text = (
        f"  {result['admitted_per_s']:>9,.0f} admitted/s  p95 {latency['p95_ms']:.1f} "
        f"p99 {latency['p99_ms']:.1f} ms  servers {result['servers_cpu_us_per_admitted']:,.0f}"
        f" µs/op  false sold-out {result['false_sold_out_rate']:.2%}  failed {result['failed']}"
    )
    if result["sell_out"]:
        text += f"  stranded {result['stranded']}"
    return text + f"  audit {'passed' if result['audit']['passed'] else 'FAILED'}"


def markdown(results: dict[str, Any]) -> str:
    options = results["options"]
    lines = [
        "# Hot key: one owner, split over K parts, and the PostgreSQL hot row",
        "",
        f"{results['machine']['cores']} cores, Python {results['machine']['python']}; "
        f"{options['callers']} callers reserving 1 unit each, closed loop; "
        f"{options['shards']} shards, the service called through `{options['client']}`. "
        "K counts the parts: the home and K - 1 buckets. "
        f"Each throughput phase ran {options['rounds']} times, in alternating order: the "
        "medians (admitted/s: the lowest and highest round too).",
        "",
        "| phase | admitted/s | p50 ms | p95 | p99 | servers µs/op | router / shards / "
        "postgres / redis / generator µs/op | false sold-out | failed | watch lag p50 / p99 "
        "ms | watch caught up in | audit |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | --- |",
    ]
    for p in results["summary"]:
        if p["sell_out"]:
            continue
        lines.append(_row(p))
    loops = [p["machine_loop_ms"] for p in results["phases"] if "machine_loop_ms" in p]
    if loops:
        lines += [
            "",
            f"The machine's speed over the run: a fixed pure-Python loop, timed before each "
            f"phase, took {min(loops):.1f} to {max(loops):.1f} ms of CPU (median "
            f"{statistics.median(loops):.1f}; `machine_loop_ms` in results.json).",
        ]
    by_round = results["ratios_by_round"]
    lines += [
        "",
        "Ratios of admitted/s, each within one round:",
        "",
        "| ratio | median | worst | "
        + " | ".join(f"round {n + 1}" for n in range(len(by_round)))
        + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in by_round) + " |",
    ]
    for name, value in results["ratios"].items():
        each = " | ".join(f"{r[name]:.2f}x" if name in r else "-" for r in by_round)
        lines.append(f"| {name} | {value:.2f}x | {results['ratios_worst'][name]:.2f}x | {each} |")
    sell_outs = [p for p in results["summary"] if p["sell_out"]]
    if sell_outs:
        lines += [
            "",
            f"Sell-out: {options['sell_out_stock']:,} units, the same callers for "
            f"{options['sell_out_s']} s.",
            "",
            "| phase | admitted | refused | failed | false sold-out while >= 5 % remained | "
            "left at the first refusal | stranded at the end | audit |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for p in sell_outs:
            lines.append(
                f"| {p['name']} | {p['admitted']:,} | {p['refused']:,} | {p['failed']:,} | "
                f"{p['false_sold_out']} of "
                f"{p['false_sold_out_asked']:,} ({p['false_sold_out_rate']:.2%}) | "
                f"{p['left_at_first_refusal']} | {p['stranded']} | {_audit(p)} |"
            )
    return "\n".join(lines) + "\n"


def _row(p: dict[str, Any]) -> str:
    latency, per = p["latency"], p["cpu_us_per_admitted"]
    watch = p.get("watch")
    lag = f"{watch['lag']['p50_ms']:.0f} / {watch['lag']['p99_ms']:.0f}" if watch else "-"
    caught_up = "-"
    if watch is not None:
        seconds = watch["converged_s"]
        caught_up = "never" if seconds is None else f"{seconds * 1000:.0f} ms"
    rate = f"{p['admitted_per_s']:,.0f}"
    if "admitted_per_s_range" in p:
        low, high = p["admitted_per_s_range"]
        rate += f" ({low:,.0f} to {high:,.0f})"
    return (
        f"| {p['name']} | {rate} | {latency['p50_ms']:.1f} | "
        f"{latency['p95_ms']:.1f} | {latency['p99_ms']:.1f} | "
        f"{p['servers_cpu_us_per_admitted']:,.0f} | "
        + " / ".join(f"{per.get(c, 0):,.0f}" for c in COMPONENTS)
        + f" | {p['false_sold_out_rate']:.2%} | {p['failed']:,} | {lag} | {caught_up} | "
        f"{_audit(p)} |"
    )


def _audit(p: dict[str, Any]) -> str:
    return "passed" if p["audit"]["passed"] else f"FAILED ({p['audit']})"


def plot(results: dict[str, Any], path: Path) -> None:
    """Admitted/s (the median, and each round's as a dot) and servers' CPU per reservation by
    phase, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [p for p in results["summary"] if not p["sell_out"]]
    if not phases:
        return
    names = [p["name"] for p in phases]
    figure, (rate, cpu) = plt.subplots(1, 2, figsize=(11, 4))
    rate.bar(names, [p["admitted_per_s"] for p in phases], color="tab:blue")
    for position, name in enumerate(names):
        each = [r["admitted_per_s"] for r in results["phases"] if r["name"] == name]
        rate.plot([position] * len(each), each, "o", color="black", markersize=3)
    rate.set_ylabel("admitted reservations / s")
    rate.set_title(f"one hot key, {results['options']['callers']} callers")
    cpu.bar(names, [p["servers_cpu_us_per_admitted"] for p in phases], color="tab:orange")
    cpu.set_ylabel("servers' CPU µs per admitted reservation")
    cpu.set_title("what each admitted reservation cost")
    for axis in (rate, cpu):
        axis.tick_params(axis="x", labelrotation=20)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main(sys.argv[1:])
