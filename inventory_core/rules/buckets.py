"""Hot keys: split, merge, and the transfers of units between a key's home and its buckets.

The tables and the conservation they keep are drawn in ``_buckets.py``. The rules here:

- ``SplitKey`` at the home records the buckets (their keys follow from their numbers); a
  key already split keeps its buckets, and one that was merging stops merging.
- ``MergeKey`` stops the grants; the split goes at once if the buckets hold nothing, else
  with the return that brings the last unit home.
- ``SendQuota`` debits a transfer at its source. A grant takes units the home offers
  (``StockRow.offered``: never what its reservations, safety stock or stale buffer hold back);
  a return takes units the bucket offers and every unit its reservations committed since
  its last return, each with when it was committed.
- ``ReceiveQuota`` credits it at the target. At the home, the committed units leave on_hand
  as the service's own facts at their own times, so a count of the shelf that came after
  them already covers them (``feeds.own_delta``).
- ``SettleTransfer`` lets the source forget a credited transfer.

A bucket's row is a stock row like any other: reservations there follow the ordinary rules,
and no physical fact ever names a bucket (callers cannot: ``_validate``).
"""

from __future__ import annotations

from dataclasses import replace

from .. import _limits as limits
from .._buckets import Quota, Split
from .._commands import MergeKey, ReceiveQuota, SendQuota, SettleTransfer, SplitKey
from .._history import EMPTY_HISTORY
from .._model import (
    ChangeReason,
    Consumed,
    InventoryKey,
    Transfer,
    bucket_key,
    bucket_number,
    transfer_id_for,
)
from .._outcomes import (
    CapacityExhausted,
    InsufficientStock,
    KeySplit,
    Outcome,
    QuotaReceived,
    QuotaSent,
    ShortLine,
    SplitConflict,
    TransferSettled,
)
from .._state import Effects, PartitionState
from . import feeds


def split_key(state: PartitionState, command: SplitKey, at: Effects) -> Outcome:
    key = command.key
    found = state.splits.get(key)
    if found is not None:
        if found.merging:
            found = replace(found, merging=False)
            state.splits.put(key, found)
        return _answer(state, key)
    if key not in state.stock:
        refused = state.refuse_new_key()
        if refused is not None:
            return refused
        state.change(key, at, ChangeReason.QUOTA)
    buckets = tuple(bucket_key(key, number) for number in command.buckets)
    state.splits.put(key, Split(at.lsn, buckets, (0,) * len(buckets)))
    return _answer(state, key)


def merge_key(state: PartitionState, command: MergeKey, at: Effects) -> Outcome:
    key = command.key
    found = state.splits.get(key)
    if found is not None:
        _put_split(state, key, replace(found, merging=True))
    return _answer(state, key)


def send_quota(state: PartitionState, command: SendQuota, at: Effects) -> Outcome:
    split = state.splits.get(command.key)
    if split is not None:
        return _grant(state, command, split, at)
    quota = state.quotas.get(command.key)
    if quota is not None:
        return _return(state, command, quota, at)
    return SplitConflict(command.key, "neither a split key nor one of its buckets")


def receive_quota(state: PartitionState, command: ReceiveQuota, at: Effects) -> Outcome:
    transfer = command.transfer
    if bucket_number(transfer.target):
        return _credit_bucket(state, transfer, at)
    return _credit_home(state, transfer, at)


def settle_transfer(state: PartitionState, command: SettleTransfer, at: Effects) -> Outcome:
    key, transfer_id = command.key, command.transfer_id
    split, quota = state.splits.get(key), state.quotas.get(key)
    sending = split.sending if split is not None else quota.sending if quota is not None else ()
    kept = tuple(t for t in sending if t.transfer_id != transfer_id)
    if len(kept) == len(sending):
        return TransferSettled(transfer_id, settled=False)
    if split is not None:
        _put_split(state, key, replace(split, sending=kept))
    elif quota is not None:
        state.quotas.put(key, replace(quota, sending=kept))
    return TransferSettled(transfer_id, settled=True)


# ------------------------------------------------------------------------- at the home


def _grant(state: PartitionState, command: SendQuota, split: Split, at: Effects) -> Outcome:
    key, bucket = command.key, command.target
    index = split.index_of(bucket)
    if index is None:
        return SplitConflict(bucket, "not a bucket of this split")
    if split.merging:
        return SplitConflict(key, "merging: its buckets get no more units")
    if len(split.sending) >= limits.quota_transfers_pending_max:
        return CapacityExhausted("quota_transfers_pending_max", limits.quota_transfers_pending_max)
    row = state.stock[key]
    if command.quantity > row.offered:
        return InsufficientStock((ShortLine(key, command.quantity, max(row.offered, 0)),))
    transfer = Transfer(
        transfer_id_for(state.partition, at.lsn), key, bucket, split.generation, command.quantity
    )
    granted = list(split.granted)
    granted[index] += command.quantity
    state.splits.put(
        key, replace(split, granted=tuple(granted), sending=(*split.sending, transfer))
    )
    state.change(key, at, ChangeReason.QUOTA, allotted=row.allotted + command.quantity)
    return QuotaSent(transfer, state.level(key))


