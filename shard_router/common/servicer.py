"""The gRPC surface of ``inventory.v1.Inventory`` over a calls object, for shard and router.

A calls object has one method per call (``reserve(request, deadline)`` and so on, named as
the ``BatchItem`` oneof fields) that returns the response or raises ``Refusal``. This class
turns each into its unary RPC, generated from the one table of calls (``rpcs.UNARY``), and
serves the ``Batch`` stream over the same methods (or the calls object's own
``batch_handler``, built on the same conversions), so the two paths can never answer
differently. A call the calls object lacks (``reserve_order`` on a shard) is answered
UNIMPLEMENTED from the error table.

``IngestServicer`` serves ``inventory.v1.Ingest`` over the same calls object's ``ingest``:
``Send`` as its unary call, ``Stream`` as one such call per request (common/ingest.py).
``serve_inventory`` adds both services to a server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from . import access, batching, errors, ingest, rpcs
from .calls import abort, deadline_of, refusal_status, unary

# The services a shard or router serves over its calls object (health and reflection name
# them).
SERVICE_NAMES = tuple(
    pb.DESCRIPTOR.services_by_name[name].full_name
    for name in (rpcs.INVENTORY, rpcs.INGEST_SERVICE, rpcs.HOT_KEYS)
)

# The generated servicer's stub declares every RPC abstract, so a class whose RPCs are
# generated from the table (rather than spelled out here a second time) would read as
# abstract to mypy: it sees the base as Any. At run time it is the generated class.
_GeneratedServicer: Any = pb_grpc.InventoryServicer
_GeneratedIngestServicer: Any = pb_grpc.IngestServicer
_GeneratedHotKeysServicer: Any = pb_grpc.HotKeysServicer


class CallsServicer(_GeneratedServicer):  # type: ignore[misc]
    def __init__(self, calls: Any) -> None:
        self._calls = calls
        # The Batch stream: a task per item through the calls object, unless the calls
        # object offers ``batch_handler(others)`` (shard and router: their common items by
        # callback, with no task per item; the rest through ``others``).
        others = batching.tasks_per_item(batching.dispatch_table(calls), refusal_status)
        make_handler = getattr(calls, "batch_handler", None)
        self._handler: batching.ItemHandler = make_handler(others) if make_handler else others

    @property
    def calls(self) -> Any:
        return self._calls

    async def Batch(
        self, requests: AsyncIterator[pb.BatchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BatchResponse]:
        principal = access.caller.get()
        handler = self._handler
        if principal is not None:
            handler = access.guard_items(handler, principal)
        async for response in batching.serve_items(requests, handler):
            yield response


class IngestServicer(_GeneratedIngestServicer):  # type: ignore[misc]
    """``inventory.v1.Ingest`` over a calls object's ``ingest(request, deadline)``."""

    def __init__(self, calls: Any) -> None:
        self._calls = calls

    async def Send(
        self, request: pb.IngestRequest, context: grpc.aio.ServicerContext
    ) -> pb.IngestResponse:
        call = self._calls.ingest(request, deadline_of(context))
        response: pb.IngestResponse = await unary(context, call, mutating=True)
        return response

    async def Stream(
        self, requests: AsyncIterator[pb.IngestRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.IngestResponse]:
        call = self._calls.ingest
        principal = access.caller.get()
        if principal is not None:
            call = access.guard_call(principal, rpcs.INGEST.field, call)
        async for response in ingest.serve_stream(requests, call):
            yield response


class HotKeysServicer(_GeneratedHotKeysServicer):  # type: ignore[misc]
    """``inventory.v1.HotKeys`` over the same calls object (its unary calls from the table)."""

    def __init__(self, calls: Any) -> None:
        self._calls = calls


def serve_inventory(server: grpc.aio.Server, servicer: CallsServicer) -> None:
    """Add ``Inventory`` (``servicer``), and ``Ingest`` and ``HotKeys`` over its calls, to
    ``server``."""
    pb_grpc.add_InventoryServicer_to_server(servicer, server)
    pb_grpc.add_IngestServicer_to_server(IngestServicer(servicer.calls), server)
    pb_grpc.add_HotKeysServicer_to_server(HotKeysServicer(servicer.calls), server)


UnaryMethod = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _unary_method(rpc: rpcs.Rpc[Any, Any], owner: str) -> UnaryMethod:
    async def method(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        handler = getattr(self._calls, rpc.field, None)
        if handler is None:
            message = f"{rpc.method} is not served here (ReserveOrder is served by the router)"
            await abort(context, errors.unimplemented(message))
        return await unary(context, handler(request, deadline_of(context)), mutating=rpc.mutating)

    method.__name__ = rpc.method
    method.__qualname__ = f"{owner}.{rpc.method}"
    method.__doc__ = f"The unary {rpc.method}: ``calls.{rpc.field}(request, deadline)``."
    return method


_SERVICERS: dict[str, type[Any]] = {rpcs.INVENTORY: CallsServicer, rpcs.HOT_KEYS: HotKeysServicer}
for _rpc in rpcs.UNARY:
    if _rpc.service in _SERVICERS:
        _servicer = _SERVICERS[_rpc.service]
        setattr(_servicer, _rpc.method, _unary_method(_rpc, _servicer.__name__))
