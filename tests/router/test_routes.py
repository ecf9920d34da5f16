"""The router's view of the cluster: the ring is kept while the members are unchanged, the
addresses always follow membership, and a shard's channel reconnects quickly."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from shard_router.router import routing
from shard_router.router.routing import Routes, RoutingLimits

PARTITIONS = 64
# Refresh on every call, so each refresh reads membership.
EVERY_TIME = RoutingLimits(refresh_interval_s_min=0.0, refresh_interval_s=0.0)


@dataclass(frozen=True)
class Member:
    shard_id: str
    address: str


class Membership:
    def __init__(self, *members: Member) -> None:
        self.members: Sequence[Member] = members

    async def read(self) -> Sequence[Member]:
        return self.members


@pytest.fixture
def rings_built(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """The members of every Ring the router builds."""
    built: list[tuple[str, ...]] = []
    real_ring = routing.Ring

    def counting(members: tuple[str, ...], **options: int) -> routing.Ring:
        built.append(tuple(members))
        return real_ring(members, **options)

    monkeypatch.setattr(routing, "Ring", counting)
    return built


def test_the_ring_is_rebuilt_only_when_the_members_change(
    rings_built: list[tuple[str, ...]],
) -> None:
    async def scenario() -> None:
        membership = Membership(Member("shard-0", "127.0.0.1:1"), Member("shard-1", "127.0.0.1:2"))
        routes = Routes(membership.read, PARTITIONS, EVERY_TIME)
        for _ in range(5):
            await routes.refresh(force=True)
            await routes.refresh()
        version = routes.ring_version
        assert rings_built == [("shard-0", "shard-1")]
        membership.members = [*membership.members, Member("shard-2", "127.0.0.1:3")]
        await routes.refresh()
        assert rings_built[-1] == ("shard-0", "shard-1", "shard-2")
        assert routes.ring_version != version
        membership.members = []
        await routes.refresh()
        assert routes.ring_version == ""
        assert routes.address_of(0) is None
        await routes.close()

    asyncio.run(scenario())


def test_a_shard_at_a_new_address_is_routed_there_with_the_ring_kept(
    rings_built: list[tuple[str, ...]],
) -> None:
    async def scenario() -> None:
        membership = Membership(Member("shard-0", "127.0.0.1:1"))
        routes = Routes(membership.read, PARTITIONS, EVERY_TIME)
        await routes.refresh()
        assert {routes.address_of(p) for p in range(PARTITIONS)} == {"127.0.0.1:1"}
        routes.stream("127.0.0.1:1")  # a stream to the old address
        membership.members = [Member("shard-0", "127.0.0.1:9")]
        await routes.refresh()
        assert {routes.address_of(p) for p in range(PARTITIONS)} == {"127.0.0.1:9"}
        assert len(rings_built) == 1, "same members, same ring"
        assert "127.0.0.1:1" not in routes._streams, "the old address's stream is closed"
        await routes.close()

    asyncio.run(scenario())


def test_a_shard_channel_retries_its_connection_within_half_a_second() -> None:
    options = dict(routing.SHARD_CHANNEL_OPTIONS)
    assert set(options) == {
        "grpc.initial_reconnect_backoff_ms",
        "grpc.min_reconnect_backoff_ms",
        "grpc.max_reconnect_backoff_ms",
    }
    # gRPC's floor for each is 100 ms; the gap between attempts never exceeds the max.
    assert 100 <= options["grpc.initial_reconnect_backoff_ms"] <= 500
    assert options["grpc.max_reconnect_backoff_ms"] <= 500
