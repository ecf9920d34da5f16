"""Example tests of the core, each named after the rule it checks (DESIGN 2 and 6, STYLE 4, 8).

Every test runs ``check_invariants`` after each step through the ``Shop`` helper.
"""

from __future__ import annotations

from collections import Counter

import pytest

import inventory_core
from inventory_core import (
    AdjustmentReason,
    AdjustStock,
    CapacityExhausted,
    ChangeReason,
    Command,
    Commit,
    Committed,
    Expire,
    Expired,
    Extend,
    Extended,
    IdempotencyKeyReused,
    InsufficientStock,
    Invalid,
    InventoryKey,
    Line,
    OverCommit,
    Partition,
    Release,
    Released,
    ReservationNotActive,
    ReservationNotFound,
    ReservationState,
    Reserve,
    Reserved,
    SetSafetyStock,
    SetStock,
    ShortLine,
    Step,
    StockChanged,
    VersionMismatch,
    limits,
    partition_of,
    partition_of_reservation,
    reservation_id_for,
)

M = "acme"
LOCATION = "store-7"
P = partition_of(M, LOCATION)
T0 = 1_700_000_000_000
APPLE = InventoryKey(M, "apple", LOCATION)
PEAR = InventoryKey(M, "pear", LOCATION)
PLUM = InventoryKey(M, "plum", LOCATION)


class Shop:
    """One partition, fresh idempotency keys, and check_invariants after every step."""

    def __init__(self) -> None:
        self.partition = Partition(P)
        self.counter = 0

    def key(self) -> str:
        self.counter += 1
        return f"k{self.counter}"

    def apply(self, command: Command) -> Step:
        before = self.partition.head_lsn
        step = self.partition.apply(command)
        self.partition.check_invariants()
        assert self.partition.head_lsn == before + len(step.records)
        return step

    def stock(self, key: InventoryKey, on_hand: int, now: int = T0) -> Step:
        return self.apply(SetStock(key, self.key(), on_hand, None, now))

    def reserve(self, *lines: tuple[InventoryKey, int], ttl_s: int = 60, now: int = T0) -> Step:
        request = tuple(Line(k, q) for k, q in lines)
        return self.apply(Reserve(M, self.key(), request, ttl_s, now))

    def reserved_id(self, *lines: tuple[InventoryKey, int], ttl_s: int = 60, now: int = T0) -> str:
        outcome = self.reserve(*lines, ttl_s=ttl_s, now=now).outcome
        assert isinstance(outcome, Reserved), outcome
        return outcome.reservation.reservation_id

    def level(self, key: InventoryKey, now: int = T0) -> inventory_core.StockLevel:
        return self.partition.levels([key], now)[0]


@pytest.fixture
def shop() -> Shop:
    return Shop()


# ------------------------------------------------------------------------------ reserve


def test_two_lines_of_one_cart_on_the_same_key_are_checked_against_their_sum(shop: Shop) -> None:
    shop.stock(APPLE, 5)
    before = shop.partition.snapshot()
    step = shop.reserve((APPLE, 3), (APPLE, 3))
    assert step.outcome == InsufficientStock((ShortLine(APPLE, 6, 5),))
    assert step.records == () and step.events == ()
    assert shop.partition.snapshot() == before
    step = shop.reserve((APPLE, 2), (APPLE, 3))
    assert isinstance(step.outcome, Reserved)
    assert step.outcome.reservation.lines == (Line(APPLE, 5),)
    assert shop.level(APPLE).available == 0


def test_reservation_past_expiry_no_longer_counts_in_reads_before_the_timer_runs(
    shop: Shop,
) -> None:
    shop.stock(APPLE, 5)
    shop.reserve((APPLE, 4), ttl_s=30)
    assert shop.level(APPLE, T0 + 29_999).reserved == 4
    head = shop.partition.head_lsn
    level = shop.level(APPLE, T0 + 30_000)
    assert (level.reserved, level.available) == (0, 5)
    assert shop.partition.head_lsn == head  # a read changes nothing
    assert shop.partition.snapshot().stock[APPLE].reserved == 4
    reservation_id = reservation_id_for(P, 2)
    found = shop.partition.reservation(M, reservation_id, T0 + 30_000)
    assert found is not None and found.state is ReservationState.EXPIRED


