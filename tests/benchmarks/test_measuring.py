"""What the harness measures besides latency, without real servers: the spooled ledger and an
audit that can fail on it, reservations admitted and refused apart, CPU per operation of
every process, the generator's GC pauses, loop stalls from the service logs, the default hot
stock, and the merging of several generator processes' results (the last one end to end,
against the echo server, with two generator processes)."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import report, service_logs
from benchmarks.audit import History, audit
from benchmarks.bench import CpuWindow, Measured, cpu_figures, summarise
from benchmarks.gc_pauses import GcPauses
from benchmarks.histograms import Recorder
from benchmarks.ledger import LedgerEntry, LedgerWriter, decode, encode, ledger_files, read_ledger
from benchmarks.runner import Phase, WorkerResult, share
from benchmarks.targets import INSUFFICIENT, OK, Level
from benchmarks.workloads import HOT_RESERVATIONS_PER_S_MAX, Catalogue, Key
from tests.benchmarks.test_harness import FakeTarget

CATALOGUE = Catalogue(keys=10, stock_per_key=3, hot_stock=1, namespace="t")
KEY = Key("tm0", "l0", "s1")
OTHER = Key("tm0", "l0", "s2")


def _spool(directory: Path, entries: list[LedgerEntry], per_file: int = 2) -> int:
    """``entries`` written as the generator processes write them, several files."""
    for start in range(0, len(entries), per_file):
        writer = LedgerWriter(directory / f"p{start:05d}-w000.tsv")
        for entry in entries[start : start + per_file]:
            writer.write(entry)
        writer.close()
    return len(entries)


def _audit_spooled(
    directory: Path,
    levels: dict[Key, Level],
    states: dict[str, str | None],
    entries_expected: int | None = None,
) -> dict[str, Any]:
    fake = FakeTarget(levels, states)
    return asyncio.run(
        audit(
            fake,  # type: ignore[arg-type]
            CATALOGUE,
            ledger=read_ledger(ledger_files(directory)),
            hot_keys=[],
            sample_max=100,
            seed=1,
            entries_expected=entries_expected,
        )
    )


LEDGER = [
    LedgerEntry("r1", ((KEY, 2),), "active", expires_after_s=1e12),
    LedgerEntry("r2", ((KEY, 1),), "committed", expires_after_s=1e12),
    LedgerEntry("", ((OTHER, 1),), "unknown-reserve", expires_after_s=1e12),
]
GOOD_LEVELS = {KEY: Level(2, 2, 0), OTHER: Level(3, 1, 0)}
GOOD_STATES: dict[str, str | None] = {"r1": "active", "r2": "committed"}


def test_ledger_lines_round_trip() -> None:
    cart = tuple((Key("bm3", "l7", f"s{i}"), i + 1) for i in range(5))
    for entry in (
        LedgerEntry("r0001-0000000042", cart, "unknown-finish", 1700000000.123),
        LedgerEntry("", ((Key("bm0", "l0", "hot-4"), 1),), "unknown-reserve", 12.0),
    ):
        assert decode(encode(entry)) == entry


def test_a_ledger_field_holding_a_separator_is_refused(tmp_path: Path) -> None:
    writer = LedgerWriter(tmp_path / "p00000-w000.tsv")
    try:
        for sku_id in ("s,1", "s=1", "s\t1"):
            with pytest.raises(AssertionError):
                writer.write(LedgerEntry("r1", ((Key("m", "l", sku_id), 1),), "active", 1.0))
        assert writer.entries == 0
    finally:
        writer.close()


def test_the_audit_of_a_spooled_ledger_passes_a_consistent_state(tmp_path: Path) -> None:
    written = _spool(tmp_path, LEDGER)
    result = _audit_spooled(tmp_path, GOOD_LEVELS, GOOD_STATES, entries_expected=written)
    assert result["passed"], result
    assert result["ledger_entries"] == 3
    assert result["reservations_acknowledged"] == 2
    assert result["unknown_fate"] == 1


def test_the_audit_of_a_spooled_ledger_flags_a_planted_oversell(tmp_path: Path) -> None:
    _spool(tmp_path, LEDGER)
    oversold = _audit_spooled(tmp_path, {**GOOD_LEVELS, KEY: Level(2, 3, 0)}, GOOD_STATES)
    assert not oversold["passed"]
    assert not oversold["checks"]["no_oversell"]["passed"]
    assert "available -1 < 0" in oversold["checks"]["no_oversell"]["examples"][0]
    # Admitted beyond the stock the client knows of: oversold even if the server's counters
    # say otherwise.
    greedy = [*LEDGER, LedgerEntry("r3", ((KEY, 1),), "active", expires_after_s=1e12)]
    directory = tmp_path / "greedy"
    _spool(directory, greedy)
    result = _audit_spooled(
        directory, {**GOOD_LEVELS, KEY: Level(3, 3, 0)}, {**GOOD_STATES, "r3": "active"}
    )
    assert not result["checks"]["no_oversell"]["passed"]


def test_the_audit_of_a_spooled_ledger_flags_a_missing_reservation(tmp_path: Path) -> None:
    _spool(tmp_path, LEDGER)
    lost = _audit_spooled(tmp_path, GOOD_LEVELS, {"r2": "committed"})
    check = lost["checks"]["acknowledged_reservations_exist"]
    assert not check["passed"]
    assert check["examples"] == ["r1: saw active, server has None"]


def test_the_audit_flags_a_ledger_shorter_than_what_the_generators_wrote(tmp_path: Path) -> None:
    written = _spool(tmp_path, LEDGER)
    (tmp_path / "p00002-w000.tsv").unlink()  # a lost file: the rest still looks consistent
    result = _audit_spooled(tmp_path, GOOD_LEVELS, GOOD_STATES, entries_expected=written)
    assert not result["checks"]["ledger_complete"]["passed"]
    assert not result["passed"]


def test_the_audit_sample_is_bounded_seeded_and_drawn_from_the_whole_ledger() -> None:
    def sample(seed: int) -> list[str]:
        history = History(sample_max=10, seed=seed, now_s=0.0)
        for number in range(1000):
            history.add(LedgerEntry(f"r{number}", ((KEY, 1),), "active", 1e12))
        assert history.acknowledged == 1000
        return [e.reservation_id for e in history.sample]

    first = sample(1)
    assert len(first) == 10
    assert first == sample(1)
    assert first != sample(2)
    assert max(int(r[1:]) for r in first) >= 100  # not just the first ten


# --------------------------------------------------------------------- merging and counting


def _worker(
    worker: int, codes: dict[str, int], measured: tuple[float, float] = (100.0, 102.0)
) -> WorkerResult:
    recorder = Recorder()
    for code, count in codes.items():
        for _ in range(count):
            recorder.record("reserve", 0.001 * (worker + 1), code)
    return WorkerResult(
        histograms=recorder.encoded(),
        measured_s=measured[1] - measured[0],
        pid=1000 + worker,
        worker=worker,
        ledger_entries=codes.get(OK, 0) + codes.get("DEADLINE_EXCEEDED", 0),
        gc=GcPauses().figures(),
        measure_from_unix_s=measured[0],
        measure_to_unix_s=measured[1],
    )


PHASE = Phase(0, "hot", "closed", 8, 0.0, 2.0, 1.0, 1_000_000, 1, 1.1, CATALOGUE, "t")


def _window(operations_s: float = 1.0) -> CpuWindow:
    measured = [
        Measured("router", (11,), "server"),
        Measured("shard-0", (12,), "server"),
        Measured("shard-1", (13,), "server"),
        Measured("postgresql", (14,), "server", tree=True),
        Measured("redis", (15,), "server"),
        Measured("generator-0", (1000,), "generator"),
        Measured("generator-1", (1001,), "generator"),
    ]
    before = {m.label: 10.0 for m in measured} | {"machine": 100.0}
    spent = {"router": 0.2, "shard-0": 0.3, "shard-1": 0.25, "postgresql": 0.15, "redis": 0.05}
    spent |= {"generator-0": 0.1, "generator-1": 0.12}
    after = {label: before[label] + spent[label] for label in spent} | {"machine": 101.5}
    return CpuWindow(measured, before, after, window_s=operations_s * 2.0)


def test_admitted_and_refused_reservations_are_counted_apart() -> None:
    results = [
        _worker(0, {OK: 3, INSUFFICIENT: 2, "DEADLINE_EXCEEDED": 1}),
        _worker(1, {OK: 1, INSUFFICIENT: 5, "INVALID_ARGUMENT": 1}),
    ]
    phase = summarise("router-client", PHASE, results, _window())
    assert phase["reservations"] == {
        "admitted": 4,
        "refused": 7,
        "unknown_fate": 1,
        "failed": 1,
        "admitted_per_s": 2.0,
        "refused_per_s": 3.5,
    }
    assert phase["operations"] == 11  # admitted + refused: what ops/s counts
    table = "\n".join(report.phases_table({"phases": [phase]}))
    assert "| router-client | hot | C=8 | 5.5 ‡ | 2.0 | 4 | 7 | 1 |" in table


def test_the_results_of_several_generator_processes_merge() -> None:
    results = [
        _worker(0, {OK: 3}, measured=(100.0, 102.0)),
        _worker(1, {OK: 4, INSUFFICIENT: 1}, measured=(100.01, 102.01)),
    ]
    phase = summarise("router-client", PHASE, results, _window())
    assert phase["calls"]["reserve"]["count"] == 8
    assert phase["calls"]["reserve"]["codes"] == {OK: 7, INSUFFICIENT: 1}
    assert phase["window_unix_s"] == [100.0, 102.01]
    assert [g["operations"] for g in phase["generators"]] == [3, 5]
    assert sum(g["operations"] for g in phase["generators"]) == phase["operations"]
    assert [g["pid"] for g in phase["generators"]] == [1000, 1001]
    assert [g["ledger_entries"] for g in phase["generators"]] == [3, 4]
    # The histograms merged: the slower process's latencies are in the tail.
    assert phase["all"]["max_ms"] == pytest.approx(2.0, rel=0.01)
    assert phase["all"]["p50_ms"] == pytest.approx(2.0, rel=0.01)


def test_callers_are_split_over_generator_processes_without_loss() -> None:
    for total in (1, 7, 64, 256):
        for workers in (1, 2, 3, 4):
            parts = [share(total, w, workers) for w in range(workers)]
            assert sum(parts) == total
            assert max(parts) - min(parts) <= 1


def test_cpu_per_operation_is_reported_for_every_process() -> None:
    figures = cpu_figures(**_window_arguments(operations=10_000))
    processes = figures["processes"]
    assert set(processes) == {
        "router", "shard-0", "shard-1", "postgresql", "redis", "generator-0", "generator-1",
    }  # fmt: skip
    assert processes["router"]["us_per_operation"] == pytest.approx(20.0)
    assert processes["shard-0"]["cores"] == pytest.approx(0.15)
    assert figures["machine"]["us_per_operation"] == pytest.approx(150.0)
    assert figures["client_cores"] == pytest.approx(0.11)
    assert figures["server_cores"] == pytest.approx(0.475)
    assert figures["other_cores"] == pytest.approx(0.75 - 0.11 - 0.475)
    assert not figures["generator_saturated"]
    phase = {"target": "router-client", "workload": "uniform", "load": "C=64", "cpu": figures}
    text = "\n".join(report.cpu_tables({"phases": [phase]}))
    assert (
        "| phase | operations | router | shard-0 | shard-1 | postgresql | redis | generator-0 "
        "| generator-1 | machine busy |" in text
    )
    assert "| uniform C=64 | 10,000 | 20 (0.10) | 30 (0.15) | 25 (0.12) | 15 (0.07) |" in text
    assert "| 10 (0.05) | 12 (0.06) | 150 (0.75) |" in text


def _window_arguments(operations: int) -> dict[str, Any]:
    window = _window()
    return {
        "measured": window.measured,
        "before": window.before,
        "after": window.after,
        "window_s": window.window_s,
        "operations": operations,
    }


def test_a_saturated_generator_process_marks_the_phase() -> None:
    window = _window()
    busy = {**window.after, "generator-0": window.before["generator-0"] + 1.8}
    figures = cpu_figures(window.measured, window.before, busy, window.window_s, 100)
    assert figures["generator_saturated"]
    assert report._marks({"cpu": figures, "reservations": {"admitted": 1}}) == " †"


# --------------------------------------------------------------------- GC pauses, loop stalls


def _cyclic_garbage() -> None:
    for _ in range(1000):
        node: dict[str, Any] = {}
        node["self"] = node


def test_gc_pauses_inside_the_measured_window_are_recorded() -> None:
    with GcPauses() as pauses:
        assert gc.get_freeze_count() > 0  # the heap was frozen at the start
        pauses.measure_from = time.monotonic()
        _cyclic_garbage()
        gc.collect()
        figures = pauses.figures()
    assert gc.get_freeze_count() == 0  # and thawed at the end
    assert gc.callbacks.count(pauses._callback) == 0
    measured = figures["measured"]
    assert measured["by_generation"]["2"]["collections"] >= 1
    assert measured["pause_ms_max"] > 0.0
    assert measured["pause_ms_total"] >= measured["pause_ms_max"]


def test_gc_pauses_outside_the_measured_window_count_only_for_the_phase() -> None:
    with GcPauses() as pauses:
        pauses.measure_from = time.monotonic() + 3600.0
        gc.collect()
        figures = pauses.figures()
    assert figures["measured"]["collections"] == 0
    assert figures["phase"]["collections"] >= 1


def _log(path: Path, start: float, stalls: list[float | None]) -> None:
    def stamp(at: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1e6):06d}Z"

    lines = [json.dumps({"event": "shard_serving", "timestamp": stamp(start)}), "a traceback"]
    for index, stall in enumerate(stalls, start=1):
        record: dict[str, Any] = {"event": "shard_stats", "timestamp": stamp(start + index)}
        if stall is not None:
            record["loop_stall_max_ms"] = stall
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")


def test_the_worst_loop_stall_of_a_window_comes_from_the_stats_lines_covering_it(
    tmp_path: Path,
) -> None:
    start = 1_700_000_000.0
    _log(tmp_path / "shard-0.log", start, [5.0, 40.0, 7.0, 90.0])
    lines = service_logs.stats_lines(tmp_path / "shard-0.log")
    assert [line.loop_stall_max_ms for line in lines] == [5.0, 40.0, 7.0, 90.0]
    assert service_logs.stats_period_s(lines) == 1.0
    inside = service_logs.worst_stall(lines, start + 1.2, start + 2.8)
    assert inside == {"ms": 40.0, "lines": 2, "span_s": 2.0}  # (1, 2] and (2, 3]
    assert service_logs.worst_stall(lines, start + 0.1, start + 0.5)["ms"] == 5.0
    assert service_logs.worst_stall(lines, start + 10, start + 11)["ms"] is None


def test_a_stats_line_without_the_stall_field_reads_as_n_a(tmp_path: Path) -> None:
    start = 1_700_000_000.0
    _log(tmp_path / "router.log", start, [None, None])
    lines = service_logs.stats_lines(tmp_path / "router.log")
    stall = service_logs.worst_stall(lines, start + 0.5, start + 1.5)
    assert stall["ms"] is None
    assert "loop_stall_max_ms" in stall["why"]
    phase = {
        "target": "router-client",
        "group": "cluster",
        "workload": "uniform",
        "load": "C=64",
        "loop_stall_max_ms": {"router": stall, "shard-0": {"ms": 12.5, "span_s": 2.0}},
    }
    results = {"phases": [phase], "service_logs": {"cluster": {"router": {"stats_period_s": 1.0}}}}
    text = "\n".join(report.stall_tables(results))
    assert "| uniform C=64 | n/a | 12.5 (2.0 s) |" in text


# --------------------------------------------------------------------- options


def _options(*arguments: str) -> Any:
    import argparse

    from benchmarks.cli import add_arguments, options_from

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return options_from(parser.parse_args(["--seed", "1", *arguments]))


def test_the_default_hot_stock_lasts_the_whole_phase() -> None:
    options = _options("--duration-s", "5", "--warmup-s", "2")
    assert options.hot_stock >= 7 * HOT_RESERVATIONS_PER_S_MAX
    faster = _options("--duration-s", "5", "--warmup-s", "2", "--rate", "500000")
    assert faster.hot_stock >= 7 * 500_000
    assert _options("--hot-stock", "20").hot_stock == 20  # to see it sell out
    smoke = _options("--smoke")
    assert smoke.hot_stock >= (smoke.warmup_s + smoke.duration_s) * HOT_RESERVATIONS_PER_S_MAX


def test_generator_processes_and_its_old_name() -> None:
    assert _options("--generator-processes", "3").generator_processes == 3
    assert _options("--client-processes", "2").generator_processes == 2
    assert _options().generator_processes == 1
    assert _options().service_events == "on"
    with pytest.raises(SystemExit):
        _options("--generator-processes", "0")


# --------------------------------------------------------------------- end to end


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_two_generator_processes_drive_the_echo_server_and_their_results_merge(
    tmp_path: Path,
) -> None:
    from benchmarks import main

    output = tmp_path / "report"
    main(
        [
            "--seed", "3", "--keys", "1000", "--targets", "echo-batch", "--workloads", "uniform",
            "--concurrency", "5", "--duration-s", "0.5", "--warmup-s", "0.2",
            "--generator-processes", "2", "--no-progress", "--output-dir", str(output),
        ]
    )  # fmt: skip
    results = json.loads((output / "results.json").read_text())
    (phase,) = results["phases"]
    generators = phase["generators"]
    assert [g["worker"] for g in generators] == [0, 1]
    assert len({g["pid"] for g in generators}) == 2  # two processes, not one twice
    assert all(g["operations"] > 0 for g in generators)
    assert sum(g["operations"] for g in generators) == phase["operations"]
    assert phase["reservations"]["admitted"] == phase["operations"]
    processes = phase["cpu"]["processes"]
    assert {"echo", "generator-0", "generator-1", "harness"} <= set(processes)
    assert {processes[f"generator-{g['worker']}"]["pids"][0] for g in generators} == {
        g["pid"] for g in generators
    }
    assert all(g["gc"]["measured"]["collections"] >= 0 for g in generators)
    text = (output / "report.md").read_text()
    assert "| phase | operations | echo | generator-0 | generator-1 | harness |" in text
    assert "## The load generator's GC pauses in the measured windows" in text
