"""A shard restarted on the same address is reached again by the router's next calls.

The shard (a fake, on 127.0.0.1) stops while the router keeps calling it, so the router's
channel to it backs off as it would in production; then a new server listens on the same
port. The router's next calls, unary and batched, must be answered within
``ANSWERED_WITHIN_S`` of the restart: a correctness bound, not a performance figure (about
half a second is expected with SHARD_CHANNEL_OPTIONS).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import grpc
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from inventory_core import PARTITION_COUNT
from shard_router.router.routing import Routes
from shard_router.router.service import RouterService

from .fake_shard import FakeShard, fake_shard, reserve_request, serving

WAIT_S = 30.0
ANSWERED_WITHIN_S = 3.0
# How long the shard stays down while the router keeps calling it.
DOWN_S = 1.5
CALL_WHILE_DOWN_TIMEOUT_S = 0.3


@dataclass(frozen=True)
class Member:
    shard_id: str
    address: str


async def start(shard: FakeShard, port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    pb_grpc.add_InventoryServicer_to_server(shard, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    assert bound, f"could not listen on 127.0.0.1:{port}"
    await server.start()
    return server, bound


async def batch_reserve(router: pb_grpc.InventoryStub, idempotency_key: str) -> pb.BatchItemResult:
    call = router.Batch()
    request = pb.BatchRequest()
    request.items.add(id=1, timeout_ms=int(WAIT_S * 1000)).reserve.CopyFrom(
        reserve_request(idempotency_key, "loc-1")
    )
    await call.write(request)
    response = await call.read()
    await call.done_writing()
    assert response is not grpc.aio.EOF
    [result] = response.results
    return result


def test_a_shard_restarted_on_the_same_port_answers_the_routers_next_calls() -> None:
    async def scenario() -> None:
        first, port = await start(fake_shard(), 0)
        second: grpc.aio.Server | None = None

        async def members() -> list[Member]:
            return [Member("shard-0", f"127.0.0.1:{port}")]

        routes = Routes(members, PARTITION_COUNT)
        await routes.refresh(force=True)
        try:
            async with (
                serving(RouterService(routes)) as router_address,
                grpc.aio.insecure_channel(router_address) as channel,
            ):
                router = pb_grpc.InventoryStub(channel)
                await router.Reserve(reserve_request("before", "loc-1"), timeout=WAIT_S)

                await first.stop(grace=None)
                down_until = time.monotonic() + DOWN_S
                while time.monotonic() < down_until:  # refused meanwhile: the channel backs off
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        request = reserve_request("while-down", "loc-1")
                        await router.Reserve(request, timeout=CALL_WHILE_DOWN_TIMEOUT_S)

                second, _ = await start(fake_shard(), port)
                restarted = time.monotonic()
                answer = await router.Reserve(reserve_request("after", "loc-1"), timeout=WAIT_S)
                result = await batch_reserve(router, "after-batch")
                answered_s = time.monotonic() - restarted
            assert answer.reservation.reservation_id == "after"
            assert result.reserve.reservation.reservation_id == "after-batch"
            assert answered_s < ANSWERED_WITHIN_S, f"answered {answered_s:.2f} s after the restart"
        finally:
            await routes.close()
            await first.stop(grace=None)
            if second is not None:
                await second.stop(grace=None)

    async def bounded() -> None:
        async with asyncio.timeout(WAIT_S):
            await scenario()

    asyncio.run(bounded())
