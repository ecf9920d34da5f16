"""The client's span and the server's continue one trace, on both of the client's paths;
with authentication on, a refused call's span says UNAUTHENTICATED and holds no token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from shard_router.client import InsufficientStock, InventoryClient, InventoryError, key, line
from shard_router.common import tracing
from shard_router.common.access import Role
from shard_router.common.auth import AuthInterceptor
from shard_router.common.server import create_server
from shard_router.common.servicer import SERVICE_NAMES, CallsServicer, serve_inventory
from shard_router.common.tokens import Keyring, LocalKeys, Verifier

from .test_tracing import ON, Exported, Refusing

CALL_TIMEOUT_S = 30.0


@pytest.fixture
def exported() -> Iterator[Exported]:
    exporter = InMemorySpanExporter()
    with tracing.traced(ON, "shard-test", exporter) as provider:
        yield Exported(provider, exporter)


def caller() -> tuple[TracerProvider, InMemorySpanExporter]:
    """The calling process's own OpenTelemetry setup."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@asynccontextmanager
async def server(calls: Any, guard: AuthInterceptor | None = None) -> AsyncIterator[str]:
    interceptors = [*tracing.interceptors(), *([guard] if guard else [])]
    served, _, port = create_server("127.0.0.1:0", SERVICE_NAMES, interceptors)
    serve_inventory(served, CallsServicer(calls))
    await served.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await served.stop(None)


@pytest.mark.parametrize("batching", [True, False], ids=["batch-stream", "unary"])
def test_the_servers_span_continues_the_clients_and_both_say_the_refusal(
    exported: Exported, batching: bool
) -> None:
    provider, client_spans = caller()

    async def scenario() -> None:
        async with (
            server(Refusing("refused")) as address,
            InventoryClient(address, batching=batching, tracer_provider=provider) as client,
        ):
            with pytest.raises(InsufficientStock):
                await client.reserve(
                    [line(key("m-1", "s", "l"), 2)], idempotency_key="r-1", timeout_s=30.0
                )

    asyncio.run(scenario())
    (client_span,) = client_spans.get_finished_spans()
    (server_span,) = exported.finished()
    assert client_span.kind is SpanKind.CLIENT and server_span.kind is SpanKind.SERVER
    assert server_span.parent is not None
    parent, client = server_span.parent, client_span.context
    assert (parent.trace_id, parent.span_id) == (client.trace_id, client.span_id)
    code = grpc.StatusCode.FAILED_PRECONDITION.value[0]
    for span in (client_span, server_span):
        assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == code
    assert client_span.status.status_code is StatusCode.ERROR  # a client's view: not OK
    assert server_span.status.status_code is StatusCode.UNSET  # the caller's fault, not ours


def test_a_call_refused_for_its_token_is_traced_as_unauthenticated_and_no_token_is_recorded(
    exported: Exported, tmp_path: Path
) -> None:
    keys = LocalKeys(tmp_path)
    keys.ensure()
    wrong = LocalKeys(tmp_path / "other")
    wrong.ensure()
    token = wrong.mint(Role.ORDER_SERVICE, ["m-1"])  # signed by a key the server lacks
    guard = AuthInterceptor(Verifier(Keyring(keys.jwks_path)))
    provider, client_spans = caller()

    async def scenario() -> None:
        async with (
            server(Refusing("ok"), guard) as address,
            InventoryClient(
                address, batching=False, token=token, tracer_provider=provider
            ) as client,
        ):
            with pytest.raises(InventoryError) as refused:
                await client.reserve(
                    [line(key("m-1", "s", "l"), 2)], idempotency_key="r-1", timeout_s=30.0
                )
            assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(scenario())
    (server_span,) = exported.finished()
    assert server_span.attributes is not None
    code = grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert server_span.attributes["rpc.grpc.status_code"] == code
    for span in (server_span, *client_spans.get_finished_spans()):
        recorded = repr(dict(span.attributes or {})) + repr(span.events) + span.name
        assert token not in recorded and "eyJ" not in recorded
