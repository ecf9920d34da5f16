"""Shape checks before anything touches state: the field and the reason, or None.

One function per command kind (the registry's validator column), and the checks of the
entry points that carry no command: keys of a read, a Watch filter, an identifier.

Field names follow the public contract (``lines[2].quantity``), so a caller can point at the
exact part of its request.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import _limits as limits
from ._commands import (
    AdjustStock,
    Commit,
    ExpectDelivery,
    Expire,
    Extend,
    FeedEvent,
    Ingest,
    MarkStale,
    MergeKey,
    ReceiveQuota,
    Release,
    Reserve,
    SendQuota,
    SetSafetyStock,
    SetStock,
    SettleTransfer,
    SplitKey,
)
from ._model import (
    BUCKET_SEPARATOR,
    FeedEventKind,
    InventoryKey,
    Line,
    bucket_number,
    home_key,
    partition_of,
)
from ._outcomes import Invalid

IDENTIFIER_CHARACTERS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-"
)


def reserve(command: Reserve) -> Invalid | None:
    if not command.lines:
        return Invalid("lines", "must hold at least one line")
    if len(command.lines) > limits.reserve_lines_max:
        return Invalid(
            "lines", f"at most {limits.reserve_lines_max} lines, got {len(command.lines)}"
        )
    first = command.lines[0].key
    for index, line in enumerate(command.lines):
        field = f"lines[{index}]"
        problem = _line_key(f"{field}.key", line.key) or _bounded(
            f"{field}.quantity", line.quantity, 1, limits.line_quantity_max
        )
        if problem:
            return problem
        if line.key.merchant_id != first.merchant_id:
            return Invalid(f"{field}.key.merchant_id", "all lines must be at one merchant")
        if line.key.location_id != first.location_id:
            return Invalid(f"{field}.key.location_id", "all lines must be at one location")
    return _idempotency_key(command.idempotency_key) or _ttl(command.ttl_s, zero_is_default=True)


def commit(command: Commit) -> Invalid | None:
    return (
        _scope(command.merchant_id, command.idempotency_key)
        or _identifier("reservation_id", command.reservation_id)
        or _commit_lines(command.lines)
    )


def release(command: Release) -> Invalid | None:
    return _scope(command.merchant_id, command.idempotency_key) or _identifier(
        "reservation_id", command.reservation_id
    )


def extend(command: Extend) -> Invalid | None:
    return (
        _scope(command.merchant_id, command.idempotency_key)
        or _identifier("reservation_id", command.reservation_id)
        or _ttl(command.ttl_s, zero_is_default=False)
    )


def adjust_stock(command: AdjustStock) -> Invalid | None:
    return _key_scope(command.key, command.idempotency_key) or _adjust(command)


def set_stock(command: SetStock) -> Invalid | None:
    return (
        _key_scope(command.key, command.idempotency_key)
        or _bounded("on_hand", command.on_hand, 0, limits.stock_quantity_max)
        or _expected_version(command.expected_version)
    )


def set_safety_stock(command: SetSafetyStock) -> Invalid | None:
    return (
        _key_scope(command.key, command.idempotency_key)
        or _bounded("safety_stock", command.safety_stock, 0, limits.stock_quantity_max)
        or _expected_version(command.expected_version)
    )


def expect_delivery(command: ExpectDelivery) -> Invalid | None:
    """A delivery's notice: its ids, up to ``delivery_lines_max`` lines of distinct keys of
    the merchant at its location (none: cancel), each of 1 to ``line_quantity_max`` units,
    and an ETA."""
    problem = (
        _identifier("merchant_id", command.merchant_id)
        or _idempotency_key(command.idempotency_key)
        or _identifier("delivery_id", command.delivery_id)
        or _identifier("location_id", command.location_id)
    )
    if problem:
        return problem
    if len(command.lines) > limits.delivery_lines_max:
        count = len(command.lines)
        return Invalid("lines", f"at most {limits.delivery_lines_max} lines, got {count}")
    if command.lines and command.eta_ms <= 0:
        return Invalid("eta_ms", "must be set: when the delivery is expected (Unix epoch ms)")
    seen = set()
    for index, line in enumerate(command.lines):
        field = f"lines[{index}]"
        problem = _identifier(f"{field}.key.sku_id", line.key.sku_id) or _bounded(
            f"{field}.quantity", line.quantity, 1, limits.line_quantity_max
        )
        if problem:
            return problem
        if line.key.merchant_id != command.merchant_id:
            return Invalid(f"{field}.key.merchant_id", "must be the delivery's merchant_id")
        if line.key.location_id != command.location_id:
            return Invalid(f"{field}.key.location_id", "must be the delivery's location_id")
        if line.key in seen:
            return Invalid(f"{field}.key.sku_id", "named twice: one line per SKU")
        seen.add(line.key)
    return None


def ingest(command: Ingest) -> Invalid | None:
    """The batch as a whole; each event is judged on its own when applied (``feed_event``)."""
    return validate_ingest_request(
        command.merchant_id,
        command.source,
        len(command.events),
        command.batch_id,
        command.alive_at,
    )


def validate_ingest_request(
    merchant_id: str,
    source: str,
    event_count: int,
    batch_id: str,
    alive_at: Sequence[str] = (),
) -> Invalid | None:
    """What a feed's request needs as a whole: its merchant, its source, up to
    ``ingest_events_max`` events and up to ``feed_heartbeat_locations_max`` heartbeat
    locations (at least one of either), and a well-formed batch id if it names one."""
    if len(alive_at) > limits.feed_heartbeat_locations_max:
        count_max = limits.feed_heartbeat_locations_max
        return Invalid("alive_at", f"at most {count_max} locations, got {len(alive_at)}")
    if not (0 if alive_at else 1) <= event_count <= limits.ingest_events_max:
        count = f"1 to {limits.ingest_events_max} events (or a heartbeat's alive_at)"
        return Invalid("events", f"{count}, got {event_count}")
    problem = (
        _identifier("merchant_id", merchant_id)
        or _identifier("source", source)
        or (_identifier("batch_id", batch_id) if batch_id else None)
    )
    for index, location_id in enumerate(alive_at):
        problem = problem or _identifier(f"alive_at[{index}]", location_id)
    return problem


def split_key(command: SplitKey) -> Invalid | None:
    """A key a caller names (never a bucket), and 1 to ``split_buckets_max`` distinct bucket
    numbers, each 1 to ``bucket_number_max``."""
    problem = _key_scope(command.key, command.idempotency_key)
    if problem:
        return problem
    count = len(command.buckets)
    if not 0 < count <= limits.split_buckets_max:
        return Invalid("buckets", f"1 to {limits.split_buckets_max} buckets, got {count}")
    for index, number in enumerate(command.buckets):
        problem = _bounded(f"buckets[{index}]", number, 1, limits.bucket_number_max)
        if problem:
            return problem
    if len(set(command.buckets)) != count:
        return Invalid("buckets", "a bucket is named twice")
    return None


def merge_key(command: MergeKey) -> Invalid | None:
    return _key_scope(command.key, command.idempotency_key)


def send_quota(command: SendQuota) -> Invalid | None:
    """A grant (home to one of its buckets, at least one unit) or a return (bucket to its
    home, any number of free units: it also carries what the bucket committed)."""
    problem = (
        _transfer_ends(command.key, command.target, "key", "target")
        or _idempotency_key(command.idempotency_key)
        or _bounded("quantity", command.quantity, 0, limits.stock_quantity_max)
    )
    if problem is None and command.quantity == 0 and not bucket_number(command.key):
        return Invalid("quantity", "a grant moves at least one unit")
    return problem


def receive_quota(command: ReceiveQuota) -> Invalid | None:
    """A transfer as its source's answer described it."""
    transfer = command.transfer
    head, dash, lsn = transfer.transfer_id[1:].partition("-")
    well_formed = transfer.transfer_id[:1] == "t" and dash and head.isdecimal() and lsn.isdecimal()
    if not well_formed or len(transfer.transfer_id) > limits.identifier_length_max:
        return Invalid("transfer.transfer_id", "not a transfer's id (t<partition>-<lsn>)")
    problem = _transfer_ends(
        transfer.source, transfer.target, "transfer.source", "transfer.target"
    ) or _bounded("transfer.generation", transfer.generation, 1, 2**62)
    problem = problem or _bounded(
        "transfer.quantity", transfer.quantity, 0, limits.stock_quantity_max
    )
    problem = problem or _bounded("transfer.version", transfer.version, 0, limits.version_max)
    if problem:
        return problem
    is_return = bucket_number(transfer.source) != 0
    if not is_return and (transfer.consumed or transfer.quantity == 0 or transfer.version):
        return Invalid(
            "transfer", "a grant moves at least one unit, and reports no commits and no version"
        )
    if len(transfer.consumed) > limits.transfer_consumed_max:
        count_max = limits.transfer_consumed_max
        return Invalid("transfer.consumed", f"at most {count_max}, got {len(transfer.consumed)}")
    for index, consumed in enumerate(transfer.consumed):
        problem = problem or _bounded(
            f"transfer.consumed[{index}].quantity", consumed.quantity, 1, limits.stock_quantity_max
        )
    return problem


