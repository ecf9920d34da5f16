"""Merchants isolated end to end: real shards and a router checking tokens, real PostgreSQL
and Redis, the router's own token to the shards, and keys rotated while they run.

A caller scoped to merchant A can read, change or watch nothing of merchant B through the
router (unary, Batch, Watch) or by going to a shard directly; the refusals reveal nothing
of what B holds; a new key is accepted and a retired one refused without a restart; no
token appears in any process's log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from inventory.v1 import events_pb2, events_pb2_grpc
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from shard_router.common.access import Role
from shard_router.common.calls import bearer
from shard_router.common.tokens import LocalKeys
from tests.conftest import Cluster, embedded_redis, start_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.pg]

A, B = "m-a", "m-b"
CALL_TIMEOUT_S = 10.0
# A keys file change is seen within a second (tokens.KEYS_REFRESH_INTERVAL_S); margin.
ROTATION_SEEN_S = 5.0


def key(merchant: str, sku: str = "milk") -> pb.InventoryKey:
    return pb.InventoryKey(merchant_id=merchant, sku_id=sku, location_id="store-1")


@dataclass
class Secure:
    cluster: Cluster
    keys: LocalKeys
    router_token: Path
    minted: list[str]

    def token(self, role: Role, *merchants: str) -> str:
        token = self.keys.mint(role, merchants, ttl_s=600)
        self.minted.append(token)
        return token

    def logs(self) -> str:
        processes = [self.cluster.router, *self.cluster.shards]
        return "\n".join(process.log_text() for process in processes)


@pytest.fixture
def secure(database_url: str, tmp_path: Path) -> Iterator[Secure]:
    keys = LocalKeys(tmp_path / "auth")
    keys.ensure()
    router_token = tmp_path / "auth" / "router.token"
    router_token.write_text(keys.mint(Role.ROUTER, ["*"], subject="router", ttl_s=3600))
    with embedded_redis() as redis_url:
        cluster = start_cluster(
            database_url,
            tmp_path,
            shards=2,
            redis_url=redis_url,
            auth_arguments=("--auth-keys", str(keys.jwks_path)),
            router_arguments=("--shard-token-file", str(router_token)),
        )
        try:
            yield Secure(cluster, keys, router_token, [router_token.read_text().strip()])
        finally:
            cluster.stop()


def until_refused(address: str, request: pb.GetAvailabilityRequest, metadata: object) -> None:
    """Wait until the process at ``address`` refuses the token as unauthenticated."""
    deadline = time.monotonic() + ROTATION_SEEN_S
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InventoryStub(channel)
        while code_of(lambda: stub.GetAvailability(request, metadata=metadata, timeout=5)) != (
            grpc.StatusCode.UNAUTHENTICATED
        ):
            assert time.monotonic() < deadline, f"{address} still accepts the retired key"
            time.sleep(0.2)


def code_of(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_a_merchant_reads_changes_and_watches_only_its_own_stock(secure: Secure) -> None:
    admin = bearer(secure.token(Role.ADMIN, "*"))
    orders_a = bearer(secure.token(Role.ORDER_SERVICE, A))
    gateway_a = bearer(secure.token(Role.GATEWAY, A))
    partner_a = bearer(secure.token(Role.PARTNER, A))
    with grpc.insecure_channel(secure.cluster.router.address) as channel:
        stub = pb_grpc.InventoryStub(channel)
        for merchant in (A, B):
            stub.SetStock(
                pb.SetStockRequest(key=key(merchant), on_hand=10, idempotency_key="count-1"),
                metadata=admin,
                timeout=CALL_TIMEOUT_S,
            )
        held_b = stub.Reserve(
            pb.ReserveRequest(lines=[pb.ReservationLine(key=key(B), quantity=1)],
                              idempotency_key="order-b"),
            metadata=admin, timeout=CALL_TIMEOUT_S,
        ).reservation.reservation_id  # fmt: skip

        # Own merchant: allowed by role.
        level = stub.GetAvailability(
            pb.GetAvailabilityRequest(keys=[key(A)]), metadata=orders_a, timeout=CALL_TIMEOUT_S
        ).levels[0]
        assert (level.on_hand, level.exists) == (10, True)
        held_a = stub.Reserve(
            pb.ReserveRequest(lines=[pb.ReservationLine(key=key(A), quantity=2)],
                              idempotency_key="order-a"),
            metadata=orders_a, timeout=CALL_TIMEOUT_S,
        )  # fmt: skip
        assert held_a.levels[0].available == 8

        # The other merchant: refused, the same for a key that exists and one that does not.
        denied = grpc.StatusCode.PERMISSION_DENIED
        for sku in ("milk", "no-such-sku"):
            read = pb.GetAvailabilityRequest(keys=[key(B, sku)])
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetAvailability(read, metadata=orders_a, timeout=CALL_TIMEOUT_S)
            assert refused.value.code() == denied
            assert refused.value.details().endswith(f"not scoped to merchant '{B}'")
        write = pb.AdjustStockRequest(key=key(B), delta=-5, reason=pb.ADJUSTMENT_REASON_SALE,
                                      idempotency_key="sale-1")  # fmt: skip
        assert code_of(lambda: stub.AdjustStock(write, metadata=gateway_a, timeout=5)) == denied
        commit = pb.CommitRequest(merchant_id=B, reservation_id=held_b, idempotency_key="c")
        assert code_of(lambda: stub.Commit(commit, metadata=orders_a, timeout=5)) == denied
        # B's reservation named as A's is unknown, exactly like a made-up id.
        for reservation_id in (held_b, "r0-made-up"):
            asked = pb.GetReservationRequest(merchant_id=A, reservation_id=reservation_id)
            code = code_of(lambda r=asked: stub.GetReservation(r, metadata=orders_a, timeout=5))
            assert code == grpc.StatusCode.NOT_FOUND

        # A Batch stream: B's item refused, A's in the same request applied.
        requests = [
            pb.BatchRequest(
                items=[
                    pb.BatchItem(id=1, get_availability=pb.GetAvailabilityRequest(keys=[key(B)])),
                    pb.BatchItem(id=2, get_availability=pb.GetAvailabilityRequest(keys=[key(A)])),
                ]
            )
        ]
        results = {
            result.id: result
            for response in stub.Batch(iter(requests), metadata=orders_a, timeout=CALL_TIMEOUT_S)
            for result in response.results
        }
        assert results[1].error.code == denied.value[0]
        assert results[2].get_availability.levels[0].on_hand == 10

        # Watch: B's keys refused; A's stream starts with A's snapshot.
        watch = events_pb2_grpc.AvailabilityStreamStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(watch.Watch(events_pb2.WatchRequest(merchant_id=B), metadata=partner_a,
                                  timeout=CALL_TIMEOUT_S)))  # fmt: skip
        assert refused.value.code() == denied
        first = next(iter(watch.Watch(events_pb2.WatchRequest(merchant_id=A),
                                      metadata=partner_a, timeout=CALL_TIMEOUT_S)))  # fmt: skip
        assert first.HasField("snapshot") or first.HasField("heartbeat")
        # An order service may not watch; a partner may not write.
        order_watch = watch.Watch(
            events_pb2.WatchRequest(merchant_id=A), metadata=orders_a, timeout=5
        )
        assert code_of(lambda: next(iter(order_watch))) == denied
        set_a = pb.SetStockRequest(key=key(A), on_hand=1, idempotency_key="p-1")
        assert code_of(lambda: stub.SetStock(set_a, metadata=partner_a, timeout=5)) == denied

        # Nothing of B changed.
        level_b = stub.GetAvailability(
            pb.GetAvailabilityRequest(keys=[key(B)]), metadata=admin, timeout=CALL_TIMEOUT_S
        ).levels[0]
        assert (level_b.on_hand, level_b.reserved) == (10, 1)

    # A shard checks its callers as the router does.
    with grpc.insecure_channel(secure.cluster.shards[0].address) as channel:
        shard = pb_grpc.InventoryStub(channel)
        read = pb.GetAvailabilityRequest(keys=[key(B)])
        assert code_of(lambda: shard.GetAvailability(read, timeout=5)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert code_of(lambda: shard.GetAvailability(read, metadata=orders_a, timeout=5)) == denied

    logs = secure.logs()
    for token in secure.minted:
        assert token not in logs and token.split(".")[2] not in logs


def test_keys_rotate_while_everything_runs(secure: Secure) -> None:
    """Rotate: a new signing key is accepted at once by every process; the router's token
    is re-minted into its file; the old key retired: its tokens refused, the new ones and
    the router's hop still served. No process restarts."""
    old_token = bearer(secure.token(Role.PARTNER, A))
    read = pb.GetAvailabilityRequest(keys=[key(A)])
    starts = [process.starts for process in (secure.cluster.router, *secure.cluster.shards)]
    with grpc.insecure_channel(secure.cluster.router.address) as channel:
        stub = pb_grpc.InventoryStub(channel)
        assert stub.GetAvailability(read, metadata=old_token, timeout=CALL_TIMEOUT_S)

        old_kid = secure.keys.current_key_id()
        secure.keys.rotate()
        new_token = bearer(secure.token(Role.PARTNER, A))
        assert stub.GetAvailability(read, metadata=new_token, timeout=CALL_TIMEOUT_S)
        secure.router_token.write_text(secure.token(Role.ROUTER, "*"))
        time.sleep(1.5)  # the router reads its token file again within a second

        secure.keys.retire(old_kid)
        for process in (secure.cluster.router, *secure.cluster.shards):
            until_refused(process.address, read, old_token)
        # Served end to end: the router's streams to the shards still work.
        level = stub.GetAvailability(read, metadata=new_token, timeout=CALL_TIMEOUT_S)
        assert len(level.levels) == 1
    assert starts == [p.starts for p in (secure.cluster.router, *secure.cluster.shards)]


