"""Tracing in one process: its configuration, what is made when it is off (nothing), the
spans of the server paths, the flush's one span, log lines and shared streams' context."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import structlog
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from shard_router.common import batching, calls, config, errors, telemetry, tracing
from shard_router.common.calls import Refusal
from shard_router.common.config import TracingConfig
from shard_router.common.server import create_server
from shard_router.common.servicer import SERVICE_NAMES, CallsServicer, serve_inventory
from tests.integration.test_owner import APPLE, mutate, reserve, rig, run, set_stock, settle
from tests.security.test_isolation_matrix import RecordingCalls

ON = TracingConfig(otlp_endpoint="http://127.0.0.1:4317", sample_ratio=1.0)
# A caller's sampled and unsampled trace contexts (W3C traceparent).
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SAMPLED = {"traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-01"}
UNSAMPLED = {"traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-00"}


@dataclass
class Exported:
    provider: TracerProvider
    exporter: InMemorySpanExporter

    def finished(self) -> list[ReadableSpan]:
        self.provider.force_flush()
        return list(self.exporter.get_finished_spans())


@pytest.fixture
def exported() -> Iterator[Exported]:
    """Tracing on in this process for the test, its spans kept in memory."""
    exporter = InMemorySpanExporter()
    with tracing.traced(ON, "shard-test", exporter) as provider:
        yield Exported(provider, exporter)


# ----------------------------------------------------------------------- configuration


def parsed(arguments: list[str], add: Any = config.add_router_arguments) -> TracingConfig:
    parser = argparse.ArgumentParser()
    add(parser)
    options = parser.parse_args(["--database-url", "postgresql://x/y", *arguments])
    return config.tracing_config(options)


@pytest.fixture
def no_tracing_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (
        "INVENTORY_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "INVENTORY_TRACE_SAMPLE_RATIO",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("add", [config.add_router_arguments, config.add_shard_arguments])
def test_tracing_is_off_by_default_on_router_and_shard(
    no_tracing_environment: pytest.MonkeyPatch, add: Any
) -> None:
    assert parsed([], add) == TracingConfig(otlp_endpoint="", sample_ratio=0.01)


def test_the_flags_name_the_collector_and_the_ratio(
    no_tracing_environment: pytest.MonkeyPatch,
) -> None:
    got = parsed(["--otlp-endpoint", " http://collector:4317 ", "--trace-sample-ratio", "0.5"])
    assert got == TracingConfig("http://collector:4317", 0.5)


def test_the_environment_names_the_collector_ours_before_the_standard_one(
    no_tracing_environment: pytest.MonkeyPatch,
) -> None:
    no_tracing_environment.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://standard:4317")
    assert parsed([]).otlp_endpoint == "http://standard:4317"
    no_tracing_environment.setenv("INVENTORY_OTLP_ENDPOINT", "http://ours:4317")
    no_tracing_environment.setenv("INVENTORY_TRACE_SAMPLE_RATIO", "1")
    assert parsed([]) == TracingConfig("http://ours:4317", 1.0)
    assert parsed(["--otlp-endpoint", "http://flag:4317"]).otlp_endpoint == "http://flag:4317"


@pytest.mark.parametrize("ratio", ["-0.1", "1.5", "nan"])
def test_a_sample_ratio_outside_zero_to_one_is_refused(
    no_tracing_environment: pytest.MonkeyPatch, ratio: str
) -> None:
    with pytest.raises(SystemExit):
        parsed(["--trace-sample-ratio", ratio])


# ------------------------------------------------------------------------------ off


def test_tracing_off_makes_no_provider_no_exporter_and_records_no_span(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[str] = []

    def refuse(name: str) -> Any:
        def init(self: object, *args: object, **kwargs: object) -> None:
            made.append(name)
            raise AssertionError(f"{name} made with tracing off")

        return init

    from opentelemetry.exporter.otlp.proto.grpc import trace_exporter
    from opentelemetry.sdk import trace as sdk_trace
    from opentelemetry.sdk.trace import export

    monkeypatch.setattr(trace_exporter.OTLPSpanExporter, "__init__", refuse("exporter"))
    monkeypatch.setattr(sdk_trace.TracerProvider, "__init__", refuse("provider"))
    monkeypatch.setattr(export.BatchSpanProcessor, "__init__", refuse("processor"))
    seen: list[trace.Span] = []

    async def scenario() -> pb.BatchItemResult:
        async def handler(request: Any, deadline: float | None) -> pb.ReserveResponse:
            seen.append(trace.get_current_span())
            assert tracing.sampled_call() is None
            with tracing.flush_span([trace.get_current_span().get_span_context()], 1, 1):
                seen.append(trace.get_current_span())
            return pb.ReserveResponse()

        item = pb.BatchItem(id=1, reserve=pb.ReserveRequest(), metadata=SAMPLED)
        assert tracing.hop_span(item, "127.0.0.1:1") is None
        assert tracing.serve_item(item, print) == (None, print)
        return await batching.run_item(item, {"reserve": handler}, calls.refusal_status)

    with tracing.traced(TracingConfig(otlp_endpoint="", sample_ratio=1.0), "router"):
        assert tracing.interceptors() == []
        result = asyncio.run(scenario())
    assert result.WhichOneof("result") == "reserve"
    assert made == []
    assert seen and all(not span.get_span_context().is_valid for span in seen)


# ------------------------------------------------------------------------ server spans


class Refusing(RecordingCalls):
    """Reserve answers as ``answer`` says: refused (the caller's fault) or a bug."""

    def __init__(self, answer: str) -> None:
        super().__init__()
        self.answer = answer
        self.reserve = self._reserve  # RecordingCalls set its own

    async def _reserve(self, request: Any, deadline: float | None) -> pb.ReserveResponse:
        if self.answer == "refused":
            raise Refusal(errors.rejection_to_status(_short()))
        if self.answer == "bug":
            raise RuntimeError("a bug")
        return pb.ReserveResponse()


def _short() -> Any:
    from inventory_core import InsufficientStock, InventoryKey, ShortLine

    return InsufficientStock((ShortLine(InventoryKey("m-1", "s", "l"), 2, 0),))


async def unary_reserve(servicer_calls: Any, metadata: dict[str, str]) -> grpc.StatusCode:
    server, _, port = create_server("127.0.0.1:0", SERVICE_NAMES, tracing.interceptors())
    serve_inventory(server, CallsServicer(servicer_calls))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = pb.ReserveRequest(
                lines=[pb.ReservationLine(key=pb.InventoryKey(merchant_id="m-1"), quantity=1)]
            )
            try:
                await pb_grpc.InventoryStub(channel).Reserve(
                    request, metadata=tuple(metadata.items()), timeout=30
                )
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK
    finally:
        await server.stop(None)


@pytest.mark.parametrize(
    ("answer", "code", "error"),
    [
        ("ok", grpc.StatusCode.OK, False),
        ("refused", grpc.StatusCode.FAILED_PRECONDITION, False),  # the caller's, not ours
        ("bug", grpc.StatusCode.INTERNAL, True),
    ],
)
def test_a_unary_call_is_a_server_span_continuing_its_callers_trace_with_its_code(
    exported: Exported, answer: str, code: grpc.StatusCode, error: bool
) -> None:
    assert asyncio.run(unary_reserve(Refusing(answer), SAMPLED)) is code
    (span,) = exported.finished()
    assert span.name == "inventory.v1.Inventory/Reserve"
    assert span.kind is SpanKind.SERVER
    assert span.parent is not None and span.parent.span_id == int("b7ad6b7169203331", 16)
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == code.value[0]
    assert span.attributes["inventory.merchant_id"] == "m-1"
    assert span.attributes["inventory.lines"] == 1
    assert (span.status.status_code is StatusCode.ERROR) is error


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_a_unary_call_without_a_trace_starts_one_at_the_ratio(ratio: float) -> None:
    exporter = InMemorySpanExporter()
    config = TracingConfig("http://127.0.0.1:4317", sample_ratio=ratio)
    with tracing.traced(config, "shard-test", exporter) as provider:
        assert asyncio.run(unary_reserve(Refusing("ok"), {})) is grpc.StatusCode.OK
        provider.force_flush()
    spans = exporter.get_finished_spans()
    assert [(s.kind, s.parent) for s in spans] == ([(SpanKind.SERVER, None)] if ratio else [])


def test_a_call_whose_caller_did_not_sample_it_records_nothing(
    exported: Exported,
) -> None:
    assert asyncio.run(unary_reserve(Refusing("ok"), UNSAMPLED)) is grpc.StatusCode.OK
    item = pb.BatchItem(id=1, reserve=pb.ReserveRequest(), metadata=UNSAMPLED)
    assert tracing.item_span("reserve", UNSAMPLED, item.reserve) is None
    assert exported.finished() == []


def test_a_batch_item_with_a_sampled_context_is_a_span_current_while_it_runs(
    exported: Exported,
) -> None:
    inside: list[trace.Span] = []

    async def handler(request: Any, deadline: float | None) -> pb.ReserveResponse:
        inside.append(trace.get_current_span())
        return pb.ReserveResponse()

    item = pb.BatchItem(id=7, reserve=pb.ReserveRequest(), metadata=SAMPLED)
    asyncio.run(batching.run_item(item, {"reserve": handler}, calls.refusal_status))
    (span,) = exported.finished()
    assert inside[0].get_span_context() == span.context
    assert span.attributes is not None and span.attributes["inventory.batch_item"] is True


def parent_in(item: pb.BatchItem) -> int:
    """The span id an item's traceparent names."""
    return int(item.metadata["traceparent"].split("-")[2], 16)


def test_the_routers_hop_is_a_client_span_whose_context_the_item_carries(
    exported: Exported,
) -> None:
    answers: list[pb.BatchItemResult] = []
    item = pb.BatchItem(id=1, reserve=pb.ReserveRequest(), metadata=SAMPLED)
    server, answer = tracing.serve_item(item, answers.append)
    assert server is not None
    assert parent_in(item) == server.get_span_context().span_id
    hop = tracing.hop_span(item, "127.0.0.1:50061", server)
    assert hop is not None
    assert parent_in(item) == hop.get_span_context().span_id
    tracing.ending_hop(hop, answer)(pb.BatchItemResult(id=1, reserve=pb.ReserveResponse()))
    assert len(answers) == 1
    spans = {span.kind: span for span in exported.finished()}
    assert spans[SpanKind.CLIENT].parent == spans[SpanKind.SERVER].context
    assert spans[SpanKind.CLIENT].attributes["server.address"] == "127.0.0.1:50061"  # type: ignore[index]


# ---------------------------------------------------------------------------- the flush


def test_one_flush_of_two_traced_calls_is_one_span_under_the_first_linked_to_the_second(
    exported: Exported,
) -> None:
    assert tracing._on.tracer is not None
    tracer = tracing._on.tracer

    async def body() -> None:
        async with rig(start=False) as r:
            first = tracer.start_span("first")
            second = tracer.start_span("second")
            owner = r.owner
            writes = [
                asyncio.create_task(tracing.within(span, owner.mutate(3, command, None)))
                for span, command in (
                    (first, set_stock(APPLE, 10, "s1")),
                    (second, reserve(APPLE, 1, "r1")),
                )
            ]
            await settle()  # both queued before the loop runs: one batch, one flush
            r.start()
            await asyncio.gather(*writes)
            assert len(r.store.flush_calls) == 1
            first.end()
            second.end()

    run(body)
    spans = {span.name: span for span in exported.finished()}
    flush = spans["ledger_flush"]
    assert flush.parent == spans["first"].context
    assert [link.context for link in flush.links] == [spans["second"].context]
    assert flush.attributes is not None
    assert flush.attributes["inventory.flush.records"] == 2
    assert flush.attributes["inventory.flush.traced_calls"] == 2


def test_a_flush_no_traced_call_waits_for_has_no_span(exported: Exported) -> None:
    async def body() -> None:
        async with rig() as r:
            await mutate(r, 3, set_stock(APPLE, 10, "s1"))

    run(body)
    assert exported.finished() == []


# ------------------------------------------------------------------ logs and contexts


def test_a_log_line_in_a_span_carries_its_ids_and_tokens_stay_redacted(
    exported: Exported,
) -> None:
    assert tracing._on.tracer is not None
    token = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln"
    with tracing._on.tracer.start_as_current_span("call") as span:
        event = telemetry.add_trace_ids(None, "info", {"event": "e", "error": f"bad {token}"})
        event = telemetry.redact_tokens(None, "info", event)
    ids = span.get_span_context()
    assert event == {
        "event": "e",
        "error": "bad [token]",
        "trace_id": format(ids.trace_id, "032x"),
        "span_id": format(ids.span_id, "016x"),
    }
    assert telemetry.add_trace_ids(None, "info", {"event": "e"}) == {"event": "e"}


def test_a_stream_task_started_by_a_call_has_none_of_its_metadata_log_fields_or_span(
    exported: Exported,
) -> None:
    assert tracing._on.tracer is not None
    tracer = tracing._on.tracer

    async def seen() -> tuple[bool, dict[str, str], dict[str, Any]]:
        valid = trace.get_current_span().get_span_context().is_valid
        return valid, calls.request_metadata.get(), structlog.contextvars.get_contextvars()

    async def call() -> tuple[Any, Any]:
        with tracer.start_as_current_span("call"):
            own = await seen()
            stream = await asyncio.create_task(seen(), context=tracing.detached())
        return own, stream

    async def scenario() -> tuple[Any, Any]:
        metadata = {"x-request-id": "req-1", **SAMPLED}
        return await calls.with_metadata(metadata, call())

    own, stream = asyncio.run(scenario())
    assert own[0] and own[1]["x-request-id"] == "req-1" and own[2]["request_id"] == "req-1"
    assert stream == (False, {}, {})


def test_the_client_traces_only_with_a_provider_set_up() -> None:
    assert tracing.client_tracer(trace.ProxyTracerProvider()) is None  # none set up yet
    assert tracing.client_tracer(trace.NoOpTracerProvider()) is None
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    assert tracing.client_tracer(provider) is not None
