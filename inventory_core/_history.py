"""A key's physical history: the facts a late count or a redelivered event is judged by.

DESIGN section 9. Deltas commute, so they apply on arrival in any order; a count says
"on_hand was X at T", so it is applied as X plus the deltas already applied that occurred
after T. Every fact has an **order**, ``(occurred_at_ms, source, event_id)``: a total order,
so that ties between events of the same millisecond are decided the same way whatever
order they arrive in. The service's own physical changes are facts too (source ``""``, the
record's lsn as their id, at the time they are applied): a commit (units picked for an
order), an ``AdjustStock``, and a ``SetStock`` (a count).

A key's ``KeyHistory`` keeps its last applied count and the deltas applied after it, in
order. What becomes of a fact (``judge_delta``, ``judge_count``), given the history at
``now_ms``:

    delta, order <= the last count's            SUPERSEDED (recorded; the count covers it)
    delta, outside the window                    REFUSED: it could be one already applied
    delta, (source, event_id) seen               DUPLICATE (or REFUSED: id used by another)
    delta, otherwise                             APPLIED: on_hand += delta
    count, (source, event_id) is the last count  DUPLICATE (or REFUSED, as above)
    count, order <= the last count's             SUPERSEDED
    count, outside the window                    SUPERSEDED: the deltas after it are gone
    count, otherwise                             APPLIED: on_hand = X + deltas after it

The window (``_limits``): a fact is inside it if it occurred at most
``feed_history_retention_ms`` before now and after the newest delta forgotten to keep the
key within ``feed_history_per_key_max``. Deltas of the service itself are never refused
(their idempotency key already de-duplicates them): outside the window they apply without
being kept, since no count that could still be applied predates them.

Duplicates are found through the partition's index of feed facts by (merchant, source,
event_id) (``PartitionState.feed_ids``), rebuilt from this table on restore.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import _limits as limits
from ._codec import integer, key_from_data, key_to_data
from ._model import InventoryKey
from ._tables import TableSchema

Order = tuple[int, str, str]  # (occurred_at_ms, source, event_id)
# The source of the service's own facts (commit, AdjustStock, SetStock); a feed's source is
# an identifier, never empty.
OWN_SOURCE = ""


class Fact(NamedTuple):
    """One physical fact that moved (or set) a key's on_hand."""

    occurred_at_ms: int
    source: str
    event_id: str
    # A delta's change of on_hand; a count's absolute value.
    quantity: int
    # The feed event's kind ("sale", "count", ...), or "commit", "adjust", "set".
    kind: str

    @property
    def order(self) -> Order:
        return (self.occurred_at_ms, self.source, self.event_id)

    @property
    def is_own(self) -> bool:
        return self.source == OWN_SOURCE


@dataclass(frozen=True, slots=True)
class KeyHistory:
    # The last applied count (for a SetStock, the service's own).
    count: Fact | None = None
    # The deltas applied after it, inside the window, by order.
    deltas: tuple[Fact, ...] = ()
    # The order of the newest delta forgotten for the per-key bound (None: none forgotten).
    forgotten: Order | None = None

    @property
    def facts(self) -> tuple[Fact, ...]:
        """The count (if any), then the deltas after it."""
        return self.deltas if self.count is None else (self.count, *self.deltas)

    @property
    def fact_count(self) -> int:
        """``len(self.facts)``, without building them."""
        return len(self.deltas) + (self.count is not None)

    def covered_by_count(self, order: Order) -> bool:
        return self.count is not None and order <= self.count.order

    def outside_window(self, fact: Fact, now_ms: int) -> bool:
        too_old = fact.occurred_at_ms < now_ms - limits.feed_history_retention_ms
        return too_old or (self.forgotten is not None and fact.order <= self.forgotten)


EMPTY_HISTORY = KeyHistory()


# --------------------------------------------------------------------------- changes


def with_delta(history: KeyHistory, fact: Fact, now_ms: int) -> tuple[KeyHistory, list[Fact]]:
    """The history with an applied delta kept (if inside the window), and what it forgot."""
    if history.outside_window(fact, now_ms):
        return history, []
    deltas = history.deltas
    # A fact compares as its order (its first three fields, unique within a key's history),
    # so the deltas stay sorted by bisecting on the facts themselves.
    if not deltas or deltas[-1] < fact:
        # The usual case: facts arrive roughly in order. (Concatenation: 3x faster than
        # unpacking at a few hundred facts.)
        kept = deltas + (fact,)  # noqa: RUF005
    else:
        at = bisect.bisect_right(deltas, fact)
        kept = deltas[:at] + (fact,) + deltas[at:]  # noqa: RUF005
    return _bounded(KeyHistory(history.count, kept, history.forgotten), now_ms)