def test_the_router_reopens_its_shard_streams_with_the_rotated_token(secure: Secure) -> None:
    """A shard restarted after the rotation only accepts the new key: the router's new
    stream to it must carry the re-minted token."""
    admin = bearer(secure.token(Role.ADMIN, "*"))
    old_kid = secure.keys.current_key_id()
    secure.keys.rotate()
    secure.router_token.write_text(secure.token(Role.ROUTER, "*"))
    admin_new = bearer(secure.token(Role.ADMIN, "*"))
    time.sleep(1.5)
    secure.keys.retire(old_kid)
    time.sleep(1.5)
    for shard in secure.cluster.shards:
        shard.kill()
        shard.start()
    with grpc.insecure_channel(secure.cluster.router.address) as channel:
        stub = pb_grpc.InventoryStub(channel)
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = stub.GetAvailability(
                    pb.GetAvailabilityRequest(keys=[key(A), key(B)]),
                    metadata=admin_new,
                    timeout=CALL_TIMEOUT_S,
                )
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                assert time.monotonic() < deadline, error
                time.sleep(0.3)
        assert len(answer.levels) == 2
        assert (
            code_of(
                lambda: stub.GetAvailability(
                    pb.GetAvailabilityRequest(keys=[key(A)]), metadata=admin, timeout=5
                )
            )
            == grpc.StatusCode.UNAUTHENTICATED
        )


