"""Bytes that are no request of their method are refused INVALID_ARGUMENT, naming the
method and the message type (shard_router.common.decoding), on every kind of call, with
authentication on or off; gRPC alone answers them UNKNOWN.

A real gRPC server on loopback, built by ``create_server`` as shard and router build theirs,
serves the Inventory services over a calls object that records what reaches it: nothing
does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from inventory.v1 import inventory_pb2 as pb

from shard_router.common.access import Role
from shard_router.common.auth import AuthInterceptor
from shard_router.common.calls import bearer
from shard_router.common.server import create_server
from shard_router.common.servicer import SERVICE_NAMES, CallsServicer, serve_inventory
from shard_router.common.tokens import Keyring, LocalKeys, Verifier

# Not a message of any type: a varint field whose value never ends.
GARBAGE = b"\x08" + b"\xff" * 11
CALL_TIMEOUT_S = 10.0


class Recorder:
    """A calls object that answers every call and records that it was reached."""

    def __init__(self) -> None:
        self.reached: list[str] = []

    def __getattr__(self, name: str) -> Callable[[Any, float | None], Awaitable[Any]]:
        if name.startswith("_") or name == "batch_handler":
            raise AttributeError(name)

        async def call(request: Any, deadline: float | None) -> Any:
            self.reached.append(name)
            return pb.GetAvailabilityResponse()

        return call


async def _answers(tmp_path: Path, auth: bool) -> tuple[dict[str, grpc.aio.AioRpcError], list[str]]:
    keys = LocalKeys(tmp_path / "auth")
    keys.ensure()
    guard = [AuthInterceptor(Verifier(Keyring(keys.jwks_path)))] if auth else []
    recorder = Recorder()
    server, _, port = create_server("127.0.0.1:0", SERVICE_NAMES, guard)
    serve_inventory(server, CallsServicer(recorder))
    await server.start()
    metadata = bearer(keys.mint(Role.ADMIN, ["*"]))
    refusals: dict[str, grpc.aio.AioRpcError] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            calls: dict[str, Callable[[], Any]] = {
                "unary": lambda: channel.unary_unary("/inventory.v1.Inventory/GetAvailability")(
                    GARBAGE, metadata=metadata, timeout=CALL_TIMEOUT_S
                ),
                "stream": lambda: _drain(
                    channel.stream_stream("/inventory.v1.Inventory/Batch")(
                        iter([b"", GARBAGE]), metadata=metadata, timeout=CALL_TIMEOUT_S
                    )
                ),
                "ingest": lambda: _drain(
                    channel.stream_stream("/inventory.v1.Ingest/Stream")(
                        iter([GARBAGE]), metadata=metadata, timeout=CALL_TIMEOUT_S
                    )
                ),
                "health": lambda: channel.unary_unary("/grpc.health.v1.Health/Check")(
                    GARBAGE, timeout=CALL_TIMEOUT_S
                ),
                "health watch": lambda: _drain(
                    channel.unary_stream("/grpc.health.v1.Health/Watch")(
                        GARBAGE, timeout=CALL_TIMEOUT_S
                    )
                ),
            }
            for name, call in calls.items():
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call()
                refusals[name] = refused.value
    finally:
        await server.stop(0)
    return refusals, recorder.reached


async def _drain(call: AsyncIterator[Any]) -> None:
    async for _ in call:
        pass


@pytest.mark.parametrize("auth", [True, False], ids=["auth", "no-auth"])
def test_bytes_that_are_no_request_are_refused_invalid_argument_naming_it(
    tmp_path: Path, auth: bool
) -> None:
    refusals, reached = asyncio.run(_answers(tmp_path, auth))
    types = {
        "unary": "inventory.v1.GetAvailabilityRequest",
        "stream": "inventory.v1.BatchRequest",
        "ingest": "inventory.v1.IngestRequest",
        "health": "grpc.health.v1.HealthCheckRequest",
        "health watch": "grpc.health.v1.HealthCheckRequest",
    }
    for name, error in refusals.items():
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error)
        assert f"not a valid {types[name]} for /" in error.details(), name
        status = rpc_status.from_call(error)
        assert status is not None, name
        violations = error_details_pb2.BadRequest()
        assert any(detail.Unpack(violations) for detail in status.details), name
        assert violations.field_violations[0].field == "request"
    # The Batch stream's first, empty request reached nothing either: it has no items.
    assert reached == []
