"""Prometheus metrics of a shard or router process (DESIGN section 12): the names, one place.

How it works. Each process has one registry (``REGISTRY``, with the process collector: CPU,
resident memory, open fds) served as text on ``GET /metrics`` from ``--metrics-listen``
(``shard_metrics``, ``router_metrics``; empty: no endpoint, no interceptor, nothing
counted). What moves per call is counted in ``MetricsInterceptor`` with label children
bound once per method and code, and per Batch item in ``BatchItemCounts``; flushes are
observed once each (``watch_shard``). Everything else is read at scrape time by a
collector from the figures the process keeps anyway (``Owner.gauges``, ``OwnerStats``, the
publisher's and the Watch hub's stats), so it costs nothing per operation. The endpoint is
served on the event loop, so a collector reads that state between two steps of the loop,
never half-way through one.

Labels are bounded sets only: service and method (the methods served), code (gRPC's 17)
and kind (the Batch oneof's fields). Never a merchant, SKU, key or reservation id.

Names (stable: ops/prometheus/alerts.yml, ops/grafana/inventory.json and
docs/operations.md use them, and tests/observability checks that running processes export
every name those two files use):

  every process
    inventory_grpc_calls_total{service,method,code}   calls ended (streams at their end)
    inventory_grpc_call_duration_seconds{service,method}  unary calls' server time
    inventory_grpc_streams_open{service,method}       Batch, Ingest.Stream and Watch streams
    inventory_batch_items_total{kind,code}            Batch items answered
    process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
  shard
    inventory_owner_queue_depth                       requests queued for the owner's loop
    inventory_flush_duration_seconds                  one flush's transaction (histogram)
    inventory_flush_records                           records per flush (histogram)
    inventory_flush_failures_total, inventory_core_failures_total,
    inventory_partitions_fenced_total, inventory_checkpoints_total,
    inventory_requests_shed_total
    inventory_partitions_owned, inventory_partitions_recovering (reloading after a failure),
    inventory_partitions_loading (taken over, being loaded)
    inventory_keys, inventory_idempotency_entries
    inventory_reservations_live, inventory_reservations_live_max
    inventory_reservations_expired_total              expired, counted as flushed
    inventory_over_committed_keys, inventory_over_committed_units  (available < 0)
    inventory_stale_locations                         locations whose feeds went silent
    inventory_event_publish_lag_seconds               oldest change waiting for Redis
    inventory_events_buffered, inventory_events_published_total,
    inventory_event_buffer_drops_total, inventory_event_redis_errors_total,
    inventory_event_catch_ups_total
  router
    inventory_router_shards_alive                     shards on the router's ring
    inventory_router_items_pending                    forwarded, not yet answered by shards
    inventory_watch_subscribers, inventory_watch_pending_keys_max
    inventory_watch_lag_seconds                       commit to the hub's read, newest read
    inventory_watch_resyncs_total, inventory_watch_subscribers_refused_total,
    inventory_watch_events_delivered_total, inventory_watch_source_errors_total
    inventory_hot_keys_split                          split keys the router knows
    inventory_hot_key_busiest_reserves_per_second     top key's rate, last detector window
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import batching
from .calls import Continuation
from .server import LISTEN_FAILED_EXIT_CODE, ListenError, check_listen_address, split_address

if TYPE_CHECKING:
    from ..router.detector import HotKeyDetector
    from ..router.hot_keys import HotKeyMap
    from ..router.routing import Routes
    from ..router.watch import WatchHub
    from ..shard.owner import Owner

log = structlog.get_logger(__name__)

PREFIX = "inventory_"
# No ``_created`` series per counter and histogram: twice the series for a start time that
# process_start_time_seconds already gives.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)

# A unary call's server time: ~0.1 ms answered from memory, ~1-5 ms with its flush, up to
# the 10 s default deadline.
CALL_DURATION_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)  # fmt: skip
# One flush's transaction: ~1 ms on a local PostgreSQL, alerting from 100 ms.
FLUSH_DURATION_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
# Records per flush (group commit): 1 when idle, thousands under load.
FLUSH_RECORDS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

# The scrape endpoint: a request (line and headers) larger than this is not one.
SCRAPE_REQUEST_BYTES_MAX = 8 * 1024
# A scraper that sends nothing for this long is dropped.
SCRAPE_REQUEST_TIMEOUT_S = 10.0
# Scrapes served at once; Prometheus makes one per target, a few more are people.
SCRAPE_CONNECTIONS_MAX = 16

CALLS = Counter(
    "inventory_grpc_calls",
    "gRPC calls ended, by method and status code (a stream counts at its end).",
    ("service", "method", "code"),
    registry=REGISTRY,
)
CALL_DURATION = Histogram(
    "inventory_grpc_call_duration_seconds",
    "Server time of unary gRPC calls, from the interceptor to the answer.",
    ("service", "method"),
    buckets=CALL_DURATION_BUCKETS_S,
    registry=REGISTRY,
)
STREAMS_OPEN = Gauge(
    "inventory_grpc_streams_open",
    "Streaming calls open now (Batch, Ingest.Stream, AvailabilityStream.Watch).",
    ("service", "method"),
    registry=REGISTRY,
)
BATCH_ITEMS = Counter(
    "inventory_batch_items",
    "Inventory.Batch items answered, by call kind and status code.",
    ("kind", "code"),
    registry=REGISTRY,
)

_CODE_NAMES: dict[int, str] = {code.value[0]: code.name for code in grpc.StatusCode}
_OK = "OK"
_UNKNOWN = "UNKNOWN"


def code_name(code: object) -> str:
    """A status code as its name (OK, NOT_FOUND, ...): from a ``grpc.StatusCode``, an int,
    or None (nothing set: OK)."""
    if code is None:
        return _OK
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return _CODE_NAMES.get(code, _UNKNOWN) if isinstance(code, int) else _UNKNOWN


# ------------------------------------------------------------------------- per call


class _Method:
    """One served method's label children, bound once; its code children as codes occur
    (at most gRPC's 17)."""

    def __init__(self, path: str) -> None:
        service, _, method = path.lstrip("/").partition("/")
        self._labels = (service.rpartition(".")[2] or service, method)
        self._codes: dict[object, Any] = {None: CALLS.labels(*self._labels, _OK)}

    # Bound at first use: a unary method has no open streams, a stream no call duration.
    @functools.cached_property
    def duration(self) -> Any:
        return CALL_DURATION.labels(*self._labels)

    @functools.cached_property
    def open(self) -> Any:
        return STREAMS_OPEN.labels(*self._labels)

    @contextlib.contextmanager
    def streaming(self, context: grpc.aio.ServicerContext) -> Iterator[None]:
        """A stream open while inside; counted with its code when it ends."""
        self.open.inc()
        try:
            yield
        except BaseException as error:
            self.ended(context, error)
            raise
        else:
            self.ended(context, None)
        finally:
            self.open.dec()

    def ended(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        code = context.code()
        if code is None and error is not None:  # not an abort: what gRPC will answer
            cancelled = isinstance(error, asyncio.CancelledError | GeneratorExit)
            code = grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = CALLS.labels(*self._labels, code_name(code))
        child.inc()


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts every call by method and code, times unary calls, counts open streams.

    First in the chain (``create_server``'s observers), so requests whose bytes do not
    parse and refusals of the auth interceptor are counted with their codes; it never
    reads a request (one that does not parse reaches it as ``decoding.Malformed``).
    Per unary call: a dict lookup, two clock reads, a histogram observation and a counter
    increment (tests/observability/measure_metrics_cost.py measures it). Methods the server
    does not serve get no handler, so no labels: the label set is the served methods.
    """

    def __init__(self) -> None:
        self._methods: dict[str, _Method] = {}

    async def intercept_service(
        self,
        continuation: Continuation,
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        path: str = details.method
        method = self._methods.get(path)
        if method is None:
            method = self._methods[path] = _Method(path)
        serializers = (handler.request_deserializer, handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _timed(method, handler.unary_unary), *serializers
            )
        if handler.unary_stream is not None:
            behavior = _streamed(method, handler.unary_stream)
            return grpc.unary_stream_rpc_method_handler(behavior, *serializers)
        if handler.stream_stream is not None:
            behavior = _streamed(method, handler.stream_stream)
            return grpc.stream_stream_rpc_method_handler(behavior, *serializers)
        return handler  # stream-unary: none is served


def _timed(method: _Method, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    async def timed(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        try:
            response = await behavior(request, context)
        except BaseException as error:
            method.duration.observe(time.perf_counter() - started)
            method.ended(context, error)
            raise
        method.duration.observe(time.perf_counter() - started)
        method.ended(context, None)
        return response

    return timed


def _streamed(method: _Method, behavior: Callable[..., Any]) -> Callable[..., Any]:
    # Asked per call: one method's behaviour may be either (health's Watch writes with
    # context.write; a stream refused by the auth interceptor is a coroutine that aborts).
    if not inspect.isasyncgenfunction(behavior):

        async def written(request: Any, context: grpc.aio.ServicerContext) -> None:
            with method.streaming(context):
                await behavior(request, context)

        return written

    async def streamed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        with method.streaming(context):
            async for response in behavior(request, context):
                yield response

    return streamed


class BatchItemCounts:
    """Batch items answered by kind and code, children bound as pairs occur (kinds: the
    BatchItem oneof's fields; codes: gRPC's); ``batching.item_counter`` once the process
    exports metrics."""

    def __init__(self) -> None:
        self._children: dict[tuple[str, int], Any] = {}

    def count(self, kind: str, code: int) -> None:
        child = self._children.get((kind, code))
        if child is None:
            child = self._children[(kind, code)] = BATCH_ITEMS.labels(kind, code_name(code))
        child.inc()


def call_interceptors(metrics_listen: str) -> list[grpc.aio.ServerInterceptor]:
    """The metrics interceptor when the process exports metrics (first in the chain)."""
    if not metrics_listen:
        return []
    batching.item_counter = BatchItemCounts()
    return [MetricsInterceptor()]


# ------------------------------------------------------------------ read at scrape time


class _PublisherStats(Protocol):
    events_published: int
    buffer_drops: int
    redis_errors: int
    catch_ups: int
    buffered_events: int


class Loading(Protocol):
    """What the shard's collector reads of shard_router.shard.ownership.Ownership."""

    loading: int


class Publisher(Protocol):
    """What the shard's collector reads of persistence.events.EventPublisher."""

    @property
    def stats(self) -> _PublisherStats: ...

    def lag_ms(self) -> int: ...


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, text, value=value)


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, text, value=value)


class _Collector(Collector):
    """A collector from a function that yields the families at each scrape."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()


def shard_metrics(
    owner: Owner, ownership: Loading, publisher: Publisher | None, metrics_listen: str
) -> list[asyncio.Task[None]]:
    """Export the shard's figures and serve them (nothing when ``metrics_listen`` is empty)."""
    if not metrics_listen:
        return []
    watch_shard(owner, ownership, publisher)
    return [asyncio.create_task(serve_metrics(metrics_listen), name="metrics")]


def watch_shard(
    owner: Owner,
    ownership: Loading,
    publisher: Publisher | None,
    registry: CollectorRegistry = REGISTRY,
) -> None:
    """The shard's figures in ``registry``: flushes observed once each, the rest read at
    scrape time."""
    flush_duration = Histogram(
        "inventory_flush_duration_seconds",
        "Duration of one flush transaction of the owner (records of a batch, one commit).",
        buckets=FLUSH_DURATION_BUCKETS_S,
        registry=registry,
    )
    flush_records = Histogram(
        "inventory_flush_records",
        "Ledger records per flush (the group commit's batch size).",
        buckets=FLUSH_RECORDS_BUCKETS,
        registry=registry,
    )

    def observe(records: int, seconds: float) -> None:
        flush_duration.observe(seconds)
        flush_records.observe(records)

    owner.stats.on_flush = observe
    registry.register(_Collector(lambda: _shard_families(owner, ownership, publisher)))


def _shard_families(
    owner: Owner, ownership: Loading, publisher: Publisher | None
) -> Iterator[Metric]:
    gauges, stats, usage = owner.gauges(), owner.stats, owner.usage
    yield _gauge(
        "owner_queue_depth", "Requests queued for the owner's loop.", gauges["queue_depth"]
    )
    yield _gauge("partitions_owned", "Partitions this shard owns.", gauges["partitions_owned"])
    yield _gauge(
        "partitions_recovering",
        "Partitions being reloaded after a failed flush or a core failure.",
        gauges["partitions_recovering"],
    )
    yield _gauge(
        "partitions_loading",
        "Partitions taken over and being loaded (checkpoint and ledger tail).",
        ownership.loading,
    )
    yield _gauge("keys", "Inventory keys held in memory.", gauges["keys"])
    yield _gauge("reservations_live", "Live reservations.", gauges["live_reservations"])
    yield _gauge(
        "reservations_live_max",
        "The process bound on live reservations (new ones are refused at it).",
        usage.reservations_live_max,
    )
    yield _gauge(
        "idempotency_entries", "Remembered answers for retries.", gauges["idempotency_entries"]
    )
    yield _gauge(
        "over_committed_keys",
        "Keys whose available is below zero (more promised than there is).",
        gauges["over_committed_keys"],
    )
    yield _gauge(
        "over_committed_units",
        "Units promised beyond what there is, summed over the over-committed keys.",
        owner.over_committed_units(),
    )
    yield _gauge("stale_locations", "Locations whose feeds are silent.", gauges["stale_locations"])
    yield _counter(
        "reservations_expired", "Reservations expired (counted when flushed).", stats.expired
    )
    yield _counter("flush_failures", "Flushes whose outcome is unknown.", stats.flush_failures)
    yield _counter("core_failures", "Exceptions out of the core (bugs).", stats.core_failures)
    yield _counter("partitions_fenced", "Partitions fenced by another owner.", stats.fenced)
    yield _counter("checkpoints", "Checkpoints written.", stats.checkpoints)
    yield _counter("requests_shed", "Requests refused: the owner's queue full.", stats.shed)
    if publisher is not None:
        yield from _publisher_families(publisher)


def _publisher_families(publisher: Publisher) -> Iterator[Metric]:
    stats = publisher.stats
    yield _gauge(
        "event_publish_lag_seconds",
        "How long the oldest change waiting for Redis has waited since its commit.",
        publisher.lag_ms() / 1000,
    )
    yield _gauge("events_buffered", "Changes waiting to be published.", stats.buffered_events)
    yield _counter("events_published", "Stream entries appended.", stats.events_published)
    yield _counter(
        "event_buffer_drops", "Changes dropped from the buffer (catch-up republishes them).",
        stats.buffer_drops,
    )  # fmt: skip
    yield _counter("event_redis_errors", "Failed Redis steps.", stats.redis_errors)
    yield _counter("event_catch_ups", "Catch-up passes from the ledger.", stats.catch_ups)


class RouterParts(Protocol):
    """What the router's collector reads (shard_router.router.service.RouterCalls)."""

    hot_keys: HotKeyMap
    detector: HotKeyDetector | None


def router_metrics(
    routes: Routes, calls: RouterParts, hub: WatchHub | None, metrics_listen: str
) -> list[asyncio.Task[None]]:
    """Export the router's figures and serve them (nothing when ``metrics_listen`` is empty)."""
    if not metrics_listen:
        return []
    watch_router(routes, calls, hub)
    return [asyncio.create_task(serve_metrics(metrics_listen), name="metrics")]


def watch_router(
    routes: Routes,
    calls: RouterParts,
    hub: WatchHub | None,
    registry: CollectorRegistry = REGISTRY,
) -> None:
    """The router's figures in ``registry``, read at scrape time."""
    registry.register(_Collector(lambda: _router_families(routes, calls, hub)))


def _router_families(routes: Routes, calls: RouterParts, hub: WatchHub | None) -> Iterator[Metric]:
    yield _gauge("router_shards_alive", "Shards on the router's ring.", len(routes.addresses))
    yield _gauge(
        "router_items_pending",
        "Items forwarded to the shards and not yet answered (the router's queue).",
        routes.pending_items,
    )
    yield _gauge("hot_keys_split", "Split keys the router knows.", len(calls.hot_keys))
    busiest = calls.detector.busiest_per_s if calls.detector is not None else 0.0
    yield _gauge(
        "hot_key_busiest_reserves_per_second",
        "One-line reserves a second of the busiest key, over the last detector window.",
        busiest,
    )
    if hub is None:
        return
    metrics = hub.metrics
    yield _gauge("watch_subscribers", "Watch subscribers.", metrics.subscribers)
    yield _gauge(
        "watch_pending_keys_max",
        "The most changes one subscriber has pending (a resync past the hub's bound).",
        hub.pending_keys_max(),
    )
    yield _gauge(
        "watch_lag_seconds",
        "Commit to the hub's read, of the newest change it read.",
        metrics.lag_ms_last / 1000,
    )
    yield _counter("watch_resyncs", "Resyncs sent to subscribers.", metrics.resyncs)
    yield _counter(
        "watch_subscribers_refused", "Watch calls refused: too many.", metrics.subscribers_refused
    )
    yield _counter(
        "watch_events_delivered", "Changes sent to subscribers.", metrics.events_delivered
    )
    yield _counter("watch_source_errors", "Failed reads of Redis.", metrics.source_errors)


# ----------------------------------------------------------------------- the endpoint


def check_metrics_listen(metrics_listen: str) -> None:
    """Exit after one line on stderr (with ``LISTEN_FAILED_EXIT_CODE``) when nothing could
    listen on ``--metrics-listen`` now: checked at start, like ``--listen``."""
    if not metrics_listen:
        return
    try:
        check_listen_address(metrics_listen)
    except ListenError as error:
        print(f"error: {error} (--metrics-listen)", file=sys.stderr, flush=True)
        raise SystemExit(LISTEN_FAILED_EXIT_CODE) from None


async def serve_metrics(metrics_listen: str) -> None:
    """Serve ``GET /metrics`` on ``metrics_listen`` until cancelled."""
    host, port = split_address(metrics_listen)
    scrapes = asyncio.Semaphore(SCRAPE_CONNECTIONS_MAX)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if scrapes.locked():
            writer.close()
            return
        async with scrapes:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await _answer(reader, writer)
            writer.close()

    server = await asyncio.start_server(handle, host, port, limit=SCRAPE_REQUEST_BYTES_MAX)
    bound = server.sockets[0].getsockname() if server.sockets else (host, port)
    log.info("metrics_serving", address=f"{bound[0]}:{bound[1]}", path="/metrics")
    async with server:
        await server.serve_forever()


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), SCRAPE_REQUEST_TIMEOUT_S)
    except (asyncio.LimitOverrunError, TimeoutError):
        writer.write(_response(b"400 Bad Request", b"text/plain", b"bad request\n"))
        return
    parts = head.split(b" ", 2)
    path = parts[1].partition(b"?")[0] if len(parts) == 3 else b""
    if parts[0] != b"GET" or path != b"/metrics":
        writer.write(_response(b"404 Not Found", b"text/plain", b"see /metrics\n"))
    else:
        body = generate_latest(REGISTRY)
        writer.write(_response(b"200 OK", CONTENT_TYPE_PLAIN_0_0_4.encode(), body))
    await writer.drain()


def _response(status: bytes, content_type: bytes, body: bytes) -> bytes:
    return b"".join(
        (
            b"HTTP/1.1 ", status, b"\r\nContent-Type: ", content_type,
            b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\nConnection: close\r\n\r\n",
            body,
        )
    )  # fmt: skip
