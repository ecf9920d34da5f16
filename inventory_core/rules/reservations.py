"""The online channel: reserve, commit, release, extend and expire (DESIGN sections 2, 6).

- A reservation is admitted only if every line fits in available at that instant (two
  lines of one key are checked against their sum); nothing else raises reserved, so
  online demand never takes available below zero. While a location is stale, its buffer
  is held back too: a line must fit in available less the buffer (``StockRow.offered``).
- Commit takes up to the held quantity out of on_hand and releases the rest; release and
  expiry return the held units.
- Commit, release and extend of a reservation that is not live fail precisely: its state
  and since when. Reservations of another merchant are not found.
"""

from __future__ import annotations

from dataclasses import replace

from .._commands import Commit, Expire, Extend, Release, Reserve
from .._model import (
    EMPTY_ROW,
    ChangeReason,
    InventoryKey,
    Line,
    Reservation,
    ReservationState,
    home_key,
    reservation_id_for,
)
from .._outcomes import (
    Committed,
    Expired,
    Extended,
    InsufficientStock,
    Invalid,
    Outcome,
    Released,
    ReservationNotActive,
    ReservationNotFound,
    Reserved,
    ShortLine,
)
from .._state import Effects, PartitionState, levels_of
from .._validate import effective_ttl_s
from . import feeds


def reserve(state: PartitionState, command: Reserve, at: Effects) -> Outcome:
    refused = state.refuse_new_reservation()
    if refused is not None:
        return refused
    wanted: dict[InventoryKey, int] = {}
    for line in command.lines:  # two lines on one key are checked against their sum
        wanted[line.key] = wanted.get(line.key, 0) + line.quantity
    rows = {key: state.stock.get(key) or EMPTY_ROW for key in wanted}
    # What is offered: a stale location's buffer is not promised online (DESIGN section 9).
    if any(quantity > rows[key].offered for key, quantity in wanted.items()):
        return InsufficientStock(
            tuple(ShortLine(k, q, max(rows[k].offered, 0)) for k, q in wanted.items())
        )
    first = command.lines[0].key
    reservation = Reservation(
        reservation_id=reservation_id_for(state.partition, at.lsn),
        merchant_id=first.merchant_id,
        location_id=first.location_id,
        lines=tuple(Line(k, q) for k, q in wanted.items()),
        state=ReservationState.ACTIVE,
        created_at_ms=at.now_ms,
        expires_at_ms=at.now_ms + effective_ttl_s(command.ttl_s) * 1000,
        state_changed_at_ms=at.now_ms,
        created_lsn=at.lsn,
    )
    for key, quantity in wanted.items():
        state.change(key, at, ChangeReason.RESERVATION, reserved=rows[key].reserved + quantity)
    state.put_live(reservation)
    state.hold(reservation)
    return Reserved(reservation, levels_of(state, wanted))


def commit(state: PartitionState, command: Commit, at: Effects) -> Outcome:
    found = _active(state, command.merchant_id, command.reservation_id)
    if not isinstance(found, Reservation):
        return found
    held = {line.key: line.quantity for line in found.lines}
    taken = dict(held) if not command.lines else dict.fromkeys(held, 0)
    for index, line in enumerate(command.lines):
        key = _held_key(line.key, held)
        if key is None:
            return Invalid(f"lines[{index}].key", "not held by this reservation")
        if line.quantity > held[key]:
            return Invalid(
                f"lines[{index}].quantity",
                f"exceeds the {held[key]} units the reservation holds",
            )
        taken[key] = line.quantity
    for key, quantity in held.items():
        row = state.stock[key]
        # Units picked for the order: a physical fact a late count must account for.
        picked = (
            feeds.own_delta(state, key, at, -taken[key], occurred_at_ms=at.now_ms, kind="commit")
            if taken[key]
            else 0
        )
        state.change(
            key,
            at,
            ChangeReason.COMMIT,
            reserved=row.reserved - quantity,
            on_hand=row.on_hand + picked,
        )
    committed = tuple(Line(k, q) for k, q in taken.items() if q > 0)
    done = _finish(state, found, ReservationState.COMMITTED, at, committed)
    return Committed(done, levels_of(state, held))


def release(state: PartitionState, command: Release, at: Effects) -> Outcome:
    found = _active(state, command.merchant_id, command.reservation_id)
    if not isinstance(found, Reservation):
        return found
    _return_holds(state, found, at, ChangeReason.RELEASE)
    done = _finish(state, found, ReservationState.RELEASED, at, ())
    return Released(done, levels_of(state, (line.key for line in found.lines)))


def extend(state: PartitionState, command: Extend, at: Effects) -> Outcome:
    found = _active(state, command.merchant_id, command.reservation_id)
    if not isinstance(found, Reservation):
        return found
    extended = replace(found, expires_at_ms=at.now_ms + command.ttl_s * 1000)
    state.put_live(extended)
    return Extended(extended)


def expire(state: PartitionState, command: Expire, at: Effects) -> Outcome:
    # In id order: the order finished reservations are kept (and forgotten) in must be
    # one a checkpoint can restore, by (finished_lsn, reservation_id).
    for reservation_id in sorted(command.reservation_ids):
        found = state.live(reservation_id)
        if found is None or found.expires_at_ms > at.now_ms:
            raise AssertionError(f"expiry of {reservation_id} that is not due: {found}")
        _return_holds(state, found, at, ChangeReason.EXPIRY)
        _finish(state, found, ReservationState.EXPIRED, at, ())
    return Expired(command.reservation_ids)


# ------------------------------------------------------------------------------ helpers


def _active(
    state: PartitionState, merchant_id: str, reservation_id: str
) -> Reservation | ReservationNotFound | ReservationNotActive:
    found = state.reservations.get(reservation_id)
    if found is None or found.merchant_id != merchant_id:
        return ReservationNotFound(reservation_id)
    if found.state is not ReservationState.ACTIVE:
        return ReservationNotActive(reservation_id, found.state, found.state_changed_at_ms)
    return found


def _held_key(key: InventoryKey, held: dict[InventoryKey, int]) -> InventoryKey | None:
    """The held key a commit line names: itself, or for a reservation a hot key's bucket
    holds, the key the caller knows it by (its home)."""
    if key in held:
        return key
    return next((k for k in held if home_key(k) == key), None)


def _return_holds(
    state: PartitionState, reservation: Reservation, at: Effects, reason: ChangeReason
) -> None:
    for line in reservation.lines:
        row = state.stock[line.key]
        state.change(line.key, at, reason, reserved=row.reserved - line.quantity)


def _finish(
    state: PartitionState,
    reservation: Reservation,
    final_state: ReservationState,
    at: Effects,
    committed: tuple[Line, ...],
) -> Reservation:
    done = replace(
        reservation,
        state=final_state,
        state_changed_at_ms=at.now_ms,
        committed_lines=committed,
        finished_lsn=at.lsn,
    )
    state.finish(done)
    return done