def test_reservation_past_expiry_no_longer_counts_in_reserves_before_the_timer_runs(
    shop: Shop,
) -> None:
    shop.stock(APPLE, 5)
    old = shop.reserved_id((APPLE, 4), ttl_s=30)
    step = shop.reserve((APPLE, 5), now=T0 + 30_000)
    assert isinstance(step.outcome, Reserved)
    # The due expiry is its own record, logged first, carrying its time.
    assert [r.command for r in step.records[:1]] == [Expire((old,), T0 + 30_000)]
    assert [r.kind for r in step.records] == ["expire", "reserve"]
    assert [e.reason for e in step.events] == [ChangeReason.EXPIRY, ChangeReason.RESERVATION]


def test_insufficient_stock_lists_every_line_requested_and_available_and_changes_nothing(
    shop: Shop,
) -> None:
    shop.stock(APPLE, 5)
    shop.stock(PEAR, 1)
    shop.apply(SetSafetyStock(PEAR, shop.key(), 3, None, T0))  # available -2
    before = shop.partition.snapshot()
    step = shop.reserve((APPLE, 2), (PEAR, 1), (PLUM, 1), (APPLE, 1))
    assert step.outcome == InsufficientStock(
        (ShortLine(APPLE, 3, 5), ShortLine(PEAR, 1, 0), ShortLine(PLUM, 1, 0))
    )
    assert step.records == () and step.events == ()
    assert shop.partition.snapshot() == before


def test_safety_stock_is_withheld_from_available(shop: Shop) -> None:
    shop.stock(APPLE, 10)
    step = shop.apply(SetSafetyStock(APPLE, shop.key(), 4, None, T0))
    assert isinstance(step.outcome, StockChanged)
    assert step.outcome.level.available == 6
    assert isinstance(shop.reserve((APPLE, 7)).outcome, InsufficientStock)
    assert isinstance(shop.reserve((APPLE, 6)).outcome, Reserved)


def test_reservation_ids_encode_the_partition(shop: Shop) -> None:
    shop.stock(APPLE, 5)
    reservation_id = shop.reserved_id((APPLE, 1))
    assert partition_of_reservation(reservation_id) == P
    assert reservation_id == reservation_id_for(P, 2)
    assert partition_of_reservation(reservation_id_for(1023, 10**9)) == 1023
    for not_ours in ["", "x0001-1", "r-1", "r0001-", "r0001", "rab-1", "r1-" + "9" * 40]:
        assert partition_of_reservation(not_ours) is None, not_ours


def test_partition_of_reservation_never_raises_and_accepts_only_ascii_digits() -> None:
    for strange in ["r\u00b2-1", "r1-\u00b2", "r\u0661-1"]:
        assert partition_of_reservation(strange) is None, strange


# ------------------------------------------------------------------- commit and release


def test_partial_commit_takes_what_it_names_and_releases_the_remainder(shop: Shop) -> None:
    shop.stock(APPLE, 10)
    shop.stock(PEAR, 10)
    reservation_id = shop.reserved_id((APPLE, 4), (PEAR, 2))
    step = shop.apply(Commit(M, shop.key(), reservation_id, (Line(APPLE, 3),), T0 + 1))
    assert isinstance(step.outcome, Committed)
    done = step.outcome.reservation
    assert done.state is ReservationState.COMMITTED
    assert done.committed_lines == (Line(APPLE, 3),)
    apple, pear = shop.level(APPLE, T0 + 1), shop.level(PEAR, T0 + 1)
    assert (apple.on_hand, apple.reserved, apple.available) == (7, 0, 7)
    assert (pear.on_hand, pear.reserved, pear.available) == (10, 0, 10)
    assert step.outcome.levels == (apple, pear)
    assert {e.reason for e in step.events} == {ChangeReason.COMMIT}


