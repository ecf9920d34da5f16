"""The router's Inventory API: route each call to its partition's owner, over batch streams.

Every call is checked with the core's rules first (a malformed request never costs a hop),
then forwarded as an item on the owner's ``Inventory.Batch`` stream with the caller's
remaining deadline (``ROUTES``: each call's check and the partition its request names). On
the router's own Batch stream the items of a request are grouped by owner and forwarded as
they were received, their first answer taken by callback: no task per item, and only an
item that must be retried gets one. UNAVAILABLE answers (a redirect from a shard that does
not own the partition, a recovering partition, a failed flush, a broken stream) refresh the
ring and retry with backoff until the deadline: the request is forwarded unchanged, so a
mutation is retried only with its own idempotency key and can never apply twice. When the
router gives up, its answer is RETRYABLE only if every attempt was known not applied, else
OUTCOME_UNKNOWN (shard_router.common.errors). Batch reads fan out per owner and are merged
back in request order. ReserveOrder runs the core's order plan (inventory_core.orders).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
import structlog
from google.protobuf.message import Message
from google.rpc import status_pb2
from inventory.v1 import inventory_pb2 as pb
from opentelemetry.trace import Span

from inventory_core import (
    BUCKET_SEPARATOR,
    ClientCommand,
    InsufficientStock,
    Invalid,
    InventoryKey,
    Release,
    ReservationNotFound,
    ShortLine,
    home_key,
    limits,
    locations_by_partition,
    orders,
    partition_of,
    partition_of_reservation,
    validate,
    validate_hot_keys_read,
    validate_key,
    validate_locations_read,
    validate_read,
)

from ..common import batching, convert, errors, rpcs, tracing
from ..common import ingest as ingest_service
from ..common.calls import (
    CALL_TIMEOUT_S_DEFAULT,
    PROPAGATED_METADATA,
    Refusal,
    check,
    propagated,
    request_metadata,
)
from ..common.servicer import CallsServicer
from . import hot_keys
from .detector import HotKeyDetector, Verdict
from .routing import Forwarded, Routes

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)
log = structlog.get_logger(__name__)

# Retries of one call on UNAVAILABLE before giving up (within its deadline anyway).
FORWARD_ATTEMPTS_MAX = 30
# Backoff between them: a partition hand-off takes about a membership lease.
RETRY_BACKOFF_S_INITIAL = 0.02
RETRY_BACKOFF_S_MAX = 0.5
# One round of an order's calls (its legs, their resolution, their confirmation) may use
# this share of what is left of the deadline, so compensation always has time left.
ORDER_ROUND_DEADLINE_SHARE = 0.5
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


class ReadView(Protocol):
    """The eventually consistent read view (persistence.readview.EventReader)."""

    async def levels(
        self, keys: Sequence[InventoryKey]
    ) -> list[tuple[pb.StockLevel, int, int, int] | None]: ...

    async def asof(self, partitions: Sequence[int]) -> dict[int, int | None]: ...


class RouterCalls:
    def __init__(self, routes: Routes, read_view: ReadView | None = None) -> None:
        self._routes = routes
        self._read_view = read_view
        # The split keys this router spreads, and the counts that find hot ones (None: it
        # does not look for them) (DESIGN section 10).
        self.hot_keys = hot_keys.HotKeyMap()
        self.detector: HotKeyDetector | None = None

    # ------------------------------------------------------------------------ reads

    async def get_availability(
        self, request: pb.GetAvailabilityRequest, deadline: float | None
    ) -> pb.GetAvailabilityResponse:
        """Each key's level from its owner (STRONG) or the read view (EVENTUAL); a split key's
        is its parts' together, each read the same way (``SplitView.total``)."""
        keys = [convert.key_from_proto(key) for key in request.keys]
        check(validate_read(keys))
        views = [self.hot_keys.get(key) for key in keys] if self.hot_keys else []
        if not any(views):
            return await self._levels(request, deadline)
        parts = list(dict.fromkeys(p for view in views if view for p in view.parts))
        asked = list(dict.fromkeys([*keys, *parts]))
        expanded = pb.GetAvailabilityRequest(
            keys=[convert.key_to_proto(k) for k in asked], consistency=request.consistency
        )
        answer = await self._levels(expanded, deadline)
        found = dict(zip(asked, answer.levels, strict=True))
        levels = []
        for key, view in zip(keys, views or [None] * len(keys), strict=True):
            if view is None:
                levels.append(found[key])
                continue
            for part in view.parts:
                view.note(part, found[part])
            levels.append(view.total())
        return pb.GetAvailabilityResponse(levels=levels, staleness_ms=answer.staleness_ms)

    async def _levels(
        self, request: pb.GetAvailabilityRequest, deadline: float | None
    ) -> pb.GetAvailabilityResponse:
        partitions = [partition_of(key.merchant_id, key.location_id) for key in request.keys]
        levels: list[pb.StockLevel] = [pb.StockLevel()] * len(partitions)
        pending = list(range(len(partitions)))
        staleness_ms = 0
        eventual = request.consistency == pb.CONSISTENCY_EVENTUAL
        if eventual and self._read_view is not None:
            pending, staleness_ms = await self._from_read_view(request, partitions, levels)
        if not pending:
            return pb.GetAvailabilityResponse(levels=levels, staleness_ms=staleness_ms)
        for attempt in range(FORWARD_ATTEMPTS_MAX):
            groups: dict[str | None, list[int]] = {}
            for index in pending:
                groups.setdefault(self._routes.address_of(partitions[index]), []).append(index)
            results = await asyncio.gather(
                *(
                    self._read_group(address, request, indexes, deadline)
                    for address, indexes in groups.items()
                )
            )
            pending = []
            for indexes, answer in zip(groups.values(), results, strict=True):
                if isinstance(answer, status_pb2.Status):
                    if answer.code != grpc.StatusCode.UNAVAILABLE.value[0]:
                        raise Refusal(answer)
                    pending.extend(indexes)
                    continue
                for index, level in zip(indexes, answer.levels, strict=True):
                    levels[index] = level
            if not pending:
                return pb.GetAvailabilityResponse(levels=levels, staleness_ms=staleness_ms)
            await self._backoff(attempt, deadline, outcome_unknown=False)  # a read
        message = f"owners unavailable after {FORWARD_ATTEMPTS_MAX} attempts"
        raise Refusal(errors.owners_unavailable(message, outcome_unknown=False))

    async def _from_read_view(
        self,
        request: pb.GetAvailabilityRequest,
        partitions: list[int],
        levels: list[pb.StockLevel],
    ) -> tuple[list[int], int]:
        """Fill what the read view can answer with a known staleness bound; the indexes
        left (keys it has never seen, partitions no publisher has stamped, or Redis down)
        are read from their owners instead."""
        assert self._read_view is not None
        keys = [convert.key_from_proto(k) for k in request.keys]
        try:
            found = await self._read_view.levels(keys)
            stamps = await self._read_view.asof(partitions)
        except Exception as error:  # the view is an optimisation: fall back to owners
            log.warning("read_view_unavailable", error=repr(error))
            return list(range(len(keys))), 0
        now_ms = int(time.time() * 1000)
        pending: list[int] = []
        oldest_ms = now_ms
        for index, answer in enumerate(found):
            stamp = stamps.get(partitions[index])
            if answer is None or stamp is None:
                pending.append(index)
                continue
            levels[index] = answer[0]
            oldest_ms = min(oldest_ms, stamp)
        return pending, max(now_ms - oldest_ms, 0)

    async def _read_group(
        self,
        address: str | None,
        request: pb.GetAvailabilityRequest,
        indexes: list[int],
        deadline: float | None,
    ) -> pb.GetAvailabilityResponse | status_pb2.Status:
        if address is None:
            return errors.owners_unavailable("no live shard", outcome_unknown=False)
        item = _item()
        item.get_availability.keys.extend(request.keys[i] for i in indexes)
        item.get_availability.consistency = request.consistency
        result = await self._call(address, item, deadline, mutating=False)
        if result.WhichOneof("result") == "error":
            return result.error
        return result.get_availability

    async def get_reservation(
        self, request: pb.GetReservationRequest, deadline: float | None
    ) -> pb.GetReservationResponse:
        return await self._routed(rpcs.GET_RESERVATION, request, deadline)

    # -------------------------------------------------------------------- mutations

    async def reserve(
        self, request: pb.ReserveRequest, deadline: float | None
    ) -> pb.ReserveResponse:
        view = self._spread_view(request)
        if view is None:
            return await self._routed(rpcs.RESERVE, request, deadline)
        return await self._walk(view, request, deadline, request_metadata.get())

    def _spread_view(self, request: pb.ReserveRequest) -> hot_keys.SplitView | None:
        """The split key a one-line Reserve is for, to spread over its parts; None: route
        it whole (a cart of several keys is reserved at its home, from the home's share).
        A one-line Reserve is also what the detector counts."""
        if len(request.lines) != 1 or not (self.hot_keys or self.detector):
            return None
        key = convert.key_from_proto(request.lines[0].key)
        if self.detector is not None:
            self.detector.count(key)
        return self.hot_keys.spread(key) if self.hot_keys else None

    async def _walk(
        self,
        view: hot_keys.SplitView,
        request: pb.ReserveRequest,
        deadline: float | None,
        metadata: Mapping[str, str],
        first: _FirstHop | None = None,
    ) -> pb.ReserveResponse:
        """Try the key's parts in the order its idempotency key fixes (``walk_order``) until
        one admits it. A part's refusal is kept (``keep_refusal``) whenever the walk would go
        on past it, so a retry meets the same answers, and a retry goes on past every kept
        refusal it meets (whatever the parts offer now: a later part may hold its
        reservation); the walk stops early, and refuses, once the home has answered and no
        later part is known to offer enough. An answer of unknown outcome ends the walk: the
        caller retries with its key, and the walk with it. ``first``: the first part's
        attempt, already sent, and its answer (the Batch path's, ``_Walk``)."""
        order = first.order if first else hot_keys.walk_order(request.idempotency_key, view.parts)
        for index, part in enumerate(order):
            if first is not None and index == 0:
                partition, item, result = first.partition, first.item, first.result
            else:
                partition, item = self._hop(view, request, order, index, metadata)
                result = None
            try:
                answer = await self._forward_item(partition, rpcs.RESERVE, item, deadline, result)
            except Refusal as refusal:
                rejection = errors.rejection_from_status(refusal.status)
                if not isinstance(rejection, InsufficientStock):
                    raise
                view.refused_at[part] = rejection.lines[0].available
                kept = item.reserve.keep_refusal or rejection.kept  # by this walk, or one before
                if kept and index + 1 < len(order):
                    continue
                # What the parts offer together, as last heard: it may cover the request
                # while no single part does (units stranded across them).
                total = view.total().sellable
                quantity = request.lines[0].quantity
                raise Refusal.of(
                    InsufficientStock((ShortLine(view.home, quantity, total),))
                ) from None
            return answer.reserve  # as callers see it (``_for_caller``, in ``_forward_item``)
        raise AssertionError("a split key with no parts")

    @staticmethod
    def _hop(
        view: hot_keys.SplitView,
        request: pb.ReserveRequest,
        order: Sequence[InventoryKey],
        index: int,
        metadata: Mapping[str, str],
    ) -> tuple[int, pb.BatchItem]:
        """The partition and the item of a walk's attempt at ``order[index]``. It asks the
        part to keep its refusal when the walk would go on past it: while the home is still
        to come (never refuse before the home has answered: a reservation routed to the home
        whole, while this router did not know of the split yet, is found there), or while a
        later part is known to offer enough."""
        part = order[index]
        quantity = request.lines[0].quantity
        later = order[index + 1 :]
        item = pb.BatchItem()
        attempt = item.reserve
        attempt.CopyFrom(request)  # the caller's, for the part: its key is the home's
        attempt.lines[0].key.location_id = part.location_id
        attempt.keep_refusal = view.home in later or any(view.offered(p) >= quantity for p in later)
        if metadata:
            item.metadata.update(propagated(metadata.items()))
        return view.partitions[part], item

    def _for_caller(self, result: pb.BatchItemResult) -> None:
        """In place, an answer about a reservation a bucket holds as callers see it: the key
        they know (``hot_keys.for_caller``), its level the parts' total."""
        field = result.WhichOneof("result")
        if field not in _RESERVATION_RESULTS:
            return
        answer = getattr(result, field)
        if not hot_keys.for_caller(answer.reservation) or field not in _LEVEL_RESULTS:
            return
        for level in answer.levels:
            part = convert.key_from_proto(level.key)
            view = self.hot_keys.get(home_key(part))
            if view is not None and part in view.parts:
                view.note(part, level)
                level.CopyFrom(view.total())
            else:  # not one this router knows split: the key, with the bucket's counts
                level.key.location_id = part.location_id.partition(BUCKET_SEPARATOR)[0]

    async def commit(self, request: pb.CommitRequest, deadline: float | None) -> pb.CommitResponse:
        return await self._routed(rpcs.COMMIT, request, deadline)

    async def release(
        self, request: pb.ReleaseRequest, deadline: float | None
    ) -> pb.ReleaseResponse:
        return await self._routed(rpcs.RELEASE, request, deadline)

    async def extend_reservation(
        self, request: pb.ExtendReservationRequest, deadline: float | None
    ) -> pb.ExtendReservationResponse:
        return await self._routed(rpcs.EXTEND_RESERVATION, request, deadline)

    async def adjust_stock(
        self, request: pb.AdjustStockRequest, deadline: float | None
    ) -> pb.AdjustStockResponse:
        return await self._routed(rpcs.ADJUST_STOCK, request, deadline)

    async def set_stock(
        self, request: pb.SetStockRequest, deadline: float | None
    ) -> pb.SetStockResponse:
        return await self._routed(rpcs.SET_STOCK, request, deadline)

    async def set_safety_stock(
        self, request: pb.SetSafetyStockRequest, deadline: float | None
    ) -> pb.SetSafetyStockResponse:
        return await self._routed(rpcs.SET_SAFETY_STOCK, request, deadline)

    async def expect_delivery(
        self, request: pb.ExpectDeliveryRequest, deadline: float | None
    ) -> pb.ExpectDeliveryResponse:
        return await self._routed(rpcs.EXPECT_DELIVERY, request, deadline)

    # ------------------------------------------------------------------------ hot keys

    async def split_key(
        self, request: pb.SplitKeyRequest, deadline: float | None
    ) -> pb.SplitKeyResponse:
        """Place the buckets (``hot_keys.bucket_numbers``) unless the caller named them, and
        split the key at its home."""
        key = convert.key_from_proto(request.key)
        check(validate_key("key", key))
        forwarded = pb.SplitKeyRequest()
        forwarded.CopyFrom(request)
        if not request.bucket_numbers:
            count = request.bucket_count
            if not 0 < count <= limits.split_buckets_max:
                bounds = f"1 to {limits.split_buckets_max}"
                check(Invalid("bucket_count", f"{bounds} buckets besides the home, got {count}"))
            forwarded.bucket_numbers.extend(
                hot_keys.bucket_numbers(key, count, self._routes.address_of)
            )
        partition = partition_of(key.merchant_id, key.location_id)
        answer: pb.SplitKeyResponse = await self._forward(
            partition, rpcs.SPLIT_KEY, forwarded, deadline
        )
        self._learn_split(answer.split)
        return answer

    async def merge_key(
        self, request: pb.MergeKeyRequest, deadline: float | None
    ) -> pb.MergeKeyResponse:
        answer: pb.MergeKeyResponse = await self._routed(rpcs.MERGE_KEY, request, deadline)
        self._learn_split(answer.split)
        return answer

    def _learn_split(self, split: pb.HotKeySplit) -> None:
        """A split (or merge) just answered: spread by it now, not at the next refresh."""
        home = convert.key_from_proto(split.home.key)
        if not split.buckets:
            self.hot_keys.drop(home)
            return
        known = self.hot_keys.get(home)
        view = hot_keys.view_of(split)
        if known is not None and known.generation == view.generation:
            view.levels = {**known.levels, **view.levels}
        self.hot_keys.put(view)

    async def act_on(self, verdict: Verdict, bucket_count: int, deadline: float) -> None:
        """Split the keys a window found hot, merge the ones that cooled (each once: a key
        already split keeps its buckets, a whole one stays whole)."""
        for key in verdict.hot:
            log.info("hot_key_split", key=convert.key_text(key), buckets=bucket_count)
            request = pb.SplitKeyRequest(
                key=convert.key_to_proto(key),
                bucket_count=bucket_count,
                idempotency_key=f"hot-key-split:{secrets.token_hex(8)}",
            )
            await self._try(self.split_key(request, deadline))
        for key in verdict.cooled:
            log.info("hot_key_merge", key=convert.key_text(key))
            merge = pb.MergeKeyRequest(
                key=convert.key_to_proto(key),
                idempotency_key=f"hot-key-merge:{secrets.token_hex(8)}",
            )
            await self._try(self.merge_key(merge, deadline))

    async def _try(self, call: Awaitable[Any]) -> None:
        """An automatic split or merge: a refusal is logged; the next window tries again."""
        try:
            await call
        except Refusal as refusal:
            log.warning("hot_key_change_failed", status=refusal.status.message)

    async def refresh_hot_keys(self, deadline: float | None) -> None:
        """Every split key the shards hold, with each part's level (``HotKeyMap.replace``)."""
        homes = await self.get_hot_keys(pb.GetHotKeysRequest(), deadline)
        views = [hot_keys.view_of(part.split) for part in homes.parts if part.split.buckets]
        # A listing leaves out a split whose partition is moving (its new owner is still
        # recovering it): such a key is forgotten only once its home itself says it is whole.
        listed = {view.home for view in views}
        missing = list(self.hot_keys.keys() - listed)
        for start in range(0, len(missing), limits.availability_keys_max):
            chunk = missing[start : start + limits.availability_keys_max]
            request = pb.GetHotKeysRequest(keys=[convert.key_to_proto(k) for k in chunk])
            found = await self.get_hot_keys(request, deadline)
            views += [hot_keys.view_of(p.split) for p in found.parts if p.split.buckets]
        buckets = [bucket for view in views for bucket in view.parts[1:]]
        for start in range(0, len(buckets), limits.availability_keys_max):
            chunk = buckets[start : start + limits.availability_keys_max]
            request = pb.GetHotKeysRequest(keys=[convert.key_to_proto(b) for b in chunk])
            found = await self.get_hot_keys(request, deadline)
            levels = {convert.key_from_proto(p.level.key): p.level for p in found.parts}
            for view in views:
                for bucket in view.parts[1:]:
                    if bucket in levels:
                        view.note(bucket, levels[bucket])
        self.hot_keys.replace(views)

    async def send_quota(
        self, request: pb.SendQuotaRequest, deadline: float | None
    ) -> pb.SendQuotaResponse:
        answer: pb.SendQuotaResponse = await self._routed(rpcs.SEND_QUOTA, request, deadline)
        self.hot_keys.note(convert.key_from_proto(answer.level.key), answer.level)
        return answer

    async def receive_quota(
        self, request: pb.ReceiveQuotaRequest, deadline: float | None
    ) -> pb.ReceiveQuotaResponse:
        answer: pb.ReceiveQuotaResponse = await self._routed(rpcs.RECEIVE_QUOTA, request, deadline)
        if answer.merged:
            self.hot_keys.drop(convert.key_from_proto(answer.level.key))
        else:
            self.hot_keys.note(convert.key_from_proto(answer.level.key), answer.level)
        return answer

    async def settle_transfer(
        self, request: pb.SettleTransferRequest, deadline: float | None
    ) -> pb.SettleTransferResponse:
        return await self._routed(rpcs.SETTLE_TRANSFER, request, deadline)

    async def get_hot_keys(
        self, request: pb.GetHotKeysRequest, deadline: float | None
    ) -> pb.GetHotKeysResponse:
        """The named parts, one request per partition to its owner, in the order asked; with
        no keys, every shard's split homes. A read: any failure is the call's."""
        keys = [convert.key_from_proto(k) for k in request.keys]
        check(validate_hot_keys_read(keys))
        if not keys:
            answers = await asyncio.gather(
                *(
                    self._ask_shard(address, rpcs.GET_HOT_KEYS, request, deadline)
                    for address in self._routes.addresses
                )
            )
            return pb.GetHotKeysResponse(parts=[p for answer in answers for p in answer.parts])
        by_partition: dict[int, list[pb.InventoryKey]] = {}
        for proto in request.keys:
            by_partition.setdefault(_key_partition(proto), []).append(proto)
        answers = await asyncio.gather(
            *(
                self._forward(p, rpcs.GET_HOT_KEYS, pb.GetHotKeysRequest(keys=ks), deadline)
                for p, ks in by_partition.items()
            )
        )
        found = {
            convert.key_from_proto(part.level.key): part
            for answer in answers
            for part in answer.parts
        }
        ordered = [found[k] for k in dict.fromkeys(keys) if k in found]
        return pb.GetHotKeysResponse(parts=ordered)

    async def _ask_shard(
        self, address: str, rpc: rpcs.Rpc[Any, ResponseT], request: Message, deadline: float | None
    ) -> ResponseT:
        """A read of one shard as a whole (not of a partition): its answer, else Refusal."""
        item = _item()
        getattr(item, rpc.field).CopyFrom(request)
        result = await self._call(address, item, deadline, mutating=False)
        if result.WhichOneof("result") == "error":
            raise Refusal(result.error)
        response: ResponseT = getattr(result, rpc.field)
        return response

    async def get_over_committed(
        self, request: pb.GetOverCommittedRequest, deadline: float | None
    ) -> pb.GetOverCommittedResponse:
        """One request per partition of the locations, to its owner; keys by location, then
        SKU. A read: any failure is the call's (retryable), never a partial answer."""
        answers = await self._by_location(rpcs.GET_OVER_COMMITTED, request, deadline)
        keys = sorted(
            (k for answer in answers for k in answer.keys),
            key=lambda k: (k.key.location_id, k.key.sku_id),
        )
        return pb.GetOverCommittedResponse(keys=keys)

    async def get_feed_health(
        self, request: pb.GetFeedHealthRequest, deadline: float | None
    ) -> pb.GetFeedHealthResponse:
        """One request per partition of the locations, to its owner; in the order asked."""
        answers = await self._by_location(rpcs.GET_FEED_HEALTH, request, deadline)
        found = {h.location_id: h for answer in answers for h in answer.locations}
        ordered = [found[i] for i in dict.fromkeys(request.location_ids) if i in found]
        return pb.GetFeedHealthResponse(locations=ordered)

    async def _by_location(
        self, rpc: rpcs.Rpc[Any, ResponseT], request: Any, deadline: float | None
    ) -> list[ResponseT]:
        """A read by location (merchant_id, location_ids): one request per partition of the
        locations, to its owner. Any failure is the call's (retryable), never a partial answer."""
        merchant_id = request.merchant_id
        check(validate_locations_read(merchant_id, request.location_ids))
        return list(
            await asyncio.gather(
                *(
                    self._forward(
                        partition,
                        rpc,
                        rpc.request_type(merchant_id=merchant_id, location_ids=locations),
                        deadline,
                    )
                    for partition, locations in locations_by_partition(
                        merchant_id, request.location_ids
                    ).items()
                )
            )
        )

    async def ingest(self, request: pb.IngestRequest, deadline: float | None) -> pb.IngestResponse:
        """A feed's events, each partition's part forwarded to its owner (common/ingest.py)."""
        return await ingest_service.ingest(request, deadline, self._ingest_part)

    async def _ingest_part(
        self, part: ingest_service.Part, deadline: float
    ) -> pb.IngestResponse | status_pb2.Status:
        item = _item()
        item.ingest.CopyFrom(part.request)
        try:
            result = await self._forward_item(part.partition, rpcs.INGEST, item, deadline)
        except Refusal as refusal:
            return refusal.status
        return result.ingest

    async def _routed(
        self, rpc: rpcs.Rpc[RequestT, ResponseT], request: RequestT, deadline: float | None
    ) -> ResponseT:
        partition = ROUTES[rpc.field].partition_of(request)  # Refusal: it names none
        return await self._forward(partition, rpc, request, deadline)

    # ------------------------------------------------------------------------- saga

    async def reserve_order(
        self, request: pb.ReserveOrderRequest, deadline: float | None
    ) -> pb.ReserveOrderResponse:
        """Run the core's order plan (inventory_core.orders): reserve every leg, resolve the
        legs whose outcome is unknown, confirm or compensate, and answer as the plan says."""
        legs = [convert.lines_from_proto(leg.lines) for leg in request.legs]
        plan = orders.plan(request.idempotency_key, request.ttl_s, legs)
        if isinstance(plan, Invalid):
            raise Refusal.of(plan)
        run = _OrderRun(plan)
        await self._reserve_legs(run, range(len(plan.legs)), _share(deadline))
        resolutions = 0
        while True:
            step = orders.next_step(plan, run.results, resolutions)
            match step:
                case orders.Resolve(indexes):
                    resolutions += 1
                    await self._reserve_legs(run, indexes, _share(deadline))
                case orders.Confirm(indexes):
                    await self._confirm_legs(run, indexes, _share(deadline))
                case orders.Compensate():
                    settled = await asyncio.gather(
                        *(self._compensate(release, deadline) for release in step.releases)
                    )
                    return run.answer(orders.after_compensation(step, settled))
                case _:
                    return run.answer(step)

    async def _reserve_legs(
        self, run: _OrderRun, indexes: Sequence[int], deadline: float | None
    ) -> None:
        async def reserve(index: int) -> None:
            command = run.plan.legs[index]
            first = command.lines[0].key
            partition = partition_of(first.merchant_id, first.location_id)
            try:
                answer = await self._forward(
                    partition, rpcs.RESERVE, convert.reserve_to_proto(command), deadline
                )
            except Refusal as refusal:
                run.refused(index, refusal.status)
            else:
                run.taken(index, answer.reservation)

        await asyncio.gather(*(reserve(index) for index in indexes))

    async def _confirm_legs(
        self, run: _OrderRun, indexes: Sequence[int], deadline: float | None
    ) -> None:
        async def confirm(index: int) -> None:
            reservation = run.reservations[index]
            request = pb.GetReservationRequest(
                merchant_id=reservation.merchant_id, reservation_id=reservation.reservation_id
            )
            try:
                found = await self.get_reservation(request, deadline)
            except Refusal:  # not read: settle it by reserving again with the same key
                run.results[index] = orders.Unknown()
                return
            active = found.reservation.state == pb.RESERVATION_STATE_ACTIVE
            kind = orders.Held if active else orders.Lapsed
            run.results[index] = kind(reservation.reservation_id)

        await asyncio.gather(*(confirm(index) for index in indexes))

    async def _compensate(self, release: Release, deadline: float | None) -> bool:
        """Release a taken leg; True once nothing is held by it (released now or before,
        expired, or committed): a final answer. False if the release's fate is open."""
        try:
            await self.release(convert.release_to_proto(release), deadline)
        except Refusal as refusal:
            return errors.answer_class_of(refusal.status) is errors.AnswerClass.FINAL
        return True

    # -------------------------------------------------------------------- forwarding

    def batch_handler(self, others: batching.ItemHandler) -> batching.ItemHandler:
        """The router's Batch items: a routed call (``ROUTES``) is checked, then forwarded
        with the other items of its request that have the same owner, as it was received;
        its first answer comes back by callback, and only if that is UNAVAILABLE does a
        task retry it (``_forward_item``). The rest (GetAvailability, which fans out, and
        an item without a call) go to ``others``."""

        def handle(
            items: Sequence[pb.BatchItem],
            received_at: float,
            answer: batching.Answer,
            group: asyncio.TaskGroup,
        ) -> None:
            by_owner: dict[str, list[Forwarded]] = {}
            rest: list[pb.BatchItem] = []
            for item in items:
                name = item.WhichOneof("call")
                if name == "reserve" and (self.hot_keys or self.detector):
                    view = self._spread_view(item.reserve)
                    if view is not None:  # a split key: its first hop goes with the rest
                        deadline = batching.item_deadline(item, received_at)
                        span, traced = tracing.serve_item(item, answer)
                        walk = _Walk.of(
                            self,
                            view,
                            item,
                            deadline=deadline,
                            answer=traced,
                            group=group,
                            span=span,
                        )
                        address = self._routes.address_of(walk.partition)
                        if address is None:
                            group.create_task(tracing.within(span, walk.walk_on(None)))
                        else:
                            by_owner.setdefault(address, []).append(walk.forwarded(address))
                        continue
                route = None if name is None else ROUTES.get(name)
                if name is None or route is None:
                    rest.append(item)
                    continue
                partition = _checked_partition(item, name, route, answer)
                if partition is None:
                    continue  # answered: refused, or a bug
                if item.metadata:
                    _keep_propagated(item)
                span, traced = tracing.serve_item(item, answer)
                deadline = batching.item_deadline(item, received_at)
                routed = _Routed(
                    calls=self,
                    route=route,
                    partition=partition,
                    item=item,
                    deadline=deadline,
                    answer=traced,
                    group=group,
                    span=span,
                )
                address = self._routes.address_of(partition)
                if address is None:  # no live owner known yet: the retries wait for one
                    group.create_task(tracing.within(span, routed.retry(None)))
                    continue
                by_owner.setdefault(address, []).append(routed.forwarded(address))
            for address, forwarded_items in by_owner.items():
                self._routes.stream(address).forward(forwarded_items)
            if rest:
                others(rest, received_at, answer, group)

        return handle

    async def _forward(
        self,
        partition: int,
        rpc: rpcs.Rpc[Any, ResponseT],
        request: Message,
        deadline: float | None,
    ) -> ResponseT:
        """A unary call (or an order's) forwarded as one item: ``_forward_item``."""
        item = _item()
        getattr(item, rpc.field).CopyFrom(request)
        result = await self._forward_item(partition, rpc, item, deadline)
        response: ResponseT = getattr(result, rpc.field)
        return response

    async def _forward_item(
        self,
        partition: int,
        rpc: rpcs.Rpc[Any, Any],
        item: pb.BatchItem,
        deadline: float | None,
        first: pb.BatchItemResult | None = None,
    ) -> pb.BatchItemResult:
        """Send the item to the partition's owner, retrying UNAVAILABLE with backoff; the
        result if it is not an error, else ``Refusal``. ``first`` is the answer of an
        attempt already made (the Batch path's, taken by callback).

        The item is forwarded unchanged, so a retry of a mutation whose outcome is unknown
        carries the same idempotency key and finds its durable answer. The answer after
        several attempts is honest about them (``errors.after_attempts``).
        """
        earlier_unknown = False
        result = first
        for attempt in range(FORWARD_ATTEMPTS_MAX):
            if result is None:
                address = self._routes.address_of(partition)
                if address is not None:
                    result = await self._call(address, item, deadline, mutating=rpc.mutating)
            if result is not None:
                if result.WhichOneof("result") != "error":
                    self._for_caller(result)
                    return result
                if result.error.code != UNAVAILABLE:
                    raise Refusal(
                        errors.after_attempts(result.error, earlier_unknown=earlier_unknown)
                    )
                unknown = errors.answer_class_of(result.error) is errors.AnswerClass.OUTCOME_UNKNOWN
                earlier_unknown |= rpc.mutating and unknown
                result = None
            await self._backoff(attempt, deadline, outcome_unknown=earlier_unknown)
        message = f"partition {partition} unavailable after {FORWARD_ATTEMPTS_MAX} attempts"
        raise Refusal(errors.owners_unavailable(message, outcome_unknown=earlier_unknown))

    async def _call(
        self, address: str, item: pb.BatchItem, deadline: float | None, *, mutating: bool
    ) -> pb.BatchItemResult:
        if deadline is None:
            deadline = time.monotonic() + CALL_TIMEOUT_S_DEFAULT
        span = tracing.hop_span(item, address)  # the current span's child, when sampled
        result = None
        try:
            result = await self._routes.stream(address).call(item, deadline, mutating=mutating)
            return result
        finally:
            tracing.end_hop(span, result)

    async def _backoff(
        self, attempt: int, deadline: float | None, *, outcome_unknown: bool
    ) -> None:
        pause_s = min(RETRY_BACKOFF_S_INITIAL * 2**attempt, RETRY_BACKOFF_S_MAX)
        if deadline is not None and time.monotonic() + pause_s >= deadline:
            message = "deadline passed while the owner was unavailable"
            if outcome_unknown:
                status = errors.deadline_passed(
                    f"{message}; an attempt's outcome is unknown, retry with the same key",
                    mutating=True,
                )
            else:
                status = errors.deadline_not_applied(f"{message}; nothing applied")
            raise Refusal(status)
        await asyncio.sleep(pause_s)
        await self._routes.refresh(force=True)


