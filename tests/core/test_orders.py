"""Orders across locations (inventory_core.orders): validation, the plan, and the next step.

Example tests name the rule they check; a hypothesis test drives ``next_step`` with legs
whose answers are scripted per attempt and checks, for every script, that the saga ends,
never answers "failed" while a leg may hold stock, releases every leg it took when the
order fails, and places the order only when every leg is held.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from inventory_core import Invalid, InventoryKey, Line, Release, Reserve, limits, orders

MERCHANT = "m-1"


def leg(location: str, *quantities: int) -> tuple[Line, ...]:
    return tuple(
        Line(InventoryKey(MERCHANT, f"sku-{i}", location), quantity)
        for i, quantity in enumerate(quantities)
    )


def planned(key: str = "order-1", legs: int = 3, ttl_s: int = 600) -> orders.OrderPlan:
    plan = orders.plan(key, ttl_s, [leg(f"loc-{i}", 1 + i) for i in range(legs)])
    assert isinstance(plan, orders.OrderPlan)
    return plan


# ------------------------------------------------------------------ validation


def test_an_order_needs_one_to_order_legs_max_legs() -> None:
    assert orders.plan("order-1", 0, []) == Invalid("legs", "1 to 20 legs, got 0")
    too_many = [leg(f"loc-{i}", 1) for i in range(limits.order_legs_max + 1)]
    assert isinstance(orders.plan("order-1", 0, too_many), Invalid)
    most = [leg(f"loc-{i}", 1) for i in range(limits.order_legs_max)]
    assert isinstance(orders.plan("order-1", 0, most), orders.OrderPlan)


def test_an_order_key_is_one_to_order_idempotency_key_length_max_characters() -> None:
    limit = limits.order_idempotency_key_length_max
    legs = [leg("loc-1", 1)]
    assert orders.plan("", 0, legs) == Invalid("idempotency_key", f"1 to {limit} characters")
    assert isinstance(orders.plan("k" * (limit + 1), 0, legs), Invalid)
    longest = orders.plan("k" * limit, 0, legs)
    assert isinstance(longest, orders.OrderPlan)
    # The derived keys of the longest order key still fit the core's idempotency key bound.
    assert len(longest.legs[0].idempotency_key) <= limits.idempotency_key_length_max


def test_each_leg_is_checked_as_a_reserve_with_its_field_prefixed_by_the_leg() -> None:
    bad_quantity = [leg("loc-1", 1), leg("loc-2", 0)]
    problem = orders.plan("order-1", 0, bad_quantity)
    assert isinstance(problem, Invalid)
    assert problem.field == "legs[1].lines[0].quantity"
    bad_id = [leg("loc 1", 1)]
    problem = orders.plan("order-1", 0, bad_id)
    assert isinstance(problem, Invalid) and problem.field == "legs[0].lines[0].key.location_id"
    assert orders.plan("order-1", 0, [()]) == Invalid(
        "legs[0].lines", "must hold at least one line"
    )
    bad_ttl = orders.plan("order-1", 5, [leg("loc-1", 1)])
    assert isinstance(bad_ttl, Invalid) and bad_ttl.field == "legs[0].ttl_s"


# ------------------------------------------------------------------------ plan


def test_leg_keys_and_undo_keys_keep_the_formats_of_earlier_releases() -> None:
    plan = planned("order-9", legs=2, ttl_s=120)
    assert [c.idempotency_key for c in plan.legs] == ["order-9/leg-0", "order-9/leg-1"]
    assert orders.undo_key("order-9", "r0003-0000000012") == "order-9/undo-r0003-0000000012"
    assert plan.legs[1] == Reserve(MERCHANT, "order-9/leg-1", leg("loc-1", 2), 120, 0)


# ------------------------------------------------------------------ next step


def test_every_leg_taken_is_confirmed_before_the_order_is_placed() -> None:
    plan = planned(legs=2)
    taken = [orders.Taken("r-0"), orders.Taken("r-1")]
    assert orders.next_step(plan, taken, 0) == orders.Confirm((0, 1))
    held = [orders.Held("r-0"), orders.Held("r-1")]
    assert orders.next_step(plan, held, 0) == orders.Placed(("r-0", "r-1"))


def test_unknown_legs_are_resolved_before_anything_is_compensated() -> None:
    plan = planned(legs=3)
    results = [orders.Taken("r-0"), orders.Unknown(), orders.Refused()]
    assert orders.next_step(plan, results, 0) == orders.Resolve((1,))
    assert orders.next_step(plan, results, orders.LEG_RESOLUTIONS_MAX - 1) == orders.Resolve((1,))


def test_a_failed_order_releases_every_leg_it_took_and_fails_like_the_first_refused_leg() -> None:
    plan = planned(legs=3)
    results = [orders.Taken("r-0"), orders.Refused(), orders.Held("r-2")]
    step = orders.next_step(plan, results, 0)
    assert step == orders.Compensate(
        (0, 2),
        (
            Release(MERCHANT, "order-1/undo-r-0", "r-0", 0),
            Release(MERCHANT, "order-1/undo-r-2", "r-2", 0),
        ),
        orders.LegFailed(1),
    )
    assert isinstance(step, orders.Compensate)
    assert orders.after_compensation(step, [True, True]) == orders.LegFailed(1)


def test_a_retry_of_an_order_that_failed_before_releases_again_and_says_so() -> None:
    plan = planned(legs=2)
    results = [orders.Lapsed("r-0"), orders.Held("r-1")]
    step = orders.next_step(plan, results, 0)
    assert isinstance(step, orders.Compensate)
    assert step.legs == (0, 1) and step.then == orders.FailedBefore()


def test_a_leg_still_unknown_after_resolution_makes_the_order_unknown_never_failed() -> None:
    plan = planned(legs=2)
    rounds = orders.LEG_RESOLUTIONS_MAX
    # No leg failed: nothing is released, the order may yet be placed by a retry.
    waiting = [orders.Held("r-0"), orders.Unknown()]
    assert orders.next_step(plan, waiting, rounds) == orders.OutcomeUnknown((1,))
    # A leg failed: the taken ones are released, and still the answer is unknown.
    failed = [orders.Taken("r-0"), orders.Unknown(), orders.Refused()]
    step = orders.next_step(planned(legs=3), failed, rounds)
    assert isinstance(step, orders.Compensate)
    assert step.legs == (0,) and step.then == orders.OutcomeUnknown((1,))


def test_a_release_that_is_not_settled_leaves_the_order_unknown() -> None:
    plan = planned(legs=2)
    step = orders.next_step(plan, [orders.Taken("r-0"), orders.Refused()], 0)
    assert isinstance(step, orders.Compensate)
    assert orders.after_compensation(step, [False]) == orders.OutcomeUnknown((0,))


def test_an_order_with_nothing_taken_fails_without_compensation() -> None:
    plan = planned(legs=2)
    assert orders.next_step(plan, [orders.Refused(), orders.Refused()], 0) == orders.LegFailed(0)


# ------------------------------------------------------- the saga under any script

# Per leg, the answers of its successive Reserve attempts: "taken", "refused", "unknown".
# An unknown attempt may have been applied: whether it was is drawn too ("applied").
ATTEMPT = st.sampled_from(["taken", "refused", "unknown-applied", "unknown-not-applied"])
SCRIPTS = st.lists(st.lists(ATTEMPT, min_size=1, max_size=5), min_size=1, max_size=5)
CONFIRMS = st.lists(st.booleans(), min_size=5, max_size=5)
RELEASES = st.lists(st.booleans(), min_size=5, max_size=5)


class Shard:
    """What the legs' owners hold: a leg's reservation is durable once applied, and a retry
    with the leg's key gets its original answer (idempotency), as the real owner does."""

    def __init__(self, scripts: Sequence[Sequence[str]]) -> None:
        self.scripts = [list(s) for s in scripts]
        self.answers: dict[int, str] = {}  # leg -> "taken" / "refused", once applied
        self.held: set[int] = set()

    def reserve(self, index: int) -> orders.LegResult:
        if index in self.answers:
            return self._result(index, self.answers[index])
        script = self.scripts[index]
        attempt = script.pop(0) if len(script) > 1 else script[0]
        if attempt == "unknown-not-applied":
            return orders.Unknown()
        fate = "taken" if attempt in ("taken", "unknown-applied") else "refused"
        self.answers[index] = fate
        if fate == "taken":
            self.held.add(index)
        return orders.Unknown() if attempt == "unknown-applied" else self._result(index, fate)

    def release(self, reservation_id: str) -> None:
        self.held.discard(int(reservation_id.removeprefix("r-")))

    @staticmethod
    def _result(index: int, fate: str) -> orders.LegResult:
        return orders.Taken(f"r-{index}") if fate == "taken" else orders.Refused()