def test_commit_of_more_than_held_or_of_a_key_not_held_is_invalid_and_changes_nothing(
    shop: Shop,
) -> None:
    shop.stock(APPLE, 10)
    reservation_id = shop.reserved_id((APPLE, 4))
    before = shop.partition.snapshot()
    step = shop.apply(Commit(M, shop.key(), reservation_id, (Line(APPLE, 5),), T0))
    assert step.outcome == Invalid("lines[0].quantity", "exceeds the 4 units the reservation holds")
    step = shop.apply(Commit(M, shop.key(), reservation_id, (Line(PEAR, 1),), T0))
    assert isinstance(step.outcome, Invalid) and step.outcome.field == "lines[0].key"
    assert shop.partition.snapshot() == before


@pytest.mark.parametrize("finish", ["commit", "release", "expire"])
@pytest.mark.parametrize("then", ["commit", "release", "extend"])
def test_commit_or_release_of_a_finished_reservation_is_not_active_with_state_and_when(
    shop: Shop, finish: str, then: str
) -> None:
    shop.stock(APPLE, 10)
    reservation_id = shop.reserved_id((APPLE, 2), ttl_s=30)
    if finish == "commit":
        shop.apply(Commit(M, shop.key(), reservation_id, (), T0 + 5))
        state, when = ReservationState.COMMITTED, T0 + 5
    elif finish == "release":
        shop.apply(Release(M, shop.key(), reservation_id, T0 + 5))
        state, when = ReservationState.RELEASED, T0 + 5
    else:
        expired = shop.partition.expire_due(T0 + 31_000)
        assert expired.outcome == Expired((reservation_id,))
        state, when = ReservationState.EXPIRED, T0 + 31_000
    later = T0 + 40_000
    commands: dict[str, Command] = {
        "commit": Commit(M, shop.key(), reservation_id, (), later),
        "release": Release(M, shop.key(), reservation_id, later),
        "extend": Extend(M, shop.key(), reservation_id, 60, later),
    }
    before = shop.partition.snapshot()
    step = shop.apply(commands[then])
    assert step.outcome == ReservationNotActive(reservation_id, state, when)
    assert step.records == () and shop.partition.snapshot() == before


def test_commit_after_expiry_before_the_timer_is_not_active_as_of_its_expiry(shop: Shop) -> None:
    shop.stock(APPLE, 10)
    reservation_id = shop.reserved_id((APPLE, 2), ttl_s=30)
    step = shop.apply(Commit(M, shop.key(), reservation_id, (), T0 + 45_000))
    assert step.outcome == ReservationNotActive(
        reservation_id, ReservationState.EXPIRED, T0 + 45_000
    )
    assert [r.kind for r in step.records] == ["expire"]  # the expiry itself is logged


def test_another_merchants_reservation_is_not_found(shop: Shop) -> None:
    shop.stock(APPLE, 10)
    reservation_id = shop.reserved_id((APPLE, 2))
    for command in (
        Commit("rival", "k", reservation_id, (), T0),
        Release("rival", "k", reservation_id, T0),
        Extend("rival", "k", reservation_id, 60, T0),
    ):
        assert shop.apply(command).outcome == ReservationNotFound(reservation_id)
    assert shop.partition.reservation("rival", reservation_id, T0) is None
    assert shop.apply(Release(M, shop.key(), reservation_id, T0)).outcome.__class__ is Released


def test_extend_renews_the_ttl_from_now(shop: Shop) -> None:
    shop.stock(APPLE, 10)
    reservation_id = shop.reserved_id((APPLE, 2), ttl_s=30)
    step = shop.apply(Extend(M, shop.key(), reservation_id, 120, T0 + 20_000))
    assert isinstance(step.outcome, Extended)
    assert step.outcome.reservation.expires_at_ms == T0 + 140_000
    assert step.events == ()
    assert shop.level(APPLE, T0 + 139_999).reserved == 2
    assert shop.level(APPLE, T0 + 140_000).reserved == 0
    assert shop.partition.next_expiry_ms() == T0 + 140_000


def test_extend_to_an_expiry_already_pushed_does_not_double_count_in_reads(shop: Shop) -> None:
    shop.stock(APPLE, 10)
    reservation_id = shop.reserved_id((APPLE, 3), ttl_s=90)  # expires at T0 + 90 s
    shop.apply(Extend(M, shop.key(), reservation_id, 60, T0 + 30_000))  # again T0 + 90 s
    level = shop.level(APPLE, T0 + 90_000)
    assert (level.reserved, level.available) == (0, 10)


