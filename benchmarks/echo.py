"""The bare gRPC ceiling: a grpc.aio server that answers from memory, no state, no IO.

``python -m benchmarks.echo --listen 127.0.0.1:PORT`` serves the Inventory API with canned
answers: Reserve echoes its lines back as an active reservation whose id is the idempotency
key, GetAvailability answers one empty level per key, Commit and Release answer the
reservation, and Batch answers every item of a message in one message. Whatever this reaches
is the most one Python process can serve over this stack; the service's figures are shown
as a share of it.

``EchoServer`` runs it as a child process, bounded start and stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from .targets.redis_lua import free_port

ECHO_START_TIMEOUT_S = 30.0
ECHO_STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
# Requests the server accepts at once; far above any closed loop the harness runs.
CONCURRENT_RPCS_MAX = 100_000


def _reservation(merchant_id: str, reservation_id: str) -> pb.Reservation:
    return pb.Reservation(
        reservation_id=reservation_id,
        merchant_id=merchant_id,
        state=pb.RESERVATION_STATE_ACTIVE,
    )


def reserve(request: pb.ReserveRequest) -> pb.ReserveResponse:
    first = request.lines[0].key if request.lines else pb.InventoryKey()
    reservation = pb.Reservation(
        reservation_id=request.idempotency_key,
        merchant_id=first.merchant_id,
        location_id=first.location_id,
        lines=request.lines,
        state=pb.RESERVATION_STATE_ACTIVE,
    )
    return pb.ReserveResponse(reservation=reservation)


def get_availability(request: pb.GetAvailabilityRequest) -> pb.GetAvailabilityResponse:
    return pb.GetAvailabilityResponse(levels=[pb.StockLevel(key=k) for k in request.keys])


def answer_item(item: pb.BatchItem) -> pb.BatchItemResult:
    call = item.WhichOneof("call")
    if call == "reserve":
        return pb.BatchItemResult(id=item.id, reserve=reserve(item.reserve))
    if call == "get_availability":
        return pb.BatchItemResult(
            id=item.id, get_availability=get_availability(item.get_availability)
        )
    if call == "commit":
        reservation = _reservation(item.commit.merchant_id, item.commit.reservation_id)
        return pb.BatchItemResult(id=item.id, commit=pb.CommitResponse(reservation=reservation))
    if call == "release":
        reservation = _reservation(item.release.merchant_id, item.release.reservation_id)
        return pb.BatchItemResult(id=item.id, release=pb.ReleaseResponse(reservation=reservation))
    if call == "set_stock":
        return pb.BatchItemResult(id=item.id, set_stock=pb.SetStockResponse())
    return pb.BatchItemResult(id=item.id, get_reservation=pb.GetReservationResponse())


async def _reserve(request: pb.ReserveRequest, context: object) -> pb.ReserveResponse:
    return reserve(request)


async def _get_availability(
    request: pb.GetAvailabilityRequest, context: object
) -> pb.GetAvailabilityResponse:
    return get_availability(request)


async def _commit(request: pb.CommitRequest, context: object) -> pb.CommitResponse:
    return pb.CommitResponse(reservation=_reservation(request.merchant_id, request.reservation_id))


async def _release(request: pb.ReleaseRequest, context: object) -> pb.ReleaseResponse:
    return pb.ReleaseResponse(reservation=_reservation(request.merchant_id, request.reservation_id))


async def _set_stock(request: pb.SetStockRequest, context: object) -> pb.SetStockResponse:
    return pb.SetStockResponse()


async def _batch(
    requests: AsyncIterator[pb.BatchRequest], context: object
) -> AsyncIterator[pb.BatchResponse]:
    async for request in requests:
        yield pb.BatchResponse(results=[answer_item(item) for item in request.items])


def _unary(behaviour: object, request_type: Any, response_type: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        behaviour,
        request_deserializer=request_type.FromString,
        response_serializer=response_type.SerializeToString,
    )


def handler() -> grpc.GenericRpcHandler:
    """The RPCs the harness calls; any other method is UNIMPLEMENTED (as for a real server
    that lacks it), so the echo needs no change when the API grows."""
    return grpc.method_handlers_generic_handler(
        "inventory.v1.Inventory",
        {
            "Reserve": _unary(_reserve, pb.ReserveRequest, pb.ReserveResponse),
            "GetAvailability": _unary(
                _get_availability, pb.GetAvailabilityRequest, pb.GetAvailabilityResponse
            ),
            "Commit": _unary(_commit, pb.CommitRequest, pb.CommitResponse),
            "Release": _unary(_release, pb.ReleaseRequest, pb.ReleaseResponse),
            "SetStock": _unary(_set_stock, pb.SetStockRequest, pb.SetStockResponse),
            "Batch": grpc.stream_stream_rpc_method_handler(
                _batch,
                request_deserializer=pb.BatchRequest.FromString,
                response_serializer=pb.BatchResponse.SerializeToString,
            ),
        },
    )


async def serve(listen: str) -> None:
    server = grpc.aio.server(maximum_concurrent_rpcs=CONCURRENT_RPCS_MAX)
    server.add_generic_rpc_handlers((handler(),))
    server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(stop_signal, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.echo", description="In-memory echo of the Inventory API."
    )
    parser.add_argument("--listen", required=True, help="host:port, loopback (127.0.0.1:PORT)")
    options = parser.parse_args(argv)
    if not options.listen.startswith("127.0.0.1:"):
        parser.error("--listen must be on 127.0.0.1")
    asyncio.run(serve(options.listen))


class EchoServer:
    """``python -m benchmarks.echo`` as a child process on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.echo", "--listen", self.address],
            stdin=subprocess.DEVNULL,
        )
        deadline_s = time.monotonic() + ECHO_START_TIMEOUT_S
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.InventoryStub(channel)
            while time.monotonic() < deadline_s:
                if self._process.poll() is not None:
                    break
                with contextlib.suppress(grpc.RpcError):
                    stub.GetAvailability(
                        pb.GetAvailabilityRequest(keys=[pb.InventoryKey()]), timeout=1.0
                    )
                    return
                time.sleep(POLL_INTERVAL_S)
        self.stop()
        raise RuntimeError(f"echo server on {self.address} did not start")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(ECHO_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(ECHO_STOP_TIMEOUT_S)


if __name__ == "__main__":
    main()