@pytest.mark.parametrize("role", ["shard", "router"])
def test_a_process_without_keys_or_no_auth_refuses_to_start_in_one_line(role: str) -> None:
    answer = subprocess.run(
        [sys.executable, "-m", "shard_router", role, "--listen", "127.0.0.1:0",
         "--database-url", "postgresql://nobody@127.0.0.1:1/none"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")},
    )  # fmt: skip
    assert answer.returncode == 2, answer
    assert answer.stderr.startswith("error: callers must be authenticated: pass --auth-keys")
    assert answer.stderr.count("\n") == 1


def test_no_auth_is_said_in_a_warning_line(database_url: str, tmp_path: Path) -> None:
    cluster = start_cluster(database_url, tmp_path, shards=1)
    try:
        text = cluster.shards[0].log_text()
    finally:
        cluster.stop()
    assert '"event": "auth_disabled"' in text and '"level": "warning"' in text


def test_inventory_token_prints_a_token_the_service_accepts(tmp_path: Path) -> None:
    LocalKeys(tmp_path / "auth").ensure()
    printed = subprocess.run(
        [sys.executable, "-m", "shard_router", "token", "--role", "gateway",
         "--merchant", "m-1", "--merchant", "m-2", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    from shard_router.common.tokens import Keyring, Verifier

    principal = Verifier(Keyring(tmp_path / "auth" / "keys.jwks")).principal(
        "Bearer " + printed.strip()
    )
    assert (principal.role, principal.merchants) == (Role.GATEWAY, {"m-1", "m-2"})
    missing = subprocess.run(
        [sys.executable, "-m", "shard_router", "token", "--role", "admin", "--merchant", "*",
         "--data-dir", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert missing.returncode == 2 and "run inventory up once" in missing.stderr
