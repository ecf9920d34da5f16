"""The router's side of a split key without shards: the walk over its parts and what a
refresh of the map keeps (``RouterCalls._walk``, ``RouterCalls.refresh_hot_keys``).

The parts' owners are played by fakes of ``_forward_item`` and ``get_hot_keys``, so that each
case is exactly the answers it names: a retry that meets a kept refusal, a reservation a
router routed whole to the home while it did not know of the split, a listing taken while the
home's partition was moving.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from inventory.v1 import inventory_pb2 as pb

from inventory_core import InsufficientStock, InventoryKey, ShortLine, bucket_key, partition_of
from shard_router.common.calls import Refusal
from shard_router.common.convert import key_from_proto, key_to_proto
from shard_router.common.errors import rejection_from_status
from shard_router.router import hot_keys
from shard_router.router.routing import Routes
from shard_router.router.service import RouterCalls, _FirstHop

HOME = InventoryKey("m-1", "viral", "store-1")
BUCKETS = (bucket_key(HOME, 1), bucket_key(HOME, 2))
PARTS = (HOME, *BUCKETS)
DEADLINE_S = 5.0


def level(key: InventoryKey, on_hand: int, **counts: int) -> pb.StockLevel:
    reserved = counts.get("reserved", 0)
    return pb.StockLevel(
        key=key_to_proto(key),
        on_hand=on_hand,
        reserved=reserved,
        available=on_hand - reserved,
        sellable=max(on_hand - reserved - counts.get("allotted", 0), 0),
        allotted=counts.get("allotted", 0),
        version=counts.get("version", 1),
        exists=True,
    )


def sold_out_view() -> hot_keys.SplitView:
    """Every part known to offer nothing: the walk may stop at the first refusal it meets."""
    view = hot_keys.SplitView(HOME, PARTS, generation=7, merging=False)
    view.note(HOME, level(HOME, 30, reserved=10, allotted=20))
    for bucket in BUCKETS:
        view.note(bucket, level(bucket, 10, reserved=10))
    return view


class Parts(RouterCalls):
    """The parts' answers to a Reserve, by part; what was asked, in order."""

    def __init__(self, answers: dict[InventoryKey, pb.ReserveResponse | InsufficientStock]):
        super().__init__(cast("Routes", None))
        self.answers = answers
        self.asked: list[tuple[InventoryKey, bool]] = []

    async def _forward_item(
        self, partition: int, rpc: Any, item: pb.BatchItem, deadline: Any, first: Any = None
    ) -> pb.BatchItemResult:
        """The part's answer; ``first``, an answer already taken, is used as it is (a
        Refusal if it is an error), as the real one does for an answer that is not
        UNAVAILABLE."""
        request = item.reserve
        part = key_from_proto(request.lines[0].key)
        assert partition == partition_of(part.merchant_id, part.location_id)
        self.asked.append((part, request.keep_refusal))
        if first is not None:
            if first.WhichOneof("result") == "error":
                raise Refusal(first.error)
            return cast("pb.BatchItemResult", first)
        answer = self.answers[part]
        if isinstance(answer, InsufficientStock):
            raise Refusal.of(answer)
        return pb.BatchItemResult(reserve=answer)


def reserve(idempotency_key: str) -> pb.ReserveRequest:
    line = pb.ReservationLine(key=key_to_proto(HOME), quantity=1)
    return pb.ReserveRequest(lines=[line], idempotency_key=idempotency_key)


def refused(part: InventoryKey, kept: bool = False) -> InsufficientStock:
    return InsufficientStock((ShortLine(part, 1, 0),), kept=kept)


def held(reservation_id: str) -> pb.ReserveResponse:
    return pb.ReserveResponse(reservation=pb.Reservation(reservation_id=reservation_id))


