"""Counting the asyncio tasks a piece of code creates (for "no task per item" tests)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def tasks_created() -> Iterator[list[str]]:
    """The qualified names of the coroutines of every task created inside the block, on
    the running loop (its task factory is restored afterwards)."""
    loop = asyncio.get_running_loop()
    created: list[str] = []
    default_factory = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        created.append(coro.__qualname__)
        if default_factory is not None:
            return default_factory(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(counting)
    try:
        yield created
    finally:
        loop.set_task_factory(default_factory)
