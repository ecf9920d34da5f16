"""What checking callers costs per call: CPU µs, with and without the interceptor.

    python -m tests.security.measure_auth_cost [--calls 5000]

One process serves the Inventory service over a calls object that answers at once (so the
figures are the gRPC path and the check, nothing of the owner) and calls it on loopback:
unary Reserve calls, then one-line Reserve items on a Batch stream (the path the client
and the router use), each with a cached token (the steady state) and with none
(``--no-auth``). Printed: process CPU µs per call for each, the difference, and the
difference as a share of what a reservation costs the servers on the real path (README,
"Measured": ~225 µs per one-line reservation across router, shard and PostgreSQL). Also the
verifier alone (a cached token, and a signature check on a miss) and the interceptor alone
(``interceptor_path_us``): a unary call on loopback moves by ±40 µs between rounds of the
same server on a shared 2-core machine, more than the check costs, so the interceptor's own
figure is the one to quote.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import timeit
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace

import grpc
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from shard_router.common import access
from shard_router.common.access import Role
from shard_router.common.auth import AuthInterceptor
from shard_router.common.calls import bearer
from shard_router.common.server import create_server
from shard_router.common.servicer import SERVICE_NAMES, CallsServicer, serve_inventory
from shard_router.common.tokens import Keyring, LocalKeys, Verifier
from tests.security.test_isolation_matrix import RecordingCalls, reserve

# The servers' CPU per one-line reservation through router, shard and PostgreSQL (README).
SERVED_RESERVATION_US = 225.0


async def measure(calls_count: int, guard: AuthInterceptor | None, token: str) -> dict[str, float]:
    return await measure_calls(
        calls_count, [guard] if guard else [], bearer(token) if token else ()
    )


async def measure_calls(
    calls_count: int,
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    metadata: Sequence[tuple[str, str]],
    item_metadata: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """CPU µs per unary Reserve and per Batch item, served through ``interceptors``, the
    calls sent with ``metadata`` (and each item with ``item_metadata``)."""
    server, _, port = create_server("127.0.0.1:0", SERVICE_NAMES, interceptors)
    serve_inventory(server, CallsServicer(RecordingCalls()))
    await server.start()
    request = reserve("m-1")
    figures: dict[str, float] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InventoryStub(channel)
            for _ in range(200):  # warm up
                await stub.Reserve(request, metadata=metadata or None)
            started = time.process_time()
            for _ in range(calls_count):
                await stub.Reserve(request, metadata=metadata or None)
            figures["unary_us"] = (time.process_time() - started) / calls_count * 1e6

            stream = stub.Batch(metadata=metadata or None)
            per_request = 100
            started = time.process_time()
            for chunk in range(calls_count // per_request):
                items = [
                    pb.BatchItem(
                        id=chunk * per_request + i + 1, reserve=request, metadata=item_metadata
                    )
                    for i in range(per_request)
                ]
                await stream.write(pb.BatchRequest(items=items))
                answered = 0
                while answered < per_request:
                    answered += len((await stream.read()).results)
            figures["batch_item_us"] = (time.process_time() - started) / calls_count * 1e6
            await stream.done_writing()
    finally:
        await server.stop(None)
    return figures


async def interceptor_path_us(
    interceptor: grpc.aio.ServerInterceptor,
    metadata: Sequence[tuple[str, str]] = (),
    count: int = 50_000,
) -> float:
    """An interceptor's own CPU µs per unary Reserve, without gRPC around it: its
    ``intercept_service`` and its wrapped behaviour, against the same calls without it.
    gRPC's own path (~300 µs a unary call on loopback, client included) moves by more than
    a few µs from round to round, so this is the figure that isolates the interceptor."""
    handler = grpc.unary_unary_rpc_method_handler(_answer)
    details = SimpleNamespace(
        method="/inventory.v1.Inventory/Reserve", invocation_metadata=tuple(metadata)
    )
    context = _Context()
    request = reserve("m-1")

    async def continuation(_: object) -> grpc.RpcMethodHandler:
        return handler

    started = time.process_time()
    for _ in range(count):
        found = await continuation(details)
        await found.unary_unary(request, context)
    bare = time.process_time() - started
    started = time.process_time()
    for _ in range(count):
        wrapped = await interceptor.intercept_service(continuation, details)
        await wrapped.unary_unary(request, context)
    return (time.process_time() - started - bare) / count * 1e6


class _Context:
    """What an interceptor's wrapped behaviour may ask of a context on an answered call."""

    def code(self) -> None:
        return None


async def _answer(request: object, context: object) -> object:
    return request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    options = parser.parse_args()
    keys = LocalKeys(Path(tempfile.mkdtemp(prefix="auth-cost-")))
    keys.ensure()
    token = keys.mint(Role.ORDER_SERVICE, ["m-1"])
    verifier = Verifier(Keyring(keys.jwks_path))
    header = "Bearer " + token
    principal = verifier.principal(header)
    request = reserve("m-1")
    cached_us = timeit.timeit(lambda: verifier.principal(header), number=20000) / 20000 * 1e6
    check_us = (
        timeit.timeit(lambda: access.refusal(principal, "reserve", request), number=20000)
        / 20000
        * 1e6
    )
    fresh = [keys.mint(Role.ORDER_SERVICE, ["m-1"], subject=f"s{i}") for i in range(200)]
    started = time.process_time()
    for minted in fresh:
        verifier.principal("Bearer " + minted)
    miss_us = (time.process_time() - started) / len(fresh) * 1e6

    guard = AuthInterceptor(Verifier(Keyring(keys.jwks_path)))
    path_us = asyncio.run(interceptor_path_us(guard, bearer(token)))

    rounds = []
    for _ in range(3):  # alternating, medians: the machine's speed moves between runs
        without = asyncio.run(measure(options.calls, None, ""))
        with_auth = asyncio.run(
            measure(options.calls, AuthInterceptor(Verifier(Keyring(keys.jwks_path))), token)
        )
        rounds.append((without, with_auth))

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    print(f"verifier, cached token: {cached_us:.2f} us; signature check (miss): {miss_us:.0f} us")
    print(f"access check of a one-line reserve: {check_us:.2f} us")
    print(
        f"interceptor, one unary call with a cached token: +{path_us:.2f} us of CPU "
        f"({100 * path_us / SERVED_RESERVATION_US:.1f} % of a served reservation's "
        f"{SERVED_RESERVATION_US:.0f} us)"
    )
    for name in ("unary_us", "batch_item_us"):
        off = median([r[0][name] for r in rounds])
        on = median([r[1][name] for r in rounds])
        extra = on - off
        print(
            f"{name[:-3]}: {off:.1f} us without auth, {on:.1f} us with (+{extra:.1f} us, "
            f"{100 * extra / off:.1f} % of this path; {100 * extra / SERVED_RESERVATION_US:.1f} "
            f"% of a served reservation's {SERVED_RESERVATION_US:.0f} us)"
        )


if __name__ == "__main__":
    main()
