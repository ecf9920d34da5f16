"""An in-process, scripted Inventory server for the client's policy tests.

Only ``Reserve`` does anything: each attempt records its idempotency key, then answers with
the next status of ``script`` (OK once the script is used up). SKUs steer the timing:
``slow-*`` waits out its deadline and answers DEADLINE_EXCEEDED, as the real owner does;
``silent-*`` is never answered. The Batch stream is served by the real
``shard_router.common.batching.serve_stream`` over these calls, so the client meets the
shard's own stream loop; ``streams_to_break`` makes the next streams read one request and
close without answering it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from shard_router.common import batching, errors


class Refused(Exception):
    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


def _refusal_status(error: Exception) -> status_pb2.Status | None:
    return error.status if isinstance(error, Refused) else None


@dataclass
class FakeInventory(pb_grpc.InventoryServicer):
    # Statuses for the next Reserve attempts, in order; None answers OK.
    script: deque[status_pb2.Status | None] = field(default_factory=deque)
    # Idempotency key of every Reserve attempt, in arrival order.
    keys_seen: list[str] = field(default_factory=list)
    streams_opened: int = 0
    streams_to_break: int = 0
    # Items per BatchRequest received, and the timeout_ms of every item.
    request_sizes: list[int] = field(default_factory=list)
    timeouts_ms: list[int] = field(default_factory=list)
    # BatchRequests received but not yet answered on a stream, and the most ever seen.
    requests_outstanding: int = 0
    requests_outstanding_max: int = 0
    # Seconds each OK Reserve takes (lets requests pile up).
    answer_delay_s: float = 0.0

    def count(self, idempotency_key: str) -> int:
        return Counter(self.keys_seen)[idempotency_key]

    async def reserve(
        self, request: pb.ReserveRequest, deadline: float | None
    ) -> pb.ReserveResponse:
        self.keys_seen.append(request.idempotency_key)
        sku = request.lines[0].key.sku_id if request.lines else ""
        if sku.startswith("silent-"):
            await asyncio.Event().wait()
        if sku.startswith("slow-"):
            assert deadline is not None
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            message = "deadline passed; nothing applied"
            raise Refused(errors.status(grpc.StatusCode.DEADLINE_EXCEEDED, message))
        status = self.script.popleft() if self.script else None
        if status is not None:
            raise Refused(status)
        if self.answer_delay_s:
            await asyncio.sleep(self.answer_delay_s)
        reservation = pb.Reservation(
            reservation_id="r-" + request.idempotency_key,
            merchant_id=request.lines[0].key.merchant_id,
            state=pb.RESERVATION_STATE_ACTIVE,
            lines=request.lines,
        )
        return pb.ReserveResponse(reservation=reservation)

    async def Reserve(  # noqa: N802
        self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReserveResponse:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            return await self.reserve(request, deadline)
        except Refused as refused:
            await context.abort_with_status(rpc_status.to_status(refused.status))
            raise AssertionError("abort_with_status returned") from refused

    async def Batch(  # noqa: N802
        self, requests: AsyncIterator[pb.BatchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BatchResponse]:
        self.streams_opened += 1
        if self.streams_to_break:
            self.streams_to_break -= 1
            request = await anext(requests)
            for item in request.items:
                self.keys_seen.append(item.reserve.idempotency_key)
            return  # closes the stream with every item of the request unanswered
        dispatch: dict[str, batching.Call] = dict.fromkeys(
            batching.CALL_FIELDS, self._unimplemented
        )
        dispatch["reserve"] = self.reserve
        async for response in batching.serve_stream(
            self._recorded(requests), dispatch, _refusal_status
        ):
            self.requests_outstanding -= 1
            yield response

    async def _recorded(
        self, requests: AsyncIterator[pb.BatchRequest]
    ) -> AsyncIterator[pb.BatchRequest]:
        async for request in requests:
            self.request_sizes.append(len(request.items))
            self.timeouts_ms.extend(item.timeout_ms for item in request.items)
            self.requests_outstanding += 1
            self.requests_outstanding_max = max(
                self.requests_outstanding_max, self.requests_outstanding
            )
            yield request

    async def _unimplemented(self, request: object, deadline: float | None) -> None:
        raise Refused(errors.status(grpc.StatusCode.UNIMPLEMENTED, "fake: reserve only"))


def fake_inventory(**options: object) -> FakeInventory:
    """A FakeInventory; the calls it does not script answer UNIMPLEMENTED (the generated
    servicer's defaults, which its .pyi declares abstract)."""
    return FakeInventory(**options)  # type: ignore[abstract, arg-type]


@asynccontextmanager
async def serving(fake: FakeInventory) -> AsyncIterator[str]:
    """Serve ``fake`` on a loopback port for the block; yields the address."""
    server = grpc.aio.server()
    pb_grpc.add_InventoryServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


def statuses(*codes: grpc.StatusCode) -> Iterator[status_pb2.Status]:
    for code in codes:
        yield errors.status(code, f"fake {code.name}")
