"""Protobuf <-> domain conversion: the only place that knows both shapes.

Requests become core commands with ``now_ms=0``; the owner stamps the time when it applies
them. Field checks are the core's (``inventory_core.validate``); this module only moves data.
"""

from __future__ import annotations

from collections.abc import Iterable

from inventory.v1 import inventory_pb2 as pb

from inventory_core import (
    AckStatus,
    AdjustmentReason,
    AdjustStock,
    Commit,
    Consumed,
    ExpectDelivery,
    Extend,
    FeedEvent,
    FeedEventKind,
    HotKeyPart,
    Ingest,
    Ingested,
    InventoryKey,
    KeySplit,
    Line,
    LocationHealth,
    MergeKey,
    OverCommit,
    OverCommitted,
    ReceiveQuota,
    Release,
    Reservation,
    ReservationState,
    Reserve,
    SendQuota,
    SetSafetyStock,
    SetStock,
    SettleTransfer,
    SplitKey,
    StockLevel,
    Transfer,
)

STATE_TO_PROTO = {
    ReservationState.ACTIVE: pb.RESERVATION_STATE_ACTIVE,
    ReservationState.COMMITTED: pb.RESERVATION_STATE_COMMITTED,
    ReservationState.RELEASED: pb.RESERVATION_STATE_RELEASED,
    ReservationState.EXPIRED: pb.RESERVATION_STATE_EXPIRED,
}
STATE_FROM_PROTO = {v: k for k, v in STATE_TO_PROTO.items()}

REASON_FROM_PROTO = {
    pb.ADJUSTMENT_REASON_RECEIPT: AdjustmentReason.RECEIPT,
    pb.ADJUSTMENT_REASON_SALE: AdjustmentReason.SALE,
    pb.ADJUSTMENT_REASON_RETURN: AdjustmentReason.RETURN,
    pb.ADJUSTMENT_REASON_SHRINKAGE: AdjustmentReason.SHRINKAGE,
    pb.ADJUSTMENT_REASON_CORRECTION: AdjustmentReason.CORRECTION,
    pb.ADJUSTMENT_REASON_TRANSFER: AdjustmentReason.TRANSFER,
}


KIND_FROM_PROTO = {
    pb.FEED_EVENT_KIND_SALE: FeedEventKind.SALE,
    pb.FEED_EVENT_KIND_RETURN: FeedEventKind.RETURN,
    pb.FEED_EVENT_KIND_RECEIPT: FeedEventKind.RECEIPT,
    pb.FEED_EVENT_KIND_ADJUSTMENT: FeedEventKind.ADJUSTMENT,
    pb.FEED_EVENT_KIND_COUNT: FeedEventKind.COUNT,
}
ACK_STATUS_TO_PROTO = {
    AckStatus.APPLIED: pb.EVENT_ACK_STATUS_APPLIED,
    AckStatus.DUPLICATE: pb.EVENT_ACK_STATUS_DUPLICATE,
    AckStatus.SUPERSEDED: pb.EVENT_ACK_STATUS_SUPERSEDED,
    AckStatus.REFUSED: pb.EVENT_ACK_STATUS_REFUSED,
}
# The acks without a reason, built once: most of a feed's answers are one of these.
_PLAIN_ACKS = {
    status: pb.EventAck(status=proto)
    for status, proto in ACK_STATUS_TO_PROTO.items()
    if status is not AckStatus.REFUSED
}


def key_text(key: InventoryKey) -> str:
    return f"{key.merchant_id}/{key.sku_id}@{key.location_id}"


def key_from_proto(key: pb.InventoryKey) -> InventoryKey:
    return InventoryKey(key.merchant_id, key.sku_id, key.location_id)


def key_to_proto(key: InventoryKey) -> pb.InventoryKey:
    return pb.InventoryKey(
        merchant_id=key.merchant_id, sku_id=key.sku_id, location_id=key.location_id
    )


def lines_from_proto(lines: object) -> tuple[Line, ...]:
    return tuple(Line(key_from_proto(line.key), line.quantity) for line in lines)  # type: ignore[attr-defined]


def lines_to_proto(lines: tuple[Line, ...]) -> list[pb.ReservationLine]:
    return [pb.ReservationLine(key=key_to_proto(x.key), quantity=x.quantity) for x in lines]


# ------------------------------------------------------------------------------ requests


def reserve(request: pb.ReserveRequest) -> Reserve:
    lines = lines_from_proto(request.lines)
    merchant_id = lines[0].key.merchant_id if lines else ""
    return Reserve(
        merchant_id, request.idempotency_key, lines, request.ttl_s, 0, request.keep_refusal
    )


