"""What tracing costs per call: CPU µs, off, on and unsampled, on and sampled.

    python -m tests.observability.measure_trace_cost [--calls 3000]

One process serves the Inventory service over a calls object that answers at once (so the
figures are the gRPC path and the tracing, nothing of the owner) and calls it on loopback:
unary Reserve calls, then one-line Reserve items on a Batch stream, each with tracing off
(no interceptor, no provider), on with the caller's trace unsampled, and on with it sampled
(a span per call, encoded for OTLP as the exporter would, then dropped: the collector's
side is not this process's cost). Printed: process CPU µs per call for each, the difference
to off, and that as a share of what a reservation costs the servers on the real path
(README, "Measured": ~225 µs across router, shard and PostgreSQL). Also each hook alone with
tracing off, and the router's two spans of a forwarded item (its server span and its hop).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import timeit
from collections.abc import Sequence

import grpc
from inventory.v1 import inventory_pb2 as pb
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from shard_router.common import tracing
from shard_router.common.config import TracingConfig
from shard_router.common.telemetry import configure_logging
from tests.security.measure_auth_cost import measure_calls
from tests.security.test_isolation_matrix import reserve

# The servers' CPU per one-line reservation through router, shard and PostgreSQL (README).
SERVED_RESERVATION_US = 225.0
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SAMPLED = {"traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-01"}
UNSAMPLED = {"traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-00"}
ITEMS_PER_REQUEST = 100


class EncodingExporter(SpanExporter):
    """Encodes spans as the OTLP exporter does, and sends them nowhere."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


async def measure(calls_count: int, metadata: dict[str, str]) -> dict[str, float]:
    """Unary calls and Batch items, served through tracing's interceptors (none when off),
    each carrying ``metadata``."""
    return await measure_calls(
        calls_count, tracing.interceptors(), tuple(metadata.items()), metadata
    )


def hooks_off_ns() -> dict[str, float]:
    """Each hook's cost with tracing off, as the hot path pays it."""
    item = pb.BatchItem(id=1, reserve=reserve("m-1"))
    count = 200_000

    def ns(statement: object) -> float:
        return timeit.timeit(statement, number=count) / count * 1e9  # type: ignore[arg-type]

    return {
        "serve_item": ns(lambda: tracing.serve_item(item, print)),
        "hop_span": ns(lambda: tracing.hop_span(item, "127.0.0.1:1")),
        "sampled_call": ns(tracing.sampled_call),
    }


def interceptor_us(metadata: dict[str, str]) -> float:
    """The interceptor's own work for one unary call that it does not trace (the gRPC loop
    above is too noisy, ±80 us between identical runs, to show it)."""
    count = 20_000
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: None)
    details = _Details("/inventory.v1.Inventory/Reserve", tuple(metadata.items()))
    interceptor = tracing.TracingInterceptor()

    async def continuation(_: object) -> grpc.RpcMethodHandler:
        return handler

    async def loop() -> float:
        started = time.process_time()
        for _ in range(count):
            await interceptor.intercept_service(continuation, details)
        return (time.process_time() - started) / count * 1e6

    return asyncio.run(loop())


class _Details(grpc.HandlerCallDetails):  # type: ignore[misc]
    def __init__(self, method: str, invocation_metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


def router_spans_us(exporter: EncodingExporter) -> float:
    """The router's server span and hop span of one sampled forwarded item, ended."""
    count = 5_000
    items = [pb.BatchItem(id=i, reserve=reserve("m-1"), metadata=SAMPLED) for i in range(count)]
    result = pb.BatchItemResult(id=1, reserve=pb.ReserveResponse())
    started = time.process_time()
    for item in items:
        server, answer = tracing.serve_item(item, lambda _: None)
        tracing.ending_hop(tracing.hop_span(item, "127.0.0.1:1", server), answer)(result)
    return (time.process_time() - started) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    configure_logging("info", "measure")  # as the servers log: no debug lines
    off_ns = hooks_off_ns()
    exporter = EncodingExporter()
    on = TracingConfig(otlp_endpoint="measure", sample_ratio=1.0)
    rounds = []
    for _ in range(options.rounds):  # alternating, medians: the machine's speed moves
        off = asyncio.run(measure(options.calls, {}))
        with tracing.traced(on, "measure", exporter):
            unsampled = asyncio.run(measure(options.calls, UNSAMPLED))
            sampled = asyncio.run(measure(options.calls, SAMPLED))
        rounds.append({"off": off, "unsampled": unsampled, "sampled": sampled})
    with tracing.traced(on, "measure", exporter):
        router_us = router_spans_us(exporter)
    with tracing.traced(TracingConfig("measure", sample_ratio=0.0), "measure", exporter):
        unsampled_us = interceptor_us(UNSAMPLED)
        untraced_us = interceptor_us({})

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    hooks = ", ".join(f"{name} {value:.0f} ns" for name, value in off_ns.items())
    print(f"hooks with tracing off: {hooks}")
    print(f"the router's two spans of a sampled forwarded item, made and ended: {router_us:.1f} us")
    print(
        f"the interceptor, a call it does not trace: {unsampled_us:.2f} us (caller unsampled), "
        f"{untraced_us:.2f} us (no trace, ratio 0)"
    )
    for name in ("unary_us", "batch_item_us"):
        base = median([r["off"][name] for r in rounds])
        line = [f"{name[:-3]}: off {base:.1f} us"]
        for case in ("unsampled", "sampled"):
            value = median([r[case][name] for r in rounds])
            extra = value - base
            line.append(
                f"{case} {value:.1f} us (+{extra:.1f} us, {100 * extra / SERVED_RESERVATION_US:.1f}"
                f" % of a served reservation)"
            )
        print("; ".join(line))
    print(f"spans encoded: {exporter.spans}")


if __name__ == "__main__":
    main()
