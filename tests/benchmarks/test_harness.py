"""The harness's parts without real servers: the Batch driver against a fake in-process
grpc.aio server, the workloads' determinism, and an audit that can fail."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from benchmarks.audit import audit
from benchmarks.ledger import LedgerEntry
from benchmarks.targets import Level, ReservationRef, TargetSpec
from benchmarks.targets.batch import BatchDriver, result_code
from benchmarks.targets.service import ServiceTarget, probe_batch
from benchmarks.workloads import WORKLOADS, Catalogue, Generator, Key


class FakeBatch(pb_grpc.InventoryServicer):
    """Answers each message's items in reverse order, split over two messages."""

    def __init__(self) -> None:
        self.message_sizes: list[int] = []

    async def Batch(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.BatchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BatchResponse]:
        async for request in request_iterator:
            self.message_sizes.append(len(request.items))
            await asyncio.sleep(0.01)  # let calls queue up behind this message
            results = [
                pb.BatchItemResult(
                    id=item.id,
                    reserve=pb.ReserveResponse(
                        reservation=pb.Reservation(reservation_id=item.reserve.idempotency_key)
                    ),
                )
                for item in reversed(request.items)
            ]
            half = len(results) // 2
            for part in (results[:half], results[half:]):
                if part:
                    yield pb.BatchResponse(results=part)


async def _serve(servicer: FakeBatch | None) -> tuple[grpc.aio.Server, str]:
    """A loopback server; with no servicer every RPC answers UNIMPLEMENTED."""
    server = grpc.aio.server()
    if servicer is not None:
        pb_grpc.add_InventoryServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_batch_driver_coalesces_calls_and_matches_results_by_id() -> None:
    async def run() -> tuple[list[str], list[int]]:
        fake = FakeBatch()
        server, address = await _serve(fake)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                driver = BatchDriver(channel, items_max=16, timeout_s=5.0)
                driver.start()
                try:
                    results = await asyncio.gather(
                        *(
                            driver.call(
                                pb.BatchItem(reserve=pb.ReserveRequest(idempotency_key=f"k{i}"))
                            )
                            for i in range(100)
                        )
                    )
                finally:
                    await driver.close()
        finally:
            await server.stop(None)
        assert all(result_code(r) == "OK" for r in results)
        return [r.reserve.reservation.reservation_id for r in results], fake.message_sizes

    ids, sizes = asyncio.run(run())
    assert ids == [f"k{i}" for i in range(100)]
    assert sum(sizes) == 100
    assert max(sizes) <= 16
    assert len(sizes) < 100  # coalesced while a message was in flight


def test_a_server_without_batch_makes_the_batch_target_unavailable() -> None:
    async def run() -> tuple[str | None, str, str | None]:
        server, address = await _serve(None)
        try:
            probed = await probe_batch(address, timeout_s=5.0)
            async with grpc.aio.insecure_channel(address) as channel:
                driver = BatchDriver(channel, timeout_s=5.0)
                driver.start()
                try:
                    answer = await driver.call(pb.BatchItem(reserve=pb.ReserveRequest()))
                finally:
                    await driver.close()
            target = ServiceTarget(TargetSpec("service-batch", "grpc-batch", address), [], "t")
            try:
                await target.prepare()
            finally:
                await target.close()
        finally:
            await server.stop(None)
        return probed, result_code(answer), target.unavailable

    probed, code, unavailable = asyncio.run(run())
    assert probed == "UNIMPLEMENTED"
    # The driver answers with the code its stream ended with. A write racing the server's
    # at-once UNIMPLEMENTED makes gRPC's client end the whole call INTERNAL ("Internal
    # error from Core", the read as well): 98 of 1,500 streams whose write raced the close
    # on this machine. Either is what the client was told; any other code is the driver's.
    assert code in {"UNIMPLEMENTED", "INTERNAL"}
    assert unavailable == "Batch stream: UNIMPLEMENTED"


@pytest.mark.parametrize("workload", WORKLOADS)
def test_workloads_replay_from_their_seed(workload: str) -> None:
    catalogue = Catalogue(keys=5000, stock_per_key=10, hot_stock=5, namespace="t")

    def draw(seed: int) -> list[object]:
        generator = Generator(workload, catalogue, seed, phase=0, zipf_s=1.1)
        return [generator.next() for _ in range(200)]

    assert draw(1) == draw(1)
    for operation in draw(1):
        keys = operation.keys  # type: ignore[attr-defined]
        assert len({(k.merchant_id, k.location_id) for k in keys}) == 1  # one location per cart
        assert len(set(keys)) == len(keys)


