"""``with_metadata`` binds caller metadata only when there is some, and never leaks it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from shard_router.common import calls


@pytest.fixture
def bindings(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The fields of every structlog binding ``with_metadata`` makes."""
    made: list[dict[str, Any]] = []
    real = structlog.contextvars.bound_contextvars

    @contextlib.contextmanager
    def counting(**fields: Any) -> Iterator[None]:
        made.append(fields)
        with real(**fields):
            yield

    monkeypatch.setattr(structlog.contextvars, "bound_contextvars", counting)
    return made


async def seen() -> tuple[dict[str, str], dict[str, Any]]:
    return calls.request_metadata.get(), structlog.contextvars.get_contextvars()


def test_a_call_without_metadata_is_run_as_it_is_with_nothing_bound(
    bindings: list[dict[str, Any]],
) -> None:
    async def scenario() -> None:
        call = seen()
        assert calls.with_metadata({}, call) is call, "no wrapper, nothing set"
        assert await call == ({}, {})

    asyncio.run(scenario())
    assert bindings == []


def test_a_call_with_metadata_sees_it_and_its_log_fields_then_nothing_is_left(
    bindings: list[dict[str, Any]],
) -> None:
    metadata = {"x-request-id": "req-1", "traceparent": "00-ab-cd-01", "tracestate": "t=1"}

    async def scenario() -> None:
        inside = await calls.with_metadata(metadata, seen())
        assert inside == (metadata, {"request_id": "req-1", "traceparent": "00-ab-cd-01"})
        assert await seen() == ({}, {})

    asyncio.run(scenario())
    assert bindings == [{"request_id": "req-1", "traceparent": "00-ab-cd-01"}]


def test_metadata_without_log_fields_is_in_context_with_nothing_bound(
    bindings: list[dict[str, Any]],
) -> None:
    async def scenario() -> None:
        inside = await calls.with_metadata({"tracestate": "t=1"}, seen())
        assert inside == ({"tracestate": "t=1"}, {})

    asyncio.run(scenario())
    assert bindings == []


def test_a_call_without_metadata_inside_one_with_metadata_sees_none_of_it() -> None:
    async def outer() -> tuple[dict[str, str], dict[str, Any]]:
        return await calls.with_metadata({}, seen())

    async def scenario() -> None:
        metadata, _ = await calls.with_metadata({"x-request-id": "req-1"}, outer())
        assert metadata == {}

    asyncio.run(scenario())
