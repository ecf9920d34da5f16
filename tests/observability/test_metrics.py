"""The metrics of shard_router.common.metrics: names, labels, and what a call moves.

A real gRPC server on loopback serves the Inventory service over a calls object that answers
at once, behind the metrics interceptor (and the auth interceptor where a test says so);
the process registry is read before and after each call, so each test sees only its own
calls. The shard's and the router's collectors are read from registries of their own.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from persistence.events import PublisherStats
from shard_router.common import batching, calls, errors, metrics
from shard_router.common.access import Role
from shard_router.common.auth import AuthInterceptor
from shard_router.common.calls import bearer
from shard_router.common.server import create_server
from shard_router.common.servicer import SERVICE_NAMES, CallsServicer, serve_inventory
from shard_router.common.tokens import Keyring, LocalKeys, Verifier
from shard_router.router.hot_keys import HotKeyMap
from shard_router.router.routing import Routes
from shard_router.router.watch import WatchHub
from shard_router.shard.owner import Owner
from tests.conftest import free_port
from tests.integration.test_owner import FakeStore
from tests.security.test_isolation_matrix import OWN, RecordingCalls, one_reserve, reserve
from tests.watch.fake_source import FakeEventSource

# Labels a metric of ours may carry: bounded sets (never a merchant, SKU, key or id).
BOUNDED_LABELS = {"service", "method", "code", "kind"}
NAME = re.compile(r"^[a-z][a-z0-9_]*$")
ROOT = Path(__file__).resolve().parents[2]


class RefusingCalls(RecordingCalls):
    """As RecordingCalls, but GetReservation is refused UNIMPLEMENTED."""

    def __init__(self) -> None:
        super().__init__()
        self.get_reservation = self._refuse

    async def _refuse(self, request: Any, deadline: float | None) -> Any:
        raise calls.Refusal(errors.unimplemented("not here"))


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def keys() -> LocalKeys:
    local = LocalKeys(Path(tempfile.mkdtemp(prefix="metrics-keys-")))
    local.ensure()
    return local


async def serving(guard: AuthInterceptor | None = None) -> tuple[grpc.aio.Server, int]:
    server, _, port = create_server(
        "127.0.0.1:0",
        SERVICE_NAMES,
        [guard] if guard else [],
        observers=metrics.call_interceptors("127.0.0.1:0"),
    )
    serve_inventory(server, CallsServicer(RefusingCalls()))
    await server.start()
    return server, port


@pytest.fixture
def counting() -> Iterator[None]:
    """Batch items are counted during the test (``call_interceptors`` turns it on)."""
    yield
    batching.item_counter = None  # other tests' servers count nothing


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_a_unary_call_moves_its_counter_with_its_code_and_its_histogram(counting: None) -> None:
    labels = {"service": "Inventory", "method": "Reserve"}
    ok_before = sample("inventory_grpc_calls_total", **labels, code="OK")
    timed_before = sample("inventory_grpc_call_duration_seconds_count", **labels)
    refused = {"service": "Inventory", "method": "GetReservation", "code": "UNIMPLEMENTED"}
    refused_before = sample("inventory_grpc_calls_total", **refused)

    async def calls_made() -> None:
        server, port = await serving()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                inventory = pb_grpc.InventoryStub(channel)
                for _ in range(3):
                    await inventory.Reserve(reserve(OWN))
                with pytest.raises(grpc.aio.AioRpcError) as refusal:
                    await inventory.GetReservation(pb.GetReservationRequest(merchant_id=OWN))
                assert refusal.value.code() is grpc.StatusCode.UNIMPLEMENTED
        finally:
            await server.stop(None)

    run(calls_made())
    assert sample("inventory_grpc_calls_total", **labels, code="OK") == ok_before + 3
    assert sample("inventory_grpc_call_duration_seconds_count", **labels) == timed_before + 3
    assert sample("inventory_grpc_calls_total", **refused) == refused_before + 1


def test_calls_refused_by_auth_are_counted_unauthenticated(counting: None, keys: LocalKeys) -> None:
    """Unary and stream calls alike; a refused stream (a coroutine that aborts) and an
    accepted one (an async generator) of the same method are both served."""
    guard = AuthInterceptor(Verifier(Keyring(keys.jwks_path)))
    counted = [
        {"service": "Inventory", "method": method, "code": code}
        for method in ("Reserve", "Batch")
        for code in ("UNAUTHENTICATED", "OK")
    ]
    before = [sample("inventory_grpc_calls_total", **labels) for labels in counted]
    token = keys.mint(Role.ORDER_SERVICE, [OWN])

    async def calls_made() -> None:
        server, port = await serving(guard)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                inventory = pb_grpc.InventoryStub(channel)
                with pytest.raises(grpc.aio.AioRpcError):
                    await inventory.Reserve(reserve(OWN))
                await inventory.Reserve(reserve(OWN), metadata=bearer(token))
                refused = inventory.Batch()
                with pytest.raises(grpc.aio.AioRpcError) as refusal:
                    await refused.read()
                assert refusal.value.code() is grpc.StatusCode.UNAUTHENTICATED
                accepted = inventory.Batch(metadata=bearer(token))
                await accepted.write(one_reserve(1))
                assert len((await accepted.read()).results) == 1
                await accepted.done_writing()
                assert await accepted.read() is grpc.aio.EOF
        finally:
            await server.stop(None)

    run(calls_made())
    after = [sample("inventory_grpc_calls_total", **labels) for labels in counted]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 1]


def test_bytes_that_are_no_request_are_counted_invalid_argument(
    counting: None, keys: LocalKeys
) -> None:
    """Refused before authentication and the servicer, and still counted: the metrics see
    every call, the decoding refusal included (server.create_server's observers)."""
    guard = AuthInterceptor(Verifier(Keyring(keys.jwks_path)))
    labels = {"service": "Inventory", "method": "Reserve", "code": "INVALID_ARGUMENT"}
    before = sample("inventory_grpc_calls_total", **labels)

    async def call_made() -> None:
        server, port = await serving(guard)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                garbage = channel.unary_unary("/inventory.v1.Inventory/Reserve")
                with pytest.raises(grpc.aio.AioRpcError) as refusal:
                    await garbage(b"\xff\xff\xff", timeout=10)
                assert refusal.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await server.stop(None)

    run(call_made())
    assert sample("inventory_grpc_calls_total", **labels) == before + 1


def test_batch_items_are_counted_by_kind_and_code_and_the_stream_while_open(counting: None) -> None:
    ok = {"kind": "reserve", "code": "OK"}
    refused = {"kind": "get_reservation", "code": "UNIMPLEMENTED"}
    none = {"kind": batching.UNKNOWN_KIND, "code": "INVALID_ARGUMENT"}
    before = [sample("inventory_batch_items_total", **labels) for labels in (ok, refused, none)]
    stream_labels = {"service": "Inventory", "method": "Batch"}
    ended_before = sample("inventory_grpc_calls_total", **stream_labels, code="OK")
    seen_open: list[float] = []

    async def items_sent() -> None:
        server, port = await serving()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stream = pb_grpc.InventoryStub(channel).Batch()
                await stream.write(one_reserve(1))
                await stream.read()
                seen_open.append(sample("inventory_grpc_streams_open", **stream_labels))
                get = pb.GetReservationRequest(merchant_id=OWN)
                items = [pb.BatchItem(id=2, get_reservation=get), pb.BatchItem(id=3)]
                await stream.write(pb.BatchRequest(items=items))
                answered = 0
                while answered < len(items):
                    answered += len((await stream.read()).results)
                await stream.done_writing()
                assert await stream.read() is grpc.aio.EOF
        finally:
            await server.stop(None)

    run(items_sent())
    after = [sample("inventory_batch_items_total", **labels) for labels in (ok, refused, none)]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
    assert seen_open[0] >= 1
    assert sample("inventory_grpc_streams_open", **stream_labels) == 0
    assert sample("inventory_grpc_calls_total", **stream_labels, code="OK") == ended_before + 1


class FakePublisher:
    def __init__(self) -> None:
        self.stats = PublisherStats(events_published=7)

    def lag_ms(self) -> int:
        return 1500


async def no_members() -> list[Any]:
    return []


def families(registry: CollectorRegistry) -> dict[str, Any]:
    text = _exposition(registry)
    return {family.name: family for family in text_string_to_metric_families(text)}


def _exposition(registry: CollectorRegistry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


def process_families() -> dict[str, Any]:
    """The shard's and the router's families, each from a registry of its own."""
    shard_registry, router_registry = CollectorRegistry(), CollectorRegistry()
    owner = Owner(FakeStore())
    metrics.watch_shard(owner, SimpleNamespace(loading=3), FakePublisher(), shard_registry)
    owner.stats.observe_flush(40, 0.003)
    parts = SimpleNamespace(hot_keys=HotKeyMap(), detector=None)
    hub = WatchHub(FakeEventSource())
    metrics.watch_router(Routes(no_members, 16), parts, hub, router_registry)
    return {**families(shard_registry), **families(router_registry), **families(metrics.REGISTRY)}


def test_names_follow_prometheus_conventions_and_labels_are_bounded() -> None:
    found = process_families()
    ours = {name: family for name, family in found.items() if name.startswith("inventory_")}
    assert len(ours) >= 35, sorted(ours)
    for name, family in ours.items():
        assert NAME.match(name), name
        names = {sample.name for sample in family.samples}
        if family.type == "counter":
            assert names == {name + "_total"}, (name, names)
        if "duration" in name or "lag" in name:
            assert name.endswith("_seconds"), name
        assert not name.endswith("_ms"), name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} <= BOUNDED_LABELS, (name, sample.labels)
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds"} <= set(
        found
    )