def with_deltas(
    history: KeyHistory, facts: list[Fact], now_ms: int
) -> tuple[KeyHistory, list[Fact]]:
    """The history with applied deltas kept (those inside the window), and what it forgot.

    Each fact is judged inside the window when it was applied; one that is not kept (the
    window moved, or the bound dropped it as the oldest) is returned among the dropped.
    """
    new = sorted(facts)  # facts compare as their orders
    deltas = history.deltas
    if not deltas or deltas[-1] < new[0]:  # the usual case: later than all kept
        merged = deltas + tuple(new)
    else:
        merged = tuple(sorted(deltas + tuple(new)))
    return _bounded(KeyHistory(history.count, merged, history.forgotten), now_ms)


def with_count(history: KeyHistory, fact: Fact, now_ms: int) -> tuple[KeyHistory, list[Fact]]:
    """The history after an applied count: the deltas after it stay; what it dropped."""
    order = fact.order
    after = tuple(d for d in history.deltas if d.order > order)
    dropped = [d for d in history.deltas if d.order <= order]
    if history.count is not None:
        dropped.append(history.count)
    counted, old = pruned(KeyHistory(fact, after, history.forgotten), now_ms)
    return counted, dropped + old


def on_hand_after_count(history: KeyHistory, fact: Fact) -> int:
    """X plus the deltas already applied that occurred after the count."""
    order = fact.order
    return fact.quantity + sum(d.quantity for d in history.deltas if d.order > order)


def pruned(history: KeyHistory, now_ms: int) -> tuple[KeyHistory, list[Fact]]:
    """The history without the deltas that left the window by time; what it dropped."""
    horizon_ms = now_ms - limits.feed_history_retention_ms
    deltas = history.deltas
    if not deltas or deltas[0].occurred_at_ms >= horizon_ms:
        return history, []
    # Deltas are kept by order, whose first member is the time: the old ones lead.
    cut = bisect.bisect_left(deltas, (horizon_ms,))
    return KeyHistory(history.count, deltas[cut:], history.forgotten), list(deltas[:cut])


def _bounded(history: KeyHistory, now_ms: int) -> tuple[KeyHistory, list[Fact]]:
    history, dropped = pruned(history, now_ms)
    excess = len(history.deltas) - limits.feed_history_per_key_max
    if excess <= 0:
        return history, dropped
    forgotten = history.deltas[:excess]
    history = KeyHistory(history.count, history.deltas[excess:], forgotten[-1].order)
    return history, dropped + list(forgotten)


# ----------------------------------------------------------------------------- table


def _fact_to_data(fact: Fact) -> list[Any]:
    return list(fact)


def _fact_from_data(data: Any) -> Fact:
    occurred_at_ms, source, event_id, quantity, kind = data
    return Fact(integer(occurred_at_ms), str(source), str(event_id), integer(quantity), str(kind))


def _history_to_data(history: KeyHistory) -> dict[str, Any]:
    data: dict[str, Any] = {"deltas": [_fact_to_data(d) for d in history.deltas]}
    if history.count is not None:
        data["count"] = _fact_to_data(history.count)
    if history.forgotten is not None:
        data["forgotten"] = list(history.forgotten)
    return data


def _history_from_data(data: Any) -> KeyHistory:
    count = data.get("count")
    forgotten = data.get("forgotten")
    if forgotten is not None:
        occurred_at_ms, source, event_id = forgotten
        forgotten = (int(occurred_at_ms), str(source), str(event_id))
    return KeyHistory(
        count=None if count is None else _fact_from_data(count),
        deltas=tuple(_fact_from_data(d) for d in data["deltas"]),
        forgotten=forgotten,
    )


FEED: TableSchema[InventoryKey, KeyHistory] = TableSchema(
    name="feed",
    key_to_data=key_to_data,
    key_from_data=key_from_data,
    row_to_data=_history_to_data,
    row_from_data=_history_from_data,
)
