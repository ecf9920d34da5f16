"""The state of one partition: its tables, the indexes derived from them, and the invariants.

Tables (each a ``Table`` with a change log; checkpoint, restore, snapshot and the store work
over ``TABLES`` by name, with no code per table):

    stock          InventoryKey -> StockRow                  on_hand, reserved, safety_stock
    reservations   reservation_id -> Reservation             live and recently finished
    idempotency    (merchant_id, idempotency_key) -> entry   original answers, oldest first
    feed           InventoryKey -> KeyHistory                last count, deltas after it
    feed_locations FeedLocation -> LocationFeed              each source's health, staleness
    deliveries     (merchant_id, delivery_id) -> Delivery    units still expected, ETA
    splits         InventoryKey -> Split                     a hot key at its home: buckets
    quotas         InventoryKey -> Quota                     a hot key's bucket: its grants

Indexes derived from the tables, rebuilt by ``rebuild_indexes`` after a restore:
    expiry         live reservations by expiry (``ExpiryIndex``)
    holds          per key, the live reservations holding it and how much, oldest first
    finished       finished reservations in the order they finished, oldest first
    over_committed the keys whose available is below zero, in key order on demand
    feed_ids       (merchant_id, source, event_id) -> (key, fact) of every feed fact kept
    silence        the live (not stale) fed locations, least recently heard from first
    stale_keys     per stale location, the keys flagged stale (every row of it)
    incoming       per key, the deliveries expecting it and their units

Invariants (``check_invariants``), true after every step:
  - reserved of a key equals the sum of the live reservation lines holding it;
  - no live reservation holds a non-positive quantity; reserved >= 0; safety_stock >= 0;
  - a key's feed history is in order, after its count, and within its bound;
  - a row is flagged stale (with its location's time) exactly while its location is stale;
  - a row's incoming is the units its deliveries still expect, at their earliest ETA;
  - a hot key's home allots exactly what its split counts out; a bucket holds no more than it
    was granted, never offers below zero, and has no physical facts but its commits;
  - the indexes agree with the tables; every bound holds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import _limits as limits
from ._buckets import QUOTAS, SPLITS, Quota, Split
from ._codec import dataclass_codec, key_from_data, key_to_data, row_from_data, row_to_data
from ._deliveries import DELIVERIES, Delivery, DeliveryId
from ._expiry import ExpiryIndex
from ._health import FEED_LOCATIONS, LocationFeed
from ._history import FEED, Fact, KeyHistory
from ._idempotency import IDEMPOTENCY, IdempotencyEntry, Scope
from ._model import (
    EMPTY_ROW,
    AvailabilityChanged,
    ChangeReason,
    FeedLocation,
    InventoryKey,
    Reservation,
    ReservationState,
    StockLevel,
    StockRow,
    bucket_number,
    home_key,
)
from ._outcomes import CapacityExhausted, OverCommit
from ._tables import Table, TableSchema
from ._usage import ProcessUsage

STOCK: TableSchema[InventoryKey, StockRow] = TableSchema(
    name="stock",
    key_to_data=key_to_data,
    key_from_data=key_from_data,
    row_to_data=row_to_data,
    row_from_data=row_from_data,
)


def _text(data: Any) -> str:
    if not isinstance(data, str):
        raise ValueError(f"expected a string key, got {data!r}")
    return data


RESERVATIONS: TableSchema[str, Reservation] = TableSchema(
    name="reservations",
    key_to_data=str,
    key_from_data=_text,
    row_to_data=dataclass_codec(Reservation).encode,
    row_from_data=dataclass_codec(Reservation).decode,
    # The order finished reservations are forgotten in: by the lsn that finished them,
    # then by id within one record (rules/reservations.py, expire).
    restore_order=lambda r: (r.finished_lsn, r.reservation_id),
)

# Every table, by name: what a checkpoint writes and a restore reads.
TABLES: dict[str, TableSchema[Any, Any]] = {
    schema.name: schema
    for schema in (
        STOCK,
        RESERVATIONS,
        IDEMPOTENCY,
        FEED,
        FEED_LOCATIONS,
        DELIVERIES,
        SPLITS,
        QUOTAS,
    )
}
FeedId = tuple[str, str, str]  # (merchant_id, source, event_id)
_COUNTS = frozenset(
    {
        "on_hand",
        "reserved",
        "safety_stock",
        "stale_buffer",
        "stale_since_ms",
        "incoming",
        "incoming_eta_ms",
        "allotted",
    }
)


@dataclass(slots=True)
class Effects:
    """Where one record's handler writes: its lsn, its time, and the events it emits."""

    partition: int
    lsn: int
    now_ms: int
    events: list[AvailabilityChanged]


