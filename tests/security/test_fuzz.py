"""Hostile input against a running system (issue 12): every input gets a precise status, no
server crashes, wedges or grows without bound, and a rejected call changes no state.

A router and two shards serve for the whole module: real processes, embedded PostgreSQL and
Redis, callers checked by tokens. The inputs (tests/security/fuzzing.py, built from the
protobuf descriptors) go to the router and, since a hostile caller could reach one, to
shard-0 directly:

    unary     every request of ``rpcs.UNARY``, with tokens good, bad and odd
    batch     ``Inventory.Batch`` streams of BatchRequests: every item kind (the oneof)
    watch     ``AvailabilityStream.Watch`` filters (the router serves Watch)
    ingest    ``Ingest.Stream`` streams of IngestRequests
    bytes     every method path with bytes that may not parse (and one past the size bound)
    metadata  headers huge, many, ``-bin`` with bytes that are no UTF-8, odd trace context

What must hold for every input (``Fuzz.judge`` and ``Fuzz.changed_nothing``):

  - its status is OK or one of the error table's (our ErrorInfo, with a reason of
    ``errors.TABLE`` whose code it is), and never UNKNOWN or INTERNAL; gRPC's own
    RESOURCE_EXHAUSTED (a size bound) and UNIMPLEMENTED (a path no service has) are precise
    too. Every call has a deadline (``CALL_DEADLINE_S``): one that fires in the client is a
    wedged server. Every Batch item and every stream request is answered once.
  - bytes that do not parse are refused INVALID_ARGUMENT; a token that is not good is
    refused UNAUTHENTICATED.
  - a call refused (its answer final or retryable) left no ledger record: none of a caller's
    command stamped after the call began, besides the timers' (Expire, MarkStale) and the two
    refusals recorded by design (a kept InsufficientStock, ``Reserve.keep_refusal``; a
    ReserveOrder's legs reserved and released), unless an earlier call whose outcome is
    unknown, of the same idempotency key, may have made it.
  - the guarded merchant, to which no token drawn is scoped (but whose ids the drawn
    requests name), keeps its stock and reservation, and no ledger record names it.
  - every ``HEALTH_EVERY`` inputs and after each test, every process is alive and SERVING;
    each one's resident memory stays within ``RSS_GROWTH_MIB_MAX`` of what it was at start.

Profiles: ``quick`` (the default, CI: about two minutes) and ``long``:

    INVENTORY_FUZZ_PROFILE=long PYTHONPATH=.:protos python -m pytest -p no:cacheprovider \\
        -s tests/security/test_fuzz.py

The inputs tried per kind and the codes they got are printed at the end (``-s``) and
written as JSON to the file ``INVENTORY_FUZZ_SUMMARY`` names. A failure prints its input;
``--hypothesis-seed=N`` replays a run.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
import pytest
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inventory.v1 import events_pb2, events_pb2_grpc
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from inventory_core import ExpectDelivery, Expire, Ingest, MarkStale, Release, Reserve
from persistence.ledger import decode_records
from shard_router.common import errors, rpcs
from shard_router.common.access import Role
from shard_router.common.calls import bearer
from shard_router.common.tokens import LocalKeys
from tests.conftest import (
    Cluster,
    ServiceProcess,
    embedded_redis,
    fresh_database,
    start_cluster,
)
from tests.security import fuzzing
from tests.security.fuzzing import GOOD, GOOD_EVERY, REFUSED, Ids, Token, TokenKit

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.pg,
    # A failing input's repr may be large (a 100,000-character id): print it all the same.
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
]

# Examples per test of each profile: quick keeps the module at about two minutes on a loaded
# 2-core machine (CI); long is the documented deeper run (about ten minutes).
PROFILES = {"quick": 200, "long": 2500}
PROFILE = os.environ.get("INVENTORY_FUZZ_PROFILE", "quick")
for _name, _examples in PROFILES.items():
    settings.register_profile(
        f"fuzz-{_name}",
        max_examples=_examples,
        deadline=None,  # a real call: its time is the server's, not the input's
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
# Applied to this module's tests only (a loaded profile would change every other test's).
FUZZ = settings(settings.get_profile(f"fuzz-{PROFILE}"))

# Every call gets this long: far above any answer on a loaded machine, so a client-side
# DEADLINE_EXCEEDED means the server wedged.
CALL_DEADLINE_S = 30.0
# A Watch's first event (its snapshot, or a heartbeat) comes within this long.
WATCH_FIRST_EVENT_S = 30.0
# Inputs between two checks that every process is alive and SERVING.
HEALTH_EVERY = 50
# Resident memory a process may gain over the module's run: the state the accepted inputs
# create (a few thousand keys, reservations and idempotency entries, ~1 KiB each), the
# verified-token cache (at most 10,000 entries) and allocator slack; unbounded growth (a map
# per input of 100 KB strings) would pass it within the long profile.
RSS_GROWTH_MIB_MAX = 200
# An answer whose outcome is unknown may still be applied this long after it (the shard's
# deadline for a forwarded item is the router's plus the hop).
UNSETTLED_S = 5.0
# Inputs per Batch or Ingest stream.
STREAM_REQUESTS_MAX = 3

OWN, GUARD = "m-fuzz", "m-guard"
SKUS, LOCATIONS = ("sku-1", "sku-2"), ("store-1", "store-2")
PACKAGE = pb.DESCRIPTOR.package
BATCH = f"/{PACKAGE}.Inventory/Batch"
INGEST_STREAM = f"/{PACKAGE}.Ingest/Stream"
WATCH = f"/{PACKAGE}.AvailabilityStream/Watch"
UNARY_PATHS = {f"/{PACKAGE}.{rpc.service}/{rpc.method}": rpc for rpc in rpcs.UNARY}
# Every path served, its request type, and paths nobody serves.
PATHS: dict[str, type[Message]] = {
    **{path: rpc.request_type for path, rpc in UNARY_PATHS.items()},
    BATCH: pb.BatchRequest,
    INGEST_STREAM: pb.IngestRequest,
    WATCH: events_pb2.WatchRequest,
    "/grpc.health.v1.Health/Check": health_pb2.HealthCheckRequest,
    f"/{PACKAGE}.Inventory/NoSuchMethod": pb.GetAvailabilityRequest,
    "/no.such.Service/Call": pb.GetAvailabilityRequest,
}
STREAMING = {BATCH, INGEST_STREAM}
TARGETS = ("router", "shard")
OK = grpc.StatusCode.OK
# gRPC's own answers that are precise without our ErrorInfo: a size bound (message or
# headers), and a path that no service serves.
TRANSPORT_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED})
# The health protocol's own answer for a service name it does not know.
HEALTH = "/grpc.health.v1.Health/"
HEALTH_CODES = frozenset({grpc.StatusCode.NOT_FOUND})
TIMER_COMMANDS = (Expire, MarkStale)


# ------------------------------------------------------------------ answers and judging


@dataclass
class Answer:
    code: grpc.StatusCode
    # The rich status the server sent (None for OK, or a transport's bare status).
    status: status_pb2.Status | None
    responses: list[bytes] = field(default_factory=list)


def imprecise(
    code: grpc.StatusCode, status: status_pb2.Status | None, path: str = ""
) -> str | None:
    """Why a call's status is not one a caller can act on, or None when it is."""
    if code == OK:
        return None
    info = None if status is None else errors.error_info_of(status)
    if info is None:
        bare = TRANSPORT_CODES | (HEALTH_CODES if path.startswith(HEALTH) else frozenset())
        return None if code in bare else f"{code.name} without the table's ErrorInfo"
    row = errors.BY_REASON.get(info.reason)
    if row is None or row is errors.INTERNAL or row.code != code:
        return f"{code.name} {info.reason}: not an answer of the error table"
    return None


