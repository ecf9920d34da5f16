"""Composition root of a shard process: wires persistence into the owner and serves gRPC.

Start: migrate -> take its partitions (epoch bump) -> recover them (checkpoint + ledger
tail) -> serve (health SERVING). Stop (SIGTERM/SIGINT): health NOT_SERVING, stop taking
RPCs with a grace period, drain the owner's queue, write a last checkpoint, close the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time

import structlog
import uvloop
from inventory.v1 import inventory_pb2

from persistence.connections import create_pool
from persistence.membership import Membership
from persistence.migrate import ensure_partitions, migrate
from persistence.store import PartitionStore

from ..common.config import ShardConfig
from ..common.server import create_server, set_serving
from ..common.telemetry import configure_logging
from .owner import Owner
from .ownership import Ownership
from .service import InventoryService

log = structlog.get_logger(__name__)

SERVICE_NAME = inventory_pb2.DESCRIPTOR.services_by_name["Inventory"].full_name
# Connections to PostgreSQL: one flush and one checkpoint at a time, plus recovery and reads.
DATABASE_POOL_SIZE_MAX = 8
# In-flight RPCs get this long to finish at shutdown.
SHUTDOWN_GRACE_S = 5.0


async def serve(config: ShardConfig, ready: asyncio.Event | None = None) -> None:
    started = time.monotonic()
    pool = await create_pool(config.database_url, DATABASE_POOL_SIZE_MAX)
    try:
        async with pool.acquire() as connection:
            await migrate(connection)
            await ensure_partitions(connection, config.partition_count)
        store = PartitionStore(pool)
        owner = Owner(store)
        server, health_servicer, port = create_server(config.listen, [SERVICE_NAME])
        address = config.advertise or f"{config.listen.rsplit(':', 1)[0]}:{port}"
        membership = Membership(pool, config.membership_lease_s)
        ownership = Ownership(
            owner,
            membership,
            store,
            shard_id=config.shard_id,
            address=address,
            partition_count=config.partition_count,
            lease_s=config.membership_lease_s,
        )
        first_pass = asyncio.Event()
        ownership_task = asyncio.create_task(ownership.run(first_pass))
        await first_pass.wait()
        from inventory.v1 import inventory_pb2_grpc

        inventory_pb2_grpc.add_InventoryServicer_to_server(InventoryService(owner), server)
        await server.start()
        await set_serving(health_servicer, [SERVICE_NAME], True)
        log.info(
            "shard_serving",
            shard_id=config.shard_id,
            address=address,
            partitions=len(owner.owned_partitions),
            startup_s=round(time.monotonic() - started, 3),
        )
        if ready is not None:
            ready.set()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        owner_task = asyncio.create_task(owner.run())
        stats_task = asyncio.create_task(_log_stats(owner, ownership))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({owner_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if owner_task.done():
            owner_task.result()  # the loop died: raise its error (fail-stop the process)
        if ownership_task.done():
            ownership_task.result()
        log.info("shard_stopping", shard_id=config.shard_id)
        for task in (ownership_task, stats_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await set_serving(health_servicer, [SERVICE_NAME], False)
        await server.stop(SHUTDOWN_GRACE_S)
        await owner.drain()
        owner_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await owner_task
        await owner.checkpoint_now()
        await owner.close()
        await ownership.leave()  # the others take our partitions at their next poll
        log.info("shard_stopped", shard_id=config.shard_id)
    finally:
        await pool.close()


# One structured stats line per period: enough to see throughput, batch size, flush latency,
# backlog and over-commitment in the logs without a metrics stack.
STATS_LOG_INTERVAL_S = 10.0


async def _log_stats(owner: Owner, ownership: Ownership) -> None:
    previous = dataclasses.replace(owner.stats)
    while True:
        await asyncio.sleep(STATS_LOG_INTERVAL_S)
        now = dataclasses.replace(owner.stats)
        flushes = now.flushes - previous.flushes
        records = now.records_flushed - previous.records_flushed
        seconds = now.flush_seconds_total - previous.flush_seconds_total
        log.info(
            "shard_stats",
            records_per_s=round(records / STATS_LOG_INTERVAL_S, 1),
            flushes=flushes,
            batch_records_mean=round(records / flushes, 1) if flushes else 0,
            flush_ms_mean=round(1000 * seconds / flushes, 2) if flushes else 0,
            flush_failures=now.flush_failures,
            checkpoints=now.checkpoints,
            shed=now.shed,
            ring=ownership.ring_version,
            **owner.gauges(),
        )
        previous = now


def main(config: ShardConfig) -> None:
    configure_logging(config.log_level, f"shard:{config.shard_id}")
    uvloop.run(serve(config))