# --------------------------------------------------------------------- physical facts


def test_physical_sale_below_zero_is_applied_and_reports_over_commit_newest_first(
    shop: Shop,
) -> None:
    shop.stock(APPLE, 10)
    oldest = shop.reserved_id((APPLE, 3))
    middle = shop.reserved_id((APPLE, 3))
    newest = shop.reserved_id((APPLE, 2))
    step = shop.apply(AdjustStock(APPLE, shop.key(), -5, AdjustmentReason.SALE, T0 - 1, T0))
    assert isinstance(step.outcome, StockChanged)
    assert step.outcome.level.on_hand == 5
    assert step.outcome.level.available == -3
    assert step.outcome.level.sellable == 0
    # Exposure 3: the newest (2) does not cover it, the next (3) does; the oldest is safe.
    assert step.outcome.over_commit == OverCommit(3, (newest, middle))
    assert shop.partition.over_committed() == {APPLE: 3}
    assert [e.reason for e in step.events] == [ChangeReason.SALE]
    del oldest


def test_set_stock_below_reserved_is_applied_and_reports_over_commit(shop: Shop) -> None:
    shop.stock(APPLE, 10)
    only = shop.reserved_id((APPLE, 4))
    step = shop.stock(APPLE, 1)
    assert isinstance(step.outcome, StockChanged)
    assert step.outcome.over_commit == OverCommit(3, (only,))


def test_absolute_set_with_stale_expected_version_is_refused_with_current_version(
    shop: Shop,
) -> None:
    shop.stock(APPLE, 10)  # version 1
    shop.reserve((APPLE, 1))  # version 2
    before = shop.partition.snapshot()
    for command in (
        SetStock(APPLE, shop.key(), 3, 1, T0),
        SetSafetyStock(APPLE, shop.key(), 3, 1, T0),
    ):
        step = shop.apply(command)
        assert step.outcome == VersionMismatch(APPLE, 1, 2)
        assert step.records == () and step.events == ()
    assert shop.partition.snapshot() == before
    step = shop.apply(SetStock(APPLE, shop.key(), 3, 2, T0))
    assert isinstance(step.outcome, StockChanged)
    assert (step.outcome.level.on_hand, step.outcome.level.version) == (3, 3)
    step = shop.apply(SetStock(PEAR, shop.key(), 3, 0, T0))  # a new key is at version 0
    assert isinstance(step.outcome, StockChanged) and step.outcome.level.version == 1


def test_a_write_that_changes_nothing_emits_no_event(shop: Shop) -> None:
    shop.stock(APPLE, 10)
    for command in (
        SetStock(APPLE, shop.key(), 10, None, T0),
        SetSafetyStock(APPLE, shop.key(), 0, None, T0),
    ):
        step = shop.apply(command)
        assert isinstance(step.outcome, StockChanged)
        assert step.events == ()
        assert step.outcome.level.version == 1
    # A new key at zero is still a change: the key comes into being.
    step = shop.apply(SetStock(PEAR, shop.key(), 0, None, T0))
    assert len(step.events) == 1 and step.events[0].after.version == 1


def test_each_event_carries_before_after_and_reason(shop: Shop) -> None:
    step = shop.stock(APPLE, 10)
    (event,) = step.events
    assert event.before == inventory_core.StockRow()
    assert (event.after.on_hand, event.after.version) == (10, 1)
    assert event.reason is ChangeReason.SET_STOCK
    assert (event.partition, event.lsn, event.recorded_at_ms) == (P, 1, T0)
    for reason in AdjustmentReason:
        step = shop.apply(AdjustStock(APPLE, shop.key(), 1, reason, T0, T0 + 1))
        (event,) = step.events
        assert event.reason is ChangeReason(reason.value)
        assert event.after.on_hand == event.before.on_hand + 1
        assert event.after.version == event.before.version + 1
        assert event.lsn == step.records[0].lsn


# ------------------------------------------------------------------------ idempotency


