"""The Python client of the Inventory API, for order services.

    async with InventoryClient("localhost:50051") as client:
        answer = await client.reserve([line(key("m-1", "sku-1", "store-1"), 2)],
                                      idempotency_key="order-42")

Methods return the generated response messages (typed by their .pyi) and raise the
exceptions drawn in ``_errors``. Concurrent calls are batched onto one stream
(``StreamBatcher``, also used by the router towards its shards) and UNAVAILABLE is retried
with the same idempotency key.
"""

from ._batcher import BatcherStats, StreamBatcher
from ._client import InventoryClient, key, line
from ._errors import (
    CapacityExhausted,
    DeadlineExceeded,
    IdempotencyKeyReused,
    InsufficientStock,
    InvalidArgument,
    InventoryError,
    Overloaded,
    ReservationNotActive,
    ReservationNotFound,
    Unavailable,
    VersionMismatch,
)

__all__ = [
    "BatcherStats",
    "CapacityExhausted",
    "DeadlineExceeded",
    "IdempotencyKeyReused",
    "InsufficientStock",
    "InvalidArgument",
    "InventoryClient",
    "InventoryError",
    "Overloaded",
    "ReservationNotActive",
    "ReservationNotFound",
    "StreamBatcher",
    "Unavailable",
    "VersionMismatch",
    "key",
    "line",
]
