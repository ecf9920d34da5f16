"""Who may do what, for which merchants: the one table, checked for every call.

A caller is a ``Principal``: its token's role and merchant scope (shard_router.common.tokens).
Each role may make the calls ``ALLOWED`` lists (the calls by their ``rpcs`` field name, and
``watch`` for AvailabilityStream.Watch):

    order_service  reserve, commit, release, extend_reservation, reserve_order, and the reads
    gateway        ingest, adjust_stock, set_stock, set_safety_stock, expect_delivery, reads
    partner        the reads and watch
    admin          everything (the HotKeys calls, imports and every write included)
    router         everything: the router's own hop to the shards, which checked its caller

    reads          get_availability, get_reservation, get_over_committed, get_feed_health

and only for the merchants of its scope: every ``merchant_id`` a request holds, at any depth
(its keys, its lines, a feed's events, a transfer's source and target) must be one of them.
The check reads the request only, before anything is looked up, so a refusal says the same
whether or not the other merchant's key or reservation exists. An empty ``merchant_id``
names no merchant's data and is left to validation, which names the field; the one request
that means "every merchant" when it names none (``GetHotKeys`` without keys) needs a token
for every merchant.

``refusal(principal, call, request)`` is the check; the server interceptor
(shard_router.common.auth) applies it to every unary call and Watch, and ``guard_items`` to
every item of a Batch stream, with the stream's principal from ``caller``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2
from inventory.v1 import inventory_pb2 as pb

from . import errors, rpcs
from .calls import Refusal

# A token's merchants entry that stands for every merchant.
EVERY_MERCHANT = "*"
# AvailabilityStream.Watch, in the table beside the rpcs calls.
WATCH = "watch"


class Role(enum.StrEnum):
    ORDER_SERVICE = "order_service"
    GATEWAY = "gateway"
    PARTNER = "partner"
    ADMIN = "admin"
    ROUTER = "router"


READS = frozenset({"get_availability", "get_reservation", "get_over_committed", "get_feed_health"})
EVERY_CALL = frozenset({*(rpc.field for rpc in rpcs.UNARY), WATCH})
ALLOWED: Mapping[Role, frozenset[str]] = {
    Role.ORDER_SERVICE: READS
    | {"reserve", "commit", "release", "extend_reservation", "reserve_order"},
    Role.GATEWAY: READS
    | {"ingest", "adjust_stock", "set_stock", "set_safety_stock", "expect_delivery"},
    Role.PARTNER: READS | {WATCH},
    Role.ADMIN: EVERY_CALL,
    Role.ROUTER: EVERY_CALL,
}
assert all(calls <= EVERY_CALL for calls in ALLOWED.values()), "ALLOWED names an unknown call"
assert {rpc.field for rpc in rpcs.UNARY if not rpc.mutating} - {"get_hot_keys"} == READS


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller."""

    subject: str
    role: Role
    # The merchants it may act for (empty when ``every_merchant``).
    merchants: frozenset[str]
    every_merchant: bool
    # Until when it is accepted (Unix epoch seconds): its token's exp plus the clock skew
    # allowed (tokens.LEEWAY_S).
    expires_at: float


# The principal of the stream being served (set by the interceptor; None without auth).
caller: ContextVar[Principal | None] = ContextVar("caller", default=None)


def refusal(principal: Principal, call: str, request: Message) -> status_pb2.Status | None:
    """PERMISSION_DENIED when ``principal`` may not make ``call`` with ``request``, else
    None. ``call`` is an rpcs field name or ``WATCH``."""
    if call not in ALLOWED[principal.role]:
        return errors.permission_denied(f"a {principal.role.value} token may not call {call}")
    if principal.every_merchant:
        return None
    named = False
    for merchant in merchants_of(request):
        if not merchant:
            continue
        if merchant not in principal.merchants:
            return errors.permission_denied(
                f"the token of {principal.subject!r} is not scoped to merchant {merchant!r}"
            )
        named = True
    if not named and call == rpcs.GET_HOT_KEYS.field and not request.keys:  # type: ignore[attr-defined]
        return errors.permission_denied(
            "GetHotKeys without keys describes every merchant: it needs a token for every merchant"
        )
    return None