def test_idempotent_retry_returns_the_original_outcome_even_after_state_changed(
    shop: Shop,
) -> None:
    shop.stock(APPLE, 10)
    command = Reserve(M, "order-1:reserve", (Line(APPLE, 4),), 60, T0)
    first = shop.apply(command)
    assert isinstance(first.outcome, Reserved)
    reservation_id = first.outcome.reservation.reservation_id
    shop.apply(Commit(M, shop.key(), reservation_id, (), T0 + 1))
    shop.stock(APPLE, 2, now=T0 + 2)
    head = shop.partition.head_lsn
    retry = shop.apply(Reserve(M, "order-1:reserve", (Line(APPLE, 4),), 60, T0 + 3))
    assert retry.outcome == first.outcome
    assert retry.records == () and retry.events == ()
    assert shop.partition.head_lsn == head


def test_same_idempotency_key_with_another_payload_is_refused(shop: Shop) -> None:
    shop.stock(APPLE, 10)
    shop.apply(Reserve(M, "same", (Line(APPLE, 1),), 60, T0))
    before = shop.partition.snapshot()
    for other in (
        Reserve(M, "same", (Line(APPLE, 2),), 60, T0),
        AdjustStock(APPLE, "same", 1, AdjustmentReason.RECEIPT, T0, T0),
    ):
        step = shop.apply(other)
        assert step.outcome == IdempotencyKeyReused("same", "reserve")
        assert step.records == ()
    assert shop.partition.snapshot() == before
    # Keys are scoped by merchant: another merchant may use the same key.
    rival = InventoryKey("rival", "apple", LOCATION)
    assert isinstance(shop.apply(SetStock(rival, "same", 1, None, T0)).outcome, StockChanged)


def test_a_refused_mutation_is_not_remembered_and_its_retry_is_decided_again(shop: Shop) -> None:
    command = Reserve(M, "again", (Line(APPLE, 1),), 60, T0)
    assert isinstance(shop.apply(command).outcome, InsufficientStock)
    shop.stock(APPLE, 1)
    assert isinstance(shop.apply(command).outcome, Reserved)


def test_idempotency_keys_are_forgotten_after_their_retention(shop: Shop) -> None:
    shop.stock(APPLE, 10)
    shop.apply(SetStock(APPLE, "set", 5, None, T0))
    later = T0 + limits.idempotency_retention_ms
    shop.stock(PEAR, 1, now=later)  # any accepted record runs retention
    assert ("acme", "set") in shop.partition.snapshot().idempotency
    shop.stock(PEAR, 2, now=later + 1)
    assert ("acme", "set") not in shop.partition.snapshot().idempotency
    step = shop.apply(SetStock(APPLE, "set", 6, None, later + 2))
    assert isinstance(step.outcome, StockChanged) and step.outcome.level.on_hand == 6


# ------------------------------------------------------------------------------ expiry


def test_expire_record_lists_due_reservations_in_bounded_batches(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inventory_core._limits, "expiry_batch_reservations_max", 3)
    shop.stock(APPLE, 100)
    ids = [shop.reserved_id((APPLE, 1), ttl_s=30, now=T0 + i) for i in range(7)]
    step = shop.partition.expire_due(T0 + 40_000)
    shop.partition.check_invariants()
    assert [r.command for r in step.records] == [
        Expire(tuple(ids[0:3]), T0 + 40_000),
        Expire(tuple(ids[3:6]), T0 + 40_000),
        Expire(tuple(ids[6:7]), T0 + 40_000),
    ]
    assert step.outcome == Expired(tuple(ids))
    assert shop.level(APPLE, T0 + 40_000).reserved == 0
    assert shop.partition.expire_due(T0 + 50_000).records == ()


def test_expire_batch_of_exactly_the_bound_is_one_record(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inventory_core._limits, "expiry_batch_reservations_max", 3)
    shop.stock(APPLE, 100)
    for i in range(3):
        shop.reserve((APPLE, 1), ttl_s=30, now=T0 + i)
    step = shop.partition.expire_due(T0 + 40_000)
    assert len(step.records) == 1 and len(step.outcome.reservation_ids) == 3  # type: ignore[union-attr]


def test_expiry_is_due_at_exactly_expires_at(shop: Shop) -> None:
    shop.stock(APPLE, 10)
    reservation_id = shop.reserved_id((APPLE, 1), ttl_s=30)
    assert shop.partition.expire_due(T0 + 29_999).records == ()
    assert shop.partition.expire_due(T0 + 30_000).outcome == Expired((reservation_id,))