def item_imprecise(status: status_pb2.Status) -> str | None:
    """The same, for a status inside a response (a Batch item's, an Ingest request's)."""
    return imprecise(grpc.StatusCode(_CODES[status.code]), status)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def final_or_retryable(status: status_pb2.Status | None) -> bool:
    """Whether a precise refusal says nothing was applied: the table's class, or a bare
    status of gRPC's own (the call never reached the service)."""
    return status is None or errors.answer_class_of(status) is not errors.OUTCOME_UNKNOWN


def idempotency_key_of(request: Message | None) -> str | None:
    """What a retry of ``request`` is known by ("" when it has no key)."""
    if request is None:
        return None
    if isinstance(request, pb.ReceiveQuotaRequest):
        return "transfer:" + request.transfer.transfer_id
    return str(getattr(request, "idempotency_key", "")) or ""


# ------------------------------------------------------------------ the ledger


class Ledger:
    """New ledger records since the last look, read from PostgreSQL."""

    def __init__(self, database_url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._connection = self._run(asyncpg.connect(database_url))
        self._heads: dict[int, int] = {}
        self.new_records()

    def _run(self, work: Any) -> Any:
        return self._loop.run_until_complete(work)

    def new_records(self) -> list[Any]:
        rows = self._run(
            self._connection.fetch("SELECT partition, head_lsn FROM partitions WHERE head_lsn > 0")
        )
        heads = {row["partition"]: row["head_lsn"] for row in rows}
        seen = {
            p: self._heads.get(p, 0) for p, head in heads.items() if head > self._heads.get(p, 0)
        }
        if not seen:
            return []
        batches = self._run(
            self._connection.fetch(
                "SELECT b.partition, b.first_lsn, b.last_lsn, b.records FROM ledger_batches b"
                " JOIN unnest($1::int[], $2::bigint[]) AS seen(partition, head)"
                " ON b.partition = seen.partition WHERE b.last_lsn > seen.head",
                list(seen),
                list(seen.values()),
            )
        )
        found = []
        for row in batches:
            records = decode_records(
                row["partition"], row["first_lsn"], row["last_lsn"], row["records"]
            )
            found.extend(record for record in records if record.lsn > seen[row["partition"]])
        self._heads = heads
        return found

    def close(self) -> None:
        self._run(self._connection.close())
        self._loop.close()


def merchant_of(command: Any) -> str | None:
    merchant = getattr(command, "merchant_id", None)
    return merchant if isinstance(merchant, str) else None


# ------------------------------------------------------------------ the system under fuzz


@dataclass
class Fuzz:
    cluster: Cluster
    kit: TokenKit
    ledger: Ledger
    admin: tuple[tuple[str, str], ...]
    # Ids for requests sent with a token scoped to OWN (GUARD's among them), and with a
    # token that may be every merchant's (GUARD's left out: nothing may change it).
    scoped_ids: Ids
    every_ids: Ids
    guard_reservation: str
    guard_seen: tuple[bytes, bytes] = (b"", b"")
    channels: dict[str, grpc.Channel] = field(default_factory=dict)
    rss_at_start: dict[str, int] = field(default_factory=dict)
    tried: Counter[str] = field(default_factory=Counter)
    codes: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    # The fields INVALID_ARGUMENT named (how deep the inputs reached).
    invalid_fields: Counter[str] = field(default_factory=Counter)
    refusals_checked: int = 0
    refusals_excused: int = 0
    # Recent answers whose outcome is unknown: (when, their idempotency key).
    unknown: deque[tuple[float, str | None]] = field(default_factory=lambda: deque(maxlen=1000))
    inputs: int = 0

    @property
    def processes(self) -> dict[str, ServiceProcess]:
        return {p.name: p for p in [self.cluster.router, *self.cluster.shards]}

    def address(self, target: str) -> str:
        process = self.cluster.router if target == "router" else self.cluster.shards[0]
        return process.address

    def channel(self, target: str) -> grpc.Channel:
        if target not in self.channels:
            self.channels[target] = grpc.insecure_channel(self.address(target))
        return self.channels[target]

    # -------------------------------------------------------------- calls

    def unary(self, target: str, path: str, payload: bytes, metadata: Sequence[Any]) -> Answer:
        call = self.channel(target).unary_unary(path)
        try:
            response = call(payload, metadata=metadata, timeout=CALL_DEADLINE_S)
        except grpc.RpcError as error:
            return Answer(error.code(), rpc_status.from_call(error))
        return Answer(OK, None, [response])

    def stream(
        self, target: str, path: str, payloads: Sequence[bytes], metadata: Sequence[Any]
    ) -> Answer:
        call = self.channel(target).stream_stream(path)
        responses: list[bytes] = []
        try:
            for response in call(iter(payloads), metadata=metadata, timeout=CALL_DEADLINE_S):
                responses.append(response)
        except grpc.RpcError as error:
            return Answer(error.code(), rpc_status.from_call(error), responses)
        return Answer(OK, None, responses)

    def watch(self, payload: bytes, metadata: Sequence[Any]) -> Answer:
        """The Watch's first event (then cancelled), or its refusal."""
        call = self.channel("router").unary_stream(WATCH)(
            payload, metadata=metadata, timeout=WATCH_FIRST_EVENT_S
        )
        try:
            first = next(call)
        except grpc.RpcError as error:
            return Answer(error.code(), rpc_status.from_call(error))
        except StopIteration:
            return Answer(OK, None)
        call.cancel()
        return Answer(OK, None, [first])

    # -------------------------------------------------------------- properties

    def judge(
        self, kind: str, answer: Answer, *statuses: status_pb2.Status, path: str = ""
    ) -> None:
        """The call's status (to ``path``) and the statuses inside its responses are
        precise."""
        self.tried[kind] += 1
        self.codes[kind][answer.code.name] += 1
        problem = imprecise(answer.code, answer.status, path)
        assert problem is None, f"{kind}: {problem}: {answer.status}"
        if answer.status is not None and answer.code == grpc.StatusCode.INVALID_ARGUMENT:
            self.invalid_fields[answer.status.message.split(":", 1)[0][:60]] += 1
        for inner in statuses:
            if inner.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]:
                self.invalid_fields[inner.message.split(":", 1)[0][:60]] += 1
            problem = item_imprecise(inner)
            assert problem is None, f"{kind}: an item's {problem}: {inner}"
            self.codes[kind + " item"][_CODES[inner.code].name] += 1
        self.inputs += 1
        if self.inputs % HEALTH_EVERY == 0:
            self.check_processes()

    def changed_nothing(
        self,
        started_ms: int,
        refusals: Sequence[status_pb2.Status] | None,
        order_key: str = "",
    ) -> None:
        """After a call: no ledger record names GUARD; when ``refusals`` is not None the
        call was refused with them, and left no record (see the module docstring)."""
        records = self.ledger.new_records()
        for record in records:
            assert merchant_of(record.command) != GUARD, f"GUARD changed: {record.command}"
        if refusals is None:
            return
        kept = any(errors.reason_of(s) == errors.INSUFFICIENT_STOCK.reason for s in refusals)
        for record in records:
            command = record.command
            if isinstance(command, TIMER_COMMANDS) or command.now_ms < started_ms:
                continue
            if kept and isinstance(command, Reserve) and command.keep_refusal:
                continue
            key = str(getattr(command, "idempotency_key", ""))
            if (
                order_key
                and isinstance(command, Reserve | Release)
                and key.startswith(order_key + "/")
            ):
                continue
            if self._maybe_unknown(key):
                self.refusals_excused += 1
                return
            raise AssertionError(f"a refused call left a ledger record: {command}")
        self.refusals_checked += 1

    def note_unknown(self, key: str | None) -> None:
        self.unknown.append((time.monotonic(), key))

    def _maybe_unknown(self, key: str) -> bool:
        """Whether a recent call whose outcome is unknown may have left a record of ``key``."""
        since = time.monotonic() - UNSETTLED_S
        return any(
            when >= since and (not unknown or key.startswith(unknown))
            for when, unknown in self.unknown
        )

    def check_processes(self) -> None:
        for name, process in self.processes.items():
            assert process.process is not None and process.process.poll() is None, (
                f"{name} exited: {process.log_text()[-2000:]}"
            )
            with grpc.insecure_channel(process.address) as channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=CALL_DEADLINE_S
                )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, name
            growth = (self.rss(process) - self.rss_at_start[name]) / 2**20
            assert growth < RSS_GROWTH_MIB_MAX, f"{name} grew {growth:.0f} MiB"

    def rss(self, process: ServiceProcess) -> int:
        assert process.process is not None
        return int(psutil.Process(process.process.pid).memory_info().rss)

    def check_guard(self) -> None:
        assert self.guard_state() == self.guard_seen, "the guarded merchant's state changed"

    def guard_state(self) -> tuple[bytes, bytes]:
        stub = pb_grpc.InventoryStub(self.channel("router"))
        levels = stub.GetAvailability(
            pb.GetAvailabilityRequest(keys=_keys(GUARD)),
            metadata=self.admin,
            timeout=CALL_DEADLINE_S,
        )
        reservation = stub.GetReservation(
            pb.GetReservationRequest(merchant_id=GUARD, reservation_id=self.guard_reservation),
            metadata=self.admin,
            timeout=CALL_DEADLINE_S,
        )
        return levels.SerializeToString(), reservation.SerializeToString()

    def summary(self) -> dict[str, Any]:
        rss = {
            name: round((self.rss(p) - self.rss_at_start[name]) / 2**20, 1)
            for name, p in self.processes.items()
        }
        items = sum(n for kind, n in self.tried.items() if kind.startswith("batch item"))
        return {
            "profile": PROFILE,
            "calls": sum(self.tried.values()) - items,
            "batch_items": items,
            "tried": dict(sorted(self.tried.items())),
            "codes": {kind: dict(counts) for kind, counts in sorted(self.codes.items())},
            "invalid_argument_fields": dict(self.invalid_fields.most_common(40)),
            "refusals_checked_against_the_ledger": self.refusals_checked,
            "refusals_excused_by_an_unknown_outcome": self.refusals_excused,
            "rss_growth_mib": rss,
            "rss_growth_mib_max": RSS_GROWTH_MIB_MAX,
        }

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.ledger.close()