def settle_transfer(command: SettleTransfer) -> Invalid | None:
    return _line_key("key", command.key) or _identifier("transfer_id", command.transfer_id)


def _transfer_ends(
    source: InventoryKey, target: InventoryKey, source_field: str, target_field: str
) -> Invalid | None:
    """One end is a key, the other one of its buckets."""
    problem = _line_key(source_field, source) or _line_key(target_field, target)
    if problem:
        return problem
    bucket, home = (source, target) if bucket_number(source) else (target, source)
    if bucket_number(home) or not bucket_number(bucket) or home_key(bucket) != home:
        return Invalid(target_field, f"must be a bucket of {source_field}, or its home")
    return None


def mark_stale(command: MarkStale) -> Invalid | None:
    """Issued by the shell's timer, never by a caller: its threshold must be positive."""
    if command.silent_ms <= 0:
        return Invalid("silent_ms", f"must be positive, got {command.silent_ms}")
    return None


def validate_feed_event(
    event: FeedEvent, merchant_id: str, partition: int | None, now_ms: int
) -> Invalid | None:
    """One event of a batch: the field (within the event) and the reason, or None.

    ``partition``: the one its key must be in (None: any). An event claims a time no later
    than ``feed_clock_skew_ms_max`` after ``now_ms``."""
    return validate_feed_event_key(event.key, merchant_id, partition) or validate_feed_fields(
        event, now_ms
    )