def commit(request: pb.CommitRequest) -> Commit:
    return Commit(
        request.merchant_id,
        request.idempotency_key,
        request.reservation_id,
        lines_from_proto(request.lines),
        0,
    )


def release(request: pb.ReleaseRequest) -> Release:
    return Release(request.merchant_id, request.idempotency_key, request.reservation_id, 0)


def reserve_to_proto(command: Reserve) -> pb.ReserveRequest:
    """The request that converts back to ``command`` (an order's leg, sent by the router)."""
    return pb.ReserveRequest(
        lines=lines_to_proto(command.lines),
        ttl_s=command.ttl_s,
        idempotency_key=command.idempotency_key,
        keep_refusal=command.keep_refusal,
    )


def release_to_proto(command: Release) -> pb.ReleaseRequest:
    return pb.ReleaseRequest(
        merchant_id=command.merchant_id,
        reservation_id=command.reservation_id,
        idempotency_key=command.idempotency_key,
    )


def extend(request: pb.ExtendReservationRequest) -> Extend:
    return Extend(
        request.merchant_id, request.idempotency_key, request.reservation_id, request.ttl_s, 0
    )


def adjust_stock(request: pb.AdjustStockRequest) -> AdjustStock:
    """An unset or unknown reason becomes ``reason=None``, which the core refuses."""
    return AdjustStock(
        key_from_proto(request.key),
        request.idempotency_key,
        request.delta,
        REASON_FROM_PROTO.get(request.reason),
        request.occurred_at_ms,
        0,
    )


def ingest(request: pb.IngestRequest) -> Ingest:
    """An unset or unknown kind becomes ``kind=None``, which the core refuses."""
    kinds = KIND_FROM_PROTO
    keys: dict[tuple[str, str, str], InventoryKey] = {}  # a store's events share few keys
    events = []
    for e in request.events:
        k = e.key
        parts = (k.merchant_id, k.sku_id, k.location_id)
        key = keys.get(parts)
        if key is None:
            key = keys[parts] = InventoryKey(*parts)
        count = e.count if e.HasField("count") else None
        events.append(
            FeedEvent(
                e.event_id,
                kinds.get(e.kind),
                key,
                e.occurred_at_ms,
                e.quantity,
                count,
                e.reason,
                e.delivery_id,
            )
        )
    return Ingest(
        request.merchant_id,
        request.source,
        tuple(events),
        0,
        request.batch_id,
        tuple(request.alive_at),
    )


def set_stock(request: pb.SetStockRequest) -> SetStock:
    expected = request.expected_version if request.HasField("expected_version") else None
    return SetStock(
        key_from_proto(request.key), request.idempotency_key, request.on_hand, expected, 0
    )


def set_safety_stock(request: pb.SetSafetyStockRequest) -> SetSafetyStock:
    expected = request.expected_version if request.HasField("expected_version") else None
    return SetSafetyStock(
        key_from_proto(request.key), request.idempotency_key, request.safety_stock, expected, 0
    )


def expect_delivery(request: pb.ExpectDeliveryRequest) -> ExpectDelivery:
    merchant_id, location_id = request.merchant_id, request.location_id
    lines = tuple(
        Line(InventoryKey(merchant_id, line.sku_id, location_id), line.quantity)
        for line in request.lines
    )
    return ExpectDelivery(
        merchant_id,
        request.idempotency_key,
        request.delivery_id,
        location_id,
        lines,
        request.eta_ms,
        0,
    )


def split_key(request: pb.SplitKeyRequest) -> SplitKey:
    return SplitKey(
        key_from_proto(request.key), request.idempotency_key, tuple(request.bucket_numbers), 0
    )


def merge_key(request: pb.MergeKeyRequest) -> MergeKey:
    return MergeKey(key_from_proto(request.key), request.idempotency_key, 0)


def send_quota(request: pb.SendQuotaRequest) -> SendQuota:
    return SendQuota(
        key_from_proto(request.key),
        request.idempotency_key,
        key_from_proto(request.target),
        request.quantity,
        0,
    )


def receive_quota(request: pb.ReceiveQuotaRequest) -> ReceiveQuota:
    return ReceiveQuota(transfer_from_proto(request.transfer), 0)


def settle_transfer(request: pb.SettleTransferRequest) -> SettleTransfer:
    return SettleTransfer(key_from_proto(request.key), request.transfer_id, 0)


def transfer_from_proto(transfer: pb.QuotaTransfer) -> Transfer:
    return Transfer(
        transfer.transfer_id,
        key_from_proto(transfer.source),
        key_from_proto(transfer.target),
        transfer.generation,
        transfer.quantity,
        tuple(Consumed(c.occurred_at_ms, c.quantity) for c in transfer.consumed),
        transfer.version,
    )


