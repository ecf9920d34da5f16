"""The harness end to end in seconds: real servers, the baselines, the echo ceiling.

No timing is asserted: only that every phase ran, the report files exist and every audit
passed (or the target said why it is unavailable, e.g. a service without the Batch stream).

1. ``--service-address`` (a shard the test started) and ``--database-url`` (the test's
   PostgreSQL): the service's unary and Batch paths, every baseline and both echo targets,
   every workload closed loop and uniform open loop.
2. Nothing given: the harness starts an embedded PostgreSQL, a router and two shards in a
   fresh database, with a Redis for their events, itself, and drives them through the Python
   client with automatic batching (reservations, the hot key, the commit / release
   lifecycle); everything is stopped after, the service logs are kept.

Both check what every report must carry: reservations admitted and refused per phase, CPU
per operation of every process, the generator's GC pauses and (2) each service process's
loop stall, read from its kept log.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from benchmarks import main
from benchmarks.workloads import WORKLOADS
from tests.conftest import ShardProcess

pytestmark = [pytest.mark.e2e, pytest.mark.pg, pytest.mark.timeout(120)]

FILES = ("results.json", "report.md", "throughput_vs_concurrency.png", "latency_cdf.png")


def _results(output: Path) -> dict[str, object]:
    for name in FILES:
        assert (output / name).stat().st_size > 0, name
    results: dict[str, object] = json.loads((output / "results.json").read_text())
    return results


def test_smoke_run_writes_the_report_and_every_audit_passes(
    shard: ShardProcess, database_url: str, tmp_path: Path
) -> None:
    output = tmp_path / "report"
    main(
        [
            "--smoke",
            "--seed", "7",
            "--service-address", shard.address,
            "--database-url", database_url,
            "--targets", "router-unary,service-batch,postgres,redis,redis-durable,"
                         "echo-unary,echo-batch",
            "--output-dir", str(output),
            "--no-progress",
        ]
    )  # fmt: skip
    results = _results(output)
    assert results["seed"] == 7
    targets = results["targets"]
    assert isinstance(targets, dict)
    assert set(targets) == {
        "router-unary", "service-batch", "postgres", "redis", "redis-durable",
        "echo-unary", "echo-batch",
    }  # fmt: skip
    assert "--service-address" in targets["router-unary"]["server"]
    for name, target in targets.items():
        if target["unavailable"]:
            assert name == "service-batch", target  # a service may not serve Batch
            continue
        if name.startswith("echo"):
            assert target["audit"] is None
            continue
        assert target["audit"]["passed"], (name, target["audit"])
    # Every available target ran every workload closed loop, and uniform open loop too (how
    # many operations fit in a phase of a fraction of a second is not asserted).
    phases = results["phases"]
    assert isinstance(phases, list)
    ran = {(p["target"], p["workload"], p["mode"]) for p in phases}
    for name, target in targets.items():
        if target["unavailable"]:
            continue
        for workload in WORKLOADS:
            assert (name, workload, "closed") in ran, (name, workload)
        assert (name, "uniform", "open") in ran, name
    report = (output / "report.md").read_text()
    assert "## This service as ratios" in report
    assert "## Headline" in report
    assert "## CPU per operation, by process" in report
    servers = {
        "router-unary": {"service", "postgresql"},
        "postgres": {"postgresql"},
        "redis": {"redis"},
        "redis-durable": {"redis"},
        "echo-unary": {"echo"},
        "echo-batch": {"echo"},
    }
    for phase in phases:
        assert set(phase["reservations"]) >= {"admitted", "refused", "unknown_fate"}, phase
        processes = set(phase["cpu"]["processes"])
        expected = servers.get(phase["target"], {"service"}) | {"generator-0"}
        assert expected <= processes, (phase["target"], processes)
        assert phase["generators"][0]["gc"]["measured"]["collections"] >= 0


def test_smoke_run_starts_the_cluster_itself_and_drives_the_batching_client(
    tmp_path: Path,
) -> None:
    output = tmp_path / "report"
    main(
        [
            "--smoke",
            "--seed", "11",
            "--targets", "router-client",
            "--workloads", "cart-1,hot,lifecycle",
            "--output-dir", str(output),
            "--no-progress",
        ]
    )  # fmt: skip
    results = _results(output)
    target = results["targets"]["router-client"]  # type: ignore[index]
    assert target["server"].startswith("router + 2 shards started"), target
    assert target["audit"]["passed"], target["audit"]
    assert str(results["postgres_server"]).startswith("embedded pgserver")
    phases = results["phases"]
    assert isinstance(phases, list)
    assert {p["workload"] for p in phases} == {"cart-1", "hot", "lifecycle"}
    assert all(p["target"] == "router-client" for p in phases)
    assert "events on" in target["server"], target
    for phase in phases:
        processes = set(phase["cpu"]["processes"])
        assert {"router", "shard-0", "shard-1", "postgresql", "redis", "generator-0"} <= processes
        assert set(phase["loop_stall_max_ms"]) == {"router", "shard-0", "shard-1"}
    (hot,) = [p for p in phases if p["workload"] == "hot"]
    assert hot["reservations"]["admitted"] > 0, hot["reservations"]  # the default stock lasts
    assert hot["reservations"]["refused"] == 0, hot["reservations"]
    logs = output / "logs" / "cluster"
    kept = sorted(p.name for p in logs.glob("*.log"))
    assert kept == ["cluster-router.log", "cluster-shard-0.log", "cluster-shard-1.log"], kept
    assert "shard_serving" in (logs / "cluster-shard-0.log").read_text()
    report = (output / "report.md").read_text()
    assert "| phase | operations | router | shard-0 | shard-1 | postgresql | redis |" in report
    assert "## Worst event-loop stall of each service process (ms)" in report
    # The router and the shards (their command lines name the run's database) are stopped.
    run_tag = str(results["run_tag"])
    left = [
        process.info["cmdline"]
        for process in psutil.process_iter(["cmdline"])
        if run_tag in " ".join(process.info["cmdline"] or [])
    ]
    assert not left, left
