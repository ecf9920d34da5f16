"""The run's results as JSON, a Markdown report and PNG plots in the output directory.

``results.json`` holds everything (options, seed, per-phase figures per call kind,
reservations admitted and refused, CPU per process, loop stalls, the generator's GC pauses,
audits); ``report.md`` the tables a reader wants first: each phase, this service as ratios
to each baseline and to the echo ceiling, CPU microseconds per operation of every process,
each service process's worst event-loop stall, the generator's GC pauses and the audits;
``throughput_vs_concurrency.png`` and ``latency_cdf.png`` the plots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # after the backend is chosen

from .suites import BASELINES, CEILING_OF, SERVICE_TARGETS

# Columns of the headline table (the highest closed-loop concurrency of each workload).
HEADLINE_TARGETS = (
    "router-unary",
    "router-client",
    "service-batch",
    "shard-unary",
    "postgres",
    "redis",
    "redis-durable",
    "echo-unary",
    "echo-batch",
)
# Ratios of the headline: the batching client (how order services call) to each reference.
HEADLINE_SUBJECT = "router-client"
HEADLINE_REFERENCES = ("router-unary", *BASELINES, "echo-batch")
# A generator process busier than this (cores) over a measured window may be the phase's
# bottleneck rather than the target: one process measured 0.80-0.86 core at its ceiling.
GENERATOR_SATURATED_CORES = 0.8
# The three paths of issue 3, in this column order, with router-unary as the reference.
PATHS = ("router-unary", "shard-unary", "router-client", "service-batch")


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def ratios(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each service phase against the other targets' phase of the same workload and load."""
    by_point: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for phase in phases:
        by_point.setdefault((phase["workload"], phase["load"]), {})[phase["target"]] = phase
    rows: list[dict[str, Any]] = []
    for (workload, load), targets in by_point.items():
        for name in SERVICE_TARGETS:
            mine = targets.get(name)
            if mine is None:
                continue
            row: dict[str, Any] = {"target": name, "workload": workload, "load": load}
            for other in (*BASELINES, CEILING_OF[name]):
                if other in targets:
                    theirs = targets[other]
                    row[f"throughput_x_{other}"] = _ratio(
                        mine["throughput_ops_s"], theirs["throughput_ops_s"]
                    )
                    row[f"p99_x_{other}"] = _ratio(mine["all"]["p99_ms"], theirs["all"]["p99_ms"])
            rows.append(row)
    return rows


