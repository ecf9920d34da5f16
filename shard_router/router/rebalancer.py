"""The rebalancer: it keeps a split key's free units spread evenly over its parts.

Every period, for each split key the shards hold (``GetHotKeys``), one round:

  1. carry every transfer a part has debited and not settled: credit it at its target (once,
     however often it is carried: its id is remembered), then settle it at its source. A
     transfer left in flight by a crash, here or in another router, is finished here;
  2. plan the moves (``plan``, pure): each part should offer about the same share of what the
     parts offer together. A bucket that offers more than its share by ``slack`` returns the
     excess to the home; one below its share by ``slack`` gets a grant from what the home
     offers. A bucket whose reservations committed units returns them (0 free units if it
     has none to give back), so the home's shelf learns of them. A merging key's buckets
     return every free unit; a key whose home offers below zero (the till sold what the
     buckets hold) takes back from the richest buckets first;
  3. make them: returns first (the home's offer grows), then the grants, each a transfer
     carried to its end at once.

Moves go through the home only (a star): a bucket's units never pass to another bucket
directly, so a unit in transit is always on its way to or from the home, and the sum over
parts plus transit is the key's total (``_buckets.py``). Every router runs a rebalancer: two
may plan at once, and since every debit is checked at its source (a grant only from what the
home offers, a return only from what the bucket offers) the worst is a wasted transfer.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from inventory.v1 import inventory_pb2 as pb

from inventory_core import InventoryKey

from ..common import convert
from ..common.calls import Refusal
from .hot_keys import offered_of
from .service import RouterCalls

log = structlog.get_logger(__name__)

# How often each split key is rebalanced: a bucket that sells out waits at most this long for
# more (the walk meanwhile takes its requests to the other parts).
INTERVAL_S = 0.5
# One round's calls share this deadline; a key whose parts do not answer waits a period.
ROUND_DEADLINE_S = 5.0
# A part is left alone while it is within this share of its target (and at least one unit):
# moving units back and forth for a difference of a few costs more than it helps.
SLACK_SHARE = 0.1


@dataclass(frozen=True, slots=True)
class Part:
    """What one part of a split key holds, as its owner answered."""

    key: InventoryKey
    # available - stale_buffer - allotted: below zero at a home whose till sold units its
    # buckets hold.
    offered: int
    # At a bucket: units its reservations committed and it has not yet reported.
    committed: int = 0


@dataclass(frozen=True, slots=True)
class Move:
    """One transfer to make: ``quantity`` free units from ``source`` to ``target``."""

    source: InventoryKey
    target: InventoryKey
    quantity: int


def plan(home: Part, buckets: Sequence[Part], *, merging: bool) -> list[Move]:
    """The transfers that bring every part near an equal share of the free units, returns
    (to the home) first. Pure: a function of what the parts hold."""
    returns: list[Move] = []
    grants: list[Move] = []
    if merging:
        for bucket in buckets:
            if bucket.offered > 0 or bucket.committed:
                returns.append(Move(bucket.key, home.key, max(bucket.offered, 0)))
        return returns
    total = max(home.offered, 0) + sum(max(b.offered, 0) for b in buckets)
    share = total // (len(buckets) + 1)
    slack = max(1, int(share * SLACK_SHARE))
    home_offered = home.offered
    # The home first takes back what it lacks (below zero: units sold at the till), from the
    # richest buckets; then every bucket above its share gives the excess back.
    for bucket in sorted(buckets, key=lambda b: -b.offered):
        excess = bucket.offered - share
        need = -home_offered if home_offered < 0 else 0
        give = max(excess if excess > slack else 0, min(need, max(bucket.offered, 0)))
        if give > 0 or bucket.committed:
            returns.append(Move(bucket.key, home.key, give))
            home_offered += give
    for bucket in sorted(buckets, key=lambda b: b.offered):
        lack = share - bucket.offered
        spare = home_offered - share
        give = min(lack, spare)
        if lack > slack and give > 0:
            grants.append(Move(home.key, bucket.key, give))
            home_offered -= give
    return returns + grants


class Rebalancer:
    """Runs ``plan`` for every split key each period, over the router's HotKeys calls."""

    def __init__(self, calls: RouterCalls, interval_s: float = INTERVAL_S) -> None:
        self._calls = calls
        self._interval_s = interval_s
        # Its moves' idempotency keys: this process's token, then a count (a restarted
        # router must not meet the answers of the one before).
        self._token = secrets.token_hex(8)
        self._numbers = itertools.count()

    async def run(self) -> None:
        while True:
            try:
                await self.round()
            except Exception as error:  # a shard away: the next round tries again
                log.warning("rebalance_failed", error=repr(error))
            await asyncio.sleep(self._interval_s)

    async def round(self) -> None:
        """One round over every split key (each key's parts in one read)."""
        deadline = time.monotonic() + ROUND_DEADLINE_S
        homes = await self._calls.get_hot_keys(pb.GetHotKeysRequest(), deadline)
        for home in homes.parts:
            if home.split.buckets:
                try:
                    await self._rebalance(home, deadline)
                except Refusal as refusal:
                    key = convert.key_text(convert.key_from_proto(home.level.key))
                    log.warning("rebalance_key_failed", key=key, status=refusal.status.message)

    async def _rebalance(self, home: pb.HotKeyPart, deadline: float) -> None:
        calls = self._calls
        keys = [home.level.key, *home.split.buckets]
        parts = await calls.get_hot_keys(pb.GetHotKeysRequest(keys=keys), deadline)
        for part in parts.parts:
            for transfer in part.sending:
                await self._carry(transfer, deadline)
        if any(part.sending for part in parts.parts):  # levels moved: read them again
            parts = await calls.get_hot_keys(pb.GetHotKeysRequest(keys=keys), deadline)
        by_key = {convert.key_from_proto(p.level.key): p for p in parts.parts}
        home_key = convert.key_from_proto(home.level.key)
        found = by_key.get(home_key)
        if found is None or not found.split.buckets:
            return  # merged meanwhile
        buckets = [
            _part(by_key[convert.key_from_proto(b)])
            if convert.key_from_proto(b) in by_key
            else Part(convert.key_from_proto(b), 0)
            for b in found.split.buckets
        ]
        for move in plan(_part(found), buckets, merging=found.split.merging):
            await self._move(move, deadline)

    async def _move(self, move: Move, deadline: float) -> None:
        request = pb.SendQuotaRequest(
            key=convert.key_to_proto(move.source),
            target=convert.key_to_proto(move.target),
            quantity=move.quantity,
            idempotency_key=f"rebalance:{self._token}:{next(self._numbers)}",
        )
        try:
            sent = await self._calls.send_quota(request, deadline)
        except Refusal as refusal:
            # Refused: the part changed since it was read. Unknown: if it was debited, the
            # next round finds it among the source's transfers in flight and carries it.
            log.info("rebalance_move_not_made", status=refusal.status.message)
            return
        await self._carry(sent.transfer, deadline)

    async def _carry(self, transfer: pb.QuotaTransfer, deadline: float) -> None:
        """Credit at the target, then settle at the source: a transfer to its end."""
        calls = self._calls
        await calls.receive_quota(pb.ReceiveQuotaRequest(transfer=transfer), deadline)
        settle = pb.SettleTransferRequest(key=transfer.source, transfer_id=transfer.transfer_id)
        await calls.settle_transfer(settle, deadline)


def _part(part: pb.HotKeyPart) -> Part:
    level = part.level
    committed = part.granted - level.on_hand if part.HasField("home") else 0
    return Part(convert.key_from_proto(level.key), offered_of(level), committed)
