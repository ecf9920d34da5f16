"""Composition root of a router process: membership from PostgreSQL, routes, gRPC.

The router is stateless: it reads which shards are alive (persistence.membership), hashes
each call's partition onto the ring and forwards it over that shard's batch stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Sequence

import grpc
import structlog
from inventory.v1 import events_pb2, events_pb2_grpc, inventory_pb2

from persistence.connections import create_pool
from persistence.membership import Membership
from persistence.readview import EventReader, SnapshotTooLarge

from ..common import convert
from ..common.auth import (
    AuthInterceptor,
    AuthSetupError,
    TokenSource,
    exit_on_setup_error,
    interceptors,
    open_guard,
    start_auth,
)
from ..common.config import RouterConfig
from ..common.loop_monitor import LoopMonitor
from ..common.metrics import call_interceptors, check_metrics_listen, router_metrics
from ..common.server import create_server, run_server, set_serving
from ..common.servicer import SERVICE_NAMES, serve_inventory
from ..common.telemetry import configure_logging
from ..common.tls import ChannelFactory, TLSSetupError, server_credentials, server_mode
from ..common.tracing import interceptors as tracing_interceptors
from ..common.tracing import traced
from . import hot_keys
from .detector import DetectorLimits, HotKeyDetector
from .rebalancer import Rebalancer
from .routing import Routes
from .service import RouterCalls, RouterService
from .watch import AvailabilityStreamService, SnapshotRefused, WatchHub

log = structlog.get_logger(__name__)

WATCH_SERVICE_NAME = events_pb2.DESCRIPTOR.services_by_name["AvailabilityStream"].full_name
# Membership reads only: one connection is plenty, two ride out a reconnect.
DATABASE_POOL_SIZE_MAX = 2
SHUTDOWN_GRACE_S = 5.0


async def serve(
    config: RouterConfig,
    guard: AuthInterceptor | None,
    shard_token: TokenSource,
    server_tls: grpc.ServerCredentials | None,
    shard_channels: ChannelFactory,
) -> None:
    """Serve until SIGTERM/SIGINT: TLS with ``server_tls`` (plaintext without), to the
    shards over ``shard_channels`` (shard_router.common.tls)."""
    pool = await create_pool(config.database_url, DATABASE_POOL_SIZE_MAX, "inventory-router")
    read_view: EventReader | None = None
    hub: WatchHub | None = None
    try:
        membership = Membership(pool, config.membership_lease_s)
        routes = Routes(
            membership.alive,
            config.partition_count,
            credentials=shard_token.metadata,
            channels=shard_channels,
        )
        await routes.refresh(force=True)
        services = list(SERVICE_NAMES)
        if config.redis_url:
            read_view = EventReader(config.redis_url)
            hub = WatchHub(_WatchSource(read_view), partition_count=config.partition_count)
            hub.start()
            services.append(WATCH_SERVICE_NAME)
        server, health_servicer, port = create_server(
            config.listen,
            services,
            [*tracing_interceptors(), *interceptors(guard)],
            server_tls,
            observers=call_interceptors(config.metrics_listen),
        )
        service = RouterService(routes, read_view)
        serve_inventory(server, service)
        if hub is not None:
            watch = AvailabilityStreamService(hub)
            events_pb2_grpc.add_AvailabilityStreamServicer_to_server(watch, server)
        await server.start()
        await set_serving(health_servicer, services, True)
        log.info(
            "router_serving",
            listen=config.listen,
            port=port,
            ring=routes.ring_version,
            watch=hub is not None,
            tls=server_mode(config.tls),
            shard_tls=shard_channels.tls,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        refresher = asyncio.create_task(routes.run())
        monitor = LoopMonitor()
        background = [
            asyncio.create_task(monitor.run()),
            asyncio.create_task(_log_stats(routes, monitor, config.stats_interval_s)),
            *_hot_key_tasks(service.calls, config, hub),
            *start_auth(guard),
            *router_metrics(routes, service.calls, hub, config.metrics_listen),
        ]
        await stop.wait()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await set_serving(health_servicer, services, False)
        if hub is not None:
            await hub.close()  # watch streams end UNAVAILABLE: clients reconnect elsewhere
            hub = None
        await server.stop(SHUTDOWN_GRACE_S)
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        await routes.close()
        log.info("router_stopped")
    finally:
        if hub is not None:
            await hub.close()
        if read_view is not None:
            await read_view.close()
        await pool.close()


def _hot_key_tasks(
    calls: RouterCalls, config: RouterConfig, hub: WatchHub | None
) -> list[asyncio.Task[None]]:
    """Learning the split keys; the rebalancer and the detection, unless turned off."""
    tasks = [asyncio.create_task(_refresh_hot_keys(calls, hub))]
    if config.rebalance_interval_s > 0:
        rebalancer = Rebalancer(calls, config.rebalance_interval_s)
        tasks.append(asyncio.create_task(rebalancer.run()))
    if config.hot_key_threshold_per_s > 0:
        tasks.append(asyncio.create_task(_detect_hot_keys(calls, config)))
    return tasks


async def _refresh_hot_keys(calls: RouterCalls, hub: WatchHub | None) -> None:
    """Learn the split keys the shards hold, and their parts' levels, every period; Watch
    streams them as their totals (``WatchHub.follow_splits``)."""
    interval_s = hot_keys.REFRESH_INTERVAL_S
    while True:
        try:
            await calls.refresh_hot_keys(time.monotonic() + hot_keys.REFRESH_DEADLINE_S)
        except Exception as error:  # a shard away: the map keeps what it knew
            log.warning("hot_keys_refresh_failed", error=repr(error))
        if hub is not None:
            try:
                await hub.follow_splits(calls.hot_keys.views())
            except Exception as error:  # Redis away: the next period tries again
                log.warning("watch_follow_splits_failed", error=repr(error))
        await asyncio.sleep(interval_s)


async def _detect_hot_keys(calls: RouterCalls, config: RouterConfig) -> None:
    """Count one-line reserves per key; each window, split the hot keys and merge the cool."""
    limits = DetectorLimits(
        threshold_per_s=config.hot_key_threshold_per_s,
        window_s=config.hot_key_window_s,
        cool_windows=config.hot_key_cool_windows,
    )
    detector = HotKeyDetector(limits)
    detector.start(time.monotonic())
    calls.detector = detector
    while True:
        await asyncio.sleep(limits.window_s)
        now = time.monotonic()
        verdict = detector.roll(now, split=calls.hot_keys.keys())
        if verdict.top and verdict.top[0][1] >= limits.threshold_per_s / 2:
            busiest = [(convert.key_text(k), round(r)) for k, r in verdict.top]
            log.info("hot_key_rates", busiest=busiest)
        try:
            await calls.act_on(verdict, config.hot_key_buckets, now + hot_keys.REFRESH_DEADLINE_S)
        except Exception as error:  # a bug: the next window tries again
            log.exception("hot_key_detection_failed", error=repr(error))


async def _log_stats(routes: Routes, monitor: LoopMonitor, interval_s: float) -> None:
    """One structured line per period: the worst loop stall (every forwarded call waited it
    out) and the ring the router routes by."""
    while True:
        await asyncio.sleep(interval_s)
        log.info("router_stats", ring=routes.ring_version, **monitor.take_fields())


class _WatchSource:
    """The read view and event streams as the watch hub sees them."""

    def __init__(self, reader: EventReader) -> None:
        self._reader = reader
        self.last_ids = reader.last_ids
        self.first_ids = reader.first_ids
        self.read = reader.read
        self.range = reader.range

    async def snapshot(
        self, merchant_id: str, location_ids: Sequence[str], sku_ids: Sequence[str]
    ) -> list[tuple[inventory_pb2.StockLevel, int, int]]:
        try:
            return await self._reader.snapshot(merchant_id, location_ids, sku_ids)
        except SnapshotTooLarge as error:
            raise SnapshotRefused(error.matching, error.limit) from error


def main(config: RouterConfig) -> None:
    """Run until SIGTERM/SIGINT; a listen address that cannot be bound exits with
    LISTEN_FAILED_EXIT_CODE after one line on stderr, checked before any database work."""
    configure_logging(config.log_level, "router")
    try:
        guard = open_guard(config.auth)
        shard_token = TokenSource.of(path=config.shard_token_file)
        server_tls = server_credentials(config.tls)
        shard_channels = ChannelFactory(config.shard_tls)
    except (AuthSetupError, TLSSetupError) as error:
        exit_on_setup_error(error)
    except OSError as error:
        exit_on_setup_error(AuthSetupError(f"--shard-token-file: {error}"))
    check_metrics_listen(config.metrics_listen)
    with traced(config.tracing, "router", item_roots=True):
        run_server(
            lambda: serve(config, guard, shard_token, server_tls, shard_channels), config.listen
        )