def _closed(phases: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {
        (p["workload"], p["target"], p["concurrency"]): p for p in phases if p["mode"] == "closed"
    }


def _latency(phase: dict[str, Any], kind: str) -> dict[str, float]:
    figures: dict[str, float] = phase["calls"].get(kind) or phase["all"]
    return figures


def paths_tables(results: dict[str, Any]) -> list[str]:
    """Per workload run by two or more service paths: reservations/s and reserve-call
    latency of each path at each concurrency, side by side, with ratios to router-unary."""
    phases = results["phases"]
    closed = _closed(phases)
    lines: list[str] = []
    for workload in dict.fromkeys(p["workload"] for p in phases):
        paths = [t for t in PATHS if any(k[0] == workload and k[1] == t for k in closed)]
        if len(paths) < 2:
            continue
        reference = paths[0]
        others = paths[1:]
        levels = sorted({k[2] for k in closed if k[0] == workload and k[1] in paths})
        lines += [
            f"### {workload}: reservations/s (reserve calls answered OK per second)",
            "",
            "| callers | "
            + " | ".join(paths)
            + " | "
            + " | ".join(f"{o} ÷ {reference}" for o in others)
            + " |",
            "| ---: |" + " ---: |" * (len(paths) + len(others)),
        ]
        for level in levels:
            got = {t: closed.get((workload, t, level)) for t in paths}
            cells = [_fmt(p["reservations_ok_s"], 0) if p else "-" for p in got.values()]
            base = got[reference]
            for other in others:
                theirs = got[other]
                ratio = (
                    _ratio(theirs["reservations_ok_s"], base["reservations_ok_s"])
                    if theirs and base
                    else None
                )
                cells.append(f"{_fmt(ratio, 2)}x" if ratio is not None else "-")
            lines.append(f"| {level} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"### {workload}: reserve latency p50 / p95 / p99, ms",
            "",
            "| callers | "
            + " | ".join(paths)
            + " | "
            + " | ".join(f"p95 {o} ÷ {reference}" for o in others)
            + " |",
            "| ---: |" + " ---: |" * (len(paths) + len(others)),
        ]
        for level in levels:
            got = {t: closed.get((workload, t, level)) for t in paths}
            cells = []
            for phase in got.values():
                if phase is None:
                    cells.append("-")
                    continue
                figures = _latency(phase, "reserve")
                cells.append(
                    f"{_fmt(figures['p50_ms'], 2)} / {_fmt(figures['p95_ms'], 2)} / "
                    f"{_fmt(figures['p99_ms'], 2)}"
                )
            base = got[reference]
            for other in others:
                theirs = got[other]
                ratio = (
                    _ratio(
                        _latency(theirs, "reserve")["p95_ms"], _latency(base, "reserve")["p95_ms"]
                    )
                    if theirs and base
                    else None
                )
                cells.append(f"{_fmt(ratio, 2)}x" if ratio is not None else "-")
            lines.append(f"| {level} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"### {workload}: CPU cores busy (client / server / rest of the machine)",
            "",
            "| callers | " + " | ".join(paths) + " |",
            "| ---: |" + " ---: |" * len(paths),
        ]
        for level in levels:
            cells = []
            for target in paths:
                phase = closed.get((workload, target, level))
                cpu = phase["cpu"] if phase else None
                cells.append(
                    f"{_fmt(cpu['client_cores'], 2)} / {_fmt(cpu['server_cores'], 2)} / "
                    f"{_fmt(cpu['other_cores'], 2)}"
                    if cpu
                    else "-"
                )
            lines.append(f"| {level} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def headline_table(results: dict[str, Any]) -> list[str]:
    """Each workload at its highest closed-loop concurrency: ops/s (p99 ms) of every target,
    and the batching client's throughput as a multiple of each reference."""
    phases = results["phases"]
    closed = _closed(phases)
    targets = [t for t in HEADLINE_TARGETS if any(k[1] == t for k in closed)]
    references = [r for r in HEADLINE_REFERENCES if r in targets and r != HEADLINE_SUBJECT]
    subject = HEADLINE_SUBJECT if HEADLINE_SUBJECT in targets else None
    if not targets:
        return []
    lines = [
        "| workload | callers | "
        + " | ".join(targets)
        + (" | " + " | ".join(f"{subject} ÷ {r}" for r in references) if subject else "")
        + " |",
        "| --- | ---: |" + " ---: |" * (len(targets) + (len(references) if subject else 0)),
    ]
    for workload in dict.fromkeys(p["workload"] for p in phases):
        levels = [k[2] for k in closed if k[0] == workload]
        if not levels:
            continue
        level = max(levels)
        got = {t: closed.get((workload, t, level)) for t in targets}
        cells = [
            f"{_fmt(p['throughput_ops_s'], 0)} ({_fmt(p['all']['p99_ms'], 1)}){_marks(p)}"
            if p
            else "-"
            for p in got.values()
        ]
        if subject:
            mine = got[subject]
            for reference in references:
                theirs = got[reference]
                ratio = (
                    _ratio(mine["throughput_ops_s"], theirs["throughput_ops_s"])
                    if mine and theirs
                    else None
                )
                cells.append(f"{_fmt(ratio, 2)}x" if ratio is not None else "-")
        lines.append(f"| {workload} | {level} | " + " | ".join(cells) + " |")
    return lines


def _marks(phase: dict[str, Any]) -> str:
    """† the generator may have been the bottleneck; ‡ most reserve calls were refused."""
    reservations = phase.get("reservations") or {}
    refused = reservations.get("refused", 0) > reservations.get("admitted", 0)
    saturated = (phase.get("cpu") or {}).get("generator_saturated")
    return (" †" if saturated else "") + (" ‡" if refused else "")


MARKS_NOTE = (
    "† a generator process was busy {cores:g} core or more: the figure may be the load "
    "generator's ceiling rather than the target's (try more --generator-processes). "
    "‡ most reserve calls were refused (insufficient stock): the figure measures refusals."
)


def _describe(results: dict[str, Any]) -> list[str]:
    options, machine = results["options"], results["machine"]
    cpu = f", {machine['cpu_model']}" if machine.get("cpu_model") else ""
    end = machine.get("load_average_at_end")
    loads = f"load average (1/5/15 min) {machine.get('load_average_at_start')} at start" + (
        f", {end} at end" if end else ""
    )
    phase = (
        f"{options.get('warmup_s')} s warm-up + {options.get('duration_s')} s measured "
        f"(at most {options.get('count_max'):,} operations)"
    )
    generators = options.get("generator_processes", options.get("client_processes"))
    events = options.get("service_events")
    return [
        f"- Command: `{results.get('command') or '(not recorded)'}`",
        f"- Suite: {results.get('suite') or '-'}; seed {results['seed']} (replay with "
        f"`--seed {results['seed']}`); run tag {results['run_tag']}",
        f"- Machine: {machine['cores']} cores{cpu}, {machine.get('memory_gb', '?')} GB; {loads}",
        f"- Each phase: {phase}; closed loop at {options.get('concurrency')} callers"
        + (f", open loop at {options.get('rate')}/s" if options.get("rate") else ""),
        f"- Catalogue: {results['catalogue']['rows']:,} key rows loaded into every stateful "
        f"target, {options.get('stock_per_key'):,} units each; the hot key (a fresh one per "
        f"phase) {results['catalogue'].get('hot_stock', 0):,} units",
        f"- PostgreSQL: {results.get('postgres_server') or 'not used'}",
        *(
            [
                f"- Router and shards started here: events {events} (--service-events); "
                "their JSON logs are kept in the output directory's `logs/`"
            ]
            if results.get("service_logs")
            else []
        ),
        f"- Load generator: {generators} process(es), sharing the {machine['cores']} cores with "
        "the servers; each collects and freezes its heap before a phase and writes its "
        "ledger to a file (its GC pauses are below)",
    ]


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _phase_label(phase: dict[str, Any]) -> str:
    return f"{phase['workload']} {phase['load']}"


def phases_table(results: dict[str, Any]) -> list[str]:
    """Every phase: throughput, reservations admitted and refused, latency, errors."""
    lines = [
        "| target | workload | load | ops/s | admitted/s | admitted | refused | unknown fate "
        "| p50 ms | p95 ms | p99 ms | p99.9 ms | errors | cores generator / server / other |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- "
        "| --- |",
    ]
    for phase in results["phases"]:
        overall, cpu = phase["all"], phase["cpu"]
        reservations = phase.get("reservations") or {}
        errors = ", ".join(f"{code} {n}" for code, n in sorted(phase["errors"].items())) or "0"
        lines.append(
            f"| {phase['target']} | {phase['workload']} | {phase['load']} | "
            f"{_fmt(phase['throughput_ops_s'])}{_marks(phase)} | "
            f"{_fmt(phase.get('reservations_ok_s'))} | "
            f"{_count(reservations.get('admitted'))} | {_count(reservations.get('refused'))} | "
            f"{_count(reservations.get('unknown_fate'))} | "
            f"{_fmt(overall['p50_ms'], 2)} | {_fmt(overall['p95_ms'], 2)} | "
            f"{_fmt(overall['p99_ms'], 2)} | {_fmt(overall['p99_9_ms'], 2)} | {errors} | "
            f"{_fmt(cpu['client_cores'], 2)} / {_fmt(cpu['server_cores'], 2)} / "
            f"{_fmt(cpu['other_cores'], 2)} |"
        )
    lines += [
        "",
        "admitted = reserve calls answered OK, refused = answered insufficient stock "
        "(FAILED_PRECONDITION), unknown fate = timed out or lost (the audit accepts both "
        "fates), all counted in the measured window. "
        + MARKS_NOTE.format(cores=GENERATOR_SATURATED_CORES),
        "",
    ]
    return lines


def _process_labels(phases: list[dict[str, Any]]) -> list[str]:
    """The processes of these phases in report order: servers as started, then generators."""
    labels: dict[str, str] = {}
    for phase in phases:
        for label, figures in phase["cpu"].get("processes", {}).items():
            labels.setdefault(label, figures.get("role", "server"))
    ordered = [label for label, role in labels.items() if role == "server"]
    ordered += sorted(label for label, role in labels.items() if role == "generator")
    return ordered + [label for label, role in labels.items() if role == "harness"]


def cpu_tables(results: dict[str, Any]) -> list[str]:
    """Per target: CPU microseconds per operation of each process and of the machine."""
    lines: list[str] = []
    for target in dict.fromkeys(p["target"] for p in results["phases"]):
        phases = [p for p in results["phases"] if p["target"] == target]
        labels = _process_labels(phases)
        if not labels:
            continue
        lines += [
            f"### {target}",
            "",
            "| phase | operations | " + " | ".join(labels) + " | machine busy |",
            "| --- | ---: |" + " ---: |" * (len(labels) + 1),
        ]
        for phase in phases:
            cpu = phase["cpu"]
            processes = cpu.get("processes", {})
            cells = [_us(processes[label]) if label in processes else "-" for label in labels]
            lines.append(
                f"| {_phase_label(phase)} | {_count(cpu.get('operations'))} | "
                + " | ".join(cells)
                + f" | {_us(cpu.get('machine') or {})} |"
            )
        lines.append("")
    if lines:
        lines += [
            "Each cell: CPU microseconds per operation (cores busy). CPU is sampled at the "
            "start and the end of the measured window with psutil and divided by the "
            "operations counted in ops/s (reserve and read calls answered in that window), so "
            "the processes add up to about the machine's figure, the rest being other "
            "programs. postgresql = the postmaster and all its backends; a generator "
            "process run in the harness's own process (--generator-processes 1) includes "
            "the harness's progress display, which is a column of its own (harness) when "
            "the generator runs in processes of its own.",
            "",
        ]
    return lines


def _us(figures: dict[str, Any]) -> str:
    if not figures:
        return "-"
    per = figures.get("us_per_operation")
    shown = _fmt(per, 0) if per is not None else "-"
    return f"{shown} ({_fmt(figures.get('cores'), 2)})"


def stall_tables(results: dict[str, Any]) -> list[str]:
    """Per service target: each service process's worst event-loop stall per phase."""
    lines: list[str] = []
    logs = results.get("service_logs") or {}
    for target in dict.fromkeys(p["target"] for p in results["phases"]):
        phases = [p for p in results["phases"] if p["target"] == target]
        labels = list(
            dict.fromkeys(label for p in phases for label in p.get("loop_stall_max_ms") or {})
        )
        if not labels:
            continue
        periods = logs.get(phases[0].get("group"), {})
        shown = ", ".join(_period(label, periods[label]) for label in labels if label in periods)
        lines += [
            f"### {target} (stats period: {shown or 'n/a'})",
            "",
            "| phase | " + " | ".join(labels) + " |",
            "| --- |" + " ---: |" * len(labels),
        ]
        for phase in phases:
            stalls = phase.get("loop_stall_max_ms") or {}
            cells = [_stall(stalls.get(label)) for label in labels]
            lines.append(f"| {_phase_label(phase)} | " + " | ".join(cells) + " |")
        lines.append("")
    if lines:
        lines += [
            "Each cell: the largest `loop_stall_max_ms` (the worst event-loop lag a process "
            "logs in its stats line since its previous one) of the stats lines whose span "
            "overlaps the measured window, and in brackets how many seconds those spans "
            "cover together: a span much longer than the phase means the stall may lie "
            "outside it. n/a: no stats line covers the window, or the lines have no "
            "`loop_stall_max_ms`.",
            "",
        ]
    return lines


def _period(label: str, log: dict[str, Any]) -> str:
    period = log.get("stats_period_s")
    if period is not None:
        return f"{label} {period:.1f} s"
    lines = log.get("stats_lines", 0)
    return f"{label} n/a ({lines} stats line{'' if lines == 1 else 's'})"


def _stall(figures: dict[str, Any] | None) -> str:
    if not figures or figures.get("ms") is None:
        return "n/a"
    return f"{_fmt(figures['ms'], 1)} ({_fmt(figures.get('span_s'), 1)} s)"


def gc_table(results: dict[str, Any]) -> list[str]:
    """The load generator's own GC pauses inside each measured window."""
    lines = [
        "| target | phase | generator | collections (gen 2) | pause max ms | pause total ms "
        "| whole phase: pause max ms |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    rows = 0
    for phase in results["phases"]:
        for generator in phase.get("generators") or []:
            gc = generator.get("gc") or {}
            measured, whole = gc.get("measured") or {}, gc.get("phase") or {}
            if not measured:
                continue
            oldest = (measured.get("by_generation") or {}).get("2") or {}
            rows += 1
            lines.append(
                f"| {phase['target']} | {_phase_label(phase)} | {generator['worker']} | "
                f"{measured.get('collections', 0)} ({oldest.get('collections', 0)}) | "
                f"{_fmt(measured.get('pause_ms_max'), 2)} | "
                f"{_fmt(measured.get('pause_ms_total'), 2)} | "
                f"{_fmt(whole.get('pause_ms_max'), 2)} |"
            )
    if not rows:
        return []
    return [
        *lines,
        "",
        "Collections of each generator process that ended inside the measured window "
        "(gc.callbacks), after `gc.collect(); gc.freeze()` at the phase's start: a pause here "
        "delays every call in flight by as much and shows in the tail as the target's.",
        "",
    ]


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Benchmark run {results['run_tag']}", "", *_describe(results), ""]
    paths = paths_tables(results)
    if paths:
        lines += ["## The service's paths side by side", "", *paths]
    headline = headline_table(results)
    if headline:
        lines += [
            "## Headline: ops/s (p99 ms) at the highest concurrency",
            "",
            *headline,
            "",
        ]
        if any(_marks(p) for p in results["phases"]):
            lines += [MARKS_NOTE.format(cores=GENERATOR_SATURATED_CORES), ""]
    lines += ["## Phases", "", *phases_table(results)]
    lines += ["## This service as ratios (throughput x; p99 x, lower is better)", ""]
    others = [*BASELINES, "echo"]
    lines.append(
        "| target | workload | load | "
        + " | ".join(f"ops/s x {o} | p99 x {o}" for o in others)
        + " |"
    )
    lines.append("| --- | --- | --- |" + " ---: | ---: |" * len(others))
    for row in results["ratios"]:
        cells = []
        for other in others:
            name = CEILING_OF.get(row["target"], "") if other == "echo" else other
            cells += [
                _fmt(row.get(f"throughput_x_{name}"), 3),
                _fmt(row.get(f"p99_x_{name}"), 2),
            ]
        lines.append(
            f"| {row['target']} | {row['workload']} | {row['load']} | " + " | ".join(cells) + " |"
        )
    lines.append("")
    lines.append(
        "echo = the bare gRPC ceiling with the same call style: echo-unary for router-unary "
        "and shard-unary, echo-batch for router-client and service-batch."
    )
    lines += ["", "## CPU per operation, by process (µs per operation, cores busy)", ""]
    lines += cpu_tables(results)
    stalls = stall_tables(results)
    if stalls:
        lines += ["## Worst event-loop stall of each service process (ms)", "", *stalls]
    pauses = gc_table(results)
    if pauses:
        lines += ["## The load generator's GC pauses in the measured windows", "", *pauses]
    lines += ["## Targets and audits", ""]
    lines.append(
        "| target | server | status | start s | load s | mean cores generator / server / "
        "other | audit | details |"
    )
    lines.append("| --- | --- | --- | ---: | ---: | --- | --- | --- |")
    for name, target in results["targets"].items():
        audit = target.get("audit")
        if target.get("unavailable"):
            status, verdict, details = f"unavailable: {target['unavailable']}", "-", ""
        elif audit is None:
            status, verdict, details = "measured", "n/a (stateless)", ""
        else:
            status = "measured"
            verdict = "PASSED" if audit["passed"] else "FAILED"
            details = "; ".join(
                f"{check}: {'ok' if c['passed'] else 'FAIL'} ({c['checked']} checked"
                + (f", e.g. {c['examples'][0]}" if c["examples"] else "")
                + ")"
                for check, c in audit["checks"].items()
            )
        mine = [p["cpu"] for p in results["phases"] if p["target"] == name]
        split = (
            " / ".join(
                _fmt(sum(c[k] for c in mine) / len(mine), 2)
                for k in ("client_cores", "server_cores", "other_cores")
            )
            if mine
            else "-"
        )
        load_s, loaded_by = target.get("load_s"), target.get("catalogue_loaded_by")
        shown_load = f"(by {loaded_by})" if loaded_by else _fmt(load_s, 1)
        lines.append(
            f"| {name} | {target.get('server', '-')} | {status} | "
            f"{_fmt(target.get('start_s'), 1)} | {shown_load} | {split} | {verdict} | {details} |"
        )
    lines += [
        "",
        "Cores busy over each measured window (cpu seconds / wall seconds), measured with "
        "psutil: generator = the load generator's processes, server = the target's processes "
        "(for the service: the router and shard processes, PostgreSQL with its backends and "
        "the events' Redis), other = the rest of the machine. "
        f"The machine has {results['machine']['cores']} cores shared by generator and server.",
        "",
    ]
    return "\n".join(lines)


def plots(results: dict[str, Any], output_dir: Path) -> list[str]:
    phases = results["phases"]
    workloads = sorted({p["workload"] for p in phases})
    written: list[str] = []
    if not phases:
        return written
    columns = min(4, len(workloads))
    rows = math.ceil(len(workloads) / columns)
    figure, axes = _grid(rows, columns, len(workloads))
    for index, workload in enumerate(workloads):
        axis = axes[index // columns][index % columns]
        for target in sorted({p["target"] for p in phases}):
            points = sorted(
                (p["concurrency"], p["throughput_ops_s"])
                for p in phases
                if p["workload"] == workload and p["target"] == target and p["mode"] == "closed"
            )
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=target)
        axis.set_title(workload)
        axis.set_xlabel("concurrency")
        axis.set_ylabel("ops/s")
        axis.set_xscale("log", base=2)
    axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(output_dir / "throughput_vs_concurrency.png", dpi=100)
    plt.close(figure)
    written.append("throughput_vs_concurrency.png")

    figure, axes = _grid(rows, columns, len(workloads))
    for index, workload in enumerate(workloads):
        axis = axes[index // columns][index % columns]
        chosen: dict[str, dict[str, Any]] = {}
        for phase in phases:  # per target, the closed-loop phase of highest concurrency
            if phase["workload"] != workload or phase["mode"] != "closed":
                continue
            best = chosen.get(phase["target"])
            if best is None or phase["concurrency"] > best["concurrency"]:
                chosen[phase["target"]] = phase
        for target, phase in sorted(chosen.items()):
            if phase["cdf"]:
                latencies, fractions = zip(*phase["cdf"], strict=True)
                axis.plot(latencies, fractions, label=f"{target} {phase['load']}")
        axis.set_title(workload)
        axis.set_xlabel("latency ms")
        axis.set_ylabel("fraction of calls")
        axis.set_xscale("log")
    axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(output_dir / "latency_cdf.png", dpi=100)
    plt.close(figure)
    written.append("latency_cdf.png")
    return written


def _grid(rows: int, columns: int, used: int) -> tuple[Any, Any]:
    """A rows x columns figure of plots; the cells past ``used`` are hidden, not empty."""
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.5 * rows), squeeze=False)
    for index in range(used, rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    return figure, axes


def readme_table(results: dict[str, Any]) -> str:
    """The headline (or, for a paths run, the side-by-side tables) with the command that
    reproduces it: what the README quotes."""
    machine = results["machine"]
    body = paths_tables(results) if results.get("suite") == "paths" else headline_table(results)
    title = (
        "The service's paths side by side"
        if results.get("suite") == "paths"
        else "ops/s (p99 ms) of each target at the highest concurrency of each workload"
    )
    return "\n".join(
        [
            f"Benchmark: {title}; {results['catalogue']['rows']:,} key rows; "
            f"{machine['cores']} cores shared by the load generator and the servers "
            f"(load average at start {machine.get('load_average_at_start')}); seed "
            f"{results['seed']}. Reproduce with:",
            "",
            "```",
            results.get("command") or "(command not recorded)",
            "```",
            "",
            *body,
            "",
        ]
    )


def write(results: dict[str, Any], output_dir: Path) -> dict[str, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    results["ratios"] = ratios(results["phases"])
    text = markdown(results)
    (output_dir / "report.md").write_text(text, encoding="utf-8")
    (output_dir / "README-table.md").write_text(readme_table(results), encoding="utf-8")
    written = plots(results, output_dir)
    results["files"] = ["results.json", "report.md", "README-table.md", *written]
    (output_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    return {name: output_dir / name for name in results["files"]}