class _OrderRun:
    """One execution of an order plan: each leg's latest result, status and reservation."""

    def __init__(self, plan: orders.OrderPlan) -> None:
        self.plan = plan
        self.results: list[orders.LegResult] = [orders.Unknown()] * len(plan.legs)
        self.statuses: dict[int, status_pb2.Status] = {}
        self.reservations: dict[int, pb.Reservation] = {}

    def taken(self, index: int, reservation: pb.Reservation) -> None:
        self.reservations[index] = reservation
        self.results[index] = orders.Taken(reservation.reservation_id)

    def refused(self, index: int, status: status_pb2.Status) -> None:
        self.statuses[index] = status
        unknown = errors.answer_class_of(status) is errors.AnswerClass.OUTCOME_UNKNOWN
        self.results[index] = orders.Unknown() if unknown else orders.Refused()

    def answer(self, answer: orders.OrderAnswer) -> pb.ReserveOrderResponse:
        key = self.plan.idempotency_key
        match answer:
            case orders.Placed():
                count = len(self.plan.legs)
                return pb.ReserveOrderResponse(
                    reservations=[self.reservations[i] for i in range(count)]
                )
            case orders.LegFailed(leg):
                raise Refusal(self.statuses[leg])
            case orders.FailedBefore():
                raise Refusal(errors.order_released(key))
            case orders.OutcomeUnknown(legs):
                why = "; ".join(self.statuses[i].message for i in legs if i in self.statuses)
                raise Refusal(errors.order_outcome_unknown(key, legs, why or "not settled"))


