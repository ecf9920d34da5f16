"""TLS and mutual TLS on every hop (issue 12): real processes, certificates of local CAs.

A router and a shard run mutual TLS on both hops and serve a reservation end to end through
the router. Against each of them a plaintext client, a TLS client that trusts another CA,
one with no client certificate and one whose certificate another CA signed all fail to
connect (UNAVAILABLE) and change nothing, while the right client works. A shard with
server-side TLS only serves a caller without a certificate, and a certificate rotated on
its disk is served without a restart (a half-written rotation is not). Configurations that
cannot run are one line naming the flag, exit 2, before any database work.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from shard_router.certificates import LocalCA, Pair
from shard_router.client import ChannelTLSConfig, InventoryClient, key, line
from shard_router.common import tls
from shard_router.common.access import Role
from shard_router.common.config import ServerTLSConfig
from shard_router.common.tls import ChannelFactory, TLSSetupError, server_credentials
from shard_router.common.tokens import LocalKeys, write_atomically
from tests.conftest import ServiceProcess

# Generous for a loaded machine: a refused handshake fails at once whatever this is.
CALL_TIMEOUT_S = 15.0
# Files are looked at once a second (tls.FILES_REFRESH_INTERVAL_S); margin for a loaded box.
ROTATION_SEEN_S = 30.0
POLL_INTERVAL_S = 0.2
SETUP_EXIT_TIMEOUT_S = 60.0
MILK = key("m-1", "milk", "store-1")
UNREACHABLE_DATABASE = "postgresql://nobody@127.0.0.1:1/none"


@dataclass
class Authorities:
    """The CA every hop trusts, and another one that nothing trusts."""

    good: LocalCA
    other: LocalCA
    server: Pair
    router: Pair
    client: Pair
    other_client: Pair

    def caller(self, pair: Pair | None = None, ca: LocalCA | None = None) -> ChannelTLSConfig:
        trusted = str((ca or self.good).pair.cert)
        if pair is None:
            return ChannelTLSConfig(trusted)
        return ChannelTLSConfig(trusted, str(pair.cert), str(pair.key))

    def credentials(self, caller: ChannelTLSConfig) -> grpc.ChannelCredentials:
        credentials = ChannelFactory(caller).credentials()
        assert credentials is not None
        return credentials

    def server_arguments(self, *, mutual: bool) -> tuple[str, ...]:
        arguments = ("--tls-cert", str(self.server.cert), "--tls-key", str(self.server.key))
        return (*arguments, "--tls-client-ca", str(self.good.pair.cert)) if mutual else arguments


@pytest.fixture
def authorities(tmp_path: Path) -> Authorities:
    good = LocalCA(tmp_path / "ca-good")
    other = LocalCA(tmp_path / "ca-other", name="another CA")
    good.ensure()
    other.ensure()
    return Authorities(
        good,
        other,
        server=good.issue("server", server=True),
        router=good.issue("router", server=False),
        client=good.issue("client", server=False),
        other_client=other.issue("client", server=False),
    )


def wrong_clients(authorities: Authorities) -> dict[str, Callable[[str], grpc.Channel]]:
    """Every way of calling a mutual-TLS server that must fail, by name."""
    trusts_other = authorities.caller(authorities.client, ca=authorities.other)
    no_certificate = authorities.caller()
    other_certificate = authorities.caller(authorities.other_client)
    return {
        "plaintext": grpc.insecure_channel,
        "trusting another CA": lambda address: grpc.secure_channel(
            address, authorities.credentials(trusts_other)
        ),
        "without a client certificate": lambda address: grpc.secure_channel(
            address, authorities.credentials(no_certificate)
        ),
        "with another CA's client certificate": lambda address: grpc.secure_channel(
            address, authorities.credentials(other_certificate)
        ),
    }


def code_of_set_stock(channel: grpc.Channel, on_hand: int) -> grpc.StatusCode:
    request = pb.SetStockRequest(key=MILK, on_hand=on_hand, idempotency_key=f"set-{on_hand}")
    try:
        pb_grpc.InventoryStub(channel).SetStock(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@dataclass
class MutualCluster:
    shard: ServiceProcess
    router: ServiceProcess


@pytest.fixture
def mutual_cluster(
    database_url: str, tmp_path: Path, authorities: Authorities
) -> Iterator[MutualCluster]:
    """One shard and a router, mutual TLS on both hops, no tokens (TLS stands alone)."""
    health = authorities.credentials(authorities.caller(authorities.client))
    server = authorities.server_arguments(mutual=True)
    shard = ServiceProcess(
        database_url, tmp_path, extra_arguments=server, health_credentials=health
    )
    router_hop = (
        *("--shard-tls-ca", str(authorities.good.pair.cert)),
        *("--shard-tls-cert", str(authorities.router.cert)),
        *("--shard-tls-key", str(authorities.router.key)),
    )
    router = ServiceProcess(
        database_url,
        tmp_path,
        role="router",
        extra_arguments=(*server, *router_hop),
        health_credentials=health,
    )
    try:
        shard.start()
        router.start()
        yield MutualCluster(shard, router)
    finally:
        router.stop()
        shard.stop()


@pytest.mark.e2e
@pytest.mark.pg
def test_mutual_tls_on_both_hops_serves_the_right_client_and_refuses_every_other(
    mutual_cluster: MutualCluster, authorities: Authorities
) -> None:
    right = authorities.caller(authorities.client)

    async def reserve_through_the_router() -> pb.ReserveResponse:
        async with InventoryClient(mutual_cluster.router.address, tls=right) as client:
            await client.set_stock(MILK, 10, idempotency_key="count-1")
            return await client.reserve([line(MILK, 2)], idempotency_key="order-1")

    reserved = asyncio.run(reserve_through_the_router())
    assert reserved.levels[0].available == 8

    for process in (mutual_cluster.router, mutual_cluster.shard):
        for name, open_channel in wrong_clients(authorities).items():
            with open_channel(process.address) as channel:
                code = code_of_set_stock(channel, on_hand=99)
            assert code == grpc.StatusCode.UNAVAILABLE, (process.name, name, code)

    async def levels_at(address: str) -> pb.StockLevel:
        async with InventoryClient(address, tls=right) as client:
            answer = await client.get_availability([MILK])
            return answer.levels[0]

    for process in (mutual_cluster.router, mutual_cluster.shard):
        level = asyncio.run(levels_at(process.address))
        assert (level.on_hand, level.reserved) == (10, 2), process.name  # no 99: none got in
    router_log = mutual_cluster.router.log_text()
    assert '"tls": "mutual_tls"' in router_log and '"shard_tls": true' in router_log
    assert '"tls": "mutual_tls"' in mutual_cluster.shard.log_text()


@dataclass
class TLSShard:
    process: ServiceProcess
    served: Path  # the directory of the certificate and key it serves (the test rotates them)


@pytest.fixture
def tls_shard(database_url: str, tmp_path: Path, authorities: Authorities) -> Iterator[TLSShard]:
    """A shard with server-side TLS only, serving a copy of the good CA's server pair."""
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(authorities.server.cert, served / "server.pem")
    shutil.copy(authorities.server.key, served / "server.key")
    arguments = ("--tls-cert", str(served / "server.pem"), "--tls-key", str(served / "server.key"))
    health = authorities.credentials(authorities.caller())
    shard = ServiceProcess(
        database_url, tmp_path, extra_arguments=arguments, health_credentials=health
    )
    shard.start()
    try:
        yield TLSShard(shard, served)
    finally:
        shard.stop()


