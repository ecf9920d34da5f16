"""Seeded workload generators: the same stream of operations for every target.

A catalogue is ``merchants x locations x skus`` key rows, named by index so that any process
can rebuild it from a few integers. A workload turns a ``random.Random`` into operations:

- ``uniform``     1-line carts, keys uniform over the whole catalogue;
- ``zipf``        1-line carts, location and sku drawn from Zipf(s) (a few keys get most calls);
- ``hot``         1-unit reservations of one key (the hot row); by default its stock lasts
                  the whole phase (``hot_stock_lasting``), so the phase measures admitted
                  reservations; a small ``--hot-stock`` makes it sell out and measure refusals;
- ``read-heavy``  90 % availability reads of one key, 10 % 1-line reservations;
- ``cart-1`` / ``cart-5`` / ``cart-20``  carts of that many distinct lines at one location;
- ``lifecycle``   5-line carts then commit (50 %), release (30 %) or leave to expire (20 %).

Every reservation of one cart is at one merchant and one location, as the API requires.
Hot keys live outside the catalogue (``hot-<phase>``), one fresh key per phase, loaded with
``Catalogue.hot_stock`` units, so that no phase inherits another's leftovers.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass
from enum import Enum

# Stock rows per location in the default catalogue shape; merchants and locations follow.
SKUS_PER_LOCATION_DEFAULT = 1000
LOCATIONS_PER_MERCHANT_DEFAULT = 10
# Share of reads in the read-heavy mix.
READ_SHARE = 0.9
# Lifecycle follow-ups: commit, release, and (the rest) leave the reservation to expire.
LIFECYCLE_COMMIT_SHARE = 0.5
LIFECYCLE_RELEASE_SHARE = 0.3
# Minimum reservation TTL of the API: lifecycle reservations left to expire use it.
RESERVATION_TTL_S_MIN = 30
# Carts of reservations that are not left to expire keep this TTL (the API default).
RESERVATION_TTL_S_DEFAULT = 900
# An upper bound on reservations per second of one key on any target the harness drives,
# with room to spare: the fastest (the echo ceiling, which keeps no stock) measured 13-21k/s
# on 2 cores, Redis 5-11k/s, the service and PostgreSQL 1-5k/s. The default hot stock is
# this rate times the phase's length, so that the hot row never runs out by default.
HOT_RESERVATIONS_PER_S_MAX = 100_000
# The API's bound on a key's on_hand (SetStock rejects more).
STOCK_QUANTITY_MAX = 1_000_000_000


class Kind(Enum):
    RESERVE = "reserve"
    READ = "read"


class FollowUp(Enum):
    NONE = "none"
    COMMIT = "commit"
    RELEASE = "release"
    EXPIRE = "expire"  # leave it: the reservation expires after its TTL


@dataclass(frozen=True)
class Key:
    merchant_id: str
    location_id: str
    sku_id: str


@dataclass(frozen=True)
class Operation:
    kind: Kind
    keys: tuple[Key, ...]  # reserve: one per line (distinct); read: the keys to read
    quantity: int = 1  # units per line
    follow_up: FollowUp = FollowUp.NONE
    ttl_s: int = RESERVATION_TTL_S_DEFAULT


@dataclass(frozen=True)
class Catalogue:
    """``keys`` rows: merchants x locations x skus, each loaded with ``stock_per_key`` units."""

    keys: int
    stock_per_key: int
    hot_stock: int
    namespace: str  # prefixes merchant ids: every run loads keys of its own

    @property
    def skus_per_location(self) -> int:
        return min(SKUS_PER_LOCATION_DEFAULT, self.keys)

    @property
    def locations(self) -> int:
        """All (merchant, location) pairs; the catalogue is rounded down to whole locations."""
        return max(1, self.keys // self.skus_per_location)

    @property
    def rows(self) -> int:
        return self.locations * self.skus_per_location

    def location(self, index: int) -> tuple[str, str]:
        merchant, location = divmod(index, LOCATIONS_PER_MERCHANT_DEFAULT)
        return f"{self.namespace}m{merchant}", f"l{location}"

    def key(self, location_index: int, sku_index: int) -> Key:
        merchant_id, location_id = self.location(location_index)
        return Key(merchant_id, location_id, f"s{sku_index}")

    def all_keys(self) -> itertools.chain[Key]:
        """Every row, location by location (the loading order)."""
        return itertools.chain.from_iterable(
            (self.key(location, sku) for sku in range(self.skus_per_location))
            for location in range(self.locations)
        )

    def hot_key(self, phase: int) -> Key:
        merchant_id, location_id = self.location(0)
        return Key(merchant_id, location_id, f"hot-{phase}")

    def initial_on_hand(self, key: Key) -> int:
        return self.hot_stock if key.sku_id.startswith("hot-") else self.stock_per_key


def hot_stock_lasting(seconds: float, rate_per_s_max: float = HOT_RESERVATIONS_PER_S_MAX) -> int:
    """Units of the hot key that ``seconds`` of 1-unit reservations at ``rate_per_s_max``
    cannot exhaust (at most the API's ``STOCK_QUANTITY_MAX``)."""
    return min(STOCK_QUANTITY_MAX, math.ceil(max(seconds, 0.0) * rate_per_s_max) + 1)


class Zipf:
    """Zipf(s) over ranks 0..n-1 by inverse CDF (bisect); rank r is hotter than r + 1."""

    def __init__(self, n: int, s: float) -> None:
        self._cdf = list(itertools.accumulate(1.0 / (rank**s) for rank in range(1, n + 1)))

    def sample(self, rng: random.Random) -> int:
        point = rng.random() * self._cdf[-1]
        return min(bisect.bisect_left(self._cdf, point), len(self._cdf) - 1)


WORKLOADS = ("uniform", "zipf", "hot", "read-heavy", "cart-1", "cart-5", "cart-20", "lifecycle")
CART_LINES = {"cart-1": 1, "cart-5": 5, "cart-20": 20, "lifecycle": 5}


class Generator:
    """The operations of one workload for one generator process: ``next()`` forever."""

    def __init__(
        self, workload: str, catalogue: Catalogue, seed: int, phase: int, zipf_s: float
    ) -> None:
        if workload not in WORKLOADS:
            raise ValueError(f"unknown workload {workload!r}; one of {', '.join(WORKLOADS)}")
        self.workload = workload
        self.catalogue = catalogue
        self.rng = random.Random(seed)
        self.hot = catalogue.hot_key(phase)
        self._zipf_locations = Zipf(catalogue.locations, zipf_s) if workload == "zipf" else None
        self._zipf_skus = Zipf(catalogue.skus_per_location, zipf_s) if workload == "zipf" else None

    def next(self) -> Operation:
        workload, rng, catalogue = self.workload, self.rng, self.catalogue
        if workload == "hot":
            return Operation(Kind.RESERVE, (self.hot,))
        if workload == "zipf":
            assert self._zipf_locations is not None and self._zipf_skus is not None
            location = self._zipf_locations.sample(rng)
            return Operation(Kind.RESERVE, (catalogue.key(location, self._zipf_skus.sample(rng)),))
        if workload == "read-heavy":
            kind = Kind.READ if rng.random() < READ_SHARE else Kind.RESERVE
            return Operation(kind, self._cart(1))
        if workload == "lifecycle":
            return self._lifecycle(self._cart(CART_LINES[workload]))
        return Operation(Kind.RESERVE, self._cart(CART_LINES.get(workload, 1)))

    def _cart(self, lines: int) -> tuple[Key, ...]:
        location = self.rng.randrange(self.catalogue.locations)
        lines = min(lines, self.catalogue.skus_per_location)
        skus = self.rng.sample(range(self.catalogue.skus_per_location), lines)
        return tuple(self.catalogue.key(location, sku) for sku in skus)

    def _lifecycle(self, keys: tuple[Key, ...]) -> Operation:
        draw = self.rng.random()
        if draw < LIFECYCLE_COMMIT_SHARE:
            return Operation(Kind.RESERVE, keys, follow_up=FollowUp.COMMIT)
        if draw < LIFECYCLE_COMMIT_SHARE + LIFECYCLE_RELEASE_SHARE:
            return Operation(Kind.RESERVE, keys, follow_up=FollowUp.RELEASE)
        return Operation(Kind.RESERVE, keys, follow_up=FollowUp.EXPIRE, ttl_s=RESERVATION_TTL_S_MIN)