def _credit_home(state: PartitionState, transfer: Transfer, at: Effects) -> Outcome:
    key, bucket = transfer.target, transfer.source
    split = state.splits.get(key)
    index = None if split is None else split.index_of(bucket)
    if split is None or index is None or split.generation != transfer.generation:
        return SplitConflict(key, f"{bucket.location_id} is not a bucket of its split")
    if transfer.units > split.granted[index]:
        holds = split.granted[index]
        return SplitConflict(key, f"returns {transfer.units} units of the {holds} it holds")
    picked = 0
    for number, consumed in enumerate(transfer.consumed):
        picked += feeds.own_delta(
            state,
            key,
            at,
            -consumed.quantity,
            occurred_at_ms=consumed.occurred_at_ms,
            kind="commit",
            event_id=f"{at.lsn:012d}.{number:04d}",
        )
    held = list(split.granted)
    held[index] -= transfer.units
    versions = list(split.versions or (0,) * len(split.buckets))
    versions[index] = max(versions[index], transfer.version)
    row = state.stock[key]
    allotted = row.allotted - transfer.units
    merged = _put_split(state, key, replace(split, granted=tuple(held), versions=tuple(versions)))
    state.change(
        key,
        at,
        ChangeReason.QUOTA,
        absorbed=0 if allotted else sum(versions),
        on_hand=row.on_hand + picked,
        allotted=allotted,
    )
    return QuotaReceived(transfer.transfer_id, state.level(key), merged=merged)


def _put_split(state: PartitionState, key: InventoryKey, split: Split) -> bool:
    """Keep the split, or drop it if it is merging and nothing is out: True if dropped."""
    if split.merging and not any(split.granted) and not split.sending:
        state.splits.remove(key)
        return True
    state.splits.put(key, split)
    return False


def _answer(state: PartitionState, key: InventoryKey) -> KeySplit:
    split = state.splits.get(key)
    if split is None:
        return KeySplit(state.level(key))
    return KeySplit(state.level(key), split.buckets, split.generation, split.merging)


# ------------------------------------------------------------------------- at a bucket


def _credit_bucket(state: PartitionState, transfer: Transfer, at: Effects) -> Outcome:
    bucket = transfer.target
    quota = state.quotas.get(bucket)
    if quota is not None and quota.generation > transfer.generation:
        return SplitConflict(bucket, "a grant of an earlier split of the key")
    if quota is None or quota.generation != transfer.generation:
        if quota is not None and quota.granted:
            return SplitConflict(bucket, "still holds units of an earlier split of the key")
        if bucket not in state.stock:
            refused = state.refuse_new_key()
            if refused is not None:
                return refused
        sending = () if quota is None else quota.sending
        quota = Quota(transfer.source, transfer.generation, 0, sending)
    state.quotas.put(bucket, replace(quota, granted=quota.granted + transfer.quantity))
    on_hand = state.stock[bucket].on_hand if bucket in state.stock else 0
    state.change(bucket, at, ChangeReason.QUOTA, on_hand=on_hand + transfer.quantity)
    return QuotaReceived(transfer.transfer_id, state.level(bucket))


def _return(state: PartitionState, command: SendQuota, quota: Quota, at: Effects) -> Outcome:
    bucket = command.key
    if command.target != quota.home:
        return SplitConflict(command.target, "a bucket returns units to its home only")
    if len(quota.sending) >= limits.quota_transfers_pending_max:
        return CapacityExhausted("quota_transfers_pending_max", limits.quota_transfers_pending_max)
    row = state.stock[bucket]
    if command.quantity > row.offered:
        return InsufficientStock((ShortLine(bucket, command.quantity, max(row.offered, 0)),))
    committed = quota.granted - row.on_hand
    if command.quantity == 0 and committed == 0:
        return SplitConflict(bucket, "nothing to return: no free units asked, none committed")
    transfer = Transfer(
        transfer_id_for(state.partition, at.lsn),
        bucket,
        quota.home,
        quota.generation,
        command.quantity,
        _consumed(state, bucket, committed, at),
    )
    if command.quantity:
        row = state.change(bucket, at, ChangeReason.QUOTA, on_hand=row.on_hand - command.quantity)
    transfer = replace(transfer, version=row.version)
    granted = quota.granted - transfer.units
    state.quotas.put(bucket, replace(quota, granted=granted, sending=(*quota.sending, transfer)))
    return QuotaSent(transfer, state.level(bucket))


def _consumed(
    state: PartitionState, bucket: InventoryKey, committed: int, at: Effects
) -> tuple[Consumed, ...]:
    """The units the bucket's reservations committed since its last return, oldest first,
    each at its time; its history is emptied. Commits its history no longer keeps (past its
    bound or window) travel as one more, at the newest time they could have: a count at the
    home judges them as late as they may be, so it never counts them twice."""
    history = state.feed.get(bucket) or EMPTY_HISTORY
    assert history.count is None and all(f.kind == "commit" for f in history.deltas), history
    kept = tuple(Consumed(f.occurred_at_ms, -f.quantity) for f in history.deltas)
    rest = committed - sum(c.quantity for c in kept)
    assert rest >= 0, (bucket, committed, kept)
    if history.fact_count:
        state.put_history(bucket, history, EMPTY_HISTORY)
    if not rest:
        return kept
    if history.forgotten is not None:
        rest_at_ms = history.forgotten[0]
    else:
        rest_at_ms = kept[0].occurred_at_ms if kept else at.now_ms
    return (Consumed(rest_at_ms, rest), *kept)
