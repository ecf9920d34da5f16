"""The feed benchmark end to end at tiny sizes: the cluster and the PostgreSQL baseline.

No timing is asserted: only that every phase of both targets ran, every event sent was
acknowledged, the service's state afterwards is exactly the sum of the distinct events
(duplicates applied once), the baseline's is audited (it may be wrong: its race is the
finding), and the report files were written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import ingest_load
from benchmarks._watch_cluster import SETTLE_SAMPLE_S

pytestmark = [pytest.mark.e2e, pytest.mark.pg, pytest.mark.timeout(180)]


def test_smoke_run_measures_both_targets_and_audits_their_state(
    database_url: str, tmp_path: Path
) -> None:
    output = tmp_path / "ingest"
    ingest_load.main(
        [
            "--database-url", database_url,
            "--seed", "7",
            "--rates", "300,600", "--duration-s", "1",
            "--stores", "3", "--skus", "20", "--duplicate-share", "0.2",
            "--pg-connections", "4", "--settle-s-max", "5",
            "--output-dir", str(output),
        ]
    )  # fmt: skip
    results = json.loads((output / "results.json").read_text())
    assert (output / "report.md").stat().st_size > 0
    assert results["seed"] == 7
    phases = {(p["target"], p["rate_per_s"]) for p in results["phases"]}
    assert phases == {(t, r) for t in ("service", "postgres") for r in (300.0, 600.0)}
    for phase in results["phases"]:
        assert phase["offered"] == int(phase["rate_per_s"]), phase
        assert phase["acknowledged"] == phase["offered"] and phase["lost"] == 0, phase
        if phase["target"] == "service":
            assert phase["audit_mismatches"] == 0, phase
        else:
            # The textbook upsert races: a count and the sales after it may commit on two
            # connections in the other order, and the count overwrites them (the README's
            # finding). The audit reports it; at these rates it is rare, never impossible.
            assert 0 <= phase["audit_mismatches"] <= phase["offered"], phase
        assert phase["lag"]["count"] == phase["acknowledged"], phase
        assert phase["cpu_us_per_event"]["generator"] > 0, phase
        assert 0 <= phase["settled_s"] <= 5 + 2 * SETTLE_SAMPLE_S, phase
    service = [p for p in results["phases"] if p["target"] == "service"]
    assert all(p["cpu_cores"]["router"] > 0 and p["cpu_cores"]["shards"] > 0 for p in service)
