"""The event benchmark end to end at tiny sizes: real shards, router, Redis, subscribers.

No timing is asserted: only that both phases ran, every stream got its snapshot, stayed open
and ended at the servers' final versions, and the report files were written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import watch_load

pytestmark = [pytest.mark.e2e, pytest.mark.pg, pytest.mark.timeout(120)]


def test_smoke_run_measures_lag_and_subscribers_and_writes_the_report(
    database_url: str, tmp_path: Path
) -> None:
    output = tmp_path / "events"
    watch_load.main(
        [
            "--database-url", database_url,
            "--seed", "11",
            "--subscribers", "20", "--merchants", "4", "--locations", "2", "--skus", "5",
            "--rate", "50", "--duration-s", "2",
            "--subscribers-max", "40", "--phase2-merchants", "8",
            "--phase2-rate", "20", "--phase2-duration-s", "1", "--idle-s", "0",
            "--client-processes", "2", "--streams-per-channel", "10",
            "--output-dir", str(output),
            "--log-dir", str(tmp_path / "logs"),
            "--no-progress",
        ]
    )  # fmt: skip
    results = json.loads((output / "results.json").read_text())
    assert (output / "report.md").stat().st_size > 0
    assert results["seed"] == 11
    for phase, streams in (("phase1", 20), ("phase2", 40)):
        found = results[phase]
        assert found["streams_established"] == streams, found
        assert found["streams_alive_at_end"] == streams, found
        assert found["writes"]["ok"] > 0, found["writes"]
        assert found["writes"]["failed"] == {}, found["writes"]
        assert found["ledger_check"]["equal"], found["ledger_check"]
        deliveries = found["deliveries"]
        assert deliveries["missed_keys"] == 0, deliveries
        assert deliveries["backwards"] == 0, deliveries
        assert deliveries["unaccounted"] == 0, deliveries
        assert deliveries["delivered_changes"] > 0, deliveries
        assert found["lag_commit_to_receive_ms"]["count"] == deliveries["delivered_changes"]
    assert results["phase2"]["router"]["rss_end_mib"] > 0
    assert "router" in results["cpu_cores"]["phase2"]["writes"]