class FakeTarget:
    """A target whose server state is whatever the test says."""

    def __init__(self, levels: dict[Key, Level], states: dict[str, str | None]) -> None:
        self.spec = TargetSpec("fake", "fake", "127.0.0.1:1")
        self.server_pids: list[int] = []
        self.unavailable: str | None = None
        self._levels = levels
        self._states = states

    async def levels(self, keys: Sequence[Key]) -> dict[Key, Level]:
        return {k: self._levels[k] for k in keys if k in self._levels}

    async def reservation_states(self, refs: Sequence[ReservationRef]) -> dict[str, str | None]:
        return {r.reservation_id: self._states.get(r.reservation_id) for r in refs}


def _audit(
    levels: dict[Key, Level], states: dict[str, str | None], ledger: list[LedgerEntry]
) -> dict[str, object]:
    catalogue = Catalogue(keys=10, stock_per_key=3, hot_stock=1, namespace="t")
    fake = FakeTarget(levels, states)
    return asyncio.run(
        audit(fake, catalogue, ledger=ledger, hot_keys=[], sample_max=100, seed=1)  # type: ignore[arg-type]
    )


def test_audit_passes_a_consistent_state_and_flags_oversell_and_lost_reservations() -> None:
    key = Key("tm0", "l0", "s1")
    ledger = [
        LedgerEntry("r1", ((key, 2),), "active", expires_after_s=1e12),
        LedgerEntry("r2", ((key, 1),), "committed", expires_after_s=1e12),
    ]
    good = _audit({key: Level(2, 2, 0)}, {"r1": "active", "r2": "committed"}, ledger)
    assert good["passed"], good

    oversold = _audit({key: Level(2, 3, 0)}, {"r1": "active", "r2": "committed"}, ledger)
    checks = oversold["checks"]
    assert not checks["no_oversell"]["passed"]  # type: ignore[index]
    assert not checks["counters_add_up"]["passed"]  # type: ignore[index]

    lost = _audit({key: Level(2, 2, 0)}, {"r2": "committed"}, ledger)
    assert not lost["checks"]["acknowledged_reservations_exist"]["passed"]  # type: ignore[index]


def test_a_suite_sets_the_defaults_and_explicit_flags_win() -> None:
    import argparse

    from benchmarks.cli import add_arguments, options_from
    from benchmarks.suites import TARGETS

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    paths = options_from(parser.parse_args(["--suite", "paths", "--seed", "1"]))
    assert paths.targets == ["router-unary", "router-client", "shard-unary"]
    assert paths.workloads == ["cart-1"]
    assert paths.concurrency == [1, 64, 256]
    assert paths.duration_s >= 5.0
    explicit = parser.parse_args(["--suite", "paths", "--concurrency", "8", "--seed", "1"])
    assert options_from(explicit).concurrency == [8]
    default = options_from(parser.parse_args(["--seed", "1"]))
    assert default.targets == list(TARGETS)
    assert default.workloads == list(WORKLOADS)


def _phase(target: str, callers: int, reservations_s: float, p95_ms: float) -> dict[str, object]:
    latency = {"p50_ms": p95_ms / 2, "p95_ms": p95_ms, "p99_ms": p95_ms * 2, "p99_9_ms": p95_ms * 3}
    return {
        "target": target,
        "workload": "cart-1",
        "mode": "closed",
        "load": f"C={callers}",
        "concurrency": callers,
        "throughput_ops_s": reservations_s,
        "reservations_ok_s": reservations_s,
        "all": latency,
        "calls": {"reserve": latency},
        "cpu": {"client_cores": 0.5, "server_cores": 1.25, "other_cores": 0.0},
    }


def test_the_paths_table_shows_each_path_side_by_side_with_ratios() -> None:
    from benchmarks import report

    phases = [
        _phase("router-unary", 64, 1000.0, 10.0),
        _phase("shard-unary", 64, 2000.0, 5.0),
        _phase("router-client", 64, 3000.0, 2.5),
        _phase("postgres", 64, 500.0, 20.0),
    ]
    text = "\n".join(report.paths_tables({"phases": phases}))
    assert "| callers | router-unary | shard-unary | router-client |" in text
    assert "| 64 | 1,000 | 2,000 | 3,000 | 2.00x | 3.00x |" in text
    assert "| 64 | 5.00 / 10.00 / 20.00 | 2.50 / 5.00 / 10.00 | 1.25 / 2.50 / 5.00 |" in text
    assert "0.50x | 0.25x |" in text
    headline = "\n".join(report.headline_table({"phases": phases}))
    assert "| cart-1 | 64 | 1,000 (20.0) | 3,000 (5.0) | 2,000 (10.0) | 500 (40.0) |" in headline
    assert "| 3.00x | 6.00x |" in headline  # router-client ÷ router-unary, ÷ postgres
