"""A fake OpenTelemetry collector: an OTLP/gRPC ``TraceService`` on loopback that keeps what
it is sent, for tests to read (``spans``, ``wait_for``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

# Spans kept: far more than a test makes, and a bound on a test that makes too many.
SPANS_KEPT_MAX = 10_000
POLL_INTERVAL_S = 0.05


@dataclass(frozen=True)
class ExportedSpan:
    """One span as the collector received it, with the service that sent it."""

    service: str
    span: trace_pb2.Span

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_span_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def kind(self) -> int:
        return int(self.span.kind)

    def attribute(self, name: str) -> object:
        for attribute in self.span.attributes:
            if attribute.key == name:
                value = attribute.value
                return getattr(value, value.WhichOneof("value") or "string_value")
        return None


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collector: FakeCollector) -> None:
        self._collector = collector

    def Export(  # noqa: N802 (the OTLP service's name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                received.extend(ExportedSpan(service, span) for span in scope_spans.spans)
        self._collector.keep(received)
        return trace_service_pb2.ExportTraceServiceResponse()


class FakeCollector:
    """Started with ``running()``; ``endpoint`` is what ``--otlp-endpoint`` takes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ExportedSpan] = []
        self.exports = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def keep(self, spans: list[ExportedSpan]) -> None:
        with self._lock:
            self.exports += 1
            self._spans.extend(spans[: SPANS_KEPT_MAX - len(self._spans)])

    def spans(self) -> list[ExportedSpan]:
        with self._lock:
            return list(self._spans)

    def wait_for(
        self, predicate: Callable[[list[ExportedSpan]], bool], what: str, timeout_s: float
    ) -> list[ExportedSpan]:
        """The spans once ``predicate`` holds of them, polled up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.spans()
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted({(s.service, s.name) for s in spans})
                raise AssertionError(f"no {what} within {timeout_s} s; the collector has {names}")
            time.sleep(POLL_INTERVAL_S)

    def running(self) -> Iterator[FakeCollector]:
        self._server.start()
        try:
            yield self
        finally:
            self._server.stop(None)
