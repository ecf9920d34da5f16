"""HDR latency histograms per call kind, mergeable across generator processes.

Latencies are recorded in microseconds from 1 us to ``LATENCY_US_MAX`` with 3 significant
digits (0.1 % error). A ``Recorder`` keeps one histogram and one status-code tally per call
kind ("reserve", "read", "commit", "release"); ``encoded()`` turns it into picklable text
(HdrHistogram's compressed base64) that ``merge`` adds back together in the parent.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

LATENCY_US_MIN = 1
# Calls are bounded by their deadline (seconds); 10 minutes covers any open-loop backlog.
LATENCY_US_MAX = 600_000_000
SIGNIFICANT_DIGITS = 3
PERCENTILES = {"p50": 50.0, "p95": 95.0, "p99": 99.0, "p99_9": 99.9}
# Points of a latency CDF plot.
CDF_POINTS_MAX = 400


def new_histogram() -> Any:
    return HdrHistogram(LATENCY_US_MIN, LATENCY_US_MAX, SIGNIFICANT_DIGITS)


@dataclass
class Recorder:
    histograms: dict[str, Any] = field(default_factory=dict)
    codes: dict[str, Counter[str]] = field(default_factory=dict)

    def record(self, kind: str, latency_s: float, code: str) -> None:
        histogram = self.histograms.get(kind)
        if histogram is None:
            histogram = self.histograms[kind] = new_histogram()
            self.codes[kind] = Counter()
        latency_us = min(max(int(latency_s * 1_000_000), LATENCY_US_MIN), LATENCY_US_MAX)
        histogram.record_value(latency_us)
        self.codes[kind][code] += 1

    def encoded(self) -> dict[str, tuple[str, dict[str, int]]]:
        return {
            kind: (histogram.encode().decode("ascii"), dict(self.codes[kind]))
            for kind, histogram in self.histograms.items()
        }


def merge(parts: list[dict[str, tuple[str, dict[str, int]]]]) -> Recorder:
    merged = Recorder()
    for part in parts:
        for kind, (encoded, codes) in part.items():
            if kind not in merged.histograms:
                merged.histograms[kind] = new_histogram()
                merged.codes[kind] = Counter()
            merged.histograms[kind].decode_and_add(encoded)
            merged.codes[kind].update(codes)
    return merged


def summary(histogram: Any) -> dict[str, float]:
    """Count and latency percentiles in milliseconds."""
    figures = {"count": float(histogram.get_total_count())}
    for name, percentile in PERCENTILES.items():
        figures[f"{name}_ms"] = histogram.get_value_at_percentile(percentile) / 1000.0
    figures["max_ms"] = histogram.get_max_value() / 1000.0
    figures["mean_ms"] = histogram.get_mean_value() / 1000.0
    return figures


def cdf(histogram: Any) -> list[tuple[float, float]]:
    """(latency ms, fraction of calls at or below it), at most ``CDF_POINTS_MAX`` points."""
    total = histogram.get_total_count()
    if total == 0:
        return []
    points: list[tuple[float, float]] = []
    for item in histogram.get_recorded_iterator():
        points.append((item.value_iterated_to / 1000.0, item.total_count_to_this_value / total))
    step = max(1, len(points) // CDF_POINTS_MAX)
    thinned = points[::step]
    if thinned[-1] != points[-1]:
        thinned.append(points[-1])
    return thinned