def _share(deadline: float | None) -> float | None:
    """The part of the deadline one round of an order's calls may use: half of what is left,
    so resolving unknown legs and compensating always keep time of their own."""
    if deadline is None:
        return None
    now = time.monotonic()
    return now + max(deadline - now, 0.0) * ORDER_ROUND_DEADLINE_SHARE


def _in_group(group: asyncio.TaskGroup, work: Coroutine[Any, Any, None]) -> None:
    """``work`` as a task of the Batch stream's group, unless the stream has ended (its caller
    left): then nobody is left to answer, and it is dropped unstarted."""
    try:
        group.create_task(work)
    except RuntimeError:
        work.close()


@dataclass(frozen=True, slots=True)
class _FirstHop:
    """A walk's attempt at its first part, sent before the walk ran: the parts' order, the
    partition and item sent, and the answer (``RouterCalls._walk``)."""

    order: Sequence[InventoryKey]
    partition: int
    item: pb.BatchItem
    result: pb.BatchItemResult


@dataclass(eq=False, slots=True, kw_only=True)
class _Walk:
    """A Batch item's Reserve of a split key. Its first hop is forwarded with the other items
    of its request that have the same owner, its answer taken by callback (as ``_Routed``);
    only an error (a refusal the walk goes on past, UNAVAILABLE) makes a task walk on from
    there (``RouterCalls._walk``). Either answers the item exactly once, under its id."""

    calls: RouterCalls
    view: hot_keys.SplitView
    item: pb.BatchItem
    deadline: float
    answer: batching.Answer
    group: asyncio.TaskGroup
    order: Sequence[InventoryKey]
    partition: int  # the first hop's
    sent: pb.BatchItem
    span: Span | None = None  # the item's server span, when traced (tracing.serve_item)

    @staticmethod
    def of(
        calls: RouterCalls,
        view: hot_keys.SplitView,
        item: pb.BatchItem,
        *,
        deadline: float,
        answer: batching.Answer,
        group: asyncio.TaskGroup,
        span: Span | None = None,
    ) -> _Walk:
        order = hot_keys.walk_order(item.reserve.idempotency_key, view.parts)
        partition, sent = calls._hop(view, item.reserve, order, 0, item.metadata)
        return _Walk(
            calls=calls,
            view=view,
            item=item,
            deadline=deadline,
            answer=answer,
            group=group,
            order=order,
            partition=partition,
            sent=sent,
            span=span,
        )

    def forwarded(self, address: str) -> Forwarded:
        hop = tracing.hop_span(self.sent, address, self.span)
        return Forwarded.of(self.sent, self.deadline, True, tracing.ending_hop(hop, self.first))

    def first(self, result: pb.BatchItemResult) -> None:
        if result.WhichOneof("result") == "error":
            _in_group(self.group, tracing.within(self.span, self.walk_on(result)))
            return
        self.calls._for_caller(result)
        result.id = self.item.id
        self.answer(result)

    async def walk_on(self, first: pb.BatchItemResult | None) -> None:
        hop = None
        if first is not None:
            hop = _FirstHop(self.order, self.partition, self.sent, first)
        try:
            response = await self.calls._walk(
                self.view, self.item.reserve, self.deadline, self.item.metadata, hop
            )
            result = pb.BatchItemResult(reserve=response)
        except Refusal as refusal:
            result = pb.BatchItemResult(error=refusal.status)
        except Exception as error:  # a bug: the last-resort answer, as run_item gives it
            log.exception("batch_item_failed", call="reserve")
            result = pb.BatchItemResult(
                error=errors.internal(f"internal error: {error!r}", mutating=True)
            )
        result.id = self.item.id
        self.answer(result)


