"""The service processes' stats lines, read back from their JSON logs, per measured window.

Each shard and router logs a structured stats line every stats period (events
``shard_stats`` and ``router_stats``; one JSON object a line, ``timestamp`` ISO-8601 UTC).
The field ``loop_stall_max_ms`` of a line is the worst event-loop lag of that process since
its previous stats line, so a line covers ``(previous line, this line]``; the first covers
from the process's first log line.

``worst_stall`` gives, for one process and one measured window, the largest
``loop_stall_max_ms`` of the lines whose span overlaps the window, and how wide those spans
are together (``span_s``): with a stats period close to the phase's length the figure may
come from just before or after the window, and the span says by how much. A window that no
line covers, or lines without the field (a service that does not log it), give ``None``
with the reason, which the report shows as "n/a".
"""

from __future__ import annotations

import datetime
import itertools
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATS_EVENTS = frozenset({"shard_stats", "router_stats"})
STALL_FIELD = "loop_stall_max_ms"


@dataclass(frozen=True)
class StatsLine:
    at_unix_s: float
    covers_from_unix_s: float
    loop_stall_max_ms: float | None


def _unix_s(stamp: object) -> float | None:
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


def _objects(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a log file; other lines (a traceback, a warning) are skipped."""
    found: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return found
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


def stats_lines(path: Path) -> list[StatsLine]:
    """The stats lines of one process's log, in order, each with the span it covers."""
    lines: list[StatsLine] = []
    previous: float | None = None
    for record in _objects(path):
        at = _unix_s(record.get("timestamp"))
        if at is None:
            continue
        if previous is None:
            previous = at  # the process's first log line: where the first span starts
        if record.get("event") not in STATS_EVENTS:
            continue
        stall = record.get(STALL_FIELD)
        value = float(stall) if isinstance(stall, int | float) else None
        lines.append(StatsLine(at, previous, value))
        previous = at
    return lines


def stats_period_s(lines: list[StatsLine]) -> float | None:
    """The median time between stats lines (None with fewer than two)."""
    gaps = [b.at_unix_s - a.at_unix_s for a, b in itertools.pairwise(lines)]
    return round(statistics.median(gaps), 3) if gaps else None


def worst_stall(lines: list[StatsLine], window_from: float, window_to: float) -> dict[str, Any]:
    """The worst loop stall of the lines overlapping ``[window_from, window_to]`` (Unix s)."""
    covering = [
        line
        for line in lines
        if line.covers_from_unix_s < window_to and line.at_unix_s > window_from
    ]
    if not covering:
        return {"ms": None, "why": "no stats line covers the window"}
    values = [line.loop_stall_max_ms for line in covering if line.loop_stall_max_ms is not None]
    if not values:
        return {"ms": None, "why": f"the stats lines have no {STALL_FIELD}"}
    span_s = max(line.at_unix_s for line in covering) - min(
        line.covers_from_unix_s for line in covering
    )
    return {"ms": max(values), "lines": len(covering), "span_s": round(span_s, 3)}
