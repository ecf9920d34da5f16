"""Composition root of a shard process: wires persistence into the owner and serves gRPC.

Start: migrate -> take its partitions (epoch bump) -> recover them (checkpoint + ledger
tail) -> serve (health SERVING). Stop (SIGTERM/SIGINT): health NOT_SERVING, stop taking
RPCs with a grace period, drain the owner's queue, write a last checkpoint, close the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import signal
import time

import grpc
import structlog

from persistence.connections import create_pool
from persistence.events import EventPublisher
from persistence.membership import Membership
from persistence.migrate import ensure_partitions, migrate
from persistence.store import PartitionStore

from ..common.auth import (
    AuthInterceptor,
    AuthSetupError,
    exit_on_setup_error,
    interceptors,
    open_guard,
    start_auth,
)
from ..common.config import ShardConfig
from ..common.loop_monitor import LoopMonitor
from ..common.metrics import call_interceptors, check_metrics_listen, shard_metrics
from ..common.server import create_server, run_server, set_serving
from ..common.servicer import SERVICE_NAMES, serve_inventory
from ..common.telemetry import configure_logging
from ..common.tls import TLSSetupError, server_credentials, server_mode
from ..common.tracing import interceptors as tracing_interceptors
from ..common.tracing import traced
from .owner import Owner, OwnerLimits
from .ownership import Ownership
from .service import InventoryService

log = structlog.get_logger(__name__)

# Connections to PostgreSQL: one flush and one checkpoint at a time, plus recovery and reads.
DATABASE_POOL_SIZE_MAX = 8
# In-flight RPCs get this long to finish at shutdown.
SHUTDOWN_GRACE_S = 5.0


async def serve(
    config: ShardConfig, guard: AuthInterceptor | None, tls: grpc.ServerCredentials | None
) -> None:
    started = time.monotonic()
    pool = await create_pool(
        config.database_url, DATABASE_POOL_SIZE_MAX, f"inventory-{config.shard_id}"
    )
    publisher: EventPublisher | None = None
    owner: Owner | None = None
    try:
        async with pool.acquire() as connection:
            await migrate(connection)
            await ensure_partitions(connection, config.partition_count)
        store = PartitionStore(pool)
        if config.redis_url:
            publisher = EventPublisher(config.redis_url, pool, config.shard_id)
        owner = Owner(
            store,
            publisher,
            OwnerLimits(
                checkpoint_interval_s=config.checkpoint_interval_s,
                feed_stale_after_s=config.feed_stale_after_s,
            ),
        )
        server, health_servicer, port = create_server(
            config.listen,
            SERVICE_NAMES,
            [*tracing_interceptors(), *interceptors(guard)],
            tls,
            observers=call_interceptors(config.metrics_listen),
        )
        serve_inventory(server, InventoryService(owner))
        address = config.advertise or f"{config.listen.rsplit(':', 1)[0]}:{port}"
        ownership = Ownership(
            owner,
            Membership(pool, config.membership_lease_s),
            store,
            shard_id=config.shard_id,
            address=address,
            partition_count=config.partition_count,
            lease_s=config.membership_lease_s,
            on_acquired=publisher.partitions_acquired if publisher else None,
        )
        first_pass = asyncio.Event()
        background = [
            asyncio.create_task(ownership.run(first_pass)),
            *start_auth(guard),
            *shard_metrics(owner, ownership, publisher, config.metrics_listen),
        ]
        await first_pass.wait()
        gc.collect()  # the recovered state, once, before it is frozen out of collections
        gc.freeze()
        owner_task = asyncio.create_task(owner.run())
        background.append(asyncio.create_task(_freeze_long_lived_objects()))
        loop = LoopMonitor()
        background.append(asyncio.create_task(loop.run()))
        background.append(
            asyncio.create_task(
                _log_stats(owner, ownership, publisher, loop, config.stats_interval_s)
            )
        )
        if publisher is not None:
            background.append(asyncio.create_task(publisher.run()))
        await server.start()
        await set_serving(health_servicer, SERVICE_NAMES, True)
        log.info(
            "shard_serving",
            shard_id=config.shard_id,
            address=address,
            partitions=len(owner.owned_partitions),
            events="redis" if publisher else "off",
            tls=server_mode(config.tls),
            startup_s=round(time.monotonic() - started, 3),
        )
        await _until_stopped(owner_task, background)
        log.info("shard_stopping", shard_id=config.shard_id)
        await _cancel(background[:1])  # take no more partitions
        await set_serving(health_servicer, SERVICE_NAMES, False)
        await server.stop(SHUTDOWN_GRACE_S)  # in-flight calls finish
        await owner.drain()
        await _cancel([owner_task])
        await owner.checkpoint_now()
        await owner.close()
        await ownership.leave()  # the others take our partitions at their next poll
        await _cancel(background[1:])
        log.info("shard_stopped", shard_id=config.shard_id)
    finally:
        if owner is not None:  # idempotent: background tasks are awaited on every exit
            await owner.close()
        if publisher is not None:
            await publisher.close()
        await pool.close()


async def _until_stopped(
    owner_task: asyncio.Task[None], background: list[asyncio.Task[None]]
) -> None:
    """Until SIGTERM/SIGINT; a loop that dies raises here (fail-stop the process)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    stopped = asyncio.create_task(stop.wait())
    watched = {owner_task, stopped, *background}
    await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    for task in (owner_task, *background):
        if task.done():
            task.result()


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# Python's full garbage collection walks every tracked object: with a million keys in memory
# (rows, reservations, idempotency answers: about five objects per key) it pauses the loop for
# about two seconds, and every reply with it. Objects that survived this long are the
# partitions' state, which has no reference cycles, so they are frozen out of the collector
# this often; a full collection then only walks what was created since. Measured at 10 s
# (uniform load, 50,000 keys a shard): full collections of 30-120 ms, the largest loop
# stalls; each second's survivors are far fewer.
GC_FREEZE_INTERVAL_S = 1.0