# ----------------------------------------------------------------------------- answers


def transfer_to_proto(transfer: Transfer) -> pb.QuotaTransfer:
    return pb.QuotaTransfer(
        transfer_id=transfer.transfer_id,
        source=key_to_proto(transfer.source),
        target=key_to_proto(transfer.target),
        generation=transfer.generation,
        quantity=transfer.quantity,
        consumed=[
            pb.QuotaTransfer.Consumed(occurred_at_ms=c.occurred_at_ms, quantity=c.quantity)
            for c in transfer.consumed
        ],
        version=transfer.version,
    )


def split_to_proto(split: KeySplit) -> pb.HotKeySplit:
    return pb.HotKeySplit(
        home=level_to_proto(split.level),
        buckets=[key_to_proto(bucket) for bucket in split.buckets],
        generation=split.generation,
        merging=split.merging,
    )


def hot_key_part_to_proto(part: HotKeyPart) -> pb.HotKeyPart:
    answer = pb.HotKeyPart(
        level=level_to_proto(part.level),
        granted=part.granted,
        sending=[transfer_to_proto(t) for t in part.sending],
    )
    if part.split is not None:
        answer.split.CopyFrom(split_to_proto(part.split))
    if part.home is not None:
        answer.home.CopyFrom(key_to_proto(part.home))
    return answer


def level_to_proto(level: StockLevel) -> pb.StockLevel:
    return pb.StockLevel(
        key=key_to_proto(level.key),
        on_hand=level.on_hand,
        reserved=level.reserved,
        safety_stock=level.safety_stock,
        available=level.available,
        sellable=level.sellable,
        version=level.version,
        exists=level.exists,
        exposure=max(-level.available, 0),
        degraded=level.degraded,
        stale_buffer=level.stale_buffer,
        stale_since_ms=level.stale_since_ms,
        incoming=level.incoming,
        incoming_eta_ms=level.incoming_eta_ms,
        allotted=level.allotted,
    )


def reservation_to_proto(reservation: Reservation) -> pb.Reservation:
    return pb.Reservation(
        reservation_id=reservation.reservation_id,
        merchant_id=reservation.merchant_id,
        location_id=reservation.location_id,
        lines=lines_to_proto(reservation.lines),
        state=STATE_TO_PROTO[reservation.state],
        created_at_ms=reservation.created_at_ms,
        expires_at_ms=reservation.expires_at_ms,
        state_changed_at_ms=reservation.state_changed_at_ms,
        committed_lines=lines_to_proto(reservation.committed_lines),
    )


def refused_ack(field: str, reason: str) -> pb.EventAck:
    return pb.EventAck(status=pb.EVENT_ACK_STATUS_REFUSED, field=field, reason=reason)


def ingested_to_proto(outcome: Ingested) -> pb.IngestResponse:
    acks = []
    for ack in outcome.acks:
        if ack.status is AckStatus.REFUSED:
            acks.append(refused_ack(ack.field, ack.reason))
        elif ack.reason:
            acks.append(pb.EventAck(status=ACK_STATUS_TO_PROTO[ack.status], reason=ack.reason))
        else:
            acks.append(_PLAIN_ACKS[ack.status])
    return pb.IngestResponse(
        acks=acks, over_committed=over_committed_to_proto(outcome.over_committed)
    )


def feed_health_to_proto(found: Iterable[LocationHealth]) -> list[pb.LocationFeedHealth]:
    return [
        pb.LocationFeedHealth(
            location_id=health.location.location_id,
            sources=[
                pb.SourceHealth(
                    source=s.source,
                    last_event_at_ms=s.last_occurred_at_ms,
                    last_received_at_ms=s.last_received_at_ms,
                    lag_ms=s.lag_ms,
                )
                for s in health.feed.sources
            ],
            silent_for_ms=health.silent_for_ms,
            stale=health.feed.stale_since_ms != 0,
            stale_since_ms=health.feed.stale_since_ms,
        )
        for health in found
    ]


def over_committed_to_proto(found: Iterable[OverCommitted]) -> list[pb.KeyOverCommit]:
    return [
        pb.KeyOverCommit(key=key_to_proto(o.key), over_commit=over_commit_to_proto(o.over_commit))
        for o in found
    ]


def over_commit_to_proto(over: OverCommit | None) -> pb.OverCommit | None:
    if over is None:
        return None
    return pb.OverCommit(
        exposure=over.exposure, reservations_at_risk=list(over.reservations_at_risk)
    )
