"""What the per-call metrics cost: CPU µs per call, with and without them.

    python -m tests.observability.measure_metrics_cost [--calls 25000]

One process serves the Inventory service over a calls object that answers at once (so the
figures are the gRPC path and the metrics, nothing of the owner), twice: without metrics and
with them (the interceptor, and Batch items counted: ``--metrics-listen`` set). It calls
both on loopback in alternating rounds: unary Reserve calls, and one-line Reserve items on
a Batch stream (the path the router takes to the shard). A unary call costs ~300 us of CPU
(client and server in this process), so the interceptor's few us are measured apart as
well, without gRPC around it. Printed: the interceptor's CPU per call, the end-to-end
figures (fastest rounds), and what a one-line reservation served through router and shard
pays (a unary call at the router, an item at the shard) as a share of the ~225 us it costs
the servers (README, "Measured"), by both. On a shared 2-core machine the end-to-end unary
difference moved between +5 and +24 us from run to run (any interceptor that wraps the
handler, doing nothing, moved as much); the interceptor's own figure is stable (~2.4 us).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import timeit
from types import SimpleNamespace

import grpc
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from shard_router.common import batching, metrics
from shard_router.common.server import create_server
from shard_router.common.servicer import SERVICE_NAMES, CallsServicer, serve_inventory
from tests.security.measure_auth_cost import interceptor_path_us
from tests.security.test_isolation_matrix import RecordingCalls, reserve

# The servers' CPU per one-line reservation through router, shard and PostgreSQL (README).
SERVED_RESERVATION_US = 225.0
# Rounds of calls, alternating between the server without metrics and the one with them in
# one process, so that the machine's speed (shared, it moves by tens of µs a call between
# runs) weighs on both alike. The figures are the fastest round of each: on a machine
# shared with other work, the least disturbed one (medians move by +-50 us a unary call).
ROUNDS = 25
ITEMS_PER_REQUEST = 100


class Served:
    """A server on loopback and a stub to it; with or without the metrics."""

    def __init__(self, with_metrics: bool) -> None:
        self.with_metrics = with_metrics
        chain = metrics.call_interceptors("127.0.0.1:0") if with_metrics else []
        self.server, _, port = create_server("127.0.0.1:0", SERVICE_NAMES, observers=chain)
        serve_inventory(self.server, CallsServicer(RecordingCalls()))
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.InventoryStub(self.channel)

    async def unary_us(self, count: int) -> float:
        request = reserve("m-1")
        started = time.process_time()
        for _ in range(count):
            await self.stub.Reserve(request)
        return (time.process_time() - started) / count * 1e6

    async def batch_item_us(self, count: int) -> float:
        # A stream counts its items if the counter is set when it starts (batching._Served).
        batching.item_counter = metrics.BatchItemCounts() if self.with_metrics else None
        request = reserve("m-1")
        stream = self.stub.Batch()
        started = time.process_time()
        for chunk in range(count // ITEMS_PER_REQUEST):
            items = [
                pb.BatchItem(id=chunk * ITEMS_PER_REQUEST + i + 1, reserve=request)
                for i in range(ITEMS_PER_REQUEST)
            ]
            await stream.write(pb.BatchRequest(items=items))
            answered = 0
            while answered < ITEMS_PER_REQUEST:
                answered += len((await stream.read()).results)
        figure = (time.process_time() - started) / count * 1e6
        await stream.done_writing()
        await stream.read()
        return figure


async def measure(calls_count: int) -> dict[str, tuple[float, float]]:
    """Per figure: (without metrics, with), the fastest round of each."""
    served = [Served(with_metrics=False), Served(with_metrics=True)]
    rounds: dict[str, list[list[float]]] = {"unary_us": [[], []], "batch_item_us": [[], []]}
    for each in served:
        await each.server.start()
        await each.unary_us(200)  # warm up
    try:
        for _ in range(ROUNDS):
            for index, each in enumerate(served):
                rounds["unary_us"][index].append(await each.unary_us(calls_count // ROUNDS))
                figure = await each.batch_item_us(calls_count // ROUNDS)
                rounds["batch_item_us"][index].append(figure)
    finally:
        for each in served:
            await each.channel.close()
            await each.server.stop(None)
    return {name: (min(off), min(on)) for name, (off, on) in rounds.items()}


def counting_alone_us(count: int = 50_000) -> float:
    """The interceptor's work alone per call: two clock reads, an observation, a count."""
    method = metrics._Method("/inventory.v1.Inventory/Reserve")
    context = SimpleNamespace(code=lambda: None)

    def work() -> None:
        started = time.perf_counter()
        method.duration.observe(time.perf_counter() - started)
        method.ended(context, None)  # type: ignore[arg-type]

    return timeit.timeit(work, number=count) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=25000)
    options = parser.parse_args()
    path_us = asyncio.run(interceptor_path_us(metrics.MetricsInterceptor()))
    alone_us = counting_alone_us()
    print(f"interceptor, one unary call: +{path_us:.2f} us of CPU ({alone_us:.2f} us counting)")
    figures = asyncio.run(measure(options.calls))
    for name, (off, on) in figures.items():
        print(
            f"{name[:-3]} end to end: {off:.1f} us without metrics, {on:.1f} us with "
            f"(+{on - off:.1f} us)"
        )
    item_us = figures["batch_item_us"][1] - figures["batch_item_us"][0]
    unary_us = figures["unary_us"][1] - figures["unary_us"][0]
    for what, router_us in (("the interceptor's path", path_us), ("end to end", unary_us)):
        served_us = router_us + item_us
        print(
            f"a one-line reservation through router (a unary call) and shard (an item), "
            f"{what}: +{served_us:.1f} us, {100 * served_us / SERVED_RESERVATION_US:.1f} % of "
            f"its {SERVED_RESERVATION_US:.0f} us"
        )


if __name__ == "__main__":
    main()
