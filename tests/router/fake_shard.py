"""An in-process shard for the router's tests: the real ``serve_stream`` over scripted calls.

``Reserve`` answers a reservation whose id is the idempotency key. SKUs steer it:
``hold-*`` waits until the test sets ``release``; ``silent-*`` is never answered;
``moved-*`` is answered NOT_OWNER (UNAVAILABLE) on its first attempt, then served.
``GetAvailability`` answers one level per key (never, if a key's SKU is ``silent-*``). Every
BatchRequest read is recorded (``requests``) with the metadata and timeout of its items;
``break_streams`` makes the next streams read one request and, once the test sets
``break_now``, end without answering it.
Served on a loopback port by ``serving``, which can serve again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from shard_router.common import batching, errors
from shard_router.common.calls import Refusal, refusal_status

MERCHANT = "m-1"


def key(location: str, sku: str = "rice") -> pb.InventoryKey:
    return pb.InventoryKey(merchant_id=MERCHANT, sku_id=sku, location_id=location)


def reserve_request(idempotency_key: str, location: str, sku: str = "rice") -> pb.ReserveRequest:
    line = pb.ReservationLine(key=key(location, sku), quantity=1)
    return pb.ReserveRequest(idempotency_key=idempotency_key, lines=[line], ttl_s=60)


@dataclass
class FakeShard(pb_grpc.InventoryServicer):
    name: str = "shard"
    requests: list[pb.BatchRequest] = field(default_factory=list)
    attempts: Counter[str] = field(default_factory=Counter)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    break_streams: int = 0
    break_now: asyncio.Event = field(default_factory=asyncio.Event)
    streams_opened: int = 0

    read: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def items_seen(self) -> list[pb.BatchItem]:
        return [item for request in self.requests for item in request.items]

    async def requests_read(self, count: int) -> None:
        """Wait until ``count`` BatchRequests have been read."""
        while len(self.requests) < count:
            self.read.clear()
            await self.read.wait()

    def _note(self, request: pb.BatchRequest) -> None:
        self.requests.append(request)
        self.read.set()

    async def reserve(
        self, request: pb.ReserveRequest, deadline: float | None
    ) -> pb.ReserveResponse:
        key_ = request.idempotency_key
        self.attempts[key_] += 1
        sku = request.lines[0].key.sku_id
        if sku.startswith("hold-"):
            await self.release.wait()
        elif sku.startswith("silent-"):
            await asyncio.Event().wait()
        elif sku.startswith("moved-") and self.attempts[key_] == 1:
            raise Refusal(errors.not_owner(0, f"{self.name}: not the owner (fake)"))
        reservation = pb.Reservation(reservation_id=key_, merchant_id=MERCHANT)
        return pb.ReserveResponse(reservation=reservation)

    async def get_availability(
        self, request: pb.GetAvailabilityRequest, deadline: float | None
    ) -> pb.GetAvailabilityResponse:
        if any(k.sku_id.startswith("silent-") for k in request.keys):
            await asyncio.Event().wait()
        levels = [pb.StockLevel(key=k, on_hand=7) for k in request.keys]
        return pb.GetAvailabilityResponse(levels=levels)

    async def Batch(  # noqa: N802
        self, requests: AsyncIterator[pb.BatchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BatchResponse]:
        self.streams_opened += 1
        if self.break_streams:
            self.break_streams -= 1
            self._note(await anext(requests))
            await self.break_now.wait()
            return
        dispatch = batching.dispatch_table(self)
        async for response in batching.serve_stream(
            self._recorded(requests), dispatch, refusal_status
        ):
            yield response

    async def _recorded(
        self, requests: AsyncIterator[pb.BatchRequest]
    ) -> AsyncIterator[pb.BatchRequest]:
        async for request in requests:
            self._note(request)
            yield request


def fake_shard(**options: Any) -> FakeShard:
    """A FakeShard; the calls it does not script answer UNIMPLEMENTED."""
    return cast(FakeShard, FakeShard(**options))  # type: ignore[abstract]


@contextlib.asynccontextmanager
async def serving(servicer: object, port: int = 0) -> AsyncIterator[str]:
    """Serve on 127.0.0.1 (``port`` 0: any free one) for the block; yields the address."""
    server = grpc.aio.server()
    pb_grpc.add_InventoryServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    assert bound, f"could not listen on 127.0.0.1:{port}"
    await server.start()
    try:
        yield f"127.0.0.1:{bound}"
    finally:
        await server.stop(grace=None)