async def _freeze_long_lived_objects() -> None:
    """Keep full-collection pauses proportional to recent allocations, not to the state.

    The cost: cyclic garbage that is already in the oldest generation when it is frozen is
    never reclaimed; young generations are collected first so that this stays small, and
    the stats line reports the resident memory so that growth would show. (Not the frozen
    count: gc.get_freeze_count() walks every frozen object, ~50 ms of loop at 500,000.)
    """
    while True:
        await asyncio.sleep(GC_FREEZE_INTERVAL_S)
        gc.collect(1)
        gc.freeze()


# One structured stats line per period (ShardConfig.stats_interval_s): enough to see
# throughput, batch size, flush latency, the worst loop stall, backlog and over-commitment in
# the logs without a metrics stack.


async def _log_stats(
    owner: Owner,
    ownership: Ownership,
    publisher: EventPublisher | None,
    loop: LoopMonitor,
    interval_s: float,
) -> None:
    previous = dataclasses.replace(owner.stats)
    while True:
        await asyncio.sleep(interval_s)
        now = dataclasses.replace(owner.stats)
        flushes = now.flushes - previous.flushes
        records = now.records_flushed - previous.records_flushed
        seconds = now.flush_seconds_total - previous.flush_seconds_total
        log.info(
            "shard_stats",
            records_per_s=round(records / interval_s, 1),
            flushes=flushes,
            batch_records_mean=round(records / flushes, 1) if flushes else 0,
            flush_ms_mean=round(1000 * seconds / flushes, 2) if flushes else 0,
            flush_ms_max=round(1000 * now.flush_seconds_max, 2),
            flush_failures=now.flush_failures,
            core_failures=now.core_failures,
            fenced=now.fenced,
            checkpoints=now.checkpoints,
            shed=now.shed,
            ring=ownership.ring_version,
            **loop.take_fields(),
            **owner.gauges(),
            rss_mib=_resident_mib(),
            **(_publisher_figures(publisher) if publisher else {}),
        )
        previous = now
        owner.stats.flush_seconds_max = 0.0


def _resident_mib() -> float:
    """This process's resident memory (one small read of /proc; 0 where there is none)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except OSError:
        return 0.0
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def _publisher_figures(publisher: EventPublisher) -> dict[str, int]:
    stats = publisher.stats
    return {
        "events_published": stats.events_published,
        "event_lag_ms": publisher.lag_ms(),
        "event_buffer_drops": stats.buffer_drops,
        "event_redis_errors": stats.redis_errors,
        "event_catch_ups": stats.catch_ups,
    }


def main(config: ShardConfig) -> None:
    """Run until SIGTERM/SIGINT; a listen address that cannot be bound exits with
    LISTEN_FAILED_EXIT_CODE after one line on stderr, checked before any database work."""
    configure_logging(config.log_level, f"shard:{config.shard_id}")
    try:
        guard = open_guard(config.auth)
        tls = server_credentials(config.tls)
    except (AuthSetupError, TLSSetupError) as error:
        exit_on_setup_error(error)
    check_metrics_listen(config.metrics_listen)
    with traced(config.tracing, config.shard_id):
        run_server(lambda: serve(config, guard, tls), config.listen)