def a_key_whose_walk_starts_at(first: InventoryKey) -> str:
    for number in range(1000):
        idempotency_key = f"cart-{number}"
        if hot_keys.walk_order(idempotency_key, PARTS)[0] == first:
            return idempotency_key
    raise AssertionError(f"no key starts at {first}")


def walk(
    calls: Parts, view: hot_keys.SplitView, idempotency_key: str, first: _FirstHop | None = None
) -> pb.ReserveResponse:
    deadline = asyncio.run(_now()) + DEADLINE_S
    return asyncio.run(calls._walk(view, reserve(idempotency_key), deadline, {}, first))


def first_hop(
    calls: Parts, view: hot_keys.SplitView, idempotency_key: str, result: pb.BatchItemResult
) -> _FirstHop:
    """The walk's first attempt as the Batch path sends it, with the answer it got."""
    order = hot_keys.walk_order(idempotency_key, PARTS)
    partition, item = calls._hop(view, reserve(idempotency_key), order, 0, {})
    return _FirstHop(order, partition, item, result)


async def _now() -> float:
    return asyncio.get_running_loop().time()


def test_a_retry_goes_on_past_a_kept_refusal_to_the_part_that_holds_it() -> None:
    """Sold out, as the view says: still the retry passes the refusal its first walk kept."""
    idempotency_key = a_key_whose_walk_starts_at(BUCKETS[0])
    order = hot_keys.walk_order(idempotency_key, PARTS)
    answers: dict[InventoryKey, Any] = {order[0]: refused(order[0], kept=True)}
    answers[order[1]] = held("r-held")
    answers[order[2]] = refused(order[2])
    calls = Parts(answers)
    assert walk(calls, sold_out_view(), idempotency_key).reservation.reservation_id == "r-held"
    assert [part for part, _ in calls.asked] == list(order[:2])


def test_the_walk_never_refuses_before_the_home_has_answered() -> None:
    """A reservation routed whole to the home (the router did not know of the split yet) is
    found by its retry, although a bucket comes first and refuses afresh."""
    idempotency_key = next(
        f"cart-{n}" for n in range(1000) if hot_keys.walk_order(f"cart-{n}", PARTS)[2] == HOME
    )
    order = hot_keys.walk_order(idempotency_key, PARTS)
    calls = Parts({order[0]: refused(order[0]), order[1]: refused(order[1]), HOME: held("r-home")})
    assert walk(calls, sold_out_view(), idempotency_key).reservation.reservation_id == "r-home"
    # Each refusal the walk moved on from was asked to be kept, so a retry meets it again.
    assert calls.asked == [(order[0], True), (order[1], True), (HOME, False)]


def test_once_the_home_has_refused_and_nothing_later_offers_the_walk_refuses() -> None:
    idempotency_key = a_key_whose_walk_starts_at(HOME)
    order = hot_keys.walk_order(idempotency_key, PARTS)
    calls = Parts({HOME: refused(HOME), **{b: held("never") for b in BUCKETS}})
    with pytest.raises(Refusal) as raised:
        walk(calls, sold_out_view(), idempotency_key)
    rejection = rejection_from_status(raised.value.status)
    assert isinstance(rejection, InsufficientStock)
    assert rejection.lines[0].key == HOME  # the key as the caller knows it
    assert calls.asked == [(order[0], False)]


def test_a_first_hop_s_kept_refusal_taken_by_the_batch_path_walks_on_from_the_next_part() -> None:
    """The Batch path sends the first hop itself; the walk it hands the refusal to does not
    send it again, and goes on past it because that hop asked for it to be kept."""
    idempotency_key = a_key_whose_walk_starts_at(BUCKETS[0])
    order = hot_keys.walk_order(idempotency_key, PARTS)
    view = hot_keys.SplitView(HOME, PARTS, generation=7, merging=False)  # nothing heard yet
    calls = Parts({order[1]: held("r-next"), order[2]: held("never")})
    status = Refusal.of(refused(order[0])).status
    first = first_hop(calls, view, idempotency_key, pb.BatchItemResult(error=status))
    assert first.item.reserve.keep_refusal  # the home is still to come
    assert walk(calls, view, idempotency_key, first).reservation.reservation_id == "r-next"
    assert [part for part, _ in calls.asked] == list(order[:2])