def validate_feed_event_key(
    key: InventoryKey, merchant_id: str, partition: int | None
) -> Invalid | None:
    """An event's key: well-formed, at the batch's merchant, in ``partition`` (None: any)."""
    problem = validate_feed_key(key, merchant_id)
    elsewhere = (
        partition is not None and partition_of(key.merchant_id, key.location_id) != partition
    )
    if problem is None and elsewhere:
        return Invalid("key", f"not in partition {partition}")
    return problem


def validate_feed_fields(event: FeedEvent, now_ms: int) -> Invalid | None:
    """An event's fields but its key (``validate_feed_event_key``)."""
    if not event.event_id:
        return Invalid("event_id", "must not be empty: it is what duplicates are found by")
    if len(event.event_id) > limits.event_id_length_max:
        return Invalid("event_id", f"at most {limits.event_id_length_max} characters")
    if event.kind is None:
        return Invalid("kind", "must be sale, return, receipt, adjustment or count")
    if event.occurred_at_ms <= 0:
        return Invalid("occurred_at_ms", "must be set: when it happened (Unix epoch ms)")
    ahead_ms = event.occurred_at_ms - now_ms
    if ahead_ms > limits.feed_clock_skew_ms_max:
        return Invalid("occurred_at_ms", f"{ahead_ms} ms in the future: is the clock right?")
    if len(event.reason) > limits.feed_reason_length_max:
        return Invalid("reason", f"at most {limits.feed_reason_length_max} characters")
    if event.delivery_id:
        if event.kind is not FeedEventKind.RECEIPT:
            return Invalid(
                "delivery_id", f"only a receipt names a delivery, not a {event.kind.value}"
            )
        problem = _identifier("delivery_id", event.delivery_id)
        if problem:
            return problem
    return _feed_quantity(event, event.kind)