@dataclass(eq=False, slots=True, kw_only=True)
class _Routed:
    """One routed Batch item until it is answered: its first answer comes to ``first`` (a
    callback); if that is UNAVAILABLE, ``retry`` (a task of the stream's group) forwards it
    again until its deadline. Either answers it exactly once, under the caller's id."""

    calls: RouterCalls
    route: Route
    partition: int
    item: pb.BatchItem
    deadline: float
    answer: batching.Answer
    group: asyncio.TaskGroup
    span: Span | None = None  # the item's server span, when traced (tracing.serve_item)
    caller_id: int = 0

    def __post_init__(self) -> None:
        self.caller_id = self.item.id

    def forwarded(self, address: str) -> Forwarded:
        answer = tracing.ending_hop(tracing.hop_span(self.item, address, self.span), self.first)
        return Forwarded.of(self.item, self.deadline, self.route.rpc.mutating, answer)

    def first(self, result: pb.BatchItemResult) -> None:
        if result.WhichOneof("result") == "error" and result.error.code == UNAVAILABLE:
            _in_group(self.group, tracing.within(self.span, self.retry(result)))
            return
        self.calls._for_caller(result)
        self.answer(result)  # the owner's answer, under the caller's id

    async def retry(self, first: pb.BatchItemResult | None) -> None:
        rpc = self.route.rpc
        try:
            result = await self.calls._forward_item(
                self.partition, rpc, self.item, self.deadline, first
            )
        except Refusal as refusal:
            result = pb.BatchItemResult(error=refusal.status)
        except Exception as error:  # a bug: the last-resort answer, as run_item gives it
            log.exception("batch_item_failed", call=rpc.field)
            status = errors.internal(f"internal error: {error!r}", mutating=rpc.mutating)
            result = pb.BatchItemResult(error=status)
        result.id = self.caller_id
        self.answer(result)


