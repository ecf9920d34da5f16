"""The harness end to end in seconds: a real shard, the baselines, the echo ceiling.

No timing is asserted: only that every phase ran, the report files exist and every audit
passed (or the target said why it is unavailable, e.g. a shard without the Batch stream).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import main
from benchmarks.workloads import WORKLOADS
from tests.conftest import ShardProcess

pytestmark = [pytest.mark.e2e, pytest.mark.pg, pytest.mark.timeout(120)]


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
            "--output-dir", str(output),
            "--no-progress",
        ]
    )  # fmt: skip
    for name in ("results.json", "report.md", "throughput_vs_concurrency.png", "latency_cdf.png"):
        assert (output / name).stat().st_size > 0, name
    results = json.loads((output / "results.json").read_text())
    assert results["seed"] == 7
    targets = results["targets"]
    assert set(targets) == {
        "service-unary", "service-batch", "postgres", "redis", "redis-durable",
        "echo-unary", "echo-batch",
    }  # fmt: skip
    for name, target in targets.items():
        if target["unavailable"]:
            assert name == "service-batch", target  # the shard may not serve Batch yet
            continue
        if name.startswith("echo"):
            assert target["audit"] is None
            continue
        assert target["audit"]["passed"], (name, target["audit"])
    # Every available target ran every workload closed loop, and uniform open loop too (how
    # many operations fit in a phase of a fraction of a second is not asserted).
    ran = {(p["target"], p["workload"], p["mode"]) for p in results["phases"]}
    for name, target in targets.items():
        if target["unavailable"]:
            continue
        for workload in WORKLOADS:
            assert (name, workload, "closed") in ran, (name, workload)
        assert (name, "uniform", "open") in ran, name
    assert "## This service as ratios" in (output / "report.md").read_text()