def _connects(address: str, caller: ChannelTLSConfig | None) -> grpc.StatusCode:
    """A new channel's first call (a new handshake, so the certificate served now)."""
    factory = ChannelFactory(caller)
    with factory.open_blocking(address) as channel:
        stub = pb_grpc.InventoryStub(channel)
        try:
            stub.GetAvailability(pb.GetAvailabilityRequest(keys=[MILK]), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + ROTATION_SEEN_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {ROTATION_SEEN_S} s: {what}"
        time.sleep(POLL_INTERVAL_S)


@pytest.mark.e2e
@pytest.mark.pg
def test_server_side_tls_serves_a_caller_without_a_certificate_and_a_rotated_certificate(
    tls_shard: TLSShard, authorities: Authorities
) -> None:
    shard, served = tls_shard.process, tls_shard.served
    address = shard.address
    assert _connects(address, authorities.caller()) == grpc.StatusCode.OK
    assert _connects(address, None) == grpc.StatusCode.UNAVAILABLE

    # Half a rotation, the key of another certificate: refused, the old pair still served.
    rotated = authorities.other.issue("server", server=True)
    write_atomically(served / "server.key", rotated.key.read_bytes(), mode=0o600)
    # The files are looked at when a handshake asks for them: each poll is a new connection.
    _until(
        lambda: (
            _connects(address, authorities.caller()) == grpc.StatusCode.OK
            and "tls_files_refused" in shard.log_text()
        ),
        "the new key alone refused, the old pair served",
    )

    write_atomically(served / "server.pem", rotated.cert.read_bytes(), mode=0o644)
    trusts_other = authorities.caller(ca=authorities.other)
    _until(
        lambda: _connects(address, trusts_other) == grpc.StatusCode.OK,
        "the rotated certificate served",
    )
    assert _connects(address, authorities.caller()) == grpc.StatusCode.UNAVAILABLE
    assert "tls_files_reloaded" in shard.log_text()
    assert shard.starts == 1 and shard.process is not None and shard.process.poll() is None


# --- configurations that cannot run --------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        (ServerTLSConfig(cert_path="c.pem"), "--tls-cert and --tls-key go together"),
        (ServerTLSConfig(key_path="k.pem"), "--tls-cert and --tls-key go together"),
        (
            ServerTLSConfig(client_ca_path="ca.pem"),
            "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key",
        ),
        (ServerTLSConfig(), None),
        (ServerTLSConfig("c.pem", "k.pem"), None),
        (ServerTLSConfig("c.pem", "k.pem", "ca.pem"), None),
    ],
)
def test_a_server_configuration_names_the_flags_it_lacks(
    config: ServerTLSConfig, problem: str | None
) -> None:
    assert config.problem() == problem