class RouterService(CallsServicer):
    """The router's gRPC surface over ``RouterCalls``, which also serves ReserveOrder; its
    Batch stream forwards items by callback (``RouterCalls.batch_handler``)."""

    def __init__(self, routes: Routes, read_view: ReadView | None = None) -> None:
        super().__init__(RouterCalls(routes, read_view))


def _reservation_partition(
    reservation_id: str, command: Callable[[], ClientCommand] | None = None
) -> int:
    """The partition a reservation id names; when it names none, the request is refused
    here, with the core's answer for it if it is malformed (as the owner would give)."""
    partition = partition_of_reservation(reservation_id)
    if partition is None:
        if command is not None:
            check(validate(command()))
        raise Refusal.of(ReservationNotFound(reservation_id))
    return partition


# The answers about one reservation, and those of them with the levels of its keys.
_RESERVATION_RESULTS = frozenset(
    {"reserve", "commit", "release", "extend_reservation", "get_reservation"}
)
_LEVEL_RESULTS = frozenset({"reserve", "commit", "release"})


def _key_partition(key: pb.InventoryKey) -> int:
    return partition_of(key.merchant_id, key.location_id)


def _item() -> pb.BatchItem:
    """A BatchItem for a call the router makes itself, with its caller's metadata."""
    item = pb.BatchItem()
    metadata = request_metadata.get()
    if metadata:
        item.metadata.update(metadata)
    return item