# ---------------------------------------------------------------- bounds to their edges


def test_reserve_lines_max_is_allowed_and_one_more_is_refused(shop: Shop) -> None:
    keys = [InventoryKey(M, f"sku{i}", LOCATION) for i in range(limits.reserve_lines_max + 1)]
    for key in keys:
        shop.stock(key, 1)
    at_bound = tuple(Line(k, 1) for k in keys[: limits.reserve_lines_max])
    assert isinstance(shop.apply(Reserve(M, shop.key(), at_bound, 60, T0)).outcome, Reserved)
    over = tuple(Line(k, 1) for k in keys)
    step = shop.apply(Reserve(M, shop.key(), over, 60, T0))
    assert isinstance(step.outcome, Invalid) and step.outcome.field == "lines"
    commit_over = Commit(M, shop.key(), reservation_id_for(P, 1), over, T0)
    assert shop.apply(commit_over).outcome == Invalid(
        "lines", f"at most {limits.reserve_lines_max} lines, got {len(over)}"
    )


def test_line_quantity_max_is_allowed_and_one_more_is_refused(shop: Shop) -> None:
    shop.stock(APPLE, limits.line_quantity_max)
    step = shop.reserve((APPLE, limits.line_quantity_max + 1))
    assert isinstance(step.outcome, Invalid) and step.outcome.field == "lines[0].quantity"
    assert isinstance(shop.reserve((APPLE, limits.line_quantity_max)).outcome, Reserved)
    assert isinstance(shop.reserve((APPLE, 0)).outcome, Invalid)


def test_stock_quantity_and_adjust_delta_bounds(shop: Shop) -> None:
    top = limits.stock_quantity_max
    assert isinstance(shop.stock(APPLE, top).outcome, StockChanged)
    assert isinstance(shop.stock(APPLE, top + 1).outcome, Invalid)
    receipt = AdjustmentReason.RECEIPT
    step = shop.apply(AdjustStock(APPLE, shop.key(), 1, receipt, T0, T0))
    assert step.outcome == Invalid("delta", f"on_hand would leave ±{top}")
    big = limits.adjust_delta_max
    assert isinstance(
        shop.apply(AdjustStock(PEAR, shop.key(), big + 1, receipt, T0, T0)).outcome, Invalid
    )
    step = shop.apply(AdjustStock(PEAR, shop.key(), -big, AdjustmentReason.SHRINKAGE, T0, T0))
    assert isinstance(step.outcome, StockChanged) and step.outcome.level.on_hand == -big


def test_reservations_live_max_refuses_with_capacity_exhausted(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inventory_core._limits, "reservations_live_max", 2)
    shop.stock(APPLE, 10)
    first = shop.reserved_id((APPLE, 1), ttl_s=30)
    shop.reserved_id((APPLE, 1), ttl_s=60)
    before = shop.partition.snapshot()
    step = shop.reserve((APPLE, 1))
    assert step.outcome == CapacityExhausted("reservations_live_max", 2)
    assert step.records == () and shop.partition.snapshot() == before
    shop.apply(Release(M, shop.key(), first, T0))  # room again
    assert isinstance(shop.reserve((APPLE, 1)).outcome, Reserved)


def test_partition_keys_max_refuses_a_new_key_but_still_changes_known_ones(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inventory_core._limits, "partition_keys_max", 2)
    shop.stock(APPLE, 10)
    shop.stock(PEAR, 10)
    before = shop.partition.snapshot()
    step = shop.apply(SetStock(PLUM, shop.key(), 5, None, T0))
    assert step.outcome == CapacityExhausted("partition_keys_max", 2)
    assert step.records == () and shop.partition.snapshot() == before
    changed = shop.apply(SetStock(APPLE, shop.key(), 11, None, T0)).outcome
    assert isinstance(changed, StockChanged) and changed.level.on_hand == 11


def test_idempotency_keys_max_refuses_new_keys_but_answers_retries(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inventory_core._limits, "idempotency_keys_max", 2)
    first = SetStock(APPLE, "a", 1, None, T0)
    original = shop.apply(first).outcome
    shop.apply(SetStock(PEAR, "b", 1, None, T0))
    step = shop.apply(SetStock(PLUM, "c", 1, None, T0))
    assert step.outcome == CapacityExhausted("idempotency_keys_max", 2)
    assert step.records == ()
    assert shop.apply(first).outcome == original  # retries still answered