def expired(principal: Principal, now: float | None = None) -> status_pb2.Status | None:
    """UNAUTHENTICATED once a stream's token has expired (a stream outliving its token)."""
    if principal.expires_at > (time.time() if now is None else now):
        return None
    return errors.unauthenticated(f"the token of {principal.subject!r} has expired")


# ------------------------------------------------------------------ merchants of a request

# A message's fields that hold merchant ids: (field name, repeated, the field's own plan, or
# None for a merchant_id string itself).
_Plan = tuple[tuple[str, bool, "_Plan | None"], ...]
_PLANS: dict[str, _Plan] = {}


def merchants_of(message: Message) -> list[str]:
    """Every ``merchant_id`` in ``message``, at any depth, in field order (with repeats)."""
    found: list[str] = []
    _collect(message, _plan_of(message.DESCRIPTOR), found)  # type: ignore[arg-type]
    return found


def _collect(message: Any, plan: _Plan, found: list[str]) -> None:
    for name, repeated, inner in plan:
        value = getattr(message, name)
        if inner is None:
            found.append(value)
        elif repeated:
            for element in value:
                _collect(element, inner, found)
        else:
            _collect(value, inner, found)


def _plan_of(descriptor: Descriptor, visiting: frozenset[str] = frozenset()) -> _Plan:
    plan = _PLANS.get(descriptor.full_name)
    if plan is not None:
        return plan
    entries: list[tuple[str, bool, _Plan | None]] = []
    for field in descriptor.fields:
        repeated = field.is_repeated
        if field.name == "merchant_id" and field.type == FieldDescriptor.TYPE_STRING:
            assert not repeated, field.full_name
            entries.append((field.name, False, None))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            inner = field.message_type
            assert inner is not None, field.full_name
            if inner.GetOptions().map_entry or inner.full_name in visiting:
                continue  # no map holds a merchant id; a recursive type holds none here
            inner_plan = _plan_of(inner, visiting | {descriptor.full_name})
            if inner_plan:
                entries.append((field.name, repeated, inner_plan))
    plan = tuple(entries)
    _PLANS[descriptor.full_name] = plan
    return plan


# ------------------------------------------------------------------ streams

Call = Callable[[Any, float | None], Awaitable[Any]]


def guard_call(principal: Principal, call: str, method: Call) -> Call:
    """``method`` (a calls object's) behind the check: a request ``principal`` may not send
    is refused (each request of an ``Ingest.Stream`` is answered on its own)."""

    async def guarded(request: Any, deadline: float | None) -> Any:
        status = expired(principal) or refusal(principal, call, request)
        if status is not None:
            raise Refusal(status)
        return await method(request, deadline)

    return guarded


Answer = Callable[[pb.BatchItemResult], None]
ItemHandler = Callable[[Sequence[pb.BatchItem], float, Answer, Any], None]


def guard_items(handler: ItemHandler, principal: Principal) -> ItemHandler:
    """``handler`` behind the check: each item ``principal`` may not send is answered with
    its refusal (PERMISSION_DENIED, or UNAUTHENTICATED once the token expired), the rest
    go on. An item without a call goes on too: the handler answers it INVALID_ARGUMENT."""

    def guarded(
        items: Sequence[pb.BatchItem], received_at: float, answer: Answer, group: Any
    ) -> None:
        stale = expired(principal)
        allowed: list[pb.BatchItem] = []
        for item in items:
            call = item.WhichOneof("call")
            status = stale or (refusal(principal, call, getattr(item, call)) if call else None)
            if status is None:
                allowed.append(item)
            else:
                answer(pb.BatchItemResult(id=item.id, error=status))
        if allowed:
            handler(items if len(allowed) == len(items) else allowed, received_at, answer, group)

    return guarded