FLAGS = ("--tls-ca", "--tls-client-cert", "--tls-client-key")
TOGETHER = "--tls-client-cert and --tls-client-key go together"
NEEDS_CA = (
    "--tls-client-cert (mutual TLS) needs --tls-ca: the CA the server's certificate chains to"
)


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        (ChannelTLSConfig("ca.pem", "c.pem", flags=FLAGS), TOGETHER),
        (ChannelTLSConfig("ca.pem", key_path="k.pem", flags=FLAGS), TOGETHER),
        (ChannelTLSConfig("", "c.pem", "k.pem", flags=FLAGS), NEEDS_CA),
        (ChannelTLSConfig(flags=FLAGS), None),
        (ChannelTLSConfig("ca.pem", flags=FLAGS), None),
    ],
)
def test_a_caller_configuration_names_the_flags_it_lacks(
    config: ChannelTLSConfig, problem: str | None
) -> None:
    assert config.problem() == problem
    if problem is not None:
        with pytest.raises(TLSSetupError, match=f"^{re.escape(problem)}$"):
            ChannelFactory(config)


def test_without_a_certificate_a_server_is_plaintext_and_a_caller_too() -> None:
    assert server_credentials(ServerTLSConfig()) is None
    factory = ChannelFactory()
    assert not factory.tls and factory.credentials() is None


def _server_error(config: ServerTLSConfig) -> str:
    with pytest.raises(TLSSetupError) as refused:
        server_credentials(config)
    text = str(refused.value)
    assert "\n" not in text
    return text