def _keep_propagated(item: pb.BatchItem) -> None:
    """Forward only the metadata that travels with a call (``PROPAGATED_METADATA``)."""
    for key in [key for key in item.metadata if key not in PROPAGATED_METADATA]:
        del item.metadata[key]


def _checked_partition(
    item: pb.BatchItem, name: str, route: Route, answer: batching.Answer
) -> int | None:
    """The partition the item's request names; None when it names none (or naming it
    failed: a bug), and then the item is answered here."""
    try:
        return route.partition_of(getattr(item, name))
    except Refusal as refusal:
        answer(pb.BatchItemResult(id=item.id, error=refusal.status))
    except Exception as error:  # a bug: the last-resort answer, as run_item gives it
        log.exception("batch_item_failed", call=name)
        status = errors.internal(f"internal error: {error!r}", mutating=route.rpc.mutating)
        answer(pb.BatchItemResult(id=item.id, error=status))
    return None


# ----------------------------------------------------------------- the routed calls
#
# A routed call is validated once, by its owner (the core's rules, at the shard): the router
# reads only the fields that name the partition. A request that names none (a Reserve with
# no line, a reservation id that is not one) is answered here, with the owner's answer: the
# core's check of it, else the refusal of the id.


def _reserve_partition(request: pb.ReserveRequest) -> int:
    if request.lines:
        first = request.lines[0].key
        return partition_of(first.merchant_id, first.location_id)
    check(validate(convert.reserve(request)))
    raise AssertionError("a Reserve without lines passed the core's checks")


