"""Stale locations (DESIGN section 9): a store whose feeds fall silent shows shoppers a
degraded availability, flagged with since when, until it is heard from again.

First the rules one by one (when a location goes stale, the buffer, reservations against it,
heartbeats, the return, new keys, health, bounds); then a state machine against a plain
model written from those rules: any mix of feed events, heartbeats, timer ticks, reserves,
stock-takes and the clock, with the invariants, a replay of the ledger and a restore from a
checkpoint checked after every step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import hypothesis.strategies as st
from hypothesis import event, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from inventory_core import (
    TABLES,
    ChangeReason,
    Command,
    FeedEvent,
    FeedEventKind,
    FeedLocation,
    Ingest,
    Ingested,
    InsufficientStock,
    Invalid,
    InventoryKey,
    Line,
    MarkedStale,
    MarkStale,
    Outcome,
    Partition,
    Record,
    Reserve,
    Reserved,
    SetStock,
    command_from_data,
    command_to_data,
    limits,
    partition_of,
)

MERCHANT = "m1"
PARTITION = partition_of(MERCHANT, "store-1")
# Two stores of one partition: one goes stale while the other is still heard from.
STORES = (
    "store-1",
    next(f"s-{i}" for i in range(100_000) if partition_of(MERCHANT, f"s-{i}") == PARTITION),
)
T0_MS = 1_780_000_000_000
MINUTE_MS = 60_000
SILENCE_MS = limits.feed_silence_stale_ms
SOURCE = "pos-1"
TTL_S = 3600  # the machine's reservations: some expire while a store is stale


def key(sku: str, store: str = STORES[0]) -> InventoryKey:
    return InventoryKey(MERCHANT, sku, store)


def sale(event_id: str, quantity: int, at_ms: int, of: InventoryKey) -> FeedEvent:
    return FeedEvent(event_id, FeedEventKind.SALE, of, at_ms, quantity=quantity)


def stocked(*keys: InventoryKey, on_hand: int = 100) -> Partition:
    partition = Partition(PARTITION)
    for index, k in enumerate(keys):
        partition.apply(SetStock(k, f"set-{index}", on_hand, None, T0_MS))
    return partition


def location(store: str = STORES[0]) -> FeedLocation:
    return FeedLocation(MERCHANT, store)


# ----------------------------------------------------------------------------- going stale


def test_a_location_silent_past_the_threshold_holds_back_its_last_hour_of_till_sales() -> None:
    milk, eggs, bread = key("milk"), key("eggs"), key("bread")
    partition = stocked(milk, eggs, bread)
    # Sales over 90 minutes: 1 milk a minute; eggs sold only before the last hour.
    events = [sale(f"m{i}", 1, T0_MS + i * MINUTE_MS, milk) for i in range(90)]
    events += [sale(f"e{i}", 3, T0_MS + i * MINUTE_MS, eggs) for i in range(10)]
    last_ms = T0_MS + 89 * MINUTE_MS
    partition.apply(Ingest(MERCHANT, SOURCE, tuple(events), last_ms + 1000))
    heard_ms = last_ms + 1000

    assert partition.next_timer_ms() == heard_ms + SILENCE_MS
    early = partition.on_timer(heard_ms + SILENCE_MS - 1)
    assert early.records == () and not early.events, "not silent long enough yet"

    step = partition.on_timer(heard_ms + SILENCE_MS)
    stale_ms = heard_ms + SILENCE_MS
    assert step.outcome == MarkedStale((location(),))
    assert [r.kind for r in step.records] == ["mark_stale"]
    # Every key of the store changes once, in key order, flagged since now.
    assert [e.key for e in step.events] == sorted([milk, eggs, bread])
    assert {e.reason for e in step.events} == {ChangeReason.FEED_STALE}
    levels = {level.key: level for level in partition.levels([milk, eggs, bread], stale_ms)}
    # The hour before the newest event holds 60 sales of milk (minutes 30 to 89).
    assert levels[milk].stale_buffer == 60
    assert levels[eggs].stale_buffer == 0  # sold only earlier than that hour
    assert levels[bread].stale_buffer == 0
    assert all(level.degraded and level.stale_since_ms == stale_ms for level in levels.values())
    assert levels[milk].available == 10 and levels[milk].sellable == 0
    assert levels[eggs].sellable == 70
    partition.check_invariants()


def test_a_reservation_must_fit_in_available_less_the_buffer() -> None:
    milk = key("milk")
    partition = stocked(milk)
    sales = tuple(sale(f"s{i}", 2, T0_MS + i * MINUTE_MS, milk) for i in range(10))
    partition.apply(Ingest(MERCHANT, SOURCE, sales, T0_MS + 10 * MINUTE_MS))
    stale_ms = T0_MS + 10 * MINUTE_MS + SILENCE_MS
    partition.on_timer(stale_ms)
    # on_hand 80, buffer 20: 60 may be promised online.
    refused = partition.apply(Reserve(MERCHANT, "r1", (Line(milk, 61),), 60, stale_ms + 1)).outcome
    assert isinstance(refused, InsufficientStock)
    assert refused.lines[0].available == 60
    taken = partition.apply(Reserve(MERCHANT, "r2", (Line(milk, 60),), 60, stale_ms + 2)).outcome
    assert isinstance(taken, Reserved)
    (level,) = partition.levels([milk], stale_ms + 3)
    assert (level.available, level.stale_buffer, level.sellable) == (20, 20, 0)
    partition.check_invariants()


def test_a_location_that_never_had_a_feed_never_goes_stale() -> None:
    partition = stocked(key("milk"))
    assert partition.next_timer_ms() is None
    step = partition.on_timer(T0_MS + 10 * SILENCE_MS)
    assert step.records == () and not step.events
    assert partition.feed_health(MERCHANT, [STORES[0]], T0_MS) == ()


def test_one_silent_store_goes_stale_while_another_is_heard_from() -> None:
    here, there = key("milk", STORES[0]), key("milk", STORES[1])
    partition = stocked(here, there)
    partition.apply(Ingest(MERCHANT, SOURCE, (sale("a", 1, T0_MS, here),), T0_MS))
    partition.apply(Ingest(MERCHANT, SOURCE, (sale("b", 1, T0_MS, there),), T0_MS))
    partition.apply(Ingest(MERCHANT, SOURCE, (), T0_MS + 4 * MINUTE_MS, alive_at=(STORES[1],)))
    partition.on_timer(T0_MS + SILENCE_MS)
    levels = partition.levels([here, there], T0_MS + SILENCE_MS)
    assert [level.degraded for level in levels] == [True, False]
    partition.check_invariants()


# -------------------------------------------------------------------------------- heartbeats


def test_a_heartbeat_keeps_a_location_live_and_is_recorded_at_most_once_a_minute() -> None:
    milk = key("milk")
    partition = stocked(milk)
    partition.apply(Ingest(MERCHANT, SOURCE, (sale("a", 1, T0_MS, milk),), T0_MS))
    kept: list[Command] = []
    for second in range(0, 10 * 60, 10):  # a beat every 10 s for 10 minutes
        step = partition.apply(
            Ingest(MERCHANT, SOURCE, (), T0_MS + second * 1000, alive_at=(STORES[0],))
        )
        assert isinstance(step.outcome, Ingested)
        kept.extend(r.command for r in step.records)
        partition.on_timer(T0_MS + second * 1000 + 5000)
    # The sale at 0 was heard; then a record at each minute 1 to 9, not one per beat.
    assert [c.now_ms - T0_MS for c in kept] == [m * MINUTE_MS for m in range(1, 10)]
    (level,) = partition.levels([milk], T0_MS + 10 * MINUTE_MS)
    assert not level.degraded


def test_a_heartbeat_of_a_location_never_fed_keeps_nothing() -> None:
    partition = stocked(key("milk"))
    step = partition.apply(Ingest(MERCHANT, SOURCE, (), T0_MS, alive_at=(STORES[0],)))
    assert step.outcome == Ingested((), (), ()) and step.records == ()
    assert partition.next_timer_ms() is None


def test_a_heartbeat_of_a_location_of_another_partition_is_refused_whole() -> None:
    elsewhere = next(
        f"store-x{i}" for i in range(1000) if partition_of(MERCHANT, f"store-x{i}") != PARTITION
    )
    milk = key("milk")
    partition = stocked(milk)
    command = Ingest(
        MERCHANT, SOURCE, (sale("a", 1, T0_MS, milk),), T0_MS, alive_at=(STORES[0], elsewhere)
    )
    step = partition.apply(command)
    assert step.outcome == Invalid("alive_at[1]", f"not in partition {PARTITION}")
    assert step.records == ()
    (level,) = partition.levels([milk], T0_MS)
    assert level.on_hand == 100, "nothing of the command applied"


# ------------------------------------------------------------------------ heard from again


def test_the_backlog_clears_every_flag_in_the_record_that_applies_it() -> None:
    milk, eggs, bread = key("milk"), key("eggs"), key("bread")
    partition = stocked(milk, eggs, bread)
    partition.apply(Ingest(MERCHANT, SOURCE, (sale("a", 1, T0_MS, milk),), T0_MS))
    partition.on_timer(T0_MS + SILENCE_MS)
    backlog = (sale("b", 5, T0_MS + MINUTE_MS, milk), sale("c", 2, T0_MS + 2 * MINUTE_MS, eggs))
    step = partition.apply(Ingest(MERCHANT, SOURCE, backlog, T0_MS + 60 * MINUTE_MS))
    assert len(step.records) == 1
    # One change per key: the sold keys by their sale, the other by the feed's return.
    reasons = {e.key: e.reason for e in step.events}
    assert len(step.events) == 3
    assert reasons == {
        milk: ChangeReason.SALE,
        eggs: ChangeReason.SALE,
        bread: ChangeReason.FEED_RESUMED,
    }
    assert all(e.after.stale_since_ms == 0 and e.after.stale_buffer == 0 for e in step.events)
    levels = partition.levels([milk, eggs, bread], T0_MS + 60 * MINUTE_MS)
    assert [lv.on_hand for lv in levels] == [94, 98, 100]
    assert not any(lv.degraded for lv in levels)
    partition.check_invariants()


def test_a_key_created_at_a_stale_location_is_flagged_and_cleared_with_it() -> None:
    milk, new = key("milk"), key("new-sku")
    partition = stocked(milk)
    partition.apply(Ingest(MERCHANT, SOURCE, (sale("a", 1, T0_MS, milk),), T0_MS))
    stale_ms = T0_MS + SILENCE_MS
    partition.on_timer(stale_ms)
    partition.apply(SetStock(new, "set-new", 7, None, stale_ms + 1))
    (level,) = partition.levels([new], stale_ms + 1)
    assert level.degraded and level.stale_since_ms == stale_ms and level.stale_buffer == 0
    partition.check_invariants()
    step = partition.apply(Ingest(MERCHANT, SOURCE, (), stale_ms + 2, alive_at=(STORES[0],)))
    assert {e.key for e in step.events} == {milk, new}
    assert not any(lv.degraded for lv in partition.levels([milk, new], stale_ms + 2))
    partition.check_invariants()


# ------------------------------------------------------------------------------- health


def test_health_gives_each_source_s_last_event_arrival_and_lag() -> None:
    milk = key("milk")
    partition = stocked(milk)
    partition.apply(Ingest(MERCHANT, "pos-1", (sale("a", 1, T0_MS, milk),), T0_MS + 2000))
    receipt = FeedEvent("asn-1", FeedEventKind.RECEIPT, milk, T0_MS + 5000, quantity=10)
    partition.apply(Ingest(MERCHANT, "supplier", (receipt,), T0_MS + 65_000))
    (health,) = partition.feed_health(MERCHANT, [STORES[0], STORES[1]], T0_MS + 70_000)
    assert health.location == location()
    assert [
        (s.source, s.last_occurred_at_ms, s.last_received_at_ms, s.lag_ms)
        for s in health.feed.sources
    ] == [
        ("pos-1", T0_MS, T0_MS + 2000, 2000),
        ("supplier", T0_MS + 5000, T0_MS + 65_000, 60_000),
    ]
    assert health.silent_for_ms == 5000 and not health.feed.stale_since_ms


def test_an_event_of_one_source_too_many_is_refused_with_its_field() -> None:
    milk = key("milk")
    partition = stocked(milk)
    for index in range(limits.feed_sources_per_location_max):
        event = sale(f"e{index}", 1, T0_MS, milk)
        partition.apply(Ingest(MERCHANT, f"src-{index}", (event,), T0_MS))
    step = partition.apply(Ingest(MERCHANT, "one-more", (sale("x", 1, T0_MS, milk),), T0_MS))
    assert isinstance(step.outcome, Ingested)
    (ack,) = step.outcome.acks
    assert ack.field == "source" and "16 sources" in ack.reason
    # A heartbeat of one more source keeps nothing either.
    beat = partition.apply(Ingest(MERCHANT, "one-more", (), T0_MS + 1, alive_at=(STORES[0],)))
    assert beat.records == ()
    partition.check_invariants()


def test_the_heartbeat_request_bounds_are_precise() -> None:
    partition = stocked(key("milk"))
    empty = partition.apply(Ingest(MERCHANT, SOURCE, (), T0_MS)).outcome
    assert isinstance(empty, Invalid) and empty.field == "events"
    many = tuple(STORES[0] for _ in range(limits.feed_heartbeat_locations_max + 1))
    too_many = partition.apply(Ingest(MERCHANT, SOURCE, (), T0_MS, alive_at=many)).outcome
    assert isinstance(too_many, Invalid) and too_many.field == "alive_at"
    bad = partition.apply(Ingest(MERCHANT, SOURCE, (), T0_MS, alive_at=("",))).outcome
    assert isinstance(bad, Invalid) and bad.field == "alive_at[0]"


# ------------------------------------------------------------------- the state machine


@dataclass
class ModelKey:
    on_hand: int
    # Live reservations' (units, expires_at_ms): held until they expire.
    holds: list[tuple[int, int]] = field(default_factory=list)
    # The till's sales after the last stock-take: (occurred_at_ms, units).
    sales: list[tuple[int, int]] = field(default_factory=list)
    taken_ms: int = T0_MS  # the last stock-take (a count at its time)

    def reserved(self, now_ms: int) -> int:
        """Units held by reservations not yet expired at now_ms (due at expires_at_ms)."""
        return sum(units for units, expires_at_ms in self.holds if expires_at_ms > now_ms)

    buffer: int = 0
    stale_since_ms: int = 0


@dataclass
class ModelStore:
    heard_ms: int | None = None  # when a source was last heard from (None: never fed)
    newest_event_ms: int = 0
    stale_since_ms: int = 0
    beats: dict[str, int] = field(default_factory=dict)  # source -> last kept record


class StalenessMachine(RuleBasedStateMachine):
    """Feeds, heartbeats and the timer against a plain model of the staleness rules.

    Every sale is new (fresh event ids, occurred a little before it arrives) and nothing
    commits or releases a reservation (it holds until it expires), so the model needs no
    dedupe, no counts and no order lifecycle: those are test_feeds.py's and
    test_stateful.py's.
    """

    SKUS = ("milk", "eggs")

    def __init__(self) -> None:
        super().__init__()
        self.partition = Partition(PARTITION)
        self.now_ms = T0_MS
        self.records: list[Record] = []
        self.keys = {key(sku, store): ModelKey(50) for sku in self.SKUS for store in STORES}
        self.stores = {store: ModelStore() for store in STORES}
        self.next_id = 0
        for index, k in enumerate(self.keys):
            self._apply(SetStock(k, f"set-{index}", 50, None, self.now_ms))

    def _apply(self, command: Ingest | Reserve | SetStock) -> Outcome:
        step = self.partition.apply(command)
        self._keep(step.records)
        return step.outcome

    def _keep(self, records: tuple[Record, ...]) -> None:
        for record in records:
            data = json.loads(json.dumps(command_to_data(record.command)))
            assert command_from_data(data) == record.command
            self.records.append(record)

    @rule(ms=st.sampled_from([1000, 30_000, 59_000, 61_000, 4 * MINUTE_MS, SILENCE_MS]))
    def advance_clock(self, ms: int) -> None:
        self.now_ms += ms

    @rule(
        store=st.sampled_from(STORES),
        sku=st.sampled_from(SKUS),
        units=st.integers(1, 5),
        ago_ms=st.integers(0, 30 * MINUTE_MS),
    )
    def till_sale(self, store: str, sku: str, units: int, ago_ms: int) -> None:
        self.next_id += 1
        k = key(sku, store)
        occurred_ms = self.now_ms - ago_ms
        outcome = self._apply(
            Ingest(
                MERCHANT, SOURCE, (sale(f"s{self.next_id}", units, occurred_ms, k),), self.now_ms
            )
        )
        assert isinstance(outcome, Ingested)
        model = self.keys[k]
        # A sale before the last stock-take is covered by it (at the same ms it sorts after
        # the service's own count, whose source is ""): recorded, on_hand unmoved.
        if occurred_ms >= model.taken_ms:
            model.on_hand -= units
            model.sales.append((occurred_ms, units))
        self._heard(store, occurred_ms)

    @rule(store=st.sampled_from(STORES))
    def heartbeat(self, store: str) -> None:
        step = self.partition.apply(Ingest(MERCHANT, SOURCE, (), self.now_ms, alive_at=(store,)))
        self._keep(step.records)
        shop = self.stores[store]
        kept = shop.heard_ms is not None and (
            shop.stale_since_ms != 0
            or self.now_ms - shop.beats[SOURCE] >= limits.feed_heartbeat_interval_ms
        )
        assert len(step.records) == int(kept), (shop, step)
        if kept:
            self._heard(store, 0)

    def _heard(self, store: str, occurred_ms: int) -> None:
        shop = self.stores[store]
        shop.heard_ms = self.now_ms
        shop.beats[SOURCE] = self.now_ms
        shop.newest_event_ms = max(shop.newest_event_ms, occurred_ms)
        if shop.stale_since_ms:
            event("a stale store heard from again")
            shop.stale_since_ms = 0
            for k, model in self.keys.items():
                if k.location_id == store:
                    model.buffer = model.stale_since_ms = 0

    @rule(after_ms=st.sampled_from([0, 0, SILENCE_MS - 1, SILENCE_MS]))
    def timer(self, after_ms: int) -> None:
        self.now_ms += after_ms
        step = self.partition.on_timer(self.now_ms)
        self._keep(step.records)
        if step.records:
            event("timer marked a store stale")
        for store, shop in self.stores.items():
            silent = shop.heard_ms is not None and self.now_ms - shop.heard_ms >= SILENCE_MS
            if silent and not shop.stale_since_ms:
                shop.stale_since_ms = self.now_ms
                since_ms = shop.newest_event_ms - limits.feed_sales_rate_window_ms
                for k, model in self.keys.items():
                    if k.location_id == store:
                        model.buffer = sum(u for at, u in model.sales if at > since_ms)
                        model.stale_since_ms = self.now_ms

    @rule(store=st.sampled_from(STORES), sku=st.sampled_from(SKUS), units=st.integers(1, 30))
    def reserve(self, store: str, sku: str, units: int) -> None:
        self.next_id += 1
        k = key(sku, store)
        model = self.keys[k]
        command = Reserve(MERCHANT, f"r{self.next_id}", (Line(k, units),), TTL_S, self.now_ms)
        outcome = self._apply(command)
        offered = model.on_hand - model.reserved(self.now_ms) - model.buffer
        assert isinstance(outcome, Reserved) == (units <= offered), (outcome, model)
        if isinstance(outcome, Reserved):
            model.holds.append((units, self.now_ms + TTL_S * 1000))
        if model.buffer:
            event("reserve against a buffer")

    @rule(store=st.sampled_from(STORES), sku=st.sampled_from(SKUS), on_hand=st.integers(0, 80))
    def stock_take(self, store: str, sku: str, on_hand: int) -> None:
        self.next_id += 1
        k = key(sku, store)
        self._apply(SetStock(k, f"take-{self.next_id}", on_hand, None, self.now_ms))
        # "on_hand was X now": plus the sales that sort after it (those of this very ms).
        model = self.keys[k]
        model.sales = [(at, units) for at, units in model.sales if at >= self.now_ms]
        model.on_hand = on_hand - sum(units for _, units in model.sales)
        model.taken_ms = self.now_ms

    @invariant()
    def matches_the_model(self) -> None:
        self.partition.check_invariants()
        for level in self.partition.levels(list(self.keys), self.now_ms):
            model = self.keys[level.key]
            reserved = model.reserved(self.now_ms)
            assert (level.on_hand, level.reserved) == (model.on_hand, reserved), level
            assert (level.stale_buffer, level.stale_since_ms) == (
                model.buffer,
                model.stale_since_ms,
            ), (level, model)

    @precondition(lambda self: len(self.records) % 5 == 0)
    @invariant()
    def replay_and_restore_equal_live(self) -> None:
        replayed = Partition(PARTITION)
        for record in self.records:
            replayed.replay(record)
        assert replayed.snapshot() == self.partition.snapshot()
        restored = Partition.restore(
            PARTITION, self.partition.head_lsn, _checkpoint(self.partition)
        )
        restored.check_invariants()
        assert restored.snapshot() == self.partition.snapshot()
        assert restored.next_timer_ms() == self.partition.next_timer_ms()


def _checkpoint(partition: Partition) -> dict[str, list[tuple[object, object]]]:
    """A full checkpoint of the partition, through the JSON form the store keeps."""
    partition.checkpoint_failed()  # the next delta carries everything
    delta = partition.take_checkpoint()
    assert delta.full
    tables: dict[str, list[tuple[object, object]]] = {}
    for name, changes in delta.tables.items():
        schema = TABLES[name]
        tables[name] = [
            (
                schema.key_from_data(json.loads(json.dumps(schema.key_to_data(k)))),
                schema.row_from_data(json.loads(json.dumps(schema.row_to_data(row)))),
            )
            for k, row in changes.upserts
        ]
    return tables


StalenessMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None, print_blob=True
)
TestStaleness = StalenessMachine.TestCase


def test_the_deployment_s_threshold_is_kept_in_the_record_so_replay_marks_the_same() -> None:
    milk = key("milk")
    partition = stocked(milk)
    records = list(
        partition.apply(Ingest(MERCHANT, SOURCE, (sale("a", 1, T0_MS, milk),), T0_MS)).records
    )
    assert partition.next_timer_ms(silent_ms=2000) == T0_MS + 2000
    step = partition.on_timer(T0_MS + 2000, silent_ms=2000)
    (record,) = step.records
    assert record.command == MarkStale((location(),), T0_MS + 2000, silent_ms=2000)
    # A replica that replays it marks the location though its own default is 5 minutes.
    replica = stocked(milk)
    for logged in [*records, record]:
        replica.replay(logged)
    assert replica.snapshot() == partition.snapshot()
    refused = Partition(PARTITION).apply(MarkStale((), T0_MS, silent_ms=0)).outcome
    assert refused == Invalid("silent_ms", "must be positive, got 0")
