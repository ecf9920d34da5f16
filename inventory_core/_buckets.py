"""Hot keys' buckets (DESIGN section 10): the split table at a key's home, the quota table at
each of its buckets, and the transfers between them.

A hot key keeps its home: the key's own row, in its own partition, where every physical fact
lands (POS sales, receipts, counts, SetStock, safety stock) exactly as for any key. Splitting
it pre-allocates K - 1 buckets: keys of their own (``bucket_key``: the location with ``~n``)
in partitions the caller chose on other owners. Units move between the home and a bucket only
through durable transfers, each debited at its source by one record and credited at its
target by another:

    grant   home -> bucket   the home's row gives up ``quantity`` of what it offers
                             (``allotted`` grows); the bucket's on_hand grows by it
    return  bucket -> home   the bucket gives back ``quantity`` free units and reports the
                             units its reservations committed since its last return (each
                             with when it happened, so that a count at the home judges it);
                             the home's allotted shrinks by both, its on_hand by the latter

A bucket row is an ordinary stock row whose on_hand is its quota: reservations there are
admitted, committed, released and expired by the ordinary rules, so nothing oversells. The
home's ``allotted`` counts every unit outside it: held by a bucket, committed there and not yet
reported, or in transit either way. So, per key:

    home.allotted = sum(home's granted per bucket)
    home's granted to bucket b = b's granted + grants in transit to b + returns in transit from b
    a bucket's granted = its on_hand + the units it committed and has not yet returned

and the total a shopper is shown (the home's offer plus each bucket's) undercounts the truth
by the units in transit, never overcounts it. A transfer is in transit from its debit until
its credit; the source keeps it (``sending``) until told it was credited (settled), so that
whoever carries it (the rebalancer) can carry it again after any failure. The credit is
remembered under the transfer's id (``ReceiveQuota.idempotency_key``): carrying it twice
credits it once.

Merging stops the grants; the buckets return what they hold as their reservations finish,
and the split row goes when the last unit is back (``allotted`` 0, nothing in transit).

Versions. The router shows a split key as one (``shard_router.router.hot_keys.add_up``):
while the home's ``allotted`` is above zero, its version is the sum of its parts' versions,
each of which only goes up. When the last unit comes home (``allotted`` back to 0) the
buckets hold nothing and the key is shown as its home alone, so the home's version then
jumps past that sum: it absorbs each bucket's version as its latest return stated it
(``Transfer.version``, kept in ``Split.versions``), and the version a shopper sees never
goes down, across any number of splits and merges. A bucket cannot change while it holds no
units, so the version its last return stated is still its version.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._codec import dataclass_codec, key_from_data, key_to_data
from ._model import InventoryKey, Transfer
from ._tables import TableSchema


@dataclass(frozen=True, slots=True)
class Split:
    """A hot key at its home: its buckets and what each holds as the home counts it."""

    # The lsn of the record that split the key: tells one split of a key from a later one.
    generation: int
    # The buckets' keys, each in a partition of its own.
    buckets: tuple[InventoryKey, ...]
    # Per bucket (in ``buckets`` order): units granted to it, less its returns credited here.
    granted: tuple[int, ...]
    # Merging: no more grants; the split goes once every unit is back.
    merging: bool = False
    # Grants debited here and not yet settled, oldest first.
    sending: tuple[Transfer, ...] = ()
    # Per bucket: its version as its latest return credited here stated (empty: none yet).
    versions: tuple[int, ...] = ()

    def index_of(self, bucket: InventoryKey) -> int | None:
        return self.buckets.index(bucket) if bucket in self.buckets else None


@dataclass(frozen=True, slots=True)
class Quota:
    """A bucket of a hot key: what it was granted, as the bucket counts it."""

    home: InventoryKey
    generation: int
    # Units credited here, less the units its returns took back (free and committed).
    granted: int = 0
    # Returns debited here and not yet settled, oldest first.
    sending: tuple[Transfer, ...] = ()


SPLITS: TableSchema[InventoryKey, Split] = TableSchema(
    name="splits",
    key_to_data=key_to_data,
    key_from_data=key_from_data,
    row_to_data=dataclass_codec(Split).encode,
    row_from_data=dataclass_codec(Split).decode,
)
QUOTAS: TableSchema[InventoryKey, Quota] = TableSchema(
    name="quotas",
    key_to_data=key_to_data,
    key_from_data=key_from_data,
    row_to_data=dataclass_codec(Quota).encode,
    row_from_data=dataclass_codec(Quota).decode,
)