class PartitionState:
    __slots__ = (
        "attached",
        "deliveries",
        "expiry",
        "feed",
        "feed_fact_count",
        "feed_ids",
        "feed_locations",
        "finished",
        "holds",
        "idempotency",
        "incoming",
        "live_apply",
        "over_committed",
        "partition",
        "quotas",
        "reservations",
        "silence",
        "splits",
        "stale_keys",
        "stock",
        "usage",
    )

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.stock: Table[InventoryKey, StockRow] = Table(STOCK)
        self.reservations: Table[str, Reservation] = Table(RESERVATIONS)
        self.idempotency: Table[Scope, IdempotencyEntry] = Table(IDEMPOTENCY)
        self.feed: Table[InventoryKey, KeyHistory] = Table(FEED)
        self.feed_ids: dict[FeedId, tuple[InventoryKey, Fact]] = {}
        self.feed_fact_count = 0  # facts the histories keep (own ones too)
        self.feed_locations: Table[FeedLocation, LocationFeed] = Table(FEED_LOCATIONS)
        self.silence: dict[FeedLocation, None] = {}
        self.stale_keys: dict[FeedLocation, dict[InventoryKey, None]] = {}
        self.deliveries: Table[DeliveryId, Delivery] = Table(DELIVERIES)
        self.incoming: dict[InventoryKey, dict[str, int]] = {}
        self.splits: Table[InventoryKey, Split] = Table(SPLITS)
        self.quotas: Table[InventoryKey, Quota] = Table(QUOTAS)
        self.expiry = ExpiryIndex()
        self.holds: dict[InventoryKey, dict[str, int]] = {}
        self.finished: OrderedDict[str, None] = OrderedDict()
        # The process's totals (ProcessUsage); a private one until the shell attaches it.
        self.usage = ProcessUsage()
        self.attached = False
        # False while replaying: per-process bounds refuse only live commands.
        self.live_apply = True
        # Keys whose available is below zero (sold offline, adjusted down), kept as they
        # change: watching them costs nothing per key, and listing them scans only them.
        self.over_committed: dict[InventoryKey, None] = {}

    @property
    def tables(self) -> dict[str, Table[Any, Any]]:
        tables = (
            self.stock,
            self.reservations,
            self.idempotency,
            self.feed,
            self.feed_locations,
            self.deliveries,
            self.splits,
            self.quotas,
        )
        return {t.schema.name: t for t in tables}

    @property
    def live_reservation_count(self) -> int:
        return len(self.reservations) - len(self.finished)

    # -------------------------------------------------------------------------- usage

    def attach(self, usage: ProcessUsage) -> None:
        """Count this partition into the process's totals from now on."""
        assert not self.attached, "attached twice"
        usage.add(*self._counted())
        self.usage, self.attached = usage, True

    def detach(self) -> None:
        """The process no longer holds this partition: take its counts out of the totals."""
        if self.attached:
            counted = self._counted()
            self.usage.add(*(-n for n in counted))
            self.usage = ProcessUsage(*counted)
            self.attached = False

    def _counted(self) -> tuple[int, int, int, int]:
        """What this partition counts into its usage, in ``ProcessUsage.add``'s order."""
        counts = (len(self.stock), self.live_reservation_count, len(self.idempotency))
        return (*counts, self.feed_fact_count)

    def refuse_new_key(self, pending: int = 0) -> CapacityExhausted | None:
        """A new key, ``pending`` more already promised by the record being decided."""
        if len(self.stock) + pending >= limits.partition_keys_max:
            return CapacityExhausted("partition_keys_max", limits.partition_keys_max)
        return self.usage.refuse_key(pending) if self.live_apply else None

    def refuse_new_reservation(self) -> CapacityExhausted | None:
        if self.live_reservation_count >= limits.reservations_live_max:
            return CapacityExhausted("reservations_live_max", limits.reservations_live_max)
        return self.usage.refuse_reservation() if self.live_apply else None

    def refuse_new_answer(self) -> CapacityExhausted | None:
        if len(self.idempotency) >= limits.idempotency_keys_max:
            return CapacityExhausted("idempotency_keys_max", limits.idempotency_keys_max)
        return self.usage.refuse_idempotency_entry() if self.live_apply else None

    def refuse_feed_facts(self) -> CapacityExhausted | None:
        return self.usage.refuse_feed_facts() if self.live_apply else None

    # -------------------------------------------------------------------------- stock

    def change(
        self,
        key: InventoryKey,
        at: Effects,
        reason: ChangeReason,
        absorbed: int = 0,
        **counts: int,
    ) -> StockRow:
        """Set some counts of a key, bump its version (by 1, and by ``absorbed`` more: a hot
        key's home taking in its buckets' versions) and emit the change event. A new key at
        a stale location is flagged stale with it (with no buffer: it has no sales yet)."""
        found = self.stock.get(key)
        if found is None:
            self.usage.keys += 1
            before = EMPTY_ROW
            stale_since_ms = self._stale_since(key) if self.stale_keys else 0
        else:
            before = found
            stale_since_ms = found.stale_since_ms
        after = StockRow(  # not dataclasses.replace: ~4x slower, on every change of a key
            counts.get("on_hand", before.on_hand),
            counts.get("reserved", before.reserved),
            counts.get("safety_stock", before.safety_stock),
            before.version + 1 + absorbed,
            counts.get("stale_buffer", before.stale_buffer),
            counts.get("stale_since_ms", stale_since_ms),
            counts.get("incoming", before.incoming),
            counts.get("incoming_eta_ms", before.incoming_eta_ms),
            counts.get("allotted", before.allotted),
        )
        assert counts.keys() <= _COUNTS, counts
        if after.reserved < 0:
            raise AssertionError(f"reserved of {key} would go negative: {after}")
        if after.stale_since_ms != before.stale_since_ms:
            self._flag_stale(key, after.stale_since_ms != 0)
        self.stock.put(key, after)
        if after.available < 0:
            self.over_committed[key] = None
        elif before.available < 0:
            del self.over_committed[key]
        at.events.append(
            AvailabilityChanged(key, self.partition, at.lsn, reason, before, after, at.now_ms)
        )
        return after

    def _stale_since(self, key: InventoryKey) -> int:
        """When the key's location went stale (0: it is live)."""
        if (key.merchant_id, key.location_id) not in self.stale_keys:
            return 0
        feed = self.feed_locations[FeedLocation(key.merchant_id, key.location_id)]
        return feed.stale_since_ms

    def _flag_stale(self, key: InventoryKey, stale: bool) -> None:
        flagged = self.stale_keys[FeedLocation(key.merchant_id, key.location_id)]
        if stale:
            flagged[key] = None
        else:
            del flagged[key]

    def incoming_of(self, key: InventoryKey) -> tuple[int, int]:
        """The units the key's deliveries still expect, and their earliest ETA (0, 0: none)."""
        expecting = self.incoming.get(key)
        if not expecting:
            return (0, 0)
        merchant_id = key.merchant_id
        eta_ms = min(self.deliveries[(merchant_id, d)].eta_ms for d in expecting)
        return (sum(expecting.values()), eta_ms)

    def level(self, key: InventoryKey) -> StockLevel:
        return StockLevel.of(key, self.stock.get(key))

    def over_commit(self, key: InventoryKey) -> OverCommit | None:
        """Exposure of an over-committed key and the live reservations at risk, newest first."""
        exposure = -self.stock[key].available
        if exposure <= 0:
            return None
        at_risk: list[str] = []
        covered = 0
        holders = self.holds.get(key, {})
        for reservation_id in reversed(holders):  # holders are kept oldest first
            if covered >= exposure:
                break
            at_risk.append(reservation_id)
            covered += holders[reservation_id]
        return OverCommit(exposure, tuple(at_risk))

    # -------------------------------------------------------------------- reservations

    def live(self, reservation_id: str) -> Reservation | None:
        found = self.reservations.get(reservation_id)
        return found if found is not None and found.state is ReservationState.ACTIVE else None

    def put_live(self, reservation: Reservation) -> None:
        """A new or extended live reservation (its holds are set by ``hold``)."""
        if self.live(reservation.reservation_id) is None:
            self.usage.reservations_live += 1
        self.reservations.put(reservation.reservation_id, reservation)
        self.expiry.set(reservation.reservation_id, reservation.expires_at_ms)

    def hold(self, reservation: Reservation) -> None:
        for line in reservation.lines:
            self.holds.setdefault(line.key, {})[reservation.reservation_id] = line.quantity

    def finish(self, done: Reservation) -> None:
        """A live reservation committed, released or expired: its holds go."""
        assert done.state is not ReservationState.ACTIVE, done
        rid = done.reservation_id
        for line in done.lines:
            holders = self.holds[line.key]
            del holders[rid]
            if not holders:
                del self.holds[line.key]
        self.expiry.discard(rid)
        self.reservations.put(rid, done)
        self.finished[rid] = None
        self.usage.reservations_live -= 1

    # ------------------------------------------------------------------- feed history

    def put_history(self, key: InventoryKey, before: KeyHistory, after: KeyHistory) -> None:
        """A key's history, ``before`` as the table held it (EMPTY_HISTORY: none), is now
        ``after``; its facts are counted against the process's bound."""
        grown = after.fact_count - before.fact_count
        self.feed_fact_count += grown
        self.usage.feed_facts += grown
        self.feed.put(key, after)

    def index_facts(self, key: InventoryKey, facts: Iterable[Fact]) -> None:
        """Feed facts a key's history now keeps: found by (merchant, source, event_id)."""
        for fact in facts:
            if not fact.is_own:
                self.feed_ids[(key.merchant_id, fact.source, fact.event_id)] = (key, fact)

    def unindex_facts(self, key: InventoryKey, facts: Iterable[Fact]) -> None:
        """Facts a key's history dropped (covered by a count, or out of its window)."""
        for fact in facts:
            if not fact.is_own:
                found = self.feed_ids.get((key.merchant_id, fact.source, fact.event_id))
                if found is not None and found[1] == fact:
                    del self.feed_ids[(key.merchant_id, fact.source, fact.event_id)]

    # --------------------------------------------------------------------- idempotency

    def remember(self, entry: IdempotencyEntry) -> None:
        scope = (entry.merchant_id, entry.idempotency_key)
        assert scope not in self.idempotency, scope
        self.idempotency.put(scope, entry)
        self.usage.idempotency_entries += 1

    def forget_old_answers(self, now_ms: int) -> None:
        """Drop idempotency entries past their retention, oldest first."""
        horizon_ms = now_ms - limits.idempotency_retention_ms
        while (oldest := self.idempotency.oldest()) is not None:
            if oldest[1].recorded_at_ms >= horizon_ms:
                break
            self.idempotency.remove(oldest[0])
            self.usage.idempotency_entries -= 1

    def forget_finished(self, now_ms: int) -> None:
        """Drop finished reservations past their retention or beyond their bound."""
        horizon_ms = now_ms - limits.reservations_finished_retention_ms
        while self.finished:
            reservation_id = next(iter(self.finished))
            done = self.reservations[reservation_id]
            too_many = len(self.finished) > limits.reservations_finished_max
            if not too_many and done.state_changed_at_ms >= horizon_ms:
                break
            del self.finished[reservation_id]
            self.reservations.remove(reservation_id)

    # ------------------------------------------------------------------------ restore

    def rebuild_indexes(self) -> None:
        """Derive expiry, holds, finish order and counts from freshly loaded tables."""
        assert not self.attached, "restore into a partition no process counts yet"
        self.expiry = ExpiryIndex()
        self.holds = {}
        self.finished = OrderedDict()
        self.feed_ids = {}
        self.feed_fact_count = 0
        for key, history in self.feed.items():
            self.index_facts(key, history.facts)
            self.feed_fact_count += history.fact_count
        self.silence = {}
        self.stale_keys = {}
        for location, feed in self.feed_locations.items():  # least recently heard first
            if feed.stale_since_ms:
                self.stale_keys[location] = {}
            else:
                self.silence[location] = None
        for key, row in self.stock.items():
            if row.stale_since_ms:
                self.stale_keys[FeedLocation(key.merchant_id, key.location_id)][key] = None
        self.incoming = {}
        for (_, delivery_id), delivery in self.deliveries.items():
            for line in delivery.lines:
                self.incoming.setdefault(line.key, {})[delivery_id] = line.quantity
        live = []
        for reservation in self.reservations.values():  # in restore order (by finish)
            if reservation.state is ReservationState.ACTIVE:
                live.append(reservation)
            else:
                self.finished[reservation.reservation_id] = None
        for reservation in sorted(live, key=lambda r: r.created_lsn):  # holds: oldest first
            self.expiry.set(reservation.reservation_id, reservation.expires_at_ms)
            self.hold(reservation)
        self.usage = ProcessUsage(*self._counted())
        self.over_committed = {k: None for k, row in self.stock.items() if row.available < 0}

    # ---------------------------------------------------------------------- invariants

    def check_invariants(self) -> None:
        """The full check, for tests after every step. Raises AssertionError."""
        held: dict[InventoryKey, int] = {}
        live = 0
        for reservation in self.reservations.values():
            if reservation.state is not ReservationState.ACTIVE:
                assert reservation.reservation_id in self.finished, reservation
                continue
            live += 1
            for line in reservation.lines:
                assert line.quantity > 0, reservation
                held[line.key] = held.get(line.key, 0) + line.quantity
                holders = self.holds.get(line.key, {})
                assert holders.get(reservation.reservation_id) == line.quantity, reservation
        for key, row in self.stock.items():
            assert row.reserved == held.get(key, 0), (key, row, held.get(key, 0))
            assert row.reserved >= 0 and row.safety_stock >= 0, (key, row)
            assert row.version >= 1, (key, row)
        assert set(held) <= set(self.stock), "a reservation holds a key with no row"
        assert sum(len(h) for h in self.holds.values()) == sum(
            len(r.lines) for r in self.reservations.values() if r.state is ReservationState.ACTIVE
        )
        assert len(self.finished) + live == len(self.reservations)
        assert len(self.expiry) == live
        self.expiry.check()
        assert live <= limits.reservations_live_max
        assert len(self.stock) <= limits.partition_keys_max
        assert len(self.idempotency) <= limits.idempotency_keys_max
        assert len(self.finished) <= limits.reservations_finished_max + 1
        assert set(self.over_committed) == {k for k, r in self.stock.items() if r.available < 0}
        self._check_feed()
        if not self.attached:  # a private usage counts exactly this partition
            own = (len(self.stock), live, len(self.idempotency), self.feed_fact_count)
            assert (
                self.usage.keys,
                self.usage.reservations_live,
                self.usage.idempotency_entries,
                self.usage.feed_facts,
            ) == own

    def _check_feed(self) -> None:
        indexed = facts = 0
        for key, history in self.feed.items():
            facts += history.fact_count
            assert key in self.stock, ("a history of a key with no row", key)
            orders = [d.order for d in history.deltas]
            assert orders == sorted(orders) and len(set(orders)) == len(orders), (key, history)
            assert len(history.deltas) <= limits.feed_history_per_key_max, key
            if history.count is not None:
                assert all(o > history.count.order for o in orders), (key, history)
            for fact in history.facts:
                if not fact.is_own:
                    indexed += 1
                    found = self.feed_ids.get((key.merchant_id, fact.source, fact.event_id))
                    assert found == (key, fact), (key, fact, found)
        assert indexed == len(self.feed_ids), "the feed index holds a fact no history keeps"
        assert facts == self.feed_fact_count, (facts, self.feed_fact_count)
        self._check_staleness()
        self._check_deliveries()
        self._check_buckets()

    def _check_buckets(self) -> None:
        for key, split in self.splits.items():
            row = self.stock.get(key)
            assert row is not None and not bucket_number(key), ("a split of no home row", key)
            assert len(split.granted) == len(split.buckets) <= limits.split_buckets_max, split
            assert len(set(split.buckets)) == len(split.buckets), split
            assert all(home_key(b) == key and bucket_number(b) for b in split.buckets), split
            assert all(g >= 0 for g in split.granted), (key, split)
            assert row.allotted == sum(split.granted), (key, row, split)
            assert len(split.sending) <= limits.quota_transfers_pending_max, split
            for transfer in split.sending:
                assert transfer.source == key and transfer.target in split.buckets, transfer
        for key, row in self.stock.items():
            assert row.allotted >= 0, (key, row)
            if row.allotted:
                assert key in self.splits, ("allots units with no split", key, row)
            if not bucket_number(key):
                assert key not in self.quotas, ("a quota of a key that is no bucket", key)
                continue
            quota = self.quotas.get(key)
            assert quota is not None, ("a bucket with no quota", key)
            assert quota.home == home_key(key), (key, quota)
            assert row.safety_stock == row.stale_buffer == row.incoming == 0, (key, row)
            assert 0 <= row.reserved <= row.on_hand <= quota.granted, (key, row, quota)
            history = self.feed.get(key)
            if history is not None:
                assert history.count is None, (key, history)
                assert all(f.is_own and f.kind == "commit" for f in history.deltas), history
        for key, quota in self.quotas.items():
            assert key in self.stock and bucket_number(key), ("a quota of no bucket row", key)
            assert len(quota.sending) <= limits.quota_transfers_pending_max, quota
            for transfer in quota.sending:
                assert transfer.source == key and transfer.target == quota.home, transfer

    def _check_deliveries(self) -> None:
        expecting: dict[InventoryKey, dict[str, int]] = {}
        for (merchant_id, delivery_id), delivery in self.deliveries.items():
            assert delivery.lines, ("a delivery with nothing left to receive", delivery_id)
            assert len(delivery.lines) <= limits.delivery_lines_max, delivery_id
            for line in delivery.lines:
                assert line.quantity > 0, (delivery_id, line)
                assert line.key.merchant_id == merchant_id, (delivery_id, line)
                assert line.key.location_id == delivery.location_id, (delivery_id, line)
                assert line.key in self.stock, ("an expected key with no row", line)
                expecting.setdefault(line.key, {})[delivery_id] = line.quantity
        assert expecting == self.incoming, "the incoming index disagrees with the deliveries"
        assert len(self.deliveries) <= limits.deliveries_max
        for key, row in self.stock.items():
            assert (row.incoming, row.incoming_eta_ms) == self.incoming_of(key), (key, row)

    def _check_staleness(self) -> None:
        flagged: dict[FeedLocation, set[InventoryKey]] = {}
        for key, row in self.stock.items():
            assert row.stale_buffer >= 0, (key, row)
            if not row.stale_since_ms:
                assert row.stale_buffer == 0, (key, row)
                continue
            location = FeedLocation(key.merchant_id, key.location_id)
            feed = self.feed_locations.get(location)
            assert feed is not None and feed.stale_since_ms == row.stale_since_ms, (key, row)
            flagged.setdefault(location, set()).add(key)
        stale = {loc for loc, feed in self.feed_locations.items() if feed.stale_since_ms}
        assert set(self.stale_keys) == stale, (set(self.stale_keys), stale)
        for location in stale:
            assert set(self.stale_keys[location]) == flagged.get(location, set()), location
        heard = [
            (feed.last_received_at_ms, loc)
            for loc, feed in self.feed_locations.items()
            if not feed.stale_since_ms
        ]
        assert set(self.silence) == {loc for _, loc in heard}
        times = [self.feed_locations[loc].last_received_at_ms for loc in self.silence]
        assert times == sorted(times), "the silence index is least recently heard first"
        for feed in self.feed_locations.values():
            assert 0 < len(feed.sources) <= limits.feed_sources_per_location_max, feed


def levels_of(state: PartitionState, keys: Iterable[InventoryKey]) -> tuple[StockLevel, ...]:
    return tuple(state.level(key) for key in keys)
