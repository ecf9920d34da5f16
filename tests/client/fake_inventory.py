"""An in-process, scripted Inventory server for the client's policy tests.

Only ``Reserve`` and ``GetReservation`` do anything. Each attempt records its idempotency
key, then takes the next step of ``script`` (OK once the script is used up): a status is
answered without applying anything; ``AfterApply(status)`` applies the call, then answers
the status (a flush that committed but whose reply was lost: outcome unknown). A Reserve is
applied at most once per idempotency key (``applied`` counts): a retry is answered from the
fake's idempotency memory with the original answer, as the real owner does, and a retry that
arrives while the first is still being applied waits for it.

SKUs steer the timing: ``slow-*`` waits out its deadline and answers DEADLINE_EXCEEDED of
class retryable (the deadline passed before the work was applied: nothing applied), as the
real owner does; ``silent-*`` is never answered; ``slowflush-*`` is applied only once the
test opens ``flush_gate``, whatever the caller's deadline (the apply is the fake's own task,
so a caller giving up does not stop it). The Batch stream is served by the real
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
from typing import TypeAlias

import grpc
from google.rpc import error_details_pb2, status_pb2
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


@dataclass(frozen=True)
class AfterApply:
    """A script step: apply the call, then answer ``status`` instead of the response."""

    status: status_pb2.Status


Step: TypeAlias = status_pb2.Status | AfterApply | None


@dataclass
class FakeInventory(pb_grpc.InventoryServicer):
    # Steps for the next attempts (Reserve and GetReservation), in order; None answers OK.
    script: deque[Step] = field(default_factory=deque)
    # Idempotency key of every Reserve attempt (reservation id of a GetReservation), in
    # arrival order.
    keys_seen: list[str] = field(default_factory=list)
    # Times each idempotency key's Reserve was applied (never more than once).
    applied: Counter[str] = field(default_factory=Counter)
    streams_opened: int = 0
    streams_to_break: int = 0
    # Items per BatchRequest received, and the timeout_ms of every item.
    request_sizes: list[int] = field(default_factory=list)
    timeouts_ms: list[int] = field(default_factory=list)
    # BatchRequests received and not yet answered in full, and the most ever seen.
    requests_outstanding: int = 0
    requests_outstanding_max: int = 0
    # Seconds each OK Reserve takes (lets requests pile up).
    answer_delay_s: float = 0.0
    # A slowflush-* Reserve is applied once this is set, whatever its deadline.
    flush_gate: asyncio.Event = field(default_factory=asyncio.Event)
    # The idempotency memory: each key's first application, its answer once applied.
    _applying: dict[str, asyncio.Task[pb.ReserveResponse]] = field(default_factory=dict)

    def count(self, idempotency_key: str) -> int:
        return Counter(self.keys_seen)[idempotency_key]

    async def close(self) -> None:
        """End the applications still running (the fake owns them)."""
        for task in self._applying.values():
            task.cancel()
        await asyncio.gather(*self._applying.values(), return_exceptions=True)

    async def wait_applied(self, idempotency_key: str) -> None:
        """Until the Reserve with this key, already received, has been applied."""
        await asyncio.shield(self._applying[idempotency_key])

    def _next_step(self) -> Step:
        return self.script.popleft() if self.script else None

    async def _apply_once(self, request: pb.ReserveRequest) -> pb.ReserveResponse:
        task = self._applying.get(request.idempotency_key)
        if task is None:
            task = asyncio.create_task(self._apply(request))
            self._applying[request.idempotency_key] = task
        return await asyncio.shield(task)  # a caller giving up does not stop the apply

    async def _apply(self, request: pb.ReserveRequest) -> pb.ReserveResponse:
        if request.lines and request.lines[0].key.sku_id.startswith("slowflush-"):
            await self.flush_gate.wait()
        self.applied[request.idempotency_key] += 1
        reservation = pb.Reservation(
            reservation_id="r-" + request.idempotency_key,
            merchant_id=request.lines[0].key.merchant_id if request.lines else "",
            state=pb.RESERVATION_STATE_ACTIVE,
            lines=request.lines,
        )
        return pb.ReserveResponse(reservation=reservation)

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
            message = "deadline passed before the work was applied; nothing applied"
            raise Refused(errors.deadline_not_applied(message))
        step = self._next_step()
        if isinstance(step, status_pb2.Status):
            raise Refused(step)
        if self.answer_delay_s:
            await asyncio.sleep(self.answer_delay_s)
        answer = await self._apply_once(request)
        if isinstance(step, AfterApply):
            raise Refused(step.status)
        return answer

    async def get_reservation(
        self, request: pb.GetReservationRequest, deadline: float | None
    ) -> pb.GetReservationResponse:
        self.keys_seen.append(request.reservation_id)
        step = self._next_step()
        if isinstance(step, status_pb2.Status):
            raise Refused(step)
        assert step is None, "a read applies nothing"
        for key, task in self._applying.items():
            if "r-" + key == request.reservation_id and task.done():
                return pb.GetReservationResponse(reservation=task.result().reservation)
        message = f"reservation {request.reservation_id!r} not found"
        raise Refused(classed(grpc.StatusCode.NOT_FOUND, "final", "RESERVATION_NOT_FOUND", message))

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

    async def GetReservation(  # noqa: N802
        self, request: pb.GetReservationRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetReservationResponse:
        try:
            return await self.get_reservation(request, None)
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
        dispatch["get_reservation"] = self.get_reservation
        unanswered: dict[int, int] = {}  # a request's number -> its items not yet answered
        request_of: dict[int, int] = {}  # an item's id -> its request's number
        async for response in batching.serve_stream(
            self._recorded(requests, unanswered, request_of), dispatch, _refusal_status
        ):
            # A response carries whatever results were ready: parts of requests, or the ends
            # of several. A request is outstanding until its last item is answered.
            for result in response.results:
                number = request_of.pop(result.id)
                unanswered[number] -= 1
                if not unanswered[number]:
                    del unanswered[number]
                    self.requests_outstanding -= 1
            yield response

    async def _recorded(
        self,
        requests: AsyncIterator[pb.BatchRequest],
        unanswered: dict[int, int],
        request_of: dict[int, int],
    ) -> AsyncIterator[pb.BatchRequest]:
        async for request in requests:
            number = len(self.request_sizes)
            unanswered[number] = len(request.items)
            request_of.update((item.id, number) for item in request.items)
            self.request_sizes.append(len(request.items))
            self.timeouts_ms.extend(item.timeout_ms for item in request.items)
            self.requests_outstanding += 1
            self.requests_outstanding_max = max(
                self.requests_outstanding_max, self.requests_outstanding
            )
            yield request

    async def _unimplemented(self, request: object, deadline: float | None) -> None:
        message = "fake: Reserve and GetReservation only"
        raise Refused(errors.status(grpc.StatusCode.UNIMPLEMENTED, message))


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
        await fake.close()


def statuses(*codes: grpc.StatusCode) -> Iterator[status_pb2.Status]:
    for code in codes:
        yield errors.status(code, f"fake {code.name}")


def classed(
    code: grpc.StatusCode, answer_class: str, reason: str, message: str
) -> status_pb2.Status:
    """A status as the service builds it: ErrorInfo with its reason and answer class."""
    info = error_details_pb2.ErrorInfo(
        reason=reason, domain=errors.DOMAIN, metadata={"answer_class": answer_class}
    )
    return errors.status(code, message, info)
