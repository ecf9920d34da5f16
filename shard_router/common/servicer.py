"""The gRPC surface of ``inventory.v1.Inventory`` over a calls object, for shard and router.

A calls object has one method per call (``reserve(request, deadline)`` and so on, named as
the ``BatchItem`` oneof fields) that returns the response or raises ``Refusal``. This class
turns each into its unary RPC and serves the ``Batch`` stream over the same methods, so the
two paths can never answer differently.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from . import batching
from .calls import deadline_of, refusal_status, unary


class CallsServicer(pb_grpc.InventoryServicer):
    def __init__(self, calls: Any) -> None:
        self._calls = calls
        self._dispatch = batching.dispatch_table(calls)

    async def GetAvailability(
        self, request: pb.GetAvailabilityRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAvailabilityResponse:
        return await unary(context, self._calls.get_availability(request, deadline_of(context)))

    async def Reserve(
        self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReserveResponse:
        return await unary(context, self._calls.reserve(request, deadline_of(context)))

    async def Commit(
        self, request: pb.CommitRequest, context: grpc.aio.ServicerContext
    ) -> pb.CommitResponse:
        return await unary(context, self._calls.commit(request, deadline_of(context)))

    async def Release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseResponse:
        return await unary(context, self._calls.release(request, deadline_of(context)))

    async def ExtendReservation(
        self, request: pb.ExtendReservationRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExtendReservationResponse:
        return await unary(context, self._calls.extend_reservation(request, deadline_of(context)))

    async def GetReservation(
        self, request: pb.GetReservationRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetReservationResponse:
        return await unary(context, self._calls.get_reservation(request, deadline_of(context)))

    async def AdjustStock(
        self, request: pb.AdjustStockRequest, context: grpc.aio.ServicerContext
    ) -> pb.AdjustStockResponse:
        return await unary(context, self._calls.adjust_stock(request, deadline_of(context)))

    async def SetStock(
        self, request: pb.SetStockRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetStockResponse:
        return await unary(context, self._calls.set_stock(request, deadline_of(context)))

    async def SetSafetyStock(
        self, request: pb.SetSafetyStockRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetSafetyStockResponse:
        return await unary(context, self._calls.set_safety_stock(request, deadline_of(context)))

    async def ReserveOrder(
        self, request: pb.ReserveOrderRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReserveOrderResponse:
        """Orders across locations span owners: only the router runs them (as a saga)."""
        message = "ReserveOrder is served by the router, not by a shard"
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
        raise AssertionError("abort returned")

    async def Batch(
        self, requests: AsyncIterator[pb.BatchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BatchResponse]:
        async for response in batching.serve_stream(requests, self._dispatch, refusal_status):
            yield response
