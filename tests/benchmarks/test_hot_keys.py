"""The hot-key benchmark end to end at tiny sizes: one owner, a split, the PostgreSQL row and
the sell-outs.

No timing is asserted: only that every phase ran and admitted (the throughput phases twice,
the second round in reverse order, and summed up as one row each), each target's key holds
exactly the admitted units afterwards, a sell-out admits no more than its stock and leaves
the rest stranded, the Watch subscriber saw the key move and caught up, and the report files
were written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import hot_keys

pytestmark = [pytest.mark.e2e, pytest.mark.pg, pytest.mark.timeout(240)]


def test_smoke_run_measures_every_phase_and_audits_the_key(
    database_url: str, tmp_path: Path
) -> None:
    output = tmp_path / "hot"
    hot_keys.main(
        [
            "--database-url", database_url,
            "--callers", "8", "--duration-s", "1", "--warmup-s", "0.3",
            "--parts", "2", "--shards", "2", "--stock", "100000",
            "--sell-out-stock", "60", "--sell-out-s", "1.5",
            "--pg-connections", "4", "--settle-s-max", "3", "--rounds", "2",
            "--output-dir", str(output),
        ]
    )  # fmt: skip
    results = json.loads((output / "results.json").read_text())
    assert (output / "report.md").stat().st_size > 0
    assert (output / "hot-keys.png").stat().st_size > 0
    names = [p["name"] for p in results["phases"]]
    throughput = ["one owner", "split K=2", "postgres hot row"]
    sell_outs = ["one owner, sell-out", "split K=2, sell-out"]
    assert names == throughput + throughput[::-1] + sell_outs
    assert [p["round"] for p in results["phases"][:6]] == [0, 0, 0, 1, 1, 1]
    summary = {p["name"]: p for p in results["summary"]}
    assert list(summary) == throughput + sell_outs
    for name in throughput:
        runs = [p for p in results["phases"] if p["name"] == name]
        assert summary[name]["rounds"] == 2
        assert summary[name]["admitted"] == sum(p["admitted"] for p in runs)
        low, high = summary[name]["admitted_per_s_range"]
        assert low <= summary[name]["admitted_per_s"] <= high
        assert summary[name]["audit"]["passed"]
    for phase in results["phases"]:
        assert phase["admitted"] > 0 and phase["audit"]["passed"], phase
        assert phase["cpu_us_per_admitted"]["generator"] > 0, phase
        assert phase["machine_loop_ms"] > 0, phase
        if phase["target"] == "service":
            assert phase["cpu_cores"]["router"] > 0 and phase["cpu_cores"]["shards"] > 0
            assert phase["watch"]["changes"] > 0, phase
            assert phase["watch"]["converged_s"] is not None, phase
        if phase["sell_out"]:
            assert phase["admitted"] + phase["stranded"] == 60, phase
            assert phase["audit"]["stranded_read"] == phase["stranded"], phase
        else:
            assert phase["remained_share_min"] > 0.95, phase
    ratio_names = {
        "split K=2 / one owner",
        "split K=2 / postgres hot row",
        "one owner / postgres hot row",
    }
    assert [set(r) for r in results["ratios_by_round"]] == [ratio_names, ratio_names]
    for name in ratio_names:
        each = [r[name] for r in results["ratios_by_round"]]
        assert results["ratios_worst"][name] == min(each)
        assert min(each) <= results["ratios"][name] <= max(each)
