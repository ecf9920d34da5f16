"""Orders across locations (ReserveOrder): the saga's plan and its compensation, pure.

An order is 1 to ``order_legs_max`` legs, each a Reserve at one location, under one
idempotency key. Leg ``i`` is reserved with the key ``{key}/leg-{i}``, so a retry of the
order retries every leg with the same key and gets that leg's original answer; a taken leg
is released with ``{key}/undo-{reservation_id}``. These formats are part of the ledger's
history: orders placed by earlier releases must keep matching them.

The shell does the calls and reports each leg's result; this module decides the next step:

    plan = orders.plan(key, ttl_s, legs)              # OrderPlan, or Invalid
    results = [reserve(leg) for leg in plan.legs]     # Taken | Refused | Unknown per leg
    resolutions = 0
    loop: match orders.next_step(plan, results, resolutions):
        Resolve(legs)   reserve those legs again with the same keys (resolutions += 1)
        Confirm(legs)   read those reservations: Held if active, else Lapsed (Unknown on error)
        Compensate(releases, then)   release each; if all are settled answer ``then``, else
                        orders.after_compensation(step, settled)
        Placed | LegFailed | FailedBefore | OutcomeUnknown   the order's answer

Rules, in order:
  1. A leg whose outcome is unknown is resolved first, by retrying it with its key (which
     finds the durable answer or reserves afresh), up to ``LEG_RESOLUTIONS_MAX`` rounds:
     compensating without knowing would leave that leg held until its TTL.
  2. When every leg is taken, the reservations are confirmed active: a retry of an order
     that failed before gets its legs' original answers, but those legs were released since.
  3. If any leg holds nothing (refused, or lapsed), the order has failed: every leg that was
     taken is released.
  4. While a leg's outcome is unknown, the order's is too: the answer says so (retry the
     order with the same key), never "failed".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from . import Invalid, Line, Release, Reserve, limits, validate

# Rounds of retrying legs whose outcome is unknown before the order is answered unknown.
# Each round already retries inside its deadline; a leg still unknown after three is stuck
# behind an owner that cannot flush, and the caller's retry of the order will settle it.
LEG_RESOLUTIONS_MAX = 3


@dataclass(frozen=True, slots=True)
class OrderPlan:
    idempotency_key: str
    # Leg i's Reserve, with its derived key and the order's TTL.
    legs: tuple[Reserve, ...]


# ------------------------------------------------------------------ a leg's result


@dataclass(frozen=True, slots=True)
class Taken:
    """The leg's Reserve answered with this reservation (not yet confirmed active)."""

    reservation_id: str


@dataclass(frozen=True, slots=True)
class Held:
    """A taken leg whose reservation was read back active."""

    reservation_id: str


@dataclass(frozen=True, slots=True)
class Lapsed:
    """A taken leg whose reservation is no longer active (released before, or expired)."""

    reservation_id: str


@dataclass(frozen=True, slots=True)
class Refused:
    """The leg holds nothing: refused for good, or known not applied."""


@dataclass(frozen=True, slots=True)
class Unknown:
    """The leg's Reserve may or may not have been applied."""


LegResult = Taken | Held | Lapsed | Refused | Unknown


# ------------------------------------------------------------------------- steps


@dataclass(frozen=True, slots=True)
class Placed:
    """Every leg is held: the order's answer is these reservations, in leg order."""

    reservation_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LegFailed:
    """The order failed like this leg (the first refused one)."""

    leg: int


@dataclass(frozen=True, slots=True)
class FailedBefore:
    """A retry of an order that failed before: its legs were released then."""


@dataclass(frozen=True, slots=True)
class OutcomeUnknown:
    """These legs' outcome stayed unknown: retry the order with the same key."""

    legs: tuple[int, ...]


OrderAnswer = Placed | LegFailed | FailedBefore | OutcomeUnknown


@dataclass(frozen=True, slots=True)
class Resolve:
    """Reserve these legs again, each with its own key (plan.legs[i])."""

    legs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Confirm:
    """Read these taken legs' reservations: Held if active, else Lapsed."""

    legs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Compensate:
    """Release every taken leg (``legs[i]`` is the leg of ``releases[i]``), then answer."""

    legs: tuple[int, ...]
    releases: tuple[Release, ...]
    then: OrderAnswer