def validate_feed_key(key: InventoryKey, merchant_id: str) -> Invalid | None:
    """What routing a feed event needs: a well-formed key at the batch's merchant."""
    problem = _key("key", key)
    if problem is None and key.merchant_id != merchant_id:
        return Invalid("key.merchant_id", "must be the batch's merchant_id")
    return problem


def _feed_quantity(event: FeedEvent, kind: FeedEventKind) -> Invalid | None:
    if kind.is_count:
        if event.count is None:
            return Invalid("count", "must be set for a count: the on_hand counted")
        if event.quantity:
            return Invalid("quantity", "not used by a count: the count field holds its value")
        return _bounded("count", event.count, 0, limits.stock_quantity_max)
    if event.count is not None:
        return Invalid("count", f"only a count carries one, not a {kind.value}")
    if kind is FeedEventKind.ADJUSTMENT:
        if event.quantity == 0:
            return Invalid("quantity", "must not be zero")
        return _bounded("quantity", abs(event.quantity), 1, limits.adjust_delta_max)
    return _bounded("quantity", event.quantity, 1, limits.adjust_delta_max)


def expire(command: Expire) -> Invalid | None:
    """Issued by the core and the shell's timer, never by a caller."""
    return None


def validate_identifier(field: str, value: str) -> Invalid | None:
    """An opaque id (merchant, SKU, location, reservation): non-empty, short, plain ASCII."""
    return _identifier(field, value)


def validate_key(field: str, key: InventoryKey) -> Invalid | None:
    """A key's three ids, with fields named ``<field>.merchant_id`` and so on."""
    return _key(field, key)


def validate_read(keys: Sequence[InventoryKey]) -> Invalid | None:
    """An availability read: 1 to ``availability_keys_max`` well-formed keys (a hot key's
    buckets among them: the router reads them to add a split key up)."""
    if not 0 < len(keys) <= limits.availability_keys_max:
        return Invalid("keys", f"1 to {limits.availability_keys_max} keys, got {len(keys)}")
    for index, key in enumerate(keys):
        problem = _line_key(f"keys[{index}]", key)
        if problem:
            return problem
    return None


def validate_hot_keys_read(keys: Sequence[InventoryKey]) -> Invalid | None:
    """A read of hot keys' parts: up to ``availability_keys_max`` keys (homes or buckets;
    none: every split key)."""
    if len(keys) > limits.availability_keys_max:
        return Invalid("keys", f"at most {limits.availability_keys_max} keys, got {len(keys)}")
    for index, key in enumerate(keys):
        problem = _line_key(f"keys[{index}]", key)
        if problem:
            return problem
    return None


def validate_locations_read(merchant_id: str, location_ids: Sequence[str]) -> Invalid | None:
    """A query by location (over-committed keys, feed health): a merchant and 1 to
    ``locations_read_max`` locations of it."""
    count_max = limits.locations_read_max
    if not 0 < len(location_ids) <= count_max:
        return Invalid("location_ids", f"1 to {count_max} locations, got {len(location_ids)}")
    problem = _identifier("merchant_id", merchant_id)
    for index, location_id in enumerate(location_ids):
        problem = problem or _identifier(f"location_ids[{index}]", location_id)
    return problem


def validate_watch_filter(
    merchant_id: str,
    location_ids: Sequence[str],
    sku_ids: Sequence[str],
    *,
    location_ids_max: int,
    sku_ids_max: int,
) -> Invalid | None:
    """A Watch filter: one merchant, bounded lists of ids, each id as Reserve accepts it."""
    problem = _identifier("merchant_id", merchant_id)
    for field, values, count_max in (
        ("location_ids", location_ids, location_ids_max),
        ("sku_ids", sku_ids, sku_ids_max),
    ):
        if problem:
            return problem
        if len(values) > count_max:
            return Invalid(field, f"at most {count_max}, got {len(values)}")
        for index, value in enumerate(values):
            problem = problem or _identifier(f"{field}[{index}]", value)
    return problem


