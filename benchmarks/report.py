"""The run's results as JSON, a Markdown report and PNG plots in the output directory.

``results.json`` holds everything (options, seed, per-phase figures per call kind, CPU split,
audits); ``report.md`` the tables a reader wants first: each phase, this service as ratios
to each baseline and to the echo ceiling, the CPU split and the audits;
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

SERVICE_PREFIX = "service-"
BASELINES = ("postgres", "redis", "redis-durable")
# Which echo ceiling each service target is compared with.
CEILING_OF = {"service-unary": "echo-unary", "service-batch": "echo-batch"}


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
        for name, phase in targets.items():
            if not name.startswith(SERVICE_PREFIX):
                continue
            row: dict[str, Any] = {"target": name, "workload": workload, "load": load}
            for other in (*BASELINES, CEILING_OF.get(name, "")):
                if other in targets:
                    theirs = targets[other]
                    row[f"throughput_x_{other}"] = _ratio(
                        phase["throughput_ops_s"], theirs["throughput_ops_s"]
                    )
                    row[f"p99_x_{other}"] = _ratio(phase["all"]["p99_ms"], theirs["all"]["p99_ms"])
            rows.append(row)
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Benchmark run {results['run_tag']}",
        "",
        f"Seed {results['seed']} (replay with `--seed {results['seed']}`); catalogue "
        f"{results['catalogue']['rows']:,} key rows; {results['machine']['cores']} cores; "
        f"client processes {results['options']['client_processes']}.",
        "",
        "## Phases",
        "",
        "| target | workload | load | ops/s | p50 ms | p95 ms | p99 ms | p99.9 ms | refused "
        "(stock) | errors | client cores | server cores | other cores |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for phase in results["phases"]:
        overall, cpu = phase["all"], phase["cpu"]
        errors = ", ".join(f"{code} {n}" for code, n in sorted(phase["errors"].items())) or "0"
        lines.append(
            f"| {phase['target']} | {phase['workload']} | {phase['load']} | "
            f"{_fmt(phase['throughput_ops_s'])} | {_fmt(overall['p50_ms'], 2)} | "
            f"{_fmt(overall['p95_ms'], 2)} | {_fmt(overall['p99_ms'], 2)} | "
            f"{_fmt(overall['p99_9_ms'], 2)} | {phase['refused']} | {errors} | "
            f"{_fmt(cpu['client_cores'], 2)} | {_fmt(cpu['server_cores'], 2)} | "
            f"{_fmt(cpu['other_cores'], 2)} |"
        )
    lines += ["", "## This service as ratios (throughput x; p99 x, lower is better)", ""]
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
    lines += ["", "## Targets and audits", ""]
    lines.append("| target | status | load s | audit | details |")
    lines.append("| --- | --- | ---: | --- | --- |")
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
        lines.append(
            f"| {name} | {status} | {_fmt(target.get('load_s'), 1)} | {verdict} | {details} |"
        )
    lines += [
        "",
        "CPU: cores busy over each phase (cpu seconds / wall seconds), measured with psutil: "
        "client = the load generator's processes, server = the target's processes and their "
        "children (for the service: the shard and PostgreSQL), other = the rest of the machine.",
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
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.5 * rows), squeeze=False)
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

    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.5 * rows), squeeze=False)
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


def write(results: dict[str, Any], output_dir: Path) -> dict[str, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    results["ratios"] = ratios(results["phases"])
    text = markdown(results)
    (output_dir / "report.md").write_text(text, encoding="utf-8")
    written = plots(results, output_dir)
    results["files"] = ["results.json", "report.md", *written]
    (output_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    return {name: output_dir / name for name in results["files"]}