def _commit_partition(request: pb.CommitRequest) -> int:
    return _reservation_partition(request.reservation_id, lambda: convert.commit(request))


def _release_partition(request: pb.ReleaseRequest) -> int:
    return _reservation_partition(request.reservation_id, lambda: convert.release(request))


def _extend_partition(request: pb.ExtendReservationRequest) -> int:
    return _reservation_partition(request.reservation_id, lambda: convert.extend(request))


def _get_reservation_partition(request: pb.GetReservationRequest) -> int:
    return _reservation_partition(request.reservation_id)


def _adjust_stock_partition(request: pb.AdjustStockRequest) -> int:
    return _key_partition(request.key)


def _set_stock_partition(request: pb.SetStockRequest) -> int:
    return _key_partition(request.key)


def _set_safety_stock_partition(request: pb.SetSafetyStockRequest) -> int:
    return _key_partition(request.key)


def _expect_delivery_partition(request: pb.ExpectDeliveryRequest) -> int:
    return partition_of(request.merchant_id, request.location_id)


def _hot_key_partition(request: Any) -> int:
    """The partition of the request's key (a home or a bucket)."""
    return _key_partition(request.key)


def _receive_quota_partition(request: pb.ReceiveQuotaRequest) -> int:
    return _key_partition(request.transfer.target)


