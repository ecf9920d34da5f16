"""The ``Target`` seam: everything the harness drives looks the same from the load loop.

Two halves, because the load generator may run as several processes:

- ``TargetSpec`` is plain, picklable data: how a generator process opens a ``Client``.
- ``Target`` lives in the parent process: it prepares the server side (schema, servers),
  loads the catalogue, and reads the server's state back for the correctness audit.

A call answers an ``Answer``: ``code`` is ``"OK"`` or the name of a ``grpc.StatusCode``
(the baselines map their refusals to the same names, so the report compares like with like).
Insufficient stock is ``FAILED_PRECONDITION``: a business answer, not an error of the target.
A code in ``UNKNOWN_FATE_CODES`` means the call may or may not have been applied; the audit
accepts both fates for it.

Adding a target: write a ``Client``, a ``Target``, and a branch in ``open_client`` /
``benchmarks.bench.make_target``. The gRPC kinds: ``grpc-unary`` (one unary call per
operation), ``grpc-batch`` (the raw ``Batch`` stream), ``grpc-client`` (the public Python
client with automatic batching); they share one ``Target`` (``ServiceTarget``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..workloads import Catalogue, Key

OK = "OK"
INSUFFICIENT = "FAILED_PRECONDITION"
# The call may have been applied or not (Jepsen's "info"): timeouts, lost connections.
UNKNOWN_FATE_CODES = frozenset(
    {"DEADLINE_EXCEEDED", "UNAVAILABLE", "UNKNOWN", "CANCELLED", "INTERNAL"}
)


@dataclass(frozen=True)
class Answer:
    code: str
    reservation_id: str = ""


class ReservationState:
    """How the audit names a reservation's state on any target (None when missing)."""

    ACTIVE = "active"
    COMMITTED = "committed"
    RELEASED = "released"
    EXPIRED = "expired"


@dataclass(frozen=True)
class TargetSpec:
    """How to reach a target from any process (picklable)."""

    name: str  # shown in the report: "service-unary", "postgres", ...
    kind: str  # "grpc-unary" | "grpc-batch" | "grpc-client" | "postgres" | "redis"
    address: str  # host:port, DSN or redis URL; loopback only
    stateful: bool = True  # False for the echo ceiling: nothing to load or audit
    call_timeout_s: float = 10.0
    batch_items_max: int = 1000
    batch_in_flight_messages_max: int = 1
    pool_size: int = 16


class Client(Protocol):
    """One process's connection(s) to a target; every method is safe to call concurrently."""

    async def reserve(
        self, lines: Sequence[tuple[Key, int]], ttl_s: int, idempotency_key: str
    ) -> Answer: ...

    async def commit(self, key: Key, reservation_id: str, idempotency_key: str) -> Answer: ...

    async def release(self, key: Key, reservation_id: str, idempotency_key: str) -> Answer: ...

    async def read(self, keys: Sequence[Key]) -> Answer: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Level:
    on_hand: int
    reserved: int
    safety_stock: int


@dataclass(frozen=True)
class ReservationRef:
    reservation_id: str
    merchant_id: str
    location_id: str


class Target(Protocol):
    """The parent-process side of a target."""

    spec: TargetSpec
    # The server's processes, when the target knows them (the report's per-process CPU comes
    # from the harness's own list of what it started: benchmarks.bench.Server).
    server_pids: list[int]
    # Why the target cannot be measured (e.g. "Batch: UNIMPLEMENTED"); None when it can.
    unavailable: str | None

    async def prepare(self) -> None: ...

    async def load(self, catalogue: Catalogue) -> None: ...

    async def load_key(self, key: Key, on_hand: int) -> None: ...

    async def levels(self, keys: Sequence[Key]) -> dict[Key, Level]: ...

    async def reservation_states(self, refs: Sequence[ReservationRef]) -> dict[str, str | None]: ...

    async def close(self) -> None: ...


async def open_client(spec: TargetSpec, concurrency: int) -> Client:
    """A client for ``spec`` in this process, sized for ``concurrency`` calls in flight."""
    if spec.kind == "grpc-unary":
        from .service import UnaryClient

        return UnaryClient.open(spec)
    if spec.kind == "grpc-batch":
        from .service import BatchClient

        return await BatchClient.open(spec)
    if spec.kind == "grpc-client":
        from .client import BatchingClient

        return BatchingClient.open(spec)
    if spec.kind == "postgres":
        from .postgres import PostgresClient

        return await PostgresClient.open(spec, concurrency)
    if spec.kind == "redis":
        from .redis_lua import RedisClient

        return RedisClient.open(spec, concurrency)
    raise ValueError(f"unknown target kind {spec.kind!r}")
