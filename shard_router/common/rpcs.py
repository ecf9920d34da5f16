"""The calls of ``inventory.v1.Inventory``, written once.

One row per call: the unary RPC's service and name (``Inventory``, ``Reserve``), the name
shared by the ``BatchItem
oneof field, the ``BatchItemResult`` field and the calls object's method (``reserve``), the
request and response types, and whether the call mutates (its failure may leave its outcome
unknown; it carries an idempotency key, or, for ``Ingest``, an event id per event) or only
reads (applies nothing, whatever happens).

    CALLS           the calls a Batch stream carries, in BatchItem oneof order (the
                    ``HotKeys`` service's among them: the router reaches owners by Batch)
    RESERVE_ORDER   the router-only saga (a unary RPC, not a Batch item)
    UNARY           every unary RPC: CALLS plus RESERVE_ORDER (``Ingest.Send`` among them)
    BY_FIELD, BY_METHOD

The servicer generates its unary methods from ``UNARY``, the Batch dispatch and the batchers
look calls up by field, and the client maps a field to its stub method; a test checks the
table against the proto's service and BatchItem descriptors (tests/test_errors.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message
from inventory.v1 import inventory_pb2 as pb

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)


INVENTORY = "Inventory"
INGEST_SERVICE = "Ingest"
HOT_KEYS = "HotKeys"


@dataclass(frozen=True, slots=True)
class Rpc(Generic[RequestT, ResponseT]):
    # The unary RPC of its service, e.g. "Reserve".
    method: str
    # The BatchItem / BatchItemResult oneof field and the calls object's method, "reserve".
    field: str
    request_type: type[RequestT]
    response_type: type[ResponseT]
    # True for a call that can change state: if it fails without a definite answer, it may
    # have been applied (retry with the same idempotency key). A read applies nothing.
    mutating: bool
    # The service whose unary RPC ``method`` is.
    service: str = INVENTORY
    # What makes a retry safe: the request's idempotency key, or each event's id.
    retried_by: str = "idempotency_key"


GET_AVAILABILITY = Rpc(
    "GetAvailability",
    "get_availability",
    pb.GetAvailabilityRequest,
    pb.GetAvailabilityResponse,
    mutating=False,
)
RESERVE = Rpc("Reserve", "reserve", pb.ReserveRequest, pb.ReserveResponse, mutating=True)
COMMIT = Rpc("Commit", "commit", pb.CommitRequest, pb.CommitResponse, mutating=True)
RELEASE = Rpc("Release", "release", pb.ReleaseRequest, pb.ReleaseResponse, mutating=True)
EXTEND_RESERVATION = Rpc(
    "ExtendReservation",
    "extend_reservation",
    pb.ExtendReservationRequest,
    pb.ExtendReservationResponse,
    mutating=True,
)
GET_RESERVATION = Rpc(
    "GetReservation",
    "get_reservation",
    pb.GetReservationRequest,
    pb.GetReservationResponse,
    mutating=False,
)
ADJUST_STOCK = Rpc(
    "AdjustStock", "adjust_stock", pb.AdjustStockRequest, pb.AdjustStockResponse, mutating=True
)
SET_STOCK = Rpc("SetStock", "set_stock", pb.SetStockRequest, pb.SetStockResponse, mutating=True)
SET_SAFETY_STOCK = Rpc(
    "SetSafetyStock",
    "set_safety_stock",
    pb.SetSafetyStockRequest,
    pb.SetSafetyStockResponse,
    mutating=True,
)
GET_OVER_COMMITTED = Rpc(
    "GetOverCommitted",
    "get_over_committed",
    pb.GetOverCommittedRequest,
    pb.GetOverCommittedResponse,
    mutating=False,
)
EXPECT_DELIVERY = Rpc(
    "ExpectDelivery",
    "expect_delivery",
    pb.ExpectDeliveryRequest,
    pb.ExpectDeliveryResponse,
    mutating=True,
)
GET_FEED_HEALTH = Rpc(
    "GetFeedHealth",
    "get_feed_health",
    pb.GetFeedHealthRequest,
    pb.GetFeedHealthResponse,
    mutating=False,
)
# A feed's events, de-duplicated by event id (its unary RPC is Ingest.Send).
INGEST = Rpc(
    "Send",
    "ingest",
    pb.IngestRequest,
    pb.IngestResponse,
    mutating=True,
    service=INGEST_SERVICE,
    retried_by="events[].event_id",
)
# A hot key's split and its transfers (the admin's and the rebalancer's calls).
SPLIT_KEY = Rpc("SplitKey", "split_key", pb.SplitKeyRequest, pb.SplitKeyResponse, True, HOT_KEYS)
MERGE_KEY = Rpc("MergeKey", "merge_key", pb.MergeKeyRequest, pb.MergeKeyResponse, True, HOT_KEYS)
SEND_QUOTA = Rpc(
    "SendQuota", "send_quota", pb.SendQuotaRequest, pb.SendQuotaResponse, True, HOT_KEYS
)
# Credited once per transfer id, however often it is carried.
RECEIVE_QUOTA = Rpc(
    "ReceiveQuota",
    "receive_quota",
    pb.ReceiveQuotaRequest,
    pb.ReceiveQuotaResponse,
    mutating=True,
    service=HOT_KEYS,
    retried_by="transfer.transfer_id",
)
# Settling a settled transfer changes nothing.
SETTLE_TRANSFER = Rpc(
    "SettleTransfer",
    "settle_transfer",
    pb.SettleTransferRequest,
    pb.SettleTransferResponse,
    mutating=True,
    service=HOT_KEYS,
    retried_by="transfer_id",
)
GET_HOT_KEYS = Rpc(
    "GetHotKeys", "get_hot_keys", pb.GetHotKeysRequest, pb.GetHotKeysResponse, False, HOT_KEYS
)
# Orders across locations span owners: only the router serves it (a shard's calls object
# has no ``reserve_order``, so the servicer answers UNIMPLEMENTED there).
RESERVE_ORDER = Rpc(
    "ReserveOrder",
    "reserve_order",
    pb.ReserveOrderRequest,
    pb.ReserveOrderResponse,
    mutating=True,
)

CALLS: tuple[Rpc[Any, Any], ...] = (
    GET_AVAILABILITY,
    RESERVE,
    COMMIT,
    RELEASE,
    EXTEND_RESERVATION,
    GET_RESERVATION,
    ADJUST_STOCK,
    SET_STOCK,
    SET_SAFETY_STOCK,
    INGEST,
    GET_OVER_COMMITTED,
    GET_FEED_HEALTH,
    EXPECT_DELIVERY,
    SPLIT_KEY,
    MERGE_KEY,
    SEND_QUOTA,
    RECEIVE_QUOTA,
    SETTLE_TRANSFER,
    GET_HOT_KEYS,
)
UNARY: tuple[Rpc[Any, Any], ...] = (*CALLS, RESERVE_ORDER)
BY_FIELD: Mapping[str, Rpc[Any, Any]] = {rpc.field: rpc for rpc in UNARY}
# The Inventory service's unary RPCs by name.
BY_METHOD: Mapping[str, Rpc[Any, Any]] = {
    rpc.method: rpc for rpc in UNARY if rpc.service == INVENTORY
}


def is_mutating(field: str) -> bool:
    """Whether the call named by ``field`` may change state (unknown fields count as such)."""
    rpc = BY_FIELD.get(field)
    return True if rpc is None else rpc.mutating