def test_unreadable_unparsable_mismatched_and_expired_files_are_one_line_naming_the_flag(
    authorities: Authorities, tmp_path: Path
) -> None:
    cert, key = str(authorities.server.cert), str(authorities.server.key)
    missing = str(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    other = authorities.other.issue("other-server", server=True)
    expired = authorities.good.issue("expired", server=True, validity_s=-3600)

    assert _server_error(ServerTLSConfig(missing, key)) == (
        f"--tls-cert: cannot read {missing}: No such file or directory"
    )
    assert _server_error(ServerTLSConfig(str(garbage), key)) == (
        f"--tls-cert: {garbage} holds no PEM certificate"
    )
    assert _server_error(ServerTLSConfig(cert, str(garbage))) == (
        f"--tls-key: {garbage} holds no PEM private key (or it has a passphrase)"
    )
    assert _server_error(ServerTLSConfig(cert, str(other.key))) == (
        f"--tls-key: {other.key} is not the key of the certificate in --tls-cert {cert}"
    )
    assert _server_error(ServerTLSConfig(str(expired.cert), str(expired.key))).startswith(
        f"--tls-cert: {expired.cert} expired at 20"
    )
    assert _server_error(ServerTLSConfig(cert, key, str(garbage))) == (
        f"--tls-client-ca: {garbage} holds no PEM certificate"
    )
    ca = str(authorities.good.pair.cert)
    client = ChannelTLSConfig(ca, str(authorities.client.cert), str(other.key), FLAGS)
    with pytest.raises(TLSSetupError, match=r"^--tls-client-key: .* is not the key of"):
        ChannelFactory(client)
    with pytest.raises(TLSSetupError, match=r"^--tls-ca: .* holds no PEM certificate$"):
        ChannelFactory(ChannelTLSConfig(str(garbage), flags=FLAGS))


def test_a_caller_takes_changed_files_at_its_next_channel_and_keeps_the_last_good_ones(
    authorities: Authorities, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls, "FILES_REFRESH_INTERVAL_S", 0.0)  # look at every channel
    trusted = tmp_path / "trusted.pem"
    shutil.copy(authorities.good.pair.cert, trusted)
    factory = ChannelFactory(ChannelTLSConfig(str(trusted)))
    first = factory.credentials()
    assert first is not None and factory.credentials() is first  # unchanged: not read again
    write_atomically(trusted, authorities.other.pair.cert.read_bytes(), mode=0o644)
    second = factory.credentials()
    assert second is not None and second is not first
    write_atomically(trusted, b"half a certificate", mode=0o644)
    assert factory.credentials() is second  # refused: the last good files are kept


def _run(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shard_router", *arguments],
        capture_output=True,
        text=True,
        timeout=SETUP_EXIT_TIMEOUT_S,
        check=False,
    )


def test_a_process_with_files_that_cannot_serve_exits_2_with_one_line(
    authorities: Authorities,
) -> None:
    cert = str(authorities.server.cert)
    other_key = str(authorities.other_client.key)
    common = ("--database-url", UNREACHABLE_DATABASE, "--no-auth", "--listen", "127.0.0.1:0")
    shard = _run("shard", *common, "--tls-cert", cert, "--tls-key", other_key)
    assert (shard.returncode, shard.stderr) == (
        2,
        f"error: --tls-key: {other_key} is not the key of the certificate in --tls-cert {cert}\n",
    )
    router = _run("router", *common, "--shard-tls-cert", cert, "--shard-tls-key", other_key)
    assert (router.returncode, router.stderr) == (
        2,
        "error: --shard-tls-cert (mutual TLS) needs --shard-tls-ca: the CA the server's "
        "certificate chains to\n",
    )


def test_local_private_keys_are_readable_by_their_owner_only(authorities: Authorities) -> None:
    for pair in (authorities.good.pair, authorities.server, authorities.client):
        assert pair.key.stat().st_mode & 0o777 == 0o600, pair.key
        assert pair.cert.stat().st_mode & 0o777 == 0o644, pair.cert


@pytest.mark.e2e
def test_up_with_tls_runs_every_hop_with_mutual_tls_and_says_what_a_caller_needs(
    tmp_path: Path,
) -> None:
    from tests.e2e.test_up import Up

    data_dir = tmp_path / "data"
    up = Up(data_dir, "--tls", "--shards", "1")
    try:
        said = up.wait_for("mutual TLS on every hop")
        tls = data_dir / "tls"
        caller = ChannelTLSConfig(
            str(tls / "ca.pem"), str(tls / "client.pem"), str(tls / "client.key")
        )
        assert all(path in said for path in (caller.ca_path, caller.cert_path, caller.key_path))
        token = LocalKeys(data_dir / "auth").mint(Role.ADMIN, ["*"], ttl_s=600)
        router, shard = f"127.0.0.1:{up.port}", f"127.0.0.1:{up.shard_ports}"

        async def reserve() -> pb.ReserveResponse:
            async with InventoryClient(router, token=token, tls=caller) as client:
                await client.set_stock(MILK, 10, idempotency_key="count-1")
                return await client.reserve([line(MILK, 2)], idempotency_key="order-1")

        assert asyncio.run(reserve()).levels[0].available == 8
        without_certificate = ChannelTLSConfig(caller.ca_path)
        for address in (router, shard):
            assert _connects(address, None) == grpc.StatusCode.UNAVAILABLE, address
            assert _connects(address, without_certificate) == grpc.StatusCode.UNAVAILABLE, address
        up.process.send_signal(signal.SIGTERM)
        assert up.exit_code() == 0, up.output()
    finally:
        up.kill()