def _keys(merchant: str) -> list[pb.InventoryKey]:
    return [
        pb.InventoryKey(merchant_id=merchant, sku_id=sku, location_id=location)
        for sku in SKUS
        for location in LOCATIONS
    ]


def now_ms() -> int:
    """Unix epoch ms, as the shard stamps a command (a millisecond early: both truncate)."""
    return int(time.time() * 1000) - 1


# ------------------------------------------------------------------ the fixture


@pytest.fixture(scope="module")
def fuzz(postgres_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    directory = tmp_path_factory.mktemp("fuzz")
    keys = LocalKeys(directory / "auth")
    keys.ensure()
    router_token = directory / "auth" / "router.token"
    router_token.write_text(keys.mint(Role.ROUTER, ["*"], subject="router", ttl_s=7200))
    with fresh_database(postgres_server_url) as database_url, embedded_redis() as redis_url:
        cluster = start_cluster(
            database_url,
            directory,
            shards=2,
            redis_url=redis_url,
            auth_arguments=("--auth-keys", str(keys.jwks_path)),
            # No background caller: every ledger record is an input's or a timer's.
            router_arguments=(
                "--shard-token-file", str(router_token),
                "--rebalance-interval-s", "0", "--hot-key-threshold-per-s", "0",
            ),
        )  # fmt: skip
        state: Fuzz | None = None
        try:
            state = _seeded(cluster, keys, database_url)
            yield state
            report(state.summary())
        finally:
            if state is not None:
                state.close()
            cluster.stop()


def _seeded(cluster: Cluster, keys: LocalKeys, database_url: str) -> Fuzz:
    """Stock, reservations, a delivery and a feed for OWN and GUARD, and the ids of them."""
    mint = keys.mint
    admin = bearer(mint(Role.ADMIN, ["*"], ttl_s=7200))
    with grpc.insecure_channel(cluster.router.address) as channel:
        stub = pb_grpc.InventoryStub(channel)
        for merchant in (OWN, GUARD):
            for index, key in enumerate(_keys(merchant)):
                stub.SetStock(
                    pb.SetStockRequest(key=key, on_hand=1000, idempotency_key=f"seed-{index}"),
                    metadata=admin, timeout=CALL_DEADLINE_S,
                )  # fmt: skip
        reservations = {}
        for name, merchant in (("active", OWN), ("committed", OWN), ("released", OWN),
                               ("guard", GUARD)):  # fmt: skip
            line = pb.ReservationLine(key=_keys(merchant)[0], quantity=2)
            reservations[name] = stub.Reserve(
                pb.ReserveRequest(lines=[line], ttl_s=7200, idempotency_key=f"seed-{name}"),
                metadata=admin, timeout=CALL_DEADLINE_S,
            ).reservation.reservation_id  # fmt: skip
        stub.Commit(
            pb.CommitRequest(merchant_id=OWN, reservation_id=reservations["committed"],
                             idempotency_key="seed-commit"),
            metadata=admin, timeout=CALL_DEADLINE_S,
        )  # fmt: skip
        stub.Release(
            pb.ReleaseRequest(merchant_id=OWN, reservation_id=reservations["released"],
                              idempotency_key="seed-release"),
            metadata=admin, timeout=CALL_DEADLINE_S,
        )  # fmt: skip
        ledger = Ledger(database_url)  # from here on, it reads what the calls record
        stub.ExpectDelivery(
            pb.ExpectDeliveryRequest(
                merchant_id=OWN, idempotency_key="seed-delivery", delivery_id="d-1",
                location_id="store-1", lines=[pb.DeliveryLine(sku_id="sku-1", quantity=5)],
                eta_ms=int(time.time() * 1000) + 3_600_000,
            ),
            metadata=admin, timeout=CALL_DEADLINE_S,
        )  # fmt: skip
        event = pb.FeedEvent(
            event_id="e-1", occurred_at_ms=int(time.time() * 1000), key=_keys(OWN)[1],
            kind=pb.FEED_EVENT_KIND_SALE, quantity=1,
        )  # fmt: skip
        pb_grpc.IngestStub(channel).Send(
            pb.IngestRequest(merchant_id=OWN, source="pos-1", events=[event], batch_id="b-1"),
            metadata=admin, timeout=CALL_DEADLINE_S,
        )  # fmt: skip
        watch = events_pb2_grpc.AvailabilityStreamStub(channel).Watch(
            events_pb2.WatchRequest(merchant_id=OWN), metadata=admin, timeout=CALL_DEADLINE_S
        )
        resume_token = next(watch).resume_token
        watch.cancel()
    by_field = {
        "sku_id": SKUS,
        "location_id": LOCATIONS,
        "location_ids": LOCATIONS,
        "alive_at": LOCATIONS,
        "sku_ids": SKUS,
        "idempotency_key": ("seed-0", "seed-active", "seed-commit", "seed-delivery"),
        "delivery_id": ("d-1",),
        "source": ("pos-1",),
        "event_id": ("e-1",),
        "batch_id": ("b-1",),
        "transfer_id": ("t-1",),
        "resume_token": ("", resume_token),
    }
    own_reservations = tuple(reservations[n] for n in ("active", "committed", "released"))
    scoped_ids = Ids(
        {**by_field, "merchant_id": (OWN, GUARD),
         "reservation_id": (*own_reservations, reservations["guard"])},
        tuple((m, s, loc) for m in (OWN, GUARD) for s in SKUS for loc in LOCATIONS),
    )  # fmt: skip
    every_ids = Ids(
        {**by_field, "merchant_id": (OWN,), "reservation_id": own_reservations},
        tuple((OWN, s, loc) for s in SKUS for loc in LOCATIONS),
    )
    scoped = [(Role.ORDER_SERVICE, [OWN]), (Role.GATEWAY, [OWN]), (Role.PARTNER, [OWN]),
              (Role.ADMIN, [OWN]), (Role.ORDER_SERVICE, [OWN, "m-other"])]  # fmt: skip
    kit = TokenKit(
        keys.signing_key(),
        good=tuple(mint(role, merchants, ttl_s=7200) for role, merchants in scoped),
        every=tuple(mint(role, ["*"], ttl_s=7200) for role in (Role.ADMIN, Role.ROUTER)),
    )
    state = Fuzz(cluster, kit, ledger, admin, scoped_ids, every_ids, reservations["guard"])
    recorded = {type(record.command) for record in ledger.new_records()}
    assert {ExpectDelivery, Ingest} <= recorded, f"the ledger reader missed writes: {recorded}"
    _the_check_sees_a_write(state)
    state.guard_seen = state.guard_state()
    state.rss_at_start = {name: state.rss(p) for name, p in state.processes.items()}
    return state


def _the_check_sees_a_write(state: Fuzz) -> None:
    """The refusal check can fail: an accepted write, judged as if it had been refused, is
    caught."""
    started = now_ms()
    key = _keys(OWN)[0]
    pb_grpc.InventoryStub(state.channel("router")).SetStock(
        pb.SetStockRequest(key=key, on_hand=1000, idempotency_key="seed-check"),
        metadata=state.admin,
        timeout=CALL_DEADLINE_S,
    )
    with pytest.raises(AssertionError, match="a refused call left a ledger record"):
        state.changed_nothing(started, [])


def report(summary: dict[str, Any]) -> None:
    print("\nfuzz summary:", json.dumps(summary, indent=2))
    path = os.environ.get("INVENTORY_FUZZ_SUMMARY")
    if path:
        Path(path).write_text(json.dumps(summary, indent=2) + "\n")


# ------------------------------------------------------------------ the tests

Credentials = tuple[list[tuple[str, Any]], str, Ids]


def credentials(fuzz: Fuzz) -> st.SearchStrategy[Credentials]:
    """A call's metadata (its token), what the token must get, and the ids to draw from:
    GUARD's among them only when no token drawn could be good for it."""
    return fuzzing.tokens(fuzz.kit).map(lambda token: _credentials(fuzz, token))


def _credentials(fuzz: Fuzz, token: Token) -> Credentials:
    value, expectation = token
    ids = fuzz.scoped_ids if expectation in (GOOD, REFUSED) else fuzz.every_ids
    return fuzzing.header(value), expectation, ids


def expect_token(expectation: str, answer: Answer, path: str) -> None:
    """A token that is not good is refused UNAUTHENTICATED (or before: a size bound, bytes
    that are no request, a path nobody serves)."""
    if expectation == REFUSED and not path.startswith("/grpc.health."):
        assert answer.code in {grpc.StatusCode.UNAUTHENTICATED, *TRANSPORT_CODES}, (
            f"a bad token got {answer.code.name}: {answer.status}"
        )


def settle(
    fuzz: Fuzz,
    started_ms: int,
    outcomes: Sequence[tuple[grpc.StatusCode, status_pb2.Status | None, Message | None]],
) -> None:
    """After a call whose answers are ``outcomes`` (code, status, the request it answers):
    the ones of unknown outcome are remembered, and if every one was a refusal, the call
    changed nothing."""
    order_key = next(
        (r.idempotency_key for _, _, r in outcomes if isinstance(r, pb.ReserveOrderRequest)), ""
    )
    refused = True
    for code, status, request in outcomes:
        if code == OK:
            refused = False
        elif not final_or_retryable(status):
            refused = False
            fuzz.note_unknown(idempotency_key_of(request))
    statuses = [status for _, status, _ in outcomes if status is not None]
    fuzz.changed_nothing(started_ms, statuses if refused else None, order_key)


def after_test(fuzz: Fuzz) -> None:
    fuzz.check_processes()
    fuzz.check_guard()


def test_every_unary_request_gets_a_precise_status(fuzz: Fuzz) -> None:
    @FUZZ
    @given(st.sampled_from(sorted(UNARY_PATHS)), st.sampled_from(TARGETS), st.data())
    def run(path: str, target: str, data: st.DataObject) -> None:
        metadata, expectation, ids = data.draw(credentials(fuzz), "credentials")
        rpc = UNARY_PATHS[path]
        request = data.draw(fuzzing.messages(rpc.request_type.DESCRIPTOR, ids), "request")
        started = now_ms()
        answer = fuzz.unary(target, path, request.SerializeToString(), metadata)
        fuzz.judge(f"unary {rpc.method} ({target})", answer)
        expect_token(expectation, answer, path)
        settle(fuzz, started, [(answer.code, answer.status, request)])

    run()
    after_test(fuzz)


def test_every_batch_item_kind_gets_a_precise_answer(fuzz: Fuzz) -> None:
    batch_requests = fuzzing.messages  # the BatchRequest's items: every oneof member

    @FUZZ
    @given(st.sampled_from(TARGETS), st.data())
    def run(target: str, data: st.DataObject) -> None:
        metadata, expectation, ids = data.draw(credentials(fuzz), "credentials")
        requests = data.draw(
            st.lists(batch_requests(pb.BatchRequest.DESCRIPTOR, ids), min_size=1,
                     max_size=STREAM_REQUESTS_MAX), "requests",
        )  # fmt: skip
        started = now_ms()
        answer = fuzz.stream(target, BATCH, [r.SerializeToString() for r in requests], metadata)
        results = [r for raw in answer.responses for r in pb.BatchResponse.FromString(raw).results]
        errors_seen = [r.error for r in results if r.WhichOneof("result") == "error"]
        fuzz.judge(f"batch ({target})", answer, *errors_seen)
        fuzz.codes[f"batch ({target}) item"]["OK"] += len(results) - len(errors_seen)
        expect_token(expectation, answer, BATCH)
        items = [item for request in requests for item in request.items]
        for item in items:
            fuzz.tried[f"batch item {item.WhichOneof('call')}"] += 1
        if answer.code == OK:
            assert Counter(r.id for r in results) == Counter(i.id for i in items), (
                "every item is answered once"
            )
        by_id = {item.id: item for item in items}
        outcomes = [(answer.code, answer.status, None)] + [
            _item_outcome(result, by_id.get(result.id)) for result in results
        ]
        settle(fuzz, started, outcomes)

    run()
    after_test(fuzz)


def _item_outcome(
    result: pb.BatchItemResult, item: pb.BatchItem | None
) -> tuple[grpc.StatusCode, status_pb2.Status | None, Message | None]:
    call = item.WhichOneof("call") if item is not None else None
    request = getattr(item, call) if item is not None and call else None
    if result.WhichOneof("result") != "error":
        return OK, None, request
    return _CODES[result.error.code], result.error, request


def test_every_watch_filter_gets_a_first_event_or_a_precise_status(fuzz: Fuzz) -> None:
    @FUZZ
    @given(st.data())
    def run(data: st.DataObject) -> None:
        metadata, expectation, ids = data.draw(credentials(fuzz), "credentials")
        request = data.draw(fuzzing.messages(events_pb2.WatchRequest.DESCRIPTOR, ids), "filter")
        started = now_ms()
        answer = fuzz.watch(request.SerializeToString(), metadata)
        fuzz.judge("watch", answer)
        expect_token(expectation, answer, WATCH)
        if answer.code == OK:
            assert answer.responses, "a Watch that ended without an event or a status"
        settle(fuzz, started, [(answer.code, answer.status, None)])

    run()
    after_test(fuzz)


def test_every_ingest_stream_request_gets_a_precise_answer(fuzz: Fuzz) -> None:
    @FUZZ
    @given(st.sampled_from(TARGETS), st.data())
    def run(target: str, data: st.DataObject) -> None:
        metadata, expectation, ids = data.draw(credentials(fuzz), "credentials")
        requests = data.draw(
            st.lists(fuzzing.messages(pb.IngestRequest.DESCRIPTOR, ids), min_size=1,
                     max_size=STREAM_REQUESTS_MAX), "requests",
        )  # fmt: skip
        started = now_ms()
        payloads = [r.SerializeToString() for r in requests]
        answer = fuzz.stream(target, INGEST_STREAM, payloads, metadata)
        responses = [pb.IngestResponse.FromString(raw) for raw in answer.responses]
        inner = [r.error for r in responses if r.HasField("error")]
        inner += [ack.error for r in responses for ack in r.acks if ack.HasField("error")]
        fuzz.judge(f"ingest stream ({target})", answer, *inner)
        fuzz.codes[f"ingest stream ({target}) ack"].update(
            pb.EventAckStatus.Name(ack.status) for r in responses for ack in r.acks
        )
        expect_token(expectation, answer, INGEST_STREAM)
        if answer.code == OK:
            assert len(responses) == len(requests), "every request is answered once"
            events = Counter((r.sequence, len(r.events)) for r in requests)
            answered = Counter(
                (r.sequence, len(r.acks)) for r in responses if not r.HasField("error")
            )
            assert not answered - events, "an answer acknowledges each event of its request"
        by_sequence = {r.sequence: r for r in requests}
        outcomes = [(answer.code, answer.status, None)] + [
            (_CODES[r.error.code], r.error, None) if r.HasField("error") and not r.acks
            else (OK, None, by_sequence.get(r.sequence))
            for r in responses
        ]  # fmt: skip
        settle(fuzz, started, outcomes)

    run()
    after_test(fuzz)


def test_bytes_that_are_no_request_are_refused_invalid_argument(fuzz: Fuzz) -> None:
    @FUZZ
    @given(st.sampled_from(sorted(PATHS)), st.sampled_from(TARGETS), st.data())
    def run(path: str, target: str, data: st.DataObject) -> None:
        metadata, expectation, ids = data.draw(credentials(fuzz), "credentials")
        request_type = PATHS[path]
        payload = data.draw(
            fuzzing.raw_requests(fuzzing.messages(request_type.DESCRIPTOR, ids)), "bytes"
        )
        started = now_ms()
        answer = _call(fuzz, target, path, payload, metadata)
        fuzz.judge(f"bytes {path.rsplit('/', 1)[-1]} ({target})", answer, path=path)
        request = _parsed(request_type, payload)
        if request is None:
            allowed = {grpc.StatusCode.INVALID_ARGUMENT, *TRANSPORT_CODES}
            if path in STREAMING and expectation not in (GOOD, GOOD_EVERY):
                allowed.add(grpc.StatusCode.UNAUTHENTICATED)  # refused before it is read
            assert answer.code in allowed, f"bytes that are no request got {answer.code.name}"
            assert answer.code != OK
        else:
            expect_token(expectation, answer, path)
        settle(fuzz, started, [(answer.code, answer.status, request)])

    run()
    after_test(fuzz)


def _call(fuzz: Fuzz, target: str, path: str, payload: bytes, metadata: Any) -> Answer:
    if path in STREAMING:
        return fuzz.stream(target, path, [payload], metadata)
    if path == WATCH and target == "router":
        return fuzz.watch(payload, metadata)
    return fuzz.unary(target, path, payload, metadata)


def _parsed(request_type: type[Message], payload: bytes) -> Message | None:
    try:
        return request_type.FromString(payload)
    except DecodeError:
        return None


def test_oversized_and_malformed_metadata_gets_a_precise_status(fuzz: Fuzz) -> None:
    @FUZZ
    @given(st.sampled_from(sorted(PATHS)), st.sampled_from(TARGETS), st.data())
    def run(path: str, target: str, data: st.DataObject) -> None:
        token, expectation = data.draw(fuzzing.tokens(fuzz.kit), "token")
        ids = _credentials(fuzz, (token, expectation))[2]
        metadata = data.draw(fuzzing.metadata(token), "metadata")
        request = data.draw(fuzzing.messages(PATHS[path].DESCRIPTOR, ids), "request")
        started = now_ms()
        answer = _call(fuzz, target, path, request.SerializeToString(), metadata)
        fuzz.judge(f"metadata ({target})", answer, path=path)
        expect_token(expectation, answer, path)
        settle(fuzz, started, [(answer.code, answer.status, request)])

    run()
    after_test(fuzz)