def test_a_first_hop_refused_at_the_home_with_nothing_later_refuses_the_walk() -> None:
    idempotency_key = a_key_whose_walk_starts_at(HOME)
    calls = Parts({b: held("never") for b in BUCKETS})
    view = sold_out_view()
    status = Refusal.of(refused(HOME)).status
    first = first_hop(calls, view, idempotency_key, pb.BatchItemResult(error=status))
    assert not first.item.reserve.keep_refusal
    with pytest.raises(Refusal) as raised:
        walk(calls, view, idempotency_key, first)
    assert isinstance(rejection_from_status(raised.value.status), InsufficientStock)
    assert calls.asked == [(HOME, False)]


# ------------------------------------------------------------------- refreshing the map


class Listing(RouterCalls):
    """Shards that list ``listed`` split homes, and answer a home asked by key with its split
    (``homes``; absent: it is whole), or fail (``failing``)."""

    def __init__(self, listed: list[pb.HotKeySplit], homes: dict[InventoryKey, pb.HotKeySplit]):
        super().__init__(cast("Routes", None))
        self.listed, self.homes = listed, homes
        self.failing = False

    async def get_hot_keys(
        self, request: pb.GetHotKeysRequest, deadline: float | None
    ) -> pb.GetHotKeysResponse:
        if not request.keys:
            return pb.GetHotKeysResponse(parts=[pb.HotKeyPart(split=s) for s in self.listed])
        if self.failing:
            raise Refusal.of(refused(HOME))
        parts = []
        for proto in request.keys:
            key = key_from_proto(proto)
            if key in self.homes:
                parts.append(pb.HotKeyPart(level=self.homes[key].home, split=self.homes[key]))
            elif key in BUCKETS:
                parts.append(pb.HotKeyPart(level=level(key, 10), home=key_to_proto(HOME)))
        return pb.GetHotKeysResponse(parts=parts)


def split_of() -> pb.HotKeySplit:
    return pb.HotKeySplit(
        home=level(HOME, 30, allotted=20),
        buckets=[key_to_proto(b) for b in BUCKETS],
        generation=7,
    )


def refreshed(calls: Listing) -> None:
    asyncio.run(calls.refresh_hot_keys(None))


def test_a_split_left_out_of_a_listing_is_kept_while_its_home_says_it_is_split() -> None:
    calls = Listing([split_of()], {HOME: split_of()})
    refreshed(calls)
    assert calls.hot_keys.keys() == {HOME}
    calls.listed = []  # its partition is moving: the new owner is still recovering it
    refreshed(calls)
    view = calls.hot_keys.spread(HOME)
    assert view is not None and view.parts == PARTS


def test_a_split_left_out_of_a_listing_goes_once_its_home_says_it_is_whole() -> None:
    calls = Listing([split_of()], {HOME: split_of()})
    refreshed(calls)
    calls.listed, calls.homes = [], {}
    refreshed(calls)
    assert calls.hot_keys.keys() == set()


def test_a_home_that_cannot_be_asked_leaves_the_map_as_it_was() -> None:
    calls = Listing([split_of()], {HOME: split_of()})
    refreshed(calls)
    calls.listed, calls.failing = [], True
    with pytest.raises(Refusal):
        refreshed(calls)
    assert calls.hot_keys.keys() == {HOME}


def test_a_merging_key_is_still_walked_so_a_retry_finds_a_bucket_s_reservation() -> None:
    found = hot_keys.HotKeyMap()
    found.put(hot_keys.SplitView(HOME, PARTS, generation=7, merging=True))
    view = found.spread(HOME)
    assert view is not None and view.merging
