"""The isolation matrix: every call x every role x own / other / every merchant.

A real gRPC server on loopback serves the Inventory, Ingest and HotKeys services over a
calls object that records what reaches it, and a Watch servicer that does likewise, behind
the authentication interceptor. Each call is made as a unary RPC, as a Batch item (the calls
a Batch carries) and, for ``ingest``, on an ``Ingest.Stream``, with tokens of every role
scoped to the request's merchant, to another one, or to every merchant.

``EXPECTED`` is the table of the issue, written here from the specification (not read from
the code): a call is allowed exactly where it says, and only for the token's merchants;
everywhere else the answer is PERMISSION_DENIED and nothing reaches the calls object.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from inventory.v1 import events_pb2, events_pb2_grpc
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from shard_router.common import rpcs
from shard_router.common.access import Role
from shard_router.common.auth import AuthInterceptor
from shard_router.common.calls import bearer
from shard_router.common.server import create_server
from shard_router.common.servicer import SERVICE_NAMES, CallsServicer, serve_inventory
from shard_router.common.tokens import LEEWAY_S, Keyring, LocalKeys, Verifier

OWN, OTHER = "m-own", "m-other"
READS = {"get_availability", "get_reservation", "get_over_committed", "get_feed_health"}
EVERYTHING = {rpc.field for rpc in rpcs.UNARY} | {"watch"}
EXPECTED: dict[str, set[str]] = {
    "order_service": READS
    | {"reserve", "commit", "release", "extend_reservation", "reserve_order"},
    "gateway": READS
    | {"ingest", "adjust_stock", "set_stock", "set_safety_stock", "expect_delivery"},
    "partner": READS | {"watch"},
    "admin": EVERYTHING,
    "router": EVERYTHING,
}
SCOPES = {"own": [OWN], "other": [OTHER], "every": ["*"]}


def key(merchant: str, sku: str = "sku-1") -> pb.InventoryKey:
    return pb.InventoryKey(merchant_id=merchant, sku_id=sku, location_id="store-1")


def reserve(merchant: str) -> pb.ReserveRequest:
    return pb.ReserveRequest(
        lines=[pb.ReservationLine(key=key(merchant), quantity=1)], idempotency_key="i-1"
    )


def one_reserve(item_id: int) -> pb.BatchRequest:
    return pb.BatchRequest(items=[pb.BatchItem(id=item_id, reserve=reserve(OWN))])


# A request of each call, naming ``merchant`` wherever the message has a merchant.
REQUESTS: dict[str, Callable[[str], Message]] = {
    "get_availability": lambda m: pb.GetAvailabilityRequest(keys=[key(m)]),
    "reserve": reserve,
    "commit": lambda m: pb.CommitRequest(merchant_id=m, reservation_id="r-1"),
    "release": lambda m: pb.ReleaseRequest(merchant_id=m, reservation_id="r-1"),
    "extend_reservation": lambda m: pb.ExtendReservationRequest(merchant_id=m, reservation_id="r"),
    "get_reservation": lambda m: pb.GetReservationRequest(merchant_id=m, reservation_id="r-1"),
    "adjust_stock": lambda m: pb.AdjustStockRequest(key=key(m), delta=1),
    "set_stock": lambda m: pb.SetStockRequest(key=key(m), on_hand=3),
    "set_safety_stock": lambda m: pb.SetSafetyStockRequest(key=key(m), safety_stock=1),
    "ingest": lambda m: pb.IngestRequest(
        merchant_id=m, events=[pb.FeedEvent(event_id="e-1", key=key(m), quantity=1)]
    ),
    "get_over_committed": lambda m: pb.GetOverCommittedRequest(merchant_id=m, location_ids=["l"]),
    "get_feed_health": lambda m: pb.GetFeedHealthRequest(merchant_id=m, location_ids=["l"]),
    "expect_delivery": lambda m: pb.ExpectDeliveryRequest(merchant_id=m, delivery_id="d-1"),
    "split_key": lambda m: pb.SplitKeyRequest(key=key(m), bucket_count=2),
    "merge_key": lambda m: pb.MergeKeyRequest(key=key(m)),
    "send_quota": lambda m: pb.SendQuotaRequest(key=key(m), target=key(m, "sku-1~1")),
    "receive_quota": lambda m: pb.ReceiveQuotaRequest(
        transfer=pb.QuotaTransfer(transfer_id="t-1", source=key(m), target=key(m, "b"))
    ),
    "settle_transfer": lambda m: pb.SettleTransferRequest(key=key(m), transfer_id="t-1"),
    "get_hot_keys": lambda m: pb.GetHotKeysRequest(keys=[key(m)]),
    "reserve_order": lambda m: pb.ReserveOrderRequest(legs=[reserve(m)], idempotency_key="o"),
    "watch": lambda m: events_pb2.WatchRequest(merchant_id=m),
}
# Requests that name the caller's merchant and another one.
MIXED: dict[str, Message] = {
    "get_availability": pb.GetAvailabilityRequest(keys=[key(OWN), key(OTHER)]),
    "reserve_order": pb.ReserveOrderRequest(legs=[reserve(OWN), reserve(OTHER)]),
    "ingest": pb.IngestRequest(
        merchant_id=OWN, events=[pb.FeedEvent(event_id="e", key=key(OTHER))]
    ),
    "receive_quota": pb.ReceiveQuotaRequest(
        transfer=pb.QuotaTransfer(source=key(OWN), target=key(OTHER, "b"))
    ),
    "send_quota": pb.SendQuotaRequest(key=key(OWN), target=key(OTHER)),
}


class RecordingCalls:
    """Answers every call with an empty response and remembers it was reached."""

    def __init__(self) -> None:
        self.reached: list[str] = []
        for rpc in rpcs.UNARY:
            setattr(self, rpc.field, self._method(rpc))

    def _method(self, rpc: rpcs.Rpc[Any, Any]) -> Callable[[Any, float | None], Any]:
        async def call(request: Any, deadline: float | None) -> Any:
            self.reached.append(rpc.field)
            if rpc is rpcs.INGEST:
                return pb.IngestResponse(sequence=request.sequence)
            return rpc.response_type()

        return call


class RecordingWatch(events_pb2_grpc.AvailabilityStreamServicer):
    def __init__(self, calls: RecordingCalls) -> None:
        self._calls = calls

    async def Watch(  # noqa: N802
        self, request: events_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.WatchEvent]:
        self._calls.reached.append("watch")
        yield events_pb2.WatchEvent(heartbeat=events_pb2.Heartbeat(server_time_ms=1))


class Matrix:
    def __init__(self, address: str, calls: RecordingCalls, keys: LocalKeys) -> None:
        self.address = address
        self.calls = calls
        self.tokens = {
            (role.value, scope): keys.mint(role, merchants)
            for role in Role
            for scope, merchants in SCOPES.items()
        }

    def metadata(self, role: str, scope: str) -> tuple[tuple[str, str], ...]:
        return bearer(self.tokens[role, scope])


def expected_allowed(role: str, scope: str, call: str) -> bool:
    return call in EXPECTED[role] and scope in ("own", "every")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    keys = LocalKeys(Path(tmp_path_factory.mktemp("keys")))
    keys.ensure()
    calls = RecordingCalls()
    loop = asyncio.new_event_loop()
    guard = AuthInterceptor(Verifier(Keyring(keys.jwks_path)))
    watch_name = events_pb2.DESCRIPTOR.services_by_name["AvailabilityStream"].full_name

    async def start() -> tuple[grpc.aio.Server, int]:
        server, _, port = create_server("127.0.0.1:0", [*SERVICE_NAMES, watch_name], [guard])
        serve_inventory(server, CallsServicer(calls))
        events_pb2_grpc.add_AvailabilityStreamServicer_to_server(RecordingWatch(calls), server)
        await server.start()
        return server, port

    server, port = loop.run_until_complete(start())
    matrix = Matrix(f"127.0.0.1:{port}", calls, keys)
    matrix.loop = loop  # type: ignore[attr-defined]
    try:
        yield matrix
    finally:
        loop.run_until_complete(server.stop(None))
        loop.close()


def run(matrix: Matrix, coroutine: Any) -> Any:
    return matrix.loop.run_until_complete(coroutine)  # type: ignore[attr-defined]


def test_every_call_has_a_request_here_and_a_row_in_the_expected_table() -> None:
    assert set(REQUESTS) == EVERYTHING
    assert set(EXPECTED) == {role.value for role in Role}


async def _unary(
    channel: grpc.aio.Channel, call: str, request: Message, metadata: Any
) -> grpc.StatusCode:
    if call == "watch":
        stub = events_pb2_grpc.AvailabilityStreamStub(channel)
        try:
            async for _ in stub.Watch(request, metadata=metadata, timeout=5):
                break
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK
    rpc = rpcs.BY_FIELD[call]
    stub_class = {
        rpcs.INVENTORY: pb_grpc.InventoryStub,
        rpcs.INGEST_SERVICE: pb_grpc.IngestStub,
        rpcs.HOT_KEYS: pb_grpc.HotKeysStub,
    }[rpc.service]
    method = getattr(stub_class(channel), rpc.method)
    try:
        await method(request, metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("role", [role.value for role in Role])
def test_unary_calls_and_watch_are_allowed_exactly_where_the_table_says(
    served: Matrix, role: str
) -> None:
    async def check() -> list[str]:
        wrong = []
        async with grpc.aio.insecure_channel(served.address) as channel:
            for scope in SCOPES:
                for call, build in REQUESTS.items():
                    served.calls.reached.clear()
                    code = await _unary(channel, call, build(OWN), served.metadata(role, scope))
                    allowed = expected_allowed(role, scope, call)
                    want = grpc.StatusCode.OK if allowed else grpc.StatusCode.PERMISSION_DENIED
                    if code != want or served.calls.reached != ([call] if allowed else []):
                        wrong.append(f"{role}/{scope}/{call}: {code.name}, {served.calls.reached}")
        return wrong

    assert run(served, check()) == []


@pytest.mark.parametrize("role", [role.value for role in Role])
def test_batch_items_are_allowed_exactly_where_the_table_says_each_on_its_own(
    served: Matrix, role: str
) -> None:
    """One stream per scope carries an item of every Batch call: the refused ones are
    answered PERMISSION_DENIED and the stream serves the others."""
    fields = [rpc.field for rpc in rpcs.CALLS]

    async def check() -> list[str]:
        wrong = []
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = pb_grpc.InventoryStub(channel)
            for scope in SCOPES:
                served.calls.reached.clear()
                items = [
                    pb.BatchItem(id=index + 1, **{call: REQUESTS[call](OWN)})
                    for index, call in enumerate(fields)
                ]
                results: dict[int, pb.BatchItemResult] = {}
                stream = stub.Batch(metadata=served.metadata(role, scope), timeout=10)
                await stream.write(pb.BatchRequest(items=items))
                while len(results) < len(items):
                    response = await stream.read()
                    assert response is not grpc.aio.EOF
                    results.update({result.id: result for result in response.results})
                await stream.done_writing()
                for index, call in enumerate(fields):
                    result = results[index + 1]
                    allowed = expected_allowed(role, scope, call)
                    code = result.error.code if result.WhichOneof("result") == "error" else 0
                    want = 0 if allowed else grpc.StatusCode.PERMISSION_DENIED.value[0]
                    if code != want or result.WhichOneof("result") not in ("error", call):
                        wrong.append(f"{role}/{scope}/{call}: {code}")
                expected_reached = sorted(c for c in fields if expected_allowed(role, scope, c))
                if sorted(served.calls.reached) != expected_reached:
                    wrong.append(f"{role}/{scope}: reached {sorted(served.calls.reached)}")
        return wrong

    assert run(served, check()) == []


@pytest.mark.parametrize("role", [role.value for role in Role])
def test_each_request_of_an_ingest_stream_is_checked(served: Matrix, role: str) -> None:
    async def check() -> list[str]:
        wrong = []
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = pb_grpc.IngestStub(channel)
            for scope in SCOPES:
                served.calls.reached.clear()
                requests = [REQUESTS["ingest"](OWN), pb.IngestRequest()]
                requests[1].CopyFrom(MIXED["ingest"])
                for sequence, request in enumerate(requests, start=1):
                    request.sequence = sequence
                answers = {
                    response.sequence: response.error.code
                    async for response in stub.Stream(
                        iter(requests), metadata=served.metadata(role, scope), timeout=10
                    )
                }
                denied = grpc.StatusCode.PERMISSION_DENIED.value[0]
                own_allowed = expected_allowed(role, scope, "ingest")
                mixed_allowed = own_allowed and scope == "every"
                want = {1: 0 if own_allowed else denied, 2: 0 if mixed_allowed else denied}
                if answers != want:
                    wrong.append(f"{role}/{scope}: {answers}")
        return wrong

    assert run(served, check()) == []


@pytest.mark.parametrize("call", sorted(MIXED))
def test_a_request_naming_another_merchant_beside_its_own_is_refused_whole(
    served: Matrix, call: str
) -> None:
    async def check() -> tuple[grpc.StatusCode, grpc.StatusCode, list[str]]:
        async with grpc.aio.insecure_channel(served.address) as channel:
            served.calls.reached.clear()
            scoped = await _unary(channel, call, MIXED[call], served.metadata("admin", "own"))
            reached = list(served.calls.reached)
            every = await _unary(channel, call, MIXED[call], served.metadata("admin", "every"))
            return scoped, every, reached

    scoped, every, reached = run(served, check())
    assert (scoped, reached) == (grpc.StatusCode.PERMISSION_DENIED, [])
    assert every == grpc.StatusCode.OK


def test_get_hot_keys_without_keys_means_every_merchant_and_needs_that_scope(
    served: Matrix,
) -> None:
    async def check(scope: str) -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(served.address) as channel:
            return await _unary(
                channel, "get_hot_keys", pb.GetHotKeysRequest(), served.metadata("admin", scope)
            )

    assert run(served, check("own")) == grpc.StatusCode.PERMISSION_DENIED
    assert run(served, check("every")) == grpc.StatusCode.OK


def test_the_refusal_names_the_merchant_asked_for_and_nothing_looked_up(served: Matrix) -> None:
    """The check reads the request alone: the message is the same for any key of the other
    merchant, whatever exists."""

    async def message(sku: str) -> str:
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = pb_grpc.InventoryStub(channel)
            request = pb.GetAvailabilityRequest(keys=[key(OTHER, sku)])
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetAvailability(request, metadata=served.metadata("partner", "own"))
            return str(refused.value.details())

    assert run(served, message("sku-1")) == run(served, message("no-such-sku"))


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer not-a-jwt"),), (("authorization", "Basic dXNlcjpwdw=="),)],
    ids=["no token", "not a JWT", "not bearer"],
)
def test_every_call_without_a_good_token_is_unauthenticated_and_reaches_nothing(
    served: Matrix, metadata: tuple[tuple[str, str], ...]
) -> None:
    async def check() -> set[grpc.StatusCode]:
        codes = set()
        async with grpc.aio.insecure_channel(served.address) as channel:
            served.calls.reached.clear()
            for call, build in REQUESTS.items():
                codes.add(await _unary(channel, call, build(OWN), metadata))
            stream = pb_grpc.InventoryStub(channel).Batch(metadata=metadata, timeout=5)
            try:
                await stream.write(one_reserve(1))
                await stream.read()
            except grpc.aio.AioRpcError as error:
                codes.add(error.code())
            else:
                codes.add(await stream.code())
        return codes

    assert run(served, check()) == {grpc.StatusCode.UNAUTHENTICATED}
    assert served.calls.reached == []


def test_health_and_reflection_need_no_token(served: Matrix) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def check() -> int:
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            return int(answer.status)

    # NOT_SERVING until a process says otherwise; the point is that it answers at all.
    assert run(served, check()) in (1, 2)


def test_a_batch_stream_whose_token_expires_answers_its_later_items_unauthenticated(
    tmp_path: Path,
) -> None:
    keys = LocalKeys(tmp_path)
    keys.ensure()
    calls = RecordingCalls()
    guard = AuthInterceptor(Verifier(Keyring(keys.jwks_path)))
    # Good for 2 s more: its exp passed, within the clock skew allowed.
    token = keys.mint(Role.ORDER_SERVICE, [OWN], ttl_s=2, now=time.time() - LEEWAY_S)

    async def scenario() -> tuple[int, int]:
        server, _, port = create_server("127.0.0.1:0", SERVICE_NAMES, [guard])
        serve_inventory(server, CallsServicer(calls))
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stream = pb_grpc.InventoryStub(channel).Batch(metadata=bearer(token), timeout=20)
                await stream.write(one_reserve(1))
                first = (await stream.read()).results[0].error.code
                await asyncio.sleep(max(0.0, _expiry(token) + LEEWAY_S - time.time()) + 0.2)
                await stream.write(one_reserve(2))
                second = (await stream.read()).results[0].error.code
                await stream.done_writing()
                return first, second
        finally:
            await server.stop(None)

    first, second = asyncio.run(scenario())
    assert first == 0
    assert second == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert calls.reached == ["reserve"]


def _expiry(token: str) -> float:
    import jwt

    return float(jwt.decode(token, options={"verify_signature": False})["exp"])
