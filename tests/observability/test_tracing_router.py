"""The router's spans of a forwarded Batch item: its server span, and a hop per attempt,
each the parent the item it sends names (a real router, in-process fake shards)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from inventory.v1 import inventory_pb2 as pb
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from inventory_core import InventoryKey, bucket_key
from shard_router.common import tracing
from shard_router.common.config import TracingConfig
from shard_router.router import hot_keys
from tests.router.fake_shard import MERCHANT
from tests.router.test_batch_path import cluster, reserves, run

from .test_tracing import ON, SAMPLED, TRACE_ID, Exported, parent_in


@pytest.fixture
def exported() -> Iterator[Exported]:
    exporter = InMemorySpanExporter()
    with tracing.traced(ON, "router", exporter) as provider:
        yield Exported(provider, exporter)


def test_a_redirected_item_is_one_server_span_with_a_hop_per_attempt(exported: Exported) -> None:
    async def scenario() -> None:
        async with cluster() as c:
            request = reserves(["loc-1"], sku="moved-rice")  # NOT_OWNER first, then served
            request.items[0].metadata.update(SAMPLED)
            results = await c.batch(request)
            assert results[1].WhichOneof("result") == "reserve"
            sent = [item for shard in c.shards.values() for item in shard.items_seen]
            assert len(sent) == 2, "the first attempt and its retry"
            hops = [s for s in exported.finished() if s.kind is SpanKind.CLIENT]
            assert sorted(parent_in(item) for item in sent) == sorted(
                hop.context.span_id for hop in hops
            )

    run(scenario)
    spans = exported.finished()
    caller = int(SAMPLED["traceparent"].split("-")[2], 16)
    (server,) = [s for s in spans if s.parent is not None and s.parent.span_id == caller]
    hops = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert server.kind is SpanKind.SERVER
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert len(hops) == 2
    assert all(hop.parent == server.context for hop in hops)
    # The fake shards serve in this process, and trace too: each attempt's span under its hop.
    shard_spans = [s for s in spans if s.kind is SpanKind.SERVER and s is not server]
    assert sorted(s.parent.span_id for s in shard_spans if s.parent) == sorted(
        hop.context.span_id for hop in hops
    )
    codes = sorted(hop.attributes["rpc.grpc.status_code"] for hop in hops)  # type: ignore[index]
    assert codes == [0, 14], "the redirect (UNAVAILABLE), then the answer"
    assert server.attributes is not None and server.attributes["rpc.grpc.status_code"] == 0


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_an_item_that_comes_without_a_trace_starts_one_at_the_router_at_its_ratio(
    ratio: float,
) -> None:
    exporter = InMemorySpanExporter()
    config = TracingConfig("http://127.0.0.1:4317", sample_ratio=ratio)

    async def scenario() -> list[pb.BatchItem]:
        async with cluster() as c:
            await c.batch(reserves(["loc-1", "loc-2"]))
            return [item for shard in c.shards.values() for item in shard.items_seen]

    with tracing.traced(config, "router", exporter, item_roots=True) as provider:
        sent: list[pb.BatchItem] = []

        async def collect() -> None:
            sent.extend(await scenario())

        run(collect)
        provider.force_flush()
    spans = list(exporter.get_finished_spans())
    roots = [s for s in spans if s.parent is None]
    assert len(sent) == 2
    if ratio == 0:
        assert spans == [] and all("traceparent" not in item.metadata for item in sent)
        return
    assert len(roots) == 2 and all(root.kind is SpanKind.SERVER for root in roots)
    hops = {s.context.span_id for s in spans if s.kind is SpanKind.CLIENT}
    assert {parent_in(item) for item in sent} == hops


def test_pb_items_keep_their_own_metadata_besides_the_traceparent(exported: Exported) -> None:
    item = pb.BatchItem(id=1, reserve=pb.ReserveRequest())
    item.metadata.update({"x-request-id": "req-1", **SAMPLED})
    span, _ = tracing.serve_item(item, lambda _: None)
    assert span is not None
    assert item.metadata["x-request-id"] == "req-1"
    assert parent_in(item) == span.get_span_context().span_id


def test_a_split_keys_walk_is_a_server_span_whose_first_hop_is_its_child(
    exported: Exported, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = InventoryKey(MERCHANT, "rice", "loc-1")
    views = hot_keys.HotKeyMap()
    views.put(hot_keys.SplitView(home, (home, bucket_key(home, 1)), generation=1, merging=False))
    monkeypatch.setattr(hot_keys, "HotKeyMap", lambda: views)  # the router knows the split

    async def scenario() -> list[pb.BatchItem]:
        async with cluster() as c:
            request = reserves(["loc-1"])
            request.items[0].metadata.update(SAMPLED)
            results = await c.batch(request)
            assert results[1].WhichOneof("result") == "reserve"
            return [item for shard in c.shards.values() for item in shard.items_seen]

    sent: list[pb.BatchItem] = []

    async def collect() -> None:
        sent.extend(await scenario())

    run(collect)
    spans = exported.finished()
    caller = int(SAMPLED["traceparent"].split("-")[2], 16)
    (server,) = [s for s in spans if s.parent is not None and s.parent.span_id == caller]
    (hop,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert hop.parent == server.context
    (first,) = sent
    assert parent_in(first) == hop.context.span_id