@pytest.mark.parametrize(
    ("ttl_s", "accepted"),
    [
        (limits.reservation_ttl_s_min - 1, False),
        (limits.reservation_ttl_s_min, True),
        (limits.reservation_ttl_s_max, True),
        (limits.reservation_ttl_s_max + 1, False),
        (0, True),  # the default
    ],
)
def test_ttl_bounds(shop: Shop, ttl_s: int, accepted: bool) -> None:
    shop.stock(APPLE, 10)
    step = shop.reserve((APPLE, 1), ttl_s=ttl_s)
    assert isinstance(step.outcome, Reserved) is accepted
    if accepted:
        assert isinstance(step.outcome, Reserved)
        ttl = ttl_s or limits.reservation_ttl_s_default
        assert step.outcome.reservation.expires_at_ms == T0 + ttl * 1000
        extend = Extend(M, shop.key(), step.outcome.reservation.reservation_id, ttl_s, T0)
        assert isinstance(shop.apply(extend).outcome, Extended) is (ttl_s != 0)
    else:
        assert step.outcome == Invalid(
            "ttl_s",
            f"must be between {limits.reservation_ttl_s_min} and "
            f"{limits.reservation_ttl_s_max}, got {ttl_s}",
        )


def test_identifier_length_max_is_allowed_and_one_more_is_refused(shop: Shop) -> None:
    at_bound = "s" * limits.identifier_length_max
    key = InventoryKey(M, at_bound, LOCATION)
    assert isinstance(shop.stock(key, 1).outcome, StockChanged)
    too_long = InventoryKey(M, at_bound + "s", LOCATION)
    step = shop.stock(too_long, 1)
    assert step.outcome == Invalid(
        "key.sku_id", f"at most {limits.identifier_length_max} characters"
    )
    assert isinstance(shop.stock(InventoryKey(M, "a b", LOCATION), 1).outcome, Invalid)


def test_idempotency_key_length_max_is_allowed_and_one_more_is_refused(shop: Shop) -> None:
    at_bound = "k" * limits.idempotency_key_length_max
    assert isinstance(shop.apply(SetStock(APPLE, at_bound, 1, None, T0)).outcome, StockChanged)
    step = shop.apply(SetStock(APPLE, at_bound + "k", 1, None, T0))
    assert isinstance(step.outcome, Invalid) and step.outcome.field == "idempotency_key"
    assert isinstance(shop.apply(SetStock(APPLE, "", 1, None, T0)).outcome, Invalid)


def test_availability_keys_max_is_a_positive_bound() -> None:
    # levels() takes any iterable; the shell enforces this bound per request.
    assert limits.availability_keys_max > 0


def test_invalid_input_emits_no_records_even_with_expiries_due(shop: Shop) -> None:
    shop.stock(APPLE, 10)
    shop.reserve((APPLE, 1), ttl_s=30)
    before = shop.partition.snapshot()
    step = shop.apply(Reserve(M, shop.key(), (), 60, T0 + 60_000))
    assert isinstance(step.outcome, Invalid) and step.outcome.field == "lines"
    assert step.records == () and step.events == ()
    assert shop.partition.snapshot() == before


# ---------------------------------------------------------------------------- partitions


def test_partition_of_is_stable_across_processes() -> None:
    # Computed once with blake2b; a change here moves every key to another partition.
    assert partition_of("m1", "l1") == 143
    assert partition_of("acme", "store-7") == 412
    assert partition_of("m", "l", 16) == 3


def test_partition_of_spreads_keys_roughly_evenly() -> None:
    partitions = 16
    samples = 16_000
    counts = Counter(
        partition_of(f"merchant-{i % 40}", f"location-{i}", partitions) for i in range(samples)
    )
    assert set(counts) == set(range(partitions))
    expected = samples / partitions
    assert all(0.85 * expected < n < 1.15 * expected for n in counts.values()), counts
    assert all(0 <= partition_of(f"m{i}", "l") < 1024 for i in range(1000))
