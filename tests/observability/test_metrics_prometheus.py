"""A real Prometheus scrapes a real router and shard; promtool checks the rule file.

One shard and one router (real processes, embedded PostgreSQL and Redis) export metrics on
loopback; the test calls the router, starts the distribution's ``prometheus`` on loopback
with a generated configuration (the rule file loaded too) and asks its HTTP API until the
request counter shows the calls, polling within a generous bound. ``promtool`` checks and
unit-tests ops/prometheus/alerts.yml, and every metric name the rule file and the Grafana
dashboard use must be one the running processes export.

Without ``prometheus`` / ``promtool`` on the PATH these tests skip, unless
INVENTORY_REQUIRE_PROMETHEUS=1 (CI sets it): then they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from tests.conftest import (
    Cluster,
    embedded_redis,
    free_port,
    fresh_database,
    start_cluster,
)

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "ops" / "prometheus" / "alerts.yml"
RULES_TEST = ROOT / "ops" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "inventory.json"
# Prometheus starts, scrapes (every second) and answers within this long even on a busy
# machine; the test polls until then and fails only after it.
PROMETHEUS_DEADLINE_S = 120.0
POLL_INTERVAL_S = 0.5
RESERVES = 5
# A metric name in a PromQL expression (ours and the process collector's).
METRIC_NAME = re.compile(r"\b((?:inventory|process)_[a-z0-9_]+)\b")
# Quoted strings (label values, annotations) and YAML comments: no metric names there.
QUOTED_OR_COMMENT = re.compile(r'"[^"\n]*"|#[^\n]*')
# The series a histogram or counter family is exported as.
SUFFIXES = ("_bucket", "_sum", "_count", "_total")


def tool(name: str) -> str:
    """The binary's path; a skip (or, under INVENTORY_REQUIRE_PROMETHEUS=1, a failure)
    when it is not installed."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} is not installed (Debian/Ubuntu: apt-get install prometheus)"
    if os.environ.get("INVENTORY_REQUIRE_PROMETHEUS") == "1":
        pytest.fail(f"{reason}; INVENTORY_REQUIRE_PROMETHEUS=1 requires it")
    pytest.skip(reason)


def test_promtool_checks_the_rule_file() -> None:
    answer = _run([tool("promtool"), "check", "rules", str(RULES)])
    assert "SUCCESS" in answer.stdout, answer.stdout + answer.stderr


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    answer = _run([tool("promtool"), "test", "rules", RULES_TEST.name], cwd=RULES_TEST.parent)
    assert "SUCCESS" in answer.stdout, answer.stdout + answer.stderr


def _run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    answer = subprocess.run(
        command, cwd=cwd, check=False, capture_output=True, text=True, timeout=120
    )
    assert answer.returncode == 0, answer.stdout + answer.stderr
    return answer


# --- a running router and shard ---------------------------------------------------------


class Exporting:
    """The cluster and where its processes' metrics are."""

    def __init__(self, cluster: Cluster, shard_metrics: str, router_metrics: str) -> None:
        self.cluster = cluster
        self.shard_metrics = shard_metrics
        self.router_metrics = router_metrics


@pytest.fixture(scope="module")
def exporting(
    postgres_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Exporting]:
    directory = tmp_path_factory.mktemp("metrics-cluster")
    shard_metrics, router_metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    with fresh_database(postgres_server_url) as database_url, embedded_redis() as redis_url:
        cluster = start_cluster(
            database_url,
            directory,
            shards=1,
            redis_url=redis_url,
            shard_arguments=("--metrics-listen", shard_metrics),
            router_arguments=("--metrics-listen", router_metrics),
        )
        try:
            _make_calls(cluster.router.address)
            yield Exporting(cluster, shard_metrics, router_metrics)
        finally:
            cluster.stop()


def _make_calls(router: str) -> None:
    """Stock, then RESERVES one-line reservations, a read, and a Watch that is left."""
    key = pb.InventoryKey(merchant_id="m-1", sku_id="sku-1", location_id="store-1")
    with grpc.insecure_channel(router) as channel:
        inventory = pb_grpc.InventoryStub(channel)
        stock = pb.SetStockRequest(key=key, on_hand=100, idempotency_key="stock-1")
        inventory.SetStock(stock, timeout=30)
        for number in range(RESERVES):
            line = pb.ReservationLine(key=key, quantity=1)
            request = pb.ReserveRequest(lines=[line], idempotency_key=f"reserve-{number}")
            inventory.Reserve(request, timeout=30)
        inventory.GetAvailability(pb.GetAvailabilityRequest(keys=[key]), timeout=30)


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as answer:
        return str(answer.read().decode())


def _exported_names(text: str) -> set[str]:
    """Every series name in a scrape, and each family's name without its suffix."""
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            names.add(name)
            names.update(name.removesuffix(s) for s in SUFFIXES if name.endswith(s))
    return names


@pytest.mark.e2e
@pytest.mark.pg
def test_the_processes_export_every_name_the_rules_and_the_dashboard_use(
    exporting: Exporting,
) -> None:
    exported = _exported_names(_scrape(exporting.shard_metrics))
    exported |= _exported_names(_scrape(exporting.router_metrics))
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    text = "\n".join([RULES.read_text(), *expressions])
    used = set(METRIC_NAME.findall(QUOTED_OR_COMMENT.sub("", text)))
    assert len(used) >= 20, sorted(used)
    assert used - exported == set(), f"used but not exported: {sorted(used - exported)}"


@pytest.mark.e2e
@pytest.mark.pg
def test_a_real_prometheus_scrapes_router_and_shard_and_counts_the_calls(
    exporting: Exporting, tmp_path: Path
) -> None:
    binary = tool("prometheus")
    port = free_port()
    configuration = tmp_path / "prometheus.yml"
    configuration.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    _job("inventory_router", exporting.router_metrics),
                    _job("inventory_shard", exporting.shard_metrics),
                ],
            }
        )
    )
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={configuration}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        reserves = (
            'sum(inventory_grpc_calls_total{job="inventory_router",method="Reserve",code="OK"})'
        )
        assert _poll(port, reserves, process, tmp_path) == RESERVES
        items = 'sum(inventory_batch_items_total{job="inventory_shard",kind="reserve",code="OK"})'
        assert _poll(port, items, process, tmp_path) == RESERVES
        assert _poll(port, 'up{job="inventory_shard"}', process, tmp_path) == 1
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _job(name: str, target: str) -> dict[str, object]:
    return {"job_name": name, "static_configs": [{"targets": [target]}]}


def _poll(port: int, query: str, process: subprocess.Popen[bytes], logs: Path) -> float:
    """The query's value once it has one at least as high as it will get in this test
    (the calls were all made before): polled until PROMETHEUS_DEADLINE_S."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    deadline = time.monotonic() + PROMETHEUS_DEADLINE_S
    last: object = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = (logs / "prometheus.log").read_text(errors="replace")
            raise AssertionError(f"prometheus exited with {process.returncode}:\n{log}")
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                last = json.loads(answer.read())
        except OSError as error:  # not listening yet
            last = error
        else:
            result = last["data"]["result"] if isinstance(last, dict) else []
            if result and float(result[0]["value"][1]) >= 1:
                return float(result[0]["value"][1])
        time.sleep(POLL_INTERVAL_S)
    raise AssertionError(f"no value for {query} in {PROMETHEUS_DEADLINE_S:g} s: {last}")
