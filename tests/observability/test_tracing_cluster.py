"""One reservation through a real router and shard is one trace: client -> router -> hop ->
shard -> flush, exported by OTLP to a collector, and both processes' log lines name it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from shard_router.client import InventoryClient, key, line
from tests.conftest import Cluster, start_cluster

from .collector import ExportedSpan, FakeCollector

pytestmark = pytest.mark.e2e

# Spans reach the collector within about a second (tracing.SPAN_EXPORT_DELAY_MS); this much
# more is for a loaded machine.
SPANS_WAIT_S = 60.0
SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
INTERNAL = trace_pb2.Span.SPAN_KIND_INTERNAL
RESERVE = "inventory.v1.Inventory/Reserve"


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    yield from FakeCollector().running()


@pytest.fixture
def cluster(database_url: str, tmp_path: Path, collector: FakeCollector) -> Iterator[Cluster]:
    # Sampling 0 here: the servers record a call because its caller sampled it (parent-based).
    tracing = ("--otlp-endpoint", collector.endpoint, "--trace-sample-ratio", "0")
    arguments = (*tracing, "--log-level", "debug")
    running = start_cluster(
        database_url, tmp_path, shards=1, shard_arguments=arguments, router_arguments=arguments
    )
    try:
        yield running
    finally:
        running.stop()


def client_provider(collector: FakeCollector) -> TracerProvider:
    """The calling process's own OpenTelemetry setup, as an order service would have it."""
    provider = TracerProvider(resource=Resource.create({"service.name": "order-service"}))
    exporter = OTLPSpanExporter(endpoint=collector.endpoint, insecure=True)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


async def reserve_once(address: str, provider: TracerProvider, batching: bool, sku: str) -> None:
    async with InventoryClient(
        address, batching=batching, tracer_provider=provider, timeout_s_default=30.0
    ) as client:
        stock = key("m-1", sku, "loc-1")
        await client.set_stock(stock, 10, idempotency_key=f"stock-{sku}")
        await client.reserve([line(stock, 2)], idempotency_key=f"reserve-{sku}", ttl_s=60)


def the_trace(spans: list[ExportedSpan], sku: str) -> list[ExportedSpan]:
    """The spans of the one trace whose client span reserved ``sku``'s key, if exported."""
    ids = {s.trace_id for s in spans if s.service == "order-service" and s.name == RESERVE}
    traces = [[s for s in spans if s.trace_id == i] for i in ids]
    return next((t for t in traces if _complete(t)), [])


def _complete(spans: list[ExportedSpan]) -> bool:
    found = {(s.service, s.name, s.kind) for s in spans}
    return {
        ("order-service", RESERVE, CLIENT),
        ("router", RESERVE, SERVER),
        ("router", RESERVE, CLIENT),
        ("shard-0", RESERVE, SERVER),
        ("shard-0", "ledger_flush", INTERNAL),
    } <= found


def one(spans: list[ExportedSpan], service: str, kind: int, name: str = RESERVE) -> ExportedSpan:
    matching = [s for s in spans if (s.service, s.kind, s.name) == (service, kind, name)]
    assert len(matching) == 1, [(s.service, s.name, s.kind) for s in spans]
    return matching[0]


def traced_lines(log_text: str, trace_id: str) -> list[dict[str, object]]:
    lines = [json.loads(t) for t in log_text.splitlines() if t.startswith("{")]
    return [entry for entry in lines if entry.get("trace_id") == trace_id]


@pytest.mark.parametrize("batching", [True, False], ids=["batch-stream", "unary"])
def test_a_reservation_is_one_trace_from_client_to_flush_and_its_log_lines_name_it(
    cluster: Cluster, collector: FakeCollector, batching: bool
) -> None:
    provider = client_provider(collector)
    sku = f"sku-{batching}"
    try:
        asyncio.run(reserve_once(cluster.router.address, provider, batching, sku))
    finally:
        provider.shutdown()
    found = collector.wait_for(
        lambda spans: bool(the_trace(spans, sku)), "complete Reserve trace", SPANS_WAIT_S
    )
    spans = the_trace(found, sku)

    client = one(spans, "order-service", CLIENT)
    router = one(spans, "router", SERVER)
    hop = one(spans, "router", CLIENT)
    shard = one(spans, "shard-0", SERVER)
    flush = one(spans, "shard-0", INTERNAL, "ledger_flush")
    assert client.parent_span_id == ""
    assert router.parent_span_id == client.span_id
    assert hop.parent_span_id == router.span_id
    assert shard.parent_span_id == hop.span_id
    assert flush.parent_span_id == shard.span_id
    for span in (client, router, shard):
        assert span.attribute("inventory.merchant_id") == "m-1"
        assert span.attribute("rpc.grpc.status_code") == 0
    assert router.attribute("inventory.batch_item") is (True if batching else None)
    assert shard.attribute("inventory.batch_item") is True  # the router's hop is an item
    assert flush.attribute("inventory.flush.records") >= 1  # type: ignore[operator]

    trace_id = client.trace_id
    for process, span in ((cluster.router, router), (cluster.shards[0], shard)):
        lines = traced_lines(process.log_text(), trace_id)
        assert any(
            entry["event"] == "call_traced" and entry["span_id"] == span.span_id for entry in lines
        ), f"{process.name}: no log line of the call's span"


def test_a_call_its_caller_did_not_trace_is_not_traced_when_the_servers_sample_none(
    cluster: Cluster, collector: FakeCollector
) -> None:
    async def untraced() -> None:
        async with InventoryClient(cluster.router.address, timeout_s_default=30.0) as client:
            stock = key("m-1", "sku-untraced", "loc-1")
            await client.set_stock(stock, 10, idempotency_key="stock-untraced")

    asyncio.run(untraced())
    # Then a traced call: once its spans are in, the untraced one's would have been too.
    provider = client_provider(collector)
    try:
        asyncio.run(reserve_once(cluster.router.address, provider, True, "sku-after"))
    finally:
        provider.shutdown()
    found = collector.wait_for(
        lambda spans: bool(the_trace(spans, "sku-after")), "the traced call", SPANS_WAIT_S
    )
    traced = {s.trace_id for s in found if s.service == "order-service"}
    assert {s.trace_id for s in found} <= traced, "a server started a trace of its own"