Step = Resolve | Confirm | Compensate | OrderAnswer


# ---------------------------------------------------------------------- the rules


def leg_key(order_key: str, leg: int) -> str:
    return f"{order_key}/leg-{leg}"


def undo_key(order_key: str, reservation_id: str) -> str:
    return f"{order_key}/undo-{reservation_id}"


def plan(idempotency_key: str, ttl_s: int, legs: Sequence[Sequence[Line]]) -> OrderPlan | Invalid:
    """The order's legs as Reserve commands, or what is wrong with it (fields ``legs[i]...``)."""
    if not 0 < len(legs) <= limits.order_legs_max:
        return Invalid("legs", f"1 to {limits.order_legs_max} legs, got {len(legs)}")
    if not 0 < len(idempotency_key) <= limits.order_idempotency_key_length_max:
        limit = limits.order_idempotency_key_length_max
        return Invalid("idempotency_key", f"1 to {limit} characters")
    commands = []
    for index, lines in enumerate(legs):
        merchant_id = lines[0].key.merchant_id if lines else ""
        command = Reserve(merchant_id, leg_key(idempotency_key, index), tuple(lines), ttl_s, 0)
        problem = validate(command)
        if problem is not None:
            return Invalid(f"legs[{index}].{problem.field}", problem.reason)
        commands.append(command)
    return OrderPlan(idempotency_key, tuple(commands))


def next_step(plan: OrderPlan, results: Sequence[LegResult], resolutions: int) -> Step:
    """What to do given every leg's latest result and the resolution rounds done so far."""
    assert len(results) == len(plan.legs), (len(results), len(plan.legs))
    unknown = _indexes(results, Unknown)
    if unknown and resolutions < LEG_RESOLUTIONS_MAX:
        return Resolve(unknown)
    refused = _indexes(results, Refused)
    lapsed = _indexes(results, Lapsed)
    if not unknown and not refused and not lapsed:
        unconfirmed = _indexes(results, Taken)
        if unconfirmed:
            return Confirm(unconfirmed)
        return Placed(tuple(_reservation_id(result) for result in results))
    then: OrderAnswer
    if unknown:
        then = OutcomeUnknown(unknown)
    elif refused:
        then = LegFailed(refused[0])
    else:
        then = FailedBefore()
    if not refused and not lapsed:
        return then  # a leg is unknown and none failed: the order may yet be placed
    return _compensate(plan, results, then)


def after_compensation(step: Compensate, settled: Sequence[bool]) -> OrderAnswer:
    """The answer after the compensations of ``step``, given which of them were settled
    (released, or found no longer active): a leg whose release is not settled may still
    hold stock, so the order's outcome is unknown until a retry releases it."""
    assert len(settled) == len(step.releases)
    open_legs = tuple(leg for leg, done in zip(step.legs, settled, strict=True) if not done)
    if open_legs:
        known = step.then.legs if isinstance(step.then, OutcomeUnknown) else ()
        return OutcomeUnknown(tuple(sorted({*known, *open_legs})))
    return step.then


def _compensate(plan: OrderPlan, results: Sequence[LegResult], then: OrderAnswer) -> Step:
    legs = tuple(i for i, result in enumerate(results) if isinstance(result, Taken | Held | Lapsed))
    if not legs:
        return then
    releases = tuple(
        Release(
            plan.legs[i].merchant_id,
            undo_key(plan.idempotency_key, _reservation_id(results[i])),
            _reservation_id(results[i]),
            0,
        )
        for i in legs
    )
    return Compensate(legs, releases, then)


def _indexes(results: Sequence[LegResult], kind: type) -> tuple[int, ...]:
    return tuple(i for i, result in enumerate(results) if isinstance(result, kind))


def _reservation_id(result: LegResult) -> str:
    assert isinstance(result, Taken | Held | Lapsed), result
    return result.reservation_id
