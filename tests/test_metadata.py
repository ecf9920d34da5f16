"""Caller metadata (request id, trace context) travels from a call into what it forwards."""

from __future__ import annotations

import asyncio

from inventory.v1 import inventory_pb2 as pb

from shard_router.common import batching, calls


def test_batch_item_metadata_is_in_context_for_the_call_and_nothing_else_leaks() -> None:
    seen: list[dict[str, str]] = []

    async def reserve(request: pb.ReserveRequest, deadline: float | None) -> pb.ReserveResponse:
        seen.append(calls.request_metadata.get())
        return pb.ReserveResponse()

    dispatch = {name: reserve for name in batching.CALL_FIELDS}
    item = pb.BatchItem(id=7, reserve=pb.ReserveRequest())
    item.metadata.update({"x-request-id": "req-1", "traceparent": "00-ab-cd-01", "cookie": "x"})

    async def run() -> pb.BatchItemResult:
        return await batching.run_item(item, dispatch, lambda _: None)

    result = asyncio.run(run())
    assert result.id == 7 and result.WhichOneof("result") == "reserve"
    assert seen == [{"x-request-id": "req-1", "traceparent": "00-ab-cd-01"}]
    assert calls.request_metadata.get() == {}
