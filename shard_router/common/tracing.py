"""OpenTelemetry traces of every call, across client, router and shard (DESIGN section 12).

Off by default. Only a collector's address (``--otlp-endpoint``, INVENTORY_OTLP_ENDPOINT or
the standard OTEL_EXPORTER_OTLP_ENDPOINT) turns it on: ``traced`` then gives the process a
tracer provider of its own (service ``router`` or the shard's id; parent-based sampling at
``--trace-sample-ratio``), exporting by OTLP over gRPC through a BatchSpanProcessor whose
queue is bounded (``SPAN_QUEUE_MAX``: past it spans are dropped, never buffered), and shuts
it down when the process stops, exporting what is queued. Off, no provider and no exporter
exist: ``_on.tracer`` is None and every hook here returns after testing it.

The spans of one call, each the child of the one before, and how the context travels (W3C
``traceparent`` / ``tracestate``, the metadata ``calls.PROPAGATED_METADATA`` names):

    client    InventoryClient.<call>   the calling process's own provider (``client_tracer``);
                                       its traceparent rides in the call's gRPC metadata, or
                                       in its BatchItem's ``metadata`` on the Batch stream
    server    router: the call         one per unary RPC (``TracingInterceptor``), or per
                                       Batch item that carries a sampled traceparent
    client    router -> shard          the hop, one per attempt (``hop_span``); the BatchItem
                                       sent carries its traceparent
    server    shard: the item          as at the router (``item_span``)
    internal  ledger_flush             the owner's flush of the batch the call joined

Sampling is parent-based: a call that comes with a sampled traceparent is traced, one that
comes with an unsampled one is not, and of those that come with none a share (the ratio)
starts a trace where it enters: any unary call, and at a router (``item_roots``) Batch items
too. The draw is made before any span, so an unsampled call costs no span at all.

The router reaches a shard by items of one long-lived Batch stream, whose own metadata is
the stream's (the router's token), so each item carries its context in
``BatchItem.metadata``. Streams (Batch, Ingest.Stream, Watch) get no span of their own: they
live as long as their caller keeps them, and their items are the calls.

The hot path stays cheap: only an item that carries a *sampled* traceparent gets a span (a
span per item would cost more than the item: measured below). A router writes its
traceparent into an item only for a sampled hop, so an unsampled call's items (and every
call's, with tracing off) take the shard's callback path with no task and no span, unless
they carry other metadata (an x-request-id: the task path, as before). Measured
on two shared cores (tests/observability/measure_trace_cost.py, README "Traces"): off,
each hook costs 30-100 ns (under 0.5 us a call, ~0.2 % of a served reservation's ~225 us);
on, a call it does not trace costs the interceptor ~0.5 us; a recorded span ~50-70 us,
made, ended and encoded for OTLP, so a sampled reservation's spans (router call and hop,
shard item, its share of a flush) cost the servers ~160-200 us, about as much again as the
call: the default ratio (1 in 100, config.TRACE_SAMPLE_RATIO_DEFAULT) makes that ~1-2 %.

The flush: many calls share one flush, which is one piece of work, so it is one span, not
one per call: ``ledger_flush`` is the child of the batch's first traced call and links to
the batch's other traced calls (up to ``FLUSH_SPAN_LINKS_MAX``), with the records,
partitions and traced calls it held as attributes. A span per waiting call would show one
transaction as many, and add up to many times its real time in any sum over spans.

Nothing secret is recorded: the method, the merchant, counts and the status code; never a
token or any other metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

import grpc
import structlog
from google.protobuf.message import Message
from inventory.v1 import inventory_pb2 as pb
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.status import Status, StatusCode

from . import calls, rpcs
from .config import TracingConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

T = TypeVar("T")
log = structlog.get_logger(__name__)

# Spans ended and not yet exported. Past it the processor drops new ones (it never blocks a
# call): at 1,000 sampled calls a second (two spans each in a router or a shard) about one
# export period's worth, which exports of SPAN_EXPORT_BATCH_MAX at a time drain.
SPAN_QUEUE_MAX = 2048
SPAN_EXPORT_BATCH_MAX = 512
# How often queued spans are sent: a trace is at the collector within about a second.
SPAN_EXPORT_DELAY_MS = 1000
# One export's time (retries included); a stopping process waits at most this for its last.
SPAN_EXPORT_TIMEOUT_S = 2.0
# A flush's links to its batch's traced calls besides its parent: a batch of 2,000 sampled
# calls would otherwise make a span of 2,000 links.
FLUSH_SPAN_LINKS_MAX = 32
# The gRPC codes that are the server's fault (OpenTelemetry's rule for a server span's
# status): a refusal the caller earned (INVALID_ARGUMENT, FAILED_PRECONDITION) is not.
_SERVER_ERRORS = "UNKNOWN DEADLINE_EXCEEDED UNIMPLEMENTED INTERNAL UNAVAILABLE DATA_LOSS"
SERVER_ERROR_CODES = frozenset(grpc.StatusCode[name].value[0] for name in _SERVER_ERRORS.split())
_CODE_NAMES: Mapping[int, str] = {code.value[0]: code.name for code in grpc.StatusCode}
OK = grpc.StatusCode.OK.value[0]
CANCELLED = grpc.StatusCode.CANCELLED.value[0]

_PROPAGATOR = TraceContextTextMapPropagator()
# Which calls start a trace: not the core's randomness, nothing to replay.
_random = random.Random()
_ODD_HEX_DIGITS = frozenset("13579bdf")
_PACKAGE = pb.DESCRIPTOR.package
# Each unary RPC by its path, and each call's span name (as the unary RPC's path).
_UNARY_PATHS: Mapping[str, rpcs.Rpc[Any, Any]] = {
    f"/{_PACKAGE}.{rpc.service}/{rpc.method}": rpc for rpc in rpcs.UNARY
}
_SPAN_NAMES: Mapping[str, str] = {
    rpc.field: f"{_PACKAGE}.{rpc.service}/{rpc.method}" for rpc in rpcs.UNARY
}


class _Tracing:
    """This process's tracer while tracing is on (``traced``; None: off), and how it starts
    traces of calls that come without one."""

    tracer: trace.Tracer | None = None
    # The share of those calls that start a trace here (--trace-sample-ratio).
    ratio: float = 0.0
    # Whether Batch items start traces here too: at a router, where they enter. A shard's
    # items come from a router, which has decided (an item without a trace stays untraced).
    item_roots: bool = False


_on = _Tracing()

Answer = Callable[[pb.BatchItemResult], None]


# ------------------------------------------------------------------------ the provider


@contextlib.contextmanager
def traced(
    config: TracingConfig,
    service_name: str,
    exporter: SpanExporter | None = None,
    *,
    item_roots: bool = False,
) -> Iterator[Any]:
    """Tracing on for the block (a process's whole run) when ``config`` names a collector,
    its spans exported by the end. ``item_roots``: Batch items without a trace start one
    here (a router). ``exporter``: another destination (tests). Yields the provider (None
    when off), for a test to flush."""
    if not config.otlp_endpoint and exporter is None:
        yield None
        return
    provider = _provider(config, service_name, exporter)
    _on.tracer = provider.get_tracer(__name__)
    _on.ratio, _on.item_roots = config.sample_ratio, item_roots
    shown = config.otlp_endpoint.rpartition("@")[2]  # never a password in a URL
    log.info("tracing_enabled", otlp_endpoint=shown, sample_ratio=config.sample_ratio)
    try:
        yield provider
    finally:
        _on.tracer, _on.ratio, _on.item_roots = None, 0.0, False
        provider.shutdown()  # exports what is queued, within SPAN_EXPORT_TIMEOUT_S


def _provider(config: TracingConfig, service_name: str, exporter: SpanExporter | None) -> Any:
    # Imported here: a process that does not trace (and the client library) never loads
    # the SDK or the exporter.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = config.otlp_endpoint
        exporter = OTLPSpanExporter(
            endpoint=endpoint,
            insecure=not endpoint.startswith("https://"),
            timeout=SPAN_EXPORT_TIMEOUT_S,
        )
    resource = Resource.create(
        {"service.name": service_name, "service.namespace": "inventory"}
    )  # with OTEL_RESOURCE_ATTRIBUTES, and the SDK's own (process, language, version)
    # Parent-based; a trace that starts here was drawn at the ratio before its span was
    # made (``_starts_trace``), so an unsampled call costs no span at all.
    provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=SPAN_QUEUE_MAX,
            schedule_delay_millis=SPAN_EXPORT_DELAY_MS,
            max_export_batch_size=SPAN_EXPORT_BATCH_MAX,
            export_timeout_millis=SPAN_EXPORT_TIMEOUT_S * 1000,
        )
    )
    return provider


# ---------------------------------------------------------------------- server spans


class TracingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """A server span for every unary RPC, continuing the caller's trace. Put first, it
    covers the authentication interceptor's refusals too."""

    async def intercept_service(
        self,
        continuation: calls.Continuation,
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        rpc = _UNARY_PATHS.get(details.method)
        tracer = _on.tracer
        if handler is None or rpc is None or tracer is None:
            return handler
        metadata = calls.propagated(details.invocation_metadata or ())
        parent = _parent(metadata, roots=True)
        if parent is None:  # not sampled: served as it is, no span
            return handler
        behavior = handler.unary_unary
        assert behavior is not None, details.method

        async def traced_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            span = tracer.start_span(
                _SPAN_NAMES[rpc.field],
                context=parent,
                kind=SpanKind.SERVER,
                attributes=_attributes(rpc, request),
            )
            token = otel_context.attach(trace.set_span_in_context(span))
            code = OK
            try:
                return await behavior(request, context)
            except BaseException:
                code = _code_of(context)
                raise
            finally:
                otel_context.detach(token)
                _end_server(span, code, metadata)

        return grpc.unary_unary_rpc_method_handler(
            traced_call, handler.request_deserializer, handler.response_serializer
        )


def interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The server interceptors of tracing: none when it is off."""
    return [] if _on.tracer is None else [TracingInterceptor()]


def item_span(field: str, metadata: Mapping[str, str], request: Message) -> Span | None:
    """A server span for one Batch item, when it carries a sampled traceparent, or starts a
    trace here (``item_roots``); None otherwise (tracing off, an unsampled item, an untraced
    one at a shard: a test or two is all it costs)."""
    if _on.tracer is None:
        return None
    parent = _parent(metadata, roots=_on.item_roots)
    if parent is None:
        return None
    rpc = rpcs.BY_FIELD[field]
    return _on.tracer.start_span(
        _SPAN_NAMES[field],
        context=parent,
        kind=SpanKind.SERVER,
        attributes={**_attributes(rpc, request), "inventory.batch_item": True},
    )


def serve_item(item: pb.BatchItem, answer: Answer) -> tuple[Span | None, Answer]:
    """The router's server span of a Batch item it forwards (``item_span``), the item's
    traceparent now naming it, and the answer that ends it; ``answer`` itself if untraced."""
    if _on.tracer is None:
        return None, answer
    field = item.WhichOneof("call")
    span = None if field is None else item_span(field, item.metadata, getattr(item, field))
    if span is None:
        return None, answer
    _PROPAGATOR.inject(item.metadata, trace.set_span_in_context(span))
    metadata = dict(item.metadata)

    def answered(result: pb.BatchItemResult) -> None:
        _end_server(span, _result_code(result), metadata)
        answer(result)

    return span, answered


def end_item(span: Span | None, result: pb.BatchItemResult, metadata: Mapping[str, str]) -> None:
    if span is not None:
        _end_server(span, _result_code(result), metadata)


@overload
def within(span: Span | None, call: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T]: ...
@overload
def within(span: Span | None, call: Awaitable[T]) -> Awaitable[T]: ...
def within(span: Span | None, call: Awaitable[T]) -> Awaitable[T]:
    """``call``, run with ``span`` as the current span (the hops it makes are its children,
    its log lines carry its ids); ``call`` itself when there is no span."""
    if span is None:
        return call
    return _within(span, call)


async def _within(span: Span, call: Awaitable[T]) -> T:
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        return await call
    finally:
        otel_context.detach(token)


def _end_server(span: Span, code: int, metadata: Mapping[str, str]) -> None:
    """End a server span; a debug line says so when it is recorded, logged in it (so it
    carries its ids, telemetry.add_trace_ids), with the call's request id."""
    if not span.is_recording():  # not sampled: nothing to say
        span.end()
        return
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        log.debug(
            "call_traced",
            span=getattr(span, "name", ""),
            code=_code_name(code),
            **({"request_id": metadata["x-request-id"]} if "x-request-id" in metadata else {}),
        )
    finally:
        otel_context.detach(token)
    _end(span, code, error=code in SERVER_ERROR_CODES)


# -------------------------------------------------------------------------- the hop


def hop_span(item: pb.BatchItem, address: str, parent: Span | None = None) -> Span | None:
    """The router's hop of ``item`` to the shard at ``address``: a client span, child of
    ``parent`` (else of the current span) when that one is sampled, whose traceparent the
    item then carries. None (and the item unchanged) otherwise."""
    if _on.tracer is None:
        return None
    parent = parent or trace.get_current_span()
    if not parent.is_recording():
        return None
    field = item.WhichOneof("call") or ""
    span = _on.tracer.start_span(
        _SPAN_NAMES.get(field, field),
        context=trace.set_span_in_context(parent),
        kind=SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "server.address": address, "inventory.hop": "shard"},
    )
    _PROPAGATOR.inject(item.metadata, trace.set_span_in_context(span))
    return span


def end_hop(span: Span | None, result: pb.BatchItemResult | None) -> None:
    """End a hop span with its result's code (None: the caller stopped waiting)."""
    if span is not None:
        code = CANCELLED if result is None else _result_code(result)
        _end(span, code, error=code != OK)


def ending_hop(span: Span | None, answer: Answer) -> Answer:
    """``answer``, ending the hop span first (the Batch path's callback)."""
    if span is None:
        return answer

    def answered(result: pb.BatchItemResult) -> None:
        end_hop(span, result)
        answer(result)

    return answered


# ------------------------------------------------------------------------- the flush


def sampled_call() -> SpanContext | None:
    """The sampled span of the call being served here, if any: what a flush that holds its
    work is the child of, or links to."""
    if _on.tracer is None:
        return None
    span_context = trace.get_current_span().get_span_context()
    return span_context if span_context.trace_flags.sampled else None


@contextlib.contextmanager
def flush_span(
    traced_calls: Iterable[SpanContext | None], records: int, partitions: int
) -> Iterator[None]:
    """The ``ledger_flush`` span, when a traced call waits for this flush (module
    docstring): the first one's child, linked to the others."""
    found = [] if _on.tracer is None else [c for c in traced_calls if c is not None]
    if _on.tracer is None or not found:
        yield
        return
    parent = trace.set_span_in_context(NonRecordingSpan(found[0]))
    links = [Link(c) for c in found[1 : FLUSH_SPAN_LINKS_MAX + 1]]
    attributes = {
        "inventory.flush.records": records,
        "inventory.flush.partitions": partitions,
        "inventory.flush.traced_calls": len(found),
    }
    with _on.tracer.start_as_current_span(
        "ledger_flush", context=parent, kind=SpanKind.INTERNAL, links=links, attributes=attributes
    ):
        yield


# ------------------------------------------------------------------------ the client


def client_tracer(provider: trace.TracerProvider | None) -> trace.Tracer | None:
    """The calling process's tracer for the client's spans (its ``provider``, else its
    global one); None when it has set none up."""
    provider = provider or trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return provider.get_tracer("shard_router.client")


@contextlib.contextmanager
def client_call(
    tracer: trace.Tracer, rpc: rpcs.Rpc[Any, Any], request: Message, address: str
) -> Iterator[dict[str, str]]:
    """A client span around one call (all its attempts); yields the metadata that carries
    its context. An ``InventoryError`` (or any exception with a google.rpc ``status``) sets
    the span's code."""
    attributes = {**_attributes(rpc, request), "server.address": address}
    span = tracer.start_span(_SPAN_NAMES[rpc.field], kind=SpanKind.CLIENT, attributes=attributes)
    metadata: dict[str, str] = {}
    _PROPAGATOR.inject(metadata, trace.set_span_in_context(span))
    code = OK
    try:
        with trace.use_span(span, record_exception=False, set_status_on_exception=False):
            yield metadata
    except BaseException as error:
        status = getattr(error, "status", None)
        if isinstance(error, asyncio.CancelledError):
            code = CANCELLED
        elif isinstance(getattr(status, "code", None), int):
            code = status.code  # type: ignore[union-attr]
        else:
            code = grpc.StatusCode.UNKNOWN.value[0]
        raise
    finally:
        _end(span, code, error=code != OK)


# --------------------------------------------------------------------------- helpers


def detached() -> contextvars.Context:
    """A context for a task that outlives the call that starts it (a stream shared by many
    calls): without that call's metadata, log fields or span, which would otherwise mark
    everything the stream logs or starts for as long as it lives."""
    context = contextvars.copy_context()
    context.run(_forget_the_call)
    return context


def _forget_the_call() -> None:
    calls.request_metadata.set({})
    structlog.contextvars.unbind_contextvars("request_id", "traceparent")
    otel_context.attach(otel_context.Context())


def _parent(metadata: Mapping[str, str], *, roots: bool) -> otel_context.Context | None:
    """The context a server span of this call continues: its caller's, when sampled; an
    empty one when it starts a trace here (``roots`` and drawn at the ratio); None: no span."""
    traceparent = metadata.get("traceparent")
    if traceparent is None:
        return otel_context.Context() if roots and _starts_trace() else None
    return _PROPAGATOR.extract(metadata) if _sampled(traceparent) else None


def _starts_trace() -> bool:
    ratio = _on.ratio
    return ratio >= 1 or (ratio > 0 and _random.random() < ratio)


def _sampled(traceparent: str) -> bool:
    """Does the traceparent say sampled? Its flags' low bit, read without parsing it (an
    unsampled item pays only this; a sampled one is parsed and checked in full)."""
    return traceparent[-1:] in _ODD_HEX_DIGITS


def _attributes(rpc: rpcs.Rpc[Any, Any], request: Message) -> dict[str, Any]:
    """The span's attributes of a call: never a token, never an id of a key or reservation
    beyond the merchant."""
    attributes: dict[str, Any] = {
        "rpc.system": "grpc",
        "rpc.service": f"{_PACKAGE}.{rpc.service}",
        "rpc.method": rpc.method,
    }
    merchant_id = _merchant_of(request)
    if merchant_id:
        attributes["inventory.merchant_id"] = merchant_id
    for field in ("lines", "keys", "events", "legs"):
        if field in request.DESCRIPTOR.fields_by_name:
            attributes[f"inventory.{field}"] = len(getattr(request, field))
    return attributes


def _merchant_of(request: Message) -> str:
    fields = request.DESCRIPTOR.fields_by_name
    if "merchant_id" in fields:
        return str(getattr(request, "merchant_id"))  # noqa: B009 (a proto field by name)
    for name in ("key", "transfer"):
        if name in fields and request.HasField(name):
            return _merchant_of(getattr(request, name))
    for name in ("lines", "keys", "events"):
        if name in fields and getattr(request, name):
            return _merchant_of(getattr(request, name)[0])
    return ""


def _end(span: Span, code: int, *, error: bool) -> None:
    span.set_attribute("rpc.grpc.status_code", code)
    if error:
        span.set_status(Status(StatusCode.ERROR, _code_name(code)))
    span.end()


def _result_code(result: pb.BatchItemResult) -> int:
    return int(result.error.code) if result.WhichOneof("result") == "error" else OK


def _code_of(context: grpc.aio.ServicerContext) -> int:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return int(code.value[0])
    return code if isinstance(code, int) else int(grpc.StatusCode.UNKNOWN.value[0])


def _code_name(code: int) -> str:
    return _CODE_NAMES.get(code, str(code))
