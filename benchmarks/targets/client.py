"""This service through its public Python client, ``shard_router.client.InventoryClient``.

What an order-service team would run: one client per process with automatic batching (the
concurrent calls of a process are coalesced onto one ``Batch`` stream, each caller awaiting
its own answer) and its retry policy (UNAVAILABLE retried with the same idempotency key).
Its exceptions map back to status code names, so the report compares like with like: a
rejection (e.g. ``InsufficientStock``) is its code, ``Unavailable`` after the retries and
``DeadlineExceeded`` are of unknown fate, as for the other gRPC clients.

The server side (loading, audit) is ``ServiceTarget``: only the calls differ.
"""

from __future__ import annotations

from collections.abc import Sequence

from inventory.v1 import inventory_pb2 as pb

from shard_router.client import InventoryClient, InventoryError

from ..workloads import Key
from . import OK, Answer, TargetSpec


def _key(key: Key) -> pb.InventoryKey:
    return pb.InventoryKey(
        merchant_id=key.merchant_id, sku_id=key.sku_id, location_id=key.location_id
    )


class BatchingClient:
    def __init__(self, client: InventoryClient) -> None:
        self.client = client

    @classmethod
    def open(cls, spec: TargetSpec) -> BatchingClient:
        return cls(
            InventoryClient(spec.address, batching=True, timeout_s_default=spec.call_timeout_s)
        )

    async def reserve(
        self, lines: Sequence[tuple[Key, int]], ttl_s: int, idempotency_key: str
    ) -> Answer:
        try:
            answer = await self.client.reserve(
                [pb.ReservationLine(key=_key(k), quantity=q) for k, q in lines],
                idempotency_key=idempotency_key,
                ttl_s=ttl_s,
            )
        except InventoryError as error:
            return Answer(error.code.name)
        return Answer(OK, answer.reservation.reservation_id)

    async def commit(self, key: Key, reservation_id: str, idempotency_key: str) -> Answer:
        try:
            await self.client.commit(
                key.merchant_id, reservation_id, idempotency_key=idempotency_key
            )
        except InventoryError as error:
            return Answer(error.code.name, reservation_id)
        return Answer(OK, reservation_id)

    async def release(self, key: Key, reservation_id: str, idempotency_key: str) -> Answer:
        try:
            await self.client.release(
                key.merchant_id, reservation_id, idempotency_key=idempotency_key
            )
        except InventoryError as error:
            return Answer(error.code.name, reservation_id)
        return Answer(OK, reservation_id)

    async def read(self, keys: Sequence[Key]) -> Answer:
        try:
            # UNSPECIFIED, as the other gRPC clients send it (the server treats it as STRONG).
            await self.client.get_availability([_key(k) for k in keys], pb.CONSISTENCY_UNSPECIFIED)
        except InventoryError as error:
            return Answer(error.code.name)
        return Answer(OK)

    async def close(self) -> None:
        await self.client.close()