@dataclass(frozen=True, slots=True)
class Route:
    """A call forwarded whole to one owner: ``partition_of(request)`` names its partition
    (``Refusal`` for a request that names none; the owner checks the rest)."""

    rpc: rpcs.Rpc[Any, Any]
    partition_of: Callable[[Any], int]


# Every call but GetAvailability and GetHotKeys (which fan out per owner), ReserveOrder (a
# saga) and SplitKey (the router places its buckets first).
ROUTES: Mapping[str, Route] = {
    route.rpc.field: route
    for route in (
        Route(rpcs.RESERVE, _reserve_partition),
        Route(rpcs.COMMIT, _commit_partition),
        Route(rpcs.RELEASE, _release_partition),
        Route(rpcs.EXTEND_RESERVATION, _extend_partition),
        Route(rpcs.GET_RESERVATION, _get_reservation_partition),
        Route(rpcs.ADJUST_STOCK, _adjust_stock_partition),
        Route(rpcs.SET_STOCK, _set_stock_partition),
        Route(rpcs.SET_SAFETY_STOCK, _set_safety_stock_partition),
        Route(rpcs.EXPECT_DELIVERY, _expect_delivery_partition),
        Route(rpcs.MERGE_KEY, _hot_key_partition),
        Route(rpcs.SEND_QUOTA, _hot_key_partition),
        Route(rpcs.RECEIVE_QUOTA, _receive_quota_partition),
        Route(rpcs.SETTLE_TRANSFER, _hot_key_partition),
    )
}
