"""The Python client of the Inventory API, for order services.

    async with InventoryClient("localhost:50051") as client:
        answer = await client.reserve([line(key("m-1", "sku-1", "store-1"), 2)],
                                      idempotency_key="order-42")

Methods return the generated response messages (typed by their .pyi) and raise the
exceptions drawn in ``_errors``, each of one answer class (``AnswerClass``): final (the
answer), ``NotApplied`` (retryable: nothing was applied) or ``OutcomeUnknown`` (it may have
been applied: retry with the same idempotency key). Concurrent calls are batched onto one
stream (``StreamBatcher``, also used by the router towards its shards); retryable answers are
retried, and answers of unknown outcome are retried with the same idempotency key.
``ChannelTLSConfig`` is the client's ``tls``: the CA it trusts and, for mutual TLS, its own
certificate and key.
"""

from ..common.config import ChannelTLSConfig
from ..common.errors import AnswerClass
from ._batcher import BatcherStats, StreamBatcher
from ._client import InventoryClient, key, line
from ._errors import (
    CapacityExhausted,
    DeadlineExceeded,
    IdempotencyKeyReused,
    InsufficientStock,
    InvalidArgument,
    InventoryError,
    NotApplied,
    OutcomeUnknown,
    Overloaded,
    ReservationNotActive,
    ReservationNotFound,
    SplitConflict,
    Unavailable,
    VersionMismatch,
)

__all__ = [
    "AnswerClass",
    "BatcherStats",
    "CapacityExhausted",
    "ChannelTLSConfig",
    "DeadlineExceeded",
    "IdempotencyKeyReused",
    "InsufficientStock",
    "InvalidArgument",
    "InventoryClient",
    "InventoryError",
    "NotApplied",
    "OutcomeUnknown",
    "Overloaded",
    "ReservationNotActive",
    "ReservationNotFound",
    "SplitConflict",
    "StreamBatcher",
    "Unavailable",
    "VersionMismatch",
    "key",
    "line",
]