def test_the_shard_collector_reads_the_owner_and_the_publisher_at_scrape_time() -> None:
    found = process_families()
    flush = {s.name: s.value for s in found["inventory_flush_records"].samples if not s.labels}
    assert flush == {"inventory_flush_records_count": 1, "inventory_flush_records_sum": 40}
    values = {
        name: found[name].samples[0].value
        for name in (
            "inventory_event_publish_lag_seconds",
            "inventory_events_published",
            "inventory_over_committed_units",
            "inventory_partitions_owned",
            "inventory_partitions_loading",
            "inventory_watch_subscribers",
        )
    }
    assert values == {
        "inventory_event_publish_lag_seconds": 1.5,
        "inventory_events_published": 7,
        "inventory_over_committed_units": 0,
        "inventory_partitions_owned": 0,
        "inventory_partitions_loading": 3,
        "inventory_watch_subscribers": 0,
    }


def test_the_endpoint_serves_the_registry_on_metrics_and_nothing_else() -> None:
    port = free_port()

    async def fetch(path: str) -> tuple[int, str]:
        served = asyncio.create_task(metrics.serve_metrics(f"127.0.0.1:{port}"))
        try:
            for _ in range(100):  # until it listens (bounded)
                try:
                    return await asyncio.to_thread(_get, f"http://127.0.0.1:{port}{path}")
                except urllib.error.URLError as error:
                    if isinstance(error, urllib.error.HTTPError):
                        return error.code, ""
                    await asyncio.sleep(0.05)
            raise AssertionError("the endpoint never listened")
        finally:
            served.cancel()
            await asyncio.gather(served, return_exceptions=True)

    status, body = run(fetch("/metrics"))
    assert status == 200
    assert "# TYPE process_cpu_seconds_total counter" in body
    assert run(fetch("/"))[0] == 404


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return int(answer.status), answer.read().decode()


def test_without_an_endpoint_nothing_is_counted(counting: None) -> None:
    batching.item_counter = None
    assert metrics.call_interceptors("") == []
    assert batching.item_counter is None
    assert len(metrics.call_interceptors("127.0.0.1:0")) == 1
    assert batching.item_counter is not None


def test_every_alert_has_a_summary_a_description_and_a_runbook_section() -> None:
    rules = (ROOT / "ops" / "prometheus" / "alerts.yml").read_text()
    guide = (ROOT / "docs" / "operations.md").read_text()
    sections = {line[4:].strip().lower() for line in guide.splitlines() if line[:4] == "### "}
    alerts = re.split(r"\n\s+- alert: ", rules)[1:]
    assert len(alerts) >= 7
    for alert in alerts:
        name = alert.split("\n", 1)[0].strip()
        assert "summary: " in alert and "description: " in alert, name
        assert f'runbook: "docs/operations.md#{name.lower()}"' in alert, name
        assert name.lower() in sections, f"docs/operations.md has no section {name}"