@settings(max_examples=300, deadline=None)
@given(scripts=SCRIPTS, confirms=CONFIRMS, releases=RELEASES)
def test_the_saga_ends_and_its_answer_matches_what_the_owners_hold(
    scripts: list[list[str]], confirms: list[bool], releases: list[bool]
) -> None:
    plan = planned(legs=len(scripts))
    shard = Shard(scripts)
    results = [shard.reserve(i) for i in range(len(scripts))]
    resolutions = 0
    compensated = False
    for _ in range(100):  # the saga ends well before this
        step = orders.next_step(plan, results, resolutions)
        match step:
            case orders.Resolve(indexes):
                assert indexes and all(isinstance(results[i], orders.Unknown) for i in indexes)
                resolutions += 1
                for i in indexes:
                    results[i] = shard.reserve(i)
            case orders.Confirm(indexes):
                assert all(isinstance(results[i], orders.Taken) for i in indexes)
                for i in indexes:
                    # A confirmation read either works (the leg is held) or fails (unknown).
                    results[i] = orders.Held(f"r-{i}") if confirms[i] else orders.Unknown()
            case orders.Compensate():
                assert any(isinstance(r, orders.Refused | orders.Lapsed) for r in results)
                compensated = True
                settled = [releases[i] for i in step.legs]
                for release, done in zip(step.releases, settled, strict=True):
                    assert release.idempotency_key == f"order-1/undo-{release.reservation_id}"
                    if done:
                        shard.release(release.reservation_id)
                answer = orders.after_compensation(step, settled)
                break
            case _:
                answer = step
                break
    else:
        raise AssertionError("the saga did not end")
    assert resolutions <= orders.LEG_RESOLUTIONS_MAX
    unknown = {i for i, result in enumerate(results) if isinstance(result, orders.Unknown)}
    match answer:
        case orders.Placed(ids):
            assert shard.held == set(range(len(scripts)))
            assert ids == tuple(f"r-{i}" for i in range(len(scripts)))
        case orders.LegFailed(index):
            assert shard.answers[index] == "refused"
            assert shard.held == set(), "a failed order holds nothing"
        case orders.FailedBefore():
            raise AssertionError("no leg lapsed in this model")
        case orders.OutcomeUnknown(legs):
            assert set(legs) >= unknown and legs
            if any(isinstance(r, orders.Refused) for r in results):
                # The order failed: every leg that may still hold stock is named.
                assert set(legs) >= shard.held
            else:  # nothing failed: the order may yet be placed by a retry with its key
                assert not compensated