def effective_ttl_s(ttl_s: int) -> int:
    """0 asks for the default TTL."""
    return ttl_s or limits.reservation_ttl_s_default


def _commit_lines(lines: tuple[Line, ...]) -> Invalid | None:
    if len(lines) > limits.reserve_lines_max:
        return Invalid("lines", f"at most {limits.reserve_lines_max} lines, got {len(lines)}")
    seen: dict[InventoryKey, int] = {}
    for index, line in enumerate(lines):
        field = f"lines[{index}]"
        problem = _line_key(f"{field}.key", line.key) or _bounded(
            f"{field}.quantity", line.quantity, 0, limits.line_quantity_max
        )
        if problem:
            return problem
        if line.key in seen:
            return Invalid(f"{field}.key", f"same key as lines[{seen[line.key]}]")
        seen[line.key] = index
    return None


def _adjust(command: AdjustStock) -> Invalid | None:
    if command.reason is None:
        return Invalid("reason", "must name why stock moved (receipt, sale, return, ...)")
    if command.delta == 0:
        return Invalid("delta", "must not be zero")
    if abs(command.delta) > limits.adjust_delta_max:
        return Invalid("delta", f"magnitude at most {limits.adjust_delta_max}")
    if command.occurred_at_ms < 0:
        return Invalid("occurred_at_ms", "must not be negative")
    return None


def _scope(merchant_id: str, idempotency_key: str) -> Invalid | None:
    return _identifier("merchant_id", merchant_id) or _idempotency_key(idempotency_key)


def _key_scope(key: InventoryKey, idempotency_key: str) -> Invalid | None:
    return _key("key", key) or _idempotency_key(idempotency_key)


def _line_key(field: str, key: InventoryKey) -> Invalid | None:
    """A key a reservation may hold: a caller's key, or one of its buckets (``bucket_key``),
    which the router names when it reserves a hot key there."""
    location_id, separator, number = key.location_id.partition(BUCKET_SEPARATOR)
    if not separator:
        return _key(field, key)
    problem = _key(field, InventoryKey(key.merchant_id, key.sku_id, location_id))
    if problem is None and not bucket_number(key):
        return Invalid(f"{field}.location_id", f"bucket number {number!r} is not a number")
    if problem is None and bucket_number(key) > limits.bucket_number_max:
        return Invalid(f"{field}.location_id", f"bucket number above {limits.bucket_number_max}")
    return problem


def _key(field: str, key: InventoryKey) -> Invalid | None:
    return (
        _identifier(f"{field}.merchant_id", key.merchant_id)
        or _identifier(f"{field}.sku_id", key.sku_id)
        or _identifier(f"{field}.location_id", key.location_id)
    )


def _identifier(field: str, value: str) -> Invalid | None:
    if not value:
        return Invalid(field, "must not be empty")
    if len(value) > limits.identifier_length_max:
        return Invalid(field, f"at most {limits.identifier_length_max} characters")
    if not IDENTIFIER_CHARACTERS.issuperset(value):
        return Invalid(field, "only letters, digits and . _ : - are allowed")
    return None


def _idempotency_key(value: str) -> Invalid | None:
    if not value:
        return Invalid("idempotency_key", "must not be empty: every mutation carries one")
    if len(value) > limits.idempotency_key_length_max:
        return Invalid("idempotency_key", f"at most {limits.idempotency_key_length_max} characters")
    return None


def _ttl(ttl_s: int, *, zero_is_default: bool) -> Invalid | None:
    if ttl_s == 0 and zero_is_default:
        return None
    return _bounded("ttl_s", ttl_s, limits.reservation_ttl_s_min, limits.reservation_ttl_s_max)


def _expected_version(version: int | None) -> Invalid | None:
    if version is not None and version < 0:
        return Invalid("expected_version", "must not be negative")
    return None


def _bounded(field: str, value: int, low: int, high: int) -> Invalid | None:
    if not low <= value <= high:
        return Invalid(field, f"must be between {low} and {high}, got {value}")
    return None
